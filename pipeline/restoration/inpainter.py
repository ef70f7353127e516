"""What every inpainting backend shares: the classical floor, the composition, the hole's scores
and the gain calibration.

An inpainter (:class:`Inpainter`) gives one thing of its own, :meth:`Inpainter.fill`: its fill of
the hole over the whole image, from the input and the classical base
(:func:`degrade.inpaint_base`, the biharmonic fill). The rest is the same for all:

* the output is ``base + gain * feather * (fill - base)`` in the hole (:func:`compose`; the
  feather rises over :data:`degrade.INPAINT_FEATHER` pixels inside it, so the boundary blends)
  and the input's own pixels, byte for byte, outside it; ``--gain 0`` is exactly the base;
* the hole is scored in the hole only (:func:`hole_scores`: PSNR and luma PSNR over its pixels,
  SSIM over its bounding box), and a gain is calibrated on held-out photos with generated holes
  (:func:`calibrate`): the best mean hole PSNR among the gains never below the base on any photo
  (0, the base itself, if none is). ``eval --task inpaint`` and ``train-refiner --task inpaint``
  both calibrate with it.

Inpainting runs at 8 bits: 16-bit levels are brought to 8 bits first and come back as levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.io.imaging import PixelsT, rgb_levels, to_8bit, to_tensor_array
from pipeline.models import degrade, quality
from pipeline.models.degrade import INPAINT

if TYPE_CHECKING:  # (restorer.py imports this module)
    from pipeline.restoration.restorer import RestoreSettings


@dataclass
class InpaintParts:
    image: np.ndarray  # the input, uint8 (H, W, 3)
    hole: np.ndarray  # bool (H, W), True = fill
    base: np.ndarray  # the classical fill (degrade.inpaint_base), float (H, W, 3) in 0..255
    fill: np.ndarray | None  # the inpainter's fill, same shape; None when it was not run (gain 0)


def compose(parts: InpaintParts, gain: float) -> Image.Image:
    """``base + gain * feather * (fill - base)`` in the hole (gain 0: exactly the classical
    fill); outside the hole, the input's own pixels, byte for byte."""
    out = parts.base
    if gain and parts.fill is not None:
        out = out + gain * degrade.feather(parts.hole)[..., None] * (parts.fill - parts.base)
    pixels = parts.image.copy()
    pixels[parts.hole] = np.round(np.clip(out[parts.hole], 0, 255)).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


NO_MASK = "inpaint needs a mask (a mask image or the input's alpha)"


class Inpainter:
    """The base of the inpainting backends (a :class:`backends.RestorerLike` for ``inpaint``).
    A subclass sets ``opts`` (:class:`RestoreSettings`) and ``gain``, and implements :meth:`fill`."""

    task = INPAINT
    scale = 1
    gain: float
    opts: RestoreSettings

    def fill(self, image: np.ndarray, base: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The fill (float (H, W, 3), 0..255; only the hole's pixels are used) of ``image``
        (uint8 (H, W, 3)) with the ``hole`` (bool (H, W)), given the classical ``base``."""
        raise NotImplementedError

    @torch.no_grad()
    def inpaint_parts(self, im: Image.Image, hole: np.ndarray, *, with_model: bool = False) -> InpaintParts:
        """The classical fill and this inpainter's (computed when the gain asks for it, or
        ``with_model``) of the RGB image ``im`` with the ``hole``."""
        image = np.asarray(im.convert("RGB"))
        base = degrade.inpaint_base(im, hole)
        fill = self.fill(image, base, hole) if (self.gain or with_model) and hole.any() else None
        return InpaintParts(image, hole, base, fill)

    def inpaint(self, im: PixelsT, mask: Image.Image | None) -> PixelsT:
        """Inpaint one image (``mask``: L image, white = fill, grown by ``--mask-dilate``)."""
        if mask is None:
            raise ValueError(NO_MASK)
        rgb = to_8bit(im)
        hole = degrade.mask_hole(mask, rgb.size, self.opts.mask_dilate)
        out = compose(self.inpaint_parts(rgb, hole), self.gain)
        return out if isinstance(im, Image.Image) else rgb_levels(out)

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        return self.inpaint(im, mask)

    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        raise ValueError(NO_MASK)


Scores = dict[str, list[float]]  # psnr, psnr_y, ssim: one value per image


def new_scores() -> Scores:
    return {"psnr": [], "psnr_y": [], "ssim": []}


def hole_scores(into: Scores, out: Image.Image, original: Image.Image, hole: np.ndarray) -> None:
    """Append ``out``'s PSNR and luma PSNR over the hole's pixels and its SSIM over the hole's
    bounding box (11 px at least) against ``original``."""
    a, b = np.asarray(out.convert("RGB"), np.float64), np.asarray(original.convert("RGB"), np.float64)
    mse = float(((a - b)[hole] ** 2).mean())
    luma = np.array([65.481, 128.553, 24.966]) / 255.0  # BT.601, as quality.psnr_y
    mse_y = float((((a - b) @ luma)[hole] ** 2).mean())
    into["psnr"].append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
    into["psnr_y"].append(10 * np.log10(255.0**2 / max(mse_y, 1e-10)))
    ys, xs = np.nonzero(hole)
    y0, x0 = min(int(ys.min()), hole.shape[0] - 11), min(int(xs.min()), hole.shape[1] - 11)
    y1, x1 = max(int(ys.max()) + 1, y0 + 11), max(int(xs.max()) + 1, x0 + 11)
    box = (max(0, x0), max(0, y0), x1, y1)
    pa, pb = (torch.from_numpy(to_tensor_array(x.convert("RGB").crop(box)))[None] for x in (out, original))
    into["ssim"].append(float(quality.ssim(pa, pb)[0]))


def never_below(scores: Scores, base: Scores) -> bool:
    """PSNR never below the base's on any image (and so not on average)."""
    return all(p >= b - 1e-4 for p, b in zip(scores["psnr"], base["psnr"]))


@dataclass
class Calibration:
    by_gain: dict[float, Scores]  # the hole's scores of every gain tried, gain 0 (the base) first
    outputs: list[dict[float, Image.Image]]  # per photo, its output at each gain

    def recommended(self) -> float:
        """The best mean hole PSNR among the gains never below the base on any photo (0 if none)."""
        safe = [g for g, s in self.by_gain.items() if never_below(s, self.by_gain[0.0])]
        return max(safe, key=lambda g: float(np.mean(self.by_gain[g]["psnr"])))

    def summary(self) -> dict:
        """The calibration as a checkpoint or ``eval`` records it (rounded; keys are gains as str)."""
        return {
            str(g): {
                "psnr": round(float(np.mean(s["psnr"])), 3),
                "ssim": round(float(np.mean(s["ssim"])), 4),
                "psnr_per_image": [round(p, 3) for p in s["psnr"]],
                "never_below_baseline": never_below(s, self.by_gain[0.0]),
            }
            for g, s in self.by_gain.items()
        }


def calibrate(
    inpainter: Inpainter, photos: list[tuple[Image.Image, np.ndarray]], gains: tuple[float, ...], keep: int = 0
) -> Calibration:
    """Score every gain of ``gains`` (and 0, the base, and the inpainter's own) on ``photos`` (RGB image, its hole), the
    inpainter's fill computed once per photo; the outputs of the first ``keep`` photos are kept."""
    grid = tuple(sorted({0.0, *gains, inpainter.gain}))  # the inpainter's own gain is scored too
    cal = Calibration({g: new_scores() for g in grid}, [])
    for i, (im, hole) in enumerate(photos):
        parts = inpainter.inpaint_parts(im, hole, with_model=True)
        outs = {g: compose(parts, g) for g in grid}
        for g in grid:
            hole_scores(cal.by_gain[g], outs[g], im, hole)
        if i < keep:
            cal.outputs.append(outs)
    return cal
