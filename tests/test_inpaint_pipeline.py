"""A diffusers StableDiffusionInpaintPipeline folder as an inpainting backend, with a tiny random
pipeline built here (nothing is downloaded): its fill is the library's own call, the crop around
a hole in a large image, the restore job on the S3 test endpoint, eval, and refusals on the driver."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_bases import PROMPTS, save, sd_pipeline

from helpers import photo_crops
from pipeline import cli
from pipeline.io import storage
from pipeline.models import degrade
from pipeline.restoration import backends, inpaint_pipeline
from pipeline.restoration.inpaint_pipeline import PipelineInpainter
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.restore import RestoreConfig, run_restore


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saved inpainting pipeline folder and the pipeline as built (for the library's own call)."""
    root = tmp_path_factory.mktemp("sd-inpaint")
    pipe = sd_pipeline(root, 0, inpaint=True)
    return save(pipe, root / "inpaint"), pipe


def _hole(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    hole = np.zeros((h, w), bool)
    hole[box[0] : box[2], box[1] : box[3]] = True
    return hole


def _mask(hole: np.ndarray) -> Image.Image:
    return Image.fromarray(hole.astype(np.uint8) * 255, "L")


def _own_call(pipe, im: Image.Image, hole: np.ndarray, steps: int, seed: int, prompt: str = "") -> np.ndarray:
    """The library's own call on the whole image, 0..255 float (H, W, 3)."""
    return (
        pipe(
            prompt=prompt,
            image=im,
            mask_image=_mask(hole),
            height=im.height,
            width=im.width,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=inpaint_pipeline.PROMPT_GUIDANCE if prompt else 1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        * 255
    )


def test_the_fill_is_the_pipelines_own_call_and_a_prompt_or_seed_changes_it(saved):
    folder, pipe = saved
    assert backends.check(folder, "") == "inpaint" and backends.backend_for(folder).name == "inpaint-pipeline"
    im = photo_crops(1, 48, seed=3)[0].crop((0, 0, 48, 40))
    hole = _hole(40, 48, (10, 12, 30, 36))

    def fill(prompt: str = "", seed: int = 5) -> np.ndarray:
        r = PipelineInpainter(folder, "inpaint", RestoreSettings(steps=3, seed=seed), prompt=prompt)
        assert (r.task, r.gain) == ("inpaint", 1.0)  # a pretrained pipeline's own fill by default
        parts = r.inpaint_parts(im, hole)
        assert parts.fill is not None
        return parts.fill

    empty = fill()
    np.testing.assert_allclose(empty[hole], _own_call(pipe, im, hole, 3, 5)[hole], atol=1e-2)
    prompted = fill(PROMPTS[1])
    np.testing.assert_allclose(prompted[hole], _own_call(pipe, im, hole, 3, 5, PROMPTS[1])[hole], atol=1e-2)
    assert np.abs(prompted - empty)[hole].mean() > 0.5
    assert np.abs(fill(seed=6) - empty)[hole].mean() > 0.5


def test_a_hole_in_a_large_image_is_filled_from_a_window_no_larger_than_the_tile(saved):
    folder, _pipe = saved
    r = PipelineInpainter(folder, "inpaint", RestoreSettings(steps=2, tile=64, overlap=8))
    shapes: list[tuple[int, ...]] = []
    call = r._call
    r._call = lambda x, m: shapes.append(tuple(x.shape)) or call(x, m)  # type: ignore[method-assign]
    im = photo_crops(1, 96, seed=4)[0].crop((0, 0, 96, 80))
    small, large = _hole(80, 96, (40, 60, 50, 75)), _hole(80, 96, (5, 10, 75, 80))
    # a small hole: tile-sized window around it at the image's resolution, clamped to the image
    assert inpaint_pipeline.window(small, 64) == (13, 32, 77, 96)
    # a hole too large for the tile: its box with half its side of context, resized down to the tile
    assert inpaint_pipeline.window(large, 64) == (0, 0, 80, 96)
    for hole in (small, large):
        parts = r.inpaint_parts(im, hole)
        assert parts.fill is not None and np.isfinite(parts.fill).all()
        assert np.abs(parts.fill - parts.base)[hole].mean() > 1  # the pipeline filled it
        out = np.asarray(r.restore(im, _mask(hole)))
        np.testing.assert_array_equal(out[~hole], np.asarray(im)[~hole])
    assert [s[-2:] for s in shapes[::2]] == [(64, 64), (56, 64)]  # 80 x 96 -> 53 x 64, padded to 8
    assert max(max(s[-2:]) for s in shapes) <= 64


def test_the_restore_job_inpaints_with_a_pipeline_folder_on_s3(saved, bucket, ray_cluster):
    folder, pipe = saved
    storage.upload_dir(folder, f"{bucket}/model", commit_last="")
    ims = {
        "a": photo_crops(1, 48, seed=7)[0].crop((0, 0, 48, 40)),
        "b": photo_crops(1, 96, seed=8)[0].crop((0, 0, 96, 80)),
    }
    holes = {"a": _hole(40, 48, (8, 10, 30, 34)), "b": _hole(80, 96, (30, 20, 52, 50))}
    for key, im in ims.items():
        for where, pic in (("in", im), ("masks", _mask(holes[key]))):
            buf = io.BytesIO()
            pic.save(buf, format="PNG")
            storage.write_bytes(f"{bucket}/{where}/{key}.png", buf.getvalue())

    def restore(name: str, **kw) -> dict[str, np.ndarray]:
        settings = RestoreSettings(steps=2, seed=3, tile=64, overlap=8, gain=kw.pop("gain", None))
        report = run_restore(
            RestoreConfig(
                input=f"{bucket}/in",
                output=f"{bucket}/{name}",
                checkpoint=f"{bucket}/model",
                task="inpaint",
                mask=f"{bucket}/masks",
                actors=1,
                settings=settings,
                **kw,
            )
        )
        assert (report["seen"], report["written"], report["errors"], report["task"]) == (2, 2, 0, "inpaint")
        assert len(report["actors"]) == 1  # one pipeline load for the whole job
        return {k: np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{bucket}/{name}/{k}.png")))) for k in ims}

    default, zero, prompted = restore("d"), restore("z", gain=0.0), restore("p", prompt=PROMPTS[2])
    for key, im in ims.items():
        px, hole = np.asarray(im), holes[key]
        for out in (default[key], zero[key], prompted[key]):
            np.testing.assert_array_equal(out[~hole], px[~hole])  # outside the hole: byte-identical
        base = np.round(np.clip(degrade.inpaint_base(im, hole), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(zero[key], base)  # gain 0: exactly the biharmonic base
        assert np.abs(prompted[key].astype(int) - default[key])[hole].mean() > 0.5  # the prompt reached it
    # the image that fits one tile: the hole's interior is the library's own fill (up to rounding)
    inner = degrade.feather(holes["a"]) >= 1
    ref = np.round(np.clip(_own_call(pipe, ims["a"], holes["a"], 2, 3), 0, 255))
    assert inner.sum() > 100 and np.abs(default["a"].astype(int) - ref)[inner].max() <= 1


def test_eval_scores_a_pipeline_folders_fill_next_to_the_classical_base(saved, tmp_path):
    from pipeline.stages.eval import EvalConfig, evaluate

    (tmp_path / "held").mkdir()
    for i, im in enumerate(photo_crops(2, 48, seed=21)):
        im.save(tmp_path / "held" / f"h{i}.png")
    res = evaluate(
        EvalConfig(
            task="inpaint",
            checkpoint=saved[0],
            images=str(tmp_path / "held"),
            out=str(tmp_path / "e"),
            settings=RestoreSettings(steps=2),
        )
    )
    rows = res["scores"]
    assert set(rows) == {"model", "classical_base"} and res["images"] == 2 and res["gain"] == 1.0
    assert res["calibration"]["1.0"]["psnr"] == pytest.approx(rows["model"]["psnr"], abs=1e-3)
    assert res["calibration"]["1.0"]["psnr"] != res["calibration"]["0.0"]["psnr"]  # the pipeline was run
    assert res["recommended_gain"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_wrong_or_hostile_inpainting_folders_are_refused_in_one_line(saved, tmp_path, capsys):
    from test_pipelines import _ldm, _save

    text_to_image = save(sd_pipeline(tmp_path, 1, inpaint=True, unet_channels=4), tmp_path / "four")
    pickled = tmp_path / "pickled"
    shutil.copytree(saved[0], pickled)
    unet = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet), pickled / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    custom = tmp_path / "custom"
    shutil.copytree(saved[0], custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    upscaler = _save(_ldm(0), tmp_path / "ldm")
    (tmp_path / "in").mkdir()
    photo_crops(1, 16)[0].save(tmp_path / "in" / "a.png")
    for checkpoint, task, words in (
        (text_to_image, "inpaint", "unet/ takes 4 input channels, not an inpainting UNet's 9"),
        (str(pickled), "inpaint", "unet/ has only pickle weights (diffusion_pytorch_model.bin)"),
        (str(custom), "inpaint", "comes from 'my_unet'"),
        (saved[0], "upscale4", "is an inpainting pipeline, so its task is 'inpaint', not 'upscale4'"),
        (upscaler, "inpaint", "is a x4 super-resolution pipeline, so its task is 'upscale4', not 'inpaint'"),
    ):
        argv = ["restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--checkpoint", checkpoint]
        rc = cli.main([*argv, "--task", task])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
