"""``latent-pipeline train-refiner``: train a task's pixel refiner (:mod:`pipeline.train.refiner`),
then (``--task inpaint`` with ``--calibration-images``) calibrate its gain on held-out photos.

An inpainting refiner is itself the checkpoint of ``restore --task inpaint``, so its gain is
calibrated here, as ``train`` calibrates a task model's (training itself never imports the
restorer): each held-out photo gets a generated hole (:func:`degrade.inpaint_mask`, seed = its
position in the sorted list), the refined fill is composed exactly as ``restore`` composes it,
and the gain kept is the best mean hole PSNR among the gains never below the biharmonic base on
any photo (0, the base itself, if none is). It is written into the newest checkpoint's
description; ``restore`` uses it by default.
"""

from __future__ import annotations

import logging

from pipeline.io import checkpoint, imaging, storage
from pipeline.models import degrade
from pipeline.restoration.inpaint_refiner import RefinerInpainter
from pipeline.restoration.inpainter import calibrate
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.eval import GAINS
from pipeline.train import refiner as training
from pipeline.train.loop import checkpoint_url
from pipeline.train.refiner import RefinerTrainConfig

log = logging.getLogger("pipeline.train_refiner")

__all__ = ["RefinerTrainConfig", "calibrate_inpaint", "run_train_refiner"]


def run_train_refiner(cfg: RefinerTrainConfig):
    result = training.run_train_refiner(cfg)
    if cfg.calibration_images and result.checkpoint is not None:
        calibrate_inpaint(result.checkpoint.path, cfg)
    return result


def calibrate_inpaint(url: str, cfg: RefinerTrainConfig) -> float:
    """Calibrate the gain of the inpainting refiner at ``url`` (the run's own output) and record it."""
    so = cfg.storage.options
    url = checkpoint_url(url, cfg.output)
    files = storage.list_files(cfg.calibration_images, imaging.IMAGE_SUFFIXES, so)
    if not files:
        raise FileNotFoundError(f"no images at {storage.redact(cfg.calibration_images)}")
    photos = [imaging.to_rgb(imaging.decode(storage.read_bytes(u, so))) for u, _ in files]
    holes = [(im, degrade.inpaint_mask(im.height, im.width, seed=i)) for i, im in enumerate(photos)]
    cal = calibrate(RefinerInpainter(url, "inpaint", RestoreSettings(gain=1.0), so), holes, GAINS)
    info = checkpoint.read_info(checkpoint.local_copy(url, so))
    info.gain = cal.recommended()
    by_gain = cal.summary()
    psnr = {g: c["psnr"] for g, c in by_gain.items()}
    info.calibration = {"images": len(photos), "psnr_by_gain": psnr, "by_gain": by_gain}
    storage.write_bytes(storage.join(url, checkpoint.CONFIG_NAME), info.to_json().encode(), so)
    log.info(
        f"[train-refiner] calibrated gain {info.gain} on {len(photos)} held-out photos "
        f"(hole PSNR by gain {psnr} dB); restore --task inpaint uses it by default"
    )
    return info.gain
