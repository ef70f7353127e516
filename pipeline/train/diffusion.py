"""``latent-pipeline train``: latent diffusion (flow matching) on cached latents with Ray Train.

The loop in :func:`train_loop` is the whole algorithm, top to bottom; Ray only places it
(``prepare_model`` for DDP, ``report`` for checkpoints). Each rank streams its own shards.
The steps both training loops share (resume, learning rate, gradient sync, optimizer step,
checkpoint) come from :mod:`pipeline.train.loop`, so the two loops cannot drift apart.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, check_range, option, public_dict, require
from pipeline.io import checkpoint, imaging, manifest, storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import autoencoder, denoiser, flow
from pipeline.models.degrade import check_task, residual_target
from pipeline.train.loop import (
    LoopConfig,
    MetricsLog,
    StepWindow,
    fit,
    grad_sync,
    new_optimizer,
    optimizer_step,
    resume_or_init,
    save_checkpoint,
    set_lr,
    worker_setup,
)
from pipeline.train.streams import latent_stream

log = logging.getLogger("pipeline.train")


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
    calibration_images: str = option(
        "",
        "task models: held-out photos (folder or glob) on which the detail gain is calibrated after "
        "training and stored in the checkpoint; `restore` uses it by default",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "latents")
        self.latents, self.vae = storage.absolute(self.latents), storage.absolute(self.vae)
        self.calibration_images = storage.absolute(self.calibration_images)
        if self.calibration_images and not self.task:
            raise ConfigError("option 'calibration-images' needs a --task (it calibrates a restoration model)")
        storage.check_separate(
            self.output,
            {
                "latents": self.latents,
                "vae": self.vae,
                "init_from": self.init_from,
                "calibration_images": self.calibration_images,
            },
        )
        denoiser.config_for(self.model)  # validates the size name
        check_task(self.task, allow_empty=True)
        check_range("label_dropout", self.label_dropout, 0.0, 1.0, hi_open=True)
        if self.num_classes < 0 or self.shuffle_buffer < 1 or self.sample_steps < 1:
            raise ConfigError(
                "options 'num-classes' (>= 0), 'shuffle-buffer' and 'sample-steps' (>= 1) are out of range"
            )


def _vae_url(cfg: TrainConfig, man: dict) -> str:
    url = cfg.vae or man.get("config", {}).get("vae", "")
    if not url:
        raise ConfigError("the manifest records no autoencoder path: pass --vae")
    return url


def train_loop(loop_config: dict) -> None:
    """One DDP rank. Runs on a Ray Train worker."""
    import ray.train.torch

    from pipeline.models.generate import generate, grid
    from pipeline.models.loading import DiffusionModel

    cfg: TrainConfig = loop_config["cfg"]
    residual_scale = loop_config["residual_scale"]
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    torch.manual_seed(cfg.seed + rank)

    # ---- data description, model, optimizer
    man = manifest.load(cfg.latents, so)
    cond_channels = man["latent_shape"][0] if cfg.task else 0
    mcfg = denoiser.config_for(
        cfg.model, latent_channels=man["latent_shape"][0], cond_channels=cond_channels, num_classes=cfg.num_classes
    )
    model = denoiser.Denoiser(mcfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = new_optimizer(model, cfg)
    vae_local = checkpoint.local_copy(_vae_url(cfg, man), so)
    vae = autoencoder.load(vae_local)
    if vae.weights_sha256 != man["encoder"]["weights_sha256"]:
        raise ConfigError("the autoencoder given does not match the one that encoded the latents")

    # ---- resume (restart or re-run) or warm start
    start, _ = resume_or_init(model, ema, opt, cfg, "diffusion")
    ddp = ray.train.torch.prepare_model(model)

    stream = iter(
        latent_stream(
            cfg.latents,
            batch_size=cfg.batch_size,
            rank=rank,
            world=world,
            seed=cfg.seed + start,
            shuffle_buffer=cfg.shuffle_buffer,
            sample_posterior=cfg.sample_posterior,
            task=cfg.task,
            use_classes=cfg.num_classes > 0,
            storage_options=so,
        )
    )
    metrics_log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + start)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)

    info = CheckpointInfo(
        kind="diffusion",
        model=denoiser.to_dict(mcfg),
        train=public_dict(cfg),
        task=cfg.task,
        latent_shape=man["latent_shape"],
        scale=man["scale"],
        shift=man["shift"],
        residual_scale=residual_scale,
        vae_identity=man["encoder"],
        latents=storage.redact(cfg.latents),
    )

    # ---- the loop
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, step, cfg)
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
            t = flow.sample_t(x0.shape[0], "cpu", gen, uniform_share=0.5 if cfg.task else 0.0).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            with grad_sync(ddp, micro, cfg, world), autocast:
                loss = flow.loss(lambda x, tt: ddp(x, tt, cond, y), x0, t, noise)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum  # .item() syncs with the device once per micro-step
        grad_norm = optimizer_step(ddp, opt, ema, step, cfg)

        window.step(time.perf_counter() - t_step, loss=loss_sum, grad_norm=grad_norm)
        done = step + 1
        metrics = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = window.flush(lr=lr)
            if metrics_log is not None:
                metrics_log.log(done, metrics)
                log.info(
                    f"[train] step {done}/{cfg.steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                    f"{metrics['samples_per_s']:.1f} samples/s data-wait {100 * metrics['data_wait_share']:.1f}%"
                )
        if rank == 0 and not cfg.task and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.steps):
            images = generate(
                DiffusionModel(ema.eval(), vae, info),
                16,
                steps=cfg.sample_steps,
                classes=list(range(cfg.num_classes)) or None,
                seed=cfg.seed,
            )
            buf = io.BytesIO()
            grid(images).save(buf, format="PNG")
            storage.write_bytes(storage.join(cfg.output, "samples", f"step_{done:08d}.png"), buf.getvalue(), so)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(
                done, {"step": done, **metrics}, info, ddp, ema, opt, extra_dirs={checkpoint.VAE_DIR: vae_local}
            )
            if metrics_log is not None:
                metrics_log.sync()


def measure_residual_scale(cfg: TrainConfig, batches: int = 4) -> float:
    """1 / std of the task residual (latent - view) over a few batches, so targets are ~unit scale.

    Measured once by the driver and passed to every rank, so all ranks agree.
    """
    stream = iter(
        latent_stream(
            cfg.latents, batch_size=cfg.batch_size, task=cfg.task, shuffle_buffer=1, storage_options=cfg.storage.options
        )
    )
    res = torch.cat([residual_target(b.x0, b.cond, 1.0) for b in (next(stream) for _ in range(batches))])
    stream.close()
    return float(1.0 / res.std().clamp_min(1e-4))


def train_model(cfg: TrainConfig):
    """Check the inputs on the driver, then run the loop on Ray Train; returns Ray's Result."""
    so = cfg.storage.options
    man = manifest.load(cfg.latents, so)  # refuse a bad dataset before starting workers
    if cfg.task and cfg.task not in man["tasks"]:
        raise ConfigError(f"the latent dataset has no '{cfg.task}' view; encode with --tasks {cfg.task}")
    autoencoder.load(_vae_url(cfg, man), so)  # refuse a missing or wrong autoencoder on the driver
    if cfg.init_from:
        checkpoint.load(cfg.init_from, "diffusion", so)
    if cfg.calibration_images and not storage.list_files(cfg.calibration_images, imaging.IMAGE_SUFFIXES, so):
        raise ConfigError(f"option 'calibration-images': no images under {storage.redact(cfg.calibration_images)}")
    log.info(
        f"[train] {cfg.workers} worker(s), {man['totals']['written']} latents in {len(man['shards'])} shards, "
        f"model {cfg.model}{', task ' + cfg.task if cfg.task else ''} -> {storage.redact(cfg.output)}"
    )
    t0 = time.time()
    residual_scale = measure_residual_scale(cfg) if cfg.task else 1.0
    result = fit(train_loop, {"cfg": cfg, "residual_scale": residual_scale}, cfg)
    if result.error:
        raise result.error
    log.info(
        f"[train] finished step {result.metrics.get('step')} in {time.time() - t0:.0f}s; "
        f"latest checkpoint {storage.redact(result.checkpoint.path) if result.checkpoint else None}"
    )
    return result
