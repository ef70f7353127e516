"""The one degradation module: training pairs, conditioning views, evaluation and tests use it.

Tasks:

* ``upscale2`` / ``upscale4``: the target is downsampled by the factor (bicubic, antialiased);
  the *conditioning view* is that low-resolution copy brought back to the target size with
  Lanczos interpolation (the classical baseline restoration must never fall below).
* ``restore``: Gaussian blur (sigma 1.2 px), Gaussian noise (sigma 8/255), then JPEG at
  quality 35, at the same size; the view is the degraded image itself.

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


INPAINT = "inpaint"  # zero-shot only: no degradation to train on, so not in TASKS
RESTORE_TASKS = (*TASKS, INPAINT)
# the upscale factors of the tasks, and each factor's task (``restore --scale``)
UPSCALE_TASKS: dict[int, str] = {t.scale: name for name, t in TASKS.items() if t.scale > 1}


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
    """Caching-time view of a clean target image: degrade, then :func:`condition_view`."""
    view = condition_view(task, degrade(task, target, seed_for(key)))
    assert isinstance(view, Image.Image)  # an image in, an image out
    if view.size != target.size:  # sizes not divisible by the factor
        view = view.resize(target.size, Image.Resampling.LANCZOS)
    return to_tensor_array(view)
