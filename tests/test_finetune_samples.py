"""Drawing from ``finetune`` runs, on tiny random diffusers bases built here (nothing downloaded):
``sample --checkpoint`` draws what ``export`` + diffusers draw for the same seed (and not what the
base draws), ``finetune --validation-prompt`` writes grids on rank 0 only with the EMA weights,
and the validation grids' conditioning (prompt embeddings fed to the pipeline) is what the
pipeline's own ``encode_prompt`` gives, per family."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_bases import save, sd_pipeline, write_cache

from pipeline import cli, config
from pipeline.io import storage
from pipeline.io.imaging import from_tensor_array
from pipeline.models import base as basemod
from pipeline.models.base_model import BaseText
from pipeline.train import finetuned
from pipeline.train.finetune import FinetuneConfig, run_finetune

PROMPTS = ["a photo of a cat, on a tree", "a red dog"]  # the comma stays inside the first prompt


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    base = save(sd_pipeline(root, 0), root / "base")
    cache = write_cache(sd_pipeline(root, 0), base, str(root / "cache"), n=8, size=32)
    return {"root": root, "base": base, "cache": cache}


def _cfg(sd, out: str, **kw) -> FinetuneConfig:
    opts = {
        "latents": sd["cache"],
        "base": sd["base"],
        "output": out,
        "steps": 2,
        "batch_size": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "lr": 5e-2,
        "shuffle_buffer": 4,
        "max_failures": 0,
        "sample_steps": 2,
    }
    return FinetuneConfig(**{**opts, **kw})


@pytest.fixture(scope="module")
def lora_run(sd, s3_endpoint, ray_cluster):
    """A 2-worker LoRA run with validation grids at every step, its output on a versioned S3
    bucket (so that each object's writes can be counted), and its EMA export."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = "ft-samples"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for _ in range(2):  # the endpoint keeps every write of a key, as the grids' check below needs
        storage.write_bytes(f"s3://{bucket}/probe", b"x")
    assert len(s3.list_object_versions(Bucket=bucket, Prefix="probe")["Versions"]) == 2
    out = f"s3://{bucket}/run"
    run_finetune(_cfg(sd, out, workers=2, lora_rank=4, sample_every=1, validation_prompt=PROMPTS))
    lora_dir = str(sd["root"] / "lora")
    assert cli.main(["export", "--checkpoint", out, "--output", lora_dir]) == 0
    return {"out": out, "s3": s3, "bucket": bucket, "lora": lora_dir}


def _pipe(base: str, lora: str = ""):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def _diffusers(pipe, prompts: list[str], steps: int, seed: int, **kw) -> np.ndarray:
    """What a diffusers user draws, as 8-bit RGB (B, H, W, 3) by the project's own conversion."""
    g = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=steps, generator=g, output_type="pt", **kw).images
    return np.stack([np.asarray(from_tensor_array(im.numpy() * 2 - 1)) for im in images])


def _cells(png: bytes, n: int, size: int = 32) -> np.ndarray:
    """The first ``n`` cells of a grid PNG, (n, size, size, 3)."""
    grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    cols = grid.shape[1] // size
    return np.stack(
        [grid[(i // cols) * size : (i // cols + 1) * size, (i % cols) * size :][:, :size] for i in range(n)]
    )


def test_validation_grids_are_written_once_each_by_rank_0_with_the_ema_weights(sd, lora_run):
    s3, bucket = lora_run["s3"], lora_run["bucket"]
    listed = s3.list_object_versions(Bucket=bucket, Prefix="run/samples/")
    versions = [v["Key"] for v in listed.get("Versions", [])]
    # every step a grid, each object written exactly once: rank 1 (same step, same name) wrote nothing
    assert sorted(versions) == ["run/samples/step_00000001.png", "run/samples/step_00000002.png"]
    grids = {k: storage.read_bytes(f"s3://{bucket}/{k}") for k in versions}
    last = _cells(grids["run/samples/step_00000002.png"], len(PROMPTS))
    first = _cells(grids["run/samples/step_00000001.png"], len(PROMPTS))
    assert Image.open(io.BytesIO(grids["run/samples/step_00000002.png"])).size == (64, 32)  # one image per prompt
    assert np.abs(last - first).mean() > 0.5  # the adapters moved between the two grids
    # the last grid is what diffusers draws from the exported EMA adapters for the prompts (the
    # pipeline's default guidance, the run's seed and --sample-steps); the grid's embeddings are
    # the float16 ones the run trains on, hence a tolerance of a few levels
    ref = _diffusers(_pipe(sd["base"], lora_run["lora"]), PROMPTS, steps=2, seed=0)
    diff = np.abs(last - ref)
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
    plain = _diffusers(_pipe(sd["base"]), PROMPTS, steps=2, seed=0)
    assert np.abs(last - plain).mean() > 5 * diff.mean() + 0.5


def test_sample_checkpoint_draws_what_export_and_load_lora_weights_draw(sd, lora_run, tmp_path):
    png = tmp_path / "s.png"
    argv = ["sample", "--checkpoint", lora_run["out"], "--out", str(png), "--prompt", PROMPTS[0]]
    assert cli.main([*argv, "-n", "2", "--steps", "3", "--cfg-scale", "7.5", "--seed", "5"]) == 0
    drawn = _cells(png.read_bytes(), 2)
    ref = _diffusers(_pipe(sd["base"], lora_run["lora"]), [PROMPTS[0]] * 2, steps=3, seed=5, guidance_scale=7.5)
    assert np.abs(drawn - ref).max() <= 1  # equal up to float rounding at the 8-bit boundary
    plain = _diffusers(_pipe(sd["base"]), [PROMPTS[0]] * 2, steps=3, seed=5, guidance_scale=7.5)
    assert np.abs(drawn - plain).mean() > 1.0  # the trained adapters are used
    assert np.abs(drawn[0] - drawn[1]).mean() > 1.0  # two draws of one generator


@pytest.mark.usefixtures("ray_cluster")
def test_a_full_fine_tune_samples_as_its_exported_pipeline_and_validates_with_its_ema(sd, tmp_path):
    out = str(tmp_path / "full")
    run_finetune(_cfg(sd, out, lora_rank=0, lr=1e-3, validation_prompt=[PROMPTS[1]], sample_steps=3, seed=2))
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_00000002.png"]  # --sample-every 0: the end
    png = tmp_path / "s.png"
    argv = ["sample", "--checkpoint", out, "--out", str(png), "--prompt", PROMPTS[1], "-n", "1", "--steps", "3"]
    assert cli.main([*argv, "--cfg-scale", "7.5", "--seed", "2"]) == 0
    drawn = _cells(png.read_bytes(), 1)
    folder = str(tmp_path / "pipe")
    assert cli.main(["export", "--checkpoint", out, "--output", folder]) == 0
    ref = _diffusers(_pipe(folder), [PROMPTS[1]], steps=3, seed=2, guidance_scale=7.5)
    assert np.abs(drawn - ref).max() <= 1
    # the validation grid of the last step: the same EMA weights, the float16 prompt embedding
    grid = _cells(open(os.path.join(out, "samples", "step_00000002.png"), "rb").read(), 1)
    assert np.abs(grid - drawn).mean() < 0.1 and np.abs(grid - drawn).max() <= 2


def test_sample_refuses_what_a_fine_tune_cannot_take_in_one_line(sd, lora_run, tmp_path, capsys):
    import shutil

    from tiny_bases import tiny_unet

    argv = ["sample", "--checkpoint", lora_run["out"], "--out", str(tmp_path / "x.png"), "--prompt", "a cat"]
    for extra, words in [
        (["--class", "1"], "text encoders"),
        (["--width", "30", "--height", "32"], "multiples of 4"),
    ]:
        capsys.readouterr()
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    other = tmp_path / "other"
    shutil.copytree(sd["base"], other)
    tiny_unet("sd", seed=7).save_pretrained(str(other / "unet"), safe_serialization=True)
    assert cli.main([*argv, "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the base" in err, err
    assert not (tmp_path / "x.png").exists()


def test_validation_prompts_keep_their_commas():
    cfg = config.from_dict(
        FinetuneConfig,
        {"latents": "l", "base": "b", "output": "/tmp/o", "validation_prompt": ["a cat, on a mat", "a dog"]},
    )
    assert cfg.validation_prompt == ["a cat, on a mat", "a dog"]
    assert config.from_dict(FinetuneConfig, {"latents": "l", "base": "b", "output": "/tmp/o"}).sample_steps == 30


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3"])
def test_prompt_embeddings_draw_what_the_prompts_draw(family, tmp_path):
    """The validation grids' route (prompts embedded by BaseText, fed as prompt_embeds, pooled and
    masks to a pipeline without text encoders) draws what the pipeline draws from the prompts."""
    from test_base_models import BUILDERS

    folder = BUILDERS[family](str(tmp_path / family))
    base = basemod.open_base(folder)
    text = BaseText(folder)
    prompts = ["a cat on a tree", "a dog"]
    embeddings = finetuned.embeds(text.encode(prompts), text.empty())
    no_text = finetuned.without_text(base)
    kw: dict = {"steps": 2, "guidance": 4.0, "seed": 1}
    if family == "pixart":
        kw["use_resolution_binning"] = False  # its bins are for the real sample sizes, not this tiny one
    from_embeds = finetuned.draw(base.load_pipeline(**no_text), embeddings=embeddings, **kw)
    from_prompts = finetuned.draw(base.load_pipeline(), prompts=prompts, **kw)
    assert from_embeds.shape == from_prompts.shape and from_embeds.shape[0] == 2
    diff = (from_embeds - from_prompts).abs()
    assert diff.max() < 0.05, float(diff.max())  # float16 rounding of the embeddings only
    other = finetuned.draw(base.load_pipeline(**no_text), embeddings=embeddings, **{**kw, "seed": 2})
    assert (other - from_embeds).abs().mean() > 10 * diff.mean()
