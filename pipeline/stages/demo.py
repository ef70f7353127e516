"""``latent-pipeline demo``: the embedded default, the whole workflow end to end on one machine.

Local Ray, local folders, photos shipped by scikit-image. Every stage calls the same function
as its CLI verb and cluster job. A stage whose output is complete is skipped, and the training
stages resume from their latest checkpoint, so an interrupted demo picks up where it stopped.

Stages: photos (crops of the bundled photos; one photo held out; captioned crops at three
aspect ratios) -> shards -> train-vae -> encode (with the upscale4 view) -> text-encoder (a tiny
random-weight stand-in, built offline) -> encode-captioned (aspect-ratio buckets, caption
embeddings, flipped latents) -> train (a text-conditioned transformer on the buckets) ->
train-refiner (the x4 pixel refiner, on crops at the photos' own scale) -> train-inpaint
(train-refiner --task inpaint on the same crops, its gain calibrated on the calibration photos:
the checkpoint of ``restore --task inpaint``) -> train --task upscale4 --refiner (the refiner
bundled; the gain calibrated on other held-out crops) -> sample (per prompt, at two aspect
ratios) -> eval (held-out photos vs bicubic / Lanczos / back-projection / autoencoder) -> restore
(Ray Data job over the degraded held-out photos) -> eval-inpaint (hole PSNR/SSIM next to the
biharmonic base) -> restore-inpaint (Ray Data job over the held-out photos with generated holes
and a mask folder) -> report.html. Each stage's seconds are logged and kept in stages.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from pipeline.stages.train_refiner import RefinerTrainConfig, run_train_refiner
from pipeline.train.autoencoder import VAETrainConfig, run_train_vae

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
    inpaint_steps: int
    heldout: int
    sample_steps: int
    restore_steps: int


FULL = Budget(
    crops_per_photo=48,
    captioned_per_photo=48,
    vae_steps=450,
    diffusion_steps=600,
    task_steps=150,  # the eval table is the fidelity mode: the refiner's, whatever these steps
    refiner_crops_per_photo=48,
    refiner_steps=300,
    inpaint_steps=200,
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
    inpaint_steps=10,
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


PATHS = (  # the artefacts of a demo, each at workdir/NAME
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
    "inpaint",
    "samples.png",
    "eval",
    "restored",
    "eval-inpaint",
    "masks",
    "damaged",
    "inpainted",
    "captioned",
    "captioned-shards",
    "text-encoder",
    "captioned-latents",
)


@dataclass(frozen=True)
class DemoRun:
    """One demo invocation: its config, its budget and the path of each artefact (``p[name]``)."""

    cfg: DemoConfig
    b: Budget
    p: dict[str, str]

    @property
    def common(self) -> dict[str, Any]:
        """The settings every Ray Train stage shares."""
        return {"workers": 2, "ray": self.cfg.ray, "log_every": 10 if self.cfg.quick else 50}

    def shard_glob(self, name: str) -> str:
        return storage.join(self.p[name], "shard-*.tar")


def _schedule(steps: int, batch_size: int, lr: float) -> dict[str, Any]:
    """A training run's length and schedule: a short warm-up, three checkpoints."""
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": min(50, steps // 4),
        "checkpoint_every": max(10, steps // 3),
    }


def _n_crops(b: Budget) -> int:
    return b.crops_per_photo * len(sample_photos.PHOTOS)


def _n_captioned(b: Budget) -> int:
    return b.captioned_per_photo * len(sample_photos.PHOTOS)


# --------------------------------------------------------------------------- the stages


def make_photos(d: DemoRun) -> None:
    """Crops of the bundled photos for each training, the held-out photos and their degraded copies."""
    from PIL import Image

    p, b = d.p, d.b
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
        degrade.degrade("upscale4", Image.open(path), degrade.seed_for(name)).save(os.path.join(p["lowres"], name))
    open(p["photos"] + ".done", "w").close()  # beside the folder: inside, it would be an input


def make_image_shards(d: DemoRun) -> None:
    run_shards(ShardsConfig(src=d.p["photos"], out=d.p["image-shards"], samples_per_shard=48, class_from="folder"))


def train_autoencoder(d: DemoRun) -> None:
    run_train_vae(
        VAETrainConfig(
            images=d.shard_glob("image-shards"),
            output=d.p["vae"],
            resolution=64,
            eval_images=24,
            **_schedule(d.b.vae_steps, batch_size=16, lr=2e-3),
            **d.common,
        )
    )


def _encode(d: DemoRun, shards: str, output: str, **extra: Any) -> None:
    """Encode the shards ``shards`` into ``output`` with the demo's autoencoder, at 64 px."""
    run_encode(
        EncodeConfig(
            input=d.shard_glob(shards), output=d.p[output], vae=d.p["vae"], resolution=64, ray=d.cfg.ray, **extra
        )
    )


def encode_latents(d: DemoRun) -> None:
    _encode(d, "image-shards", "latents", tasks=["upscale4"])


def build_text_encoder(d: DemoRun) -> None:
    text.build_stand_in(d.p["text-encoder"], list(sample_photos.CAPTIONS.values()), kind="clip", width=64)


def make_captioned_shards(d: DemoRun) -> None:
    run_shards(ShardsConfig(src=d.p["captioned"], out=d.p["captioned-shards"], samples_per_shard=48))


def encode_captioned(d: DemoRun) -> None:
    _encode(
        d,
        "captioned-shards",
        "captioned-latents",
        buckets="auto",  # 64x64, 80x48 and 48x80 at area 64^2, multiple 16, aspect <= 2
        bucket_multiple=16,
        max_aspect=2.0,
        flip=True,
        text_encoder=[d.p["text-encoder"]],
    )


def train_text_to_image(d: DemoRun) -> None:
    run_train(
        TrainConfig(
            latents=d.p["captioned-latents"],
            output=d.p["diffusion"],
            model=T2I_MODEL,
            flip_prob=0.5,
            caption_dropout=0.1,
            sample_steps=d.b.sample_steps,
            **_schedule(d.b.diffusion_steps, batch_size=32, lr=1e-3),
            **d.common,
        )
    )


def make_refiner_shards(d: DemoRun) -> None:
    run_shards(ShardsConfig(src=d.p["refiner-photos"], out=d.p["refiner-shards"], samples_per_shard=64))
    run_shards(ShardsConfig(src=d.p["heldout"], out=d.p["heldout-shards"], samples_per_shard=64))


def _train_refiner(d: DemoRun, task: str, output: str, steps: int, **extra: Any) -> None:
    """A pixel refiner for ``task`` on the refiner crops (one rank with both cores: the batch is small)."""
    run_train_refiner(
        RefinerTrainConfig(
            task=task,
            images=d.shard_glob("refiner-shards"),
            heldout=d.shard_glob("heldout-shards"),
            output=d.p[output],
            steps=steps,
            checkpoint_every=max(10, steps // 2),
            eval_images=d.b.heldout,
            workers=1,
            cpus_per_worker=2.0,
            ray=d.cfg.ray,
            log_every=d.common["log_every"],
            **extra,
        )
    )


def train_refiner4(d: DemoRun) -> None:
    _train_refiner(d, "upscale4", "refiner4", d.b.refiner_steps)


def train_inpaint(d: DemoRun) -> None:
    # itself the checkpoint of `restore --task inpaint`: its gain is calibrated on the demo's
    # calibration photos (generated holes), never below the biharmonic fill
    _train_refiner(d, "inpaint", "inpaint", d.b.inpaint_steps, calibration_images=d.p["calibration"])


def train_upscale4(d: DemoRun) -> None:
    run_train(
        TrainConfig(
            latents=d.p["latents"],
            output=d.p["upscale4"],
            task="upscale4",
            calibration_images=d.p["calibration"],  # the detail gain restore then uses by default
            refiner=d.p["refiner4"],  # carried in the checkpoint: restore's fidelity mode uses it
            **_schedule(d.b.task_steps, batch_size=32, lr=1e-3),
            **d.common,
        )
    )


def sample_prompts(d: DemoRun) -> None:
    prompt_sheet(d.p["diffusion"], d.p["samples.png"], d.b.sample_steps, d.cfg.workdir)


def evaluate_upscale4(d: DemoRun) -> None:
    evaluate(
        EvalConfig(
            task="upscale4",
            checkpoint=d.p["upscale4"],
            images=d.p["heldout"],
            out=d.p["eval"],
            settings=RestoreSettings(steps=d.b.restore_steps),
        )
    )


def evaluate_inpaint(d: DemoRun) -> None:
    evaluate(EvalConfig(task="inpaint", checkpoint=d.p["inpaint"], images=d.p["heldout"], out=d.p["eval-inpaint"]))


def _restore(d: DemoRun, task: str, source: str, output: str, **extra: Any) -> None:
    """The Ray Data restore job over the folder ``source`` with the demo's checkpoint for ``task``
    (the artefact of that name)."""
    run_restore(
        RestoreConfig(
            input=d.p[source],
            output=d.p[output],
            checkpoint=d.p[task],
            task=task,
            cpus_per_actor=0.75,
            ray=d.cfg.ray,
            settings=RestoreSettings(steps=d.b.restore_steps),  # the gain calibrated at training
            **extra,
        )
    )


def restore_lowres(d: DemoRun) -> None:
    _restore(d, "upscale4", "lowres", "restored")


def write_holes(d: DemoRun) -> None:
    """Per held-out photo a generated hole (the one ``eval --task inpaint`` scores, seeded by the
    file name) as a mask file (white = fill) in ``masks``, and the photo with the hole blanked in
    ``damaged``: what a user brings to ``restore --task inpaint --mask FOLDER``."""
    from PIL import Image

    os.makedirs(d.p["masks"], exist_ok=True)
    os.makedirs(d.p["damaged"], exist_ok=True)
    for name in sorted(os.listdir(d.p["heldout"])):
        photo = np.asarray(Image.open(os.path.join(d.p["heldout"], name)).convert("RGB")).copy()
        hole = degrade.inpaint_mask(photo.shape[0], photo.shape[1], degrade.seed_for(name))
        Image.fromarray(hole.astype(np.uint8) * 255).save(os.path.join(d.p["masks"], name))
        photo[hole] = 128
        Image.fromarray(photo).save(os.path.join(d.p["damaged"], name))


def restore_inpaint(d: DemoRun) -> None:
    write_holes(d)
    _restore(d, "inpaint", "damaged", "inpainted", mask=d.p["masks"])


# --------------------------------------------------------------------------- the table of stages


@dataclass(frozen=True)
class Stage:
    """A demo stage: whether its output is complete, how to make it, and what it processes."""

    name: str
    done: Callable[[DemoRun], bool]
    run: Callable[[DemoRun], None]
    items: Callable[[Budget], int] | None = None
    unit: str = ""


def _has(name: str, *inside: str) -> Callable[[DemoRun], bool]:
    """Done when the artefact ``name`` (or a file inside it) exists."""
    return lambda d: os.path.exists(os.path.join(d.p[name], *inside))


def _training(
    name: str, output: str, steps: Callable[[Budget], int], run: Callable[[DemoRun], None], per_step: int
) -> Stage:
    """A Ray Train stage: done when ``output`` has a checkpoint at the budget's ``steps``; its items
    are the samples it trains on (``per_step`` a step)."""
    return Stage(
        name, lambda d: _checkpoint_step(d.p[output]) >= steps(d.b), run, lambda b: steps(b) * per_step, "samples"
    )


def _images(
    name: str, done: Callable[[DemoRun], bool], run: Callable[[DemoRun], None], count: Callable[[Budget], int]
) -> Stage:
    """A stage over ``count`` images."""
    return Stage(name, done, run, count, "images")


STAGES = (
    _images("photos", lambda d: os.path.exists(d.p["photos"] + ".done"), make_photos, _n_crops),
    _images("shards", _has("image-shards", "_index.json"), make_image_shards, _n_crops),
    _training("train-vae", "vae", lambda b: b.vae_steps, train_autoencoder, 16 * 2),
    _images("encode", _has("latents", MANIFEST_NAME), encode_latents, _n_crops),
    Stage("text-encoder", _has("text-encoder", "config.json"), build_text_encoder),
    _images("shards-captioned", _has("captioned-shards", "_index.json"), make_captioned_shards, _n_captioned),
    _images("encode-captioned", _has("captioned-latents", MANIFEST_NAME), encode_captioned, _n_captioned),
    _training("train", "diffusion", lambda b: b.diffusion_steps, train_text_to_image, 32 * 2),
    _images(
        "shards-refiner",
        _has("heldout-shards", "_index.json"),
        make_refiner_shards,
        lambda b: b.refiner_crops_per_photo * len(sample_photos.PHOTOS) + b.heldout,
    ),
    _training("train-refiner", "refiner4", lambda b: b.refiner_steps, train_refiner4, 16),
    _training("train-inpaint", "inpaint", lambda b: b.inpaint_steps, train_inpaint, 16),
    _training("train-upscale4", "upscale4", lambda b: b.task_steps, train_upscale4, 32 * 2),
    _images("sample", _has("samples.png"), sample_prompts, lambda b: len(DEMO_PROMPTS) * 2 * len(SAMPLE_SIZES)),
    _images("eval", _has("eval", "eval.json"), evaluate_upscale4, lambda b: b.heldout),
    _images("restore", _has("restored", "_report.json"), restore_lowres, lambda b: b.heldout),
    _images("eval-inpaint", _has("eval-inpaint", "eval.json"), evaluate_inpaint, lambda b: b.heldout),
    _images("restore-inpaint", _has("inpainted", "_report.json"), restore_inpaint, lambda b: b.heldout),
)


class StageLog:
    """``stages.json`` in the workdir: seconds, items and rate of each stage done, across invocations."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, "stages.json")
        self.stages: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.stages = json.load(f)

    def run(self, stage: Stage, d: DemoRun) -> None:
        """Run ``stage`` unless its output is complete and it is recorded as done; record its time."""
        done = stage.done(d)
        if done and stage.name in self.stages:
            log.info(f"[demo] {stage.name}: already done ({self.stages[stage.name]['seconds']}s earlier), skipped")
            return
        log.info(f"[demo] === {stage.name} ===")
        items = stage.items(d.b) if stage.items else None
        t0 = time.time()
        stage.run(d)
        secs = round(time.time() - t0, 2)
        log.info(f"[demo] {stage.name}: {secs:.1f}s")
        self.stages[stage.name] = {
            "seconds": secs,
            "items": items,
            "unit": stage.unit,
            "rate": round(items / secs, 2) if items and secs else None,
        }
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.stages, f, indent=2)


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.time()
    wd = os.path.abspath(cfg.workdir)
    d = DemoRun(cfg, QUICK if cfg.quick else FULL, {name: os.path.join(wd, name) for name in PATHS})
    stage_log = StageLog(wd)
    for stage in STAGES:
        stage_log.run(stage, d)
    ev = storage.read_json(os.path.join(d.p["eval"], "eval.json"))
    report = write_report(wd, d.p, stage_log.stages, total_seconds=round(time.time() - t_start, 1))
    log.info(f"[demo] finished in {time.time() - t_start:.0f}s; report: {report}")
    return {"report": report, "stages": stage_log.stages, "eval": ev}
