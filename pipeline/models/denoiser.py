"""The denoiser network: a small U-Net over latents, with a registry of sizes.

``Denoiser(x_t, t, cond=None, y=None) -> velocity``: ``x_t`` latents (B, C, h, w), ``t`` in [0, 1],
``cond`` optional extra channels concatenated to the input (restoration tasks: the latent of the
degraded view), ``y`` optional class ids, where a negative id (or ``y=None``) means
the *null* class used for classifier-free guidance. The network knows nothing of noise schedules or samplers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ConfigError


@dataclass
class DenoiserConfig:
    latent_channels: int = 4
    cond_channels: int = 0  # extra input channels concatenated (restoration views)
    num_classes: int = 0  # 0: unconditional
    widths: tuple[int, ...] = (64, 128)
    blocks_per_level: int = 2
    attention: bool = False  # self-attention at the lowest resolution
    groups: int = 16

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if any(w % self.groups for w in self.widths):
            raise ConfigError(f"denoiser widths {self.widths} must be multiples of groups={self.groups}")


SIZES: dict[str, dict] = {
    "tiny": {"widths": (32, 64), "blocks_per_level": 1, "attention": False, "groups": 8},
    "small": {"widths": (64, 128), "blocks_per_level": 2, "attention": True, "groups": 16},
    "base": {"widths": (128, 256, 384), "blocks_per_level": 2, "attention": True, "groups": 32},
    "large": {"widths": (192, 384, 768), "blocks_per_level": 3, "attention": True, "groups": 32},
}


def config_for(size: str, **kw) -> DenoiserConfig:
    if size not in SIZES:
        raise ConfigError(f"unknown denoiser size {size!r}; choose from {sorted(SIZES)}")
    return DenoiserConfig(**{**SIZES[size], **kw})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_init(layer: nn.Conv2d | nn.Linear) -> None:
    """Zero a layer's weights and bias: a residual branch then starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Block(nn.Module):
    """Residual block with scale/shift conditioning on the time (and class) embedding."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        zero_init(self.conv2)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    def __init__(self, ch: int, groups: int, heads: int = 4):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(groups, ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class Denoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        w, g = cfg.widths, cfg.groups
        emb = 4 * w[0]
        self.time_mlp = nn.Sequential(nn.Linear(w[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.latent_channels + cfg.cond_channels, w[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, cin = [w[0]], w[0]
        for i, cout in enumerate(w):
            for _ in range(cfg.blocks_per_level):
                self.down.append(Block(cin, cout, emb, g))
                cin = cout
                skips.append(cin)
            if i < len(w) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
        self.mid1 = Block(cin, cin, emb, g)
        self.mid_attn = Attention(cin, g) if cfg.attention else nn.Identity()
        self.mid2 = Block(cin, cin, emb, g)
        self.up = nn.ModuleList()
        for i, cout in enumerate(reversed(w)):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(Block(cin + skips.pop(), cout, emb, g))
                cin = cout
            if i < len(w) - 1:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)
        zero_init(self.conv_out)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.cfg.cond_channels:
            if cond is None:
                raise ValueError("this denoiser needs conditioning channels")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.widths[0]).to(x.dtype))
        if self.class_emb is not None:
            null = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device, dtype=torch.long)
            y = null if y is None else torch.where(y < 0, null, y.long())  # y < 0: dropped label
            emb = emb + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def to_dict(cfg: DenoiserConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["widths"] = list(cfg.widths)
    return d
