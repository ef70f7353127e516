"""The U-Net denoiser over latents: residual blocks conditioned on time (+ class, + pooled text)
by scale/shift, optional self-attention in the middle, and cross-attention to text tokens.

``UNet(x, t, cond=None, y=None, text=None, text_mask=None, pooled=None) -> velocity``, the
interface every denoiser of the registry (:mod:`pipeline.models.denoiser`) has; the network
knows nothing of noise schedules or samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.models.layers import (
    CrossAttention,
    PooledEmbedding,
    TextContext,
    class_embedding,
    concat_cond,
    timestep_embedding,
    zero_init,
)


@dataclass
class UNetConfig:
    latent_channels: int = 4
    cond_channels: int = 0  # extra input channels concatenated (restoration views)
    num_classes: int = 0  # 0: unconditional
    widths: tuple[int, ...] = (64, 128)
    blocks_per_level: int = 2
    attention: bool = False  # self-attention at the lowest resolution
    groups: int = 16
    text_dim: int = 0  # width of the text tokens; 0: not text-conditioned
    pooled_dim: int = 0  # width of the pooled text embedding; 0: unused
    heads: int = 4  # attention heads (self- and cross-attention)
    text_levels: int = 1  # cross-attention after every block of this many lowest levels (and the middle)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if any(w % self.groups for w in self.widths):
            raise ConfigError(f"denoiser widths {self.widths} must be multiples of groups={self.groups}")
        if self.text_dim < 0 or self.pooled_dim < 0:
            raise ConfigError("denoiser text_dim and pooled_dim must be >= 0")
        if not 0 <= self.text_levels <= len(self.widths):
            raise ConfigError(f"denoiser text_levels={self.text_levels} must be in 0..{len(self.widths)}")
        attended = {self.widths[-1]} if self.attention or self.text_dim else set()
        if self.text_dim:
            attended |= set(self.widths[len(self.widths) - self.text_levels :])
        if self.heads < 1 or any(w % self.heads for w in attended):
            raise ConfigError(f"attended denoiser widths {sorted(attended)} must be multiples of heads={self.heads}")


# named sizes: "tiny" for tests and CPU, up to "large" for GPU clusters
SIZES: dict[str, dict] = {
    "tiny": {"widths": (32, 64), "blocks_per_level": 1, "attention": False, "groups": 8},
    "small": {"widths": (64, 128), "blocks_per_level": 2, "attention": True, "groups": 16},
    "base": {"widths": (128, 256, 384), "blocks_per_level": 2, "attention": True, "groups": 32},
    "large": {"widths": (192, 384, 768), "blocks_per_level": 3, "attention": True, "groups": 32},
}


def grid_multiple(cfg: UNetConfig) -> int:
    """The multiple the latent height and width must be: the U-Net's total downsampling."""
    return 2 ** (len(cfg.widths) - 1)


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
    """Self-attention over the positions of a feature map."""

    def __init__(self, ch: int, groups: int, heads: int = 4):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(groups, ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class SpatialCrossAttention(nn.Module):
    """Cross-attention from a feature map (queries) to the text context (keys/values) with the
    padding mask; the output projection is zero-initialised, so it starts as the identity."""

    def __init__(self, ch: int, ctx_dim: int, groups: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = CrossAttention(ch, ctx_dim, heads)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        o = self.attn(self.norm(x).flatten(2).transpose(1, 2), ctx, mask)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """The U-Net: residual blocks conditioned on time (+ class, + pooled text) by scale/shift,
    optional self-attention in the middle, and, when ``text_dim`` > 0, cross-attention to the
    text tokens in the middle and after every block of the ``text_levels`` lowest levels."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.downsample_multiple = grid_multiple(cfg)  # latent h and w must be multiples of this
        w, g = cfg.widths, cfg.groups
        emb = 4 * w[0]
        ctx_dim = w[-1]
        text_from = len(w) - cfg.text_levels if cfg.text_dim else len(w)  # levels >= this cross-attend

        def cross(ch: int) -> SpatialCrossAttention:
            return SpatialCrossAttention(ch, ctx_dim, g, cfg.heads)

        self.time_mlp = nn.Sequential(nn.Linear(w[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes else None
        self.pooled_emb = PooledEmbedding(cfg.pooled_dim, emb) if cfg.pooled_dim else None
        self.text_ctx = TextContext(cfg.text_dim, ctx_dim) if cfg.text_dim else None
        self.conv_in = nn.Conv2d(cfg.latent_channels + cfg.cond_channels, w[0], 3, padding=1)
        # cross-attention layers sit in their own dicts, keyed by the index of the block they follow,
        # so the keys of a text-free U-Net's state dict are those of older checkpoints
        self.down, down_cross = nn.ModuleList(), dict[str, nn.Module]()
        skips, cin = [w[0]], w[0]
        for i, cout in enumerate(w):
            for _ in range(cfg.blocks_per_level):
                self.down.append(Block(cin, cout, emb, g))
                cin = cout
                skips.append(cin)
                if i >= text_from:
                    down_cross[str(len(self.down) - 1)] = cross(cin)
            if i < len(w) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
        self.mid1 = Block(cin, cin, emb, g)
        self.mid_attn = Attention(cin, g, cfg.heads) if cfg.attention else nn.Identity()
        self.mid_cross = cross(cin) if cfg.text_dim else None
        self.mid2 = Block(cin, cin, emb, g)
        self.up, up_cross = nn.ModuleList(), dict[str, nn.Module]()
        for i, cout in enumerate(reversed(w)):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(Block(cin + skips.pop(), cout, emb, g))
                cin = cout
                if len(w) - 1 - i >= text_from:
                    up_cross[str(len(self.up) - 1)] = cross(cin)
            if i < len(w) - 1:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.down_cross, self.up_cross = nn.ModuleDict(down_cross), nn.ModuleDict(up_cross)  # empty: no keys
        self.norm_out = nn.GroupNorm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)
        zero_init(self.conv_out)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        m = self.downsample_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"latent height and width {tuple(x.shape[-2:])} must be multiples of {m} for this U-Net")
        x = concat_cond(x, cond, self.cfg.cond_channels)
        b = x.shape[0]
        emb = self.time_mlp(timestep_embedding(t, self.cfg.widths[0]).to(x.dtype))
        if self.class_emb is not None:
            emb = emb + class_embedding(self.class_emb, y, self.cfg.num_classes, b)
        if self.pooled_emb is not None:
            emb = emb + self.pooled_emb(pooled, b, emb)
        ctx, mask = self.text_ctx(b, text, text_mask, x.dtype) if self.text_ctx is not None else (None, None)

        h = self.conv_in(x)
        hs = [h]
        for i, layer in enumerate(self.down):
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            if str(i) in self.down_cross:
                h = self.down_cross[str(i)](h, ctx, mask)
            hs.append(h)
        h = self.mid_attn(self.mid1(h, emb))
        if self.mid_cross is not None:
            h = self.mid_cross(h, ctx, mask)
        h = self.mid2(h, emb)
        for i, layer in enumerate(self.up):
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
            if str(i) in self.up_cross:
                h = self.up_cross[str(i)](h, ctx, mask)
        return self.conv_out(F.silu(self.norm_out(h)))
