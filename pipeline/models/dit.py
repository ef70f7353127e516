"""A text-conditioned diffusion transformer (DiT, Peebles & Xie 2023) over latents.

``DiT(x, t, cond=None, y=None, text=None, text_mask=None, pooled=None) -> velocity``, the same
interface as the U-Net in :mod:`pipeline.models.denoiser`: ``x`` latents (B, C, h, w) with h and
w multiples of ``patch``, ``t`` (B,) in [0, 1], ``cond`` extra channels concatenated before the
patch embedding (restoration tasks), ``y`` class ids (negative or None: the null class),
``text`` (B, L, text_dim) token embeddings with ``text_mask`` (B, L) True for real tokens,
``pooled`` (B, pooled_dim) a pooled text embedding added to the time conditioning.

The latent is cut into ``patch`` x ``patch`` patches (a conv of kernel = stride = patch), given a
fixed 2-D sin-cos position embedding computed for the actual grid (h/patch, w/patch), so one
network serves every aspect-ratio bucket, and run through ``depth`` blocks:

    x += gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))     # adaLN-Zero
    x += CrossAttn(LN(x), text context, padding mask)                   # text, PixArt-α style
    x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))          # GELU(tanh)

then a final adaLN layer and a linear map back to patch*patch*C values per token. The shifts,
scales and gates are regressed from the conditioning vector c = time + class + pooled text
embedding by a per-block linear that starts at zero, as does the final layer (adaLN-Zero): every
block starts as the identity and the untrained network predicts zero.

Why cross-attention to the text rather than SD3-style joint attention (MM-DiT, where text and
image tokens are concatenated and attend to each other in every block):

* the text tokens are cached hidden states of fixed (frozen) encoders: they do not need to be
  updated by the image stream, which is what a joint text stream with its own weights buys;
* the cost is linear in the text length (N image queries x L text keys) instead of quadratic in
  N + L, and the image self-attention stays over image tokens only;
* padding is one boolean key mask on the cross-attention (plus the always-present null token,
  so an empty caption cannot produce a softmax over nothing); a joint sequence would have to
  mask padding both as queries and keys, and the padded tokens would still be processed;
* PixArt-α showed that self-attention followed by cross-attention to T5 tokens trains a
  competitive text-to-image DiT at this scale (0.6B) for a fraction of the cost.
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

FREQ_DIM = 256  # width of the sinusoidal time embedding fed to the time MLP (as in DiT)


@dataclass
class DiTConfig:
    latent_channels: int = 4
    cond_channels: int = 0  # extra input channels concatenated before the patch embedding
    num_classes: int = 0  # 0: no class conditioning
    patch: int = 2
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 0  # width of the text tokens; 0: not text-conditioned
    pooled_dim: int = 0  # width of the pooled text embedding; 0: unused

    def __post_init__(self) -> None:
        if self.patch < 1 or self.hidden < 1 or self.depth < 1 or self.heads < 1:
            raise ConfigError(f"DiT patch, hidden, depth and heads must be positive, got {self}")
        if self.hidden % self.heads:
            raise ConfigError(f"DiT hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.hidden % 4:
            raise ConfigError(f"DiT hidden={self.hidden} must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.text_dim < 0 or self.pooled_dim < 0:
            raise ConfigError("DiT text_dim and pooled_dim must be >= 0")


# DiT's published table (Peebles & Xie 2023, table 1), all with patch 2; "dit-tiny" for tests and the demo
SIZES: dict[str, dict] = {
    "dit-tiny": {"hidden": 64, "depth": 2, "heads": 2, "patch": 2},
    "dit-s": {"hidden": 384, "depth": 12, "heads": 6, "patch": 2},
    "dit-b": {"hidden": 768, "depth": 12, "heads": 12, "patch": 2},
    "dit-l": {"hidden": 1024, "depth": 24, "heads": 16, "patch": 2},
    "dit-xl": {"hidden": 1152, "depth": 28, "heads": 16, "patch": 2},
}


def sincos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (gh * gw, dim), row-major: half the channels encode
    the row, half the column (as DiT / MAE)."""

    def one_d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([one_d(rows.reshape(-1), dim // 2), one_d(cols.reshape(-1), dim // 2)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text (when ``text_dim`` > 0), MLP; adaLN-Zero."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, text: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm_x = nn.LayerNorm(dim, eps=1e-6) if text else None
        self.cross = CrossAttention(dim, dim, heads) if text else None  # output projection zero-initialised
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        inner = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, dim))
        self.ada = nn.Linear(dim, 6 * dim)  # applied to silu(c)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross is not None and self.norm_x is not None and ctx is not None:
            x = x + self.cross(self.norm_x(x), ctx, mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.ada = nn.Linear(dim, 2 * dim)  # applied to silu(c)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.downsample_multiple = cfg.patch  # latent h and w must be multiples of this
        d, p = cfg.hidden, cfg.patch
        self.patch_embed = nn.Conv2d(cfg.latent_channels + cfg.cond_channels, d, kernel_size=p, stride=p)
        self.time_mlp = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None  # + the null class
        self.pooled_emb = PooledEmbedding(cfg.pooled_dim, d) if cfg.pooled_dim else None
        self.text_ctx = TextContext(cfg.text_dim, d) if cfg.text_dim else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, bool(cfg.text_dim)) for _ in range(cfg.depth))
        self.final = FinalLayer(d, p * p * cfg.latent_channels)
        self._pos: dict[tuple, torch.Tensor] = {}  # (gh, gw, device, dtype) -> (1, gh * gw, hidden); not state
        self._init_weights()

    def _init_weights(self) -> None:
        """As the DiT reference: xavier-uniform linears, zero adaLN modulation and final layer."""
        text_proj = set(self.text_ctx.modules()) if self.text_ctx is not None else set()
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in text_proj:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)  # type: ignore[arg-type]  # has a bias
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for layer in self.time_mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, DiTBlock | FinalLayer):
                zero_init(m.ada)  # adaLN-Zero
            if isinstance(m, DiTBlock) and m.cross is not None:
                zero_init(m.cross.out)
        zero_init(self.final.linear)

    def pos_embed(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        key = (gh, gw, like.device, like.dtype)
        pos = self._pos.get(key)
        if pos is None:
            if len(self._pos) > 64:  # many distinct grids: do not grow without bound
                self._pos.clear()
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later when training
                pos = self._pos[key] = sincos_2d(gh, gw, self.cfg.hidden).to(like.device, like.dtype)[None]
        return pos

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
        cfg, p = self.cfg, self.cfg.patch
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent height and width ({h}, {w}) must be multiples of the DiT patch size {p}")
        x = concat_cond(x, cond, cfg.cond_channels)
        gh, gw = h // p, w // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, gh * gw, hidden)
        tokens = tokens + self.pos_embed(gh, gw, tokens)

        c = self.time_mlp(timestep_embedding(t, FREQ_DIM).to(tokens.dtype))
        if self.class_emb is not None:
            c = c + class_embedding(self.class_emb, y, cfg.num_classes, b)
        if self.pooled_emb is not None:
            c = c + self.pooled_emb(pooled, b, c)
        ctx, mask = self.text_ctx(b, text, text_mask, tokens.dtype) if self.text_ctx is not None else (None, None)

        for block in self.blocks:
            tokens = block(tokens, c, ctx, mask)
        out = self.final(tokens, c)  # (B, gh * gw, p * p * C)
        out = out.view(b, gh, gw, p, p, cfg.latent_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.latent_channels, h, w)


def param_count(cfg: DiTConfig) -> int:
    """Parameters of a DiT with this config, counted without allocating it (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())
