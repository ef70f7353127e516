"""Restoring and upscaling one image with a diffusion checkpoint (the core under ``restore`` and ``eval``).

Why residuals: a latent method can be no sharper than its autoencoder, and a small autoencoder
reconstructs photos *worse* than a plain Lanczos resize (see docs/ARCHITECTURE.md). So the image is never
decoded as a whole. The output is

    out = base + gain * P(D(z) - D(z_base))

* ``base``: the classical result, :func:`degrade.classical_base` of the input: for ``upscaleN``
  the back-projected upsample, consistent with the input (downsampled, it gives the input back);
  for ``restore`` the input denoised (total variation) and deconvolved (Wiener, the task's known
  blur); for ``inpaint`` the biharmonic fill of the hole (:func:`degrade.inpaint_base`);
* ``z_base``: the (scaled) latent of the view the model is conditioned on
  (:func:`degrade.condition_view`, the Lanczos upsample); ``z``: the latent the denoiser produced;
* ``D(z) - D(z_base)``: the detail the model adds, as a *difference* of two decodes, so the
  autoencoder's own reconstruction error cancels out instead of capping the result;
* ``P``: for upscaling, the projection that removes the part of the detail that would change the
  low-resolution image (``P(r) = r - up(down(r))``), so the output stays consistent with the
  input; low-frequency colour drift from the autoencoder cannot get in. After adding the detail,
  a few back-projection steps make the output consistent with the input again (range–null-space
  decomposition, as in DDNM: the model only fills what the downsampling cannot see);
* for ``restore``, the model is conditioned on the degraded input itself, so its detail is
  measured from the classical base instead: ``out = base + gain * (view + D(z) - D(z_base) - base)``
  (gain 1 is the model's own estimate);
* ``gain``: the ``--gain`` option (0 gives exactly the classical base: the floor).

Model kinds: a checkpoint trained with ``train --task T`` (concat-conditioned, it generates the
residual latent ``(z - z_base) * residual_scale`` from noise), or any unconditional checkpoint in
zero-shot mode (SDEdit: noise ``z_base`` to ``t = noise`` and integrate back). Inpainting runs on
the same rule (:class:`inpainter.Inpainter`): ``out = base + gain * feather * (fill - base)`` in
the hole (the feather rises over :data:`degrade.INPAINT_FEATHER` pixels inside it), the input's
own pixels byte for byte outside it. With a ``train --task inpaint`` checkpoint the fill is
``base + D(z) - D(z_base)``, ``z`` generated conditioned on the base's latent and the hole at the
latent grid (as the model was trained); with an unconditional one it is zero-shot RePaint: it
starts from the base's latent (not the masked image's) and re-imposes the known latents at every
step. Either way an uncalibrated checkpoint's default gain is :data:`UNCALIBRATED_GAIN` (0): the
default inpainting result is the classical fill, never below it.
A mask of another size than its image is refused (ValueError), never resized.

Large images run tile by tile (:mod:`tiling`): memory is bounded by ``tile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError, check_limits, option
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.io.imaging import Pixels, PixelsT, size_of, to_tensor_array
from pipeline.models import degrade, denoiser, flow
from pipeline.models.autoencoder import scale_latents, unscale_latents
from pipeline.models.degrade import INPAINT, from_residual
from pipeline.models.loading import DiffusionModel
from pipeline.models.tiling import tiled_apply, tiled_model_fn
from pipeline.restoration.inpainter import Inpainter

COLOR_FIXES = ("none", "adain")
MODES = ("fidelity", "detail")
CONSISTENCY_STEPS = 3  # back-projection steps after adding the detail (the base itself is already consistent)


@dataclass
class RestoreSettings:
    """How the restorer runs: one option group shared by ``restore`` and ``eval``, so ``eval``
    calibrates under exactly the settings ``restore`` then uses."""

    mode: str = option(
        "fidelity",
        "fidelity: the posterior mean, one model evaluation from pure noise (the estimate closest to the "
        "original on average: highest PSNR, softer texture; the default for bulk work); detail: a posterior "
        "sample in --steps steps (sharper, plausible texture, lower PSNR: the perception-distortion trade-off)",
        choices=MODES,
    )
    steps: int = option(20, "sampler steps in detail mode", range=(1, 10000))
    gain: float | None = option(
        None,
        "detail gain of a task model (0: exactly the classical base; default: the gain calibrated when "
        "the model was trained, else 0, the classical base: an uncalibrated model could fall below it)",
        range=(0, 10),
    )
    noise: float = option(1.0, "zero-shot only (unconditional checkpoint): SDEdit noise level t0", range=(0, 1))
    tile: int = option(256, "tile size in output pixels (memory is bounded by it)", range=(32, 8192))
    overlap: int = option(32, "tile overlap in pixels (less than half the tile)", range=(0, None))
    seed: int = option(0, "random seed")
    sampler: str = option("euler", "sampler", choices=flow.SAMPLERS)
    color_fix: str = option("none", "colour correction to the classical base", choices=COLOR_FIXES)
    mask_dilate: int = option(0, "inpaint only: grow the mask (the hole) by this many pixels first", range=(0, 4096))

    def __post_init__(self) -> None:
        check_limits(self)
        if self.overlap >= self.tile // 2:
            raise ConfigError(
                f"option 'overlap' must be less than half the tile (--tile {self.tile}), got {self.overlap}"
            )


# The gain of a task model that was never calibrated: 0, exactly the classical base. Uncalibrated,
# the learned part can land below its base (seen: -0.48 dB on a held-out photo at gain 1), and a
# default is never worse than the classical base.
UNCALIBRATED_GAIN = 0.0


def default_gain(info: CheckpointInfo, opts: RestoreSettings) -> float:
    """``--gain``, else the gain calibrated on held-out photos (``train --calibration-images``,
    recorded in the checkpoint), else :data:`UNCALIBRATED_GAIN`."""
    if opts.gain is not None:
        return opts.gain
    return info.gain if info.gain is not None else UNCALIBRATED_GAIN


def check_compatible(info: CheckpointInfo, task: str) -> str:
    """The task a checkpoint will run (``task`` or the one it was trained for), or a ConfigError
    saying why it cannot. Reads only the checkpoint's description, so drivers call it first."""
    conditional = bool(info.model.get("cond_channels"))
    task = task or info.task
    if not task:
        raise ConfigError("the checkpoint is unconditional: choose a --task for zero-shot restoration")
    degrade.check_task(task, allow_inpaint=True)
    if conditional and info.task != task:
        raise ConfigError(f"the checkpoint was trained for task {info.task!r}, not {task!r}")
    return task


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad the last two dims up to a multiple; returns the padded tensor and the original (h, w)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def project_upscale(residual: torch.Tensor, scale: int) -> torch.Tensor:
    """Remove the part of a pixel residual that would change the downsampled image."""
    h, w = residual.shape[-2:]
    low = F.interpolate(
        residual, size=(max(1, h // scale), max(1, w // scale)), mode="bicubic", antialias=True, align_corners=False
    )
    return residual - F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)


def adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Match per-channel mean and std of ``x`` to ``ref``."""
    xm, xs = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True).clamp_min(1e-5)
    rm, rs = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (x - xm) / xs * rs + rm


@dataclass
class Parts:
    base: torch.Tensor  # classical result (degrade.classical_base), padded (1, 3, H, W) in [-1, 1]
    residual: torch.Tensor  # the model's pixel detail, same shape
    h: int
    w: int
    gain: float  # the gain the options ask for
    lr: Pixels | None = None  # the input of an upscaling task: the output is kept consistent with it


def indices_by_size(images: Sequence[Pixels]) -> list[list[int]]:
    """The positions of ``images`` grouped by image size (each group is one batched model call)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(size_of(im), []).append(i)
    return list(groups.values())


class Restorer(Inpainter):
    """Holds a loaded checkpoint and restores images with it (an :class:`Inpainter` too: its
    :meth:`fill` is the zero-shot fill)."""

    def __init__(self, model: DiffusionModel, task: str, opts: RestoreSettings):
        self.task = check_compatible(model.info, task)
        self.scale = degrade.task_scale(self.task)
        self.conditional = bool(model.denoiser.cfg.cond_channels)
        self.model, self.opts = model, opts
        self.device = next(model.denoiser.parameters()).device
        self.vae = model.vae
        self.refiner = model.refiner
        self.down = self.vae.downsample
        self.multiple = self.down * denoiser.grid_multiple(model.denoiser.cfg)
        self.residual_scale = float(model.info.residual_scale)
        self.gain = default_gain(model.info, opts)

    # ---- autoencoder, tiled
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        t, ov = self.opts.tile, self.opts.overlap
        z = tiled_apply(lambda p: self.vae.encode(p).mean.float(), x.to(self.device), t, ov, factor=1 / self.down)
        return scale_latents(z, self.model.info.scale, self.model.info.shift)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        lt, lo = self.opts.tile // self.down, self.opts.overlap // self.down
        raw = unscale_latents(z, self.model.info.scale, self.model.info.shift)
        return tiled_apply(lambda q: self.vae.decode(q).float(), raw, lt, lo, factor=self.down)

    def _model_fn(self, cond: torch.Tensor | None):
        lt, lo = self.opts.tile // self.down, self.opts.overlap // self.down
        net = self.model.denoiser
        if cond is None:
            return tiled_model_fn(lambda x, t: net(x, t), lt, lo)
        return tiled_model_fn(lambda x, t, c: net(x, t, c), lt, lo, cond=cond)

    @torch.no_grad()
    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        """Restore one RGB image or 16-bit levels (``mask``: L image, white = fill, for ``inpaint``)."""
        if self.task == INPAINT:
            return self.inpaint(im, mask)  # zero-shot inpainting: at 8 bits
        return self.restore_many([im])[0]

    @torch.no_grad()
    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        """Restore several images, batching those of the same size into one model call each.

        Every image gets the same noise it would get alone, so batching does not change results
        (beyond float rounding).
        """
        out: list[Any] = [None] * len(images)
        for idx in indices_by_size(images):
            for i, parts in zip(idx, self.parts_many([images[i] for i in idx])):
                deep = isinstance(images[i], np.ndarray)  # 16-bit levels stay levels
                out[i] = self.compose_levels(parts, parts.gain) if deep else self.compose(parts, parts.gain)
        return out

    def parts(self, im: Pixels) -> Parts:
        """The classical base and the model's projected pixel residual for one image."""
        return self.parts_many([im])[0]

    @torch.no_grad()
    def parts_many(self, images: Sequence[Pixels]) -> list[Parts]:
        """:meth:`parts` for images of one size, computed as one batch (16-bit levels stay levels:
        the classical base takes them as they are)."""
        o = self.opts
        rgb = [im if isinstance(im, np.ndarray) else im.convert("RGB") for im in images]
        bases = [
            pad_to(
                torch.from_numpy(degrade.classical_base(self.task, im).transpose(2, 0, 1) / 127.5 - 1.0)[None],
                self.multiple,
            )
            for im in rgb
        ]
        (h, w) = bases[0][1]
        base = torch.cat([b for b, _ in bases]).float().to(self.device)
        scale = degrade.TASKS[self.task].scale
        lrs = rgb if scale > 1 else [None] * len(rgb)
        if o.mode == "fidelity" and self.refiner is not None:  # the pixel refiner's mean estimate only
            residual, gain = self._refine(base), self.gain
        else:
            # the latent model is conditioned on the view it was trained with (degrade.condition_view)
            views = [
                pad_to(torch.from_numpy(to_tensor_array(degrade.condition_view(self.task, im)))[None], self.multiple)[0]
                for im in rgb
            ]
            residual = self._latent_residual(torch.cat(views).to(self.device), base, len(images))
            gain = self.gain if self.conditional else 1.0
        if scale > 1:
            residual = project_upscale(residual, scale)
        return [Parts(base[i : i + 1], residual[i : i + 1], h, w, gain, lrs[i]) for i in range(len(images))]

    def _refine(self, base: torch.Tensor) -> torch.Tensor:
        """The pixel refiner's residual for the classical base, tile by tile."""
        assert self.refiner is not None
        return tiled_apply(self.refiner, base, self.opts.tile, self.opts.overlap)

    def _sampler(self):
        """The sampler and its steps for ``--mode``: fidelity, one Euler step from t = 1 (the flow
        model's posterior mean, x0_hat = x_1 - v_hat(x_1, 1)); detail, ``--sampler`` in ``--steps``."""
        o = self.opts
        return (flow.euler, 1) if o.mode == "fidelity" else (flow.SAMPLERS[o.sampler], o.steps)

    def _latent_residual(self, view: torch.Tensor, base: torch.Tensor, n: int) -> torch.Tensor:
        """The pixel detail from the latent model, measured from the classical base."""
        o = self.opts
        z_base = self._encode(view)
        shape = (1, *z_base.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(o.seed)) for _ in range(n)])
        noise = noise.to(self.device)
        sample, steps = self._sampler()
        if not self.conditional:  # zero-shot SDEdit from the classical result
            t0 = float(o.noise)
            if t0 == 0:
                return torch.zeros_like(base)
            noisy = flow.interpolate(z_base, noise, torch.full((n,), t0, device=self.device))
            z = sample(self._model_fn(None), noisy, steps, t_start=t0)
            return self._decode(z) - self._decode(z_base)
        model_fn = self._model_fn(z_base)
        z = from_residual(sample(model_fn, noise, steps), z_base, self.residual_scale)
        if self.refiner is not None:  # detail on top of the refiner's mean: the sample minus the latent mean
            z_mean = from_residual(flow.euler(model_fn, noise, 1), z_base, self.residual_scale)
            return self._refine(base) + self._decode(z) - self._decode(z_mean)
        residual = self._decode(z) - self._decode(z_base)
        if degrade.TASKS[self.task].scale == 1:  # the model's estimate (view + residual) measured from the base:
            residual = residual + (view - base)  # gain 0 = the base, gain 1 = the model's own estimate
        return residual

    def compose(self, parts: Parts, gain: float) -> Image.Image:
        """:meth:`compose_levels` rounded to an 8-bit image."""
        return Image.fromarray(np.round(self.compose_levels(parts, gain)).astype(np.uint8), "RGB")

    def compose_levels(self, parts: Parts, gain: float) -> np.ndarray:
        """``base + gain * residual`` (gain 0: exactly the classical result); for upscaling, a few
        back-projection steps then keep the output consistent with the input (range–null-space:
        the model may only add what the downsampling cannot see)."""
        crop = (slice(None), slice(None), slice(0, parts.h), slice(0, parts.w))  # the image without its padding
        out = (parts.base + gain * parts.residual)[crop]
        if self.opts.color_fix == "adain":  # statistics of the image's own pixels, not of the padding
            out = adain(out, parts.base[crop])
        arr = out[0].float().cpu().numpy()
        if parts.lr is not None and gain:
            scale = degrade.TASKS[self.task].scale
            pixels = degrade.back_project(
                parts.lr, scale, iters=CONSISTENCY_STEPS, start=(arr.transpose(1, 2, 0) + 1) * 127.5
            )
            arr = pixels.transpose(2, 0, 1) / 127.5 - 1.0
        arr = np.clip(np.asarray(arr, np.float32), -1, 1).transpose(1, 2, 0)
        return np.clip((arr + 1.0) * 127.5, 0, 255)  # float32 levels; 8 bits: from_tensor_array's rounding

    def fill(self, image: np.ndarray, base: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The model's fill (float (H, W, 3), 0..255) around the classical fill. Both kinds start
        from ``z_base``, the latent of the base (the hole filled smoothly, not masked to zeros), and
        the hole at the latent grid (:func:`degrade.pool_hole`, as at caching time).

        * a ``train --task inpaint`` checkpoint generates the residual latent conditioned on
          ``(z_base, hole)`` (fidelity: the one-step posterior mean; detail: ``--steps`` steps), and
          the fill is ``base + D(z) - D(z_base)`` (:meth:`_conditional_fill`);
        * an unconditional one is zero-shot RePaint: ``z_base`` is noised to ``--noise`` and
          integrated back in ``--steps`` steps, the known latents re-imposed after each, then decoded.
          (Measured on 8 held-out photos at gain 1: starting from the base's latent scored +0.13 dB
          in the hole over the masked image's; adding ``D(z) - D(z_base)`` to the base instead of
          the decode itself scored 0.24 dB lower.)"""
        o = self.opts
        t0 = float(o.noise)
        if t0 == 0 and not self.conditional:  # no noise: nothing to sample, the fill is the base
            return base
        x, (h, w) = pad_to(torch.from_numpy(base.transpose(2, 0, 1) / 127.5 - 1.0).float()[None], self.multiple)
        padded = np.pad(hole, ((0, x.shape[-2] - h), (0, x.shape[-1] - w)), mode="edge")
        m_lat = torch.from_numpy(degrade.pool_hole(padded, self.down).astype(np.float32))[None, None].to(self.device)
        z_base = self._encode(x.to(self.device))
        noise = torch.randn(z_base.shape, generator=torch.Generator().manual_seed(o.seed)).to(self.device)
        if self.conditional:
            return self._conditional_fill(base, z_base, m_lat, noise, h, w)
        ts = flow.timesteps(o.steps, t0, self.device)

        def impose(i: int, z: torch.Tensor) -> torch.Tensor:
            known = flow.interpolate(z_base, noise, ts[i + 1].expand(1))
            return m_lat * z + (1 - m_lat) * known

        start = flow.interpolate(z_base, noise, torch.full((1,), t0, device=self.device))
        z = flow.SAMPLERS[o.sampler](self._model_fn(None), start, o.steps, t_start=t0, callback=impose)
        fill = self._decode(z)[0, :, :h, :w].float().cpu().numpy()
        return (fill.transpose(1, 2, 0) + 1.0) * 127.5

    def _conditional_fill(
        self, base: np.ndarray, z_base: torch.Tensor, m_lat: torch.Tensor, noise: torch.Tensor, h: int, w: int
    ) -> np.ndarray:
        """A ``train --task inpaint`` model's fill: ``base + D(z) - D(z_base)``, ``z`` generated
        conditioned on the base's latent and the hole at the latent grid. (Measured on the 8
        held-out photos of ``bench/quality.py --inpaint-latent`` at gain 1, fidelity mode: the
        decode ``D(z)`` itself scored 0.55 dB lower in the hole: the difference cancels the
        autoencoder's own reconstruction error.)"""
        sample, steps = self._sampler()
        r = sample(self._model_fn(torch.cat([z_base, m_lat], 1)), noise, steps)
        z = from_residual(r, z_base, self.residual_scale)
        detail = (self._decode(z) - self._decode(z_base))[0, :, :h, :w].float().cpu().numpy()
        return base + detail.transpose(1, 2, 0) * 127.5
