"""``finetune`` and ``export`` on tiny random diffusers bases built here (nothing is downloaded):
LoRA trains only the adapters (every base weight bit-identical, checkpoints hold only adapter
tensors), a 2-worker Ray Train run resumes, caches and runs of another base are refused in one
line, and the exports load in diffusers (``load_lora_weights``, ``from_pretrained``) and draw."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_bases import save, sd_pipeline, sdxl_pipeline, tiny_unet, write_cache

from pipeline import cli
from pipeline.io import checkpoint
from pipeline.models import base as basemod
from pipeline.models import objectives
from pipeline.models.base_model import sdxl_time_ids
from pipeline.stages.export import ExportConfig, run_export
from pipeline.train.finetune import FinetuneConfig, add_lora, cache_stream, run_finetune
from pipeline.train.loop import LoopConfig, new_optimizer


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD base, its latent cache, and a second base with another VAE and text encoder."""
    root = tmp_path_factory.mktemp("sd")
    base = save(sd_pipeline(root, 0), root / "base")
    other = save(sd_pipeline(root, 1), root / "other")
    cache = write_cache(sd_pipeline(root, 0), base, str(root / "cache"), n=12, size=32)
    return {"root": root, "base": base, "other": other, "cache": cache}


def _cfg(sd, out, **kw) -> FinetuneConfig:
    opts = {
        "latents": sd["cache"],
        "base": sd["base"],
        "output": str(out),
        "steps": 4,
        "batch_size": 2,
        "checkpoint_every": 2,
        "log_every": 2,
        "lr": 1e-2,
        "shuffle_buffer": 4,
        "max_failures": 0,
    }
    return FinetuneConfig(**{**opts, **kw})


def test_lora_trains_only_the_adapters_and_leaves_every_base_weight_bit_identical():
    unet = tiny_unet("sd")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trained = add_lora(unet, FinetuneConfig(latents="x", base="y", output="/tmp/o", lora_rank=4).lora())
    names = [n for n, _ in trained.named_parameters()]
    assert names and all("lora_" in n for n in names)
    assert {n.split("/")[-3] for n in names} == {"lora_A", "lora_B"}
    assert {n.split("/lora_")[0].rsplit("/", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0"}
    opt = new_optimizer(trained, LoopConfig(output="/tmp/o", weight_decay=0.1))
    eps = objectives.from_scheduler_config(json.loads(json.dumps(_sd_scheduler())))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, n = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t = objectives.sample_timesteps(eps, 2, g)
        out = unet(objectives.noisy_latents(eps, x, n, t), t, encoder_hidden_states=torch.randn(2, 5, 32)).sample
        objectives.loss(eps, out, x, n, t).backward()
        assert all(p.grad is None for name, p in unet.named_parameters() if "lora_" not in name)
        opt.step()
        opt.zero_grad()
    after = unet.state_dict()
    for k, v in before.items():
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after.get(k, after.get(key)), v), k
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # B left zero


def _sd_scheduler():
    from tiny_bases import SD_SCHEDULER

    return SD_SCHEDULER


def test_the_stream_gives_the_pipelines_conditioning(sd, tmp_path):
    man = json.load(open(os.path.join(sd["cache"], "_manifest.json")))
    stream = cache_stream(_cfg(sd, tmp_path / "o", caption_dropout=0.0), man, "sd", 0, 1, 0)
    batch = next(iter(stream))
    stream.close()
    assert batch.latents.shape == (2, 4, 8, 8) and batch.prompt_embeds.shape == (2, 16, 32)
    assert batch.pooled is None and "added_cond_kwargs" not in batch.unet_kwargs("cpu")
    # scaled as the manifest says: raw posterior mean * scaling_factor
    assert abs(man["scale"] - 0.18215) < 1e-6
    # SDXL's time ids: original (h, w), crop (top, left), target (h, w) from [w, h] and [l, t, r, b]
    meta = {"original_size": [48, 40], "crop_box": [8, 4, 40, 36], "bucket": [32, 32]}
    assert list(sdxl_time_ids(meta)) == [40, 48, 4, 8, 32, 32]


@pytest.mark.usefixtures("ray_cluster")
def test_a_two_worker_lora_run_checkpoints_only_adapters_and_resumes(sd, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_finetune(_cfg(sd, out, workers=2, lora_rank=4))
    assert result.metrics["step"] == 4
    local = checkpoint.local_copy(str(out))
    info = checkpoint.read_info(local)
    assert info.kind == "finetune" and info.step == 4 and info.base["lora"]["r"] == 4
    assert info.base["identity"] == basemod.open_base(sd["base"]).identity()
    assert info.base["objective"]["kind"] == "epsilon"
    for name in ("model", "ema"):
        keys = load_file(os.path.join(local, f"{name}.safetensors")).keys()
        assert keys and all("lora_" in k for k in keys), name
    first = load_file(os.path.join(local, "model.safetensors"))
    # re-running the same command with more steps resumes at step 4
    result = run_finetune(_cfg(sd, out, workers=2, lora_rank=4, steps=6))
    assert result.metrics["step"] == 6
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [2, 4, 6]
    later = load_file(os.path.join(checkpoint.local_copy(str(out)), "model.safetensors"))
    assert later.keys() == first.keys() and any(not torch.equal(later[k], first[k]) for k in first)

    # the LoRA export loads onto the base with load_lora_weights and changes what it draws
    from diffusers import StableDiffusionPipeline

    _export_lora_and_draw(str(out), StableDiffusionPipeline.from_pretrained(sd["base"], safety_checker=None), tmp_path)

    # resuming this output over another base (same VAE and text encoder, another UNet) is refused
    swapped = tmp_path / "swapped"
    shutil.copytree(sd["base"], swapped)
    tiny_unet("sd", seed=5).save_pretrained(str(swapped / "unet"), safe_serialization=True)
    argv = ["finetune", "--latents", sd["cache"], "--base", str(swapped), "--output", str(out), "--lora-rank", "4"]
    capsys.readouterr()
    assert cli.main([*argv, "--steps", "8"]) == 2
    assert "holds a fine-tune of another base" in capsys.readouterr().err
    # and another adapter config on the same base
    argv[4] = sd["base"]
    assert cli.main([*argv[:-1], "8", "--steps", "8"]) == 2
    assert "another adapter config" in capsys.readouterr().err


def _export_lora_and_draw(run: str, pipe, tmp_path) -> None:
    """`export` of a LoRA run gives the one file ``pipe.load_lora_weights`` takes, and it changes
    what the base pipeline ``pipe`` draws."""
    lora_dir = tmp_path / "lora"
    assert cli.main(["export", "--checkpoint", run, "--output", str(lora_dir)]) == 0
    assert os.listdir(lora_dir) == ["pytorch_lora_weights.safetensors"]
    pipe.set_progress_bar_config(disable=True)
    plain = _draw(pipe)
    pipe.load_lora_weights(str(lora_dir))
    tuned = _draw(pipe)
    assert plain.shape == tuned.shape == (32, 32, 3) and np.isfinite(tuned).all()
    assert np.abs(tuned - plain).mean() > 1e-3


def _draw(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images[0]


@pytest.mark.usefixtures("ray_cluster")
def test_a_full_fine_tune_exports_a_pipeline_folder_that_diffusers_loads(sd, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "full"
    run_finetune(_cfg(sd, out, lora_rank=0, steps=2, lr=1e-3))
    local = checkpoint.local_copy(str(out))
    ema = load_file(os.path.join(local, "ema.safetensors"))
    assert ema.keys() == tiny_unet("sd").state_dict().keys()
    folder = run_export(ExportConfig(checkpoint=str(out), output=str(tmp_path / "pipe"), weights="raw"))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    raw = load_file(os.path.join(local, "model.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in pipe.unet.state_dict().items())
    base = DiffusionPipeline.from_pretrained(sd["base"])
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
    image = _draw(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_a_cache_of_another_base_is_refused_in_one_line(sd, tmp_path, capsys):
    argv = ["finetune", "--latents", sd["cache"], "--base", sd["other"], "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another" in err and "text_encoder" in err and "vae" in err, err
    # a cache that records no base
    man_path = tmp_path / "nobase"
    shutil.copytree(sd["cache"], man_path)
    man = json.load(open(man_path / "_manifest.json"))
    del man["base"]
    json.dump(man, open(man_path / "_manifest.json", "w"))
    assert (
        cli.main(["finetune", "--latents", str(man_path), "--base", sd["base"], "--output", str(tmp_path / "p")]) == 2
    )
    assert "records no base model" in capsys.readouterr().err


def test_an_sdxl_base_trains_with_pooled_text_and_time_ids(tmp_path):
    """The SDXL UNet call as the pipeline makes it, on a cache of the tiny SDXL pipeline."""
    pipe = sdxl_pipeline(tmp_path, 0)
    base_dir = save(pipe, tmp_path / "xl")
    cache = write_cache(pipe, base_dir, str(tmp_path / "xlcache"), n=4, per_shard=4, size=32)
    base = basemod.open_base(base_dir)
    assert base.family == "sdxl" and "text_encoder_2" in base.identity()
    man = json.load(open(os.path.join(cache, "_manifest.json")))
    basemod.check_cache(base, man, "cache")
    cfg = FinetuneConfig(latents=cache, base=base_dir, output=str(tmp_path / "o"), batch_size=2, lora_rank=2)
    stream = cache_stream(cfg, man, "sdxl", 0, 1, 0)
    batch = next(iter(stream))
    stream.close()
    assert batch.pooled is not None and batch.pooled.shape == (2, 32) and batch.prompt_embeds.shape[-1] == 64
    assert batch.time_ids is not None and batch.time_ids[0].tolist() == [40, 48, 4, 8, 32, 32]
    unet = base.load_denoiser()
    trained = add_lora(unet, cfg.lora())
    obj = objectives.from_scheduler_config(base.scheduler_config())
    t = objectives.sample_timesteps(obj, 2)
    noise = torch.randn_like(batch.latents)
    out = unet(objectives.noisy_latents(obj, batch.latents, noise, t), t, **batch.unet_kwargs("cpu")).sample
    objectives.loss(obj, out, batch.latents, noise, t).backward()
    assert all(p.grad is not None for p in trained.parameters() if p.requires_grad)


def test_encode_base_then_finetune_then_export_loads_in_diffusers(sd, tmp_path, ray_cluster):
    """The whole loop on real parts: `encode --base` caches photos with the base's own VAE and
    conditioning, `finetune` trains LoRA adapters on that cache with the base's objective, and
    `export` gives a file that diffusers' load_lora_weights takes."""
    from diffusers import StableDiffusionPipeline

    from helpers import encode_image, photo_crops, write_tar
    from pipeline.stages.encode import EncodeConfig, run_encode

    members = []
    for i, im in enumerate(photo_crops(8, 48)):
        members += [(f"p{i}.png", encode_image(im)), (f"p{i}.txt", f"a photo number {i}".encode())]
    write_tar(str(tmp_path / "photos.tar"), members)
    lat = str(tmp_path / "lat")
    man = run_encode(EncodeConfig(input=str(tmp_path / "photos.tar"), output=lat, base=sd["base"], resolution=32))
    assert man["totals"]["written"] == 8 and man["base"]["family"] == "sd"
    out = tmp_path / "ft"
    result = run_finetune(_cfg(sd, out, latents=lat, lora_rank=4, steps=4))
    assert result.metrics["step"] == 4 and np.isfinite(result.metrics["loss"])
    lora_dir = tmp_path / "lora"
    assert cli.main(["export", "--checkpoint", str(out), "--output", str(lora_dir)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd["base"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    plain = _draw(pipe)
    pipe.load_lora_weights(str(lora_dir))
    assert np.abs(_draw(pipe) - plain).mean() > 1e-3
    # the cache of the other base (another VAE and text encoder) is refused for this base's run
    other = str(tmp_path / "lat-other")
    run_encode(EncodeConfig(input=str(tmp_path / "photos.tar"), output=other, base=sd["other"], resolution=32))
    with pytest.raises(Exception, match="made with another"):
        run_finetune(_cfg(sd, tmp_path / "ft2", latents=other, lora_rank=4, steps=2))


def test_an_sdxl_base_on_object_storage_encodes_trains_on_two_workers_and_exports_lora(tmp_path, bucket, ray_cluster):
    """SDXL end to end through Ray, with the base pipeline folder, the cache and the run all on
    the S3 endpoint (`--base s3://...`): `encode --base` -> `finetune` on 2 Ray Train workers
    (LoRA) -> `export` (reading the recorded remote base) -> diffusers'
    StableDiffusionXLPipeline.load_lora_weights takes the file and draws something else."""
    from diffusers import StableDiffusionXLPipeline

    from helpers import encode_image, photo_crops, write_tar
    from pipeline.io import storage
    from pipeline.stages.encode import EncodeConfig, run_encode

    local_base = save(sdxl_pipeline(tmp_path, 0), tmp_path / "xl")
    remote_base = f"{bucket}/bases/tiny-sdxl"
    storage.upload_dir(local_base, remote_base, commit_last=basemod.INDEX_NAME)
    members = []
    for i, im in enumerate(photo_crops(6, 48)):
        members += [(f"p{i}.png", encode_image(im)), (f"p{i}.txt", f"a photo number {i}".encode())]
    write_tar(str(tmp_path / "photos.tar"), members)
    lat = f"{bucket}/lat"
    man = run_encode(EncodeConfig(input=str(tmp_path / "photos.tar"), output=lat, base=remote_base, resolution=32))
    assert man["totals"]["written"] == 6 and man["base"]["family"] == "sdxl"
    assert "pooled_prompt_embeds.npy" in man["base"]["empty_caption"]

    out = f"{bucket}/ft"
    cfg = FinetuneConfig(
        latents=lat, base=remote_base, output=out, workers=2, lora_rank=4, steps=4, batch_size=2,
        checkpoint_every=4, log_every=2, lr=1e-2, shuffle_buffer=4, max_failures=0,
    )  # fmt: skip
    result = run_finetune(cfg)
    assert result.metrics["step"] == 4 and np.isfinite(result.metrics["loss"])
    info = checkpoint.read_info(checkpoint.local_copy(out))
    assert info.base["family"] == "sdxl" and info.base["url"] == remote_base
    assert info.base["identity"] == basemod.open_base(local_base).identity()  # the same files, wherever they lie

    _export_lora_and_draw(out, StableDiffusionXLPipeline.from_pretrained(local_base), tmp_path)


@pytest.mark.usefixtures("ray_cluster")
def test_an_fsdp_full_fine_tune_trains_as_ddp_does_and_its_full_checkpoint_resumes_and_exports(sd, tmp_path, capsys):
    """`--fsdp` (FSDP2 on gloo, 2 Ray Train workers): the same steps as DDP give the same
    weights up to float rounding, the checkpoint holds full tensors (the UNet's own state dict,
    the optimizer state of every weight), a re-run resumes from it, and `export` makes a pipeline
    folder diffusers loads from it. With LoRA it is refused in one line."""
    from diffusers import DiffusionPipeline

    runs = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        run_finetune(_cfg(sd, tmp_path / name, workers=2, lora_rank=0, steps=2, lr=1e-3, fsdp=fsdp))
        runs[name] = checkpoint.local_copy(str(tmp_path / name))
    base = tiny_unet("sd").state_dict()
    ddp, fsdp = (load_file(os.path.join(runs[n], "model.safetensors")) for n in ("ddp", "fsdp"))
    assert fsdp.keys() == base.keys() and all(fsdp[k].shape == v.shape for k, v in base.items())
    moved = float(np.mean([(ddp[k] - base[k]).abs().mean() for k in base]))
    apart = float(np.mean([(fsdp[k] - ddp[k]).abs().mean() for k in base]))
    assert moved > 1e-5 and apart < 0.01 * moved, (moved, apart)
    opt = load_file(os.path.join(runs["fsdp"], "optimizer.safetensors"))
    assert len([k for k in opt if k.endswith(".exp_avg")]) == len(base)
    assert sorted(v.numel() for k, v in opt.items() if k.endswith(".exp_avg")) == sorted(
        v.numel() for v in base.values()
    )

    result = run_finetune(_cfg(sd, tmp_path / "fsdp", workers=2, lora_rank=0, steps=4, lr=1e-3, fsdp=True))
    assert result.metrics["step"] == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "fsdp" / "metrics.jsonl")] == [2, 4]
    local = checkpoint.local_copy(str(tmp_path / "fsdp"))
    ema = load_file(os.path.join(local, "ema.safetensors"))
    folder = run_export(ExportConfig(checkpoint=str(tmp_path / "fsdp"), output=str(tmp_path / "pipe")))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    assert np.isfinite(_draw(pipe)).all()

    argv = ["finetune", "--latents", sd["cache"], "--base", sd["base"], "--output", str(tmp_path / "o"), "--fsdp"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora-rank 0" in err, err
