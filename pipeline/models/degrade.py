"""The one degradation module: training pairs, conditioning views, evaluation and tests use it.

Tasks:

* ``upscale2`` / ``upscale4``: the target is downsampled by the factor (bicubic, antialiased);
  the *conditioning view* is that low-resolution copy brought back to the target size with
  Lanczos interpolation (the classical baseline restoration must never fall below).
* ``restore``: Gaussian blur (sigma 1.2 px), Gaussian noise (sigma 8/255), then JPEG at
  quality 35, at the same size; the view is the degraded image itself.
* ``inpaint`` (not a degradation, so not in :data:`TASKS`): a generated hole
  (:func:`training_hole`: boxes and strokes, 5 to 25 per cent, seeded by the key); the view is
  the image with the hole filled by the classical base (:func:`inpaint_base`), and the model also
  sees the hole max-pooled to the latent grid (:func:`pool_hole`).

Every random choice is seeded from the sample key, so a view is identical at caching time, at
inference time and across re-runs. :func:`condition_view` is the function both caching
(``encode --tasks``) and inference (``restore``) use to turn a degraded input into the view.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from pipeline.config import ConfigError
from pipeline.io.imaging import Pixels, rgb_levels, size_of, to_tensor_array


@dataclass(frozen=True)
class Task:
    name: str
    scale: int = 1  # output size / input size
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0  # in 0..255 units
    jpeg_quality: int = 0  # 0: no JPEG step


TASKS: dict[str, Task] = {
    "upscale2": Task("upscale2", scale=2),
    "upscale4": Task("upscale4", scale=4),
    "restore": Task("restore", blur_sigma=1.2, noise_sigma=8.0, jpeg_quality=35),
}


INPAINT = "inpaint"  # a hole, not a degradation of the whole image: not in TASKS, but trainable
RESTORE_TASKS = (*TASKS, INPAINT)
# the upscale factors of the tasks, and each factor's task (``restore --scale``)
UPSCALE_TASKS: dict[int, str] = {t.scale: name for name, t in TASKS.items() if t.scale > 1}


def task_scale(task: str) -> int:
    """Output size / input size of a task (1 for ``inpaint``, which has no entry in TASKS)."""
    return TASKS[task].scale if task in TASKS else 1


def check_task(task: str, *, option: str = "task", allow_inpaint: bool = False, allow_empty: bool = False) -> str:
    """The one task validator: ``task`` itself, or a ConfigError naming ``option``."""
    if not task and allow_empty:
        return task
    choices = RESTORE_TASKS if allow_inpaint else tuple(TASKS)
    if task not in choices:
        raise ConfigError(f"option {option!r}: unknown task {task!r}; choose from {', '.join(choices)}")
    return task


def residual_target(z: torch.Tensor, z_base: torch.Tensor, residual_scale: float) -> torch.Tensor:
    """Training target of a task model: the normalised latent residual over the classical view."""
    return (z - z_base) * residual_scale


def from_residual(r: torch.Tensor, z_base: torch.Tensor, residual_scale: float) -> torch.Tensor:
    """Inverse of :func:`residual_target`."""
    return z_base + r / residual_scale


def seed_for(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def degrade(task: str, im: Image.Image, seed: int) -> Image.Image:
    """Make the degraded input a user would hand to ``restore`` for this task."""
    t = TASKS[task]
    out = im.convert("RGB")
    if t.scale > 1:
        w, h = out.size
        out = out.resize((max(1, w // t.scale), max(1, h // t.scale)), Image.Resampling.BICUBIC, reducing_gap=None)
    if t.blur_sigma:
        out = out.filter(ImageFilter.GaussianBlur(t.blur_sigma))
    if t.noise_sigma:
        rng = np.random.default_rng(seed)
        arr = np.asarray(out, dtype=np.float32) + rng.normal(0, t.noise_sigma, (out.height, out.width, 3))
        out = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")
    if t.jpeg_quality:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=t.jpeg_quality)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def condition_view(task: str, degraded: Pixels) -> Pixels:
    """The degraded input brought to the output size: the model's conditioning image (16-bit
    levels stay levels)."""
    t = TASKS[task]
    if t.scale == 1:
        return degraded
    w, h = size_of(degraded)
    if isinstance(degraded, np.ndarray):
        return _resize_channels(degraded, (w * t.scale, h * t.scale), Image.Resampling.LANCZOS)
    return degraded.resize((w * t.scale, h * t.scale), Image.Resampling.LANCZOS)


def _resize_channels(arr: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a float (H, W, C) array channel by channel with Pillow's filters (no rounding)."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(arr[..., c], np.float32), "F").resize(
                    size, resample, reducing_gap=None
                )
            )
            for c in range(arr.shape[-1])
        ],
        -1,
    )


def back_project(lr: Pixels, scale: int, *, iters: int = 10, start: np.ndarray | None = None) -> np.ndarray:
    """Iterative back-projection: an upscaled image consistent with ``lr`` under this module's
    downsampling (the same bicubic kernel as :func:`degrade`).

    Starts from ``start`` (float (H, W, 3) in 0..255) or the Lanczos upsample, then ``iters``
    times adds the Lanczos-upsampled difference between ``lr`` and the current estimate brought
    down. The result is float and not clipped: downsampled, it equals ``lr`` to within 0.2 levels
    after 10 iterations (clipping to 0..255 can only break that where the consistent solution
    leaves the range). It never scored below Lanczos on the photos measured (docs/benchmarks.md).
    """
    lrf = rgb_levels(lr)
    h, w = lrf.shape[:2]
    size = (w * scale, h * scale)
    x = _resize_channels(lrf, size, Image.Resampling.LANCZOS) if start is None else start.astype(np.float32)
    for _ in range(iters):
        low = _resize_channels(x, (w, h), Image.Resampling.BICUBIC)
        x = x + _resize_channels(lrf - low, size, Image.Resampling.LANCZOS)
    return x


# The classical restoration of the ``restore`` task, tuned once on the bundled training photos
# (scikit-image's, never the held-out ones): total-variation denoising, then Wiener
# deconvolution with the task's known Gaussian blur (reflect-padded). It never scored below the
# degraded input on the crops it was tuned on nor on whole held-out photos (docs/benchmarks.md).
RESTORE_TV_WEIGHT = 0.01
RESTORE_WIENER_BALANCE = 0.02


def gaussian_psf(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def classical_restore(task: str, degraded: Pixels) -> np.ndarray:
    """Denoise (TV) and deconvolve (Wiener, the task's known blur) an image of a same-size task;
    float (H, W, 3) in 0..255, unclipped."""
    from skimage.restoration import denoise_tv_chambolle, wiener

    t = TASKS[task]
    x = rgb_levels(degraded).astype(np.float64) / 255.0
    x = denoise_tv_chambolle(x, weight=RESTORE_TV_WEIGHT, channel_axis=-1)
    if t.blur_sigma:  # Wiener works in the Fourier domain: reflect-pad so the borders do not wrap
        psf = gaussian_psf(t.blur_sigma)
        p = min(4 * (psf.shape[0] // 2), x.shape[0] - 1, x.shape[1] - 1)
        xp = np.pad(x, ((p, p), (p, p), (0, 0)), mode="reflect")
        xp = np.stack([wiener(xp[..., c], psf, balance=RESTORE_WIENER_BALANCE, clip=False) for c in range(3)], -1)
        x = xp[p : xp.shape[0] - p, p : xp.shape[1] - p]
    return (x * 255.0).astype(np.float32)


def classical_base(task: str, degraded: Pixels) -> np.ndarray:
    """The classical restoration every output is built on (float (H, W, 3), 0..255, unclipped):
    the back-projected upsample for ``upscaleN`` (consistent with the input), the denoised and
    deconvolved input (:func:`classical_restore`) for ``restore``. ``--gain 0`` gives exactly
    this, clipped. 16-bit levels (:data:`imaging.Pixels`) are taken at their full precision."""
    t = TASKS[task]
    if t.scale == 1:
        return classical_restore(task, degraded)
    return back_project(degraded, t.scale)


def task_view_pixels(task: str, target: Image.Image, key: str) -> np.ndarray:
    """Caching-time view of a clean target image: degrade, then :func:`condition_view`; for
    ``inpaint``, the target with its :func:`training_hole` filled by :func:`inpaint_base`."""
    if task == INPAINT:
        return to_tensor_array(inpaint_base(target, training_hole(key, target.height, target.width)))
    view = condition_view(task, degrade(task, target, seed_for(key)))
    assert isinstance(view, Image.Image)  # an image in, an image out
    if view.size != target.size:  # sizes not divisible by the factor
        view = view.resize(target.size, Image.Resampling.LANCZOS)
    return to_tensor_array(view)


# ---------------------------------------------------------------------------- inpainting
# The classical inpainting base: the biharmonic fill of the hole from its boundary (the smooth
# surface that continues the known pixels' values and slopes: scikit-image's
# ``inpaint_biharmonic``, region by region on each region's bounding box). Its sparse direct
# solve grows faster than the hole (on a 1024-px photo: 1.6 s and 130 MB for a 12 % hole, 3.8 s
# and 410 MB for 26 %; on a 2048-px photo 26 s and 1.8 GB for 26 %; docs/benchmarks.md), so a
# hole of more than INPAINT_EXACT_PIXELS pixels is filled at a lower resolution (a power of 2) and
# brought up bilinearly.
INPAINT_EXACT_PIXELS = 1 << 18
_RING = 4  # known pixels kept around the hole at the coarse resolution (the stencil reaches 2)


def pool_hole(hole: np.ndarray, f: int) -> np.ndarray:
    """The hole (bool (H, W)) at 1/``f`` resolution, edge-padded to a multiple of ``f`` and
    max-pooled: a coarse pixel is in the hole where any pixel of its block is. An inpainting
    model's mask condition is this at the latent grid (``f`` = the autoencoder's downsampling),
    at caching time and at inference time."""
    h, w = hole.shape
    m = np.pad(hole, ((0, -h % f), (0, -w % f)), mode="edge")
    return np.asarray(m.reshape(m.shape[0] // f, f, m.shape[1] // f, f).any((1, 3)))


def _shrink(pixels: np.ndarray, hole: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """The image and hole at 1/``f`` resolution (edge-padded to a multiple of ``f``): a coarse pixel
    is the mean of its block, known where its whole block is."""
    h, w = hole.shape
    p = np.pad(pixels, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
    hh, ww = p.shape[0] // f, p.shape[1] // f
    return p.reshape(hh, f, ww, f, -1).mean((1, 3)), pool_hole(hole, f)


def biharmonic_fill(pixels: np.ndarray, hole: np.ndarray, *, exact_pixels: int = INPAINT_EXACT_PIXELS) -> np.ndarray:
    """``pixels`` (float (H, W, C)) with the ``hole`` (bool (H, W)) filled biharmonically from its
    boundary; pixels outside the hole are returned unchanged. Up to ``exact_pixels`` hole pixels
    this is exactly ``skimage.restoration.inpaint_biharmonic(..., split_into_regions=True)``. A
    larger hole is filled on its bounding box (plus a ring of known pixels) brought down by the
    smallest power of 2 that leaves at most ``exact_pixels`` to solve, then brought up bilinearly
    and clipped per channel to the known pixels' range, as scikit-image clips."""
    from skimage.restoration import inpaint_biharmonic

    pixels = np.asarray(pixels, np.float32)
    if not hole.any():
        return pixels.copy()
    if hole.all():
        raise ValueError("the mask covers the whole image: nothing to fill the hole from")
    n, f = int(hole.sum()), 1
    while n > exact_pixels * f * f:
        f *= 2
    if f == 1:
        return inpaint_biharmonic(pixels, hole, channel_axis=-1, split_into_regions=True).astype(np.float32)
    ys, xs = np.nonzero(hole)
    m = _RING * f
    y0, y1 = max(0, ys.min() - m), min(hole.shape[0], ys.max() + 1 + m)
    x0, x1 = max(0, xs.min() - m), min(hole.shape[1], xs.max() + 1 + m)
    box = hole[y0:y1, x0:x1]
    coarse, coarse_hole = _shrink(pixels[y0:y1, x0:x1], box, f)
    fill = inpaint_biharmonic(coarse, coarse_hole, channel_axis=-1, split_into_regions=True)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(fill.transpose(2, 0, 1), np.float32))[None],
        scale_factor=f,
        mode="bilinear",
        align_corners=False,
    )[0].numpy()
    known = pixels[~hole]
    fill = np.clip(up.transpose(1, 2, 0)[: y1 - y0, : x1 - x0], known.min(0), known.max(0))
    out = pixels.copy()
    out[y0:y1, x0:x1] = np.where(box[..., None], fill, pixels[y0:y1, x0:x1])
    return out


def inpaint_base(im: Image.Image, hole: np.ndarray) -> np.ndarray:
    """The classical inpainting base (float (H, W, 3), 0..255): ``im`` with the ``hole`` (bool
    (H, W), True = fill) filled by :func:`biharmonic_fill`; outside the hole, the image's own
    pixels exactly. ``--gain 0`` of ``restore --task inpaint`` gives exactly this, rounded."""
    return biharmonic_fill(np.asarray(im.convert("RGB"), np.float32), hole)


INPAINT_FEATHER = 4  # pixels inside the hole over which a model's fill blends in from the base


def mask_hole(mask: Image.Image, size: tuple[int, int], dilate: int = 0) -> np.ndarray:
    """The hole (bool (H, W), True = fill) of an inpainting mask: white (128 and above in grey)
    is the hole, grown by ``dilate`` pixels (a disc). A mask of another size than its image
    (``size``, (W, H)) is refused with a ValueError: it is never resized to fit."""
    if mask.size != tuple(size):
        raise ValueError(f"the mask is {mask.width}x{mask.height} but its image is {size[0]}x{size[1]}")
    hole = np.asarray(mask.convert("L")) >= 128
    if dilate and hole.any():
        from scipy import ndimage

        hole = ndimage.distance_transform_edt(~hole) <= dilate
    return hole


def feather(hole: np.ndarray, width: int = INPAINT_FEATHER) -> np.ndarray:
    """Blend weights of a model's fill (float (H, W)): 0 outside the hole, rising inside it from
    1/``width`` at its edge to 1 at ``width`` pixels from the nearest known pixel."""
    from scipy import ndimage

    return np.clip(ndimage.distance_transform_edt(hole) / width, 0, 1).astype(np.float32)


def inpaint_mask(height: int, width: int, seed: int, coverage: tuple[float, float] = (0.05, 0.25)) -> np.ndarray:
    """A generated inpainting hole (bool (H, W), True = fill), as LaMa's training masks: random
    boxes and free-form strokes (thick polylines with round joints) of varied size, added until
    the hole covers a share of the image drawn uniformly from ``coverage``, never more than its
    upper end. Seeded: the same ``seed`` gives the same hole (``eval``, and training later)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    target = rng.uniform(*coverage)
    canvas = Image.new("1", (width, height), 0)
    short = min(width, height)
    for _ in range(200):
        trial = canvas.copy()
        draw = ImageDraw.Draw(trial)
        if rng.random() < 0.5:  # a box of 10-40 % of each side
            bw, bh = (int(rng.uniform(0.1, 0.4) * s) + 1 for s in (width, height))
            x, y = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill=1)
        else:  # a stroke: 2-6 segments of a random walk, 3-10 % of the short side thick
            thick = max(1, int(rng.uniform(0.03, 0.1) * short))
            pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height)))]
            for _ in range(int(rng.integers(2, 7))):
                angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.3) * short
                pts.append(
                    (
                        float(np.clip(pts[-1][0] + length * np.cos(angle), 0, width - 1)),
                        float(np.clip(pts[-1][1] + length * np.sin(angle), 0, height - 1)),
                    )
                )
            draw.line(pts, fill=1, width=thick, joint="curve")
            for px, py in pts:  # round ends and corners
                draw.ellipse((px - thick / 2, py - thick / 2, px + thick / 2, py + thick / 2), fill=1)
        share = float(np.asarray(trial).mean())
        if share > coverage[1]:  # a shape that would overshoot is left out
            continue
        canvas = trial
        if share >= target:
            break
    return np.asarray(canvas, bool)


def training_hole(key: str, height: int, width: int) -> np.ndarray:
    """The generated hole of a training sample (:func:`inpaint_mask` seeded by its key): the same
    at caching time (the view, ``encode --tasks inpaint``) and whenever it is made again."""
    return inpaint_mask(height, width, seed_for(key))
