"""The latent inpainting model: ``encode --tasks inpaint`` -> ``train --task inpaint`` (calibrated)
-> ``restore``/``eval --task inpaint`` with it, on real Ray, real shards and a tiny model."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import photo_crops, write_photo_folder
from pipeline.config import ConfigError
from pipeline.io import checkpoint, imaging, manifest
from pipeline.io.tarshards import iter_samples, load_npy
from pipeline.models import autoencoder, degrade, loading
from pipeline.restoration.restorer import Restorer, RestoreSettings
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.eval import EvalConfig, evaluate
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.diffusion import train_model


def _encode(root, output: str, tasks: list[str]) -> None:
    """Encode the run's image shards with its tiny autoencoder at 64 px."""
    run_encode(
        EncodeConfig(
            input=str(root / "shards" / "*.tar"), output=output, vae=str(root / "vae"), resolution=64, tasks=tasks
        )
    )


@pytest.fixture(scope="module")
def inpaint_run(tmp_path_factory, ray_cluster):
    """photos -> shards -> latents with the inpaint view -> train --task inpaint, calibrated."""
    root = tmp_path_factory.mktemp("inpaint-model")
    write_photo_folder(str(root / "photos"), n=16, size=64)
    run_shards(ShardsConfig(src=str(root / "photos"), out=str(root / "shards"), samples_per_shard=8))
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], str(root / "vae"))
    _encode(root, str(root / "lat"), ["inpaint"])
    (root / "calib").mkdir()
    for i, im in enumerate(photo_crops(3, 64, seed=40)):
        im.save(root / "calib" / f"c{i}.png")
    run_train(
        TrainConfig(
            latents=str(root / "lat"),
            output=str(root / "run"),
            task="inpaint",
            workers=1,
            steps=10,
            batch_size=8,
            checkpoint_every=10,
            log_every=5,
            warmup_steps=2,
            calibration_images=str(root / "calib"),
        )
    )
    return root


def test_encode_caches_the_biharmonic_view_and_the_generated_hole(inpaint_run):
    lat = str(inpaint_run / "lat")
    man = manifest.load(lat)
    assert man["tasks"] == ["inpaint"] and {"inpaint.npy", manifest.HOLE_FIELD} <= set(man["fields"])
    with open(manifest.shard_urls(lat, man)[0], "rb") as f:
        samples = list(iter_samples(f))
    assert samples
    images = {}
    for shard in sorted(glob.glob(str(inpaint_run / "shards" / "*.tar"))):
        with open(shard, "rb") as f:
            images.update({x.key: x.fields[imaging.image_field(x.fields)] for x in iter_samples(f)})
    vae = autoencoder.load(str(inpaint_run / "vae"))
    for s in samples:
        key = s.key
        hole = load_npy(s.fields[manifest.HOLE_FIELD])
        want = degrade.pool_hole(degrade.training_hole(key, 64, 64), 4)[None]  # the tiny autoencoder: f = 4
        np.testing.assert_array_equal(hole, want)
        assert 0 < hole.mean() < 1
        # the view is the latent of the image with exactly that hole filled biharmonically
        im = imaging.to_rgb(imaging.decode(images[key]))
        filled = degrade.inpaint_base(im, degrade.training_hole(key, 64, 64))
        with torch.no_grad():
            want_view = vae.encode(torch.from_numpy(imaging.to_tensor_array(filled))[None]).mean[0].numpy()
        np.testing.assert_allclose(load_npy(s.fields["inpaint.npy"]).astype(np.float32), want_view, atol=2e-2)
        assert not np.allclose(load_npy(s.fields["latent.npy"]).astype(np.float32), want_view, atol=2e-2)


def test_train_inpaint_conditions_on_the_view_and_the_hole_and_calibrates(inpaint_run):
    ckpt = checkpoint.latest_checkpoint(str(inpaint_run / "run"))
    info = checkpoint.read_info(ckpt)
    assert info.task == "inpaint" and info.step == 10
    assert info.model["cond_channels"] == info.model["latent_channels"] + 1  # the view's latent and the hole
    assert info.gain in (0.0, 0.25, 0.5, 0.75, 1.0) and info.calibration["images"] == 3
    by_gain = info.calibration["psnr_by_gain"]
    assert set(by_gain) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert by_gain[str(info.gain)] >= by_gain["0.0"]  # never below the base on average ...
    res = evaluate(
        EvalConfig(
            task="inpaint",
            checkpoint=str(inpaint_run / "run"),
            images=str(inpaint_run / "calib"),
            out=str(inpaint_run / "eval"),
        )
    )
    assert res["gain"] == info.gain  # eval, as restore, runs the calibrated gain by default
    assert res["calibration"][str(info.gain)]["never_below_baseline"]  # ... nor on any calibration photo
    assert all(
        m >= b - 1e-3
        for m, b in zip(res["scores"]["model"]["psnr_per_image"], res["scores"]["classical_base"]["psnr_per_image"])
    )


def test_restore_with_the_inpainting_model_changes_only_the_hole(inpaint_run):
    model = loading.load(str(inpaint_run / "run"))
    im = photo_crops(1, 64, seed=3)[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    hole = np.asarray(mask) == 255
    base = np.round(np.clip(degrade.inpaint_base(im, hole), 0, 255)).astype(np.uint8)
    assert Restorer(model, "", RestoreSettings()).gain == model.info.gain  # the checkpoint's task and gain
    out0 = np.asarray(Restorer(model, "inpaint", RestoreSettings(gain=0.0)).restore(im, mask))
    np.testing.assert_array_equal(out0, base)  # gain 0: exactly the biharmonic fill
    for mode in ("fidelity", "detail"):
        out = np.asarray(Restorer(model, "inpaint", RestoreSettings(gain=1.0, mode=mode, steps=2)).restore(im, mask))
        np.testing.assert_array_equal(out[~hole], np.asarray(im)[~hole])  # outside the hole: byte-identical
        assert np.abs(out.astype(np.int16) - base)[hole].mean() > 0.5  # the model changed the hole
    with pytest.raises(ConfigError, match="trained for task 'inpaint', not 'upscale2'"):
        Restorer(model, "upscale2", RestoreSettings())


def test_a_dataset_without_the_inpaint_view_is_refused_in_one_line(inpaint_run, tmp_path):
    _encode(inpaint_run, str(tmp_path / "plain"), [])
    with pytest.raises(ConfigError, match=r"^the latent dataset has no 'inpaint' view; encode with --tasks inpaint$"):
        train_model(TrainConfig(latents=str(tmp_path / "plain"), output=str(tmp_path / "o"), task="inpaint"))
    with pytest.raises(ConfigError, match="an inpainting refiner is a checkpoint of its own"):
        TrainConfig(latents="l", output=str(tmp_path / "o2"), task="inpaint", refiner=str(tmp_path / "r"))


def test_the_training_hole_is_seeded_by_the_key_and_pooled_by_any():
    a, b = degrade.training_hole("k1", 64, 48), degrade.training_hole("k1", 64, 48)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, degrade.training_hole("k2", 64, 48))
    assert 0.05 <= a.mean() <= 0.25
    hole = np.zeros((10, 9), bool)
    hole[5, 8] = True  # one pixel in the last, edge-padded block
    pooled = degrade.pool_hole(hole, 4)
    assert pooled.shape == (3, 3) and pooled.sum() == 1 and pooled[1, 2]
