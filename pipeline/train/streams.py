"""Streaming shards to a training rank: disjoint shards, a shuffle buffer, prefetch.

Shard assignment: every "epoch" the shard list is shuffled with a seed shared by all ranks and
dealt round-robin, so ranks read disjoint shards; when the count does not divide evenly, ranks
that would get fewer shards get extra shards drawn at random (resampled), so every rank reads the
same number of shards per epoch and no rank starves. The stream is endless; the training loop
decides when to stop, so DDP ranks always take the same number of steps.

The manifest's scale/shift are applied here through :func:`autoencoder.scale_latents` (the one
function that does it); posterior sampling (mean + std * eps) is optional.
"""

from __future__ import annotations

import io
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.io import manifest, storage
from pipeline.io.tarshards import iter_samples
from pipeline.models.autoencoder import scale_latents


def rank_shards(shards: list[str], rank: int, world: int, epoch: int, seed: int) -> list[str]:
    """The shards rank ``rank`` reads in ``epoch``; equal counts on every rank."""
    order = list(shards)
    random.Random(seed * 100003 + epoch).shuffle(order)
    per_rank = -(-len(order) // world)  # ceil
    mine = order[rank::world]
    extra = random.Random(seed * 7919 + epoch * 131 + rank)
    while len(mine) < per_rank:
        mine.append(extra.choice(order))
    return mine


@dataclass
class Batch:
    x0: torch.Tensor  # scaled latents (B, C, h, w)
    cond: torch.Tensor | None  # scaled task view latents, or None
    y: torch.Tensor | None  # class ids, or None


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class BatchStream:
    """Endless iterator of collated batches for one rank, filled by a background thread.

    Reads this rank's shards (:func:`rank_shards`), skips unreadable samples, shuffles through a
    buffer, and calls ``collate(samples, numpy_generator)`` on every ``batch_size`` samples.
    ``collate`` should use numpy, not torch ops (see :func:`latent_stream`).
    """

    def __init__(
        self,
        shards: list[str],
        collate: Callable[[list[dict[str, bytes]], np.random.Generator], Any],
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        storage_options: dict | None = None,
        prefetch: int = 4,
    ):
        if not shards:
            raise ValueError("no shards to stream")
        self.shards, self.collate = shards, collate
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.shuffle_buffer, self.so = shuffle_buffer, storage_options
        self.epoch = 0
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._started = False

    def _samples(self) -> Iterator[dict[str, bytes]]:
        while not self._stop.is_set():
            for url in rank_shards(self.shards, self.rank, self.world, self.epoch, self.seed):
                with storage.open_read(url, self.so) as f:
                    for s in iter_samples(f):
                        if s.error is None:
                            yield s.fields
            self.epoch += 1

    def _shuffled(self, rng: random.Random) -> Iterator[dict[str, bytes]]:
        buf: list[dict[str, bytes]] = []
        for s in self._samples():
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            yield buf[i]
            buf[i] = s

    def _fill(self) -> None:
        rng = random.Random(self.seed * 31 + self.rank)
        gen = np.random.default_rng(self.seed * 17 + self.rank)
        items = []
        try:
            for s in self._shuffled(rng):
                items.append(s)
                if len(items) == self.batch_size:
                    self._q.put(self.collate(items, gen))
                    items = []
                if self._stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - surfaced to the consumer
            self._q.put(exc)

    def __iter__(self) -> BatchStream:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while not self._q.empty():  # unblock the producer
            self._q.get_nowait()


def latent_stream(
    root: str,
    *,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    sample_posterior: bool = False,
    task: str = "",
    use_classes: bool = False,
    storage_options: dict | None = None,
) -> BatchStream:
    """A stream of :class:`Batch` from a latent dataset (its manifest is checked first)."""
    man = manifest.load(root, storage_options)
    if task and task not in man["tasks"]:
        raise manifest.ManifestError(
            f"latent dataset has no '{task}' view (it has {man['tasks']}); re-encode with --tasks {task}"
        )
    if man["latent_shape"] is None:
        raise manifest.ManifestError(
            f"{storage.redact(root)} is bucketed by aspect ratio; this training stream reads square datasets only"
        )
    scale, shift = float(man["scale"]), float(man["shift"])
    shape = tuple(man["latent_shape"])

    def collate(items: list[dict[str, bytes]], rng: np.random.Generator) -> Batch:
        # numpy only: a torch op on this thread would start a second OpenMP team whose
        # spinning threads slow the training step down (measured: ~40% on 2 cores)
        arrays = [_load_npy(s["latent.npy"]) for s in items]
        bad = next((a.shape for a in arrays if a.shape != shape), None)
        if bad is not None:  # the manifest promises one shape; a shard written by another run lies
            raise manifest.ManifestError(
                f"{storage.redact(root)}: a stored latent has shape {list(bad)}, "
                f"the manifest says {list(shape)} (run `latent-pipeline inspect --verify`)"
            )
        mean = np.stack(arrays).astype(np.float32)
        if sample_posterior and "std.npy" in items[0]:
            std = np.stack([_load_npy(s["std.npy"]) for s in items]).astype(np.float32)
            mean = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        cond = None
        if task:
            raw = np.stack([_load_npy(s[f"{task}.npy"]) for s in items]).astype(np.float32)
            cond = torch.from_numpy(scale_latents(raw, scale, shift))
        y = None
        if use_classes:
            y = torch.from_numpy(np.array([int(s["cls"].decode()) if "cls" in s else -1 for s in items], np.int64))
        return Batch(torch.from_numpy(scale_latents(mean, scale, shift)), cond, y)

    return BatchStream(
        manifest.shard_urls(root, man),
        collate,
        batch_size=batch_size,
        rank=rank,
        world=world,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        storage_options=storage_options,
    )
