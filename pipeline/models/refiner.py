"""The pixel refiner: a small residual CNN that predicts what the classical base is missing.

A restoration task's fidelity mode wants the posterior mean E[x | input]. The latent model can
only express detail at its autoencoder's resolution (f = 8: one latent per 8x8 pixels), and a
small autoencoder reconstructs photos worse than the back-projection base, so the latent route
adds nothing measurable to the base. This network predicts the mean residual ``x - base``
directly in pixel space:

    out = base + gain * P(refiner(base))

where ``base`` is :func:`degrade.classical_base` of the input and ``P`` the projection that
keeps an upscale consistent with its input (:func:`restorer.project_upscale`).

For ``inpaint`` the refiner also sees the hole: its input is the base (the biharmonic fill,
:func:`degrade.inpaint_base`) and the hole as a fourth channel (+1 in the hole, -1 outside), and
its residual is used in the hole only. ``RefinerConfig.in_channels`` records the input channels
(3, or 4 with the hole), so refiners saved before it existed load as 3-channel ones.

Architecture: optional pixel-unshuffle (space to depth, lossless) so the convolutions run at a
fraction of the resolution, ``depth`` 3x3 convolutions with ReLU, pixel-shuffle back. The last
layer starts at zero, so an untrained refiner returns the base exactly. The network predicts the
residual times :data:`OUTPUT_SCALE` (what made it learn, see docs/ARCHITECTURE.md); ``forward``
divides it back out, so callers see the residual in image units ([-1, 1] images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import checkpoint, storage
from pipeline.models import degrade

OUTPUT_SCALE = 10.0  # the network's output is the residual times this (an MSE on it learns; see module doc)


def input_channels(task: str) -> int:
    """The refiner's input channels for ``task``: the base, and for inpaint the hole too."""
    return 4 if task == degrade.INPAINT else 3


def with_hole(base: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """An inpainting refiner's input: the base (N, 3, H, W) in [-1, 1] and the hole (N, 1, H, W),
    1 = fill, as a fourth channel of +1 in the hole and -1 outside."""
    return torch.cat([base, hole * 2 - 1], 1)


@dataclass(frozen=True)
class RefinerConfig:
    task: str
    channels: int = 64
    depth: int = 7
    unshuffle: int = 2  # pixel-unshuffle factor before the convolutions (1: full resolution)
    in_channels: int = 3  # the base's 3, plus the hole for inpaint (input_channels)

    def __post_init__(self) -> None:
        degrade.check_task(self.task, allow_inpaint=True)
        if not 8 <= self.channels <= 1024 or not 2 <= self.depth <= 64 or self.unshuffle not in (1, 2, 4):
            raise ValueError("refiner: channels in 8..1024, depth in 2..64, unshuffle 1, 2 or 4")
        if self.in_channels != input_channels(self.task):
            raise ValueError(f"refiner: a {self.task} refiner takes {input_channels(self.task)} input channels")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "refiner", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinerConfig:
        d = dict(d)
        if d.pop("arch", None) != "refiner":
            raise ValueError("not a refiner architecture")
        return cls(**d)


class Refiner(nn.Module):
    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        self.cfg = cfg
        u2 = 3 * cfg.unshuffle**2
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels * cfg.unshuffle**2, cfg.channels, 3, padding=1)]
        for _ in range(cfg.depth - 2):
            layers += [nn.ReLU(inplace=True), nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1)]
        last = nn.Conv2d(cfg.channels, u2, 3, padding=1)
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, nn.ReLU(inplace=True), last)

    def input(self, base: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` takes: the base, with the hole (:func:`with_hole`) for inpaint."""
        return with_hole(base, hole) if self.cfg.in_channels == 4 else base

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        """The predicted residual ``x - base`` (N, 3, H, W) for images ``base`` (N, 3, H, W) in
        [-1, 1]; an inpainting refiner takes :meth:`input`, the base with the hole (N, 4, H, W)."""
        u = self.cfg.unshuffle
        h, w = base.shape[-2:]
        x = F.pad(base, (0, (-w) % u, 0, (-h) % u), mode="replicate") if (h % u or w % u) else base
        if u > 1:
            x = F.pixel_unshuffle(x, u)
        # channels-last memory: faster CPU convolutions than NCHW (docs/benchmarks.md); results
        # differ only by float rounding
        y = self.net(x.contiguous(memory_format=torch.channels_last))
        if u > 1:
            y = F.pixel_shuffle(y, u)
        return y[..., :h, :w] / OUTPUT_SCALE


def load(url: str, storage_options: dict | None = None, task: str = "") -> Refiner:
    """The EMA weights of the refiner checkpoint at ``url`` (a ``train-refiner`` output or a task
    checkpoint's ``refiner/``); CheckpointError for anything else, or one of another task."""
    where = storage.redact(url)
    local, info = checkpoint.load(url, "refiner", storage_options)
    try:
        cfg = RefinerConfig.from_dict(info.model)
    except (TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{where}: invalid refiner architecture ({exc})") from None
    if task and cfg.task != task:
        raise checkpoint.CheckpointError(f"{where}: the refiner was trained for task {cfg.task!r}, not {task!r}")
    net = Refiner(cfg)
    checkpoint.load_weights(net, local, "ema")
    return net.eval()
