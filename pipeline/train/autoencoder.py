"""``latent-pipeline train-vae``: train the built-in KL autoencoder on image shards with Ray Train.

Same conventions as ``train``: an explicit loop, AdamW with warmup and cosine decay, EMA,
checkpoints every N steps (pruned), resume on restart or re-run. Loss: L1 + ``ssim_weight`` *
(1 - SSIM) + ``kl_weight`` * KL. Held-out reconstruction PSNR/SSIM is measured at the start and
at every checkpoint. The checkpoint is directly usable as ``encode --vae`` (the EMA weights,
with the latent scale measured on training crops so that scaled latents have unit variance).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import option, public_dict, redefault
from pipeline.io import checkpoint, imaging, storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import autoencoder
from pipeline.models.quality import psnr, ssim
from pipeline.train.crops import ImageLoopConfig, heldout_crops, random_crop
from pipeline.train.loop import LoopConfig
from pipeline.train.pixel_loop import PixelTask, run_pixel_training

log = logging.getLogger("pipeline.train_vae")


@dataclass
class VAETrainConfig(ImageLoopConfig):
    preset: str = option("tiny", "autoencoder preset", choices=autoencoder.PRESETS)
    kl_weight: float = option(1e-6, "weight of the KL term", range=(0, None))
    ssim_weight: float = option(0.2, "weight of the (1 - SSIM) term", range=(0, None))
    lr: float = redefault(LoopConfig, "lr", 1e-3)
    ema_decay: float = redefault(LoopConfig, "ema_decay", 0.99)


@torch.no_grad()
def evaluate(model: autoencoder.KLAutoencoder, images: torch.Tensor, dev) -> dict[str, float]:
    model.eval()
    recon = model.decode(model.encode(images.to(dev)).mean).clamp(-1, 1).cpu()
    return {"psnr": float(psnr(recon, images).mean()), "ssim": float(ssim(recon, images).mean())}


@torch.no_grad()
def latent_scale(model: autoencoder.KLAutoencoder, images: torch.Tensor, dev) -> float:
    """1 / std of the posterior means: scaled latents then have unit variance (SD's convention)."""
    return float(1.0 / model.encode(images.to(dev)).mean.float().std().clamp_min(1e-6))


def setup(cfg: VAETrainConfig, rank: int, dev: torch.device, held_shards: list[str]) -> PixelTask:
    """The autoencoder's task for the pixel-loop skeleton (on a worker)."""
    model, kl_cfg = autoencoder.new_kl(cfg.preset, seed=cfg.seed)
    # parameters in the channels-last layout its convolutions run in: their gradients then match
    # DDP's bucket views (no "grad strides do not match" warning, no strided copy per step)
    model = model.to(dev).to(memory_format=torch.channels_last)
    heldout = torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in heldout_crops(held_shards, cfg)]))

    def collate(items: list, rng: np.random.Generator) -> torch.Tensor | None:
        crops = [
            imaging.to_tensor_array(c) for c in (random_crop(s, cfg.resolution, rng) for s in items) if c is not None
        ]
        return torch.from_numpy(np.stack(crops)) if crops else None

    def loss(ddp: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch.to(dev)
        recon, post = ddp(x)
        l1 = F.l1_loss(recon.float(), x)
        kl = 0.5 * (post.mean.float() ** 2 + post.std.float() ** 2 - 1 - 2 * torch.log(post.std.float())).mean()
        total = l1 + cfg.ssim_weight * (1 - ssim(recon.float().clamp(-1, 1), x).mean()) + cfg.kl_weight * kl
        return total, {"l1": l1}

    def scores_text(m: dict[str, float]) -> str:
        return f"held-out PSNR {m['psnr']:.2f} dB (initial {m['psnr_initial']:.2f}) SSIM {m['ssim']:.3f}"

    info = CheckpointInfo(kind="autoencoder", model=autoencoder.kl_config_dict(kl_cfg), train=public_dict(cfg))

    def before_save(ema: torch.nn.Module, metrics: dict[str, float]) -> None:
        info.scale = latent_scale(ema, heldout, dev)  # type: ignore[arg-type]

    return PixelTask(
        model=model,
        kind="autoencoder",
        info=info,
        collate=collate,
        loss=loss,
        scores=lambda ema: evaluate(ema, heldout, dev),  # type: ignore[arg-type]
        scores_text=scores_text,
        before_save=before_save,
    )


def initial_score(task: PixelTask, ema: torch.nn.Module, resumed: CheckpointInfo | None) -> dict[str, float]:
    """The held-out PSNR before training, kept across resumes (every checkpoint repeats it)."""
    initial = resumed.metrics.get("psnr_initial") if resumed is not None else None
    return {"psnr_initial": initial if initial is not None else task.scores(ema)["psnr"]}


def _check_init(cfg: VAETrainConfig) -> None:
    checkpoint.load(cfg.init_from, "autoencoder", cfg.storage.options)  # a wrong one: one line


def run_train_vae(cfg: VAETrainConfig):
    t0 = time.time()
    result = run_pixel_training(
        cfg,
        "train-vae",
        setup,
        on_resume=initial_score,
        check_init=lambda: _check_init(cfg),
        describe=f"preset {cfg.preset}",
    )
    m = result.metrics
    log.info(
        f"[train-vae] finished step {m.get('step')} in {time.time() - t0:.0f}s: held-out PSNR "
        f"{m.get('psnr_initial', float('nan')):.2f} -> {m.get('psnr', float('nan')):.2f} dB, "
        f"SSIM {m.get('ssim', float('nan')):.3f}; use it as `encode --vae {storage.redact(cfg.output)}`"
    )
    return result
