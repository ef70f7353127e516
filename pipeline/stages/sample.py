"""``latent-pipeline sample``: draw samples from a diffusion checkpoint into a PNG grid."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from PIL import Image

from pipeline.config import ConfigError, StorageOptions, check_choice, group, option, require
from pipeline.io import storage
from pipeline.models import flow, loading
from pipeline.models.generate import generate, grid

log = logging.getLogger("pipeline.sample")


@dataclass
class SampleConfig:
    checkpoint: str = option("", "diffusion checkpoint directory, or a training output (latest checkpoint)")
    out: str = option("samples.png", "output PNG (a grid of the samples)")
    n: int = option(16, "number of samples", short="n")
    steps: int = option(30, "sampler steps")
    sampler: str = option("euler", "euler or heun")
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1: off)")
    class_: list[int] = option([], "class ids to condition on (cycled over the samples)")
    seed: int = option(0, "random seed")
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "checkpoint", "out")
        self.checkpoint, self.out = storage.absolute(self.checkpoint), storage.absolute(self.out)
        storage.check_separate(self.out, {"checkpoint": self.checkpoint}, option="out")
        check_choice("sampler", self.sampler, flow.SAMPLERS)
        if not 1 <= self.n <= 4096 or not 1 <= self.steps <= 10000:
            raise ConfigError("options 'n' (1..4096) and 'steps' (1..10000) are out of range")
        if not self.cfg_scale == self.cfg_scale or abs(self.cfg_scale) > 1e3:
            raise ConfigError("option 'cfg-scale' must be a finite number")


def run_sample(cfg: SampleConfig) -> Image.Image:
    so = cfg.storage.options
    info = loading.describe(cfg.checkpoint, so)  # refuse a wrong checkpoint before loading weights
    classes = cfg.class_ or None
    num_classes = int(info.model.get("num_classes", 0))
    if classes and not num_classes:
        raise ConfigError("option 'class': this checkpoint is not class-conditional")
    bad = [c for c in classes or [] if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"option 'class': {bad[0]} is out of range; the checkpoint has classes 0..{num_classes - 1}")
    storage.probe_writable(cfg.out.rsplit("/", 1)[0] if "/" in cfg.out else ".", so)
    model = loading.load(cfg.checkpoint, so)
    images = generate(
        model, cfg.n, steps=cfg.steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale, classes=classes, seed=cfg.seed
    )
    img = grid(images)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(cfg.out, buf.getvalue(), so)
    log.info(
        f"[sample] {cfg.n} samples ({img.width}x{img.height} grid, step {model.info.step}) -> {storage.redact(cfg.out)}"
    )
    return img
