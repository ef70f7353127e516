"""Pretrained diffusers x4 super-resolution pipelines in the same job: a diffusers pipeline folder
of class ``LDMSuperResolutionPipeline`` (latent diffusion: VQModel + UNet2DModel + scheduler) or
``StableDiffusionUpscalePipeline`` (AutoencoderKL + UNet2DConditionModel + CLIP text encoder + two
schedulers; run with the empty prompt, or ``--prompt``). The folder's checks and its one load per
actor (safetensors only, no code from the folder, a private view of exactly the files loaded)
are :mod:`pipeline_folders`'.

Both pipelines are x4, so the task is ``upscale4``. The low-resolution input is reflect-padded to
a multiple of the pipeline's size unit (32 for LDM, whose own preprocessing would otherwise resize
it) and the output cropped back to exactly 4x the input. Large images run tile by tile with
blended overlaps (:mod:`tiling`; tiles of ``--tile / 4`` input pixels), so memory is bounded by
``--tile``; images of one size go through the pipeline in one batched call. ``--steps`` is the
number of inference steps and ``--seed`` seeds the sampler noise (each pipeline call starts from
a generator seeded with it, so a tile's noise does not continue across tiles).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.io import checkpoint, storage
from pipeline.io.imaging import PixelsT, like, rgb_levels
from pipeline.models.tiling import pad_reflect, tiled_apply
from pipeline.restoration.pipeline_folders import LDM_SR, load
from pipeline.restoration.restorer import RestoreSettings, indices_by_size

SCALE = 4
LDM_MULTIPLE = 32  # LDMSuperResolutionPipeline resizes a PIL input to a multiple of 32


class PipelineRestorer:
    """Upscales images x4 with a diffusers pipeline; the same interface as :class:`Restorer`."""

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
        self.pipe, self.class_name = load(url, task, storage_options, device)
        self.task, self.scale, self.opts, self.gain, self.prompt = "upscale4", SCALE, opts, 1.0, prompt
        self.device = self.pipe.device
        vae = self.pipe.vqvae if self.class_name == LDM_SR else self.pipe.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if factor != SCALE:
            raise checkpoint.CheckpointError(
                f"{storage.redact(url)}: its autoencoder decodes at x{factor}, not x{SCALE}"
            )
        # the size unit of the input: LDM's own preprocessing rounds to 32; the SD UNet halves it per level
        self.multiple = (
            LDM_MULTIPLE
            if self.class_name == LDM_SR
            else max(8, 2 ** (len(self.pipe.unet.config.block_out_channels) - 1))
        )

    @torch.no_grad()
    def _call(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline call: (B, 3, h, w) in [0, 1], h and w multiples of ``self.multiple`` ->
        (B, 3, 4h, 4w) in [0, 1]."""
        generator = torch.Generator("cpu").manual_seed(self.opts.seed)
        common = {"num_inference_steps": self.opts.steps, "generator": generator, "output_type": "pt"}
        if self.class_name == LDM_SR:  # takes a tensor in [-1, 1] as it is
            out = self.pipe(image=x * 2 - 1, **common).images
        else:  # takes a tensor in [0, 1]; the empty prompt needs no classifier-free guidance (both halves agree)
            out = self.pipe(
                prompt=[self.prompt] * x.shape[0],
                image=x,
                guidance_scale=9.0 if self.prompt else 1.0,
                **common,
            ).images
        return out.float().clamp(0, 1)

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1]: padded, tile by tile, cropped back."""
        h, w = x.shape[-2:]
        padded = pad_reflect(x.to(self.device), self.multiple)
        tile = max(self.multiple, (self.opts.tile // SCALE) // self.multiple * self.multiple)
        overlap = max(0, min(self.opts.overlap // SCALE, tile // 2 - 1))
        y = tiled_apply(self._call, padded, tile, overlap, factor=SCALE, batch=max(1, 8 // x.shape[0]))
        return y[:, :, : h * SCALE, : w * SCALE]

    @torch.no_grad()
    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        """Upscale several images, those of one size in one batch."""
        out: list[PixelsT | None] = [None] * len(images)
        for idx in indices_by_size(images):
            # exactly the pipelines' own conversion of a PIL image: uint8 / 255 in float32
            x = torch.from_numpy(np.stack([rgb_levels(images[i]).transpose(2, 0, 1) for i in idx]) / 255.0)
            y = self._run(x).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = like(images[i], y[j].transpose(1, 2, 0) * 255)
        return out  # type: ignore[return-value]

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        return self.restore_many([im])[0]
