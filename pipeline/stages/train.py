"""``latent-pipeline train``: train a latent diffusion model on cached latents with Ray Train,
then (task models, with ``--calibration-images``) calibrate its detail gain on held-out photos.

The loop and its config live in :mod:`pipeline.train.diffusion`; this verb adds what needs the
restorer, which training itself never imports: the calibration, measured exactly as ``eval``
measures it (the largest-PSNR gain never below Lanczos on any held-out photo, nor below the
classical base on average), written into the newest checkpoint's description so that ``restore``
uses it by default.
"""

from __future__ import annotations

import logging
import os
import tempfile

from pipeline.io import checkpoint, storage
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.eval import EvalConfig, score
from pipeline.train.diffusion import TrainConfig, train_model
from pipeline.train.loop import checkpoint_url

log = logging.getLogger("pipeline.train")

__all__ = ["TrainConfig", "calibrate", "run_train"]


def run_train(cfg: TrainConfig):
    result = train_model(cfg)
    if cfg.task and cfg.calibration_images and result.checkpoint is not None:
        calibrate(result.checkpoint.path, cfg)
    return result


def calibrate(url: str, cfg: TrainConfig) -> float:
    """Calibrate the detail gain of the checkpoint at ``url`` (the run's own output) and record it."""
    so = cfg.storage.options
    url = checkpoint_url(url, cfg.output)
    with tempfile.TemporaryDirectory() as scratch:
        result, _ = score(
            EvalConfig(
                task=cfg.task,
                checkpoint=url,
                images=cfg.calibration_images,
                out=os.path.join(scratch, "e"),
                settings=RestoreSettings(gain=1.0),
                storage=cfg.storage,
            )
        )
    local = checkpoint.local_copy(url, so)
    info = checkpoint.read_info(local)
    info.gain = float(result["recommended_gain"])
    info.calibration = {
        "images": result["images"],
        "psnr": {k: v["psnr"] for k, v in result["scores"].items() if k != "model"},
        "psnr_by_gain": {g: c["psnr"] for g, c in result["calibration"].items()},
    }
    storage.write_bytes(storage.join(url, checkpoint.CONFIG_NAME), info.to_json().encode(), so)
    log.info(
        f"[train] calibrated detail gain {info.gain} on {result['images']} held-out photos "
        f"({info.calibration['psnr_by_gain']} dB by gain); restore uses it by default"
    )
    return info.gain
