"""GPU checks, prepared to run in a few minutes on a machine with one CUDA GPU (``bench/gpu.sh``).

(1) An SD-VAE-sized encoder (diffusers ``AutoencoderKL`` with Stable Diffusion's architecture
    config, random weights) in bf16 at 256² and 512²: the bare encoder's images/s on tensors
    already on the GPU, against the full encode job (tar -> decode -> encode -> tar) with the
    Pillow decode threads and with ``--decoder torchvision`` (nvjpeg).
(2) A DiT-B/2 training step at 256² (32x32x4 latents) in bf16 autocast with AdamW: samples/s
    and model FLOPs utilisation (FLOPs counted by ``torch.utils.flop_counter`` for one forward
    and backward, against the GPU's dense bf16 peak given by ``--peak-tflops``).

``--quick`` runs everything tiny on the CPU to check the script itself.
Prints JSON (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import encode_image, photo_crops, write_tar
from pipeline.io import storage
from pipeline.models import denoiser, flow

SD_VAE = {  # Stable Diffusion 1.x/2.x VAE architecture (diffusers config), weights random
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TINY_VAE = {**SD_VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_encoder(vae, device: str, res: int, batch: int, iters: int) -> float:
    x = torch.randn(batch, 3, res, res, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        vae.encode(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            vae.encode(x).latent_dist.mean.float().cpu()
        sync(device)
    return batch * iters / (time.perf_counter() - t)


def encode_job(root: str, vae_dir: str, res: int, images: int, decoder: str, batch: int) -> float:
    from pipeline.ray_setup import ensure_ray
    from pipeline.stages.encode import EncodeConfig, run_encode

    src = os.path.join(root, f"src{res}")
    if not os.path.isdir(src):
        os.makedirs(src)
        per = 64
        for s in range(0, images, per):
            ims = photo_crops(min(per, images - s), 2 * res, seed=s)
            write_tar(
                os.path.join(src, f"{s:06d}.tar"), [(f"k{j}.jpg", encode_image(im, "JPEG")) for j, im in enumerate(ims)]
            )
    ensure_ray()
    cpus = os.cpu_count() or 1
    t = time.perf_counter()
    man = run_encode(
        EncodeConfig(
            input=os.path.join(src, "*.tar"),
            output=os.path.join(root, f"out{res}{decoder}"),
            vae=vae_dir,
            resolution=res,
            batch_size=batch,
            precision="bf16",
            num_gpus=1.0 if torch.cuda.is_available() else 0.0,
            num_cpus=float(max(1, cpus - 2)),
            decoder=decoder,
        )
    )
    return man["totals"]["written"] / (time.perf_counter() - t)


def dit_step(device: str, size: str, res_latent: int, batch: int, iters: int, peak_tflops: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    net = denoiser.build(denoiser.config_for(size, latent_channels=4)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.randn(batch, 4, res_latent, res_latent, device=device)

    def step() -> None:
        t = torch.rand(batch, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = flow.loss(lambda x, tt: net(x, tt), x0, t, torch.randn_like(x0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    return {
        "model": size,
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "latent": [4, res_latent, res_latent],
        "batch": batch,
        "step_s": round(dt, 4),
        "samples_per_s": round(batch / dt, 1),
        "gflops_per_sample_fwd_bwd": round(flops / batch / 1e9, 1),
        "mfu": round(flops / dt / (peak_tflops * 1e12), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks the script only")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--json", default="bench/results/gpu.json")
    args = ap.parse_args()
    from diffusers import AutoencoderKL

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "quick": args.quick}
    with tempfile.TemporaryDirectory() as root:
        vae_dir = os.path.join(root, "sd-vae")
        AutoencoderKL(**(TINY_VAE if args.quick else SD_VAE)).save_pretrained(vae_dir, safe_serialization=True)
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device, torch.bfloat16).eval()
        resolutions = (64,) if args.quick else (256, 512)
        images = 32 if args.quick else args.images
        for res in resolutions:
            batch = 4 if args.quick else (64 if res == 256 else 16)
            row = {"bare_encoder_img_s": round(bare_encoder(vae, device, res, batch, 2 if args.quick else 20), 1)}
            for decoder in ("pil", "torchvision"):
                row[f"job_img_s_{decoder}"] = round(encode_job(root, vae_dir, res, images, decoder, batch), 1)
            row["job_vs_bare_pil"] = round(row["job_img_s_pil"] / row["bare_encoder_img_s"], 3)
            row["job_vs_bare_nvjpeg"] = round(row["job_img_s_torchvision"] / row["bare_encoder_img_s"], 3)
            out[f"vae_encode_{res}"] = row
            print(json.dumps({res: row}), flush=True)
        del vae
        if args.quick:
            out["dit"] = dit_step(device, "dit-tiny", 8, 4, 2, args.peak_tflops)
        else:
            out["dit"] = dit_step(device, "dit-b", 32, 256, 20, args.peak_tflops)
    print(json.dumps(out, indent=2))
    if args.json:
        storage.write_json(args.json, out)


if __name__ == "__main__":
    main()
