"""Training with Ray Train: real workers (gloo DDP on CPU), real S3 checkpoints, tiny models."""

from __future__ import annotations

import functools
import io
import json
import operator
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import RunsCommand, pickle_payload, write_photo_folder
from pipeline.config import ConfigError
from pipeline.io import checkpoint, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.io.manifest import ManifestError
from pipeline.models import autoencoder, flow
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.sample import SampleConfig, run_sample
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train import loop
from pipeline.train.autoencoder import VAETrainConfig, run_train_vae
from pipeline.train.streams import rank_shards


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    write_photo_folder(str(root / "photos"), n=36, size=64)
    run_shards(
        ShardsConfig(src=str(root / "photos"), out=str(root / "shards"), samples_per_shard=12, class_from="folder")
    )
    return root / "shards"


@pytest.fixture(scope="module")
def latents(tmp_path_factory, image_shards, ray_cluster):
    """3 latent shards (so 2 workers get uneven shard counts) with an upscale2 view."""
    root = tmp_path_factory.mktemp("lat")
    vae = str(root / "vae")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=1)[0], vae)
    run_encode(
        EncodeConfig(
            input=str(image_shards / "shard-*.tar"),
            output=str(root / "latents"),
            vae=vae,
            resolution=64,
            tasks=["upscale2"],
        )
    )
    return root / "latents"


def _metrics(url):
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def test_rank_shards_disjoint_and_even():
    shards = [f"s{i}" for i in range(6)]
    parts = [rank_shards(shards, r, 3, epoch=0, seed=1) for r in range(3)]
    assert sorted(functools.reduce(operator.iadd, parts, [])) == shards  # divides evenly: a partition
    uneven = [rank_shards(shards[:5], r, 2, epoch=0, seed=1) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 3  # the short rank gets a resampled shard
    assert set(uneven[0][:3]) | set(uneven[1][:2]) == set(shards[:5])


def test_flow_matching_samplers_follow_a_known_field():
    # x0 = target, noise = x1: the exact velocity of the straight path is x1 - x0.
    target = torch.full((2, 1, 2, 2), 3.0)

    def v(x, t):  # the true field for a single target point
        return (x - target) / t.view(-1, 1, 1, 1).clamp_min(1e-6)

    x1 = torch.randn(2, 1, 2, 2)
    for sampler in flow.SAMPLERS.values():
        out = sampler(v, x1.clone(), steps=10)
        assert torch.allclose(out, target, atol=1e-4)
    x = flow.interpolate(target, x1, torch.tensor([0.25, 0.25]))
    assert torch.allclose(x, 0.75 * target + 0.25 * x1)


def test_train_on_s3_resume_and_sample(latents, bucket, ray_cluster, tmp_path):
    out = f"{bucket}/runs/diffusion"
    cfg = TrainConfig(
        latents=str(latents),
        output=out,
        workers=2,
        steps=40,
        batch_size=12,
        lr=2e-3,
        warmup_steps=5,
        checkpoint_every=20,
        log_every=5,
        num_classes=2,
        keep_checkpoints=2,
        sample_steps=4,
    )
    run_train(cfg)
    ckpts = storage.listdir(f"{out}/run")
    assert {"checkpoint_00000020", "checkpoint_00000040"} <= set(ckpts)
    assert storage.exists(f"{out}/run/checkpoint_00000040/vae/ema.safetensors")
    m = _metrics(f"{out}/metrics.jsonl")
    assert [r["step"] for r in m] == list(range(5, 41, 5))
    assert np.mean([r["loss"] for r in m[-2:]]) < 0.8 * np.mean([r["loss"] for r in m[:2]])
    assert all(0 <= r["data_wait_share"] < 1 and r["samples_per_s"] > 0 for r in m)
    assert storage.exists(f"{out}/samples/step_00000040.png")
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{out}/tensorboard"))

    # the same command with more steps resumes at step 40
    cfg.steps = 60
    run_train(cfg)
    m = _metrics(f"{out}/metrics.jsonl")
    assert [r["step"] for r in m] == list(range(5, 61, 5))
    ck = storage.read_json(f"{out}/run/checkpoint_00000060/config.json")
    assert ck["step"] == 60 and ck["scale"] == 1.0 and ck["format"] == "latent-pipeline-checkpoint/2"
    assert "storage" not in ck["train"] and "ray" not in ck["train"]
    assert storage.listdir(f"{out}/run").count("checkpoint_00000020") == 0  # pruned to 2

    # sampling needs nothing but the checkpoint URL
    png = str(tmp_path / "s.png")
    img = run_sample(
        SampleConfig(checkpoint=f"{out}/run/checkpoint_00000060", out=png, n=4, steps=3, class_=[0, 1], cfg_scale=2.0)
    )
    assert img.size == (128, 128) and Image.open(png).size == (128, 128)


def test_worker_failure_is_recovered_from_checkpoint(latents, ray_cluster, tmp_path):
    import psutil

    out = tmp_path / "run"
    cfg = TrainConfig(
        latents=str(latents),
        output=str(out),
        workers=2,
        steps=80,
        batch_size=8,
        checkpoint_every=10,
        log_every=10,
        max_failures=1,
        warmup_steps=5,
    )
    killed = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if (out / "run" / "checkpoint_00000020" / "config.json").exists():
                for p in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                        return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    result = run_train(cfg)
    t.join()
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == 80
    steps = [r["step"] for r in _metrics(str(out / "metrics.jsonl"))]
    assert steps == list(range(10, 81, 10))  # history continuous across the restart


def test_train_refuses_a_dataset_without_manifest(tmp_path, latents):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tar").write_bytes((latents / "shard-000000.tar").read_bytes())
    with pytest.raises(ManifestError, match=r"no _manifest\.json"):
        run_train(TrainConfig(latents=str(bad), output=str(tmp_path / "o")))
    man = json.loads((latents / "_manifest.json").read_text())
    man["totals"]["written"] += 1
    (bad / "_manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match="inconsistent"):
        run_train(TrainConfig(latents=str(bad), output=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="restore"):
        run_train(TrainConfig(latents=str(latents), output=str(tmp_path / "o"), task="restore"))


def test_train_vae_raises_psnr_and_encode_accepts_it(image_shards, ray_cluster, tmp_path):
    out = str(tmp_path / "vae")
    cfg = VAETrainConfig(
        images=str(image_shards / "shard-*.tar"),
        output=out,
        workers=2,
        steps=80,
        batch_size=8,
        resolution=32,
        checkpoint_every=40,
        log_every=20,
        warmup_steps=10,
        eval_images=12,
    )
    result = run_train_vae(cfg)
    assert result.metrics["psnr"] > result.metrics["psnr_initial"] + 3.0, result.metrics
    vae = autoencoder.load(out)  # the run output resolves to its newest checkpoint
    assert vae.kind == "kl" and vae.scale > 0 and vae.scale != 1.0
    man = run_encode(
        EncodeConfig(input=str(image_shards / "shard-000000.tar"), output=str(tmp_path / "lat"), vae=out, resolution=32)
    )
    assert man["totals"]["written"] == 12 and man["scale"] == pytest.approx(vae.scale)


def test_train_vae_gradients_match_ddp_buckets_so_nothing_is_printed(image_shards, ray_cluster, tmp_path, capfd):
    """At 64 px the 1x1 convolutions' weight gradients come out channels-last; with the parameters
    in the default layout each DDP rank printed PyTorch's "grad strides do not match bucket view
    strides" warning (the gradient copied strided into its bucket every step)."""
    cfg = VAETrainConfig(
        images=str(image_shards / "shard-*.tar"),
        output=str(tmp_path / "vae"),
        workers=2,
        steps=3,
        batch_size=16,
        resolution=64,
        checkpoint_every=3,
        warmup_steps=1,
        eval_images=4,
    )
    assert run_train_vae(cfg).metrics["step"] == 3
    time.sleep(1.5)  # the workers' output reaches the driver through Ray's log monitor
    printed = "".join(capfd.readouterr())
    assert "bucket view strides" not in printed


def test_malicious_checkpoint_files_are_never_unpickled(tmp_path):
    marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "ckpt"
    autoencoder.save_kl(autoencoder.new_kl("tiny")[0], str(ckpt))
    payload = pickle_payload(marker)
    (ckpt / "ema.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="damaged"):
        autoencoder.load(str(ckpt))
    opt_file = tmp_path / "opt"
    opt_file.mkdir()
    (opt_file / "optimizer.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load_tensors(str(opt_file), "optimizer")
    # a torch.save()d file (zip of pickles) in place of the weights is refused too
    buf = io.BytesIO()
    torch.save({"x": RunsCommand(f"touch {marker}")}, buf)
    (ckpt / "ema.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="damaged"):
        autoencoder.load(str(ckpt))
    assert not os.path.exists(marker)


def test_optimizer_state_round_trips_through_safetensors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = loop.optimizer_to_tensors(opt)
    json.dumps(meta)  # plain JSON
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    loop.optimizer_from_tensors(opt2, tensors, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    for idx in a["state"]:
        for k, v in a["state"][idx].items():
            assert torch.equal(v, b["state"][idx][k])
