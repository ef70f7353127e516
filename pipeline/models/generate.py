"""Drawing images from a diffusion model: noise -> sampler -> decoder, and a grid of them."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError
from pipeline.io import storage
from pipeline.io.imaging import from_tensor_array
from pipeline.models import flow
from pipeline.models.loading import DiffusionModel


@torch.no_grad()
def generate(
    model: DiffusionModel,
    n: int,
    *,
    steps: int = 30,
    sampler: str = "euler",
    cfg_scale: float = 1.0,
    classes: list[int] | None = None,
    text: dict[str, Any] | None = None,
    null_text: dict[str, Any] | None = None,
    latent_shape: list[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``n`` images (B, 3, H, W) in [-1, 1] from noise.

    ``text`` / ``null_text``: the denoiser's text inputs for the prompts and for the empty
    caption (batch ``n`` each, see :func:`pipeline.models.text.condition`); guidance runs when
    both are given and ``cfg_scale`` != 1. ``latent_shape`` overrides the checkpoint's default
    (another aspect-ratio bucket).
    """
    net: Any = model.denoiser
    if net.cfg.cond_channels:
        raise ConfigError("this checkpoint is a restoration model: use `latent-pipeline restore`")
    dev = next(model.denoiser.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((n, *(latent_shape or model.latent_shape)), generator=gen).to(dev)
    cond: dict[str, Any] = {}
    uncond: dict[str, Any] = {}
    if net.cfg.num_classes and classes:
        y = torch.tensor([classes[i % len(classes)] for i in range(n)], device=dev)
        cond["y"], uncond["y"] = y, torch.full_like(y, -1)
    if text is not None:
        cond.update({k: v.to(dev) if v is not None else None for k, v in text.items()})
        if null_text is not None:
            uncond.update({k: v.to(dev) if v is not None else None for k, v in null_text.items()})
        elif uncond:
            raise ConfigError("guidance on classes and text needs the empty-caption embedding")
    fn = flow.guided(model.denoiser, cfg_scale, cond, uncond)
    z = flow.SAMPLERS[sampler](fn, x, steps)
    return model.decode(z).float().clamp(-1, 1).cpu()


def grid(images: torch.Tensor, cols: int | None = None) -> Image.Image:
    n = images.shape[0]
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    _, _, h, w = images.shape
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i in range(n):
        out.paste(from_tensor_array(images[i].numpy()), ((i % cols) * w, (i // cols) * h))
    return out


def save_grid(images: torch.Tensor, url: str, storage_options: dict | None = None) -> Image.Image:
    """Write the :func:`grid` of ``images`` (B, 3, H, W) in [-1, 1] to ``url`` as a PNG; returns it."""
    img = grid(images)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue(), storage_options)
    return img
