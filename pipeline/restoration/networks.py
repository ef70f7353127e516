"""Pretrained networks in the same job: any single-image network that `spandrel` recognises from
its weights (ESRGAN / Real-ESRGAN, Compact, SwinIR, HAT, DAT, SPAN, DRUNet, NAFNet, ...), and its
inpainting networks (LaMa; MAT from ``spandrel_extra_arches``, whose architectures are added to
spandrel's registry once, before the first load), which :mod:`inpaint_networks` runs.

Weights are read from ``.safetensors`` files only, with safetensors, and handed to spandrel as a
state dict, so nothing is ever unpickled (``.pth`` / ``.ckpt`` / ``.pt`` are refused: they are
pickles); a local file must be the file itself, not a link to one outside its folder
(:mod:`pipeline.io.folders`). The network runs tile by tile with blended overlaps
(:mod:`tiling`), so memory is bounded by ``--tile`` whatever the image size; images of one size
are batched into one call. An image within one tile gets exactly the network's own call
(``descriptor(uint8 / 255)`` in float32, rounded to 8 bits); a tiled one agrees with it where the
network's reach is within a quarter of the overlap (:func:`tiling.tiled_apply` leaves each tile's
edge pixels out). The task follows the network's scale: x2 -> ``upscale2``, x4 ->
``upscale4``, x1 -> ``restore``; an inpainting network's task is ``inpaint``. A network asked for
another task than its own is a one-line ConfigError on the driver (:func:`describe`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError
from pipeline.io import checkpoint, folders, storage
from pipeline.io.imaging import PixelsT, like, rgb_levels
from pipeline.models.degrade import INPAINT
from pipeline.models.tiling import tiled_apply
from pipeline.restoration.inpaint_networks import NetworkInpainter
from pipeline.restoration.restorer import RestoreSettings, indices_by_size

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin", ".pkl")
TASK_BY_SCALE = {1: "restore", 2: "upscale2", 4: "upscale4"}


def is_network_file(url: str) -> bool:
    """Whether ``--checkpoint`` names a single network file rather than a checkpoint folder."""
    return url.lower().endswith((SUFFIX, *PICKLE_SUFFIXES))


@dataclass
class NetworkInfo:
    architecture: str
    scale: int
    task: str


def install_extra_arches() -> None:
    """Add ``spandrel_extra_arches``' architectures (MAT, ...) to spandrel's registry; idempotent."""
    with warnings.catch_warnings():  # its import uses torch.jit.script, deprecated in torch 2.9
        warnings.simplefilter("ignore", FutureWarning)
        import spandrel_extra_arches

    spandrel_extra_arches.install(ignore_duplicates=True)


def _load(url: str, storage_options: dict | None = None):
    """(spandrel descriptor, its info); CheckpointError / ConfigError for anything unusable."""
    import spandrel
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    where = storage.redact(url)
    if url.lower().endswith(PICKLE_SUFFIXES):
        raise ConfigError(
            f"{where}: only {SUFFIX} network files are loaded ({os.path.splitext(url)[1]} files are "
            "pickles, which can run code); convert it to safetensors first"
        )
    if not storage.exists(url, storage_options):
        raise checkpoint.CheckpointError(f"{where}: no such network file")
    if not storage.is_remote(url):  # the file itself, not a link to a file outside its folder
        path = storage.filesystem(url)[1]
        path = folders.file(os.path.dirname(path) or ".", os.path.basename(path), where)
    try:  # a remote file is read into memory (only this file, not its folder)
        state = load(storage.read_bytes(url, storage_options)) if storage.is_remote(url) else load_file(path)
    except (SafetensorError, OSError) as exc:
        raise checkpoint.CheckpointError(f"{where} is not a readable safetensors file ({str(exc)[:120]})") from None
    install_extra_arches()
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise checkpoint.CheckpointError(f"{where}: spandrel recognises no network architecture in it") from None
    rgb = descriptor.input_channels == 3 and descriptor.output_channels == 3
    if isinstance(descriptor, spandrel.MaskedImageModelDescriptor) and rgb:
        return descriptor, NetworkInfo(descriptor.architecture.name, 1, INPAINT)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or not rgb:
        raise ConfigError(
            f"{where}: {descriptor.architecture.name} is neither a single-image RGB network nor an RGB "
            "inpainting network (face or greyscale networks are not supported)"
        )
    if descriptor.scale not in TASK_BY_SCALE:
        raise ConfigError(f"{where}: a x{descriptor.scale} network; supported scales: {sorted(TASK_BY_SCALE)}")
    return descriptor, NetworkInfo(descriptor.architecture.name, descriptor.scale, TASK_BY_SCALE[descriptor.scale])


def describe(url: str, task: str, storage_options: dict | None = None) -> str:
    """The task the network at ``url`` runs, checked against ``--task`` on the driver (one line)."""
    return _checked(_load(url, storage_options)[1], task)


def _checked(info: NetworkInfo, task: str) -> str:
    if task and task != info.task:
        kind = "an inpainting network" if info.task == INPAINT else f"x{info.scale}"
        raise ConfigError(
            f"option 'task': the network is {kind} ({info.architecture}), so its task is {info.task!r}, not {task!r}"
        )
    return info.task


def load(
    url: str, task: str, opts: RestoreSettings, storage_options: dict | None = None, device: str | None = None
) -> NetworkRestorer | NetworkInpainter:
    """The restorer of the network file at ``url`` (loaded once): a :class:`NetworkRestorer`, or
    for an inpainting network a :class:`inpaint_networks.NetworkInpainter`."""
    descriptor, info = _load(url, storage_options)
    _checked(info, task)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if info.task == INPAINT:
        return NetworkInpainter(descriptor, opts, dev)
    return NetworkRestorer(descriptor, info, opts, dev)


class NetworkRestorer:
    """Restores images with a spandrel network; the same interface as :class:`Restorer`."""

    def __init__(self, descriptor, info: NetworkInfo, opts: RestoreSettings, device: torch.device):
        self.task, self.scale, self.opts, self.gain = info.task, info.scale, opts, 1.0
        self.device = device
        self.net = descriptor.to(self.device).eval()

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, h*s, w*s) in [0, 1]: the descriptor's own call (its
        padding, its clamp), tile by tile (input-size tiles) where the image exceeds one tile."""
        tile = max(16, self.opts.tile // self.scale)
        overlap = min(self.opts.overlap // self.scale, tile // 2 - 1)
        return tiled_apply(self.net, x.to(self.device), tile, max(0, overlap), factor=self.scale)

    @torch.no_grad()
    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        """Restore several images, those of one size in one batch: each exactly as the network's
        own call on ``uint8 / 255`` in float32, rounded to 8 bits (16-bit levels: not rounded)."""
        out: list[PixelsT | None] = [None] * len(images)
        for idx in indices_by_size(images):
            x = np.stack([rgb_levels(images[i]).transpose(2, 0, 1) for i in idx]) / 255.0
            y = self._run(torch.from_numpy(x)).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = like(images[i], y[j].transpose(1, 2, 0) * 255)
        return out  # type: ignore[return-value]

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        return self.restore_many([im])[0]
