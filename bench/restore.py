"""Benchmark restoration: the Ray Data job vs a naive loop, and peak memory of the tiled path.

(1) naive single-process loop (one torch thread = one core): read each file, restore, write;
(2) the Ray Data job (`run_restore`) with the same model, inputs and output format, using the
    whole machine; compared per core: (2) / cores vs (1), end to end (actor start-up and model
    loading included) and in steady state (after the first results);
(3) peak memory (RSS sampled every 2 ms in a fresh process, above its level before the call)
    restoring one image of growing size with a fixed tile size, next to the untiled path:
    flat in image size means memory is bounded by the tile.
The model: a tiny upscale2 checkpoint trained here for a few steps (speed does not depend on
how well it is trained).
(4) pretrained inpainting networks (`--inpaint-networks`, run alone): LaMa (big-lama's
    architecture) and MAT (`--nets`), random weights, on photos with a generated hole each:
    the Ray Data job vs the naive loop, per core, end to end (actor start-up and the network's
    load included).
(5) with ``--sd-inpaint``, only this: a tiny random ``StableDiffusionInpaintPipeline`` folder
    (built offline) inpainting generated holes (``--mask FOLDER``): (1) vs (2) as above.
Prints JSON (also written to --json).
Usage: python bench/restore.py [--images 160 --size 96 --steps 8]
       python bench/restore.py --inpaint-networks [--nets lama,mat --inpaint-images 16 --inpaint-size 128]
       python bench/restore.py --sd-inpaint [--images 16 --size 96 --steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import photo_crops, write_photo_folder
from pipeline.io import storage
from pipeline.models import autoencoder, degrade
from pipeline.ray_setup import ensure_ray
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.restore import RestoreActor, RestoreConfig, run_restore
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.refiner import RefinerTrainConfig, run_train_refiner

MEMORY_PROBE = """
import sys, threading, time, numpy as np, psutil
from PIL import Image
from pipeline.models import loading
from pipeline.restoration.restorer import Restorer, RestoreSettings
size, tile, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = loading.load(ckpt)
r = Restorer(model, "upscale2", RestoreSettings(steps=2, tile=tile, overlap=min(32, tile // 8)))
r.restore(Image.new("RGB", (16, 16)))  # warm-up
rng = np.random.default_rng(0)
im = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
proc, peak, done = psutil.Process(), [0], []
start = proc.memory_info().rss
def watch():
    while not done:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
r.restore(im)
done.append(1); t.join()
print((peak[0] - start) / 2**20)
"""


def build_model(root: str) -> tuple[str, str]:
    """(a tiny upscale2 checkpoint, the same with a pixel refiner of the default size bundled)."""
    write_photo_folder(os.path.join(root, "photos"), n=24, size=64)
    run_shards(
        ShardsConfig(src=os.path.join(root, "photos"), out=os.path.join(root, "shards"), samples_per_shard=12),
    )
    autoencoder.save_kl(autoencoder.new_kl("tiny")[0], os.path.join(root, "vae"))
    run_encode(
        EncodeConfig(
            input=os.path.join(root, "shards", "*.tar"),
            output=os.path.join(root, "lat"),
            vae=os.path.join(root, "vae"),
            resolution=64,
            tasks=["upscale2"],
        ),
    )
    run_train(
        TrainConfig(
            latents=os.path.join(root, "lat"),
            output=os.path.join(root, "run"),
            task="upscale2",
            steps=5,
            batch_size=8,
            checkpoint_every=5,
            log_every=5,
            warmup_steps=1,
        ),
    )
    run_train_refiner(
        RefinerTrainConfig(
            task="upscale2",
            images=os.path.join(root, "shards", "shard-000000.tar"),
            heldout=os.path.join(root, "shards", "shard-000001.tar"),
            output=os.path.join(root, "refiner"),
            resolution=32,
            steps=5,
            checkpoint_every=5,
            log_every=5,
            warmup_steps=1,
        ),
    )
    run_train(
        TrainConfig(
            latents=os.path.join(root, "lat"),
            output=os.path.join(root, "run-refined"),
            task="upscale2",
            init_from=os.path.join(root, "run"),
            refiner=os.path.join(root, "refiner"),
            steps=1,
            batch_size=8,
            checkpoint_every=1,
            warmup_steps=0,
        ),
    )
    return os.path.join(root, "run"), os.path.join(root, "run-refined")


def naive_loop(cfg: RestoreConfig, files: list[str]) -> float:
    import torch

    torch.set_num_threads(1)
    actor = RestoreActor(cfg, cfg.task)
    t = time.perf_counter()
    for f in files:
        rel = os.path.relpath(f, cfg.input)
        actor.restore_one(rel, storage.read_bytes(f))
    return len(files) / (time.perf_counter() - t)


def inpaint_inputs(root: str, n: int, size: int, seed: int) -> tuple[str, str, list[str]]:
    """``n`` photo crops of ``size`` px under ``root/inpaint-in`` and a generated hole each, of the
    same name, under ``root/inpaint-masks`` (``--mask FOLDER``); returns both folders and the files."""
    inp, masks = os.path.join(root, "inpaint-in"), os.path.join(root, "inpaint-masks")
    os.makedirs(inp)
    os.makedirs(masks)
    for i, im in enumerate(photo_crops(n, size, seed=seed)):
        im.save(os.path.join(inp, f"img{i:04d}.png"))
        hole = degrade.inpaint_mask(size, size, seed=i)
        Image.fromarray(hole.astype(np.uint8) * 255, "L").save(os.path.join(masks, f"img{i:04d}.png"))
    return inp, masks, sorted(os.path.join(inp, f) for f in os.listdir(inp))


def inpaint_networks(root: str, images: int, size: int, names: list[str]) -> dict:
    """(4): per network, images/s of the naive loop (1 core) and of the Ray Data job, per core."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.LaMa import LaMa

    from pipeline.restoration import networks

    inp, masks, files = inpaint_inputs(root, images, size, seed=9)
    networks.install_extra_arches()
    from spandrel_extra_arches.architectures.MAT import MAT

    builds = {"lama": lambda: LaMa(in_nc=4, out_nc=3), "mat": MAT}
    cores, result = os.cpu_count() or 1, {}
    for name in names:
        net = builds[name]()
        path = os.path.join(root, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        common = {"input": inp, "checkpoint": path, "task": "inpaint", "mask": masks, "batch_size": 2}
        naive = naive_loop(RestoreConfig(output=os.path.join(root, f"{name}-naive"), **common), files)
        t = time.perf_counter()
        report = run_restore(RestoreConfig(output=os.path.join(root, f"{name}-ray"), cpus_per_actor=0.75, **common))
        ray_rate = report["written"] / (time.perf_counter() - t)
        result[name] = {
            "images": images,
            "px": size,
            "naive_loop_img_s_1_core": round(naive, 3),
            "ray_job_img_s_end_to_end": round(ray_rate, 3),
            "ray_actors": len(report["actors"]),
            "ray_per_core_vs_naive": round(ray_rate / cores / naive, 3),
        }
    torch.set_num_threads(cores)
    return result


def ray_job(cfg: RestoreConfig) -> tuple[float, float, float, dict]:
    """The Ray Data job on ``cfg`` (actors of 0.75 CPU): its images/s end to end, in steady
    state (between the first and the last progress line), its start-up seconds and report."""
    marks: list[tuple[float, int]] = []

    class Progress(logging.Handler):  # "[restore] images N/total ..." lines, every ~2 s
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("[restore] images "):
                marks.append((time.perf_counter(), int(msg.split()[2].split("/")[0])))

    restore_log = logging.getLogger("pipeline.restore")
    restore_log.setLevel(logging.INFO)
    handler = Progress()
    restore_log.addHandler(handler)
    t = time.perf_counter()
    try:
        report = run_restore(dataclasses.replace(cfg, cpus_per_actor=0.75))
    finally:
        restore_log.removeHandler(handler)
    rate = report["written"] / (time.perf_counter() - t)
    (t1, n1), (t2, n2) = marks[0], marks[-1]
    steady = (n2 - n1) / (t2 - t1) if t2 > t1 else rate
    return rate, steady, marks[0][0] - t, report


def sd_inpaint(args: argparse.Namespace) -> dict:
    """(5): a tiny random StableDiffusionInpaintPipeline folder, naive loop vs the Ray Data job."""
    from tiny_bases import save, sd_pipeline

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as root:
        ensure_ray()
        folder = save(sd_pipeline(pathlib.Path(root), 0, inpaint=True), os.path.join(root, "sd-inpaint"))
        inp, masks, files = inpaint_inputs(root, args.images, args.size, seed=5)
        common = {
            "input": inp,
            "checkpoint": folder,
            "task": "inpaint",
            "mask": masks,
            "batch_size": 8,
            "settings": RestoreSettings(steps=args.steps),
        }
        naive = naive_loop(RestoreConfig(output=os.path.join(root, "naive"), **common), files)
        rate, steady, startup, report = ray_job(RestoreConfig(output=os.path.join(root, "ray"), **common))
    return {
        "backend": "StableDiffusionInpaintPipeline (tiny random, 9-channel UNet)",
        "images": args.images,
        "px": args.size,
        "steps": args.steps,
        "cores": cores,
        "naive_loop_img_s_1_core": round(naive, 3),
        "ray_job_img_s": round(rate, 3),
        "ray_actors": len(report["actors"]),
        "ray_per_core_vs_naive": round(rate / cores / naive, 3),
        "ray_job_steady_img_s": round(steady, 3),
        "startup_s": round(startup, 1),
        "ray_steady_per_core_vs_naive": round(steady / cores / naive, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=8, help="detail-mode steps (the Ray job runs the default mode)")
    ap.add_argument("--old-default-steps", type=int, default=20, help="steps of the previous default (detail mode)")
    ap.add_argument("--memory-sizes", default="128,256,512,1024")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--json", default="bench/results/restore.json")
    ap.add_argument("--inpaint-networks", action="store_true", help="only (4): LaMa (and MAT) inpainting networks")
    ap.add_argument("--inpaint-images", type=int, default=16)
    ap.add_argument("--inpaint-size", type=int, default=128)
    ap.add_argument("--nets", default="lama", help="(4) lama,mat (MAT runs 512x512 per image: ~10 s on one core)")
    ap.add_argument("--sd-inpaint", action="store_true", help="only (5): the SD inpainting pipeline folder")
    args = ap.parse_args()
    if args.sd_inpaint:
        result = sd_inpaint(args)
        print(json.dumps(result, indent=2))
        if args.json:
            storage.write_json(args.json.replace(".json", "_sd_inpaint.json"), result)
        return
    cores = os.cpu_count() or 1
    if args.inpaint_networks:
        with tempfile.TemporaryDirectory() as root:
            ensure_ray()
            names = args.nets.split(",")
            nets = {"cores": cores, **inpaint_networks(root, args.inpaint_images, args.inpaint_size, names)}
        print(json.dumps(nets, indent=2))
        if args.json:
            storage.write_json(args.json.replace(".json", f"-{args.nets.replace(',', '-')}.json"), nets)
        return

    with tempfile.TemporaryDirectory() as root:
        ensure_ray()
        latent_ckpt, ckpt = build_model(root)
        inp = os.path.join(root, "in")
        os.makedirs(inp)
        for i, im in enumerate(photo_crops(args.images, args.size, seed=5)):
            im.save(os.path.join(inp, f"img{i:04d}.png"))
        files = sorted(os.path.join(inp, f) for f in os.listdir(inp))
        common = {
            "input": inp,
            "checkpoint": ckpt,
            "task": "upscale2",
            "batch_size": 8,
            "settings": RestoreSettings(steps=args.steps),
        }
        naive = naive_loop(RestoreConfig(output=os.path.join(root, "naive"), **common), files)
        # fidelity (the default: the pixel refiner; without one, one latent model evaluation) vs
        # detail mode with the first release's default steps, same images and output size, one process
        sample = files[: max(8, len(files) // 4)]
        modes = {}
        for mode, steps, model in (
            ("fidelity", 1, ckpt),
            ("fidelity_latent", 1, latent_ckpt),
            ("detail", args.old_default_steps, latent_ckpt),  # the first release's default
        ):
            mode_cfg = dict(common, checkpoint=model, settings=RestoreSettings(mode=mode.split("_")[0], steps=steps))
            modes[mode] = naive_loop(RestoreConfig(output=os.path.join(root, f"mode-{mode}"), **mode_cfg), sample)
        # a pretrained-format network (spandrel's Real-ESRGAN Compact, tiny random weights: throughput only)
        net_file = os.path.join(root, "compact_x2.safetensors")
        from safetensors.torch import save_file
        from spandrel.architectures.Compact import Compact

        save_file(
            {k: v.contiguous() for k, v in Compact(num_feat=16, num_conv=4, upscale=2).state_dict().items()}, net_file
        )
        modes["network"] = naive_loop(
            RestoreConfig(output=os.path.join(root, "net"), **dict(common, checkpoint=net_file)), sample
        )
        ray_rate, steady, startup, report = ray_job(RestoreConfig(output=os.path.join(root, "ray"), **common))

        memory: dict[str, dict[str, float]] = {"tiled": {}, "untiled": {}}
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for size in (int(s) for s in args.memory_sizes.split(",")):
            for kind, tile in (("tiled", args.tile), ("untiled", 4 * size)):
                out = subprocess.run(
                    [sys.executable, "-c", MEMORY_PROBE, str(size // 2), str(tile), ckpt],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                memory[kind][f"{size}px"] = round(float(out.stdout.strip().splitlines()[-1]), 1)

    result = {
        "images": args.images,
        "input_px": args.size,
        "output_px": 2 * args.size,
        "steps": args.steps,
        "cores": cores,
        "naive_loop_img_s_1_core": round(naive, 3),
        "ray_job_img_s": round(ray_rate, 3),
        "ray_actors": len(report["actors"]),
        "ray_per_core_vs_naive": round(ray_rate / cores / naive, 3),
        "ray_job_steady_img_s": round(steady, 3),
        "startup_s": round(startup, 1),
        "ray_steady_per_core_vs_naive": round(steady / cores / naive, 3),
        "peak_extra_rss_mb_by_output_size": memory,
        "naive_img_s_fidelity_mode": round(modes["fidelity"], 3),
        "naive_img_s_fidelity_mode_latent_model_only": round(modes["fidelity_latent"], 3),
        f"naive_img_s_detail_mode_{args.old_default_steps}_steps": round(modes["detail"], 3),
        "fidelity_vs_previous_default": round(modes["fidelity"] / modes["detail"], 2),
        "naive_img_s_spandrel_compact_x2_16x4": round(modes["network"], 3),
        "tile_px": args.tile,
        "targets": {"ray_per_core_vs_naive": 0.9, "memory": "flat in image size", "fidelity_vs_previous_default": 5},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
