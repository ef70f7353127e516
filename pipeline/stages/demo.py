"""``latent-pipeline demo``: the embedded default, the whole workflow end to end on one machine.

Local Ray, local folders, photos shipped by scikit-image. Every stage calls the same function
as its CLI verb and cluster job. A stage whose output is complete is skipped, and the training
stages resume from their latest checkpoint, so an interrupted demo picks up where it stopped.

Stages: photos (crops of the bundled photos; one photo held out) -> shards -> train-vae ->
encode (with the upscale4 view) -> train (class-conditional generator) -> train --task upscale4
-> sample -> eval (held-out photos vs bicubic / Lanczos / autoencoder) -> restore (Ray Data
job over the degraded held-out photos) -> report.html.
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
from pipeline.models import degrade
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.eval import EvalConfig, evaluate
from pipeline.stages.report import write_report
from pipeline.stages.restore import RestoreConfig, run_restore
from pipeline.stages.sample import SampleConfig, run_sample
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.autoencoder import VAETrainConfig, run_train_vae

log = logging.getLogger("pipeline.demo")


@dataclass
class DemoConfig:
    workdir: str = option("demo-out", "folder for every artefact of the demo")
    quick: bool = option(False, "a reduced run (fewer crops and steps) for tests and a first look")
    ray: RayOptions = group(RayOptions, private=True)


@dataclass(frozen=True)
class Budget:
    crops_per_photo: int
    vae_steps: int
    diffusion_steps: int
    task_steps: int
    heldout: int
    sample_steps: int
    restore_steps: int


FULL = Budget(
    crops_per_photo=48, vae_steps=600, diffusion_steps=600, task_steps=600, heldout=6, sample_steps=30, restore_steps=20
)
QUICK = Budget(
    crops_per_photo=8, vae_steps=40, diffusion_steps=30, task_steps=30, heldout=3, sample_steps=6, restore_steps=4
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
            "samples.png",
            "eval",
            "restored",
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
        held = sample_photos.write_held_out(p["heldout"], size=128, count=b.heldout)
        # other crops of the held-out photo, to calibrate the x4 model's gain on (not the evaluation crops)
        sample_photos.write_held_out(p["calibration"], size=128, count=b.heldout, seed=2)
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
    num_classes = len(sample_photos.PHOTOS)
    stage(
        "train",
        _checkpoint_step(p["diffusion"]) >= b.diffusion_steps,
        lambda: run_train(
            TrainConfig(
                latents=p["latents"],
                output=p["diffusion"],
                steps=b.diffusion_steps,
                batch_size=32,
                lr=1e-3,
                warmup_steps=min(50, b.diffusion_steps // 4),
                checkpoint_every=max(10, b.diffusion_steps // 3),
                num_classes=num_classes,
                sample_steps=b.sample_steps,
                **common,
            )
        ),
        b.diffusion_steps * 32 * 2,
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
                **common,
            )
        ),
        b.task_steps * 32 * 2,
        "samples",
    )
    stage(
        "sample",
        os.path.exists(p["samples.png"]),
        lambda: run_sample(
            SampleConfig(
                checkpoint=p["diffusion"],
                out=p["samples.png"],
                n=2 * num_classes,
                steps=b.sample_steps,
                sampler="heun",
                cfg_scale=2.0,
                class_=list(range(num_classes)),
            )
        ),
        2 * num_classes,
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
