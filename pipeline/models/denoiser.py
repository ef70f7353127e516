"""The denoiser registry: every architecture the project trains, one entry each.

Every denoiser is called ``net(x_t, t, cond=None, y=None, text=None, text_mask=None, pooled=None)
-> velocity``: ``x_t`` latents (B, C, h, w) with h and w multiples of :func:`grid_multiple`,
``t`` in [0, 1], ``cond`` optional extra channels concatenated to the input (restoration tasks:
the latent of the degraded view), ``y`` optional class ids, where a negative id (or ``y=None``)
means the *null* class used for classifier-free guidance, ``text`` (B, L, text_dim) text token
embeddings with ``text_mask`` (B, L) (True = real token; padding never changes the output, and an
all-False row or ``text=None`` is the unconditional path: only a learned null token is attended),
``pooled`` (B, pooled_dim) a pooled text embedding added to the time conditioning (None = zero).
A config with ``text_dim=0`` / ``pooled_dim=0`` ignores ``text`` / ``pooled``.
The networks know nothing of noise schedules or samplers.

:data:`ARCHITECTURES` is the one table: per family its config type, how to build the network,
the multiple the latent grid must be, and its named sizes. :func:`config_for` makes a config
from a size name, :func:`build` the network, :func:`to_dict` / :func:`config_from_dict` store and
rebuild it (a dict without ``"arch"``, from an older checkpoint, is a U-Net). Adding a family is
one module (its config dataclass and ``nn.Module``) and one :class:`Architecture` line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from pipeline.config import ConfigError
from pipeline.models import dit, unet

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "build",
    "config_for",
    "config_from_dict",
    "from_dict",
    "grid_multiple",
    "names",
    "to_dict",
]


@dataclass(frozen=True)
class Architecture:
    """One denoiser family: ``config`` is its config dataclass, ``build`` makes the network of a
    config, ``grid_multiple`` the multiple a latent's height and width must be, ``sizes`` the
    named configs (``config_for(name)``)."""

    name: str  # stored in checkpoints as the config's "arch"
    config: type
    build: Callable[[Any], nn.Module]
    grid_multiple: Callable[[Any], int]
    sizes: dict[str, dict]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("unet", unet.UNetConfig, unet.UNet, unet.grid_multiple, unet.SIZES),
        Architecture("dit", dit.DiTConfig, dit.DiT, lambda cfg: cfg.patch, dit.SIZES),
    )
}


def names() -> list[str]:
    """Every size name, family by family (the U-Nets' then the transformers')."""
    return [size for arch in ARCHITECTURES.values() for size in arch.sizes]


def architecture_of(cfg: Any) -> Architecture:
    """The family of a config object."""
    for arch in ARCHITECTURES.values():
        if isinstance(cfg, arch.config):
            return arch
    raise TypeError(f"not a denoiser config: {type(cfg).__name__}")


def config_for(size: str, **kw) -> Any:
    """The config of a named size, with fields overridden by ``kw`` (e.g. ``latent_channels``,
    ``cond_channels``, ``num_classes``, ``text_dim``, ``pooled_dim``)."""
    for arch in ARCHITECTURES.values():
        if size in arch.sizes:
            return arch.config(**{**arch.sizes[size], **kw})
    raise ConfigError(f"unknown denoiser size {size!r}; choose from {names()}")


def grid_multiple(cfg: Any) -> int:
    """The multiple the latent height and width must be: the U-Net's total downsampling, the
    DiT's patch size (also each network's ``downsample_multiple`` attribute)."""
    return architecture_of(cfg).grid_multiple(cfg)


def build(cfg: Any) -> nn.Module:
    """The network of a config, freshly initialised."""
    return architecture_of(cfg).build(cfg)


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of the config with its family under ``"arch"``."""
    d: dict[str, Any] = {"arch": architecture_of(cfg).name, **dataclasses.asdict(cfg)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(d: dict) -> Any:
    """The config stored by :func:`to_dict`; a dict without ``"arch"`` (older checkpoints) is a
    U-Net, and fields it lacks take their defaults. Unknown fields raise TypeError."""
    d = dict(d)
    name = d.pop("arch", "unet")
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown denoiser architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name].config(**d)


def from_dict(d: dict) -> nn.Module:
    """The network (freshly initialised) described by a :func:`to_dict` dict."""
    return build(config_from_dict(d))
