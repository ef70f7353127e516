"""Pretrained inpainting networks in the same job: spandrel's LaMa and MAT (from
``spandrel_extra_arches``), read from ``.safetensors`` files by :mod:`networks` (its safety rules:
no pickle, a local file inside its folder), filling holes as an :class:`inpainter.Inpainter`.

What the network sees: the input, in [0, 1] float32, with the hole's own pixels replaced by the
biharmonic base (they never reach the network), and the mask (1 = hole): the call
``descriptor(image, mask)`` as chaiNNer and IOPaint make it. Both architectures blank the hole
themselves as in their training (LaMa multiplies the image by ``1 - mask``, MAT by its inverted
mask), so on the same pixels this is exactly the user's own call. The descriptor pads the input
to the architecture's size requirements (LaMa: a multiple of 8; MAT: 512x512, square). The
network's output in the hole is the fill, composed as for every inpainter
(:func:`inpainter.compose`): ``base + gain * feather * (fill - base)`` in the hole, the input's
own bytes outside. The default gain is 1, the network's own fill (``--gain 0`` is exactly the
biharmonic base); ``eval --task inpaint --checkpoint NET.safetensors`` scores the network's fill
against the base on held-out photos and recommends a calibrated gain.

Where it runs, and memory: neither architecture tiles (LaMa's Fourier convolutions see the whole
input; MAT works at 512x512), so, as IOPaint's crop strategy, the network runs on at most a
working size: ``--tile`` for LaMa (an architecture of free size), 512 for MAT (one of fixed size):

* an image within the working size in both dimensions runs whole, one call: on such an image
  the fill is exactly the network's own call, up to rounding;
* otherwise each hole (a connected region) runs on a crop around it: its bounding box grown by
  a context margin of half its longer side (:data:`CONTEXT_MIN` pixels at least), then up to
  the architecture's minimum size (MAT: 512 x 512) where the image allows, all within the
  image; crops that meet are merged into one. A crop larger than the working size is brought
  down to fit it (the pixels bicubic with antialiasing, the hole by area: a pixel that touches
  the hole is hole), run, and its output brought back up (bicubic) for the hole's pixels. Each
  crop writes only its own holes.

Memory is bounded by the working size whatever the image size. Images are inpainted one by one
(each has its own mask; :meth:`Inpainter.restore_many` refuses), the network loaded once per
actor. MAT is stochastic (a latent drawn when it is built, a dropout at every call): its latent
is drawn from ``--seed`` and every call is seeded with it, so the pixels are reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.restoration.inpainter import Inpainter
from pipeline.restoration.restorer import RestoreSettings

CONTEXT_MIN = 32  # the least context margin, in pixels, around a hole's bounding box
Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def working_size(descriptor, tile: int) -> int:
    """The largest side the network runs on: its fixed size (a square, a multiple of its minimum:
    MAT's 512), else ``--tile`` (at least the architecture's minimum)."""
    req = descriptor.size_requirements
    return req.minimum if req.square and req.multiple_of == req.minimum else max(tile, req.minimum)


def _span(a: int, b: int, least: int, n: int) -> tuple[int, int]:
    """[a, b) within [0, n), grown about its centre to ``least`` (at most ``n``) pixels."""
    a, b = max(0, a), min(n, b)
    length = max(b - a, min(least, n))
    start = min(max(0, (a + b - length) // 2), n - length)
    return start, start + length


def _meet(p: Box, q: Box) -> bool:
    return p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]


def crops(hole: np.ndarray, size: int, least: int) -> list[Box]:
    """The boxes the network runs on (see the module doc): the whole image when it is within
    ``size`` in both dimensions, else one box per hole region with its context, grown to
    ``least`` pixels a side where the image allows, boxes that meet merged."""
    from scipy import ndimage

    h, w = hole.shape
    if h <= size and w <= size:
        return [(0, h, 0, w)]
    merged: list[Box] = []
    for ys, xs in ndimage.find_objects(ndimage.label(hole)[0]):
        margin = max(CONTEXT_MIN, max(ys.stop - ys.start, xs.stop - xs.start) // 2)
        box = (
            *_span(ys.start - margin, ys.stop + margin, least, h),
            *_span(xs.start - margin, xs.stop + margin, least, w),
        )
        while (hit := next((m for m in merged if _meet(m, box)), None)) is not None:
            merged.remove(hit)
            box = (min(box[0], hit[0]), max(box[1], hit[1]), min(box[2], hit[2]), max(box[3], hit[3]))
        merged.append(box)
    return merged


class NetworkInpainter(Inpainter):
    """Fills holes with a spandrel inpainting network (a ``MaskedImageModelDescriptor``)."""

    def __init__(self, descriptor, opts: RestoreSettings, device: torch.device):
        self.opts, self.device = opts, device
        self.gain = 1.0 if opts.gain is None else opts.gain  # the network's own fill
        self.architecture = descriptor.architecture.name
        self.size = working_size(descriptor, opts.tile)
        self.least = descriptor.size_requirements.minimum
        self.net = descriptor.to(device).eval()
        model = descriptor.model
        if descriptor.architecture.id == "MAT":  # its latent, else drawn from numpy's global state
            z = np.random.default_rng(opts.seed).standard_normal(tuple(model.z.shape))
            model.z, model.label = torch.from_numpy(z).to(device, model.z.dtype), model.label.to(device)

    def fill(self, image: np.ndarray, base: np.ndarray, hole: np.ndarray) -> np.ndarray:
        known = np.where(hole[..., None], base, image.astype(np.float32)) / np.float32(255)
        out = base.copy()
        for y0, y1, x0, x1 in crops(hole, self.size, self.least):
            region = hole[y0:y1, x0:x1]
            out[y0:y1, x0:x1][region] = self.call(known[y0:y1, x0:x1], region)[region] * 255
        return out

    @torch.no_grad()
    def call(self, pixels: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The network on ``pixels`` (float32 (h, w, 3) in [0, 1]) with the ``hole`` (bool (h, w)),
        brought down to the working size first when larger (and its output back up), seeded."""
        h, w = hole.shape
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(self.device)
        m = torch.from_numpy(hole.astype(np.float32))[None, None].to(self.device)
        scale = self.size / max(h, w)
        if scale < 1:
            small = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=small, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            m = (F.interpolate(m, size=small, mode="area") > 0).float()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.opts.seed)
            y = self.net(x, m)
        if scale < 1:
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        return y[0].float().cpu().numpy().transpose(1, 2, 0)
