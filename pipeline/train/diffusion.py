"""``latent-pipeline train``: latent diffusion (flow matching) on cached latents with Ray Train.

The loop in :func:`train_loop` is the whole algorithm, top to bottom; Ray only places it
(``prepare_model`` for DDP, ``report`` for checkpoints). Each rank streams its own shards.
The steps both training loops share (resume, learning rate, gradient sync, optimizer step,
checkpoint, metric lines) come from :mod:`pipeline.train.loop`, so the loops cannot drift apart.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, option, public_dict, require
from pipeline.io import checkpoint, imaging, manifest, storage
from pipeline.io.checkpoint import CheckpointError, CheckpointInfo
from pipeline.models import autoencoder, denoiser, flow, text
from pipeline.models.degrade import INPAINT, RESTORE_TASKS, residual_target
from pipeline.models.refiner import load as load_refiner
from pipeline.train.loop import (
    LoopConfig,
    MetricsLog,
    StepWindow,
    fit,
    grad_sync,
    log_step,
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
    model: str = option(
        "tiny",
        "denoiser: U-Net tiny, small, base, large, or transformer dit-tiny, dit-s, dit-b, dit-l, dit-xl "
        "(DiT's published sizes, patch 2)",
    )
    task: str = option(
        "",
        "restoration task to train ('' = unconditional; inpaint: conditioned on the biharmonic fill's latent "
        "and the hole at the latent grid)",
        choices=RESTORE_TASKS,
        noun="task",
    )
    num_classes: int = option(0, "class-conditional with this many classes (.cls); 0 = unconditional", range=(0, None))
    label_dropout: float = option(
        0.1, "probability of dropping the class label (classifier-free guidance)", range=(0, 1), hi_open=True
    )
    text: bool = option(True, "condition on the dataset's caption embeddings when it has them (encode --text-encoder)")
    caption_dropout: float = option(
        0.1,
        "probability of training a sample on the empty-caption embedding (classifier-free guidance)",
        range=(0, 1),
        hi_open=True,
    )
    flip_prob: float = option(
        0.0, "probability of using a sample's cached flipped latent (encode --flip)", range=(0, 1)
    )
    compile: bool = option(False, "torch.compile the denoiser (pays off on GPU for long runs; first steps are slow)")
    sample_posterior: bool = option(False, "train on mean + std * noise instead of the posterior mean")
    shuffle_buffer: int = option(1000, "samples in each rank's shuffle buffer", range=(1, None))
    vae: str = option("", "autoencoder of the latents (default: the one recorded in the manifest)")
    sample_steps: int = option(20, "sampler steps for the sample grids", range=(1, None))
    calibration_images: str = option(
        "",
        "task models: held-out photos (folder or glob) on which the detail gain is calibrated after "
        "training and stored in the checkpoint; `restore` uses it by default",
    )
    refiner: str = option(
        "",
        "task models: a pixel refiner for the same task (output of `train-refiner`), carried in every "
        "checkpoint; `restore`'s fidelity mode then uses it instead of the latent model",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "latents")
        self.latents, self.vae = storage.absolute(self.latents), storage.absolute(self.vae)
        self.calibration_images = storage.absolute(self.calibration_images)
        self.refiner = storage.absolute(self.refiner)
        if self.calibration_images and not self.task:
            raise ConfigError("option 'calibration-images' needs a --task (it calibrates a restoration model)")
        if self.refiner and not self.task:
            raise ConfigError("option 'refiner' needs a --task (a refiner restores)")
        if self.refiner and self.task == INPAINT:
            raise ConfigError(
                "option 'refiner': an inpainting refiner is a checkpoint of its own (restore --task inpaint "
                "--checkpoint REFINER), not carried in a latent model"
            )
        storage.check_separate(
            self.output,
            {
                "latents": self.latents,
                "vae": self.vae,
                "init_from": self.init_from,
                "calibration_images": self.calibration_images,
                "refiner": self.refiner,
            },
        )
        denoiser.config_for(self.model)  # validates the size name


def _vae_url(cfg: TrainConfig, man: dict) -> str:
    url = cfg.vae or man.get("config", {}).get("vae", "")
    if not url:
        raise ConfigError("the manifest records no autoencoder path: pass --vae")
    return url


def train_loop(loop_config: dict) -> None:
    """One DDP rank. Runs on a Ray Train worker."""
    import ray.train.torch

    from pipeline.models.generate import generate, save_grid
    from pipeline.models.loading import DiffusionModel

    cfg: TrainConfig = loop_config["cfg"]
    residual_scale = loop_config["residual_scale"]
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    torch.manual_seed(cfg.seed + rank)

    # ---- data description, model, optimizer
    man = manifest.load(cfg.latents, so)
    shapes = latent_shapes(man)
    spec = text_spec(cfg, man)
    mcfg = model_config(cfg, man)
    model = denoiser.build(mcfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = new_optimizer(model, cfg)
    vae_local = checkpoint.local_copy(_vae_url(cfg, man), so)
    vae = autoencoder.load(vae_local)
    extra_dirs = {checkpoint.VAE_DIR: vae_local}  # carried in every checkpoint
    if cfg.refiner:
        extra_dirs[checkpoint.REFINER_DIR] = checkpoint.local_copy(cfg.refiner, so)
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
            use_text=spec is not None,
            caption_dropout=cfg.caption_dropout,
            flip_prob=cfg.flip_prob,
            storage_options=so,
        )
    )
    null_text = empty_caption(cfg.latents, man, spec, so) if spec else None
    # kept in the checkpoint: `sample` draws unconditionally (and guides) without the text encoders
    null_tensors = {text.NULL_TEXT: {k: v for k, v in null_text.items() if v is not None}} if null_text else None
    net = torch.compile(ddp) if cfg.compile else ddp
    metrics_log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + start)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)

    info = CheckpointInfo(
        kind="diffusion",
        model=denoiser.to_dict(mcfg),
        train=public_dict(cfg),
        task=cfg.task,
        latent_shape=default_shape(man),
        buckets=[list(s) for s in shapes] if man["latent_shape"] is None else [],
        text_encoders=spec.encoders if spec else [],
        scale=man["scale"],
        shift=man["shift"],
        residual_scale=residual_scale,
        vae_identity=man["encoder"],
        latents=storage.public_url(cfg.latents),
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
            kw = batch.model_kwargs(dev)  # cond, y, text, text_mask, pooled
            if kw["cond"] is not None:  # a task model generates the residual over the classical view
                x0 = residual_target(x0, view_of(kw["cond"], x0), residual_scale)
            if kw["y"] is not None and cfg.label_dropout:
                drop = torch.rand(kw["y"].shape, generator=gen).to(dev) < cfg.label_dropout
                kw["y"] = torch.where(drop, torch.full_like(kw["y"], -1), kw["y"])
            t = flow.sample_t(x0.shape[0], "cpu", gen, uniform_share=0.5 if cfg.task else 0.0).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            with grad_sync(ddp, micro, cfg, world), autocast:
                loss = flow.loss(lambda x, tt: net(x, tt, **kw), x0, t, noise)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum  # .item() syncs with the device once per micro-step
        grad_norm = optimizer_step(ddp, opt, ema, step, cfg)

        window.step(time.perf_counter() - t_step, loss=loss_sum, grad_norm=grad_norm)
        done = step + 1
        metrics = log_step(done, cfg, window, lr, metrics_log, "train")
        if rank == 0 and not cfg.task and cfg.sample_due(done):
            images = generate(
                DiffusionModel(ema.eval(), vae, info),
                16,
                steps=cfg.sample_steps,
                classes=list(range(cfg.num_classes)) or None,
                text=text.repeat(null_text, 16) if null_text else None,  # unconditional: the empty caption
                seed=cfg.seed,
            )
            save_grid(images, cfg.sample_url(done), so)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(
                done, {"step": done, **metrics}, info, ddp, ema, opt, extra_dirs=extra_dirs, extra_tensors=null_tensors
            )
            if metrics_log is not None:
                metrics_log.sync()


def latent_shapes(man: dict) -> list[tuple[int, ...]]:
    """The dataset's latent shapes: one, or one per aspect-ratio bucket."""
    if man["latent_shape"] is not None:
        return [tuple(man["latent_shape"])]
    return [tuple(b["latent_shape"]) for b in man["buckets"]]


def default_shape(man: dict) -> list[int]:
    """The latent shape `sample` draws by default: the dataset's, or its squarest bucket's
    (the most populated among equally square ones)."""
    if man["latent_shape"] is not None:
        return list(man["latent_shape"])
    best = min(man["buckets"], key=lambda b: (abs(math.log(b["size"][0] / b["size"][1])), -b["samples"]))
    return list(best["latent_shape"])


def text_spec(cfg: TrainConfig, man: dict):
    """How the model reads the captions (None: not text-conditioned)."""
    if not cfg.text or not man.get("text_encoders"):
        return None
    return text.TextSpec.from_manifest(man)


def empty_caption(root: str, man: dict, spec, storage_options: dict | None) -> dict[str, torch.Tensor | None]:
    """The denoiser's text inputs for one empty caption, from the dataset's stored embedding."""
    from pipeline.train.streams import read_empty_captions

    tokens, pooled = spec.join(*read_empty_captions(root, man, storage_options))
    t, m = text.pad_tokens([tokens])
    return {
        "text": torch.from_numpy(t),
        "text_mask": torch.from_numpy(m),
        "pooled": torch.from_numpy(pooled[None]) if pooled is not None else None,
    }


def measure_residual_scale(cfg: TrainConfig, batches: int = 4) -> float:
    """1 / std of the task residual (latent - view) over a few batches, so targets are ~unit scale.

    Measured once by the driver and passed to every rank, so all ranks agree.
    """
    stream = iter(
        latent_stream(
            cfg.latents, batch_size=cfg.batch_size, task=cfg.task, shuffle_buffer=1, storage_options=cfg.storage.options
        )
    )
    res = torch.cat([residual_target(b.x0, view_of(b.cond, b.x0), 1.0) for b in (next(stream) for _ in range(batches))])
    stream.close()
    return float(1.0 / res.std().clamp_min(1e-4))


def view_of(cond: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The view's latent in a task model's condition: its first channels (inpaint: the hole follows)."""
    return cond[:, : x0.shape[1]]


BYTES_PER_PARAMETER = 20  # fp32 weights, gradients, EMA and AdamW's two moments (activations not counted)


def model_config(cfg: TrainConfig, man: dict):
    """The denoiser's architecture for this dataset: its latent channels, the task view's
    channels, classes, and the width of its text inputs."""
    spec = text_spec(cfg, man)
    channels = latent_shapes(man)[0][0]
    return denoiser.config_for(
        cfg.model,
        latent_channels=channels,
        cond_channels=(channels + (cfg.task == INPAINT)) if cfg.task else 0,  # inpaint: + the hole
        num_classes=cfg.num_classes,
        text_dim=spec.text_dim if spec else 0,
        pooled_dim=spec.pooled_dim if spec else 0,
    )


def parameter_count(cfg: TrainConfig, man: dict) -> int:
    """The denoiser's parameter count for this dataset, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in denoiser.build(model_config(cfg, man)).parameters())


def check_model_fits(cfg: TrainConfig, man: dict) -> None:
    """Refuse, on the driver, a dataset the model cannot take: bucket grids that are not
    multiples of the model's, a task or flips the dataset lacks."""
    mcfg = denoiser.config_for(cfg.model)
    multiple = denoiser.grid_multiple(mcfg)
    for shape in latent_shapes(man):
        if shape[1] % multiple or shape[2] % multiple:
            raise ConfigError(
                f"latents of shape {list(shape)} do not fit model {cfg.model!r}: height and width must be "
                f"multiples of {multiple} (re-encode with a --bucket-multiple or --resolution that gives them)"
            )
    if cfg.flip_prob and not man.get("flip"):
        raise ConfigError("option 'flip-prob': the latent dataset has no flipped latents (encode with --flip)")
    if man["latent_shape"] is None and cfg.task:
        raise ConfigError("option 'task': restoration tasks train on square latents, this dataset is bucketed")


# what each architecture field is called in a message, and which input of this run decides it
_FIELD_NAMES = {
    "text_dim": ("text width", "the latent dataset's text encoders and --text"),
    "pooled_dim": ("pooled text width", "the latent dataset's text encoders and --text"),
    "latent_channels": ("latent channels", "the latent dataset"),
    "cond_channels": ("task-view channels", "--task"),
    "num_classes": ("classes", "--num-classes"),
}


def check_init_from(cfg: TrainConfig, man: dict) -> None:
    """Refuse, on the driver, an ``--init-from`` checkpoint whose denoiser is not the one this run
    builds (another text width, latent channels, task, classes or size): its weights would not
    load, and the workers would find out only after starting."""
    _, info = checkpoint.load(cfg.init_from, "diffusion", cfg.storage.options)
    try:
        have = denoiser.to_dict(denoiser.config_from_dict(info.model))
    except (TypeError, ValueError) as exc:
        where = storage.redact(cfg.init_from)
        raise CheckpointError(f"option 'init-from': {where}: unusable model config ({exc})") from None
    want = denoiser.to_dict(model_config(cfg, man))
    differ = [k for k in sorted(want.keys() | have.keys()) if want.get(k) != have.get(k)]
    if not differ:
        return
    named = [k for k in _FIELD_NAMES if k in differ]
    if named:
        sources = ", ".join(dict.fromkeys(_FIELD_NAMES[k][1] for k in named))
        what = "; ".join(
            f"{_FIELD_NAMES[k][0]} {have.get(k) or 'none'} in the checkpoint, {want.get(k) or 'none'} for this run"
            for k in named
        )
        what += f" (set by {sources})"
    else:
        what = f"another denoiser size than --model {cfg.model} ({', '.join(differ)} differ)"
    raise ConfigError(f"option 'init-from': {storage.redact(cfg.init_from)} does not fit this run: {what}")


def train_model(cfg: TrainConfig):
    """Check the inputs on the driver, then run the loop on Ray Train; returns Ray's Result."""
    so = cfg.storage.options
    man = manifest.load(cfg.latents, so)  # refuse a bad dataset before starting workers
    if cfg.task and cfg.task not in man["tasks"]:
        raise ConfigError(f"the latent dataset has no '{cfg.task}' view; encode with --tasks {cfg.task}")
    autoencoder.load(_vae_url(cfg, man), so)  # refuse a missing or wrong autoencoder on the driver
    check_model_fits(cfg, man)
    if cfg.init_from:
        check_init_from(cfg, man)
    if not cfg.gpus_per_worker:  # CPU training: weights, EMA, gradients and AdamW state live in RAM
        from pipeline.ray_setup import check_memory, ensure_ray

        ensure_ray(cfg.ray.address)
        params = parameter_count(cfg, man)
        check_memory(params * BYTES_PER_PARAMETER, cfg.workers, "model", f"model {cfg.model} ({params / 1e6:.0f}M)")
    if cfg.refiner:  # a wrong path, kind or task fails here, in one line
        load_refiner(cfg.refiner, so, task=cfg.task)
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
