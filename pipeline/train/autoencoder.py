"""``latent-pipeline train-vae``: train the built-in KL autoencoder on image shards with Ray Train.

Same conventions as ``train``: an explicit loop, AdamW with warmup and cosine decay, EMA,
checkpoints every N steps (pruned), resume on restart or re-run. Loss: L1 + ``ssim_weight`` *
(1 - SSIM) + ``kl_weight`` * KL. Held-out reconstruction PSNR/SSIM is measured at the start and
at every checkpoint. The checkpoint is directly usable as ``encode --vae`` (the EMA weights,
with the latent scale measured on training crops so that scaled latents have unit variance).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import check_choice, check_range, option, public_dict
from pipeline.io import imaging, storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import autoencoder
from pipeline.models.quality import psnr, ssim
from pipeline.train.crops import ImageLoopConfig, check_readable, heldout_crops, random_crop, split_shards
from pipeline.train.loop import (
    MetricsLog,
    StepWindow,
    fit,
    grad_sync,
    loss_text,
    new_optimizer,
    optimizer_step,
    resume_or_init,
    save_checkpoint,
    set_lr,
    worker_setup,
)
from pipeline.train.streams import BatchStream

log = logging.getLogger("pipeline.train_vae")


@dataclass
class VAETrainConfig(ImageLoopConfig):
    preset: str = option("tiny", "autoencoder preset: tiny, small, base")
    kl_weight: float = option(1e-6, "weight of the KL term")
    ssim_weight: float = option(0.2, "weight of the (1 - SSIM) term")
    lr: float = option(1e-3, "peak AdamW learning rate")
    ema_decay: float = option(0.99, "EMA decay of the weights")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("preset", self.preset, autoencoder.PRESETS)
        check_range("kl_weight", self.kl_weight, 0.0)
        check_range("ssim_weight", self.ssim_weight, 0.0)


@torch.no_grad()
def evaluate(model: autoencoder.KLAutoencoder, images: torch.Tensor, dev) -> dict[str, float]:
    model.eval()
    recon = model.decode(model.encode(images.to(dev)).mean).clamp(-1, 1).cpu()
    return {"psnr": float(psnr(recon, images).mean()), "ssim": float(ssim(recon, images).mean())}


@torch.no_grad()
def latent_scale(model: autoencoder.KLAutoencoder, images: torch.Tensor, dev) -> float:
    """1 / std of the posterior means: scaled latents then have unit variance (SD's convention)."""
    return float(1.0 / model.encode(images.to(dev)).mean.float().std().clamp_min(1e-6))


def train_loop(loop_config: dict) -> None:
    """One DDP rank. Runs on a Ray Train worker."""
    import ray.train.torch

    cfg: VAETrainConfig = loop_config["cfg"]
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    train_shards, held_shards = split_shards(cfg, "train-vae")

    # ---- model, optimizer, held-out images
    model, kl_cfg = autoencoder.new_kl(cfg.preset, seed=cfg.seed)
    model = model.to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = new_optimizer(model, cfg)
    heldout = torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in heldout_crops(held_shards, cfg)]))

    # ---- resume (restart or re-run) or warm start
    start, resumed = resume_or_init(model, ema, opt, cfg, "autoencoder")
    initial = resumed.metrics.get("psnr_initial") if resumed is not None else None
    if initial is None:
        initial = evaluate(ema, heldout, dev)["psnr"]
    ddp = ray.train.torch.prepare_model(model)

    rng = np.random.default_rng(cfg.seed * 1000 + rank + start)

    def collate(items, _gen):
        crops = [
            imaging.to_tensor_array(c) for c in (random_crop(s, cfg.resolution, rng) for s in items) if c is not None
        ]
        return torch.from_numpy(np.stack(crops)) if crops else None

    stream = iter(
        BatchStream(
            train_shards,
            collate,
            batch_size=cfg.batch_size,
            rank=rank,
            world=world,
            seed=cfg.seed + start,
            shuffle_buffer=cfg.shuffle_buffer,
            storage_options=so,
        )
    )
    metrics_log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)
    info = CheckpointInfo(kind="autoencoder", model=autoencoder.kl_config_dict(kl_cfg), train=public_dict(cfg))

    # ---- the loop
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, step, cfg)
        loss_sum = l1_sum = 0.0
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            x = next(stream)
            while x is None:  # a batch of only unreadable images: take the next one
                x = next(stream)
            window.waited(time.perf_counter() - t_wait)
            x = x.to(dev)
            with grad_sync(ddp, micro, cfg, world), autocast:
                recon, post = ddp(x)
                l1 = F.l1_loss(recon.float(), x)
                kl = 0.5 * (post.mean.float() ** 2 + post.std.float() ** 2 - 1 - 2 * torch.log(post.std.float())).mean()
                loss = l1 + cfg.ssim_weight * (1 - ssim(recon.float().clamp(-1, 1), x).mean()) + cfg.kl_weight * kl
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum  # .item() syncs with the device once per micro-step
            l1_sum += l1.item() / cfg.grad_accum
        grad_norm = optimizer_step(ddp, opt, ema, step, cfg)

        window.step(time.perf_counter() - t_step, loss=loss_sum, l1=l1_sum, grad_norm=grad_norm)
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            scores = evaluate(ema, heldout, dev)
            metrics.update(psnr_initial=initial, **scores)
            if metrics_log is not None:
                metrics_log.log(done, metrics)
                log.info(
                    f"[train-vae] step {done}/{cfg.steps} {loss_text(metrics)}"
                    f"held-out PSNR {scores['psnr']:.2f} dB (initial {initial:.2f}) SSIM {scores['ssim']:.3f}"
                )
            info.scale, info.metrics = latent_scale(ema, heldout, dev), metrics
            save_checkpoint(done, {"step": done, **metrics}, info, ddp, ema, opt)
            if metrics_log is not None:
                metrics_log.sync()
        elif metrics_log is not None and metrics:
            metrics_log.log(done, metrics)


def run_train_vae(cfg: VAETrainConfig):
    train, held = split_shards(cfg, "train-vae")
    check_readable(train, held, cfg, "train-vae")
    if cfg.init_from:
        from pipeline.io import checkpoint

        checkpoint.load(cfg.init_from, "autoencoder", cfg.storage.options)
    log.info(
        f"[train-vae] {cfg.workers} worker(s), preset {cfg.preset}, {len(train)} training shard(s), "
        f"{len(held)} held-out -> {storage.redact(cfg.output)}"
    )
    t0 = time.time()
    result = fit(train_loop, {"cfg": cfg}, cfg)
    if result.error:
        raise result.error
    m = result.metrics
    log.info(
        f"[train-vae] finished step {m.get('step')} in {time.time() - t0:.0f}s: held-out PSNR "
        f"{m.get('psnr_initial', float('nan')):.2f} -> {m.get('psnr', float('nan')):.2f} dB, "
        f"SSIM {m.get('ssim', float('nan')):.3f}; use it as `encode --vae {storage.redact(cfg.output)}`"
    )
    return result
