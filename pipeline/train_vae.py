"""``latent-pipeline train-vae``: train the built-in KL autoencoder on image shards with Ray Train.

Same conventions as ``train``: an explicit loop, AdamW with warmup and cosine decay, EMA,
checkpoints every N steps (pruned), resume on restart or re-run. Loss: L1 + ``ssim_weight`` *
(1 - SSIM) + ``kl_weight`` * KL. Held-out reconstruction PSNR/SSIM is measured at the start and
at every checkpoint. The checkpoint is directly usable as ``encode --vae`` (the EMA weights,
with the latent scale measured on training crops so that scaled latents have unit variance).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import autoencoder, checkpoint, imaging, storage
from .config import ConfigError, option
from .metrics import psnr, ssim
from .streams import BatchStream
from .tarshards import iter_samples
from .training import (LoopConfig, MetricsLog, StepWindow, ema_decay_at, ema_update, fit, lr_at,
                       optimizer_from_tensors, optimizer_to_tensors, public_config, restore_checkpoint,
                       save_checkpoint, unwrap)


@dataclass
class VAETrainConfig(LoopConfig):
    images: str = option("", "image shards: URL, brace range or glob; comma-separated list")
    heldout: str = option("", "held-out image shards for PSNR (default: the last input shard, if >1)")
    preset: str = option("tiny", "autoencoder preset: tiny, small, base")
    resolution: int = option(64, "training crop size")
    kl_weight: float = option(1e-6, "weight of the KL term")
    ssim_weight: float = option(0.2, "weight of the (1 - SSIM) term")
    eval_images: int = option(32, "held-out images scored at each checkpoint")
    shuffle_buffer: int = option(256, "samples in each rank's shuffle buffer")
    lr: float = option(1e-3, "peak AdamW learning rate")
    ema_decay: float = option(0.99, "EMA decay of the weights")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.images:
            raise ConfigError("option 'images' is required")
        if self.preset not in autoencoder.PRESETS:
            raise ConfigError(f"option 'preset' must be one of {sorted(autoencoder.PRESETS)}")
        if self.resolution < 8:
            raise ConfigError("option 'resolution' must be >= 8")


def split_shards(cfg: VAETrainConfig) -> tuple[list[str], list[str]]:
    train = storage.expand(cfg.images, cfg.storage_options)
    if cfg.heldout:
        return train, storage.expand(cfg.heldout, cfg.storage_options)
    if len(train) < 2:
        raise ConfigError("train-vae needs a --heldout shard set, or at least 2 input shards "
                          "(the last one is held out)")
    return train[:-1], train[-1:]


def _random_crop(fields: dict[str, bytes], size: int, rng: np.random.Generator) -> np.ndarray | None:
    try:
        im = imaging.sample_rgb(fields)
    except imaging.BadImage:
        return None
    short = min(im.size)
    if short < size:
        im = im.resize((max(size, round(im.width * size / short)), max(size, round(im.height * size / short))))
    x = int(rng.integers(0, im.width - size + 1))
    y = int(rng.integers(0, im.height - size + 1))
    crop = im.crop((x, y, x + size, y + size))
    arr = imaging.to_tensor_array(crop)
    return arr[:, :, ::-1].copy() if rng.random() < 0.5 else arr


def heldout_batch(shards: list[str], cfg: VAETrainConfig) -> torch.Tensor:
    """Centre crops of the first ``eval_images`` readable held-out images."""
    out = []
    for url in shards:
        with storage.open_read(url, cfg.storage_options) as f:
            for s in iter_samples(f):
                if s.error:
                    continue
                try:
                    im = imaging.sample_rgb(s.fields)
                except imaging.BadImage:
                    continue
                out.append(imaging.to_tensor_array(imaging.resize_center_crop(im, cfg.resolution)[0]))
                if len(out) == cfg.eval_images:
                    return torch.from_numpy(np.stack(out))
    if not out:
        raise ConfigError("no readable held-out images")
    return torch.from_numpy(np.stack(out))


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
    import ray.train
    import ray.train.torch

    from .ray_setup import quiet_ray_loggers

    quiet_ray_loggers()
    cfg: VAETrainConfig = loop_config["cfg"]
    so = cfg.storage_options
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = ray.train.torch.get_device()
    train_shards, held_shards = split_shards(cfg)

    model, kl_cfg = autoencoder.new_kl(cfg.preset, seed=cfg.seed)
    model = model.to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    heldout = heldout_batch(held_shards, cfg)
    start, initial = 0, None
    resumed = restore_checkpoint()
    if resumed is not None:
        saved = checkpoint.read_config(resumed)
        model.load_state_dict(checkpoint.load_tensors(resumed, "train_model"))
        ema.load_state_dict(checkpoint.load_tensors(resumed, "model"))
        optimizer_from_tensors(opt, checkpoint.load_tensors(resumed, "optimizer"), saved["optimizer"])
        start, initial = int(saved["step"]), saved["metrics"].get("psnr_initial")
    elif cfg.init_from:
        init = checkpoint.local_copy(cfg.init_from, so)
        model.load_state_dict(checkpoint.load_tensors(init, "model"))
        ema.load_state_dict(checkpoint.load_tensors(init, "model"))
    if initial is None:
        initial = evaluate(ema, heldout, dev)["psnr"]
    ddp = ray.train.torch.prepare_model(model)

    rng = np.random.default_rng(cfg.seed * 1000 + rank + start)

    def collate(items, _gen):
        crops = [c for c in (_random_crop(s, cfg.resolution, rng) for s in items) if c is not None]
        return torch.from_numpy(np.stack(crops)) if crops else None

    stream = iter(BatchStream(train_shards, collate, batch_size=cfg.batch_size, rank=rank, world=world,
                              seed=cfg.seed + start, shuffle_buffer=cfg.shuffle_buffer, storage_options=so))
    log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)

    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = l1_sum = 0.0
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            x = next(stream)
            while x is None:  # a batch of only unreadable images: take the next one
                x = next(stream)
            window.waited(time.perf_counter() - t_wait)
            x = x.to(dev)
            sync = ddp.no_sync() if micro < cfg.grad_accum - 1 and world > 1 else contextlib.nullcontext()
            with sync, autocast:
                recon, post = ddp(x)
                l1 = F.l1_loss(recon.float(), x)
                kl = 0.5 * (post.mean.float() ** 2 + post.std.float() ** 2 - 1 - 2 * torch.log(post.std.float())).mean()
                loss = l1 + cfg.ssim_weight * (1 - ssim(recon.float().clamp(-1, 1), x).mean()) + cfg.kl_weight * kl
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            l1_sum += l1.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, unwrap(ddp), ema_decay_at(step, cfg.ema_decay))

        window.step(time.perf_counter() - t_step, loss=loss_sum, l1=l1_sum, grad_norm=grad_norm)
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            scores = evaluate(ema, heldout, dev)
            metrics.update(psnr_initial=initial, **scores)
            if log is not None:
                log.log(done, metrics)
                print(f"[train-vae] step {done}/{cfg.steps} loss {metrics.get('loss', float('nan')):.4f} "
                      f"held-out PSNR {scores['psnr']:.2f} dB (initial {initial:.2f}) SSIM {scores['ssim']:.3f}",
                      flush=True)
            config = {"kind": "kl", "model": {**kl_cfg.__dict__, "widths": list(kl_cfg.widths)},
                      "scale": latent_scale(ema, heldout, dev), "shift": 0.0, "train": public_config(cfg),
                      "metrics": metrics}
            opt_tensors, opt_meta = optimizer_to_tensors(opt)
            save_checkpoint(done, {"step": done, **metrics}, {**config, "optimizer": opt_meta},
                            {"model": ema.state_dict(), "train_model": unwrap(ddp).state_dict(),
                             "optimizer": opt_tensors})
            if log is not None:
                log.sync()
        elif log is not None and metrics:
            log.log(done, metrics)


def run_train_vae(cfg: VAETrainConfig, log=print):
    train, held = split_shards(cfg)
    log(f"[train-vae] {cfg.workers} worker(s), preset {cfg.preset}, {len(train)} training shard(s), "
        f"{len(held)} held-out -> {storage.redact(cfg.output)}")
    t0 = time.time()
    result = fit(train_loop, {"cfg": cfg}, cfg)
    if result.error:
        raise result.error
    m = result.metrics
    log(f"[train-vae] finished step {m.get('step')} in {time.time() - t0:.0f}s: held-out PSNR "
        f"{m.get('psnr_initial', float('nan')):.2f} -> {m.get('psnr', float('nan')):.2f} dB, "
        f"SSIM {m.get('ssim', float('nan')):.3f}; use it as `encode --vae {storage.redact(cfg.output)}`")
    return result
