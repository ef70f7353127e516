"""Pretrained diffusers x4 super-resolution pipelines (LDMSuperResolutionPipeline and
StableDiffusionUpscalePipeline) in the restore job, with tiny random pipelines built here (nothing
is downloaded): sizes, tiling, equality with the library's own call, refusals on the driver, and
the Ray Data job."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import photo_crops
from pipeline import cli
from pipeline.config import ConfigError
from pipeline.io.checkpoint import CheckpointError
from pipeline.restoration import pipeline_folders
from pipeline.restoration.pipelines import PipelineRestorer
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.restore import RestoreConfig, run_restore


def _ldm(seed: int = 0, *, noise_free: bool = False):
    """A tiny random x4 LDM super-resolution pipeline: the UNet denoises 3 latent channels
    concatenated with the low-res image at the low-res size; the VQ decoder upsamples x4.

    ``noise_free``: the UNet ignores the latent channels and predicts the sample, so the output
    (the last DDIM step's prediction) does not depend on the sampler noise: a deterministic
    function of the image, for comparing tiled with untiled runs."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(seed)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=32,
        norm_num_groups=8,
    )
    unet = UNet2DModel(
        sample_size=32,
        in_channels=6,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(prediction_type="sample") if noise_free else DDIMScheduler()
    if noise_free:
        with torch.no_grad():
            unet.conv_in.weight[:, :3] = 0
    return LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)


def _sd_upscale(root, seed: int = 0):
    """A tiny random StableDiffusionUpscalePipeline: a x4 AutoencoderKL (4 latent channels at the
    low-res size), a UNet on 4 latent + 3 image channels conditioned on the noise level and a
    stand-in CLIP text encoder with its (fast, word-level) tokenizer."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel

    from pipeline.models.text import build_stand_in

    text_dir = build_stand_in(str(root / "text"), ["a photo of a cat", "a dog"], kind="clip", width=32, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.08333,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=351,
    )
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(text_dir),
        tokenizer=AutoTokenizer.from_pretrained(text_dir),
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(),
        max_noise_level=350,
    )


def _save(pipe, path, safe: bool = True) -> str:
    pipe.save_pretrained(str(path), safe_serialization=safe)
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saved pipeline folders (and the pipelines as built, for the library's own calls)."""
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for name, pipe in (
        ("ldm", _ldm(0)),
        ("ldm_noise_free", _ldm(1, noise_free=True)),
        ("sd", _sd_upscale(root, 0)),
    ):
        pipe.set_progress_bar_config(disable=True)
        out[name] = (_save(pipe, root / name), pipe)
    return out


def _px(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.float32)


@pytest.mark.parametrize("kind", ["ldm", "sd"])
def test_outputs_are_exactly_four_times_the_input_whatever_its_size(saved, kind):
    folder, _pipe = saved[kind]
    assert pipeline_folders.is_pipeline_folder(folder) and pipeline_folders.describe(folder, "") == "upscale4"
    r = PipelineRestorer(folder, "", RestoreSettings(steps=2))
    assert (r.task, r.scale, r.gain) == ("upscale4", 4, 1.0)
    ims = [photo_crops(1, 40, seed=1)[0].crop((0, 0, w, h)) for w, h in ((24, 16), (40, 40), (21, 13), (24, 16))]
    outs = r.restore_many(ims)
    assert [o.size for o in outs] == [(96, 64), (160, 160), (84, 52), (96, 64)]
    assert all(o.mode == "RGB" for o in outs)
    assert r.restore(ims[2]).size == (84, 52)


@pytest.mark.parametrize("kind", ["ldm", "sd"])
def test_an_untiled_image_matches_the_librarys_own_call(saved, kind):
    folder, pipe = saved[kind]
    im = photo_crops(1, 64, seed=2)[0].crop((0, 0, 64, 32))  # already a multiple of 32: no padding
    out = PipelineRestorer(folder, "upscale4", RestoreSettings(steps=2, seed=3)).restore(im)
    kwargs = {"prompt": "", "guidance_scale": 1.0} if kind == "sd" else {}
    ref = pipe(
        image=im, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs
    ).images[0]
    assert out.size == (256, 128) and ref.shape == (128, 256, 3)
    assert np.abs(_px(out) - np.round(ref * 255)).max() <= 1
    # another seed is another sample (the seed reaches the sampler)
    other = PipelineRestorer(folder, "upscale4", RestoreSettings(steps=2, seed=4)).restore(im)
    assert np.abs(_px(other) - _px(out)).mean() > 0.5


def test_16bit_levels_go_through_a_pipeline_unrounded(saved):
    from helpers import gradient_16bit

    levels = gradient_16bit(32, 32) / np.float32(257)
    r = PipelineRestorer(saved["ldm"][0], "upscale4", RestoreSettings(steps=2, seed=3))
    out = r.restore(levels)
    assert isinstance(out, np.ndarray) and out.shape == (128, 128, 3) and out.dtype == np.float32
    assert np.abs(out - np.round(out)).max() > 0.01  # levels between the 8-bit ones are kept
    # the same call on the 8-bit image rounds to it (within the pipeline's sensitivity to its input)
    as_8bit = np.asarray(r.restore(Image.fromarray(np.round(levels).astype(np.uint8), "RGB")), np.float32)
    assert np.abs(as_8bit - out).mean() < 8


class _NearestX4:
    """Stands in for the LDM pipeline's call: x4 nearest upsampling, a map with no reach beyond
    the pixel, so tiled and untiled runs must agree exactly; records the shapes it was called on."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, image, **kwargs):
        self.shapes.append(tuple(image.shape))
        return SimpleNamespace(images=F.interpolate((image + 1) / 2, scale_factor=4, mode="nearest"))


@pytest.mark.parametrize("size", [(64, 48), (50, 37)])
def test_tiles_are_padded_placed_blended_and_cropped_exactly(saved, size):
    im = photo_crops(1, 64, seed=5)[0].crop((0, 0, *size))
    expected = np.asarray(im).repeat(4, 0).repeat(4, 1)
    for tile, windows in ((512, 1), (128, 9)):  # 128 output px: 32 px input tiles, 8 px overlap
        r = PipelineRestorer(saved["ldm"][0], "", RestoreSettings(tile=tile, overlap=32))
        r.pipe = _NearestX4()
        out = r.restore(im)
        assert np.array_equal(np.asarray(out), expected), (size, tile)
        # the padded input (64 x 64) whole, or 3 x 3 windows of 32 px (batched into the calls)
        assert sum(s[0] for s in r.pipe.shapes) == windows
        assert {s[-2:] for s in r.pipe.shapes} == {(64, 64) if tile == 512 else (32, 32)}


def test_a_tiled_pipeline_agrees_with_the_untiled_one_at_low_frequencies(saved):
    """The real pipeline tiled: its GroupNorms and attention see the tile, not the image, and the
    VQ codes of a random model flip easily, so pixels differ; the content agrees where it lies."""
    folder, _pipe = saved["ldm_noise_free"]
    im = photo_crops(1, 64, seed=5)[0].crop((0, 0, 64, 48))
    whole = PipelineRestorer(folder, "", RestoreSettings(steps=2, tile=512)).restore(im)
    tiled = PipelineRestorer(folder, "", RestoreSettings(steps=2, tile=128, overlap=32)).restore(im)
    assert whole.size == tiled.size == (256, 192)

    def pooled(x: Image.Image) -> np.ndarray:  # 16 x 16 output px cells, in [-1, 1]
        t = torch.from_numpy(_px(x) / 127.5 - 1).permute(2, 0, 1)[None]
        return F.avg_pool2d(t, 16)[0].numpy()

    a, b = pooled(whole), pooled(tiled)
    corr = np.corrcoef((a - a.mean()).ravel(), (b - b.mean()).ravel())[0, 1]
    assert np.abs(a - b).mean() < 0.1 and corr > 0.75, (np.abs(a - b).mean(), corr)


def test_unsupported_pickled_or_mismatched_pipelines_are_refused_on_the_driver(tmp_path, saved, capsys):
    other = tmp_path / "sd_txt2img"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert pipeline_folders.is_pipeline_folder(str(other))
    with pytest.raises(ConfigError, match="'StableDiffusionPipeline' pipeline; restore runs only"):
        pipeline_folders.describe(str(other), "")
    pickled = _save(_ldm(2), tmp_path / "pickled", safe=False)
    with pytest.raises(CheckpointError, match=r"unet/ has only pickle weights \(diffusion_pytorch_model.bin\)"):
        pipeline_folders.describe(pickled, "")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        PipelineRestorer(pickled, "", RestoreSettings())
    with pytest.raises(ConfigError, match="its task is 'upscale4', not 'upscale2'"):
        pipeline_folders.describe(saved["ldm"][0], "upscale2")
    custom = tmp_path / "custom"
    shutil.copytree(saved["ldm"][0], custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"comes from 'my_unet'.*no code from the folder is run"):
        pipeline_folders.describe(str(custom), "")
    assert not pipeline_folders.is_pipeline_folder(str(tmp_path / "nothing"))
    (tmp_path / "in").mkdir()
    photo_crops(1, 16)[0].save(tmp_path / "in" / "a.png")
    for checkpoint, task, words in ((pickled, "", "pickle weights"), (saved["ldm"][0], "upscale2", "not 'upscale2'")):
        argv = ["restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--checkpoint", checkpoint]
        rc = cli.main([*argv, *(["--task", task] if task else [])])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def test_the_restore_job_runs_a_pipeline(saved, tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    photo_crops(1, 24, seed=6)[0].crop((0, 0, 24, 16)).save(tmp_path / "in" / "p0.png")
    Image.new("L", (20, 12), 90).save(tmp_path / "in" / "grey.png")
    report = run_restore(
        RestoreConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "o"),
            checkpoint=saved["ldm"][0],
            settings=RestoreSettings(steps=2),
            cpus_per_actor=0.5,
        )
    )
    assert (report["seen"], report["written"], report["errors"], report["task"]) == (2, 2, 0, "upscale4")
    on_disk = json.loads((tmp_path / "o" / "_report.json").read_text())
    assert (on_disk["written"], on_disk["errors"]) == (2, 0)
    assert Image.open(tmp_path / "o" / "p0.png").size == (96, 64)
    grey = Image.open(tmp_path / "o" / "grey.png")
    assert grey.size == (80, 48) and grey.mode == "L"
    assert sorted(os.listdir(tmp_path / "o")) == ["_errors.jsonl", "_report.json", "grey.png", "p0.png"]


def test_a_prompt_reaches_the_sd_upscaler_and_is_refused_elsewhere(saved, tmp_path, capsys):
    folder, pipe = saved["sd"]
    im = photo_crops(1, 64, seed=2)[0].crop((0, 0, 32, 32))
    out = PipelineRestorer(folder, "upscale4", RestoreSettings(steps=2, seed=3), prompt="a photo").restore(im)
    ref = pipe(
        prompt="a photo",
        image=im,
        guidance_scale=9.0,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    assert np.abs(_px(out) - np.round(ref * 255)).max() <= 1
    empty = PipelineRestorer(folder, "upscale4", RestoreSettings(steps=2, seed=3)).restore(im)
    assert np.abs(_px(out) - _px(empty)).mean() > 0.5  # the prompt changes the output
    (tmp_path / "in").mkdir()
    im.save(tmp_path / "in" / "a.png")
    for checkpoint, words in (
        (saved["ldm"][0], "or StableDiffusionInpaintPipeline takes a prompt, not a LDM"),
        (str(tmp_path / "net.safetensors"), "or StableDiffusionInpaintPipeline folder takes a prompt"),
    ):
        argv = ["restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--prompt", "a photo"]
        rc = cli.main([*argv, "--checkpoint", checkpoint])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def test_eval_scores_a_pipeline_next_to_the_classical_rows(saved, tmp_path):
    from pipeline.stages.eval import EvalConfig, evaluate

    (tmp_path / "hr").mkdir()
    photo_crops(1, 64, seed=16)[0].save(tmp_path / "hr" / "p.png")
    result = evaluate(
        EvalConfig(
            task="upscale4",
            checkpoint=saved["ldm"][0],
            images=str(tmp_path / "hr"),
            out=str(tmp_path / "e"),
            settings=RestoreSettings(steps=2),
        )
    )
    assert set(result["scores"]) == {"model", "bicubic", "lanczos", "back_projection"}
    assert 0 < result["scores"]["model"]["psnr"] < 60 and result["recommended_gain"] is None
