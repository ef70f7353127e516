"""Layers shared by the denoiser families (U-Net in ``denoiser.py``, DiT in ``dit.py``).

This module imports neither family, so both can import it without a cycle.

Text conditioning, the same in both families: :class:`TextContext` projects the text tokens
(``text`` (B, L, text_dim), cached hidden states of a text encoder) to the model's width and
prepends one learned *null* token that every query can always attend to. :class:`CrossAttention`
attends from image features to that context with the padding mask (True = real token), so

* padding tokens get exactly zero attention weight (and are zeroed before the projection, so
  even non-finite padding values cannot leak in): appending padding changes nothing;
* a row whose mask is all False (an empty caption) attends to the null token alone: no NaN from
  a softmax over nothing, and it gives the same output as ``text=None``, the unconditional path
  of classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of times ``t`` (B,) in [0, 1] (scaled to [0, 1000])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_init(layer: nn.Conv2d | nn.Linear) -> None:
    """Zero a layer's weights and bias: a residual branch then starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class TextContext(nn.Module):
    """Text tokens (B, L, text_dim) -> keys/values context (B, 1 + L, dim) with a learned null token
    first, and the matching key mask (B, 1, 1, 1 + L) for ``scaled_dot_product_attention``."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        # caption projection as in PixArt-α: Linear, GELU(tanh), Linear
        self.proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        for layer in self.proj:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(
        self, batch: int, text: torch.Tensor | None, text_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        null = self.null.to(dtype).expand(batch, 1, -1)
        if text is None:
            return null, None  # the null token alone: nothing to mask
        if text.dim() != 3 or text.shape[0] != batch:
            raise ValueError(f"text must be (batch={batch}, tokens, text_dim), got {tuple(text.shape)}")
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        elif text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask {tuple(text_mask.shape)} must match the text tokens {tuple(text.shape[:2])}")
        text_mask = text_mask.to(torch.bool)
        text = torch.where(text_mask[..., None], text.to(dtype), torch.zeros((), dtype=dtype, device=text.device))
        ctx = torch.cat([null, self.proj(text)], dim=1)
        mask = torch.cat([text_mask.new_ones(batch, 1), text_mask], dim=1)
        return ctx, mask[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention from tokens (B, N, dim) to a context (B, M, ctx_dim) with a key mask.

    The output projection is zero-initialised: a residual cross-attention starts as the identity.
    """

    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(ctx_dim, 2 * dim), nn.Linear(dim, dim)
        zero_init(self.out)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class PooledEmbedding(nn.Module):
    """A pooled text embedding (B, pooled_dim) -> (B, dim), added to the time conditioning.

    ``pooled=None`` (no caption, the unconditional call) is the zero vector."""

    def __init__(self, pooled_dim: int, dim: int):
        super().__init__()
        self.pooled_dim = pooled_dim
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, pooled: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if pooled is None:
            pooled = torch.zeros(batch, self.pooled_dim, device=like.device, dtype=like.dtype)
        elif pooled.shape != (batch, self.pooled_dim):
            raise ValueError(f"pooled must be (batch={batch}, pooled_dim={self.pooled_dim}), got {tuple(pooled.shape)}")
        return self.mlp(pooled.to(like.dtype))


def concat_cond(x: torch.Tensor, cond: torch.Tensor | None, cond_channels: int) -> torch.Tensor:
    """``x`` with a denoiser's conditioning channels (restoration views) concatenated, when it
    has any (then ``cond`` is required)."""
    if not cond_channels:
        return x
    if cond is None:
        raise ValueError("this denoiser needs conditioning channels")
    return torch.cat([x, cond.to(x.dtype)], dim=1)


def class_embedding(table: nn.Embedding, y: torch.Tensor | None, num_classes: int, batch: int) -> torch.Tensor:
    """The class embedding of ids ``y``; a negative id (a dropped label) or ``y=None`` is the
    null class ``num_classes`` that classifier-free guidance trains."""
    null = torch.full((batch,), num_classes, device=table.weight.device, dtype=torch.long)
    ids = null if y is None else torch.where(y < 0, null, y.long())
    return table(ids)
