"""Benchmark the latent-caching job against its compute ceiling and a naive loop, in one run.

(1) bare encoder forward on pre-decoded tensors in memory (the compute ceiling, all cores);
(2) a naive single-process loop: read tar, PIL decode, preprocess, encode, write a tar;
(3) the Ray encode job (``run_encode``) over the same shards.

Prints images/s for each and the ratios (3)/(1), (3)/(2) as JSON (also written to --json).
Usage: python bench/encode.py [--shards 16 --per-shard 48 --resolution 256 --preset tiny]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import encode_image, photo_crops, write_tar
from pipeline.io import imaging, storage
from pipeline.io.tarshards import TarShardWriter, iter_samples
from pipeline.models import autoencoder
from pipeline.ray_setup import ensure_ray
from pipeline.stages.encode import EncodeConfig, run_encode


def make_shards(root: str, shards: int, per_shard: int, size: int) -> list[str]:
    paths = []
    for i in range(shards):
        ims = photo_crops(per_shard, size, seed=i)
        p = os.path.join(root, f"in-{i:04d}.tar")
        write_tar(p, [(f"k{j:05d}.jpg", encode_image(im, "JPEG", quality=90)) for j, im in enumerate(ims)])
        paths.append(p)
    return paths


def bare_forward(vae, images: list[Image.Image], batch: int) -> float:
    x = torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in images]))
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        vae.encode(x[:batch])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            vae.encode(x[i : i + batch])
        return len(x) / (time.perf_counter() - t)


def naive_loop(vae, shard_paths: list[str], out_dir: str, resolution: int, batch: int) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    n = 0
    t = time.perf_counter()
    for path in shard_paths:
        with open(path, "rb") as f:
            samples = list(iter_samples(f))
        arrays, keys = [], []
        for s in samples:
            im, _ = imaging.resize_center_crop(imaging.to_rgb(imaging.decode(s.fields["jpg"])), resolution)
            arrays.append(imaging.to_tensor_array(im))
            keys.append(s.key)
        with (
            open(os.path.join(out_dir, os.path.basename(path)), "wb") as f,
            TarShardWriter(f) as w,
            torch.inference_mode(),
        ):
            for i in range(0, len(arrays), batch):
                post = vae.encode(torch.from_numpy(np.stack(arrays[i : i + batch])))
                for k, m in zip(keys[i : i + batch], post.mean.numpy().astype(np.float16)):
                    buf = io.BytesIO()
                    np.save(buf, m, allow_pickle=False)
                    w.write(k, {"latent.npy": buf.getvalue()})
                    n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default="bench/results/encode.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as root:
        shard_paths = make_shards(root, args.shards, args.per_shard, args.resolution)
        vae_dir = os.path.join(root, "vae")
        autoencoder.save_kl(autoencoder.new_kl(args.preset)[0], vae_dir)
        vae = autoencoder.load(vae_dir)
        images = [
            imaging.to_rgb(imaging.decode(s.fields["jpg"])) for p in shard_paths for s in iter_samples(open(p, "rb"))
        ]

        ceiling = bare_forward(vae, images, args.batch_size)
        os.makedirs(os.path.join(root, "naive"))
        naive = naive_loop(vae, shard_paths, os.path.join(root, "naive"), args.resolution, args.batch_size)
        ensure_ray()  # cluster start-up is not part of a job's time
        t = time.perf_counter()
        man = run_encode(
            EncodeConfig(
                input=os.path.join(root, "in-*.tar"),
                output=os.path.join(root, "ray"),
                vae=vae_dir,
                resolution=args.resolution,
                batch_size=args.batch_size,
            ),
        )
        ray_rate = man["totals"]["written"] / (time.perf_counter() - t)

    result = {
        "images": len(images),
        "resolution": args.resolution,
        "preset": args.preset,
        "cpus": os.cpu_count(),
        "bare_forward_img_s": round(ceiling, 2),
        "naive_loop_img_s": round(naive, 2),
        "ray_job_img_s": round(ray_rate, 2),
        "ray_vs_bare": round(ray_rate / ceiling, 3),
        "ray_vs_naive": round(ray_rate / naive, 3),
        "targets": {"ray_vs_bare": 0.9, "ray_vs_naive": 1.0},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
