"""``latent-pipeline train-refiner``: train a task's pixel refiner on image shards with Ray Train.

The refiner (:mod:`pipeline.models.refiner`) learns ``x - base``: each training crop is
degraded with the task's known degradation (:func:`degrade.degrade`), its classical base is
computed exactly as ``restore`` computes it (:func:`degrade.classical_base`: back-projection for
upscaling, TV + Wiener for ``restore``), and the loss is the MSE of the residual scaled by
:data:`refiner.OUTPUT_SCALE`. For ``inpaint`` (no degradation) each crop gets a generated hole
(:func:`degrade.inpaint_mask`, seeded per sample), the base is its biharmonic fill
(:func:`degrade.inpaint_base`), the refiner also sees the hole, and the loss is the residual's MSE
inside the hole only (known pixels are kept by construction). Same conventions as the other
loops: an explicit loop, AdamW with warmup and cosine decay, EMA, checkpoints every N steps,
resume on restart or re-run. Held-out PSNR of the base and of the refined base is measured at every checkpoint.

Use the result with ``train --task T --refiner OUTPUT``: the task checkpoint then carries it, and
``restore``'s fidelity mode uses it. An inpainting refiner is itself the checkpoint of
``restore --task inpaint`` (:mod:`pipeline.stages.train_refiner` calibrates its gain).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, option, public_dict, redefault, require
from pipeline.io import checkpoint, imaging, storage
from pipeline.io.checkpoint import CheckpointInfo
from pipeline.models import degrade, refiner
from pipeline.models.quality import psnr
from pipeline.train.crops import ImageLoopConfig, heldout_crops, random_crop
from pipeline.train.loop import LoopConfig
from pipeline.train.pixel_loop import PixelTask, run_pixel_training

log = logging.getLogger("pipeline.train_refiner")


@dataclass
class RefinerTrainConfig(ImageLoopConfig):
    task: str = option("", "restoration task", choices=degrade.RESTORE_TASKS, noun="task")
    channels: int = option(64, "convolution channels", range=(1, None))
    depth: int = option(7, "convolution layers", range=(1, None))
    unshuffle: int = option(
        2, "pixel-unshuffle factor before the convolutions (2 is cheaper per step than 1)", choices=(1, 2, 4)
    )
    resolution: int = option(96, "training crop size (a multiple of the task's scale)", range=(8, 4096))
    batch_size: int = redefault(LoopConfig, "batch_size", 16)
    lr: float = redefault(LoopConfig, "lr", 1e-3)
    warmup_steps: int = redefault(LoopConfig, "warmup_steps", 50)
    grad_clip: float = redefault(LoopConfig, "grad_clip", 0.0)
    ema_decay: float = redefault(LoopConfig, "ema_decay", 0.99)
    calibration_images: str = option(
        "",
        "inpaint only: held-out photos (folder or glob) on which the gain is calibrated after training "
        "(generated holes of 5 to 25 percent) and stored in the checkpoint; restore --task inpaint uses it "
        "by default",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "task")
        self.calibration_images = storage.absolute(self.calibration_images)
        if self.calibration_images and self.task != degrade.INPAINT:
            raise ConfigError(
                "option 'calibration-images': only an inpainting refiner is calibrated on its own "
                "(the other tasks' gains are calibrated with the task checkpoint: train --refiner)"
            )
        if self.resolution % degrade.task_scale(self.task):
            raise ConfigError(f"option 'resolution' must be a multiple of the task's scale for {self.task}")
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def model_config(self) -> refiner.RefinerConfig:
        return refiner.RefinerConfig(
            self.task, self.channels, self.depth, self.unshuffle, refiner.input_channels(self.task)
        )


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (base, hole, clean)


def training_pair(task: str, clean: Image.Image, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classical base (3, H, W) in [-1, 1], where the residual counts (1, H, W): the hole for
    inpaint, everywhere else, clean target (3, H, W) in [-1, 1]) of one clean crop."""
    if task == degrade.INPAINT:
        hole = degrade.inpaint_mask(clean.height, clean.width, seed)
        base = degrade.inpaint_base(clean, hole)
    else:
        hole = np.ones((clean.height, clean.width), bool)
        base = degrade.classical_base(task, degrade.degrade(task, clean, seed))
    return (
        (base.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32),
        hole[None].astype(np.float32),
        imaging.to_tensor_array(clean),
    )


def stack(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    base, hole, clean = (torch.from_numpy(np.stack(a)) for a in zip(*pairs))
    return base, hole, clean


def refine(model: refiner.Refiner, base: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The model's residual where it counts (in the hole for inpaint; the hole is all ones else)."""
    return model(model.input(base, hole)) * hole


@torch.no_grad()
def evaluate(model: refiner.Refiner, batch: Batch, dev) -> dict[str, float]:
    """Held-out PSNR of the base and of the refined base (of the whole crops)."""
    model.eval()
    base, hole, clean = batch
    refined = (base + refine(model, base.to(dev), hole.to(dev)).cpu()).clamp(-1, 1)
    before, after = float(psnr(base.clamp(-1, 1), clean).mean()), float(psnr(refined, clean).mean())
    return {"psnr_base": before, "psnr": after, "gain_db": after - before}


def setup(cfg: RefinerTrainConfig, rank: int, dev: torch.device, held_shards: list[str]) -> PixelTask:
    """The refiner's task for the pixel-loop skeleton (on a worker); the held-out pairs are
    degraded with fixed seeds, so every checkpoint is scored on the same."""
    torch.manual_seed(cfg.seed + rank)
    model = refiner.Refiner(cfg.model_config()).to(dev)
    heldout = stack([training_pair(cfg.task, im, i) for i, im in enumerate(heldout_crops(held_shards, cfg))])

    def collate(items: list, rng: np.random.Generator) -> Batch | None:
        pairs = []
        for s in items:
            crop = random_crop(s, cfg.resolution, rng)
            if crop is not None:
                pairs.append(training_pair(cfg.task, crop, int(rng.integers(2**31))))
        return stack(pairs) if pairs else None

    def loss(ddp: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        base, hole, clean = (t.to(dev) for t in batch)
        x = model.input(base, hole)
        # the MSE of the residual times OUTPUT_SCALE (the network's own output scale), where the
        # residual counts: in the hole for inpaint (a plain MSE for the other tasks: the hole is all ones)
        err = (ddp(x).float() - (clean - base)) * refiner.OUTPUT_SCALE * hole
        return err.square().sum() / (3 * hole.sum()).clamp_min(1), {}

    def scores_text(m: dict[str, float]) -> str:
        return f"held-out PSNR {m['psnr']:.2f} dB (base {m['psnr_base']:.2f}, {m['gain_db']:+.2f} dB)"

    return PixelTask(
        model=model,
        kind="refiner",
        info=CheckpointInfo(kind="refiner", model=cfg.model_config().to_dict(), task=cfg.task, train=public_dict(cfg)),
        collate=collate,
        loss=loss,
        scores=lambda ema: evaluate(ema, heldout, dev),  # type: ignore[arg-type]
        scores_text=scores_text,
    )


def _check_init(cfg: RefinerTrainConfig) -> None:
    _, info = checkpoint.load(cfg.init_from, "refiner", cfg.storage.options)
    if info.task != cfg.task or refiner.RefinerConfig.from_dict(info.model) != cfg.model_config():
        raise ConfigError("option 'init-from': that refiner has another task or architecture")


def run_train_refiner(cfg: RefinerTrainConfig):
    t0 = time.time()
    result = run_pixel_training(
        cfg, "train-refiner", setup, check_init=lambda: _check_init(cfg), describe=f"task {cfg.task}"
    )
    m = result.metrics
    log.info(
        f"[train-refiner] finished step {m.get('step')} in {time.time() - t0:.0f}s: held-out PSNR "
        f"{m.get('psnr_base', float('nan')):.2f} (base) -> {m.get('psnr', float('nan')):.2f} dB; bundle it with "
        f"`train --task {cfg.task} --refiner {storage.redact(cfg.output)}`"
    )
    return result
