"""``finetune`` and ``export`` on tiny random diffusers bases built here (nothing is downloaded):
LoRA trains only the adapters (every base weight bit-identical, checkpoints hold only adapter
tensors), a 2-worker Ray Train run resumes, caches and runs of another base are refused in one
line, and the exports load in diffusers (``load_lora_weights``, ``from_pretrained``, peft's
``PeftModel`` for PixArt) and draw. The transformer families (PixArt-Σ, SD3) are called exactly as
their pipelines call them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_base_models import build_pixart, build_sd3
from tiny_bases import save, sd_pipeline, sdxl_pipeline, tiny_unet, write_cache

from pipeline import cli
from pipeline.io import checkpoint
from pipeline.models import base as basemod
from pipeline.models import objectives
from pipeline.models.base_model import FAMILIES, sdxl_time_ids
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
    cfg = FinetuneConfig(latents="x", base="y", output="/tmp/o", lora_rank=4, lora_targets=basemod.ATTENTION)
    trained = add_lora(unet, cfg.lora())
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
    stream = cache_stream(_cfg(sd, tmp_path / "o", caption_dropout=0.0), man, 0, 1, 0)
    batch = next(iter(stream))
    stream.close()
    assert batch.latents.shape == (2, 4, 8, 8) and batch.prompts.embeds.shape == (2, 16, 32)
    kwargs = basemod.TRAINING["StableDiffusionPipeline"].call(batch.prompts, None)
    assert batch.prompts.pooled is None and batch.prompts.mask is None and list(kwargs) == ["encoder_hidden_states"]
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
    # SD3's loss weighting on an epsilon base
    argv = ["finetune", "--latents", sd["cache"], "--base", sd["base"], "--output", str(tmp_path / "w")]
    assert cli.main([*argv, "--loss-weighting", "cosmap"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "option 'loss-weighting'" in err and "epsilon" in err, err


def test_an_sdxl_base_trains_with_pooled_text_and_time_ids(tmp_path):
    """The SDXL UNet call as the pipeline makes it, on a cache of the tiny SDXL pipeline."""
    pipe = sdxl_pipeline(tmp_path, 0)
    base_dir = save(pipe, tmp_path / "xl")
    cache = write_cache(pipe, base_dir, str(tmp_path / "xlcache"), n=4, per_shard=4, size=32)
    base = basemod.open_base(base_dir)
    assert base.family == "sdxl" and "text_encoder_2" in base.identity()
    man = json.load(open(os.path.join(cache, "_manifest.json")))
    basemod.check_cache(base, man, "cache")
    cfg = FinetuneConfig(
        latents=cache,
        base=base_dir,
        output=str(tmp_path / "o"),
        batch_size=2,
        lora_rank=2,
        lora_targets=basemod.ATTENTION,
    )
    stream = cache_stream(cfg, man, 0, 1, 0)
    batch = next(iter(stream))
    stream.close()
    p = batch.prompts
    assert p.pooled is not None and p.pooled.shape == (2, 32) and p.embeds.shape[-1] == 64
    assert p.time_ids[0].tolist() == [40, 48, 4, 8, 32, 32]
    unet = base.load_denoiser()
    trained = add_lora(unet, cfg.lora())
    obj = objectives.from_scheduler_config(base.scheduler_config())
    t = objectives.sample_timesteps(obj, 2)
    noise = torch.randn_like(batch.latents)
    kwargs = base.training.call(p, unet.config)
    assert kwargs["added_cond_kwargs"]["time_ids"] is p.time_ids
    out = unet(objectives.noisy_latents(obj, batch.latents, noise, t), timestep=t, **kwargs).sample
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


# --------------------------------------------------------------------------- PixArt-Σ and SD3

PIPELINES = {"pixart": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline"}
CAPTIONS = ["a cat", "a photo of a dog on the grass", "a very long caption about a red house by the sea"]


@pytest.fixture(scope="module")
def transformer_bases(tmp_path_factory):
    """Tiny PixArt-Σ and SD3 pipelines (test_base_models' builders), saved with safetensors."""
    root = tmp_path_factory.mktemp("transformer_bases")
    return {"pixart": build_pixart(str(root / "pixart")), "sd3": build_sd3(str(root / "sd3"))}


def _pipe(path: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_call(family: str, pipe, captions: list[str]) -> tuple[dict, basemod.Prompts]:
    """The denoiser's keyword arguments exactly as the pipeline's ``__call__`` builds them from
    its ``encode_prompt`` (PixArt: T5 padded to 300 tokens with its mask), and the same
    conditioning as the cache holds it (PixArt: stripped to the real tokens), as a batch."""
    n = len(captions)
    ids = torch.tensor([[40.0, 48, 4, 8, 32, 32]] * n)
    with torch.no_grad():
        if family == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu")
            ref = {
                "encoder_hidden_states": embeds,
                "encoder_attention_mask": mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            }
            lengths = mask.sum(1).tolist()
            assert len(set(lengths)) == n and max(lengths) < 300  # varied lengths, padded by the pipeline
            padded, m = basemod.pad_tokens(
                [e[:k].numpy() for e, k in zip(embeds, lengths)], [np.ones(k) for k in lengths]
            )
            assert padded.shape[1] == max(lengths) and m.sum(1).tolist() == lengths
            return ref, basemod.Prompts(torch.from_numpy(padded), None, torch.from_numpy(m), ids, ids[:, 4:])
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
        )
    ref = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    return ref, basemod.Prompts(embeds, pooled, None, ids, ids[:, 4:])


@pytest.mark.parametrize("family", list(PIPELINES))
def test_the_transformer_is_called_as_its_pipeline_calls_it_and_lora_trains_only_adapters(family, transformer_bases):
    """The TRAINING entry's call from cached (stripped, re-padded) conditioning gives the output
    the pipeline's own call gives; PixArt's loss is on the first half of its channels (the
    variance half is what its pipeline drops); LoRA on the family's default targets trains only
    the adapters."""
    base = basemod.open_base(transformer_bases[family])
    assert base.class_name == PIPELINES[family] and base.training is basemod.TRAINING[PIPELINES[family]]
    pipe = _pipe(transformer_bases[family])
    ref, prompts = _reference_call(family, pipe, CAPTIONS)
    model = base.load_denoiser()
    obj = objectives.from_scheduler_config(base.scheduler_config())
    assert obj.kind == ("flow" if family == "sd3" else "epsilon")
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = objectives.sample_timesteps(obj, 3, g)
    assert t.dtype == (torch.float32 if family == "sd3" else torch.long)  # sigma * 1000 / integer steps
    noisy = objectives.noisy_latents(obj, x, noise, t)
    with torch.no_grad():
        want = model(noisy, timestep=t, **ref, return_dict=False)[0]
        got = model(noisy, timestep=t, **base.training.call(prompts, model.config), return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    trained_out = base.training.prediction(got, x)
    assert want.shape[1] == (8 if family == "pixart" else 4) and trained_out.shape == x.shape
    torch.testing.assert_close(trained_out, got[:, :4])

    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = add_lora(model, {"r": 2, "lora_alpha": 2.0, "target_modules": base.training.lora_targets.split(",")})
    wrapped = {n.split("/lora_")[0].rsplit("/", 1)[-1] for n, _ in adapters.named_parameters()}
    assert wrapped >= {"to_q", "to_k", "to_v", "0"} | ({"add_q_proj", "add_k_proj"} if family == "sd3" else set())
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(noisy, timestep=t, **base.training.call(prompts, model.config), return_dict=False)[0]
        objectives.loss(obj, base.training.prediction(out, x), x, noise, t).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(
            after.get(k, after.get(k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))), v
        ), k


def _photos_with_captions(path, n: int = 6) -> str:
    from helpers import encode_image, photo_crops, write_tar

    members = []
    for i, im in enumerate(photo_crops(n, 48)):
        members += [(f"p{i}.png", encode_image(im)), (f"p{i}.txt", CAPTIONS[i % len(CAPTIONS)].encode())]
    write_tar(str(path), members)
    return str(path)


def _draw_transformer(pipe, family: str) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    kw = {"use_resolution_binning": False} if family == "pixart" else {}
    return pipe("a cat", num_inference_steps=2, height=32, width=32, generator=g, output_type="np", **kw).images[0]


@pytest.mark.parametrize("family", list(PIPELINES))
def test_encode_base_then_lora_finetune_then_export_loads_in_diffusers(
    family, transformer_bases, tmp_path, ray_cluster
):
    """PixArt-Σ and SD3 end to end on real parts: `encode --base` caches photos with captions of
    varied lengths, `finetune` trains LoRA adapters (the family's default targets) with the base's
    own objective on one Ray worker, and `export` writes what diffusers users load: SD3's
    `load_lora_weights` file, PixArt's peft adapter folder; the loaded adapters are the trained
    ones and change what the pipeline draws."""
    from pipeline.stages.encode import EncodeConfig, run_encode

    base_dir = transformer_bases[family]
    lat = str(tmp_path / "lat")
    man = run_encode(
        EncodeConfig(input=_photos_with_captions(tmp_path / "p.tar"), output=lat, base=base_dir, resolution=32)
    )
    assert man["totals"]["written"] == 6 and man["base"]["family"] == family
    out = tmp_path / "ft"
    opts = {"lora_rank": 4, "steps": 3, "checkpoint_every": 3, "caption_dropout": 0.3, "batch_size": 3}
    stream = cache_stream(_cfg({"cache": lat, "base": base_dir}, out, **{**opts, "caption_dropout": 0.0}), man, 0, 1, 0)
    p = next(iter(stream)).prompts
    stream.close()
    if family == "pixart":  # stripped T5 tokens of varied lengths, padded back with zero rows and mask
        lengths = [int(k) for k in p.mask.sum(1)]
        assert p.pooled is None and len(set(lengths)) > 1 and p.embeds.shape[1] == max(lengths)
        assert all(
            float(p.embeds[i, k:].abs().sum()) == 0 and int(p.mask[i, k:].sum()) == 0 for i, k in enumerate(lengths)
        )
    else:  # CLIP-L + CLIP-G (77, zero-padded to T5's width) then T5's 256 tokens; pooled of both CLIPs
        assert p.mask is None and p.embeds.shape == (3, 77 + 256, 96) and p.pooled.shape == (3, 40)
    result = run_finetune(_cfg({"cache": lat, "base": base_dir}, out, **opts))
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["loss"])
    local = checkpoint.local_copy(str(out))
    info = checkpoint.read_info(local)
    assert info.base["family"] == family and info.base["class"] == PIPELINES[family]
    assert info.base["lora"]["target_modules"] == basemod.TRAINING[PIPELINES[family]].lora_targets.split(",")
    assert info.base["objective"]["kind"] == ("flow" if family == "sd3" else "epsilon")
    ema = load_file(os.path.join(local, "ema.safetensors"))
    assert ema and all("lora_" in k for k in ema)

    lora_dir = tmp_path / "lora"
    assert cli.main(["export", "--checkpoint", str(out), "--output", str(lora_dir)]) == 0
    pipe = _pipe(base_dir)
    plain = _draw_transformer(pipe, family)
    if family == "sd3":
        assert os.listdir(lora_dir) == ["pytorch_lora_weights.safetensors"]
        pipe.load_lora_weights(str(lora_dir))
        loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_" in k}
    else:  # no LoRA loader for PixArt in diffusers: peft's adapter folder, loaded with PeftModel
        from peft import PeftModel

        assert sorted(os.listdir(lora_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
        peft_model = PeftModel.from_pretrained(pipe.transformer, str(lora_dir))
        loaded = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items() if "lora_" in k}
        pipe.transformer = peft_model.merge_and_unload()
    assert len(loaded) == len(ema)
    for name, tensor in ema.items():  # the trained adapters, whatever the adapter's name in the pipeline
        stem = name.replace("/", ".").replace(".default.", ".")
        match = [v for k, v in loaded.items() if k.replace(".default_0.", ".").replace(".default.", ".") == stem]
        assert len(match) == 1 and torch.equal(match[0].float(), tensor.float()), name
    tuned = _draw_transformer(pipe, family)
    assert tuned.shape == plain.shape == (32, 32, 3) and np.isfinite(tuned).all()
    assert np.abs(tuned - plain).mean() > 1e-4

    if family == "pixart":  # a full fine-tune of a transformer: a complete pipeline folder
        full = tmp_path / "full"
        run_finetune(_cfg({"cache": lat, "base": base_dir}, full, **{**opts, "lora_rank": 0, "steps": 1}))
        folder = run_export(ExportConfig(checkpoint=str(full), output=str(tmp_path / "pipe"), weights="raw"))
        exported = _pipe(folder)
        raw = load_file(os.path.join(checkpoint.local_copy(str(full)), "model.safetensors"))
        assert exported.transformer.state_dict().keys() == raw.keys()
        assert all(torch.equal(v, raw[k]) for k, v in exported.transformer.state_dict().items())
        assert np.isfinite(_draw_transformer(exported, family)).all()


def test_pixart_alpha_1024_models_get_the_image_size_as_their_pipeline_gives_it():
    """PixArtAlphaPipeline gives a transformer of ``sample_size`` 128 (the 1024-px models) the
    image's [height, width] in pixels and height / width; a batch's bucket is that size. Smaller
    PixArt-α models and every PixArt-Σ get None, as their pipelines give."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=128,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=3,  # a width of 3 x 8: the size embeddings take a third each
        patch_size=2,
        caption_channels=32,
        cross_attention_dim=24,
        norm_type="ada_norm_single",
    )
    assert model.use_additional_conditions
    size = torch.tensor([[32.0, 48.0], [32.0, 48.0]])  # a 48 x 32 bucket: (height, width)
    embeds, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    prompts = basemod.Prompts(embeds, None, mask, torch.zeros(2, 6), size)
    kwargs = basemod.TRAINING["PixArtAlphaPipeline"].call(prompts, model.config)
    want = {
        "resolution": torch.tensor([[32.0, 48.0]]).repeat(2, 1),
        "aspect_ratio": torch.tensor([[32 / 48]]).repeat(2, 1),
    }
    for name, value in want.items():
        torch.testing.assert_close(kwargs["added_cond_kwargs"][name], value)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10, 500])
    with torch.no_grad():
        got = model(x, timestep=t, **kwargs).sample
        ref = model(
            x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=want
        ).sample
    torch.testing.assert_close(got, ref)
    none = {"resolution": None, "aspect_ratio": None}
    assert basemod.TRAINING["PixArtSigmaPipeline"].call(prompts, model.config)["added_cond_kwargs"] == none
    small = PixArtTransformer2DModel(sample_size=64, num_layers=1, attention_head_dim=8, num_attention_heads=2)
    assert basemod.TRAINING["PixArtAlphaPipeline"].call(prompts, small.config)["added_cond_kwargs"] == none
    assert set(basemod.TRAINING) == set(FAMILIES)  # every family the encoder caches also trains


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
