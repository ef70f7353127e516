"""The one skeleton of the pixel-space training loops (``train-vae``, ``train-refiner``).

Both train a network on crops of image shards with Ray Train: the same placement, optimizer,
EMA, resume, metrics windows and checkpoint cadence. What differs is a :class:`PixelTask`: the
network, the held-out set and its scores, how a batch is collated from shard samples, and the
loss of a batch. The loop below reads top to bottom as the diffusion loop does; each verb's
module holds its task and its config. :func:`run_pixel_training` is their shared driver.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.io.checkpoint import CheckpointInfo
from pipeline.train.crops import ImageLoopConfig, check_readable, split_shards
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


@dataclass
class PixelTask:
    """What one pixel-space loop trains, built on its worker by the verb's ``setup``.

    * ``model``: the network (on the worker's device), ``kind``: its checkpoint kind, ``info``
      the checkpoint description its checkpoints carry;
    * ``collate(samples, rng)``: a batch from shard samples, or None when none was readable;
    * ``loss(ddp, batch)``: the batch's loss and extra per-step values to average (``{"l1": ..}``);
    * ``scores(ema)``: held-out scores at a checkpoint; ``scores_text(metrics)`` their log text;
    * ``before_save(ema, metrics)``: a last change to ``info`` (the autoencoder's latent scale).
    """

    model: torch.nn.Module
    kind: str
    info: CheckpointInfo
    collate: Callable[[list, np.random.Generator], Any]
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    scores: Callable[[torch.nn.Module], dict[str, float]]
    scores_text: Callable[[dict[str, float]], str]
    before_save: Callable[[torch.nn.Module, dict[str, float]], None] = lambda ema, metrics: None


Setup = Callable[[Any, int, torch.device, list[str]], PixelTask]  # (the verb's config, rank, device, held-out shards)
Resumed = Callable[[PixelTask, torch.nn.Module, CheckpointInfo | None], dict[str, float]]


def pixel_train_loop(loop_config: dict) -> None:
    """One DDP rank of a pixel-space loop. Runs on a Ray Train worker."""
    import ray.train.torch

    cfg: ImageLoopConfig = loop_config["cfg"]
    verb: str = loop_config["verb"]
    setup: Setup = loop_config["setup"]
    on_resume: Resumed = loop_config["on_resume"]
    log = logging.getLogger(f"pipeline.{verb.replace('-', '_')}")
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    train_shards, held_shards = split_shards(cfg, verb)

    # ---- the task's network and held-out set, the EMA copy, the optimizer
    task = setup(cfg, rank, dev, held_shards)
    model = task.model
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = new_optimizer(model, cfg)

    # ---- resume (restart or re-run) or warm start
    start, resumed = resume_or_init(model, ema, opt, cfg, task.kind)
    fixed_metrics = on_resume(task, ema, resumed)  # values every checkpoint repeats (the initial score)
    ddp = ray.train.torch.prepare_model(model)
    rng = np.random.default_rng(cfg.seed * 1000 + rank + start)
    stream = iter(
        BatchStream(
            train_shards,
            lambda items, _gen: task.collate(items, rng),
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

    # ---- the loop
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, step, cfg)
        sums: dict[str, float] = {"loss": 0.0}
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            while batch is None:  # a batch of only unreadable images: take the next one
                batch = next(stream)
            window.waited(time.perf_counter() - t_wait)
            with grad_sync(ddp, micro, cfg, world), autocast:
                loss, extras = task.loss(ddp, batch)
                (loss / cfg.grad_accum).backward()
            # .item() syncs with the device once per value and micro-step
            for name, value in {"loss": loss, **extras}.items():
                sums[name] = sums.get(name, 0.0) + value.item() / cfg.grad_accum
        grad_norm = optimizer_step(ddp, opt, ema, step, cfg)

        window.step(time.perf_counter() - t_step, **sums, grad_norm=grad_norm)
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            scores = task.scores(ema)
            metrics.update(fixed_metrics, **scores)
            if metrics_log is not None:
                metrics_log.log(done, metrics)
                log.info(f"[{verb}] step {done}/{cfg.steps} {loss_text(metrics)}{task.scores_text(metrics)}")
            task.before_save(ema, metrics)
            task.info.metrics = metrics
            save_checkpoint(done, {"step": done, **metrics}, task.info, ddp, ema, opt)
            if metrics_log is not None:
                metrics_log.sync()
        elif metrics_log is not None and metrics:
            metrics_log.log(done, metrics)


def no_resumed_metrics(task: PixelTask, ema: torch.nn.Module, resumed: CheckpointInfo | None) -> dict[str, float]:
    return {}


def run_pixel_training(
    cfg: ImageLoopConfig,
    verb: str,
    setup: Setup,
    *,
    on_resume: Resumed = no_resumed_metrics,
    check_init: Callable[[], None] = lambda: None,
    describe: str = "",
) -> Any:
    """The driver of a pixel-space loop: refuse image sets without a readable image and a wrong
    ``--init-from`` on the driver, then run :func:`pixel_train_loop` with Ray Train."""
    from pipeline.io import storage

    log = logging.getLogger(f"pipeline.{verb.replace('-', '_')}")
    train, held = split_shards(cfg, verb)
    check_readable(train, held, cfg, verb)
    if cfg.init_from:
        check_init()
    log.info(
        f"[{verb}] {cfg.workers} worker(s), {describe}, {len(train)} training shard(s), "
        f"{len(held)} held-out -> {storage.redact(cfg.output)}"
    )
    result = fit(pixel_train_loop, {"cfg": cfg, "verb": verb, "setup": setup, "on_resume": on_resume}, cfg)
    if result.error:
        raise result.error
    return result
