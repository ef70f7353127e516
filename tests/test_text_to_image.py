"""Text-to-image training on bucketed, captioned latents: bucket-aware batches on 2 Ray Train
workers over the S3 test endpoint, a text-conditioned transformer, prompt sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import encode_image, photo_crops, write_tar
from pipeline.config import ConfigError
from pipeline.io import manifest, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.models import autoencoder, text
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.sample import SampleConfig, run_sample
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.diffusion import empty_caption
from pipeline.train.streams import latent_stream

WORDS = ["coffee", "moon", "cat", "coins", "rocket", "brick"]


def _caption(i: int) -> str:
    return f"a photo of {WORDS[i % len(WORDS)]}"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    corpus = [_caption(i) for i in range(len(WORDS))] + ["a photo of a dog"]
    return {
        "clip": text.build_stand_in(str(root / "clip"), corpus, kind="clip", seed=1),
        "other": text.build_stand_in(str(root / "other"), corpus, kind="clip", seed=9),
    }


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, encoders, ray_cluster):
    """Captioned latents in buckets 64x32, 32x64 and 48x48 whose shards hold the buckets
    unevenly: landscapes in one shard, portraits and squares in the others. (Encoding uses the
    session's Ray: started here without the S3 endpoint's environment, its workers could not
    reach the bucket when this file runs alone.)"""
    root = tmp_path_factory.mktemp("t2i")
    vae = str(root / "vae")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=3)[0], vae)
    crops = photo_crops(30, size=96, seed=5)
    layout = {"a": [(96, 48)] * 14, "b": [(48, 96)] * 7 + [(72, 72)] * 2, "c": [(72, 72)] * 5 + [(48, 96)] * 2}
    i = 0
    for shard, sizes in layout.items():
        members = []
        for size in sizes:
            members.append((f"{shard}{i:03d}.jpg", encode_image(crops[i].resize(size), "JPEG", quality=95)))
            members.append((f"{shard}{i:03d}.txt", _caption(i).encode()))
            i += 1
        write_tar(str(root / f"{shard}.tar"), members)
    (root / "table.json").write_text("[[64, 32], [32, 64], [48, 48]]")
    man = run_encode(
        EncodeConfig(
            input=str(root / "*.tar"),
            output=str(root / "lat"),
            vae=vae,
            buckets=str(root / "table.json"),
            bucket_multiple=16,
            flip=True,
            text_encoder=[encoders["clip"]],
            batch_size=8,
        )
    )
    assert {tuple(b["size"]): b["samples"] for b in man["buckets"]} == {(64, 32): 14, (32, 64): 9, (48, 48): 7}
    return str(root / "lat")


def test_bucket_batches_hold_one_bucket_and_carry_remainders(bucketed):
    stream = latent_stream(bucketed, batch_size=4, use_text=True, caption_dropout=0.5, flip_prob=0.5, seed=1)
    shapes = []
    try:
        it = iter(stream)
        for _ in range(30):
            b = next(it)
            shapes.append(tuple(b.x0.shape[2:]))
            assert b.text is not None and b.text_mask is not None and b.pooled is not None
            assert b.text.shape[:2] == b.text_mask.shape and b.pooled.shape == (4, 32)
            lengths = b.text_mask.sum(1)
            assert (b.text[~b.text_mask] == 0).all() and lengths.min() >= 2  # padding is zero and masked
    finally:
        stream.close()
    counts = {s: shapes.count(s) for s in set(shapes)}
    # every bucket comes, in proportion to its size (14 : 9 : 7 over 30 batches of 4 = 4 passes)
    assert set(counts) == {(8, 16), (16, 8), (12, 12)}
    assert counts[(8, 16)] > counts[(12, 12)]


def test_text_to_image_on_two_workers_resumes_and_samples(bucketed, encoders, bucket, ray_cluster, tmp_path):
    out = f"{bucket}/runs/t2i"
    storage.upload_dir(bucketed, f"{bucket}/lat")  # latents, checkpoints and metrics on the S3 endpoint
    cfg = TrainConfig(
        latents=f"{bucket}/lat",
        output=out,
        model="dit-tiny",
        workers=2,
        steps=40,
        batch_size=4,
        lr=2e-3,
        warmup_steps=5,
        checkpoint_every=20,
        log_every=5,
        flip_prob=0.5,
        caption_dropout=0.2,
        sample_steps=3,
    )
    run_train(cfg)  # the ranks see different buckets in the same step: no hang
    rows = [json.loads(line) for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert np.mean([r["loss"] for r in rows[-2:]]) < 0.9 * np.mean([r["loss"] for r in rows[:2]])
    ck = storage.read_json(f"{out}/run/checkpoint_00000040/config.json")
    assert ck["model"]["arch"] == "dit" and ck["model"]["text_dim"] == 32 and ck["model"]["pooled_dim"] == 32
    assert ck["latent_shape"] == [4, 12, 12]  # the squarest bucket is the default
    assert sorted(ck["buckets"]) == [[4, 8, 16], [4, 12, 12], [4, 16, 8]]
    assert [e["name"] for e in ck["text_encoders"]] == ["clip"]

    cfg.steps = 50
    run_train(cfg)
    rows = [json.loads(line) for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 51, 5))

    # prompts at two aspect ratios, with guidance, from the checkpoint URL alone
    ckpt = f"{out}/run/checkpoint_00000050"
    for w, h in ((64, 32), (32, 64)):
        png = str(tmp_path / f"{w}x{h}.png")
        img = run_sample(
            SampleConfig(checkpoint=ckpt, out=png, n=2, steps=3, prompt="a photo of coffee", width=w, height=h,
                         cfg_scale=3.0)
        )  # fmt: skip
        assert img.size == (2 * w, h)
    with pytest.raises(CheckpointError, match="not the one the model was trained with"):
        run_sample(
            SampleConfig(checkpoint=ckpt, out=str(tmp_path / "x.png"), n=1, steps=1, prompt="a photo of coffee",
                         text_encoder=[encoders["other"]])
        )  # fmt: skip
    with pytest.raises(ConfigError, match="more than 16x the largest area"):
        run_sample(SampleConfig(checkpoint=ckpt, out=str(tmp_path / "z.png"), n=1, steps=1, width=512, height=512))
    with pytest.raises(ConfigError, match="multiples of 8"):
        run_sample(SampleConfig(checkpoint=ckpt, out=str(tmp_path / "y.png"), n=1, steps=1, width=60, height=32))


def test_a_model_too_large_for_the_cluster_is_refused_before_training(bucketed, ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match=r"option 'model': model dit-xl \(\d+M\) needs about \d+\.\d GiB per worker"):
        run_train(TrainConfig(latents=bucketed, output=str(tmp_path / "xl"), model="dit-xl", workers=4))


def test_unet_takes_text_and_buckets_too(bucketed, ray_cluster, tmp_path):
    out = str(tmp_path / "unet")
    run_train(
        TrainConfig(
            latents=bucketed, output=out, model="tiny", workers=1, steps=4, batch_size=4, log_every=2,
            checkpoint_every=4, sample_steps=2,
        )
    )  # fmt: skip
    ck = storage.read_json(f"{out}/run/checkpoint_00000004/config.json")
    assert ck["model"]["arch"] == "unet" and ck["model"]["text_dim"] == 32
    img = run_sample(SampleConfig(checkpoint=out, out=str(tmp_path / "u.png"), n=1, steps=2, prompt="a photo of moon"))
    assert img.size == (48, 48)

    # the empty caption is kept in the checkpoint as training used it: sampling without a prompt
    # needs no text encoder (the recorded one is made unreachable), a prompt still does
    ckpt = tmp_path / "ckpt"
    shutil.copytree(f"{out}/run/checkpoint_00000004", ckpt)
    kept = load_file(str(ckpt / "null_text.safetensors"))
    man = manifest.load(bucketed)
    want = empty_caption(bucketed, man, text.TextSpec.from_manifest(man), None)
    assert set(kept) == {"text", "text_mask", "pooled"} and all(torch.equal(kept[k], want[k]) for k in kept)
    info = json.loads((ckpt / "config.json").read_text())
    info["text_encoders"][0]["source"] = str(tmp_path / "gone")
    (ckpt / "config.json").write_text(json.dumps(info))
    a = run_sample(SampleConfig(checkpoint=str(ckpt), out=str(tmp_path / "a.png"), n=2, steps=2, cfg_scale=2.0))
    older = tmp_path / "older"  # a checkpoint from before the empty caption was kept: the encoders embed it
    shutil.copytree(f"{out}/run/checkpoint_00000004", older)
    (older / "null_text.safetensors").unlink()
    b = run_sample(SampleConfig(checkpoint=str(older), out=str(tmp_path / "b.png"), n=2, steps=2, cfg_scale=2.0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match=r"recorded in the checkpoint .* is not there"):
        run_sample(SampleConfig(checkpoint=str(ckpt), out=str(tmp_path / "c.png"), n=1, steps=1, prompt="moon"))
    # an empty caption of another width: refused in one line, not a shape error inside the model
    save_file(
        {"text": torch.zeros(1, 3, 7), "text_mask": torch.ones(1, 3, dtype=torch.bool)},
        str(ckpt / "null_text.safetensors"),
    )
    with pytest.raises(CheckpointError, match="does not hold the empty caption for a 32-wide text input"):
        run_sample(SampleConfig(checkpoint=str(ckpt), out=str(tmp_path / "d.png"), n=1, steps=1))


def test_guidance_pads_prompts_and_the_empty_caption_to_one_length():
    from pipeline.models import denoiser, flow

    net = denoiser.build(denoiser.config_for("dit-tiny", text_dim=8)).eval()
    calls = []

    def model_fn(x, t, **kw):
        calls.append({k: v.shape if v is not None else None for k, v in kw.items()})
        return net(x, t, **kw)

    cond = {"text": torch.randn(2, 5, 8), "text_mask": torch.ones(2, 5, dtype=torch.bool), "pooled": None}
    uncond = {"text": torch.randn(2, 2, 8), "text_mask": torch.ones(2, 2, dtype=torch.bool), "pooled": None}
    v = flow.guided(model_fn, 4.0, cond, uncond)(torch.randn(2, 4, 8, 8), torch.full((2,), 0.5))
    assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    assert calls == [{"text": (4, 5, 8), "text_mask": (4, 5), "pooled": None}]
