"""``latent-pipeline train-refiner``: train a task's pixel refiner on image shards with Ray Train.

The refiner (:mod:`pipeline.models.refiner`) learns ``x - base``: each training crop is
degraded with the task's known degradation (:func:`degrade.degrade`), its classical base is
computed exactly as ``restore`` computes it (:func:`degrade.classical_base`: back-projection for
upscaling, TV + Wiener for ``restore``), and the loss is the MSE of the residual scaled by
:data:`refiner.OUTPUT_SCALE`. Same conventions as the other loops: an explicit loop, AdamW with
warmup and cosine decay, EMA, checkpoints every N steps, resume on restart or re-run. Held-out
PSNR of the base and of the refined base is measured at every checkpoint.

Use the result with ``train --task T --refiner OUTPUT``: the task checkpoint then carries it, and
``restore``'s fidelity mode uses it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError, option, public_dict, require
from pipeline.io import checkpoint, imaging, storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import degrade, refiner
from pipeline.models.quality import psnr
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

log = logging.getLogger("pipeline.train_refiner")


@dataclass
class RefinerTrainConfig(ImageLoopConfig):
    task: str = option("", "restoration task: upscale2, upscale4 or restore")
    channels: int = option(64, "convolution channels")
    depth: int = option(7, "convolution layers")
    unshuffle: int = option(2, "pixel-unshuffle factor before the convolutions (1, 2 or 4; 2 is ~4x cheaper than 1)")
    resolution: int = option(96, "training crop size (a multiple of the task's scale)")
    batch_size: int = option(16, "samples per rank per micro-step")
    lr: float = option(1e-3, "peak AdamW learning rate")
    warmup_steps: int = option(50, "linear learning-rate warmup steps")
    grad_clip: float = option(0.0, "gradient norm clip (0: off)")
    ema_decay: float = option(0.99, "EMA decay of the weights")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "task")
        degrade.check_task(self.task)
        if self.resolution % degrade.TASKS[self.task].scale:
            raise ConfigError(f"option 'resolution' must be a multiple of the task's scale for {self.task}")
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def model_config(self) -> refiner.RefinerConfig:
        return refiner.RefinerConfig(self.task, self.channels, self.depth, self.unshuffle)


def training_pair(task: str, clean: Image.Image, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(classical base, clean target) of one clean crop, both (3, H, W) in [-1, 1]."""
    base = degrade.classical_base(task, degrade.degrade(task, clean, seed))
    return (base.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32), imaging.to_tensor_array(clean)


@torch.no_grad()
def evaluate(model: refiner.Refiner, pairs: tuple[torch.Tensor, torch.Tensor], dev) -> dict[str, float]:
    """Held-out PSNR of the base and of the refined base."""
    model.eval()
    base, clean = pairs
    refined = (base + model(base.to(dev)).cpu()).clamp(-1, 1)
    before, after = float(psnr(base.clamp(-1, 1), clean).mean()), float(psnr(refined, clean).mean())
    return {"psnr_base": before, "psnr": after, "gain_db": after - before}


def train_loop(loop_config: dict) -> None:
    """One DDP rank. Runs on a Ray Train worker."""
    import ray.train.torch

    cfg: RefinerTrainConfig = loop_config["cfg"]
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    torch.manual_seed(cfg.seed + rank)
    train_shards, held_shards = split_shards(cfg, "train-refiner")

    # ---- model, optimizer, held-out pairs (degraded with fixed seeds, so every checkpoint sees the same)
    model = refiner.Refiner(cfg.model_config()).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = new_optimizer(model, cfg)
    held = [training_pair(cfg.task, im, i) for i, im in enumerate(heldout_crops(held_shards, cfg))]
    heldout = (torch.from_numpy(np.stack([b for b, _ in held])), torch.from_numpy(np.stack([c for _, c in held])))

    start, _resumed = resume_or_init(model, ema, opt, cfg, "refiner")
    ddp = ray.train.torch.prepare_model(model)
    rng = np.random.default_rng(cfg.seed * 1000 + rank + start)

    def collate(items, _gen):
        pairs = []
        for s in items:
            crop = random_crop(s, cfg.resolution, rng)
            if crop is not None:
                pairs.append(training_pair(cfg.task, crop, int(rng.integers(2**31))))
        if not pairs:
            return None
        return torch.from_numpy(np.stack([b for b, _ in pairs])), torch.from_numpy(np.stack([c for _, c in pairs]))

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
    info = CheckpointInfo(kind="refiner", model=cfg.model_config().to_dict(), task=cfg.task, train=public_dict(cfg))

    # ---- the loop
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, step, cfg)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            while batch is None:  # a batch of only unreadable images: take the next one
                batch = next(stream)
            window.waited(time.perf_counter() - t_wait)
            base, clean = batch[0].to(dev), batch[1].to(dev)
            with grad_sync(ddp, micro, cfg, world), autocast:
                predicted = ddp(base).float()
                # the MSE of the residual times OUTPUT_SCALE: the network's own output scale
                loss = F.mse_loss(predicted * refiner.OUTPUT_SCALE, (clean - base) * refiner.OUTPUT_SCALE)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        grad_norm = optimizer_step(ddp, opt, ema, step, cfg)

        window.step(time.perf_counter() - t_step, loss=loss_sum, grad_norm=grad_norm)
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            scores = evaluate(ema, heldout, dev)
            metrics.update(scores)
            if metrics_log is not None:
                metrics_log.log(done, metrics)
                log.info(
                    f"[train-refiner] step {done}/{cfg.steps} {loss_text(metrics)}"
                    f"held-out PSNR {scores['psnr']:.2f} dB (base {scores['psnr_base']:.2f}, "
                    f"{scores['gain_db']:+.2f} dB)"
                )
            info.metrics = metrics
            save_checkpoint(done, {"step": done, **metrics}, info, ddp, ema, opt)
            if metrics_log is not None:
                metrics_log.sync()
        elif metrics_log is not None and metrics:
            metrics_log.log(done, metrics)


def run_train_refiner(cfg: RefinerTrainConfig):
    train, held = split_shards(cfg, "train-refiner")
    check_readable(train, held, cfg, "train-refiner")
    if cfg.init_from:
        _, info = checkpoint.load(cfg.init_from, "refiner", cfg.storage.options)
        if info.task != cfg.task or refiner.RefinerConfig.from_dict(info.model) != cfg.model_config():
            raise ConfigError("option 'init-from': that refiner has another task or architecture")
    log.info(
        f"[train-refiner] {cfg.workers} worker(s), task {cfg.task}, {len(train)} training shard(s), "
        f"{len(held)} held-out -> {storage.redact(cfg.output)}"
    )
    t0 = time.time()
    result = fit(train_loop, {"cfg": cfg}, cfg)
    if result.error:
        raise result.error
    m = result.metrics
    log.info(
        f"[train-refiner] finished step {m.get('step')} in {time.time() - t0:.0f}s: held-out PSNR "
        f"{m.get('psnr_base', float('nan')):.2f} (base) -> {m.get('psnr', float('nan')):.2f} dB; bundle it with "
        f"`train --task {cfg.task} --refiner {storage.redact(cfg.output)}`"
    )
    return result
