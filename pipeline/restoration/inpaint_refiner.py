"""Inpainting with a trained pixel refiner: ``restore --task inpaint --checkpoint REFINER``, where
REFINER is a ``train-refiner --task inpaint`` output (or one of its checkpoints) used as it is.

The fill is the project's fidelity-mode estimate over the classical floor: the refiner sees the
biharmonic base (:func:`degrade.inpaint_base`) and the hole, predicts the residual in the hole,
and the output is ``base + gain * feather * refiner(base, hole)`` there
(:meth:`Restorer.compose_inpaint`, the same composition as the zero-shot fill); outside the hole,
the input's pixels byte for byte. The gain defaults to the one calibrated on held-out photos
(:func:`calibrate`, run by ``train-refiner --calibration-images``), else 0: exactly the base.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError
from pipeline.io import checkpoint, storage
from pipeline.io.imaging import PixelsT, rgb_levels, to_8bit, to_tensor_array
from pipeline.models import degrade, quality, refiner
from pipeline.models.degrade import INPAINT
from pipeline.models.tiling import tiled_apply
from pipeline.restoration.restorer import InpaintParts, Restorer, RestoreSettings, default_gain


def is_refiner(url: str, storage_options: dict | None = None) -> bool:
    """Is the checkpoint at ``url`` a refiner (``train-refiner`` output)? False for anything else."""
    try:
        return checkpoint.read_raw_config(checkpoint.local_copy(url, storage_options)).get("kind") == "refiner"
    except (checkpoint.CheckpointError, OSError):
        return False


def check(url: str, task: str, storage_options: dict | None = None) -> str:
    """``inpaint``, or a ConfigError: a refiner checkpoint restores only as an inpainting one
    (the other tasks' refiners are bundled into a task checkpoint: ``train --refiner``)."""
    _, info = checkpoint.load(url, "refiner", storage_options)
    where = storage.redact(url)
    if info.task != INPAINT:
        raise ConfigError(
            f"{where} is a {info.task} refiner: bundle it into a task checkpoint with "
            f"`train --task {info.task} --refiner` and restore with that"
        )
    if task and task != INPAINT:
        raise ConfigError(f"{where} is an inpainting refiner: it runs --task inpaint, not {task!r}")
    return INPAINT


class RefinerInpainter:
    """Fills holes with an inpainting refiner (a :class:`backends.RestorerLike`)."""

    task = INPAINT
    scale = 1

    def __init__(self, url: str, task: str, opts: RestoreSettings, storage_options: dict | None = None):
        check(url, task, storage_options)
        _, info = checkpoint.load(url, "refiner", storage_options)
        self.net = refiner.load(url, storage_options, task=INPAINT)
        self.opts, self.info = opts, info
        self.gain = default_gain(info, opts)

    @torch.no_grad()
    def parts(self, im: Image.Image, hole: np.ndarray, *, with_model: bool = False) -> InpaintParts:
        """The classical fill and the refined one (computed when the gain asks for it, or
        ``with_model``) of ``im`` with the ``hole`` (bool (H, W), True = fill)."""
        base = degrade.inpaint_base(im, hole)
        model = None
        if (self.gain or with_model) and hole.any():
            b = torch.from_numpy((base.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32))[None]
            x = self.net.input(b, torch.from_numpy(hole.astype(np.float32))[None, None])
            r = tiled_apply(self.net, x, self.opts.tile, self.opts.overlap)
            model = base + r[0].numpy().transpose(1, 2, 0) * 127.5
        return InpaintParts(np.asarray(im.convert("RGB")), hole, base, model)

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        """Inpaint one RGB image (16-bit levels are inpainted at 8 bits, as zero-shot inpainting)."""
        if mask is None:
            raise ValueError("inpaint needs a mask (a mask image or the input's alpha)")
        rgb = to_8bit(im)
        hole = degrade.mask_hole(mask, rgb.size, self.opts.mask_dilate)
        out = Restorer.compose_inpaint(self.parts(rgb, hole), self.gain)
        return out if isinstance(im, Image.Image) else rgb_levels(out)

    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        raise ValueError("inpaint needs a mask (a mask image or the input's alpha)")


def hole_psnr(out: Image.Image, original: Image.Image, hole: np.ndarray) -> float:
    """PSNR (dB) of ``out`` against ``original`` over the hole's pixels only."""
    a, b = (np.asarray(x.convert("RGB"), np.float64)[hole] for x in (out, original))
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))


def hole_ssim(out: Image.Image, original: Image.Image, hole: np.ndarray) -> float:
    """SSIM of ``out`` against ``original`` on the hole's bounding box (grown by the 11-px window)."""
    ys, xs = np.nonzero(hole)
    y0, y1 = max(0, ys.min() - 5), min(hole.shape[0], ys.max() + 6)
    x0, x1 = max(0, xs.min() - 5), min(hole.shape[1], xs.max() + 6)
    a, b = (torch.from_numpy(to_tensor_array(x.convert("RGB").crop((x0, y0, x1, y1))))[None] for x in (out, original))
    return float(quality.ssim(a, b)[0])


def calibrate(inpainter: RefinerInpainter, photos: list[Image.Image], gains: tuple[float, ...]) -> dict:
    """Hole PSNR and SSIM of each gain on ``photos`` (photo ``i`` gets the generated hole of seed
    ``i``, :func:`degrade.inpaint_mask`, 5-25 % of it) and the recommended gain: the best mean
    hole PSNR among the gains never below the base (gain 0) on any photo; 0 if none is."""
    gains = tuple(sorted({0.0, *gains}))  # gain 0, the base, is the floor
    psnrs: dict[float, list[float]] = {g: [] for g in gains}
    ssims: dict[float, list[float]] = {g: [] for g in gains}
    for i, im in enumerate(photos):
        hole = degrade.inpaint_mask(im.height, im.width, seed=i)
        parts = inpainter.parts(im, hole, with_model=True)
        for g in gains:
            out = Restorer.compose_inpaint(parts, g)
            psnrs[g].append(hole_psnr(out, im, hole))
            ssims[g].append(hole_ssim(out, im, hole))
    safe = [g for g in gains if all(p >= b for p, b in zip(psnrs[g], psnrs[0.0]))]
    return {
        "images": len(photos),
        "hole_psnr_by_gain": {g: round(float(np.mean(v)), 3) for g, v in psnrs.items()},
        "hole_ssim_by_gain": {g: round(float(np.mean(v)), 4) for g, v in ssims.items()},
        "hole_psnr_per_image": {g: [round(p, 3) for p in v] for g, v in psnrs.items()},
        "recommended_gain": max(safe, key=lambda g: np.mean(psnrs[g])) if safe else 0.0,
    }
