"""GPU checks, prepared to run in a few minutes on a machine with one CUDA GPU (``bench/gpu.sh``).

(1) An SD-VAE-sized encoder (diffusers ``AutoencoderKL`` with Stable Diffusion's architecture
    config, random weights) in bf16 at 256² and 512²: the bare encoder's images/s on tensors
    already on the GPU, against the full encode job (tar -> decode -> encode -> tar) with the
    Pillow decode threads and with ``--decoder torchvision`` (nvjpeg).
(2) A DiT-B/2 training step at 256² (32x32x4 latents) in bf16 autocast with AdamW: samples/s
    and model FLOPs utilisation (FLOPs counted by ``torch.utils.flop_counter`` for one forward
    and backward, against the GPU's dense bf16 peak given by ``--peak-tflops``).

(3) ``finetune``'s step on the real SDXL UNet architecture (``UNet2DConditionModel`` from SDXL
    base 1.0's published config, 2.6B parameters, random weights built offline) at 1024² (128x128
    latents) in bf16 autocast: LoRA (rank 8 on the attention projections, as ``finetune``
    defaults), with and without gradient checkpointing: samples/s and peak GPU memory.
(4) A full fine-tune of the same UNet with ``--fsdp``'s sharding (``pipeline.train.loop.shard``,
    FSDP2 over NCCL, one process per visible GPU, gradient checkpointing) against the same step
    unsharded: samples/s and peak memory per GPU (an out-of-memory is reported as such).

``--quick`` runs everything tiny on the CPU to check the script itself (FSDP on gloo, 2 ranks).
``--parts vae,dit,sdxl`` picks the checks.
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
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (architecture fields)
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 time ids x 256
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
TINY_SDXL_UNET = {
    **SDXL_UNET,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 16,
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, iters: int, device: str) -> float:
    """Seconds per ``step()`` over ``iters`` calls, after 2 warm-up calls."""
    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t0) / iters


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
    dt = timed(step, iters, device)
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


def _sdxl_inputs(unet_cfg: dict, batch: int, latent: int, device: str) -> tuple:
    """A batch as ``finetune`` feeds the SDXL UNet: scaled latents, epsilon noise, DDPM
    timesteps, prompt embeddings (77 tokens), pooled text and the 6 time ids."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    noise = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    text = torch.randn(batch, 77, unet_cfg["cross_attention_dim"], generator=g).to(device)
    cond = {
        "text_embeds": torch.randn(batch, pooled, generator=g).to(device),
        "time_ids": torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]] * batch).to(device),
    }
    return x, noise, text, cond


def _sdxl_steps(unet, trained, device: str, unet_cfg: dict, batch: int, latent: int, iters: int) -> dict:
    """Time ``iters`` finetune steps (after 2 warm-up steps): samples/s and peak memory."""
    from pipeline.models import objectives

    obj = objectives.from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"})
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    x, noise, text, cond = _sdxl_inputs(unet_cfg, batch, latent, device)

    def step() -> None:
        t = objectives.sample_timesteps(obj, batch).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            noisy = objectives.noisy_latents(obj, x, noise, t)
            out = unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample
            loss = objectives.loss(obj, out, x, noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        dt = timed(step, iters, device)
    except torch.OutOfMemoryError:
        return {"batch": batch, "error": "out of GPU memory"}
    finally:
        opt.zero_grad(set_to_none=True)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    return {"batch": batch, "step_s": round(dt, 3), "samples_per_s": round(batch / dt, 2), "peak_gib": peak}


def _build_sdxl_unet(unet_cfg: dict, device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**unet_cfg).train()


def sdxl_lora(device: str, quick: bool) -> dict:
    """(3): LoRA steps of the SDXL UNet at 1024², with and without gradient checkpointing."""
    from pipeline.train.finetune import FinetuneConfig, add_lora

    cfg = TINY_SDXL_UNET if quick else SDXL_UNET
    latent, iters = (16, 2) if quick else (128, 10)
    unet = _build_sdxl_unet(cfg, device)
    out: dict = {"params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1), "latent": [4, latent, latent]}
    trained = add_lora(unet, FinetuneConfig(latents="x", base="y", output="/tmp/x", lora_rank=8).lora())
    out["lora_params_m"] = round(sum(p.numel() for p in trained.parameters()) / 1e6, 2)
    out["lora"] = _sdxl_steps(unet, trained, device, cfg, 1 if quick else 4, latent, iters)
    unet.enable_gradient_checkpointing()
    out["lora+checkpointing"] = _sdxl_steps(unet, trained, device, cfg, 2 if quick else 8, latent, iters)
    return out


def _fsdp_rank(rank: int, world: int, port: int, quick: bool, result: str) -> None:
    """One rank of (4): the full fine-tune step of the SDXL UNet, sharded by ``loop.shard``."""
    import torch.distributed as dist

    from pipeline.train.loop import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cpu" if quick else "cuda"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if quick else "nccl", rank=rank, world_size=world)
    cfg = TINY_SDXL_UNET if quick else SDXL_UNET
    unet = _build_sdxl_unet(cfg, device)
    unet.enable_gradient_checkpointing()
    shard(unet)
    row = _sdxl_steps(unet, unet, device, cfg, 1, 16 if quick else 128, 2 if quick else 5)
    if rank == 0:
        with open(result, "w") as f:
            json.dump({**row, "world": world, "samples_per_s_all_ranks": row.get("samples_per_s", 0) * world}, f)
    dist.destroy_process_group()


def sdxl_full(device: str, quick: bool) -> dict:
    """(4): the full fine-tune step, FSDP-sharded over every visible GPU vs unsharded."""
    import socket

    import torch.multiprocessing as mp

    cfg = TINY_SDXL_UNET if quick else SDXL_UNET
    unet = _build_sdxl_unet(cfg, device)
    unet.enable_gradient_checkpointing()
    out = {"unsharded": _sdxl_steps(unet, unet, device, cfg, 1, 16 if quick else 128, 2 if quick else 5)}
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    world = 2 if quick else torch.cuda.device_count()
    with socket.socket() as sock, tempfile.TemporaryDirectory() as d:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        result = os.path.join(d, "fsdp.json")
        mp.spawn(_fsdp_rank, args=(world, port, quick, result), nprocs=world)
        out["fsdp"] = json.load(open(result))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks the script only")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--parts", default="vae,dit,sdxl", help="which checks: vae, dit, sdxl")
    ap.add_argument("--json", default="bench/results/gpu.json")
    args = ap.parse_args()
    from diffusers import AutoencoderKL

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "quick": args.quick}
    parts = set(args.parts.split(","))
    if "sdxl" in parts:
        out["sdxl_lora_1024"] = sdxl_lora(device, args.quick)
        print(json.dumps({"sdxl_lora_1024": out["sdxl_lora_1024"]}), flush=True)
        out["sdxl_full_1024"] = sdxl_full(device, args.quick)
        print(json.dumps({"sdxl_full_1024": out["sdxl_full_1024"]}), flush=True)
    with tempfile.TemporaryDirectory() as root:
        vae_dir = os.path.join(root, "sd-vae")
        AutoencoderKL(**(TINY_VAE if args.quick else SD_VAE)).save_pretrained(vae_dir, safe_serialization=True)
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device, torch.bfloat16).eval()
        resolutions = () if "vae" not in parts else (64,) if args.quick else (256, 512)
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
        if "dit" in parts and args.quick:
            out["dit"] = dit_step(device, "dit-tiny", 8, 4, 2, args.peak_tflops)
        elif "dit" in parts:
            out["dit"] = dit_step(device, "dit-b", 32, 256, 20, args.peak_tflops)
    print(json.dumps(out, indent=2))
    if args.json:
        storage.write_json(args.json, out)


if __name__ == "__main__":
    main()
