"""The latent-caching job end to end: real Ray, real S3 endpoint, real shards, tiny real models."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from helpers import bad_input_members, encode_image, photo_crops, write_photo_folder, write_tar
from pipeline.config import ConfigError
from pipeline.io import imaging, manifest, storage
from pipeline.io.tarshards import iter_samples
from pipeline.models import autoencoder
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.inspect import InspectConfig, inspect
from pipeline.stages.shards import ShardsConfig, run_shards


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "tiny")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=3)[0], path)
    return path


def _read_shard(url):
    with storage.open_read(url) as f:
        return list(iter_samples(f))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_roundtrip_folder_to_latents(where, tmp_path, bucket, ray_cluster, tiny_vae):
    photos = tmp_path / "photos"
    rels = write_photo_folder(str(photos), n=10, size=64)
    root = str(tmp_path) if where == "local" else bucket
    # on S3 the autoencoder lives in the bucket too: every input goes through the storage module
    vae = tiny_vae if where == "local" else f"{bucket}/vae"
    if where == "s3":
        storage.upload_dir(tiny_vae, vae)
    index = run_shards(ShardsConfig(src=str(photos), out=f"{root}/shards", samples_per_shard=4, class_from="folder"))
    assert index["totals"] == {"seen": 10, "written": 10, "skipped": {}}
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]

    man = run_encode(
        EncodeConfig(
            input=f"{root}/shards/shard-{{000000..000002}}.tar",
            output=f"{root}/latents",
            vae=vae,
            resolution=64,
            batch_size=3,
        )
    )
    assert man["totals"] == {"seen": 10, "written": 10, "skipped": {}}
    assert man["latent_shape"] == [4, 16, 16] and man["scale"] == 1.0
    assert [s["name"] for s in man["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest.load(f"{root}/latents") == man

    samples = [
        s
        for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
        for s in _read_shard(f"{root}/latents/{name}")
    ]
    keys = sorted(s.key for s in samples)
    assert keys == sorted(rels_to_keys(rels))
    first = samples[0]
    assert set(first.fields) >= {"latent.npy", "std.npy", "json", "cls"}
    arr = np.load(io.BytesIO(first.fields["latent.npy"]), allow_pickle=False)
    assert arr.shape == (4, 16, 16) and arr.dtype == np.float16
    meta = json.loads(first.fields["json"])
    assert meta["original_size"] == [64, 64] and meta["crop_box"] == [0, 0, 64, 64]
    caption = next(s for s in samples if s.key == "a__img_000")
    assert caption.fields["txt"] == b"a caption"

    # readable by ray.data.read_webdataset (through pyarrow's S3 client on the endpoint)
    import ray.data

    fs = None
    paths = [f"{root}/latents/shard-00000{i}.tar" for i in range(3)]
    if where == "s3":
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("//")[1],
            scheme="http",
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        )
        paths = [p[len("s3://") :] for p in paths]
    rows = ray.data.read_webdataset(paths, filesystem=fs, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    if where == "local":  # and by webdataset itself
        import webdataset as wds

        ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
        assert sorted(s["__key__"] for s in ds) == sorted(keys)


def rels_to_keys(rels):
    from pipeline.stages.shards import make_key

    return [make_key(r) for r in rels]


def _png_shard(path, images):
    write_tar(path, [(f"k{i:02d}.png", encode_image(im, "PNG")) for i, im in enumerate(images)])


def test_stored_means_equal_builtin_encoder_output(tmp_path, ray_cluster, tiny_vae):
    images = photo_crops(6, 64, seed=5)
    _png_shard(str(tmp_path / "in.tar"), images)
    run_encode(
        EncodeConfig(
            input=str(tmp_path / "in.tar"), output=str(tmp_path / "lat"), vae=tiny_vae, resolution=64, batch_size=4
        )
    )
    vae = autoencoder.load(tiny_vae)
    x = torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in images]))
    post = vae.encode(x)
    stored = {s.key: s for s in _read_shard(str(tmp_path / "lat" / "in.tar"))}
    for i in range(len(images)):
        mean = np.load(io.BytesIO(stored[f"k{i:02d}"].fields["latent.npy"]))
        std = np.load(io.BytesIO(stored[f"k{i:02d}"].fields["std.npy"]))
        np.testing.assert_allclose(mean.astype(np.float32), post.mean[i].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(std.astype(np.float32), post.std[i].numpy(), rtol=2e-3, atol=2e-3)


def test_encode_tasks_run_with_passive_openmp_unless_the_user_sets_it(tmp_path, ray_cluster, monkeypatch):
    """Spinning OpenMP threads would take the decode threads' cores (bench/encode.py)."""
    import ray

    from pipeline.stages import encode

    cfg = EncodeConfig(input=str(tmp_path / "in.tar"), output=str(tmp_path / "lat"), vae="v", num_cpus=1)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = ray.remote(lambda: os.environ.get("OMP_WAIT_POLICY")).options(**encode.task_options(cfg))
    assert ray.get(seen.remote()) == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "runtime_env" not in encode.task_options(cfg)  # the user's own setting is left alone


def test_stored_means_equal_diffusers_autoencoderkl_output(tmp_path, ray_cluster):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae_dir = str(tmp_path / "diffusers-vae")
    model.save_pretrained(vae_dir, safe_serialization=True)
    images = photo_crops(4, 64, seed=7)
    _png_shard(str(tmp_path / "in.tar"), images)
    man = run_encode(
        EncodeConfig(
            input=str(tmp_path / "in.tar"), output=str(tmp_path / "lat"), vae=vae_dir, resolution=64, batch_size=4
        )
    )
    assert (man["encoder"]["kind"], man["scale"], man["shift"]) == ("diffusers", 0.5, 0.1)
    assert man["latent_shape"] == [4, 32, 32]
    x = torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in images]))
    with torch.no_grad():
        ref = model.eval().encode(x).latent_dist.mean
    stored = {s.key: s for s in _read_shard(str(tmp_path / "lat" / "in.tar"))}
    for i in range(len(images)):
        mean = np.load(io.BytesIO(stored[f"k{i:02d}"].fields["latent.npy"]))
        np.testing.assert_allclose(mean.astype(np.float32), ref[i].numpy(), rtol=2e-3, atol=2e-3)


def test_bad_input_corpus(tmp_path, ray_cluster, tiny_vae):
    members, expect = bad_input_members()
    write_tar(str(tmp_path / "bad-000.tar"), members)
    good = [(f"ok{i}.png", encode_image(im)) for i, im in enumerate(photo_crops(3, 64))]
    write_tar(str(tmp_path / "bad-001.tar"), good)
    raw = bytearray((tmp_path / "bad-001.tar").read_bytes())
    hdr = _member_offsets(bytes(raw))[2]
    raw[hdr + 100 : hdr + 108] = b"corrupt!"  # break the third member's header checksum
    (tmp_path / "bad-001.tar").write_bytes(bytes(raw))

    out = tmp_path / "out"
    man = run_encode(
        EncodeConfig(
            input=str(tmp_path / "bad-*.tar"),
            output=str(out),
            vae=tiny_vae,
            resolution=64,
            min_size=16,
            max_pixels=4096 * 4096,
            max_error_rate=1.0,  # most of this corpus is meant to be skipped
        )
    )
    tot = man["totals"]
    assert tot["seen"] == tot["written"] + sum(tot["skipped"].values())
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert len(errors) == sum(tot["skipped"].values())
    assert all(e["reason"] and e["shard"] for e in errors)
    by_key = {}
    for e in errors:
        by_key.setdefault(e["key"], []).append(e["reason"])
    for key, outcome in expect.items():
        if outcome is not None:
            assert outcome in by_key.get(key, []), (key, outcome, by_key.get(key))
    assert by_key["dup"] == ["duplicate_key"]  # the first 'dup' was encoded, the repeat skipped
    # the third header is broken: ok1, being read when the tar broke, may be partial, and the rest
    # is one record
    bad1 = [(e["key"], e["reason"]) for e in errors if e["shard"] == "bad-001.tar"]
    assert bad1 == [("ok1", "corrupt_tar"), (None, "corrupt_tar")]
    written = {s.key for name in ("bad-000.tar", "bad-001.tar") for s in _read_shard(str(out / name))}
    assert written == {k for k, v in expect.items() if v is None} | {"ok0"}
    assert tot["written"] == len(written)
    exif = next(s for s in _read_shard(str(out / "bad-000.tar")) if s.key == "exif")
    assert json.loads(exif.fields["json"])["original_size"] == [48, 64]  # rotated by EXIF
    # nothing escaped the output root
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert outside == ["bad-000.tar", "bad-001.tar", "out"]
    assert not (tmp_path / "escape.latent.npy").exists()
    assert sorted(os.listdir(out)) == [
        "_errors.jsonl",
        "_manifest.json",
        "_settings.json",
        "_shards",
        "bad-000.tar",
        "bad-001.tar",
    ]


def _member_offsets(data: bytes) -> list[int]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [m.offset for m in t.getmembers()]


def test_rerun_skips_done_and_refuses_other_settings(tmp_path, ray_cluster, tiny_vae, caplog):
    _png_shard(str(tmp_path / "a.tar"), photo_crops(3, 64))
    _png_shard(str(tmp_path / "b.tar"), photo_crops(3, 64, seed=1))
    cfg = EncodeConfig(input=str(tmp_path / "*.tar"), output=str(tmp_path / "lat"), vae=tiny_vae, resolution=64)
    run_encode(cfg)
    mtimes = {n: os.stat(tmp_path / "lat" / n).st_mtime_ns for n in ("a.tar", "b.tar")}
    caplog.set_level(logging.INFO, logger="pipeline")
    caplog.clear()
    man = run_encode(cfg)
    assert "2 already done, 0 to encode" in caplog.messages[0]
    assert {n: os.stat(tmp_path / "lat" / n).st_mtime_ns for n in mtimes} == mtimes
    assert man["totals"]["written"] == 6
    with pytest.raises(ConfigError, match="other settings"):
        run_encode(EncodeConfig(input=cfg.input, output=cfg.output, vae=tiny_vae, resolution=32))
    # --overwrite redoes everything
    cfg.overwrite = True
    caplog.clear()
    run_encode(cfg)
    assert "0 already done, 2 to encode" in caplog.messages[0]


def test_inspect_summarises_each_kind(tmp_path, ray_cluster, tiny_vae):
    photos = tmp_path / "photos"
    write_photo_folder(str(photos), n=4)
    run_shards(ShardsConfig(src=str(photos), out=str(tmp_path / "shards")))
    run_encode(
        EncodeConfig(
            input=str(tmp_path / "shards" / "*.tar"), output=str(tmp_path / "lat"), vae=tiny_vae, resolution=64
        )
    )
    lat = inspect(InspectConfig(str(tmp_path / "lat"), verify=True))
    assert lat["kind"] == "latent-dataset" and lat["totals"]["written"] == 4
    assert lat["stored_arrays"]["latent.npy"] == {"shape": [4, 16, 16], "dtype": "float16"}
    shards = inspect(InspectConfig(str(tmp_path / "shards")))
    assert shards["kind"] == "image-shards" and shards["samples"] == 4
    ckpt = inspect(InspectConfig(tiny_vae))
    assert lat["verified_shards"] == 1
    assert (ckpt["kind"], ckpt["model_kind"]) == ("checkpoint", "autoencoder") and ckpt["model"]["latent_channels"] == 4


# --------------------------------------------------------------------------- killed jobs


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory, tiny_vae):
    """Shards big enough that a job takes several seconds, and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("slow")
    for i in range(8):
        _png_shard(str(root / f"in-{i:03d}.tar"), photo_crops(12, 128, seed=100 + i))
    return root


def _reference(slow_job, tiny_vae):
    ref = slow_job / "reference"
    if not (ref / "_manifest.json").exists():
        run_encode(
            EncodeConfig(input=str(slow_job / "in-*.tar"), output=str(ref), vae=tiny_vae, resolution=128, batch_size=2)
        )
    return ref


def _start_cli(slow_job, out, tiny_vae, ray_address):
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "encode",
        "--input",
        str(slow_job / "in-*.tar"),
        "--output",
        str(out),
        "--vae",
        tiny_vae,
        "--resolution",
        "128",
        "--batch-size",
        "2",
        "--max-in-flight",
        "2",
        "--ray-address",
        ray_address,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class _Watcher(threading.Thread):
    """Polls the output while a job runs: every visible shard must equal the reference's bytes."""

    def __init__(self, out, ref):
        super().__init__(daemon=True)
        self.out, self.ref, self.stop, self.bad, self.checks = out, ref, False, [], 0

    def run(self):
        while not self.stop:
            if self.out.exists():
                for name in os.listdir(self.out):
                    if name.endswith(".tar"):
                        data = (self.out / name).read_bytes()
                        if data != (self.ref / name).read_bytes():
                            self.bad.append(name)
                        self.checks += 1
            time.sleep(0.05)


def _wait_for_records(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        d = out / "_shards"
        if d.exists() and len([f for f in os.listdir(d) if f.endswith(".json")]) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("job made no progress")


def _assert_same_as_reference(out, ref):
    names = sorted(n for n in os.listdir(ref) if n.endswith(".tar"))
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == names
    for n in names:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    a, b = json.loads((out / "_manifest.json").read_text()), json.loads((ref / "_manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["totals"] == b["totals"]


def test_killed_worker_is_retried_and_output_identical(slow_job, tiny_vae, ray_cluster):
    import psutil

    ref = _reference(slow_job, tiny_vae)
    out = slow_job / "killed-worker"
    watcher = _Watcher(out, ref)
    watcher.start()
    proc = _start_cli(slow_job, out, tiny_vae, ray_cluster)
    _wait_for_records(out, 1, proc)
    deadline = time.time() + 60
    while True:  # a worker busy with a later shard (between tasks its title is ray::IDLE)
        titles = [(p, " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["cmdline"])]
        victims = [p for p, title in titles if "ray::encode_shard" in title]
        if victims:
            break
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"no encode worker process found while the job ran:\n{proc.communicate()[0]}")
        time.sleep(0.01)
    victims[0].send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    watcher.stop = True
    watcher.join()
    assert proc.returncode == 0, output
    assert not watcher.bad and watcher.checks > 0
    _assert_same_as_reference(out, ref)


def test_killed_driver_resumes_and_output_identical(slow_job, tiny_vae, ray_cluster):
    ref = _reference(slow_job, tiny_vae)
    out = slow_job / "killed-driver"
    watcher = _Watcher(out, ref)
    watcher.start()
    proc = _start_cli(slow_job, out, tiny_vae, ray_cluster)
    _wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_manifest.json").exists()
    done_before = len(os.listdir(out / "_shards"))
    assert done_before < 8
    proc = _start_cli(slow_job, out, tiny_vae, ray_cluster)
    output, _ = proc.communicate(timeout=300)
    watcher.stop = True
    watcher.join()
    assert proc.returncode == 0, output
    assert f"{done_before} already done" in output or "already done" in output
    assert not watcher.bad
    _assert_same_as_reference(out, ref)


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs: a real device that fills up (needs root, as CI and these machines run)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_the_job_in_one_line_saying_so(tmp_path, ray_cluster, tiny_vae, small_disk, capsys):
    from pipeline import cli

    for s in range(3):
        crops = photo_crops(12, 64, seed=s)
        write_tar(str(tmp_path / f"in-{s}.tar"), [(f"k{s}_{i}.png", encode_image(im)) for i, im in enumerate(crops)])
    argv = ["encode", "--input", str(tmp_path / "in-*.tar"), "--output", str(small_disk / "lat"), "--vae", tiny_vae]
    rc = cli.main([*argv, "--resolution", "64", "--latent-dtype", "float32"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == 1 and len(lines) == 1 and "no space left on the device" in lines[0], err
    assert "Traceback" not in err and "RayTaskError" not in err and "re-run the same command" not in err


def test_a_run_whose_output_another_run_took_over_stops_with_that_one_line(tmp_path, ray_cluster, tiny_vae, capsys):
    """Every task of a run that lost its output to another run's settings refuses to commit; the
    driver then ends with that refusal (exit 2), not with Ray's fragments and a re-run advice."""
    from pipeline.stages import encode
    from pipeline.stages.encode_worker import EncodePlan

    for s in range(2):
        write_tar(str(tmp_path / f"in-{s}.tar"), [(f"k{s}.png", encode_image(photo_crops(1, 32, seed=s)[0]))])
    cfg = EncodeConfig(input=str(tmp_path / "in-*.tar"), output=str(tmp_path / "lat"), vae=tiny_vae, resolution=32)
    storage.write_json(str(tmp_path / "lat" / encode.SETTINGS_NAME), {"fingerprint": "the-other-run"})
    todo = encode.shard_pairs(cfg)
    with pytest.raises(ConfigError, match="taken over by an encode run with other settings"):
        encode._encode_shards(cfg, todo, len(todo), 0, EncodePlan("this-run", None, []))
    assert not (tmp_path / "lat" / "in-0.tar").exists() and not (tmp_path / "lat" / "in-1.tar").exists()
