"""Loading a diffusion checkpoint and drawing samples: ``latent-pipeline sample``.

A diffusion checkpoint directory holds ``ema.safetensors`` / ``model.safetensors``, the
autoencoder it was trained with under ``vae/``, and ``config.json`` (denoiser architecture,
latent scale/shift, task, step), so sampling and restoration need only its URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import autoencoder, checkpoint, diffusion, storage
from .config import ConfigError, option
from .denoiser import Denoiser, DenoiserConfig
from .imaging import from_tensor_array


@dataclass
class DiffusionModel:
    denoiser: Denoiser
    vae: autoencoder.Autoencoder
    config: dict

    @property
    def latent_shape(self) -> list[int]:
        return self.config["latent_shape"]

    @property
    def scale(self) -> float:
        return float(self.config["scale"])

    @property
    def shift(self) -> float:
        return float(self.config["shift"])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(autoencoder.unscale_latents(z, self.scale, self.shift))


def load(url: str, storage_options: dict | None = None, use_ema: bool = True,
         device: str | None = None) -> DiffusionModel:
    """Load the denoiser (EMA weights by default) and its autoencoder from a checkpoint URL."""
    local = checkpoint.local_copy(url, storage_options)
    cfg = checkpoint.read_config(local)
    if cfg.get("kind") != "diffusion":
        raise ConfigError(f"{storage.redact(url)} is not a diffusion checkpoint (kind={cfg.get('kind')!r})")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = Denoiser(DenoiserConfig(**cfg["model"]))
    net.load_state_dict(checkpoint.load_tensors(local, "ema" if use_ema else "model"))
    vae = autoencoder.load(os.path.join(local, "vae")).to(dev)
    if vae.weights_sha256 != cfg["vae"]["identity"]["weights_sha256"]:
        raise ConfigError(f"{storage.redact(url)}: embedded autoencoder does not match the recorded identity")
    return DiffusionModel(net.eval().to(dev), vae, cfg)


@torch.no_grad()
def generate(model: DiffusionModel, n: int, *, steps: int = 30, sampler: str = "euler", cfg_scale: float = 1.0,
             classes: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` images (B, 3, H, W) in [-1, 1] from noise."""
    if model.denoiser.cfg.cond_channels:
        raise ConfigError("this checkpoint is a restoration model: use `latent-pipeline restore`")
    dev = next(model.denoiser.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((n, *model.latent_shape), generator=gen).to(dev)
    y = None
    if model.denoiser.cfg.num_classes and classes:
        y = torch.tensor([classes[i % len(classes)] for i in range(n)], device=dev)
    fn = diffusion.guided(model.denoiser, cfg_scale, y=y)
    z = diffusion.SAMPLERS[sampler](fn, x, steps)
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


@dataclass
class SampleConfig:
    checkpoint: str = option("", "diffusion checkpoint directory, or a training output (latest checkpoint)")
    out: str = option("samples.png", "output PNG (a grid of the samples)")
    n: int = option(16, "number of samples")
    steps: int = option(30, "sampler steps")
    sampler: str = option("euler", "euler or heun")
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1: off)")
    class_: list[int] = option([], "class ids to condition on (cycled over the samples)")
    seed: int = option(0, "random seed")
    storage_options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("option 'checkpoint' is required")
        if self.sampler not in diffusion.SAMPLERS:
            raise ConfigError(f"option 'sampler' must be one of {sorted(diffusion.SAMPLERS)}")
        if self.n < 1 or self.steps < 1:
            raise ConfigError("options 'n' and 'steps' must be >= 1")


def run_sample(cfg: SampleConfig, log=print) -> Image.Image:
    import io

    model = load(cfg.checkpoint, cfg.storage_options)
    images = generate(model, cfg.n, steps=cfg.steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale,
                      classes=cfg.class_ or None, seed=cfg.seed)
    img = grid(images)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(cfg.out, buf.getvalue(), cfg.storage_options)
    log(f"[sample] {cfg.n} samples ({img.width}x{img.height} grid, step {model.config['step']}) -> "
        f"{storage.redact(cfg.out)}")
    return img
