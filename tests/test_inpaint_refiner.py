"""The inpainting refiner: train-refiner --task inpaint, its gain calibration, restore with it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from helpers import photo_crops, write_photo_folder
from pipeline.config import ConfigError
from pipeline.io import checkpoint, storage
from pipeline.models import degrade, refiner
from pipeline.restoration import backends
from pipeline.restoration.inpaint_refiner import RefinerInpainter
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.eval import GAINS
from pipeline.stages.restore import RestoreConfig, run_restore
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train_refiner import RefinerTrainConfig, run_train_refiner


@pytest.fixture(scope="module")
def inpaint_refiner(tmp_path_factory, ray_cluster):
    """A briefly trained inpainting refiner, calibrated on three other photos."""
    root = tmp_path_factory.mktemp("inpaint-refiner")
    write_photo_folder(str(root / "photos"), n=12, size=64)
    run_shards(ShardsConfig(src=str(root / "photos"), out=str(root / "shards"), samples_per_shard=6))
    (root / "calib").mkdir()
    for i, im in enumerate(photo_crops(3, 64, seed=30)):
        im.save(root / "calib" / f"c{i}.png")
    run_train_refiner(
        RefinerTrainConfig(
            task="inpaint",
            images=str(root / "shards" / "shard-000000.tar"),
            heldout=str(root / "shards" / "shard-000001.tar"),
            output=str(root / "refiner"),
            calibration_images=str(root / "calib"),
            workers=1,
            channels=16,
            depth=3,
            resolution=32,
            batch_size=4,
            steps=4,
            checkpoint_every=4,
            warmup_steps=1,
            eval_images=4,
            log_every=2,
        )
    )
    return str(root / "refiner")


def test_the_inpainting_refiner_sees_the_hole_and_records_its_calibrated_gain(inpaint_refiner):
    _, info = checkpoint.load(inpaint_refiner, "refiner")
    assert (info.task, info.step, info.model["in_channels"]) == ("inpaint", 4, 4)
    assert np.isfinite([info.metrics["loss"], info.metrics["psnr"], info.metrics["psnr_base"]]).all()
    # the calibration: every gain scored on the 3 photos; the gain kept is never below the base on any
    cal = info.calibration
    assert cal["images"] == 3 and info.gain in GAINS
    per_image = {g: c["psnr_per_image"] for g, c in cal["by_gain"].items()}
    assert cal["psnr_by_gain"] == {g: c["psnr"] for g, c in cal["by_gain"].items()}
    assert all(p >= b for p, b in zip(per_image[str(info.gain)], per_image["0.0"]))
    best = max(
        (g for g in per_image if all(p >= b for p, b in zip(per_image[g], per_image["0.0"]))),
        key=lambda g: np.mean(per_image[g]),
    )
    assert float(best) == info.gain
    # refiners saved before in_channels existed load as 3-channel ones; an inpainting one needs 4
    assert refiner.RefinerConfig.from_dict({"arch": "refiner", "task": "upscale2"}).in_channels == 3
    with pytest.raises(ValueError, match="takes 4 input channels"):
        refiner.RefinerConfig("inpaint")


def _masks(root, images: list[Image.Image]) -> list[np.ndarray]:
    holes = []
    for i, im in enumerate(images):
        im.save(root / "in" / f"p{i}.png")
        hole = degrade.inpaint_mask(im.height, im.width, seed=100 + i)
        Image.fromarray(hole.astype(np.uint8) * 255, "L").save(root / "masks" / f"p{i}.png")
        holes.append(hole)
    return holes


def _restore(root, url: str, name: str, gain: float | None) -> list[np.ndarray]:
    run_restore(
        RestoreConfig(
            input=str(root / "in"),
            output=str(root / name),
            checkpoint=url,
            task="inpaint",
            mask=str(root / "masks"),
            actors=1,
            settings=RestoreSettings(gain=gain),
        )
    )
    return [np.asarray(Image.open(root / name / f"p{i}.png")) for i in range(2)]


def test_restore_inpaints_with_the_refiner_at_its_calibrated_gain(inpaint_refiner, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    images = photo_crops(2, 48, seed=40)
    holes = _masks(tmp_path, images)
    # record a known non-zero gain, so the default is seen to use it (a 4-step refiner may calibrate to 0)
    local = checkpoint.local_copy(inpaint_refiner)
    info = checkpoint.read_info(local)
    info.gain = 0.5
    storage.write_bytes(os.path.join(local, checkpoint.CONFIG_NAME), info.to_json().encode())
    assert backends.check(inpaint_refiner, "") == "inpaint"
    default, zero, half = (_restore(tmp_path, inpaint_refiner, n, g) for n, g in (("d", None), ("z", 0.0), ("h", 0.5)))
    for im, hole, d, z, h in zip(images, holes, default, zero, half):
        px = np.asarray(im)
        assert 0 < hole.mean() <= 0.25
        for out in (d, z, h):
            np.testing.assert_array_equal(out[~hole], px[~hole])  # outside the hole: byte-identical
        base = np.round(np.clip(degrade.inpaint_base(im, hole), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(z, base)  # gain 0: exactly the biharmonic base
        np.testing.assert_array_equal(d, h)  # the recorded gain is the default
    # the refiner did change the fill (its last layer starts at zero: 4 steps moved it)
    inpainter = RefinerInpainter(inpaint_refiner, "inpaint", RestoreSettings())
    parts = inpainter.inpaint_parts(images[0], holes[0], with_model=True)
    assert parts.fill is not None and np.abs(parts.fill - parts.base)[holes[0]].max() > 0


def test_a_refiner_of_another_task_is_refused_as_a_restore_checkpoint(tmp_path):
    net = refiner.Refiner(refiner.RefinerConfig("upscale2", channels=8, depth=2))
    info = checkpoint.CheckpointInfo(kind="refiner", model=net.cfg.to_dict(), task="upscale2")
    checkpoint.save(str(tmp_path / "r"), info, {"ema": net.state_dict()})
    with pytest.raises(ConfigError, match="bundle it into a task checkpoint"):
        backends.check(str(tmp_path / "r"), "upscale2")
