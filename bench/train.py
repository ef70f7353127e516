"""Benchmark training: cached latents vs the encoder in the loop, data-wait share, 1 vs 2 workers.

In one run on the same machine and the same tiny denoiser:
(a) single process, batches streamed from cached latent shards (what `train` does);
(b) single process, batches streamed from the raw image shards, decoded and encoded by the
    autoencoder inside every step (what training without latent caching costs);
(a) and (b) are measured for each autoencoder preset (the encoder's cost decides the gain);
(c) the Ray Train job (`run_train`) with 1 and with 2 workers, reading samples/s and the
    data-wait share from its metrics.jsonl.
Prints samples/s, the ratio (a)/(b) and the data-wait shares as JSON.
Usage: python bench/train.py [--images 384 --resolution 128 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import write_photo_folder
from pipeline.io import imaging, storage
from pipeline.models import autoencoder, denoiser, flow
from pipeline.ray_setup import ensure_ray
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.streams import BatchStream, latent_stream


def timed_loop(stream, step_fn, steps: int) -> dict:
    """samples/s and data-wait share over ``steps`` steps (after 3 warm-up steps)."""
    it = iter(stream)
    for _ in range(3):
        step_fn(next(it))
    wait = 0.0
    n = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - tw
        n += step_fn(batch)
    total = time.perf_counter() - t0
    stream.close()
    return {"samples_per_s": round(n / total, 2), "data_wait_share": round(wait / total, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--presets", default="tiny,small", help="autoencoder presets to compare")
    ap.add_argument("--json", default="bench/results/train.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as root:
        write_photo_folder(os.path.join(root, "photos"), n=args.images, size=args.resolution)
        run_shards(
            ShardsConfig(src=os.path.join(root, "photos"), out=os.path.join(root, "shards"), samples_per_shard=64),
        )
        ensure_ray()
        net = denoiser.Denoiser(denoiser.config_for("tiny", latent_channels=4))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(x0: torch.Tensor) -> int:
            t = flow.sample_t(x0.shape[0], "cpu")
            loss = flow.loss(lambda x, tt: net(x, tt), x0, t, torch.randn_like(x0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return x0.shape[0]

        def collate(items, _rng):
            ims = [
                imaging.resize_center_crop(imaging.to_rgb(imaging.decode(s.get("jpg") or s["png"])), args.resolution)[0]
                for s in items
            ]
            return torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in ims]))

        shards = storage.expand(os.path.join(root, "shards", "*.tar"))
        by_preset = {}
        for preset in args.presets.split(","):
            vae_dir, lat = os.path.join(root, f"vae-{preset}"), os.path.join(root, f"lat-{preset}")
            autoencoder.save_kl(autoencoder.new_kl(preset)[0], vae_dir)
            run_encode(
                EncodeConfig(
                    input=os.path.join(root, "shards", "*.tar"), output=lat, vae=vae_dir, resolution=args.resolution
                ),
            )
            vae = autoencoder.load(vae_dir)

            def uncached_step(pixels: torch.Tensor, vae=vae) -> int:
                with torch.no_grad():
                    z = autoencoder.scale_latents(vae.encode(pixels).mean, vae.scale, vae.shift)
                return step(z)

            cached = timed_loop(
                latent_stream(lat, batch_size=args.batch_size, shuffle_buffer=256), lambda b: step(b.x0), args.steps
            )
            uncached = timed_loop(
                BatchStream(shards, collate, batch_size=args.batch_size, shuffle_buffer=256), uncached_step, args.steps
            )
            by_preset[preset] = {
                "cached": cached,
                "uncached_encoder_in_loop": uncached,
                "cached_vs_uncached": round(cached["samples_per_s"] / uncached["samples_per_s"], 2),
            }

        ray_runs = {}
        for workers in (1, 2):
            out = os.path.join(root, f"ray{workers}")
            run_train(
                TrainConfig(
                    latents=os.path.join(root, "lat-tiny"),
                    output=out,
                    workers=workers,
                    cpus_per_worker=2 / workers,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    log_every=10,
                    checkpoint_every=args.steps,
                    warmup_steps=5,
                ),
            )
            rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][1:]  # skip warm-up window
            ray_runs[f"{workers}_workers"] = {
                "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in rows])), 2),
                "data_wait_share": round(float(np.mean([r["data_wait_share"] for r in rows])), 4),
            }

    result = {
        "resolution": args.resolution,
        "denoiser": "tiny",
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "autoencoders": by_preset,
        "ray_train": ray_runs,
        "two_vs_one_worker": round(ray_runs["2_workers"]["samples_per_s"] / ray_runs["1_workers"]["samples_per_s"], 2),
        "targets": {"cached_vs_uncached": 3.0, "data_wait_share_max": 0.05},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
