"""The autoencoder interface and its two kinds.

``Autoencoder.encode(images) -> Posterior`` and ``Autoencoder.decode(latents) -> images`` with
images as float tensors (B, 3, H, W) in [-1, 1]. Latents are *raw* (unscaled); the scale/shift
that make them unit-variance for diffusion live in the manifest and checkpoint, and are
applied only by :func:`scale_latents` / :func:`unscale_latents`.

Kinds:

* ``kl``: the built-in KL autoencoder (:class:`KLAutoencoder`), presets in :data:`PRESETS`,
  saved as a checkpoint directory (``config.json`` + ``model.safetensors``);
* ``diffusers``: any diffusers ``AutoencoderKL`` directory in ``save_pretrained`` layout
  (safetensors weights only, one file or sharded), with its ``scaling_factor`` / ``shift_factor``.

Either way only files inside the folder are read, and the identity's ``weights_sha256`` covers
exactly the weights loaded (:mod:`pipeline.io.folders`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.io import checkpoint, folders, storage

# --------------------------------------------------------------------------- latent scale


def scale_latents(z, scale: float, shift: float):
    """Raw posterior latents -> the normalised latents diffusion works on. The one place.

    Works on torch tensors and numpy arrays alike.
    """
    return (z - shift) * scale


def unscale_latents(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Inverse of :func:`scale_latents`."""
    return z / scale + shift


@dataclass
class Posterior:
    mean: torch.Tensor
    std: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.std is None:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps


# --------------------------------------------------------------------------- built-in KL model


@dataclass
class KLConfig:
    widths: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    blocks_per_level: int = 1
    groups: int = 8

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or any(w % self.groups for w in self.widths):
            raise ConfigError(f"autoencoder widths {self.widths} must be multiples of groups={self.groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.widths) - 1)


PRESETS: dict[str, KLConfig] = {
    "tiny": KLConfig(widths=(16, 32, 64), latent_channels=4, blocks_per_level=1, groups=8),
    "small": KLConfig(widths=(32, 64, 128), latent_channels=4, blocks_per_level=2, groups=16),
    "base": KLConfig(widths=(128, 256, 512, 512), latent_channels=4, blocks_per_level=2, groups=32),
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class KLAutoencoder(nn.Module):
    """A small convolutional KL autoencoder (SD-VAE shaped, without attention)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        w, g = cfg.widths, cfg.groups
        enc: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1)]
        cin = w[0]
        for i, cout in enumerate(w):
            for _ in range(cfg.blocks_per_level):
                enc.append(ResBlock(cin, cout, g))
                cin = cout
            if i < len(w) - 1:
                enc.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        enc += [
            ResBlock(cin, cin, g),
            nn.GroupNorm(g, cin),
            nn.SiLU(),
            nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1), ResBlock(w[-1], w[-1], g)]
        cin = w[-1]
        for i, cout in enumerate(reversed(w)):
            for _ in range(cfg.blocks_per_level):
                dec.append(ResBlock(cin, cout, g))
                cin = cout
            if i < len(w) - 1:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        dec += [nn.GroupNorm(g, cin), nn.SiLU(), nn.Conv2d(cin, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    # Convolutions run on channels-last memory (NHWC), faster on CPU (docs/benchmarks.md); results
    # are returned in the usual contiguous layout. train-vae keeps the parameters channels-last too.
    def encode(self, x: torch.Tensor) -> Posterior:
        mean, logvar = self.encoder(x.contiguous(memory_format=torch.channels_last)).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return Posterior(mean.contiguous(), torch.exp(0.5 * logvar).contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Posterior]:
        """Training pass: reconstruction from a posterior sample, and the posterior."""
        post = self.encode(x)
        return self.decode(post.sample()), post


# --------------------------------------------------------------------------- the interface


class Autoencoder:
    """One interface over both kinds; ``module`` is the underlying ``nn.Module``."""

    def __init__(
        self,
        module: nn.Module,
        kind: str,
        config: dict[str, Any],
        *,
        latent_channels: int,
        downsample: int,
        scale: float,
        shift: float,
        weights_sha256: str,
        source: str = "",
    ):
        self.module: Any = module.eval()  # KLAutoencoder or diffusers AutoencoderKL
        self.kind, self.config = kind, config
        self.latent_channels, self.downsample = latent_channels, downsample
        self.scale, self.shift = float(scale), float(shift)
        self.weights_sha256 = weights_sha256
        self.source = source

    @property
    def identity(self) -> dict[str, Any]:
        """What produced a latent: kind, architecture config and weights hash."""
        return {
            "kind": self.kind,
            "config": self.config,
            "weights_sha256": self.weights_sha256,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> Autoencoder:
        self.module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Posterior:
        x = images.to(self.device, self.dtype)
        if self.kind == "diffusers":
            dist = self.module.encode(x).latent_dist
            return Posterior(dist.mean, dist.std)
        return self.module.encode(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.dtype)
        if self.kind == "diffusers":
            return self.module.decode(z).sample
        return self.module.decode(z)


def new_kl(preset: str | KLConfig = "tiny", seed: int = 0) -> tuple[KLAutoencoder, KLConfig]:
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if isinstance(preset, str) and preset not in PRESETS:
        raise ConfigError(f"unknown autoencoder preset {preset!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)
    return KLAutoencoder(cfg), cfg


def save_kl(
    model: KLAutoencoder, url: str, *, scale: float = 1.0, shift: float = 0.0, storage_options: dict | None = None
) -> None:
    """Save a built-in autoencoder (as its EMA weights) as a checkpoint usable as ``encode --vae``."""
    import tempfile

    info = checkpoint.CheckpointInfo(kind="autoencoder", model=kl_config_dict(model.cfg), scale=scale, shift=shift)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, info, {"ema": model.state_dict()})
        storage.upload_dir(d, url, storage_options)


def kl_config_dict(cfg: KLConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(cfg), "widths": list(cfg.widths)}


def load(url: str, storage_options: dict | None = None) -> Autoencoder:
    """Load an autoencoder of either kind from a directory URL (local or object storage).

    ``url`` may also be a ``train-vae`` output folder: its newest checkpoint is used. The
    built-in kind loads its EMA weights. Anything else is refused with a CheckpointError.
    """
    local = checkpoint.local_copy(url, storage_options)
    where = storage.redact(url)
    raw = checkpoint.read_raw_config(local, where)
    if raw.get("_class_name") == "AutoencoderKL":
        return _load_diffusers(local, raw, url)
    info = checkpoint.read_info(local, where)
    if info.kind == "diffusion":
        raise checkpoint.CheckpointError(
            f"{where} is a diffusion checkpoint, not an autoencoder (its "
            f"autoencoder is in {checkpoint.VAE_DIR}/ inside it)"
        )
    try:
        kl_cfg = KLConfig(**info.model)
    except (TypeError, ConfigError) as exc:
        raise checkpoint.CheckpointError(f"{where}: invalid autoencoder architecture ({exc})") from None
    model = KLAutoencoder(kl_cfg)
    checkpoint.load_weights(model, local, "ema")
    return Autoencoder(
        model,
        "kl",
        kl_config_dict(kl_cfg),
        latent_channels=kl_cfg.latent_channels,
        downsample=kl_cfg.downsample,
        scale=info.scale,
        shift=info.shift,
        weights_sha256=checkpoint.sha256(local, "ema"),
        source=storage.public_url(url),
    )


def _load_diffusers(local: str, cfg: dict[str, Any], url: str) -> Autoencoder:
    """A diffusers AutoencoderKL folder: exactly its ``config.json`` and safetensors weights (one
    file, or an index and the shards it names, all inside the folder) are loaded and hashed."""
    from diffusers import AutoencoderKL
    from safetensors import SafetensorError

    where = storage.redact(url)
    folders.refuse_remote_code(local, ["config.json"], where)
    weights = folders.weights(local, "diffusion_pytorch_model", where)
    if not weights:
        raise checkpoint.CheckpointError(
            f"{where}: only safetensors weights are loaded "
            "(diffusion_pytorch_model.safetensors is missing; .bin files are pickles)"
        )
    for name in weights:
        if name.endswith(folders.SAFETENSORS):
            folders.check_safetensors(local, name, where)
    try:
        with folders.view(local, ["config.json", *weights], where) as seen:
            model = AutoencoderKL.from_pretrained(seen, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as exc:
        raise checkpoint.CheckpointError(
            f"{where}: cannot load the diffusers autoencoder ({str(exc).splitlines()[0][:160]})"
        ) from None
    arch = {k: v for k, v in cfg.items() if not k.startswith("_")}
    down = 2 ** (len(cfg.get("block_out_channels", [0])) - 1)
    # one weights file: its sha256 (as recorded before shards were supported); shards: the index and all of them
    sha = (
        storage.sha256_file(folders.file(local, weights[0], where))
        if len(weights) == 1
        else folders.digest(local, weights, where)
    )
    return Autoencoder(
        model,
        "diffusers",
        json.loads(json.dumps(arch)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        downsample=down,
        scale=cfg.get("scaling_factor") or 1.0,
        shift=cfg.get("shift_factor") or 0.0,
        weights_sha256=sha,
        source=storage.public_url(url),
    )
