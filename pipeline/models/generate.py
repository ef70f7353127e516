"""Drawing images from a diffusion model: noise -> sampler -> decoder, and a grid of them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError
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
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``n`` images (B, 3, H, W) in [-1, 1] from noise."""
    if model.denoiser.cfg.cond_channels:
        raise ConfigError("this checkpoint is a restoration model: use `latent-pipeline restore`")
    dev = next(model.denoiser.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((n, *model.latent_shape), generator=gen).to(dev)
    y = None
    if model.denoiser.cfg.num_classes and classes:
        y = torch.tensor([classes[i % len(classes)] for i in range(n)], device=dev)
    fn = flow.guided(model.denoiser, cfg_scale, y=y)
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
