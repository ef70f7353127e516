"""What the two pixel-space loops (``train-vae``, ``train-refiner``) share: their image options,
the split into training and held-out shards, random training crops and held-out centre crops."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import ConfigError, option, require
from pipeline.io import imaging, storage
from pipeline.io.tarshards import expand_shards, iter_samples
from pipeline.train.loop import LoopConfig


@dataclass
class ImageLoopConfig(LoopConfig):
    """Options of a loop that trains on image shards."""

    images: str = option("", "image shards: URL, brace range or glob; comma-separated list")
    heldout: str = option("", "held-out image shards for PSNR (default: the last input shard, if >1)")
    resolution: int = option(64, "training crop size", range=(8, 4096))
    eval_images: int = option(32, "held-out images scored at each checkpoint", range=(1, None))
    shuffle_buffer: int = option(256, "samples in each rank's shuffle buffer", range=(1, None))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "images")
        self.images, self.heldout = storage.absolute(self.images), storage.absolute(self.heldout)
        storage.check_separate(
            self.output, {"images": self.images, "heldout": self.heldout, "init_from": self.init_from}
        )


def split_shards(cfg: ImageLoopConfig, verb: str) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): ``--heldout``, else the last input shard."""
    train = expand_shards(cfg.images, cfg.storage.options, option="images")
    if cfg.heldout:
        return train, expand_shards(cfg.heldout, cfg.storage.options, option="heldout")
    if len(train) < 2:
        raise ConfigError(f"{verb} needs a --heldout shard set, or at least 2 input shards (the last one is held out)")
    return train[:-1], train[-1:]


def random_crop(fields: dict[str, bytes], size: int, rng: np.random.Generator) -> Image.Image | None:
    """A random ``size`` square crop of a sample's image (smaller images scaled up to cover it),
    mirrored half of the time; None for an unreadable image."""
    try:
        im = imaging.sample_rgb(fields)
    except imaging.BadImage:
        return None
    short = min(im.size)
    if short < size:
        im = im.resize((max(size, round(im.width * size / short)), max(size, round(im.height * size / short))))
    x = int(rng.integers(0, im.width - size + 1))
    y = int(rng.integers(0, im.height - size + 1))
    crop = im.crop((x, y, x + size, y + size))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def readable_images(shards: list[str], cfg: ImageLoopConfig) -> Iterator[Image.Image]:
    """The shards' readable images in order (unreadable samples and images are passed over)."""
    for url in shards:
        with storage.open_read(url, cfg.storage.options) as f:
            for s in iter_samples(f):
                if s.error:
                    continue
                try:
                    yield imaging.sample_rgb(s.fields)
                except imaging.BadImage:
                    continue


_NO_HELDOUT = "no readable image in the {} held-out shard(s) (--heldout, or the last input shard)"


def heldout_crops(shards: list[str], cfg: ImageLoopConfig) -> list[Image.Image]:
    """Centre crops of the first ``eval_images`` readable held-out images."""
    images = itertools.islice(readable_images(shards, cfg), cfg.eval_images)
    out = [imaging.resize_center_crop(im, cfg.resolution)[0] for im in images]
    if not out:
        raise ConfigError(_NO_HELDOUT.format(len(shards)))
    return out


def check_readable(train: list[str], held: list[str], cfg: ImageLoopConfig, verb: str) -> None:
    """On the driver, before any worker starts: refuse, in one line, a held-out set or a training
    set without a single readable image (a worker would otherwise wait for one forever). Only
    the first readable image of each is decoded here."""
    if next(readable_images(held, cfg), None) is None:
        raise ConfigError(_NO_HELDOUT.format(len(held)))
    if next(readable_images(train, cfg), None) is None:
        raise ConfigError(f"{verb}: no readable image in the {len(train)} training shard(s) of option 'images'")
