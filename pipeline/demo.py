"""``latent-pipeline demo``: the embedded default, the workflow end to end on one machine.

Local Ray, local folders, photos shipped by scikit-image. Every stage goes through the same
functions the cluster jobs use, and each stage is skipped when its output is already complete,
so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from . import autoencoder, sample_photos, storage
from .config import option
from .encode import EncodeConfig, run_encode
from .inspect import inspect
from .manifest import MANIFEST_NAME
from .shards import ShardsConfig, run_shards


@dataclass
class DemoConfig:
    workdir: str = option("demo-out", "folder for every artefact of the demo")
    quick: bool = option(False, "a reduced run for tests (fewer crops, fewer steps)")
    ray_address: str = option("", "Ray cluster address (default: a local Ray)")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    t0 = time.time()
    wd = os.path.abspath(cfg.workdir)
    photos, shards_dir = os.path.join(wd, "photos"), os.path.join(wd, "image-shards")
    vae_dir, latents = os.path.join(wd, "vae"), os.path.join(wd, "latents")
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            log(f"[demo] {name}: already done, skipped")
            return
        s = time.time()
        fn()
        timings[name] = round(time.time() - s, 2)

    per_photo = 6 if cfg.quick else 24
    stage("photos", os.path.exists(os.path.join(photos, ".done")),
          lambda: (sample_photos.write_crops(photos, per_photo=per_photo),
                   open(os.path.join(photos, ".done"), "w").close()))
    stage("shards", os.path.exists(os.path.join(shards_dir, "_index.json")),
          lambda: run_shards(ShardsConfig(src=photos, out=shards_dir, samples_per_shard=32,
                                          class_from="folder"), log=log))
    stage("vae", os.path.exists(os.path.join(vae_dir, "config.json")),
          lambda: autoencoder.save_kl(autoencoder.new_kl("tiny")[0], vae_dir))
    stage("encode", os.path.exists(os.path.join(latents, MANIFEST_NAME)),
          lambda: run_encode(EncodeConfig(input=storage.join(shards_dir, "shard-*.tar"), output=latents,
                                          vae=vae_dir, resolution=64, batch_size=32,
                                          ray_address=cfg.ray_address), log=log))
    summary = {"workdir": wd, "seconds": round(time.time() - t0, 2), "stage_seconds": timings,
               "latents": inspect(latents)}
    log(json.dumps(summary, indent=2))
    return summary
