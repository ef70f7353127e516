"""Tiled processing with overlapping windows blended by smooth weights (no visible seams).

* :func:`tiled_model_fn` wraps a velocity function so that every sampler step evaluates the
  denoiser on overlapping latent windows (batched together) and blends their predictions, so
  tiles agree at every step, not only at the end (MultiDiffusion-style).
* :func:`tiled_apply` runs any spatial map (VAE encode, VAE decode, a pretrained network) over
  overlapping tiles and blends the outputs, with the output scaled by ``factor`` (encode: 1/f,
  decode: f). A tile's pixels next to an edge it shares with another tile are not used (they
  saw the tile's zero padding, not the image): the neighbours cross-fade over the middle half
  of the overlap (:func:`_ramp`, as chaiNNer's half-sine blend), so a map that reaches no
  further than a quarter of the overlap gives its untiled result, up to float rounding.

* :func:`pad_reflect` pads an image up to a model's size unit (the pipelines' VAE or UNet
  multiple) by reflection, so the padding continues the image.

Peak activation memory is set by the tile size, not the image size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pad_reflect(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of (B, C, h, w) up to a multiple (repeatedly for tiny sides,
    replicating a side of one pixel)."""
    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    while ph or pw:
        dh, dw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
        if not dh and not dw:
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, dw, 0, dh), mode="reflect")
        ph, pw = ph - dh, pw - dw
    return x


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = [*list(range(0, size - tile, stride)), size - tile]
    return sorted(set(starts))


# the least weight of a pixel: a pixel every tile left out (tile edges rounded at a scaled
# output) is still covered, and what the floor lets in is far below a level of an 8-bit image
FLOOR = 1e-6


def _ramp(n: int, overlap: int, lead: bool, trail: bool, device) -> torch.Tensor:
    """1D weights of a tile of ``n`` pixels whose leading / trailing side meets another tile.

    On such a side the tile's outer quarter of the overlap gets weight 0 (those pixels saw the
    tile's edge: zero padding, not the image), the middle half a raised-cosine cross-fade, and
    the rest 1; a side at the image border keeps weight 1. Two neighbours' cross-fades sum to 1,
    so a map whose reach is at most a quarter of the overlap gives exactly its untiled result.
    """
    w = torch.ones(n, device=device)
    k = min(overlap, n)
    if k > 0:
        u = ((torch.arange(k, device=device) + 0.5) / overlap * 2 - 0.5).clamp(0, 1)
        fade = (1 - torch.cos(torch.pi * u)) / 2  # 0 .. 1 over the middle half of the overlap
        if lead:
            w[:k] = fade
        if trail:
            w[n - k :] = torch.minimum(w[n - k :], fade.flip(0))
    return w.clamp_min(FLOOR)


def windows(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    return [(y, x) for y in _starts(h, tile, overlap) for x in _starts(w, tile, overlap)]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    factor: float = 1.0,
    batch: int = 8,
) -> torch.Tensor:
    """Apply ``fn`` (B,C,h,w)->(B,C',h*factor,w*factor) tile by tile and blend the results."""
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    wins = windows(h, w, tile, overlap)
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    th, tw = min(tile, h), min(tile, w)
    for i in range(0, len(wins), batch):
        group = wins[i : i + batch]
        crops = torch.cat([x[:, :, y : y + th, xx : xx + tw] for y, xx in group])
        res = fn(crops).chunk(len(group))
        for (y, xx), r in zip(group, res):
            oh, ow = r.shape[-2:]
            if out is None:
                out = torch.zeros(
                    (x.shape[0], r.shape[1], round(h * factor), round(w * factor)), device=r.device, dtype=torch.float32
                )
                weight = torch.zeros((1, 1, out.shape[2], out.shape[3]), device=r.device)
            ov = round(overlap * factor)
            oy, ox = round(y * factor), round(xx * factor)
            wy = _ramp(oh, ov, y > 0, y + th < h, r.device)
            wx = _ramp(ow, ov, xx > 0, xx + tw < w, r.device)
            wgt = (wy[:, None] * wx[None, :])[None, None]
            assert out is not None and weight is not None
            out[:, :, oy : oy + oh, ox : ox + ow] += r.float() * wgt
            weight[:, :, oy : oy + oh, ox : ox + ow] += wgt
    assert out is not None and weight is not None  # at least one window
    return (out / weight).to(x.dtype)


def tiled_model_fn(
    model_fn: Callable[..., torch.Tensor], tile: int, overlap: int, cond: torch.Tensor | None = None, batch: int = 8
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A velocity function ``(x, t) -> v`` evaluated on blended latent windows."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cond is None:
            return tiled_apply(lambda xs: model_fn(xs, t[:1].expand(xs.shape[0])), x, tile, overlap, batch=batch)
        stacked = torch.cat([x, cond], dim=1)
        c = x.shape[1]
        return tiled_apply(
            lambda xs: model_fn(xs[:, :c], t[:1].expand(xs.shape[0]), xs[:, c:]), stacked, tile, overlap, batch=batch
        )

    return fn
