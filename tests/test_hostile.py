"""Hostile and careless input, one test (or more) per class of defect: no lost inputs, no writes
around the inputs, no leaked secrets, no hangs, one clear line per mistake.

Most cases are refused on the driver before any Ray work, so most tests here need no Ray.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import add_member, encode_image, photo_crops, tiny_diffusion_checkpoint, write_photo_folder, write_tar
from pipeline import cli
from pipeline.config import ConfigError, from_dict, public_dict
from pipeline.io import imaging, storage, tarshards
from pipeline.io.manifest import ManifestError
from pipeline.models import autoencoder
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.restore import RestoreConfig, _existing_outputs, list_inputs, output_name
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.train.diffusion import TrainConfig


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the console script in-process: (exit code, stderr)."""
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    """The run ends in exactly one error line (progress lines may come before it), no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("latent-pipeline ") and ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "vae")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], path)
    return path


@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory):
    return tiny_diffusion_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "gen"), num_classes=2)


# --------------------------------------------------------------------------- 1. outputs around inputs


def test_an_output_equal_to_inside_or_around_an_input_is_refused_and_the_input_untouched(tmp_path, capsys, vae_dir):
    d = tmp_path / "data"
    write_photo_folder(str(d), n=2)
    write_tar(str(d / "shard-000000.tar"), [("k.png", encode_image(photo_crops(1, 32)[0]))])
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    cases = [
        ("encode", "--input", f"{d}/shard-*.tar", "--output", str(d), "--vae", vae_dir),
        ("encode", "--input", f"{d}/shard-000000.tar", "--output", str(tmp_path), "--vae", vae_dir),
        ("restore", "--input", str(d), "--output", str(d), "--checkpoint", vae_dir, "--overwrite"),
        ("restore", "--input", str(d), "--output", str(d / "restored"), "--checkpoint", vae_dir),
        ("shards", str(d), str(d / "shards")),
        ("train", "--latents", str(d), "--output", str(d / "run")),
        ("eval", "--images", str(d), "--out", str(d / "e"), "--checkpoint", vae_dir),
        ("sample", "--checkpoint", str(d), "--out", str(d / "x.png")),
    ]
    for argv in cases:
        rc, err = _cli(capsys, *argv)
        line = _one_line(err)
        assert rc == 2 and "overlaps option" in line, (argv, line)
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == before
    assert not (d / "restored").exists() and not (d / "shards").exists()
    # object-store prefixes are compared the same way
    with pytest.raises(ConfigError, match="overlaps"):
        from_dict(EncodeConfig, {"input": "s3://b/img/*.tar", "output": "s3://b/img", "vae": "s3://b/vae"})
    # a separate folder beside the inputs is fine
    from_dict(EncodeConfig, {"input": f"{d}/shard-*.tar", "output": str(d / "latents"), "vae": vae_dir})


@pytest.mark.timeout(120)
def test_image_training_without_a_readable_image_fails_in_one_line_before_any_worker(tmp_path, capsys):
    """Before: train-refiner waited forever for a crop, and an empty held-out set failed inside a
    Ray Train worker with a traceback."""
    junk, ok = str(tmp_path / "junk.tar"), str(tmp_path / "ok.tar")
    write_tar(junk, [("a.txt", b"no image here"), ("b.jpg", b"not a jpeg")])
    write_tar(ok, [(f"k{i}.png", encode_image(im)) for i, im in enumerate(photo_crops(2, 32))])
    for verb in ("train-refiner", "train-vae"):
        task = ("--task", "upscale2") if verb == "train-refiner" else ()
        for images, heldout, what in ((junk, ok, "training shard"), (ok, junk, "held-out shard")):
            argv = (verb, *task, "--images", images, "--heldout", heldout, "--output", str(tmp_path / "o"))
            rc, err = _cli(capsys, *argv)
            assert rc == 2 and f"no readable image in the 1 {what}" in _one_line(err), (argv, err)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 2. relative paths


def test_relative_local_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(TrainConfig, {"latents": "lat", "output": "run", "vae": "v", "init_from": "old/ck"})
    assert (cfg.latents, cfg.output, cfg.vae, cfg.init_from) == tuple(
        str(tmp_path / p) for p in ("lat", "run", "v", "old/ck")
    )
    enc = from_dict(EncodeConfig, {"input": "a/*.tar,b/x.tar", "output": "o", "vae": "s3://bucket/vae"})
    assert enc.input == f"{tmp_path}/a/*.tar,{tmp_path}/b/x.tar" and enc.vae == "s3://bucket/vae"
    assert from_dict(RestoreConfig, {"input": "i", "output": "o", "checkpoint": "c"}).output == str(tmp_path / "o")


# --------------------------------------------------------------------------- 3. secrets


@pytest.mark.parametrize(
    "text",
    [
        "s3://AKIAXX:se/cr@t+x@bucket/path/shard.tar",
        "failed to read https://user:p%40ss/w0rd@host:9000/b/k",
        "endpoint key:s3cr/et@minio.local:9000/bucket",
    ],
)
def test_redact_removes_passwords_whatever_their_characters(text):
    out = storage.redact(text)
    assert "***@" in out
    for secret in ("se/cr@t+x", "p%40ss/w0rd", "s3cr/et"):
        assert secret not in out


def test_url_passwords_with_spaces_or_quotes_are_redacted_once_given_as_options(tmp_path):
    cfg = from_dict(
        RestoreConfig,
        {"input": 'https://me:"my pass"@host/in', "output": "sftp://me:two words@host/out", "checkpoint": "c"},
    )
    for line in (f"cannot read {cfg.input}", f"cannot write {cfg.output}/x.png"):
        out = storage.redact(line)
        assert "my pass" not in out and "two words" not in out, out
    assert storage.redact("a pass word") == "a pass word"  # an ordinary message is left as it is


def test_overlap_check_knows_object_store_scheme_aliases():
    with pytest.raises(ConfigError, match="overlaps"):
        storage.check_separate("s3a://bucket/in/out", {"input": "s3://bucket/in"})
    with pytest.raises(ConfigError, match="overlaps"):
        storage.check_separate("gcs://b/data", {"input": "gs://b/data/*.tar"})
    storage.check_separate("s3a://bucket/out", {"input": "s3://bucket/in"})  # separate: fine


def test_secrets_reach_no_recorded_config_and_no_error_line(tmp_path, capsys, vae_dir):
    so = {"key": "AKIAEXAMPLE", "secret": "wJalr/XUtn@FEMI+K7MDENG", "client_kwargs": {"endpoint_url": "http://x"}}
    cfg = from_dict(
        EncodeConfig,
        {
            "input": "https://me:hunter2%2Fx@host/in/x.tar",
            "output": str(tmp_path / "o"),
            "vae": vae_dir,
            "storage_options": so,
        },
    )
    recorded = json.dumps(public_dict(cfg))
    assert "hunter2" not in recorded and "wJalr" not in recorded and "storage" not in recorded
    assert "***" not in recorded and '"https://host/in/x.tar"' in recorded  # stored true, without user-info
    # a registered secret is removed from any message, wherever it appears
    assert storage.redact(f"error: bad signature for {so['secret']}") == "error: bad signature for ***"
    rc, err = _cli(capsys, "inspect", f"{tmp_path}/nothing", "--storage-options", json.dumps(so))
    assert rc == 2 and "wJalr" not in err
    _one_line(err)


def test_a_bad_bucket_url_with_credentials_is_reported_without_them(capsys, s3_endpoint):
    rc, err = _cli(capsys, "inspect", "s3://someone:t0p/s3cret@no-such-bucket-x/prefix")
    line = _one_line(err)
    assert rc != 0 and "t0p/s3cret" not in line and "s3cret" not in line


# --------------------------------------------------------------------------- 4. runs that share an output


def test_a_commit_is_refused_once_another_run_owns_the_output(tmp_path, vae_dir):
    from pipeline.stages import encode, encode_worker

    write_tar(str(tmp_path / "a.tar"), [(f"k{i}.png", encode_image(im)) for i, im in enumerate(photo_crops(2, 32))])
    cfg = from_dict(
        EncodeConfig,
        {"input": str(tmp_path / "a.tar"), "output": str(tmp_path / "o"), "vae": vae_dir, "resolution": 32},
    )
    storage.write_json(str(tmp_path / "o" / encode.SETTINGS_NAME), {"fingerprint": "another-run"})
    with pytest.raises(ConfigError, match="taken over"):
        encode_worker.encode_shard(
            cfg,
            str(tmp_path / "a.tar"),
            str(tmp_path / "o" / "a.tar"),
            str(tmp_path / "o" / "_shards" / "a.tar.json"),
            encode_worker.EncodePlan("this-run", None, []),
        )
    assert not (tmp_path / "o" / "a.tar").exists() and not (tmp_path / "o" / "_shards").exists()


def test_readers_refuse_a_dataset_whose_shards_differ_from_the_manifest(tmp_path, ray_cluster, vae_dir):
    from pipeline.stages.encode import run_encode
    from pipeline.stages.inspect import InspectConfig, inspect

    for name, seed in (("a", 0), ("b", 1)):
        write_tar(
            str(tmp_path / f"{name}.tar"),
            [(f"{name}{i}.png", encode_image(im)) for i, im in enumerate(photo_crops(2, 32, seed=seed))],
        )
    run_encode(
        from_dict(
            EncodeConfig,
            {"input": str(tmp_path / "a.tar"), "output": str(tmp_path / "lat"), "vae": vae_dir, "resolution": 32},
        )
    )
    run_encode(
        from_dict(
            EncodeConfig,
            {"input": str(tmp_path / "a.tar"), "output": str(tmp_path / "lat16"), "vae": vae_dir, "resolution": 16},
        )
    )
    assert inspect(InspectConfig(str(tmp_path / "lat"), verify=True))["verified_shards"] == 1
    # another run's shard (another resolution) put in place of this one: the shapes and hashes lie
    (tmp_path / "lat" / "a.tar").write_bytes((tmp_path / "lat16" / "a.tar").read_bytes())
    with pytest.raises(ManifestError, match="latent shape"):
        inspect(InspectConfig(str(tmp_path / "lat")))
    from pipeline.train.streams import latent_stream

    stream = iter(latent_stream(str(tmp_path / "lat"), batch_size=2, shuffle_buffer=1))
    with pytest.raises(ManifestError, match="the manifest says"):
        next(stream)
    stream.close()


# --------------------------------------------------------------------------- 5. collisions


def test_inputs_that_would_share_an_output_name_are_error_rows(tmp_path):
    im = photo_crops(1, 32)[0]
    im.save(tmp_path / "dup.png")
    im.save(tmp_path / "dup.jpg")
    im.save(tmp_path / "solo.jpg")
    cfg = RestoreConfig(input=str(tmp_path), output=str(tmp_path.parent / "out-collide"), checkpoint="ck")
    items, errors = list_inputs(cfg)
    assert [i["rel"] for i in items] == ["solo.jpg"]
    assert sorted((e["key"], e["reason"]) for e in errors) == [
        ("dup.jpg", "output_name_collision"),
        ("dup.png", "output_name_collision"),
    ]
    same = RestoreConfig(input=str(tmp_path), output=str(tmp_path.parent / "out-same"), checkpoint="ck", format="same")
    assert sorted(i["rel"] for i in list_inputs(same)[0]) == ["dup.jpg", "dup.png", "solo.jpg"]


# --------------------------------------------------------------------------- 6. the decoder allow-list


def test_postscript_named_png_never_reaches_a_non_allowed_decoder():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(imaging.BadImage) as err:
        imaging.decode(eps)
    assert err.value.reason == "not_an_image"
    gif = encode_image(photo_crops(1, 16)[0], "GIF")
    with pytest.raises(imaging.BadImage):
        imaging.decode(gif)
    assert imaging.decode(encode_image(photo_crops(1, 16)[0], "PNG")).size == (16, 16)


# --------------------------------------------------------------------------- 7. tar bombs


def test_samples_and_shards_over_the_byte_caps_are_skipped_with_a_reason():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for ext in ("a", "b", "c"):
            add_member(tar, f"big.{ext}", b"x" * 4000)  # each member under the cap, the sample over it
        add_member(tar, "small.png", b"y" * 100)
    samples = list(tarshards.iter_samples(io.BytesIO(buf.getvalue()), max_member_bytes=5000, max_sample_bytes=9000))
    assert [(s.key, s.error) for s in samples] == [("big", "sample_too_large"), ("small", None)]
    assert samples[0].fields == {}
    capped = list(tarshards.iter_samples(io.BytesIO(buf.getvalue()), max_shard_bytes=6000))
    assert [s.error for s in capped] == ["shard_too_large"]


# --------------------------------------------------------------------------- 8. the download cache


def test_the_remote_cache_follows_content_and_is_private(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_PIPELINE_CACHE", str(tmp_path / "cache"))
    storage.write_bytes(f"{bucket}/m/weights.bin", b"old weights")
    first = storage.download_dir(f"{bucket}/m")
    assert open(os.path.join(first, "weights.bin"), "rb").read() == b"old weights"
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700
    storage.write_bytes(f"{bucket}/m/weights.bin", b"new weights!")
    second = storage.download_dir(f"{bucket}/m")
    assert second != first and open(os.path.join(second, "weights.bin"), "rb").read() == b"new weights!"
    os.chmod(tmp_path / "cache", 0o777)  # a folder others could pre-seed is not trusted
    with pytest.raises(PermissionError, match="not private"):
        storage.download_dir(f"{bucket}/m")


# --------------------------------------------------------------------------- 9. requests that would hang


def test_requests_the_cluster_can_never_schedule_are_refused(ray_cluster, capsys, tmp_path, diffusion_ckpt):
    from pipeline.ray_setup import check_fits

    with pytest.raises(ConfigError, match="'actors'"):
        check_fits(cpus=1.0, gpus=0.0, count=50, options=("cpus_per_actor", "gpus_per_actor", "actors"))
    with pytest.raises(ConfigError, match=r"'num-gpus'.*GPU"):
        check_fits(cpus=1.0, gpus=1.0)
    with pytest.raises(ConfigError, match="max-in-flight"):
        from_dict(EncodeConfig, {"input": "a", "output": "b", "vae": "c", "max_in_flight": -1})
    (tmp_path / "in").mkdir()
    photo_crops(1, 32)[0].save(tmp_path / "in" / "a.png")
    rc, err = _cli(
        capsys,
        "restore",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "o"),
        "--checkpoint",
        diffusion_ckpt,
        "--task",
        "restore",
        "--actors",
        "50",
    )
    assert rc == 2 and "'actors'" in _one_line(err)


# --------------------------------------------------------------------------- 10. one line, never a traceback


def test_every_mistake_ends_in_one_line_naming_it(tmp_path, capsys, vae_dir, diffusion_ckpt):
    (tmp_path / "tag.yaml").write_text("input: !!python/object/apply:os.system ['touch pwned']\n")
    (tmp_path / "bad.yaml").write_text("input: [unclosed\n")
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "afile").write_text("x")
    photo_crops(1, 32)[0].save(tmp_path / "img.png")
    cases = [
        (["encode", "--config", str(tmp_path / "tag.yaml")], "not valid YAML"),
        (["encode", "--config", str(tmp_path / "bad.yaml")], "not valid YAML"),
        (["encode", "--config", str(tmp_path / "cfgdir")], "cfgdir"),
        (["sample", "--checkpoint", diffusion_ckpt, "--out", str(tmp_path / "s.png"), "--class", "99"], "'class'"),
        (["sample", "--checkpoint", vae_dir, "--out", str(tmp_path / "s.png")], "not a diffusion checkpoint"),
        (["sample", "--checkpoint", str(tmp_path / "cfgdir"), "--out", str(tmp_path / "s.png")], "no checkpoint"),
        (
            [
                "restore",
                "--input",
                str(tmp_path / "img.png"),
                "--output",
                str(tmp_path / "r"),
                "--checkpoint",
                f"{diffusion_ckpt}/vae",
            ],
            "not a diffusion checkpoint",
        ),
        (["restore", "--input", "i", "--output", "o", "--checkpoint", "c", "--gpus-per-actor", "-1"], "gpus-per-actor"),
        (["restore", "--input", "i", "--output", "o", "--checkpoint", "c", "--actors", "-3"], "'actors'"),
        (["restore", "--input", "i", "--output", "o", "--checkpoint", "c", "--gain", "nan"], "'gain'"),
        (["restore", "--input", "i", "--output", "o", "--checkpoint", "c", "--sampler", "bogus"], "'sampler'"),
        (["encode", "--input", "i", "--output", "o", "--vae", "v", "--max-pixels", "-1"], "max-pixels"),
        (["train", "--latents", "l", "--output", "o", "--lr", "nan"], "'lr'"),
        (["inspect", str(tmp_path / "nowhere")], "nowhere"),
        (
            [
                "encode",
                "--input",
                str(tmp_path / "img.png"),
                "--output",
                str(tmp_path / "afile" / "o"),
                "--vae",
                vae_dir,
            ],
            "not writable",
        ),
    ]
    for argv, expected in cases:
        rc, err = _cli(capsys, *argv)
        line = _one_line(err)
        assert rc == 2 and expected in line, (argv, line)
    assert not os.path.exists("pwned")
    # a damaged manifest or checkpoint: still one line
    lat = tmp_path / "lat"
    lat.mkdir()
    (lat / "_manifest.json").write_text("{not json")
    rc, err = _cli(capsys, "inspect", str(lat))
    assert rc == 2 and "_manifest.json" in _one_line(err)
    broken = tmp_path / "broken"
    tiny_diffusion_checkpoint(str(broken))
    (broken / "ema.safetensors").write_bytes(b"\x00" * 64)
    rc, err = _cli(capsys, "sample", "--checkpoint", str(broken), "--out", str(tmp_path / "s2.png"))
    assert rc == 2 and "damaged" in _one_line(err)
    # a damaged part (the bundled autoencoder's description) is refused by the driver's check,
    # before any actor would fail to load it
    part = tmp_path / "part"
    tiny_diffusion_checkpoint(str(part))
    (part / "vae" / "config.json").write_text('{"format": 1')
    write_photo_folder(str(tmp_path / "in"), n=1)
    rc, err = _cli(capsys, "restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "r"),
                   "--checkpoint", str(part))  # fmt: skip
    assert rc == 2 and "vae: config.json is not valid JSON" in _one_line(err), err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 11-12. exit codes


def test_a_job_that_writes_nothing_exits_non_zero_with_its_errors_kept(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.gif").write_bytes(encode_image(photo_crops(1, 16)[0], "GIF"))
    (src / "b.png").write_bytes(b"not a png")
    rc, err = _cli(capsys, "shards", str(src), str(tmp_path / "out"))
    assert rc == 1 and "none of the 2 files" in _one_line(err)
    errors = [json.loads(x) for x in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in errors) == ["not_an_allowed_image_format", "not_an_image"]


def test_restore_with_only_refused_inputs_fails_without_starting_ray(tmp_path, diffusion_ckpt, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.gif").write_bytes(b"GIF89a")
    (src / ".hidden.png").write_bytes(b"x")
    rc, err = _cli(
        capsys,
        "restore",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o"),
        "--checkpoint",
        diffusion_ckpt,
        "--task",
        "restore",
    )
    assert rc == 1 and "none of the 2 inputs it tried was written" in _one_line(err)
    report = json.loads((tmp_path / "o" / "_report.json").read_text())
    assert report["seen"] == 2 and report["errors_by_reason"] == {"hidden_file": 1, "not_an_allowed_image_format": 1}
    assert report["pool"] == 0 and report["task"] == "restore"


# --------------------------------------------------------------------------- 13. shards


def test_shards_records_unreadable_files_and_refuses_to_mix_with_an_earlier_run(tmp_path):
    src = tmp_path / "src"
    write_photo_folder(str(src), n=3)
    os.symlink(tmp_path / "gone.png", src / "dangling.png")  # listed, then unreadable
    cfg = ShardsConfig(src=str(src), out=str(tmp_path / "out"), samples_per_shard=2)
    index = run_shards(cfg)
    assert index["totals"] == {"seen": 5, "written": 3, "skipped": {"unreadable": 1}} or index["totals"]["seen"] == (
        index["totals"]["written"] + sum(index["totals"]["skipped"].values())
    )
    assert index["totals"]["written"] == 3 and "unreadable" in index["totals"]["skipped"]
    with pytest.raises(ConfigError, match="earlier run"):
        run_shards(cfg)
    cfg.overwrite, cfg.samples_per_shard = True, 3
    again = run_shards(cfg)
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.tar")) == ["shard-000000.tar"]
    assert again["totals"]["written"] == 3


# --------------------------------------------------------------------------- 14. resolution vs the autoencoder


def test_encode_refuses_a_resolution_the_autoencoder_cannot_divide(tmp_path, capsys, vae_dir):
    write_tar(str(tmp_path / "a.tar"), [("k.png", encode_image(photo_crops(1, 32)[0]))])
    rc, err = _cli(
        capsys,
        "encode",
        "--input",
        str(tmp_path / "a.tar"),
        "--output",
        str(tmp_path / "o"),
        "--vae",
        vae_dir,
        "--resolution",
        "9",
    )
    line = _one_line(err)
    assert rc == 2 and "'resolution'" in line and "multiple" in line
    assert not (tmp_path / "o" / "_manifest.json").exists()


# --------------------------------------------------------------------------- 15. everything seen is counted


def test_odd_names_and_non_images_are_counted_not_dropped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("_x.png", "ok.png"):
        photo_crops(1, 32)[0].save(src / name)
    (src / "..x.png").write_bytes(encode_image(photo_crops(1, 32)[0]))
    (src / "anim.gif").write_bytes(encode_image(photo_crops(1, 16)[0], "GIF"))
    index = run_shards(ShardsConfig(src=str(src), out=str(tmp_path / "out")))
    t = index["totals"]
    assert t["seen"] == 4 and t["written"] == 2
    assert t["skipped"] == {"hidden_file": 1, "not_an_allowed_image_format": 1}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("evil.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add_member(tar, "fine.png", b"data")
    samples = list(tarshards.iter_samples(io.BytesIO(buf.getvalue())))
    assert [(s.key, s.error) for s in samples] == [("evil", "not_a_regular_file"), ("fine", None)]


# --------------------------------------------------------------------------- 16. names


def test_long_names_bracketed_folders_formats_and_leftover_parts(tmp_path):
    long_name = "n" * 246 + ".png"  # 250 bytes: the temporary name must not add to it
    storage.write_bytes(str(tmp_path / long_name), b"data")
    assert (tmp_path / long_name).read_bytes() == b"data"
    folder = tmp_path / "photos [v1]"
    folder.mkdir()
    photo_crops(1, 32)[0].save(folder / "a.png")
    assert [r for _, r in storage.list_files(str(folder))] == ["a.png"]
    assert output_name("scan.tif", "same") == ("scan.tif", "TIFF")  # archives stay TIFF
    assert output_name("old.BMP", "same") == ("old.bmp", "BMP")
    assert output_name("noext", "same") == ("noext.png", "PNG")
    assert output_name("a/b.JPEG", "same") == ("a/b.jpeg", "JPEG")
    assert output_name("x.bmp", "webp") == ("x.webp", "WEBP")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.png.0123456789ab.part").write_bytes(b"half")
    cfg = RestoreConfig(input=str(folder), output=str(out), checkpoint="ck")
    assert _existing_outputs(cfg) == frozenset() and not list(out.glob("*.part")) and not list(out.glob(".*"))
    from pipeline.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint at or under"):
        autoencoder.load(str(tmp_path / "nothing-here"))


def test_vae_option_given_a_diffusion_checkpoint_says_what_it_is(diffusion_ckpt):
    from pipeline.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="is a diffusion checkpoint, not an autoencoder"):
        autoencoder.load(diffusion_ckpt)
    assert np.isfinite(autoencoder.load(f"{diffusion_ckpt}/vae").scale)
    assert Image.open(io.BytesIO(encode_image(photo_crops(1, 8)[0]))).size == (8, 8)


def test_review_findings_stay_fixed(tmp_path, ray_cluster):
    """A single file as input, a pool that would take every CPU, a section named like the verb."""
    from pipeline.config import from_args
    from pipeline.ray_setup import check_fits

    photo_crops(1, 16)[0].save(tmp_path / "one.png")
    assert storage.list_files(str(tmp_path / "one.png")) == [(str(tmp_path / "one.png"), "one.png")]
    cpus = int(__import__("ray").cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match="kept for reads"):  # one actor on every CPU deadlocks Ray Data
        check_fits(
            cpus=float(cpus),
            gpus=0.0,
            count=1,
            reserve_cpus=0.5,
            options=("cpus_per_actor", "gpus_per_actor", "actors"),
        )
    (tmp_path / "c.yaml").write_text("train-vae:\n  images: a.tar\n  output: out\n  steps: 7\n")
    args = cli.build_parser().parse_args(["train-vae", "--config", str(tmp_path / "c.yaml")])
    from pipeline.train.autoencoder import VAETrainConfig

    assert from_args(VAETrainConfig, args, section="train_vae").steps == 7


# --------------------------------------------------------------------------- a folder of shards as --input


def test_a_folder_of_shards_stands_for_its_shards_and_a_folder_without_any_is_one_line(tmp_path, capsys, vae_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("b.tar", "a.tar.gz", "c.tgz"):
        write_tar(str(shards / name), [("k.png", encode_image(photo_crops(1, 32)[0]))])
    (shards / "_index.json").write_text("{}")
    (shards / ".hidden.tar").write_bytes(b"")
    got = tarshards.expand_shards(str(shards), option="input")
    assert got == [str(shards / n) for n in ("a.tar.gz", "b.tar", "c.tgz")]
    # encode and restore read the same folder as its shards
    from pipeline.stages.encode import shard_pairs

    cfg = from_dict(EncodeConfig, {"input": str(shards), "output": str(tmp_path / "lat"), "vae": vae_dir})
    assert [n for _, n in shard_pairs(cfg)] == ["a.tar", "b.tar", "c.tar"]
    rcfg = from_dict(RestoreConfig, {"input": str(shards), "output": str(tmp_path / "r"), "checkpoint": vae_dir})
    items, errors = list_inputs(rcfg)
    assert [i["url"] for i in items] == got and errors == []
    # a folder of images is still a folder of images
    write_photo_folder(str(tmp_path / "photos"), n=2)
    pcfg = from_dict(
        RestoreConfig, {"input": str(tmp_path / "photos"), "output": str(tmp_path / "r"), "checkpoint": vae_dir}
    )
    assert all(i["rel"] for i in list_inputs(pcfg)[0])
    # a folder without shards: one line naming the option, and nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    out = tmp_path / "lat2"
    rc, err = _cli(capsys, "encode", "--input", str(empty), "--output", str(out), "--vae", vae_dir)
    line = _one_line(err)
    assert rc == 2 and "'input'" in line and "folder without shards" in line, line
    assert not out.exists()
    rc, err = _cli(capsys, "train-vae", "--images", str(empty), "--output", str(tmp_path / "v"), "--steps", "1")
    assert rc == 2 and "'images'" in _one_line(err)


def test_progress_totals_count_every_input_the_refused_ones_too(tmp_path, capsys):
    src = tmp_path / "src"
    write_photo_folder(str(src), n=4)
    (src / "notes.txt").write_text("not an image")
    (src / "scan.xcf").write_bytes(b"gimp")
    seen = 4 + 2  # the photos and the two files of other formats (a caption sidecar is no input)
    rc = cli.main(["shards", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    progress = [ln for ln in err.splitlines() if "[shards] images " in ln]
    assert rc == 0 and progress, err
    assert progress[-1].split()[2] == f"{seen}/{seen}", progress[-1]
    totals = json.loads((tmp_path / "out" / "_index.json").read_text())["totals"]
    assert totals["seen"] == seen and totals["written"] == 4


def _gzipped_tar_bomb(path: str, photos: list[Image.Image]) -> None:
    """A .tar.gz of a few KB on disk whose one member claims (and holds) 300 MB of zeros, beside
    real photos: the member is over the per-member cap of the readers."""
    import gzip

    size = tarshards.DEFAULT_MAX_MEMBER_BYTES + 44 * 1024 * 1024
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for i, im in enumerate(photos):
            data = encode_image(im)
            info = tarfile.TarInfo(f"ok{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.png")
        info.size = size
        tar.fileobj.write(info.tobuf(tarfile.GNU_FORMAT))  # the zeros go in pieces: never 300 MB held
        chunk = b"\0" * (1 << 20)
        for _ in range(size // len(chunk)):
            tar.fileobj.write(chunk)
        tar.offset += tarfile.BLOCKSIZE + size  # the member's bytes went straight to the stream


def test_a_gzipped_tar_bomb_is_one_skipped_sample_through_encode_and_restore(
    tmp_path, ray_cluster, vae_dir, diffusion_ckpt
):
    from pipeline.stages.encode import run_encode
    from pipeline.stages.restore import run_restore

    shard = tmp_path / "in" / "bomb.tar.gz"
    shard.parent.mkdir()
    _gzipped_tar_bomb(str(shard), photo_crops(2, 32))
    assert shard.stat().st_size < 2 * 1024 * 1024
    man = run_encode(
        from_dict(
            EncodeConfig, {"input": str(shard), "output": str(tmp_path / "lat"), "vae": vae_dir, "resolution": 32}
        )
    )
    assert man["totals"]["written"] == 2 and man["totals"]["skipped"] == {"member_too_large": 1}
    report = run_restore(
        from_dict(
            RestoreConfig,
            {
                "input": str(shard),
                "output": str(tmp_path / "r"),
                "checkpoint": diffusion_ckpt,
                "task": "upscale2",
                "actors": 1,
            },
        )
    )
    assert report["seen"] == 3 and report["written"] == 2, report
    assert report["errors_by_reason"] == {"member_too_large": 1}


def test_an_input_that_disappears_while_a_job_runs_is_an_error_row_not_a_lost_or_failed_batch(bucket, tmp_path):
    from pipeline.stages.restore import read_files, read_shard

    for i, im in enumerate(photo_crops(3, 32)):
        storage.write_bytes(f"{bucket}/in/img{i}.png", encode_image(im))
    write_tar(str(tmp_path / "s.tar"), [("k.png", encode_image(photo_crops(1, 32)[0]))])
    storage.put_file(str(tmp_path / "s.tar"), f"{bucket}/shards/s.tar")
    cfg = from_dict(RestoreConfig, {"input": f"{bucket}/in", "output": str(tmp_path / "r"), "checkpoint": "c"})
    items, errors = list_inputs(cfg)
    assert len(items) == 3 and errors == []
    storage.remove(f"{bucket}/in/img1.png")  # gone after the listing, before the read stage
    storage.write_bytes(f"{bucket}/in/img2.png", b"changed: not an image any more")
    batch = {"url": np.array([i["url"] for i in items]), "rel": np.array([i["rel"] for i in items])}
    out = read_files(batch, cfg, frozenset())
    assert out["rel"] == ["img0.png", "img1.png", "img2.png"]
    assert out["error"] == ["", "unreadable: FileNotFoundError", ""] and out["data"][0] and not out["data"][1]
    assert out["data"][2] == b"changed: not an image any more"  # read as it is now: the actor's decode refuses it
    storage.remove(f"{bucket}/shards/s.tar")
    rows = read_shard({"url": f"{bucket}/shards/s.tar"}, cfg, frozenset())
    assert [(r["rel"], r["error"]) for r in rows] == [("s", "unreadable: FileNotFoundError")]
