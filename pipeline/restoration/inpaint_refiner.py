"""Inpainting with a trained pixel refiner: ``restore --task inpaint --checkpoint REFINER``, where
REFINER is a ``train-refiner --task inpaint`` output (or one of its checkpoints) used as it is.

The fill is the project's fidelity-mode estimate over the classical floor: the refiner sees the
biharmonic base (:func:`degrade.inpaint_base`) and the hole, predicts the residual in the hole,
and the output is ``base + gain * feather * refiner(base, hole)`` there
(:func:`inpainter.compose`, the composition of every inpainting backend); outside the hole,
the input's pixels byte for byte. The gain defaults to the one calibrated on held-out photos
(:func:`inpainter.calibrate`, run by ``train-refiner --calibration-images``), else 0: exactly
the base.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.io import checkpoint, storage
from pipeline.models import refiner
from pipeline.models.degrade import INPAINT
from pipeline.models.tiling import tiled_apply
from pipeline.restoration.inpainter import Inpainter
from pipeline.restoration.restorer import RestoreSettings, default_gain


def is_refiner(url: str, storage_options: dict | None = None) -> bool:
    """Is the checkpoint at ``url`` a refiner (``train-refiner`` output)? False for anything else."""
    try:
        return checkpoint.read_raw_config(checkpoint.local_copy(url, storage_options)).get("kind") == "refiner"
    except (checkpoint.CheckpointError, OSError):
        return False


def check(url: str, task: str, storage_options: dict | None = None) -> str:
    """``inpaint``, or a ConfigError: a refiner checkpoint restores only as an inpainting one
    (the other tasks' refiners are bundled into a task checkpoint: ``train --refiner``)."""
    _, info = checkpoint.load(url, "refiner", storage_options)
    where = storage.redact(url)
    if info.task != INPAINT:
        raise ConfigError(
            f"{where} is a {info.task} refiner: bundle it into a task checkpoint with "
            f"`train --task {info.task} --refiner` and restore with that"
        )
    if task and task != INPAINT:
        raise ConfigError(f"{where} is an inpainting refiner: it runs --task inpaint, not {task!r}")
    return INPAINT


class RefinerInpainter(Inpainter):
    """Fills holes with an inpainting refiner: its fill is ``base + refiner(base, hole)``."""

    def __init__(self, url: str, task: str, opts: RestoreSettings, storage_options: dict | None = None):
        check(url, task, storage_options)
        _, info = checkpoint.load(url, "refiner", storage_options)
        self.net = refiner.load(url, storage_options, task=INPAINT)
        self.opts, self.info = opts, info
        self.gain = default_gain(info, opts)

    def fill(self, image: np.ndarray, base: np.ndarray, hole: np.ndarray) -> np.ndarray:
        b = torch.from_numpy((base.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32))[None]
        x = self.net.input(b, torch.from_numpy(hole.astype(np.float32))[None, None])
        r = tiled_apply(self.net, x, self.opts.tile, self.opts.overlap)
        return base + r[0].numpy().transpose(1, 2, 0) * 127.5
