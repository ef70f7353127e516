"""``latent-pipeline train``: latent diffusion (flow matching) on cached latents with Ray Train.

The loop in :func:`train_loop` is the whole algorithm, top to bottom; Ray only places it
(``prepare_model`` for DDP, ``report`` for checkpoints). Each rank streams its own shards.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass

import torch

from . import autoencoder, checkpoint, denoiser, diffusion, manifest, storage
from .config import ConfigError, option
from .restoration import residual_target
from .streams import latent_stream
from .training import (LoopConfig, MetricsLog, StepWindow, ema_decay_at, ema_update, fit, lr_at,
                       optimizer_from_tensors, optimizer_to_tensors, public_config, restore_checkpoint,
                       save_checkpoint, unwrap)


@dataclass
class TrainConfig(LoopConfig):
    latents: str = option("", "latent dataset (output of `encode`, with _manifest.json)")
    model: str = option("tiny", "denoiser size: tiny, small, base, large")
    task: str = option("", "restoration task to train (upscale2, upscale4, restore); '' = unconditional")
    num_classes: int = option(0, "class-conditional with this many classes (.cls); 0 = unconditional")
    label_dropout: float = option(0.1, "probability of dropping the class label (classifier-free guidance)")
    sample_posterior: bool = option(False, "train on mean + std * noise instead of the posterior mean")
    shuffle_buffer: int = option(1000, "samples in each rank's shuffle buffer")
    vae: str = option("", "autoencoder of the latents (default: the one recorded in the manifest)")
    sample_steps: int = option(20, "sampler steps for the sample grids")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.latents:
            raise ConfigError("option 'latents' is required")
        denoiser.config_for(self.model)  # validates the size name
        from .degrade import TASKS

        if self.task and self.task not in TASKS:
            raise ConfigError(f"option 'task': unknown task {self.task!r}; choose from {sorted(TASKS)}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("option 'label_dropout' must be in [0, 1)")


def _vae_url(cfg: TrainConfig, man: dict) -> str:
    url = cfg.vae or man.get("config", {}).get("vae", "")
    if not url:
        raise ConfigError("the manifest records no autoencoder path: pass --vae")
    return url


def train_loop(loop_config: dict) -> None:
    """One DDP rank. Runs on a Ray Train worker."""
    import ray.train
    import ray.train.torch

    from .ray_setup import quiet_ray_loggers
    from .sampling import DiffusionModel, generate, grid

    quiet_ray_loggers()
    cfg: TrainConfig = loop_config["cfg"]
    residual_scale = loop_config["residual_scale"]
    so = cfg.storage_options
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)

    # ---- data description, model, optimizer
    man = manifest.load(cfg.latents, so)
    cond_channels = man["latent_shape"][0] if cfg.task else 0
    mcfg = denoiser.config_for(cfg.model, latent_channels=man["latent_shape"][0], cond_channels=cond_channels,
                               num_classes=cfg.num_classes)
    model = denoiser.Denoiser(mcfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    vae_local = checkpoint.local_copy(_vae_url(cfg, man), so)
    vae = autoencoder.load(vae_local)
    if vae.weights_sha256 != man["encoder"]["weights_sha256"]:
        raise ConfigError("the autoencoder given does not match the one that encoded the latents")

    # ---- resume (restart or re-run) or warm start
    start = 0
    resumed = restore_checkpoint()
    if resumed is not None:
        saved = checkpoint.read_config(resumed)
        model.load_state_dict(checkpoint.load_tensors(resumed, "model"))
        ema.load_state_dict(checkpoint.load_tensors(resumed, "ema"))
        optimizer_from_tensors(opt, checkpoint.load_tensors(resumed, "optimizer"), saved["optimizer"])
        start = int(saved["step"])
    elif cfg.init_from:
        init = checkpoint.local_copy(cfg.init_from, so)
        model.load_state_dict(checkpoint.load_tensors(init, "ema"))
        ema.load_state_dict(checkpoint.load_tensors(init, "ema"))
    ddp = ray.train.torch.prepare_model(model)

    stream = iter(latent_stream(cfg.latents, batch_size=cfg.batch_size, rank=rank, world=world,
                               seed=cfg.seed + start, shuffle_buffer=cfg.shuffle_buffer,
                               sample_posterior=cfg.sample_posterior, task=cfg.task,
                               use_classes=cfg.num_classes > 0, storage_options=so))
    log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + start)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)

    ckpt_config = {"kind": "diffusion", "model": denoiser.to_dict(mcfg), "train": public_config(cfg),
                   "task": cfg.task, "latent_shape": man["latent_shape"], "scale": man["scale"],
                   "shift": man["shift"], "residual_scale": residual_scale,
                   "vae": {"path": "vae", "identity": man["encoder"]},
                   "latents": storage.redact(cfg.latents)}

    # ---- the loop
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            batch = next(stream)
            window.waited(time.perf_counter() - t_wait)
            x0 = batch.x0.to(dev)
            cond = batch.cond.to(dev) if batch.cond is not None else None
            if cond is not None:  # a task model generates the residual over the classical view
                x0 = residual_target(x0, cond, residual_scale)
            y = batch.y.to(dev) if batch.y is not None else None
            if y is not None and cfg.label_dropout:
                drop = torch.rand(y.shape, generator=gen).to(dev) < cfg.label_dropout
                y = torch.where(drop, torch.full_like(y, -1), y)
            t = diffusion.sample_t(x0.shape[0], "cpu", gen, uniform_share=0.5 if cfg.task else 0.0).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 or world == 1 else ddp.no_sync()
            with sync, autocast:
                loss = diffusion.loss(lambda x, tt: ddp(x, tt, cond, y), x0, t, noise) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, unwrap(ddp), ema_decay_at(step, cfg.ema_decay))

        window.step(time.perf_counter() - t_step, loss=loss_sum, grad_norm=grad_norm)
        done = step + 1
        metrics = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
            if log is not None:
                log.log(done, metrics)
                print(f"[train] step {done}/{cfg.steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                      f"{metrics['samples_per_s']:.1f} samples/s data-wait {100 * metrics['data_wait_share']:.1f}%",
                      flush=True)
        if rank == 0 and not cfg.task and (
                (cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.steps):
            _write_sample_grid(cfg, DiffusionModel(ema.eval(), vae, ckpt_config), done, generate, grid)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            opt_tensors, opt_meta = optimizer_to_tensors(opt)
            save_checkpoint(done, {"step": done, **metrics}, {**ckpt_config, "optimizer": opt_meta},
                            {"model": unwrap(ddp).state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors},
                            extra_dirs={"vae": vae_local})
            if log is not None:
                log.sync()


def _write_sample_grid(cfg: TrainConfig, model, step: int, generate, grid) -> None:
    classes = list(range(cfg.num_classes)) if cfg.num_classes else None
    images = generate(model, 16, steps=cfg.sample_steps, classes=classes, seed=cfg.seed)
    buf = io.BytesIO()
    grid(images).save(buf, format="PNG")
    storage.write_bytes(storage.join(cfg.output, "samples", f"step_{step:08d}.png"), buf.getvalue(),
                        cfg.storage_options)


def measure_residual_scale(cfg: TrainConfig, batches: int = 4) -> float:
    """1 / std of the task residual (latent - view) over a few batches, so targets are ~unit scale.

    Measured once by the driver and passed to every rank, so all ranks agree.
    """
    stream = iter(latent_stream(cfg.latents, batch_size=cfg.batch_size, task=cfg.task, shuffle_buffer=1,
                                storage_options=cfg.storage_options))
    res = torch.cat([residual_target(b.x0, b.cond, 1.0) for b in (next(stream) for _ in range(batches))])
    stream.close()
    return float(1.0 / res.std().clamp_min(1e-4))


def run_train(cfg: TrainConfig, log=print):
    man = manifest.load(cfg.latents, cfg.storage_options)  # refuse a bad dataset before starting workers
    if cfg.task and cfg.task not in man["tasks"]:
        raise ConfigError(f"the latent dataset has no '{cfg.task}' view; encode with --tasks {cfg.task}")
    log(f"[train] {cfg.workers} worker(s), {man['totals']['written']} latents in {len(man['shards'])} shards, "
        f"model {cfg.model}{', task ' + cfg.task if cfg.task else ''} -> {storage.redact(cfg.output)}")
    t0 = time.time()
    residual_scale = measure_residual_scale(cfg) if cfg.task else 1.0
    result = fit(train_loop, {"cfg": cfg, "residual_scale": residual_scale}, cfg)
    if result.error:
        raise result.error
    log(f"[train] finished step {result.metrics.get('step')} in {time.time() - t0:.0f}s; "
        f"latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return result
