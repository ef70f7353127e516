"""Faults around a run: another Ray on the same machine, a stale Ray record, a killed training
job; and inputs that must end in one line before any work (``train --init-from``, ``sample
--out``/``--prompt``, ``inspect`` on what is no dataset)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from helpers import encode_image, photo_crops, tiny_diffusion_checkpoint, write_photo_folder, write_tar
from pipeline import cli
from pipeline.stages.shards import ShardsConfig, run_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIPLE = "multiple active Ray instances"


def _short_dir(prefix: str) -> str:
    """A short folder under /tmp: Ray's socket paths under it must stay below the 107-byte limit
    (pytest's tmp_path is too long)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _env(ray_tmpdir: str) -> dict[str, str]:
    """A child's environment: this checkout importable, Ray's temp folder (``RAY_TMPDIR``: its
    sessions and its ``ray_current_cluster`` record) its own, no cluster address inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=ROOT, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmpdir)
    return env


def _processes_using(ray_tmpdir: str) -> list[psutil.Process]:
    """Live processes started with this Ray temp folder (the CLI, its Ray head and workers)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_TMPDIR") == ray_tmpdir and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def _wait_gone(ray_tmpdir: str, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while (left := _processes_using(ray_tmpdir)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a child in its own process group; on timeout kill the whole group (the child and
    every Ray process under it, not only the child) and fail."""
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"{argv[3:5]} did not finish within {timeout}s: {(proc.stdout.read() if proc.stdout else '')}")
    return proc.returncode, out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


# --------------------------------------------------------------------------- another Ray on the machine

_OTHER_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
for line in sys.stdin:  # "jobs": how many drivers have connected to this cluster
    from ray._private.state import jobs
    print("JOBS", len(jobs()), flush=True)
"""


class OtherRay:
    """A second local Ray on this machine (its own process group and temp folder), as another
    user's run or another test session would have it."""

    def __init__(self) -> None:
        self.tmpdir = _short_dir("rfo")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _OTHER_RAY],
            env=_env(self.tmpdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("GCS "):
            _kill_group(self.proc)
            pytest.fail(f"the second Ray did not start: {line!r}")
        self.address = line.split()[1]

    def jobs(self) -> int:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("jobs\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()  # the driver leaves the loop and shuts its Ray down
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
        left = _wait_gone(self.tmpdir, 30)
        for p in left:
            p.kill()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        assert not left, f"the second Ray left processes behind: {left}"


@pytest.fixture(scope="module")
def other_ray():
    ray = OtherRay()
    yield ray
    ray.stop()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-imgs")
    write_photo_folder(str(root / "photos"), n=24, size=64)
    run_shards(ShardsConfig(src=str(root / "photos"), out=str(root / "shards"), samples_per_shard=8))
    return root / "shards"


@pytest.mark.ray  # starts Ray nodes of its own
def test_training_beside_another_local_ray_is_quiet_and_joins_it_not(other_ray, image_shards, tmp_path):
    jobs_before = other_ray.jobs()
    ray_tmp = _short_dir("rft")
    out = tmp_path / "vae"
    argv = _cli(
        "train-vae",
        "--images",
        str(image_shards / "shard-*.tar"),
        "--output",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--resolution",
        "32",
        "--checkpoint-every",
        "4",
        "--log-every",
        "2",
        "--warmup-steps",
        "1",
        "--eval-images",
        "4",
    )
    try:
        rc, output = _run(argv, _env(ray_tmp), timeout=300)
        assert rc == 0, output
        assert MULTIPLE not in output and "Traceback" not in output, output
        assert "finished step 4" in output
        assert (out / "run" / "checkpoint_00000004" / "config.json").exists()
        assert other_ray.jobs() == jobs_before  # the run started its own Ray
        assert not _wait_gone(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


_PROBE = """
import os, ray
from pipeline.ray_setup import ensure_ray
ensure_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def state_api_from_a_worker():
    from ray.util.state import list_nodes  # no address: Ray resolves the cluster itself
    return [n.node_id for n in list_nodes(timeout=30)]

print("GCS", ray.get_runtime_context().gcs_address, flush=True)
print("NODES", ray.get(state_api_from_a_worker.remote()) == [n["NodeID"] for n in ray.nodes()], flush=True)
"""


@pytest.mark.ray  # starts Ray nodes of its own
@pytest.mark.parametrize("record", ["dead", "other"])
def test_a_stale_ray_record_neither_hangs_a_run_nor_joins_a_cluster(other_ray, record):
    """``ray_current_cluster`` in Ray's temp folder names a head that crashed (a dead address) or
    another user's cluster: a run without an address starts its own Ray anyway, and its
    workers' State API look-ups (Ray Train's placement-group cleaner) find that Ray, though a
    second one runs on the machine."""
    ray_tmp = _short_dir("rfs")
    os.makedirs(os.path.join(ray_tmp, "ray"))
    stale = "127.0.0.1:9" if record == "dead" else other_ray.address
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(stale)
    jobs_before = other_ray.jobs()
    try:
        rc, output = _run([sys.executable, "-c", _PROBE], _env(ray_tmp), timeout=120)
        assert rc == 0, output
        lines = dict(line.split(" ", 1) for line in output.splitlines() if line.startswith(("GCS ", "NODES ")))
        assert lines["GCS"] not in (stale, other_ray.address)
        assert lines["NODES"] == "True", output
        assert MULTIPLE not in output, output
        assert other_ray.jobs() == jobs_before
        assert not _wait_gone(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- a killed training job


@pytest.mark.ray  # starts Ray nodes of its own
def test_killed_train_refiner_resumes_from_its_latest_checkpoint(image_shards, tmp_path):
    """kill -9 of the whole CLI process group (driver, its own Ray, the workers) in the middle of
    `train-refiner`; the same command again resumes from the latest checkpoint and finishes."""
    out = tmp_path / "refiner"
    argv = _cli(
        "train-refiner",
        "--images",
        str(image_shards / "shard-*.tar"),
        "--output",
        str(out),
        "--task",
        "upscale2",
        "--channels",
        "16",
        "--depth",
        "3",
        "--resolution",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "60",
        "--checkpoint-every",
        "10",
        "--log-every",
        "5",
        "--warmup-steps",
        "5",
        "--eval-images",
        "4",
    )
    ray_tmp = _short_dir("rfk")
    env = _env(ray_tmp)
    try:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 240
        while not (out / "run" / "checkpoint_00000020").exists():
            if proc.poll() is not None or time.time() > deadline:
                _kill_group(proc)
                log = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"no second checkpoint to interrupt at:\n{log}")
            time.sleep(0.05)
        killed_at = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not _wait_gone(ray_tmp), "the killed run left processes behind"
        assert not (out / "run" / "checkpoint_00000060").exists()
        before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert before and before[-1]["step"] < 60

        rc, output = _run(argv, env, timeout=300)
        assert rc == 0, output
        assert "finished step 60" in output and "Traceback" not in output, output
        assert (out / "run" / "checkpoint_00000060" / "config.json").exists()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)) and steps[-1] == 60  # one continuous history
        kept = [r["step"] for r in rows if r["time"] < killed_at]
        assert max(kept) >= 10, rows  # rows up to a checkpoint of the killed run kept: it resumed there
        assert not _wait_gone(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- one line before any work


def _one_error_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def captioned_latents(tmp_path_factory, ray_cluster):
    """A tiny captioned latent dataset: text width 32 (one stand-in CLIP encoder)."""
    from pipeline.models import autoencoder, text
    from pipeline.stages.encode import EncodeConfig, run_encode

    root = tmp_path_factory.mktemp("faults-t2i")
    vae = str(root / "vae")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], vae)
    words = ["a cat", "a moon", "a coin", "a brick"]
    enc = text.build_stand_in(str(root / "clip"), words, kind="clip", width=32, seed=1)
    members = []
    for i, im in enumerate(photo_crops(4, 32)):
        members += [(f"s{i:03d}.png", encode_image(im)), (f"s{i:03d}.txt", words[i].encode())]
    write_tar(str(root / "in.tar"), members)
    run_encode(
        EncodeConfig(input=str(root / "in.tar"), output=str(root / "lat"), vae=vae, resolution=32, text_encoder=[enc])
    )
    return root / "lat"


def test_init_from_of_another_text_width_is_refused_on_the_driver(captioned_latents, tmp_path, capsys):
    import torch

    from pipeline.io import checkpoint, manifest
    from pipeline.models import denoiser
    from pipeline.train.diffusion import TrainConfig, check_init_from

    man = manifest.load(str(captioned_latents))
    assert [te["identity"]["width"] for te in man["text_encoders"]] == [32]

    def checkpoint_of_width(name: str, width: int) -> str:
        path = tiny_diffusion_checkpoint(str(tmp_path / name))  # its autoencoder and description
        cfg = denoiser.config_for("tiny", text_dim=width, pooled_dim=width)
        info = checkpoint.read_info(path)
        info.model = denoiser.to_dict(cfg)
        torch.manual_seed(0)
        net = denoiser.build(cfg)
        checkpoint.save(path, info, {"model": net.state_dict(), "ema": net.state_dict()})
        return path

    same = checkpoint_of_width("same", 32)
    check_init_from(TrainConfig(latents=str(captioned_latents), output=str(tmp_path / "ok"), init_from=same), man)
    ckpt = checkpoint_of_width("wide", 48)
    out = tmp_path / "run"
    t0 = time.time()
    rc = cli.main(
        ["train", "--latents", str(captioned_latents), "--output", str(out), "--init-from", ckpt, "--steps", "2"]
    )
    line = _one_error_line(capsys, rc, "'init-from'", "text width 48 in the checkpoint, 32 for this run")
    assert "pooled text width 48" in line and "text encoders" in line
    assert time.time() - t0 < 30  # refused on the driver, not by a worker after its start-up
    assert not out.exists()


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    return tiny_diffusion_checkpoint(str(tmp_path_factory.mktemp("faults-ckpt") / "ckpt"))


def test_sample_into_an_existing_folder_is_refused_before_any_sampling(sample_ckpt, tmp_path):
    folder = tmp_path / "grids"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    # 4096 samples of 10000 steps would run for hours: only an up-front refusal ends in time
    argv = _cli("sample", "--checkpoint", sample_ckpt, "--out", str(folder), "-n", "4096", "--steps", "10000")
    rc, output = _run(argv, _env(str(tmp_path / "no-ray")), timeout=90)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, output
    assert "'out'" in lines[0] and str(folder) in lines[0] and "folder" in lines[0]
    assert ".part" not in lines[0]
    assert sorted(os.listdir(folder)) == ["keep.txt"]


def test_sample_refuses_a_prompt_that_is_not_utf8(sample_ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    prompt = os.fsdecode(b"caf\xe9")  # a Latin-1 byte in argv: Python hands it over as a lone surrogate
    rc = cli.main(["sample", "--checkpoint", sample_ckpt, "--out", str(out), "--prompt", prompt, "-n", "1"])
    _one_error_line(capsys, rc, "'prompt'", "UTF-8")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_sample_out_with_a_trailing_slash_is_refused(sample_ckpt, tmp_path, capsys):
    rc = cli.main(["sample", "--checkpoint", sample_ckpt, "--out", f"{tmp_path}/new/", "-n", "1"])
    _one_error_line(capsys, rc, "'out'", "folder")
    assert os.listdir(tmp_path) == []


def test_inspect_refuses_what_is_no_dataset_shard_or_folder_of_shards(tmp_path, capsys, image_shards):
    noise = tmp_path / "x.tar"
    noise.write_bytes(os.urandom(20000))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a tar")
    (tmp_path / "empty").mkdir()
    photos = tmp_path / "photos"
    write_photo_folder(str(photos), n=2)
    cases = {
        str(noise): "not a readable tar shard",
        str(tmp_path / "empty.tar"): "not a readable tar shard",
        str(tmp_path / "notes.txt"): "not a readable tar shard",
        "/dev/urandom": "not a file or folder",
        str(tmp_path / "empty"): "no .tar files",
        str(photos): "no .tar files",
        str(tmp_path / "missing"): "not found",
    }
    for url, why in cases.items():
        t0 = time.time()
        rc = cli.main(["inspect", url])
        _one_error_line(capsys, rc, url, why)
        assert time.time() - t0 < 20, url  # /dev/urandom is never read

    # a set with one non-tar file among real shards is summarised, the file named
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(image_shards / "shard-000000.tar", mixed / "a.tar")
    shutil.copy(noise, mixed / "b.tar")
    assert cli.main(["inspect", str(mixed)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "image-shards" and summary["samples"] == 8 and summary["shards"] == 2
    assert summary["not_tar"] == [str(mixed / "b.tar")] and summary["unreadable"] == {}
