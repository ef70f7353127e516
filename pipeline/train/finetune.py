"""``latent-pipeline finetune``: fine-tune a pretrained diffusers base model's denoiser on a
latent cache of that base (``encode --base``), with the base's own objective, fully or with LoRA.

Families: SD 1.x/2.x and SDXL (``UNet2DConditionModel``), PixArt-α/Σ
(``PixArtTransformer2DModel``) and SD3/3.5 (``SD3Transformer2DModel``).

The loop in :func:`finetune_loop` is the whole algorithm, top to bottom: a batch of cached
latents (scaled with the manifest's scale/shift) and the pipeline's own prompt embeddings
(PixArt's stripped T5 tokens padded back with zero rows and a zero mask), caption dropout to the
cached empty caption, the objective read from the base's scheduler config
(:mod:`pipeline.models.objectives`), the denoiser called exactly as the pipeline calls it at
inference, and the loss on the output channels the pipeline reads (PixArt's learned-variance
half is left out, as its diffusers training scripts do). What differs between the families is
data, one entry of :data:`pipeline.models.base.TRAINING` per pipeline class (the denoiser's
keyword arguments from a batch, the trained channels, the default LoRA targets); the loop has no
family branches. Ray only places it (``prepare_model``, ``report``); resume, learning rate,
gradient sync, the optimizer step and checkpoints come from :mod:`pipeline.train.loop`. ``--fsdp`` shards a full
fine-tune with FSDP2 instead of DDP (:func:`pipeline.train.loop.wrap_model`); its checkpoints
hold full tensors, like a DDP run's.

LoRA (``--lora-rank`` > 0): the base is frozen, peft adapters are added as diffusers' training
examples add them (``LoraConfig`` + ``add_adapter``; PixArt's transformer has no ``add_adapter``,
so peft's ``inject_adapter_in_model``, which ``add_adapter`` calls) on the ``--lora-targets``
modules (empty: the family's default); only the adapters train, are all-reduced by DDP, averaged
by the EMA and written to checkpoints (:class:`Trained`). ``export`` turns a checkpoint into what
diffusers loads.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, option, public_dict, redefault, require
from pipeline.io import checkpoint, manifest, storage
from pipeline.io.checkpoint import CheckpointError, CheckpointInfo
from pipeline.io.tarshards import load_npy
from pipeline.models import base as basemod
from pipeline.models import objectives
from pipeline.models.autoencoder import scale_latents
from pipeline.models.base import Prompts, pad_tokens
from pipeline.models.base_model import MASK, POOLED, PROMPT_EMBEDS, sdxl_time_ids
from pipeline.train.diffusion import TrainConfig
from pipeline.train.finetuned import ValidationGrids
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
    wrap_model,
)
from pipeline.train.streams import BatchStream, _bucket_key

log = logging.getLogger("pipeline.train")


@dataclass
class FinetuneConfig(LoopConfig):
    latents: str = option("", "latent cache of the base (output of `encode --base`, with _manifest.json)")
    base: str = option("", "the pretrained diffusers pipeline folder whose denoiser is fine-tuned")
    lora_rank: int = option(
        8, "LoRA rank of the adapters (0: full fine-tune of every denoiser weight)", range=(0, None)
    )
    lora_alpha: float = option(0.0, "LoRA alpha (0: the rank, a scale of 1)", range=(0, None))
    lora_dropout: float = option(0.0, "dropout on the LoRA path", range=(0, 1), hi_open=True)
    lora_targets: str = option(
        "", "comma-separated module names the adapters wrap (empty: the family's attention projections)"
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)")
    fsdp: bool = option(
        False,
        "shard the weights, gradients, optimizer state and EMA across the workers (FSDP2) instead of DDP; "
        "for full fine-tunes (--lora-rank 0) too large for one GPU",
    )
    timestep_sampling: str = option("uniform", "how training timesteps are drawn", choices=objectives.SAMPLINGS)
    min_snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (0: off; 5 is the paper's value)", range=(0, None))
    loss_weighting: str = option(
        "none", "flow bases (SD3): loss weights over sigma, as diffusers' SD3 example", choices=objectives.WEIGHTINGS
    )
    noise_offset: float = option(0.0, "noise offset (per-channel constant added to the noise)", range=(0, 1))
    caption_dropout: float = option(
        0.1,
        "probability of training a sample on the empty caption (classifier-free guidance)",
        range=(0, 1),
        hi_open=True,
    )
    shuffle_buffer: int = option(1000, "samples in each rank's shuffle buffer", range=(1, None))
    validation_prompt: list[str] = option(
        [], "a prompt drawn into the sample grids (repeatable; commas are kept), with the EMA weights", split=False
    )
    sample_steps: int = redefault(TrainConfig, "sample_steps", 30)
    lr: float = redefault(LoopConfig, "lr", 1e-4)
    warmup_steps: int = redefault(LoopConfig, "warmup_steps", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "latents", "base")
        self.latents, self.base = storage.absolute(self.latents), storage.absolute(self.base)
        if self.lora_rank and self.lora_targets and not self.targets():
            raise ConfigError("option 'lora-targets': no module names")
        if self.fsdp and self.lora_rank:
            raise ConfigError(
                "option 'fsdp' shards a full fine-tune: add --lora-rank 0 (LoRA adapters are small; DDP trains them)"
            )
        if self.fsdp and self.validation_prompt:
            raise ConfigError(
                "option 'validation-prompt' draws on rank 0 alone, which a sharded (--fsdp) model cannot: "
                "draw with `sample --checkpoint` after the run"
            )
        storage.check_separate(self.output, {"latents": self.latents, "base": self.base, "init_from": self.init_from})

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def lora(self) -> dict:
        """The adapter config (peft ``LoraConfig`` fields) this run trains; {} for a full fine-tune."""
        if not self.lora_rank:
            return {}
        return {
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha or float(self.lora_rank),
            "lora_dropout": self.lora_dropout,
            "init_lora_weights": "gaussian",
            "target_modules": self.targets(),
        }


class Trained(torch.nn.Module):
    """The parameters a LoRA run trains (the adapters of ``model``), as a module of their own:
    what the optimizer steps, the EMA averages and a checkpoint holds. It shares the tensors
    with ``model`` (no copy); names are the model's with ``.`` written as ``/``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", "/"), p)


def add_lora(model: Any, lora: dict) -> torch.nn.Module:
    """Freeze ``model`` (a diffusers denoiser) and add trainable peft adapters (as diffusers' LoRA
    training examples do: ``add_adapter``, or for a model without it, such as PixArt's
    transformer, peft's ``inject_adapter_in_model``, which ``add_adapter`` calls; the parameter
    names are the same); returns the module of the trained adapter tensors."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(LoraConfig(**lora))
    else:
        inject_adapter_in_model(LoraConfig(**lora), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return Trained(model)


@dataclass
class FinetuneBatch:
    latents: torch.Tensor  # scaled (B, C, h, w)
    prompts: Prompts  # the cached conditioning, as the base's TRAINING entry turns it into the denoiser's call


def cache_stream(cfg: FinetuneConfig, man: dict, rank: int, world: int, seed: int):
    """An endless stream of :class:`FinetuneBatch` for one rank. The fields read per sample are
    the family's, those ``encode --base`` stored the empty caption with (embeddings, and the
    pooled embedding and attention mask where the family has them)."""
    so = cfg.storage.options
    scale, shift = float(man["scale"]), float(man["shift"])
    empty_files = man["base"]["empty_caption"]  # as `encode --base` stored the empty caption
    names = [f for f in (PROMPT_EMBEDS, POOLED, MASK) if f in empty_files]
    empty = {f: load_npy(storage.read_bytes(storage.join(cfg.latents, empty_files[f]), so)) for f in names}

    def collate(items: list[dict[str, bytes]], rng: np.random.Generator) -> FinetuneBatch:
        # numpy only on the stream's thread (see train/streams.py)
        raw = np.stack([load_npy(s["latent.npy"]) for s in items]).astype(np.float32)
        drops = rng.random(len(items)) < cfg.caption_dropout
        got = {f: [empty[f] if d else load_npy(s[f]) for s, d in zip(items, drops)] for f in names}
        if MASK in got:  # stripped T5 tokens (PixArt): zero rows and a zero mask up to the longest
            embeds, mask = pad_tokens(got[PROMPT_EMBEDS], got[MASK])
        else:
            embeds, mask = np.stack(got[PROMPT_EMBEDS]).astype(np.float32), None
        metas = [json.loads(s["json"]) for s in items]
        ids = np.asarray([sdxl_time_ids(m) for m in metas], np.float32)
        prompts = Prompts(
            torch.from_numpy(embeds),
            torch.from_numpy(np.stack(got[POOLED]).astype(np.float32)) if POOLED in got else None,
            None if mask is None else torch.from_numpy(mask),
            torch.from_numpy(ids),
            torch.from_numpy(ids[:, 4:6].copy()),  # the target (height, width): the bucket
        )
        return FinetuneBatch(torch.from_numpy(scale_latents(raw, scale, shift)), prompts)

    return BatchStream(
        manifest.shard_urls(cfg.latents, man),
        collate,
        batch_size=cfg.batch_size,
        rank=rank,
        world=world,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        storage_options=so,
        group_key=_bucket_key if man["latent_shape"] is None else None,
    )


def finetune_loop(loop_config: dict) -> None:
    """One DDP (or FSDP) rank. Runs on a Ray Train worker."""
    cfg: FinetuneConfig = loop_config["cfg"]
    so = cfg.storage.options
    rank, world, dev = worker_setup()
    torch.manual_seed(cfg.seed + rank)

    # ---- the base, its objective, what trains
    man = manifest.load(cfg.latents, so)
    base = basemod.open_base(cfg.base, so)
    identity = base.identity()
    objective = objectives.from_scheduler_config(base.scheduler_config(), f"{base.where}: scheduler")
    training = base.training  # how this family's pipeline calls its denoiser, which channels train
    unet = base.load_denoiser().to(dev).train()
    unet_class = type(unet).__name__
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora = cfg.lora()
    trained = add_lora(unet, lora) if lora else unet  # LoRA: the adapters only; else every weight
    ema = copy.deepcopy(trained).requires_grad_(False)
    ddp = wrap_model(unet, cfg.fsdp, ema)  # DDP, or FSDP2 shards of the UNet and its EMA
    opt = new_optimizer(trained, cfg)  # after wrap_model: under FSDP it steps the shards

    # ---- resume (restart or re-run) or warm start; never over another base
    start, resumed = resume_or_init(trained, ema, opt, cfg, "finetune")
    if resumed is not None and resumed.base.get("identity") != identity:
        raise CheckpointError(f"{storage.redact(cfg.output)}: the run's checkpoint is a fine-tune of another base")

    stream = iter(cache_stream(cfg, man, rank, world, cfg.seed + start))
    metrics_log = MetricsLog(cfg.output, start, so) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.bf16)
    grids = (
        ValidationGrids(cfg, base, unet, trained, ema, dev, autocast) if rank == 0 and cfg.validation_prompt else None
    )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + start)
    window = StepWindow(cfg.batch_size * cfg.grad_accum * world)
    info = CheckpointInfo(
        kind="finetune",
        model={"denoiser": base.denoiser, "class": unet_class},
        train=public_dict(cfg),
        scale=man["scale"],
        shift=man["shift"],
        latents=storage.public_url(cfg.latents),
        base={
            "url": storage.public_url(cfg.base),
            "family": base.family,
            "class": base.class_name,
            "identity": identity,
            "objective": objective.to_dict(),
            "lora": lora,
        },
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
            latents = batch.latents.to(dev)
            noise = objectives.sample_noise(latents.shape, gen, cfg.noise_offset).to(dev)
            t = objectives.sample_timesteps(objective, latents.shape[0], gen, cfg.timestep_sampling).to(dev)
            noisy = objectives.noisy_latents(objective, latents, noise, t)
            with grad_sync(ddp, micro, cfg, world), autocast:
                kwargs = training.call(batch.prompts.to(dev), unet.config)
                out = training.prediction(ddp(noisy, timestep=t, **kwargs, return_dict=False)[0], latents)
                loss = objectives.loss(objective, out, latents, noise, t, cfg.min_snr_gamma, cfg.loss_weighting)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        grad_norm = optimizer_step(trained, opt, ema, step, cfg)  # clips and averages only what trains

        window.step(time.perf_counter() - t_step, loss=loss_sum, grad_norm=grad_norm)
        done = step + 1
        metrics = log_step(done, cfg, window, lr, metrics_log, "finetune")
        if grids is not None:
            grids(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(done, {"step": done, **metrics}, info, trained, ema, opt)
            if metrics_log is not None:
                metrics_log.sync()
    stream.close()


def check_run(cfg: FinetuneConfig, base: basemod.Base) -> None:
    """Refuse, on the driver, resuming an output (or warm-starting from a checkpoint) that is a
    fine-tune of another base or with another adapter config."""
    so = cfg.storage.options
    sources = [("output", cfg.output)] + ([("init-from", cfg.init_from)] if cfg.init_from else [])
    for name, url in sources:
        try:
            latest = checkpoint.latest_checkpoint(url, so)
        except (CheckpointError, FileNotFoundError):
            if name == "output":
                continue  # a new run
            raise
        _, info = checkpoint.load(latest, "finetune", so)
        if info.base.get("identity") != base.identity():
            raise CheckpointError(
                f"option '{name}': {storage.redact(url)} holds a fine-tune of another base than "
                f"{storage.redact(cfg.base)} ({info.base.get('url')}); use another --output or the same --base"
            )
        if info.base.get("lora") != cfg.lora():
            raise CheckpointError(
                f"option '{name}': {storage.redact(url)} was trained with another adapter config "
                f"({info.base.get('lora') or 'full fine-tune'}); set the same --lora-* options"
            )


def run_finetune(cfg: FinetuneConfig):
    """Check the inputs on the driver, then run the loop on Ray Train; returns Ray's Result."""
    so = cfg.storage.options
    man = manifest.load(cfg.latents, so)
    base = basemod.open_base(cfg.base, so)
    if cfg.lora_rank and not cfg.lora_targets:  # the family's default, recorded as resolved
        cfg.lora_targets = base.training.lora_targets
    basemod.check_cache(base, man, f"option 'latents': {storage.redact(cfg.latents)}")
    objective = objectives.from_scheduler_config(base.scheduler_config(), f"{base.where}: scheduler")
    if cfg.min_snr_gamma and objective.kind == "flow":
        raise ConfigError("option 'min-snr-gamma': the base is a flow model; Min-SNR weighs DDPM objectives")
    if cfg.loss_weighting != "none" and objective.kind != "flow":
        raise ConfigError(f"option 'loss-weighting': the base's objective is {objective.kind}; it weighs flow models")
    check_run(cfg, base)
    log.info(
        f"[finetune] {base.class_name} ({objective.kind} objective), "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tune'}, {cfg.workers} worker(s), "
        f"{man['totals']['written']} latents -> {storage.redact(cfg.output)}"
    )
    t0 = time.time()
    result = fit(finetune_loop, {"cfg": cfg}, cfg)
    if result.error:
        raise result.error
    log.info(f"[finetune] finished step {result.metrics.get('step')} in {time.time() - t0:.0f}s")
    return result
