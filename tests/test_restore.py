"""Restoration and upscaling: the Ray Data job on the S3 endpoint, tiling, inpainting, eval."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    gradient_16bit,
    photo_crops,
    png_16bit,
    png_bit_depth,
    tiny_diffusion_checkpoint,
    write_photo_folder,
    write_tar,
)
from pipeline.config import ConfigError, JobFailed
from pipeline.io import storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import autoencoder, degrade, denoiser, loading, tiling
from pipeline.models.loading import DiffusionModel
from pipeline.restoration.restorer import Restorer, RestoreSettings, project_upscale
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.eval import EvalConfig, evaluate
from pipeline.stages.restore import RestoreConfig, run_restore
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.autoencoder import VAETrainConfig, run_train_vae


@pytest.fixture(scope="module")
def upscale_model(tmp_path_factory, ray_cluster):
    """A tiny upscale2 model trained here: photos -> shards -> latents with the view -> train."""
    root = tmp_path_factory.mktemp("restore-model")
    write_photo_folder(str(root / "photos"), n=24, size=64)
    run_shards(ShardsConfig(src=str(root / "photos"), out=str(root / "shards"), samples_per_shard=12))
    # a briefly trained autoencoder: a random one decodes noise, and residuals of noise mean nothing
    run_train_vae(
        VAETrainConfig(
            images=str(root / "shards" / "*.tar"),
            output=str(root / "vae"),
            workers=1,
            steps=60,
            batch_size=8,
            resolution=32,
            checkpoint_every=60,
            warmup_steps=10,
            eval_images=8,
            log_every=20,
        )
    )
    run_encode(
        EncodeConfig(
            input=str(root / "shards" / "*.tar"),
            output=str(root / "lat"),
            vae=str(root / "vae"),
            resolution=64,
            tasks=["upscale2"],
        )
    )
    run_train(
        TrainConfig(
            latents=str(root / "lat"),
            output=str(root / "run"),
            task="upscale2",
            workers=1,
            steps=30,
            batch_size=8,
            checkpoint_every=30,
            log_every=10,
            warmup_steps=5,
        )
    )
    return str(root / "run")


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_restore_job_on_s3(upscale_model, bucket, ray_cluster):
    photos = photo_crops(3, 32, seed=9)
    storage.write_bytes(f"{bucket}/in/a.png", _png(photos[0]))
    storage.write_bytes(f"{bucket}/in/sub/b.jpg", _jpeg(photos[1]))
    rgba = photos[2].convert("RGBA")
    alpha = Image.linear_gradient("L").resize((32, 32))
    rgba.putalpha(alpha)
    storage.write_bytes(f"{bucket}/in/alpha.png", _png(rgba))
    storage.write_bytes(f"{bucket}/in/grey.png", _png(photos[0].convert("L").resize((24, 16))))
    storage.write_bytes(f"{bucket}/in/broken.png", b"\x89PNG not really")
    storage.write_bytes(f"{bucket}/in/empty.jpg", b"")
    # the checkpoint is read from the bucket too
    storage.upload_dir(upscale_model, f"{bucket}/model", commit_last="")
    cfg = RestoreConfig(
        input=f"{bucket}/in",
        output=f"{bucket}/out",
        checkpoint=f"{bucket}/model",
        scale=2,
        settings=RestoreSettings(steps=3),
        batch_size=1,
        actors=1,
        cpus_per_actor=1.0,
    )
    report = run_restore(cfg)
    assert (report["seen"], report["written"], report["errors"]) == (6, 4, 2)
    assert report["errors_by_reason"] == {"not_an_image": 1, "empty_file": 1}
    assert len(report["actors"]) == 1  # one actor (it loads the model in its constructor) for 6 batches
    files = set(storage.walk_files(f"{bucket}/out"))
    assert files == {"a.png", "sub/b.png", "alpha.png", "grey.png", "_errors.jsonl", "_report.json"}
    out = Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/out/a.png")))
    assert out.size == (64, 64) and out.mode == "RGB"
    grey = Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/out/grey.png")))
    assert grey.size == (48, 32) and grey.mode == "L"
    a = Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/out/alpha.png")))
    assert a.mode == "RGBA" and a.size == (64, 64)
    np.testing.assert_allclose(
        np.asarray(a.getchannel("A"), np.float32),
        np.asarray(alpha.resize((64, 64), Image.Resampling.LANCZOS), np.float32),
        atol=1,
    )
    errors = [json.loads(x) for x in storage.read_bytes(f"{bucket}/out/_errors.jsonl").decode().splitlines()]
    assert sorted(e["key"] for e in errors) == ["broken.png", "empty.jpg"]

    # a re-run skips finished outputs and retries only the bad inputs; as every input it tried
    # failed, it fails (exit code non-zero), with its report written
    with pytest.raises(JobFailed, match="none of the 2 inputs it tried was written"):
        run_restore(cfg)
    again = json.loads(storage.read_bytes(f"{bucket}/out/_report.json"))
    assert (again["written"], again["skipped_existing"], again["errors"]) == (0, 4, 2)


def _jpeg(im):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_restore_job_reads_image_shards(upscale_model, tmp_path, ray_cluster):
    write_photo_folder(str(tmp_path / "p"), n=5, size=32)
    run_shards(ShardsConfig(src=str(tmp_path / "p"), out=str(tmp_path / "shards"), samples_per_shard=3))
    report = run_restore(
        RestoreConfig(
            input=str(tmp_path / "shards" / "shard-*.tar"),
            output=str(tmp_path / "o"),
            checkpoint=upscale_model,
            settings=RestoreSettings(steps=2),
            format="jpg",
            cpus_per_actor=0.5,
        )
    )
    assert report["written"] == 5 and report["errors"] == 0
    outs = sorted(p.relative_to(tmp_path / "o") for p in (tmp_path / "o").glob("*/*.jpg"))
    assert len(outs) == 5 and {p.parts[0] for p in outs} == {"shard-000000", "shard-000001"}
    assert Image.open(tmp_path / "o" / outs[0]).size == (64, 64)


def test_format_same_keeps_tiff_and_bmp_inputs_as_tiff_and_bmp(upscale_model, tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    a, b = photo_crops(2, 32, seed=6)
    a.save(tmp_path / "in" / "scan.tif")
    b.save(tmp_path / "in" / "old.bmp")
    report = run_restore(
        RestoreConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "o"),
            checkpoint=upscale_model,
            settings=RestoreSettings(steps=2),
            format="same",
        )
    )
    assert report["written"] == 2 and report["errors"] == 0
    assert sorted(f for f in os.listdir(tmp_path / "o") if not f.startswith("_")) == ["old.bmp", "scan.tif"]
    assert Image.open(tmp_path / "o" / "scan.tif").format == "TIFF"
    assert Image.open(tmp_path / "o" / "old.bmp").format == "BMP"
    assert Image.open(tmp_path / "o" / "scan.tif").size == (64, 64)


def test_format_same_keeps_16_bits_through_the_classical_base(upscale_model, tmp_path, ray_cluster):
    import tifffile

    from pipeline.io import imaging

    (tmp_path / "in").mkdir()
    grad = gradient_16bit(40, 24)
    (tmp_path / "in" / "grad.png").write_bytes(png_16bit(grad, 4))
    (tmp_path / "in" / "grey.png").write_bytes(png_16bit(grad[..., 2], 1))
    tifffile.imwrite(tmp_path / "in" / "scan.tif", grad, photometric="rgb")
    photo_crops(1, 24, seed=2)[0].save(tmp_path / "in" / "photo.png")
    report = run_restore(
        RestoreConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "o"),
            checkpoint=upscale_model,
            settings=RestoreSettings(gain=0.0),
            format="same",
        )
    )
    assert report["written"] == 4 and report["errors"] == 0
    base = np.clip(degrade.classical_base("upscale2", grad / np.float32(257)), 0, 255)  # levels, not 8-bit
    grey_in = np.repeat(grad[..., 2:], 3, -1) / np.float32(257)
    grey_base = np.clip(degrade.classical_base("upscale2", grey_in), 0, 255) @ np.array([0.299, 0.587, 0.114])
    for name in ("grad.png", "scan.tif", "grey.png"):
        data = (tmp_path / "o" / name).read_bytes()
        im, levels = imaging.decode_pixels(data)
        assert levels is not None and im.size == (80, 48), name
        if name.endswith(".png"):
            assert png_bit_depth(data) == 16
        channel = levels[..., 2]  # (x + y) / 2: it varies along both axes
        assert len(np.unique(np.round(channel * 257))) > 256, name  # 8 bits would leave at most 256
        want = base[..., 2] if name != "grey.png" else grey_base
        assert np.abs(channel - want).max() <= 1 / 257, name  # gain 0: the base, to 16-bit rounding
    assert tifffile.imread(tmp_path / "o" / "scan.tif").dtype == np.uint16
    out8 = (tmp_path / "o" / "photo.png").read_bytes()
    assert png_bit_depth(out8) == 8 and imaging.decode_pixels(out8)[1] is None  # 8 bits stay 8 bits


def test_a_rerun_with_nothing_left_to_do_starts_no_actor(upscale_model, tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    for i, im in enumerate(photo_crops(2, 32, seed=3)):
        im.save(tmp_path / "in" / f"p{i}.png")
    cfg = RestoreConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "o"),
        checkpoint=upscale_model,
        settings=RestoreSettings(steps=2),
    )
    first = run_restore(cfg)
    assert (first["written"], first["pool"]) == (2, 1)  # two images: one batch, one actor
    again = run_restore(cfg)
    assert (again["written"], again["skipped_existing"], again["pool"], again["actors"]) == (0, 2, 0, [])


def test_tiled_apply_matches_untiled_for_local_ops():
    x = torch.randn(2, 3, 70, 90)
    assert torch.allclose(tiling.tiled_apply(lambda t: t * 2 + 1, x, 32, 8), x * 2 + 1, atol=1e-6)
    up = tiling.tiled_apply(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), x, 32, 8, factor=2)
    assert up.shape == (2, 3, 140, 180)
    assert torch.allclose(up, x.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)


def test_tiled_restore_agrees_with_untiled_on_a_gradient(upscale_model):
    model = loading.load(upscale_model)
    ramp = np.linspace(40, 210, 96, dtype=np.float32)
    grad = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(96, 1)[:64], np.full((64, 96), 128.0)], -1)
    im = Image.fromarray(grad.astype(np.uint8), "RGB")
    whole = Restorer(model, "upscale2", RestoreSettings(steps=4, tile=512, overlap=32))
    tiled = Restorer(model, "upscale2", RestoreSettings(steps=4, tile=64, overlap=16))
    a = np.asarray(whole.restore(im), np.float32)
    b = np.asarray(tiled.restore(im), np.float32)
    assert a.shape == b.shape == (128, 192, 3)
    # tile interiors (8 px away from any tile edge) agree with the untiled result
    edges = sorted({e for s in tiling._starts(192, 64, 16) for e in (s, s + 64)})
    redges = sorted({e for s in tiling._starts(128, 64, 16) for e in (s, s + 64)})
    interior = np.ones((128, 192), bool)
    for e in edges:
        interior[:, max(0, e - 8) : e + 8] = False
    for e in redges:
        interior[max(0, e - 8) : e + 8, :] = False
    assert interior.sum() > 0.2 * interior.size
    assert np.abs(a - b)[interior].mean() < 2.0
    # no step at tile boundaries: the jump across a boundary is no larger than jumps elsewhere
    dx = np.abs(np.diff(b, axis=1)).max(axis=(0, 2))
    inner = [c for c in range(191) if all(abs(c - e) > 2 for e in edges)]
    at_edges = [e - 1 for e in edges if 0 < e < 192]
    assert dx[at_edges].max() <= dx[inner].max() + 2


def _down(im: Image.Image, scale: int) -> np.ndarray:
    """The task's downsampling (degrade's bicubic kernel) of an 8-bit output."""
    return np.asarray(
        im.resize((im.width // scale, im.height // scale), Image.Resampling.BICUBIC, reducing_gap=None), np.float32
    )


def test_gain_zero_is_the_consistent_base_and_every_output_stays_consistent(upscale_model):
    model = loading.load(upscale_model)
    lr = photo_crops(1, 32, seed=4)[0]
    out = Restorer(model, "upscale2", RestoreSettings(steps=2, gain=0.0)).restore(lr)
    base = np.clip(degrade.classical_base("upscale2", lr), 0, 255)
    assert np.abs(np.asarray(out, np.float32) - base).max() <= 1  # the floor: the back-projection base
    for gain in (1.0, 3.0):  # the model's detail never changes what the low-resolution input shows
        detailed = Restorer(model, "upscale2", RestoreSettings(steps=2, gain=gain)).restore(lr)
        assert np.abs(_down(detailed, 2) - np.asarray(lr, np.float32)).mean() < 0.75
    r = torch.randn(1, 3, 64, 64)
    p = project_upscale(r, 2)
    low = torch.nn.functional.interpolate(p, size=(32, 32), mode="bicubic", antialias=True)
    assert low.abs().mean() < 0.2 * r.abs().mean()


def test_an_uncalibrated_task_model_defaults_to_its_classical_base(upscale_model):
    model = loading.load(upscale_model)
    assert model.info.task == "upscale2" and model.info.gain is None  # trained without --calibration-images
    lr = photo_crops(1, 32, seed=5)[0]
    default = Restorer(model, "upscale2", RestoreSettings(steps=2))
    assert default.gain == 0.0
    base = Restorer(model, "upscale2", RestoreSettings(steps=2, gain=0.0)).restore(lr)
    assert np.array_equal(np.asarray(default.restore(lr)), np.asarray(base))
    detailed = Restorer(model, "upscale2", RestoreSettings(steps=2, gain=1.0)).restore(lr)
    assert not np.array_equal(np.asarray(detailed), np.asarray(base))  # the model does add something


def _tiny_unconditional() -> DiffusionModel:
    vae_m, _ = autoencoder.new_kl("tiny", seed=0)
    vae = autoencoder.Autoencoder(
        vae_m, "kl", {}, latent_channels=4, downsample=4, scale=1.0, shift=0.0, weights_sha256="x"
    )
    net = denoiser.build(denoiser.config_for("tiny")).eval()
    info = CheckpointInfo(kind="diffusion", model=denoiser.to_dict(net.cfg), latent_shape=[4, 16, 16])
    return DiffusionModel(net, vae, info)


def test_inpainting_defaults_to_the_classical_fill_and_never_touches_known_pixels():
    model = _tiny_unconditional()
    im = photo_crops(1, 64, seed=3)[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    hole = np.asarray(mask) == 255
    base = np.round(np.clip(degrade.inpaint_base(im, hole), 0, 255)).astype(np.uint8)
    # uncalibrated (every zero-shot checkpoint): the default is exactly the classical fill, gain 0 too
    for gain in (None, 0.0):
        out = Restorer(model, "inpaint", RestoreSettings(steps=3, gain=gain)).restore(im, mask)
        np.testing.assert_array_equal(np.asarray(out), base)
    out = np.asarray(Restorer(model, "inpaint", RestoreSettings(steps=3, gain=1.0)).restore(im, mask))
    np.testing.assert_array_equal(out[~hole], np.asarray(im)[~hole])  # outside the hole: byte-identical
    diff = np.abs(out.astype(np.int16) - base)
    assert diff[hole].mean() > 2  # the model did fill the hole
    edge = hole & ~np.pad(hole, 1)[2:, 1:-1]  # the hole's bottom row: blended in from the base
    assert diff[edge].mean() < diff[24:32, 24:40].mean()
    with pytest.raises(ValueError, match="mask"):
        Restorer(model, "inpaint", RestoreSettings(steps=1)).restore(im)
    with pytest.raises(ValueError, match="the mask is 32x32 but its image is 64x64"):
        Restorer(model, "inpaint", RestoreSettings(steps=1)).restore(im, mask.resize((32, 32)))


def test_mask_dilate_grows_the_hole():
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 20, 20))
    grown = degrade.mask_hole(mask, (40, 40), dilate=3)
    assert degrade.mask_hole(mask, (40, 40)).sum() == 100
    assert grown[7:23, 13:17].all() and grown[10:20, 10:20].all() and not grown[6, 15] and not grown[7, 7]
    out = Restorer(_tiny_unconditional(), "inpaint", RestoreSettings(gain=0.0, mask_dilate=3)).restore(
        photo_crops(1, 40, seed=1)[0], mask
    )
    assert out.size == (40, 40)


def test_inpainting_shards_carry_their_own_masks_on_s3(bucket, ray_cluster, tmp_path):
    """``key.mask.png`` beside ``key.png`` in an image shard is the sample's mask; a sample
    without one, or with a mask of another size, is an error row (never a silent pass-through
    or a resized mask); outside the hole the output is the input byte for byte."""
    ims = photo_crops(4, 32, seed=12)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 20, 24))
    members = [
        ("a.png", _png(ims[0])),
        ("a.mask.png", _png(mask)),
        ("b.png", _png(ims[1])),
        ("b.mask.png", _png(mask.transpose(Image.Transpose.ROTATE_90))),
        ("c.png", _png(ims[2])),  # no mask
        ("d.png", _png(ims[3])),
        ("d.mask.png", _png(mask.resize((16, 16)))),  # another size
    ]
    write_tar(str(tmp_path / "shard-000000.tar"), members)
    storage.write_bytes(f"{bucket}/in/shard-000000.tar", (tmp_path / "shard-000000.tar").read_bytes())
    storage.upload_dir(tiny_diffusion_checkpoint(str(tmp_path / "ckpt")), f"{bucket}/model", commit_last="")
    cfg = RestoreConfig(
        input=f"{bucket}/in/shard-000000.tar",
        output=f"{bucket}/out",
        checkpoint=f"{bucket}/model",
        task="inpaint",
        settings=RestoreSettings(steps=2, gain=1.0),
        actors=1,
        cpus_per_actor=1.0,
        max_error_rate=1.0,
    )
    report = run_restore(cfg)
    assert (report["seen"], report["written"], report["errors"]) == (4, 2, 2)
    assert report["errors_by_reason"] == {"no_mask": 1, "mask_size": 1}
    errors = {e["key"]: e for e in map(json.loads, storage.read_bytes(f"{bucket}/out/_errors.jsonl").splitlines())}
    assert set(errors) == {"shard-000000/c.png", "shard-000000/d.png"}
    assert "16x16" in errors["shard-000000/d.png"]["detail"]
    for key, im, m in (("a", ims[0], mask), ("b", ims[1], mask.transpose(Image.Transpose.ROTATE_90))):
        out = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/out/shard-000000/{key}.png"))))
        hole = np.asarray(m) == 255
        np.testing.assert_array_equal(out[~hole], np.asarray(im)[~hole])
        assert np.abs(out.astype(int) - np.asarray(im))[hole].mean() > 1
    (tmp_path / "files").mkdir()
    ims[0].save(tmp_path / "files" / "a.png")
    with pytest.raises(
        ConfigError, match=r"'member' reads each shard sample's key\.mask\.png; the input is not shards"
    ):
        run_restore(
            RestoreConfig(
                input=str(tmp_path / "files"),
                output=str(tmp_path / "o"),
                checkpoint=cfg.checkpoint,
                task="inpaint",
                mask="member",
            )
        )


def test_a_missing_or_wrong_size_mask_in_a_mask_folder_is_an_error_row(tmp_path, ray_cluster):
    ims = photo_crops(3, 32, seed=13)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (4, 4, 12, 12))
    for i, im in enumerate(ims):
        im.save(tmp_path / "in" / f"p{i}.png")
    mask.save(tmp_path / "masks" / "p0.png")
    mask.resize((32, 30)).save(tmp_path / "masks" / "p1.png")  # p2: no mask
    report = run_restore(
        RestoreConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            checkpoint=tiny_diffusion_checkpoint(str(tmp_path / "ckpt")),
            task="inpaint",
            mask=str(tmp_path / "masks"),
            cpus_per_actor=0.5,
            max_error_rate=1.0,
        )
    )
    assert (report["written"], report["errors_by_reason"]) == (1, {"no_mask": 1, "mask_size": 1})
    hole = np.asarray(mask) == 255  # the default (an uncalibrated zero-shot model): the classical fill
    base = np.round(np.clip(degrade.inpaint_base(ims[0], hole), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "p0.png")), base)


def test_eval_inpaint_scores_the_hole_next_to_the_classical_fill(tmp_path):
    (tmp_path / "held").mkdir()
    for i, im in enumerate(photo_crops(3, 48, seed=21)):
        im.save(tmp_path / "held" / f"h{i}.png")
    res = evaluate(
        EvalConfig(
            task="inpaint",
            checkpoint=tiny_diffusion_checkpoint(str(tmp_path / "ckpt")),
            images=str(tmp_path / "held"),
            out=str(tmp_path / "e"),
            settings=RestoreSettings(steps=2),
        )
    )
    rows = res["scores"]
    assert set(rows) == {"model", "classical_base"} and res["floor"] == "classical_base" and res["images"] == 3
    assert res["gain"] == 0.0 and rows["model"] == rows["classical_base"]  # uncalibrated: the default is the base
    assert res["calibration"]["0.0"]["psnr"] == pytest.approx(rows["classical_base"]["psnr"], abs=1e-3)
    assert res["calibration"]["0.0"]["never_below_baseline"] is True
    assert res["calibration"]["1.0"]["psnr"] != res["calibration"]["0.0"]["psnr"]  # the model was run
    assert res["recommended_gain"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert 5 < rows["classical_base"]["psnr"] < 60
    assert Image.open(tmp_path / "e" / "side_by_side.png").size == (5 * 48, 3 * 48)


def test_eval_reports_model_and_baselines(upscale_model, tmp_path):
    (tmp_path / "held").mkdir()
    for i, im in enumerate(photo_crops(3, 64, seed=20)):
        im.save(tmp_path / "held" / f"h{i}.png")
    res = evaluate(
        EvalConfig(
            task="upscale2",
            checkpoint=upscale_model,
            images=str(tmp_path / "held"),
            out=str(tmp_path / "e"),
            settings=RestoreSettings(steps=2),
        )
    )
    assert set(res["scores"]) == {"model", "bicubic", "lanczos", "back_projection", "autoencoder"}
    assert res["scores"]["lanczos"]["psnr"] > res["scores"]["autoencoder"]["psnr"]
    assert res["scores"]["back_projection"]["psnr"] > res["scores"]["lanczos"]["psnr"]
    assert all(s["psnr_y"] > 10 for s in res["scores"].values())
    assert res["calibration"]["0.0"]["never_below_baseline"] is True
    assert res["recommended_gain"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert Image.open(tmp_path / "e" / "side_by_side.png").size == (5 * 64, 3 * 64)


def test_fidelity_mode_is_one_model_evaluation_and_detail_mode_samples(upscale_model):
    model = loading.load(upscale_model)
    calls = []
    hook = model.denoiser.register_forward_hook(lambda *_: calls.append(1))
    lr = photo_crops(1, 32, seed=6)[0]
    # at gain 1 (this model is uncalibrated: its default, gain 0, is the base in both modes)
    fidelity = Restorer(model, "upscale2", RestoreSettings(mode="fidelity", steps=7, gain=1.0)).restore(lr)
    n_fidelity = len(calls)
    detail = Restorer(model, "upscale2", RestoreSettings(mode="detail", steps=7, gain=1.0)).restore(lr)
    hook.remove()
    assert (n_fidelity, len(calls) - n_fidelity) == (1, 7)  # one tile: one call per step
    assert fidelity.size == detail.size == (64, 64)
    assert not np.array_equal(np.asarray(fidelity), np.asarray(detail))


def test_eval_takes_ready_made_pairs(upscale_model, tmp_path):
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    for i, im in enumerate(photo_crops(2, 64, seed=21)):
        im.save(tmp_path / "hr" / f"p{i}.png")
        degrade.degrade("upscale2", im, degrade.seed_for(f"p{i}.png")).save(tmp_path / "lr" / f"p{i}.png")
    common = {"task": "upscale2", "checkpoint": upscale_model, "images": str(tmp_path / "hr")}
    made = evaluate(EvalConfig(out=str(tmp_path / "e1"), **common))
    given = evaluate(EvalConfig(out=str(tmp_path / "e2"), lowres=str(tmp_path / "lr"), **common))
    assert given["scores"] == made["scores"]
    with pytest.raises(ConfigError, match="no input for"):
        (tmp_path / "lr" / "p1.png").unlink()
        evaluate(EvalConfig(out=str(tmp_path / "e3"), lowres=str(tmp_path / "lr"), **common))


def test_training_calibrates_the_gain_that_restore_then_uses(upscale_model, tmp_path):
    import shutil

    from pipeline.io import checkpoint
    from pipeline.stages.train import calibrate

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint.latest_checkpoint(upscale_model), ckpt)  # the fixture's model stays as it is
    (tmp_path / "held").mkdir()
    for i, im in enumerate(photo_crops(3, 64, seed=30)):
        im.save(tmp_path / "held" / f"h{i}.png")
    cfg = TrainConfig(
        latents="unused", output=str(tmp_path / "o"), task="upscale2", calibration_images=str(tmp_path / "held")
    )
    gain = calibrate(ckpt, cfg)
    info = checkpoint.read_info(ckpt)
    assert info.gain == gain and gain in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert info.calibration["images"] == 3 and set(info.calibration["psnr_by_gain"]) == {
        "0.0",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
    }
    model = loading.load(ckpt)
    assert Restorer(model, "upscale2", RestoreSettings()).gain == gain  # restore's default
    assert Restorer(model, "upscale2", RestoreSettings(gain=0.5)).gain == 0.5  # unless told otherwise
    with pytest.raises(ConfigError, match="needs a --task"):
        TrainConfig(latents="l", output=str(tmp_path / "o2"), calibration_images=str(tmp_path / "held"))


def test_degradations_are_seeded_by_key():
    im = photo_crops(1, 64)[0]
    a = degrade.degrade("restore", im, degrade.seed_for("k1"))
    b = degrade.degrade("restore", im, degrade.seed_for("k1"))
    c = degrade.degrade("restore", im, degrade.seed_for("k2"))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert degrade.degrade("upscale4", im, 0).size == (16, 16)


def test_batched_restore_matches_one_by_one(upscale_model):
    model = loading.load(upscale_model)
    r = Restorer(model, "upscale2", RestoreSettings(steps=3))
    images = [*photo_crops(3, 32, seed=11), photo_crops(1, 40, seed=12)[0]]  # two sizes: two groups
    together = r.restore_many(images)
    for im, out in zip(images, together):
        alone = np.asarray(r.restore(im), np.int16)
        assert out.size == (2 * im.width, 2 * im.height)
        assert np.abs(np.asarray(out, np.int16) - alone).max() <= 1


def test_restore_task_builds_on_the_classical_restoration_and_eval_keeps_the_input_floor(tmp_path):
    """The ``restore`` task: gain 0 is the denoised + deconvolved input, the model's estimate is
    measured from it, and eval's floor per image is the degraded input itself."""
    from helpers import tiny_diffusion_checkpoint
    from pipeline.stages.eval import score

    ck = tiny_diffusion_checkpoint(str(tmp_path / "ck"), task="restore")
    model = loading.load(ck, device="cpu")
    hr = photo_crops(1, size=64, seed=3)[0]
    lr = degrade.degrade("restore", hr, 0)
    raw = degrade.classical_base("restore", lr)
    base = np.round(np.clip(raw, 0, 255)).astype(np.uint8)
    out0 = Restorer(model, "restore", RestoreSettings(gain=0.0)).restore(lr)
    assert np.abs(np.asarray(out0, np.int16) - base).max() <= 1  # exactly the base (up to rounding)
    parts = Restorer(model, "restore", RestoreSettings()).parts(lr)
    one = np.asarray(Restorer(model, "restore", RestoreSettings(gain=1.0)).compose(parts, 1.0), np.float32)
    half = np.asarray(Restorer(model, "restore", RestoreSettings(gain=0.5)).compose(parts, 0.5), np.float32)
    inside = (one > 0) & (one < 255) & (raw > 0) & (raw < 255)  # where neither was clipped
    assert inside.mean() > 0.3
    np.testing.assert_allclose(half[inside], ((one + base) / 2)[inside], atol=1.01)  # a mix of base and estimate

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(photo_crops(3, size=96, seed=8)):
        im.save(photos / f"p{i}.png")
    result, _ = score(EvalConfig(task="restore", checkpoint=ck, images=str(photos), out=str(tmp_path / "e")))
    rows = result["scores"]
    assert set(rows) == {"model", "input", "classical_base", "autoencoder"} and result["floor"] == "input"
    assert rows["classical_base"]["psnr"] > rows["input"]["psnr"]
    best = str(result["recommended_gain"])
    assert result["calibration"][best]["never_below_baseline"]
    assert result["calibration"]["0.0"]["psnr"] == pytest.approx(rows["classical_base"]["psnr"], abs=1e-3)


# --------------------------------------------------------------------------- the pixel refiner


@pytest.fixture(scope="module")
def refined_model(upscale_model, tmp_path_factory, ray_cluster):
    """The fixture's upscale2 model with a briefly trained pixel refiner bundled (train --refiner)."""
    import os

    from pipeline.train.refiner import RefinerTrainConfig, run_train_refiner

    root = tmp_path_factory.mktemp("refiner")
    shards = os.path.join(os.path.dirname(upscale_model), "shards")
    run_train_refiner(
        RefinerTrainConfig(
            task="upscale2",
            images=os.path.join(shards, "shard-000000.tar"),
            heldout=os.path.join(shards, "shard-000001.tar"),
            output=str(root / "refiner"),
            channels=16,
            depth=4,
            resolution=32,
            batch_size=8,
            steps=30,
            checkpoint_every=30,
            warmup_steps=5,
            eval_images=6,
            log_every=10,
        )
    )
    run_train(
        TrainConfig(
            latents=os.path.join(os.path.dirname(upscale_model), "lat"),
            output=str(root / "run"),
            task="upscale2",
            init_from=upscale_model,  # the fixture's weights: this run only bundles the refiner
            refiner=str(root / "refiner"),
            workers=1,
            steps=1,
            batch_size=4,
            warmup_steps=0,
            checkpoint_every=1,
        )
    )
    return str(root / "refiner"), str(root / "run")


def test_refiner_training_measures_the_base_it_refines(refined_model):
    from pipeline.io import checkpoint
    from pipeline.models import quality, refiner
    from pipeline.train.refiner import training_pair

    ref_url, _ = refined_model
    _, info = checkpoint.load(ref_url, "refiner")
    assert (info.kind, info.task, info.step) == ("refiner", "upscale2", 30)
    m = info.metrics
    assert np.isfinite([m["loss"], m["psnr"], m["psnr_base"]]).all()
    assert m["gain_db"] == pytest.approx(m["psnr"] - m["psnr_base"])
    # the held-out base PSNR is the classical base's, computed here independently
    from pipeline.train.crops import heldout_crops
    from pipeline.train.refiner import RefinerTrainConfig

    held = heldout_crops(
        [info.train["heldout"]],
        RefinerTrainConfig(task="upscale2", images=info.train["images"], output="unused", resolution=32, eval_images=6),
    )
    pairs = [training_pair("upscale2", im, i) for i, im in enumerate(held)]
    base = torch.from_numpy(np.stack([b for b, _, _ in pairs])).clamp(-1, 1)
    clean = torch.from_numpy(np.stack([c for _, _, c in pairs]))
    assert float(quality.psnr(base, clean).mean()) == pytest.approx(m["psnr_base"], abs=1e-3)
    net = refiner.load(ref_url, task="upscale2")
    assert net.cfg == refiner.RefinerConfig("upscale2", channels=16, depth=4, unshuffle=2)
    with pytest.raises(checkpoint.CheckpointError, match="trained for task 'upscale2', not 'upscale4'"):
        refiner.load(ref_url, task="upscale4")
    with pytest.raises(checkpoint.CheckpointError, match="is a refiner checkpoint, not a diffusion checkpoint"):
        loading.load(ref_url)


def test_an_untrained_refiner_returns_the_base_and_keeps_any_size():
    from pipeline.models.refiner import Refiner, RefinerConfig

    net = Refiner(RefinerConfig("upscale4", channels=8, depth=3, unshuffle=4))
    x = torch.rand(2, 3, 37, 50) * 2 - 1
    assert net(x).shape == x.shape and net(x).abs().max() == 0  # the last layer starts at zero
    torch.nn.init.normal_(net.net[-1].weight)
    assert net(x).shape == x.shape and net(x).abs().max() > 0
    with pytest.raises(ValueError, match="unshuffle"):
        RefinerConfig("upscale4", unshuffle=3)


def test_fidelity_mode_uses_the_bundled_refiner_and_detail_mode_adds_the_sample_to_it(refined_model):
    _, run = refined_model
    model = loading.load(run)
    assert model.refiner is not None and model.refiner.cfg.task == "upscale2"
    calls = []
    hook = model.denoiser.register_forward_hook(lambda *_: calls.append(1))
    lr = photo_crops(1, 32, seed=6)[0]
    out = Restorer(model, "upscale2", RestoreSettings(gain=1.0)).restore(lr)
    assert not calls  # fidelity with a refiner: no latent model, no autoencoder
    # what it computed: base + P(refiner(base)), then back-projected to consistency
    base = torch.from_numpy(degrade.classical_base("upscale2", lr).transpose(2, 0, 1)[None] / 127.5 - 1).float()
    with torch.no_grad():
        refined = base + project_upscale(model.refiner(base), 2)
    want = degrade.back_project(lr, 2, iters=3, start=(refined[0].numpy().transpose(1, 2, 0) + 1) * 127.5)
    assert np.abs(np.asarray(out, np.float32) - np.clip(np.round(want), 0, 255)).max() <= 1
    assert np.abs(_down(out, 2) - np.asarray(lr, np.float32)).mean() < 0.75  # consistent with the input
    detail = Restorer(model, "upscale2", RestoreSettings(mode="detail", steps=3, gain=1.0)).restore(lr)
    hook.remove()
    assert len(calls) == 3 + 1  # the sample's steps, and the latent mean it is measured from
    assert not np.array_equal(np.asarray(detail), np.asarray(out))


def test_a_refiner_for_another_task_or_without_a_task_is_refused(refined_model, upscale_model, tmp_path):
    import os

    from pipeline.io.checkpoint import CheckpointError
    from pipeline.train.diffusion import train_model

    ref_url, _ = refined_model
    with pytest.raises(ConfigError, match="'refiner' needs a --task"):
        TrainConfig(latents="l", output=str(tmp_path / "o"), refiner=ref_url)
    lat = os.path.join(os.path.dirname(upscale_model), "lat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint at or under"):
        train_model(
            TrainConfig(latents=lat, output=str(tmp_path / "o"), task="upscale2", refiner=str(tmp_path / "empty"))
        )
    with pytest.raises(CheckpointError, match="is a diffusion checkpoint, not a refiner checkpoint"):
        train_model(TrainConfig(latents=lat, output=str(tmp_path / "o"), task="upscale2", refiner=upscale_model))


def test_the_floor_counts_differences_under_8_bit_rounding_noise_as_ties():
    from pipeline.stages.eval import never_worse

    # a near-flat image: 0.7 dB at 52 dB is an MSE difference of 0.07 level^2, under rounding's 1/12
    assert never_worse([51.87, 30.0], [52.58, 29.0])
    # at photo PSNRs a few hundredths of a dB are real: 30.00 vs 30.05 dB is 0.75 level^2
    assert not never_worse([30.0], [30.05])
    assert not never_worse([51.0], [52.58])  # 0.2 level^2: more than rounding


def test_a_damaged_part_found_by_the_actors_ends_in_one_line(tmp_path, ray_cluster, capsys):
    """Damaged weights pass the driver's check (it reads descriptions only); the actors' load
    error comes back from Ray as the text of an ActorDiedError and must still be one line."""
    from helpers import tiny_diffusion_checkpoint
    from pipeline import cli

    ckpt = tiny_diffusion_checkpoint(str(tmp_path / "ck"), task="upscale2")
    (tmp_path / "ck" / "vae" / "ema.safetensors").write_bytes(b"\x00" * 64)
    write_photo_folder(str(tmp_path / "in"), n=2, size=32)
    rc = cli.main(["restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint", ckpt])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1 and "vae: ema.safetensors is damaged" in lines[0], lines
    assert "Traceback" not in lines[0] and "\x1b[" not in lines[0]
