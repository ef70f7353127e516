"""Streaming shards to a training rank: disjoint shards, a shuffle buffer, prefetch.

Shard assignment: every "epoch" the shard list is shuffled with a seed shared by all ranks and
dealt round-robin, so ranks read disjoint shards; when the count does not divide evenly, ranks
that would get fewer shards get extra shards drawn at random (resampled), so every rank reads the
same number of shards per epoch and no rank starves. The stream is endless; the training loop
decides when to stop, so DDP ranks always take the same number of steps.

The manifest's scale/shift are applied here through :func:`autoencoder.scale_latents` (the one
function that does it); posterior sampling (mean + std * eps) is optional.

Bucketed datasets (aspect-ratio buckets, ``encode --buckets``): every batch is made from one
bucket. Shuffled samples are dealt to per-bucket batches and a batch leaves when it is full, so
buckets are interleaved in proportion to their size; a bucket's remainder waits for the next
pass over the shards instead of being dropped. Ranks may see different buckets in the same step
(DDP reduces gradients of the same parameters whatever the latent shape), and every rank takes
the same number of steps because the loop, not the data, decides when to stop.

Captioned datasets: each sample's caption embeddings (one per text encoder) are joined into one
token sequence (:class:`pipeline.models.text.TextSpec`), padded per batch with a mask; with
probability ``caption_dropout`` a sample gets the dataset's empty-caption embedding instead
(classifier-free guidance). With probability ``flip_prob`` a sample's cached flipped latent is
used.
"""

from __future__ import annotations

import json
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.io import manifest, storage
from pipeline.io.tarshards import iter_samples, load_npy
from pipeline.models.autoencoder import scale_latents
from pipeline.models.degrade import INPAINT


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
    cond: torch.Tensor | None  # scaled task view latents (inpaint: and the hole, one more channel), or None
    y: torch.Tensor | None  # class ids, or None
    text: torch.Tensor | None = None  # caption tokens (B, L, text_dim), zero-padded
    text_mask: torch.Tensor | None = None  # (B, L) True = real token
    pooled: torch.Tensor | None = None  # (B, pooled_dim)

    def model_kwargs(self, device) -> dict[str, Any]:
        """The conditioning keyword arguments of a denoiser call, on ``device``."""
        out: dict[str, Any] = {}
        for name in ("cond", "y", "text", "text_mask", "pooled"):
            value = getattr(self, name)
            out[name] = value.to(device) if value is not None else None
        return out


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
        group_key: Callable[[dict[str, bytes]], Any] | None = None,
    ):
        if not shards:
            raise ValueError("no shards to stream")
        self.shards, self.collate = shards, collate
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.shuffle_buffer, self.so = shuffle_buffer, storage_options
        self.group_key = group_key  # batches are made of samples with the same key (bucket)
        self.epoch = 0
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._started = False

    def _samples(self) -> Iterator[dict[str, bytes]]:
        # a pass can miss the readable shards by chance (each rank reads a random share of them);
        # this many passes in a row with nothing readable means there is nothing: fail, never spin
        empty, limit = 0, 20 * len(self.shards)
        while not self._stop.is_set():
            n = 0
            for url in rank_shards(self.shards, self.rank, self.world, self.epoch, self.seed):
                with storage.open_read(url, self.so) as f:
                    for s in iter_samples(f):
                        if s.error is None:
                            n += 1
                            yield s.fields
            self.epoch += 1
            empty = 0 if n else empty + 1
            if empty >= limit:
                raise ValueError(f"no readable sample in {len(self.shards)} shard(s) over {limit} passes")

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
        pending: dict[Any, list[dict[str, bytes]]] = {}
        try:
            for s in self._shuffled(rng):
                key = self.group_key(s) if self.group_key is not None else None
                items = pending.setdefault(key, [])
                items.append(s)
                if len(items) == self.batch_size:
                    self._q.put(self.collate(pending.pop(key), gen))
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


def _bucket_key(sample: dict[str, bytes]) -> tuple[int, ...]:
    """The bucket of a sample, from its .json (``encode --buckets`` records it)."""
    try:
        return tuple(json.loads(sample["json"])["bucket"])
    except (KeyError, ValueError, TypeError):
        return ()  # collate then refuses the batch if shapes differ


def read_empty_captions(root: str, man: dict, storage_options: dict | None) -> tuple[list, list]:
    """Each text encoder's empty-caption hidden states and pooled embedding, from the dataset."""
    hidden, pooled = [], []
    for te in man["text_encoders"]:
        files = te["empty_caption"]
        hidden.append(load_npy(storage.read_bytes(storage.join(root, files["hidden"]), storage_options)))
        pooled.append(
            load_npy(storage.read_bytes(storage.join(root, files["pooled"]), storage_options))
            if files.get("pooled")
            else None
        )
    return hidden, pooled


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
    use_text: bool = False,
    caption_dropout: float = 0.0,
    flip_prob: float = 0.0,
    storage_options: dict | None = None,
) -> BatchStream:
    """A stream of :class:`Batch` from a latent dataset (its manifest is checked first)."""
    from pipeline.models.text import TextSpec, pad_tokens

    man = manifest.load(root, storage_options)
    if task and task not in man["tasks"]:
        raise manifest.ManifestError(
            f"latent dataset has no '{task}' view (it has {man['tasks']}); re-encode with --tasks {task}"
        )
    if use_text and not man.get("text_encoders"):
        raise manifest.ManifestError(f"{storage.redact(root)} has no caption embeddings (encode with --text-encoder)")
    if flip_prob and not man.get("flip"):
        raise manifest.ManifestError(f"{storage.redact(root)} has no flipped latents (encode with --flip)")
    scale, shift = float(man["scale"]), float(man["shift"])
    bucketed = man["latent_shape"] is None
    shapes = {tuple(b["latent_shape"]) for b in man["buckets"]} if bucketed else {tuple(man["latent_shape"])}
    spec = TextSpec.from_manifest(man) if use_text else None
    empty = read_empty_captions(root, man, storage_options) if use_text else None

    def collate(items: list[dict[str, bytes]], rng: np.random.Generator) -> Batch:
        # numpy only: a torch op on this thread would start a second OpenMP team whose
        # spinning threads take the training step's cores (docs/benchmarks.md has the figure)
        flips = rng.random(len(items)) < flip_prob if flip_prob else np.zeros(len(items), bool)
        arrays = [load_npy(s["latent_flip.npy" if f else "latent.npy"]) for s, f in zip(items, flips)]
        bad = next((a.shape for a in arrays if a.shape not in shapes or a.shape != arrays[0].shape), None)
        if bad is not None:  # the manifest promises these shapes; a shard written by another run lies
            said = " or ".join(str(list(s)) for s in sorted(shapes))
            raise manifest.ManifestError(
                f"{storage.redact(root)}: a stored latent has shape {list(bad)}, "
                f"the manifest says {said} (run `latent-pipeline inspect --verify`)"
            )
        mean = np.stack(arrays).astype(np.float32)
        if sample_posterior and "std.npy" in items[0]:
            std = np.stack([load_npy(s["std_flip.npy" if f else "std.npy"]) for s, f in zip(items, flips)])
            mean = mean + std.astype(np.float32) * rng.standard_normal(mean.shape, dtype=np.float32)
        cond = None
        if task:
            raw = np.stack([load_npy(s[f"{task}.npy"]) for s in items]).astype(np.float32)
            view = scale_latents(raw, scale, shift)
            if task == INPAINT:  # inpaint: the hole at the latent grid is a channel too
                holes = np.stack([load_npy(s[manifest.HOLE_FIELD]) for s in items]).astype(np.float32)
                view = np.concatenate([view, holes], 1)
            cond = torch.from_numpy(view)
        y = None
        if use_classes:
            y = torch.from_numpy(np.array([int(s["cls"].decode()) if "cls" in s else -1 for s in items], np.int64))
        batch = Batch(torch.from_numpy(scale_latents(mean, scale, shift)), cond, y)
        if spec is not None and empty is not None:
            drops = rng.random(len(items)) < caption_dropout
            joined = [
                spec.join(*empty)
                if drop
                else spec.join(
                    [load_npy(s[f"text_{e['name']}.npy"]) for e in spec.encoders],
                    [load_npy(s[f"pooled_{e['name']}.npy"]) if e["pooled_width"] else None for e in spec.encoders],
                )
                for s, drop in zip(items, drops)
            ]
            tokens, mask = pad_tokens([t for t, _ in joined])
            batch.text, batch.text_mask = torch.from_numpy(tokens), torch.from_numpy(mask)
            if spec.pooled_dim:
                batch.pooled = torch.from_numpy(np.stack([p for _, p in joined if p is not None]))
        return batch

    return BatchStream(
        manifest.shard_urls(root, man),
        collate,
        batch_size=batch_size,
        rank=rank,
        world=world,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        storage_options=storage_options,
        group_key=_bucket_key if bucketed else None,
    )
