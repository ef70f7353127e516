"""``latent-pipeline demo``: the embedded default, the whole workflow end to end on one machine.

Local Ray, local folders, photos shipped by scikit-image. Every stage calls the same function
as its CLI verb and cluster job. A stage whose output is complete is skipped, and the training
stages resume from their latest checkpoint, so an interrupted demo picks up where it stopped.

Stages: photos (crops of the bundled photos; one photo held out; captioned crops at three
aspect ratios) -> shards -> train-vae -> encode (with the upscale4 view) -> text-encoder (a tiny
random-weight stand-in, built offline) -> encode-captioned (aspect-ratio buckets, caption
embeddings, flipped latents) -> train (a text-conditioned transformer on the buckets) ->
train-refiner (the x4 pixel refiner, on crops at the photos' own scale) -> train --task upscale4
--refiner (the refiner bundled; the gain calibrated on other held-out crops) -> sample (per
prompt, at two aspect ratios) -> eval (held-out photos vs bicubic
/ Lanczos / back-projection / autoencoder) -> restore (Ray Data job over the degraded held-out
photos) -> report.html.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import RayOptions, group, option
from pipeline.io import checkpoint, sample_photos, storage
from pipeline.io.manifest import MANIFEST_NAME
from pipeline.models import degrade, text
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.eval import EvalConfig, evaluate
from pipeline.stages.report import write_report
from pipeline.stages.restore import RestoreConfig, run_restore
from pipeline.stages.sample import SampleConfig, run_sample
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.autoencoder import VAETrainConfig, run_train_vae
from pipeline.train.refiner import RefinerTrainConfig, run_train_refiner

log = logging.getLogger("pipeline.demo")

CAPTIONED_SIZES = [(96, 64), (64, 96), (80, 80)]  # crops at three aspect ratios
T2I_MODEL = "dit-tiny"
DEMO_PROMPTS = ["a photo of coffee", "a photo of a cat", "a photo of galaxies"]
SAMPLE_SIZES = [(80, 48), (48, 80)]  # two aspect-ratio buckets


def prompt_sheet(ckpt: str, out: str, steps: int, workdir: str, per_cell: int = 2) -> None:
    """Samples per prompt (rows) at each size (columns), ``per_cell`` each, as one PNG."""
    from PIL import Image, ImageDraw

    cells = []
    for prompt in DEMO_PROMPTS:
        row = []
        for w, h in SAMPLE_SIZES:
            tmp = os.path.join(workdir, f".sample-{w}x{h}.png")
            row.append(
                run_sample(
                    SampleConfig(
                        checkpoint=ckpt, out=tmp, n=per_cell, steps=steps, sampler="heun", cfg_scale=3.0,
                        prompt=prompt, width=w, height=h,
                    )
                )
            )  # fmt: skip
            os.remove(tmp)
        cells.append(row)
    label_w, pad = 150, 6
    col_w = [max(r[j].width for r in cells) for j in range(len(SAMPLE_SIZES))]
    row_h = [max(c.height for c in r) for r in cells]
    sheet = Image.new("RGB", (label_w + sum(col_w) + pad * len(col_w), sum(row_h) + pad * len(row_h)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for prompt, row, rh in zip(DEMO_PROMPTS, cells, row_h):
        draw.text((4, y + rh // 2 - 6), prompt, fill="black")
        x = label_w
        for img, cw in zip(row, col_w):
            sheet.paste(img, (x, y))
            x += cw + pad
        y += rh + pad
    sheet.save(out)


@dataclass
class DemoConfig:
    workdir: str = option("demo-out", "folder for every artefact of the demo")
    quick: bool = option(False, "a reduced run (fewer crops and steps) for tests and a first look")
    ray: RayOptions = group(RayOptions, private=True)


@dataclass(frozen=True)
class Budget:
    crops_per_photo: int
    captioned_per_photo: int
    vae_steps: int
    diffusion_steps: int
    task_steps: int
    refiner_crops_per_photo: int
    refiner_steps: int
    heldout: int
    sample_steps: int
    restore_steps: int


FULL = Budget(
    crops_per_photo=48,
    captioned_per_photo=48,
    vae_steps=450,
    diffusion_steps=600,
    task_steps=500,
    refiner_crops_per_photo=48,
    refiner_steps=700,
    heldout=6,
    sample_steps=30,
    restore_steps=20,
)
QUICK = Budget(
    crops_per_photo=8,
    captioned_per_photo=6,
    vae_steps=40,
    diffusion_steps=30,
    task_steps=30,
    refiner_crops_per_photo=4,
    refiner_steps=20,
    heldout=3,
    sample_steps=6,
    restore_steps=4,
)


def _checkpoint_step(url: str) -> int:
    """The step of the newest checkpoint of a training output (0 when there is none yet)."""
    try:
        return checkpoint.read_info(checkpoint.local_copy(url)).step
    except checkpoint.CheckpointError:
        return 0


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.time()
    b = QUICK if cfg.quick else FULL
    wd = os.path.abspath(cfg.workdir)
    p = {
        name: os.path.join(wd, name)
        for name in (
            "photos",
            "heldout",
            "calibration",
            "lowres",
            "image-shards",
            "vae",
            "latents",
            "diffusion",
            "upscale4",
            "refiner-photos",
            "refiner-shards",
            "heldout-shards",
            "refiner4",
            "samples.png",
            "eval",
            "restored",
            "captioned",
            "captioned-shards",
            "text-encoder",
            "captioned-latents",
        )
    }
    stages: dict[str, dict] = {}
    state_file = os.path.join(wd, "stages.json")
    if os.path.exists(state_file):
        stages = json.load(open(state_file))

    def stage(name: str, done: bool, fn, items: int | None = None, unit: str = "") -> None:
        if done and name in stages:
            log.info(f"[demo] {name}: already done ({stages[name]['seconds']}s earlier), skipped")
            return
        log.info(f"[demo] === {name} ===")
        t0 = time.time()
        fn()
        secs = round(time.time() - t0, 2)
        stages[name] = {
            "seconds": secs,
            "items": items,
            "unit": unit,
            "rate": round(items / secs, 2) if items and secs else None,
        }
        os.makedirs(wd, exist_ok=True)
        with open(state_file, "w") as f:
            json.dump(stages, f, indent=2)

    def photos() -> None:
        sample_photos.write_crops(p["photos"], per_photo=b.crops_per_photo)
        # the x4 refiner learns pixel detail: crops at (up to) the photos' own scale, all PNG; a
        # refiner trained on crops of the photos brought down to 256 px over-sharpens whole photos
        sample_photos.write_crops(
            p["refiner-photos"], crop=192, per_photo=b.refiner_crops_per_photo, seed=4, short_side=512, png_every=1
        )
        sample_photos.write_captioned_crops(p["captioned"], CAPTIONED_SIZES, per_photo=b.captioned_per_photo)
        held = sample_photos.write_held_out(p["heldout"], size=128, count=b.heldout)
        # to calibrate the x4 model's gain on: other crops of the held-out photo and of 3 other photos
        sample_photos.write_calibration(p["calibration"], size=128, count=b.heldout, seed=2)
        os.makedirs(p["lowres"], exist_ok=True)
        for path in held:  # the degraded inputs a user would bring to `restore`
            name = os.path.basename(path)
            from PIL import Image

            degrade.degrade("upscale4", Image.open(path), degrade.seed_for(name)).save(os.path.join(p["lowres"], name))
        open(p["photos"] + ".done", "w").close()  # beside the folder: inside, it would be an input

    n_crops = b.crops_per_photo * len(sample_photos.PHOTOS)
    stage("photos", os.path.exists(p["photos"] + ".done"), photos, n_crops, "images")
    stage(
        "shards",
        os.path.exists(os.path.join(p["image-shards"], "_index.json")),
        lambda: run_shards(
            ShardsConfig(src=p["photos"], out=p["image-shards"], samples_per_shard=48, class_from="folder")
        ),
        n_crops,
        "images",
    )
    common: dict[str, Any] = {"workers": 2, "ray": cfg.ray, "log_every": 10 if cfg.quick else 50}
    stage(
        "train-vae",
        _checkpoint_step(p["vae"]) >= b.vae_steps,
        lambda: run_train_vae(
            VAETrainConfig(
                images=storage.join(p["image-shards"], "shard-*.tar"),
                output=p["vae"],
                steps=b.vae_steps,
                batch_size=16,
                resolution=64,
                lr=2e-3,
                warmup_steps=min(50, b.vae_steps // 4),
                checkpoint_every=max(10, b.vae_steps // 3),
                eval_images=24,
                **common,
            )
        ),
        b.vae_steps * 16 * 2,
        "samples",
    )
    stage(
        "encode",
        os.path.exists(os.path.join(p["latents"], MANIFEST_NAME)),
        lambda: run_encode(
            EncodeConfig(
                input=storage.join(p["image-shards"], "shard-*.tar"),
                output=p["latents"],
                vae=p["vae"],
                resolution=64,
                tasks=["upscale4"],
                ray=cfg.ray,
            )
        ),
        n_crops,
        "images",
    )
    stage(
        "text-encoder",
        os.path.exists(os.path.join(p["text-encoder"], "config.json")),
        lambda: text.build_stand_in(p["text-encoder"], list(sample_photos.CAPTIONS.values()), kind="clip", width=64),
    )
    n_captioned = b.captioned_per_photo * len(sample_photos.PHOTOS)
    stage(
        "shards-captioned",
        os.path.exists(os.path.join(p["captioned-shards"], "_index.json")),
        lambda: run_shards(ShardsConfig(src=p["captioned"], out=p["captioned-shards"], samples_per_shard=48)),
        n_captioned,
        "images",
    )
    stage(
        "encode-captioned",
        os.path.exists(os.path.join(p["captioned-latents"], MANIFEST_NAME)),
        lambda: run_encode(
            EncodeConfig(
                input=storage.join(p["captioned-shards"], "shard-*.tar"),
                output=p["captioned-latents"],
                vae=p["vae"],
                resolution=64,
                buckets="auto",  # 64x64, 80x48 and 48x80 at area 64^2, multiple 16, aspect <= 2
                bucket_multiple=16,
                max_aspect=2.0,
                flip=True,
                text_encoder=[p["text-encoder"]],
                ray=cfg.ray,
            )
        ),
        n_captioned,
        "images",
    )
    stage(
        "train",
        _checkpoint_step(p["diffusion"]) >= b.diffusion_steps,
        lambda: run_train(
            TrainConfig(
                latents=p["captioned-latents"],
                output=p["diffusion"],
                model=T2I_MODEL,
                steps=b.diffusion_steps,
                batch_size=32,
                lr=1e-3,
                warmup_steps=min(50, b.diffusion_steps // 4),
                checkpoint_every=max(10, b.diffusion_steps // 3),
                flip_prob=0.5,
                caption_dropout=0.1,
                sample_steps=b.sample_steps,
                **common,
            )
        ),
        b.diffusion_steps * 32 * 2,
        "samples",
    )

    def refiner_shards() -> None:
        run_shards(ShardsConfig(src=p["refiner-photos"], out=p["refiner-shards"], samples_per_shard=64))
        run_shards(ShardsConfig(src=p["heldout"], out=p["heldout-shards"], samples_per_shard=64))

    stage(
        "shards-refiner",
        os.path.exists(os.path.join(p["heldout-shards"], "_index.json")),
        refiner_shards,
        b.refiner_crops_per_photo * len(sample_photos.PHOTOS) + b.heldout,
        "images",
    )
    stage(
        "train-refiner",
        _checkpoint_step(p["refiner4"]) >= b.refiner_steps,
        lambda: run_train_refiner(
            RefinerTrainConfig(
                task="upscale4",
                images=storage.join(p["refiner-shards"], "shard-*.tar"),
                heldout=storage.join(p["heldout-shards"], "shard-*.tar"),
                output=p["refiner4"],
                steps=b.refiner_steps,
                checkpoint_every=max(10, b.refiner_steps // 2),
                eval_images=b.heldout,
                workers=1,
                cpus_per_worker=2.0,  # one rank with both cores: the batch is small
                ray=cfg.ray,
                log_every=common["log_every"],
            )
        ),
        b.refiner_steps * 16,
        "samples",
    )
    stage(
        "train-upscale4",
        _checkpoint_step(p["upscale4"]) >= b.task_steps,
        lambda: run_train(
            TrainConfig(
                latents=p["latents"],
                output=p["upscale4"],
                task="upscale4",
                steps=b.task_steps,
                batch_size=32,
                lr=1e-3,
                warmup_steps=min(50, b.task_steps // 4),
                checkpoint_every=max(10, b.task_steps // 3),
                calibration_images=p["calibration"],  # the detail gain restore then uses by default
                refiner=p["refiner4"],  # carried in the checkpoint: restore's fidelity mode uses it
                **common,
            )
        ),
        b.task_steps * 32 * 2,
        "samples",
    )
    stage(
        "sample",
        os.path.exists(p["samples.png"]),
        lambda: prompt_sheet(p["diffusion"], p["samples.png"], b.sample_steps, cfg.workdir),
        len(DEMO_PROMPTS) * 2 * len(SAMPLE_SIZES),
        "images",
    )
    result: dict = {}

    def do_eval() -> None:
        result.update(
            evaluate(
                EvalConfig(
                    task="upscale4",
                    checkpoint=p["upscale4"],
                    images=p["heldout"],
                    out=p["eval"],
                    settings=RestoreSettings(steps=b.restore_steps),
                )
            )
        )

    stage("eval", os.path.exists(os.path.join(p["eval"], "eval.json")), do_eval, b.heldout, "images")
    ev = storage.read_json(os.path.join(p["eval"], "eval.json"))
    stage(
        "restore",
        os.path.exists(os.path.join(p["restored"], "_report.json")),
        lambda: run_restore(
            RestoreConfig(
                input=p["lowres"],
                output=p["restored"],
                checkpoint=p["upscale4"],
                task="upscale4",
                cpus_per_actor=0.75,
                ray=cfg.ray,
                settings=RestoreSettings(steps=b.restore_steps),  # the gain calibrated at training
            )
        ),
        b.heldout,
        "images",
    )
    report = write_report(wd, p, stages, total_seconds=round(time.time() - t_start, 1))
    log.info(f"[demo] finished in {time.time() - t_start:.0f}s; report: {report}")
    return {"report": report, "stages": stages, "eval": ev}
