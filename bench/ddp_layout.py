"""Benchmark the KL autoencoder's DDP training step by parameter memory layout.

The autoencoder runs its convolutions on channels-last activations. With its parameters in the
default contiguous layout their gradients come out channels-last, so DDP warns ("Grad strides do
not match bucket view strides") and copies every such gradient into its bucket. In one run, one
process group of one rank (gloo, as CPU training uses), the same model, batch and seed:

* ``contiguous_params``: parameters contiguous (DDP warns);
* ``channels_last_params``: parameters converted to channels-last before DDP wraps the model,
  as ``train-vae`` does (gradients then match their buckets);
* ``bucket_view``: parameters contiguous, DDP with ``gradient_as_bucket_view=True``: the
  gradients are views of the buckets, so autograd writes each one into its bucket directly;

Prints per layout the DDP warning count, the median wall and CPU time of a step over interleaved
rounds, and the ratio against ``contiguous_params``, as JSON.
Usage: python bench/ddp_layout.py [--steps 12 --rounds 3 --batch 16 --resolution 64 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist

from pipeline.models import autoencoder


def steps(layout: str, n: int, batch: int, resolution: int) -> tuple[list[float], list[float], int]:
    torch.manual_seed(0)
    model, _ = autoencoder.new_kl("tiny", seed=0)
    if layout == "channels_last_params":
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=layout == "bucket_view")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    wall, cpu = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n + 2):  # two warm-up steps
            t, c = time.perf_counter(), time.process_time()
            recon, _post = ddp(x)
            (recon - x).abs().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    warned = sum("bucket view strides" in str(w.message) for w in caught)
    return wall[2:], cpu[2:], warned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_warn_always(True)  # the stride warning is a warn-once: count it for every layout
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    dist.init_process_group("gloo", rank=0, world_size=1)
    layouts = ("contiguous_params", "channels_last_params", "bucket_view")
    wall: dict[str, list[float]] = {k: [] for k in layouts}
    cpu: dict[str, list[float]] = {k: [] for k in layouts}
    warned: dict[str, int] = dict.fromkeys(layouts, 0)
    for _ in range(args.rounds):  # interleaved, so a busy spell of the machine hits both
        for layout in layouts:
            w, c, n = steps(layout, args.steps, args.batch, args.resolution)
            wall[layout] += w
            cpu[layout] += c
            warned[layout] += n
    base_wall, base_cpu = statistics.median(wall[layouts[0]]), statistics.median(cpu[layouts[0]])
    out = {
        layout: {
            "ddp_stride_warnings": warned[layout],
            "step_ms_median": round(1000 * statistics.median(wall[layout]), 1),
            "cpu_ms_median": round(1000 * statistics.median(cpu[layout]), 1),
            "wall_ratio_vs_contiguous": round(statistics.median(wall[layout]) / base_wall, 3),
            "cpu_ratio_vs_contiguous": round(statistics.median(cpu[layout]) / base_cpu, 3),
        }
        for layout in layouts
    }
    print(json.dumps({"batch": args.batch, "resolution": args.resolution, "threads": args.threads, **out}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
