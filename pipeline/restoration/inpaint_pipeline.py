"""Inpainting with a pretrained diffusers ``StableDiffusionInpaintPipeline`` folder:
``restore --task inpaint --checkpoint FOLDER`` (the folder's checks and its one load per actor:
:mod:`pipeline_folders`).

The folder's UNet must be an inpainting one: 9 input channels (4 latent + 1 mask + 4 latent of
the masked image), as SD's inpainting checkpoints; a text-to-image UNet (4 channels, which
diffusers would run by blending latents) is refused on the driver, naming it.

The fill (:meth:`PipelineInpainter.fill`) is the pipeline's own call, with ``strength=1.0``
(the hole starts from pure noise), ``--steps`` inference steps, a generator seeded with
``--seed`` at every call, ``output_type`` as tensors, and the prompt: the empty prompt by default,
run with ``guidance_scale=1`` (with the empty prompt both halves of classifier-free guidance see
the same embedding, so guidance changes nothing and would only double the work), or ``--prompt
TEXT`` with the pipeline's default guidance scale :data:`PROMPT_GUIDANCE` (7.5). The mask goes in
as 0/1 (white = repaint; the pipeline binarises it at 0.5), and the image with the classical
base (:func:`degrade.inpaint_base`) in the hole, so nothing of the damaged pixels reaches the
pipeline (it zeroes the hole of the masked image anyway).

Which pixels the pipeline sees: a window around the hole, as diffusers' ``padding_mask_crop``
and IOPaint's crop strategy do, but bounded by ``--tile``:

* an image whose sides are both at most ``--tile`` goes in whole (the call is then exactly the
  library's own call on the image);
* otherwise, when the hole's bounding box (all its parts) with :data:`CONTEXT` pixels around
  it fits in ``--tile``, the window is ``--tile`` pixels a side centred on the box (clamped to
  the image): the most context that fits, at the image's own resolution;
* else (a hole too large for one tile) the window is the box with a margin of half its longer
  side (:data:`CONTEXT` at least), clamped to the image, resized down (antialiased bicubic) so
  its longer side is ``--tile``, the mask with it (a pixel touching the hole is hole), and the
  fill resized back up (bicubic): the fill of a large hole is softer, but the memory stays
  bounded by ``--tile``;
* the window is reflect-padded (image and mask) to a multiple of the VAE's factor (8 for SD),
  which the pipeline needs, and the fill cropped back and pasted into the hole.

The output is the shared composition (:func:`inpainter.compose`): ``base + gain * feather *
(fill - base)`` in the hole, the input's own bytes outside it. The default gain is 1: the
pretrained pipeline's own fill (feathered into the biharmonic base over the hole's first
pixels); ``--gain 0`` is exactly the biharmonic base. ``eval --task inpaint --checkpoint
FOLDER`` scores the hole against the base at every gain and says which gain is never below it.

A safety checker in the folder, if it has one, runs as diffusers runs it (a fill it flags comes
back black).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io import checkpoint, storage
from pipeline.models.tiling import pad_reflect
from pipeline.restoration import pipeline_folders
from pipeline.restoration.inpainter import Inpainter
from pipeline.restoration.restorer import RestoreSettings

UNET_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent
PROMPT_GUIDANCE = 7.5  # the pipeline's default guidance scale, used with --prompt
CONTEXT = 16  # pixels of context around the hole's box, at least, in a window cropped at the tile's size


def _check_unet(config: dict, where: str) -> None:
    channels = config.get("in_channels")
    if channels != UNET_CHANNELS:
        raise checkpoint.CheckpointError(
            f"{where}: unet/ takes {channels} input channels, not an inpainting UNet's {UNET_CHANNELS} "
            f"(4 latent + 1 mask + 4 masked-image latent); a {pipeline_folders.SD_INPAINT} runs here only with one"
        )


def describe(url: str, task: str, storage_options: dict | None = None, prompt: str = "") -> str:
    """``inpaint``, after the checks of every pipeline folder and of the UNet's input channels,
    on the driver, in one line."""
    own = pipeline_folders.describe(url, task, storage_options, prompt)
    try:
        unet = storage.read_json(storage.join(url, "unet", "config.json"), storage_options)
    except (OSError, ValueError, UnicodeDecodeError):
        raise checkpoint.CheckpointError(f"{storage.redact(url)}: unet/config.json is missing or not JSON") from None
    _check_unet(unet if isinstance(unet, dict) else {}, storage.redact(url))
    return own


def window(hole: np.ndarray, tile: int) -> tuple[int, int, int, int]:
    """The window (top, left, bottom, right) of the image the pipeline sees for ``hole``: the
    whole image if it fits ``tile``; else ``tile`` pixels a side around the hole's box if the box
    and :data:`CONTEXT` pixels around it fit; else the box with its margin (resized down to
    ``tile`` by :meth:`PipelineInpainter.fill`). Clamped to the image; see the module's doc."""
    h, w = hole.shape
    if max(h, w) <= tile:
        return 0, 0, h, w
    ys, xs = np.nonzero(hole)
    box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    longer = max(box[2] - box[0], box[3] - box[1])
    fits = longer + 2 * CONTEXT <= tile
    out = []
    for lo, hi, size in ((box[0], box[2], h), (box[1], box[3], w)):
        side = min(size, tile if fits else hi - lo + 2 * max(CONTEXT, longer // 2))
        start = min(max(0, (lo + hi - side) // 2), size - side)
        out.append((start, start + side))
    return out[0][0], out[1][0], out[0][1], out[1][1]


class PipelineInpainter(Inpainter):
    """Fills holes with a ``StableDiffusionInpaintPipeline``; loaded once per actor."""

    def __init__(
        self,
        url: str,
        task: str,
        opts: RestoreSettings,
        storage_options: dict | None = None,
        device: str | None = None,
        *,
        prompt: str = "",
    ):
        self.pipe: Any
        self.pipe, _ = pipeline_folders.load(url, task, storage_options, device)
        _check_unet(dict(self.pipe.unet.config), storage.redact(url))
        self.opts, self.prompt = opts, prompt
        self.gain = 1.0 if opts.gain is None else opts.gain
        self.multiple = max(8, int(self.pipe.vae_scale_factor))

    @torch.no_grad()
    def _call(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pipeline's fill of (1, 3, h, w) in [0, 1] with the (1, 1, h, w) 0/1 ``mask``
        (h and w multiples of ``self.multiple``), (1, 3, h, w) in [0, 1]."""
        out = self.pipe(
            prompt=self.prompt,
            image=x,
            mask_image=mask,
            height=x.shape[-2],
            width=x.shape[-1],
            strength=1.0,
            num_inference_steps=self.opts.steps,
            guidance_scale=PROMPT_GUIDANCE if self.prompt else 1.0,
            generator=torch.Generator("cpu").manual_seed(self.opts.seed),
            output_type="pt",
        ).images
        return out.float().clamp(0, 1)

    def fill(self, image: np.ndarray, base: np.ndarray, hole: np.ndarray) -> np.ndarray:
        top, left, bottom, right = window(hole, self.opts.tile)
        h, w = bottom - top, right - left
        known = np.where(hole[..., None], base, image)[top:bottom, left:right]  # the base in the hole
        x = torch.from_numpy((known.transpose(2, 0, 1) / 255.0).astype(np.float32))[None]
        m = torch.from_numpy(hole[top:bottom, left:right].astype(np.float32))[None, None]
        if max(h, w) > self.opts.tile:  # a hole too large for one tile: the window at the tile's size
            size = (max(1, round(h * self.opts.tile / max(h, w))), max(1, round(w * self.opts.tile / max(h, w))))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            m = (F.adaptive_avg_pool2d(m, size) > 0).float()  # a pixel touching the hole is hole
        sh, sw = x.shape[-2:]
        padded = pad_reflect(torch.cat([x, m], 1), self.multiple).to(self.pipe.device)
        y = self._call(padded[:, :3], padded[:, 3:])[:, :, :sh, :sw].cpu()
        if (sh, sw) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        out = base.copy()
        out[top:bottom, left:right] = y[0].numpy().transpose(1, 2, 0) * 255.0
        return out
