"""``latent-pipeline sample``: draw samples from a checkpoint into a PNG grid.

A ``train`` checkpoint is drawn by this project's own samplers (:func:`generate`). A
``finetune`` checkpoint is drawn by its base's own diffusers pipeline and scheduler with the
trained weights or adapters (:func:`pipeline.train.finetuned.load`, what ``export`` reads): the
grid holds the images ``export`` + diffusers give for the same prompt, steps, guidance and seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.config import ConfigError, StorageOptions, check_limits, group, option, require
from pipeline.io import checkpoint, storage
from pipeline.models import denoiser, flow, loading, text
from pipeline.models.generate import generate, save_grid
from pipeline.train import finetuned

log = logging.getLogger("pipeline.sample")
MAX_AREA_OVER_TRAINED = 16  # a larger canvas than this is refused (a model does not extrapolate that far)


@dataclass
class SampleConfig:
    checkpoint: str = option(
        "", "diffusion or finetune checkpoint directory, or a training output (its latest checkpoint)"
    )
    out: str = option("samples.png", "output PNG (a grid of the samples)")
    n: int = option(16, "number of samples", short="n", range=(1, 4096))
    steps: int = option(30, "sampler steps", range=(1, 10000))
    sampler: str = option("euler", "sampler (a fine-tune uses its pipeline's own scheduler)", choices=flow.SAMPLERS)
    cfg_scale: float = option(
        1.0,
        "classifier-free guidance scale (1: off); a fine-tune's pipeline guidance_scale (SD uses 7.5, SDXL 5)",
        range=(-1000, 1000),
    )
    class_: list[int] = option([], "class ids to condition on (cycled over the samples)")
    prompt: str = option(
        "", "text-to-image checkpoints: the caption to draw (empty: the unconditional model, no text encoder loaded)"
    )
    width: int = option(
        0, "image width in pixels (0: the checkpoint's default bucket); a multiple of its grid", range=(0, 16384)
    )
    height: int = option(0, "image height in pixels (0: the checkpoint's default bucket)", range=(0, 16384))
    text_encoder: list[str] = option(
        [],
        "text encoder folder(s) to embed the prompt with, in training order (default: the paths recorded in "
        "the checkpoint); refused unless identical to the ones the model was trained with; without --prompt, "
        "only a checkpoint without null_text.safetensors (older) needs them",
    )
    seed: int = option(0, "random seed")
    base: str = option("", "fine-tunes: the base pipeline folder (default: the one the checkpoint records)")
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "checkpoint", "out")
        if self.out.endswith("/"):
            raise ConfigError(f"option 'out': {storage.redact(self.out)} names a folder; give the PNG file to write")
        self.checkpoint, self.out = storage.absolute(self.checkpoint), storage.absolute(self.out)
        self.base = storage.absolute(self.base)
        storage.check_separate(self.out, {"checkpoint": self.checkpoint, "base": self.base}, option="out")
        check_limits(self)
        if (self.width == 0) != (self.height == 0):
            name = "height" if self.width else "width"
            raise ConfigError(f"option {name!r} is needed with --{'width' if self.width else 'height'} (or neither)")
        self.text_encoder = [storage.absolute(u) for u in self.text_encoder]
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # an undecodable byte in argv arrives as a lone surrogate
            raise ConfigError(
                f"option 'prompt' is not valid UTF-8 text (a stray byte at character {exc.start + 1})"
            ) from None


def check_out(cfg: SampleConfig) -> None:
    """``--out`` is the PNG file to write: refuse a folder (or a prefix with objects under it)
    before anything is computed, and a place that cannot be written."""
    so = cfg.storage.options
    fs, path = storage.filesystem(cfg.out, so)
    if storage.retry(lambda: fs.isdir(path), what=f"check {storage.redact(cfg.out)}"):
        raise ConfigError(
            f"option 'out': {storage.redact(cfg.out)} is a folder; give the PNG file to write "
            f"(e.g. {storage.redact(storage.join(cfg.out, 'samples.png'))})"
        )
    storage.probe_writable(cfg.out.rsplit("/", 1)[0] if "/" in cfg.out else ".", so)


def latent_shape(cfg: SampleConfig, info) -> list[int] | None:
    """The latent shape for ``--width``/``--height`` (None: the checkpoint's default)."""
    if not cfg.width:
        return None
    down = int(info.vae_identity.get("downsample", 1))
    multiple = down * denoiser.grid_multiple(denoiser.config_from_dict(info.model))
    if cfg.width % multiple or cfg.height % multiple:
        raise ConfigError(
            f"options 'width'/'height': {cfg.width}x{cfg.height} must be multiples of {multiple} "
            f"(autoencoder downsampling {down} x the denoiser's grid)"
        )
    shape = [info.latent_shape[0], cfg.height // down, cfg.width // down]
    trained = max(h * w for _, h, w in (info.buckets or [info.latent_shape]))
    if shape[1] * shape[2] > MAX_AREA_OVER_TRAINED * trained:
        raise ConfigError(
            f"options 'width'/'height': {cfg.width}x{cfg.height} is more than {MAX_AREA_OVER_TRAINED}x the "
            f"largest area the model was trained on ({trained * down * down} pixels)"
        )
    return shape


def run_sample(cfg: SampleConfig) -> Image.Image:
    so = cfg.storage.options
    if checkpoint.read_raw_config(checkpoint.local_copy(cfg.checkpoint, so)).get("kind") == "finetune":
        return sample_finetune(cfg)
    if cfg.base:
        raise ConfigError("option 'base': only a finetune checkpoint is drawn with a base pipeline")
    info = loading.describe(cfg.checkpoint, so)  # refuse a wrong checkpoint before loading weights
    classes = cfg.class_ or None
    num_classes = int(info.model.get("num_classes", 0))
    if classes and not num_classes:
        raise ConfigError("option 'class': this checkpoint is not class-conditional")
    bad = [c for c in classes or [] if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"option 'class': {bad[0]} is out of range; the checkpoint has classes 0..{num_classes - 1}")
    if (cfg.prompt or cfg.text_encoder) and not info.text_encoders:
        raise ConfigError("options 'prompt'/'text-encoder': this checkpoint is not text-conditioned")
    shape = latent_shape(cfg, info)
    check_out(cfg)
    model = loading.load(cfg.checkpoint, so)
    text_kw: dict = {}
    if info.text_encoders:
        # the empty caption as the model trained on it (kept in the checkpoint); the encoders are
        # loaded only for a prompt, or for a checkpoint written before the empty caption was kept
        null = text.repeat(model.null_text, cfg.n) if model.null_text else None
        if cfg.prompt or null is None:
            spec = text.TextSpec(info.text_encoders)
            encoders = text.load_recorded(spec, cfg.text_encoder, so)
            cut: list[str] = []
            if null is None:
                null = text.condition(encoders, spec, [""] * cfg.n)
            text_kw = {"text": text.condition(encoders, spec, [cfg.prompt] * cfg.n, cut), "null_text": null}
            for name in cut:
                log.warning(f"[sample] the prompt is longer than text encoder {name}'s limit: truncated")
        else:
            text_kw = {"text": null, "null_text": null}
    images = generate(
        model,
        cfg.n,
        steps=cfg.steps,
        sampler=cfg.sampler,
        cfg_scale=cfg.cfg_scale,
        classes=classes,
        latent_shape=shape,
        seed=cfg.seed,
        **text_kw,
    )
    return _write(cfg, images, model.info.step)


def sample_finetune(cfg: SampleConfig) -> Image.Image:
    """A fine-tune's grid: its base pipeline with the trained EMA weights or adapters, its own
    scheduler, ``--steps``, ``--cfg-scale`` as ``guidance_scale``, the prompt ``-n`` times drawn
    in one batch from one CPU generator seeded with ``--seed``."""
    if cfg.class_ or cfg.text_encoder:
        raise ConfigError(
            "options 'class'/'text-encoder': a fine-tune draws the prompt with its base's own text encoders"
        )
    so = cfg.storage.options
    tuned = finetuned.load(cfg.checkpoint, cfg.base, "ema", so)
    down = 2 ** (len(tuned.base.config("vae")["block_out_channels"]) - 1)
    if cfg.width % down or cfg.height % down:
        raise ConfigError(
            f"options 'width'/'height': {cfg.width}x{cfg.height} must be multiples of {down} (the VAE's downsampling)"
        )
    check_out(cfg)
    pipe = tuned.pipeline().to("cuda" if torch.cuda.is_available() else "cpu")
    images = finetuned.draw(
        pipe,
        prompts=[cfg.prompt] * cfg.n,
        steps=cfg.steps,
        guidance=cfg.cfg_scale,
        seed=cfg.seed,
        width=cfg.width,
        height=cfg.height,
    )
    return _write(cfg, images, tuned.info.step)


def _write(cfg: SampleConfig, images, step: int) -> Image.Image:
    img = save_grid(images, cfg.out, cfg.storage.options)
    what = f" of {cfg.prompt[:80]!r}{'...' if len(cfg.prompt) > 80 else ''}" if cfg.prompt else ""
    log.info(
        f"[sample] {cfg.n} samples{what} ({img.width}x{img.height} grid, step {step}) -> {storage.redact(cfg.out)}"
    )
    return img
