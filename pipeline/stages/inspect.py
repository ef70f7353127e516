"""``latent-pipeline inspect URL``: summarise a latent dataset, an image-shard set or a checkpoint.

For a latent dataset the first sample's arrays are checked against the manifest's latent shape
always; ``--verify`` also reads every shard and checks its sha256, sample count and array shapes
against the manifest, so a dataset that lies is found before a long training run.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError, StorageOptions, group, option, require
from pipeline.io import checkpoint, manifest, storage
from pipeline.io.manifest import ManifestError
from pipeline.io.tarshards import iter_samples

log = logging.getLogger("pipeline.inspect")


@dataclass
class InspectConfig:
    url: str = option("", "a latent dataset, image shards (folder, glob or brace range) or a checkpoint")
    verify: bool = option(False, "latent datasets: read every shard and check sha256, counts and shapes")
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "url")
        self.url = storage.absolute(self.url)


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes what it reads (so a shard is read once to verify it)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.h.update(data)
        self.n += len(data)
        return len(data)


def _array_info(data: bytes) -> dict[str, Any]:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def _check_sample(fields: dict[str, bytes], man: dict, where: str) -> dict[str, Any]:
    arrays = {}
    for name, data in fields.items():
        if name.endswith(".npy"):
            try:
                arrays[name] = _array_info(data)
            except ValueError as exc:
                raise ManifestError(f"{where}: {name} is not a plain .npy array ({exc})") from None
    shape = arrays.get("latent.npy", {}).get("shape")
    allowed = [man["latent_shape"]] if man["latent_shape"] else [b["latent_shape"] for b in man.get("buckets") or []]
    if shape not in allowed:
        said = man["latent_shape"] or f"one of the buckets' {allowed}"
        raise ManifestError(f"{where}: latent shape {shape} but the manifest says {said}")
    flip = arrays.get("latent_flip.npy", {}).get("shape")
    if man.get("flip") and flip != shape:
        raise ManifestError(f"{where}: flipped latent shape {flip}, latent shape {shape}")
    return arrays


def verify_shards(root: str, man: dict, storage_options: dict | None = None) -> int:
    """Read every shard: sha256, sample count and latent shapes must match the manifest."""
    checked = 0
    for entry, url in zip(man["shards"], manifest.shard_urls(root, man)):
        with storage.open_read(url, storage_options) as f:
            reader = _HashingReader(f)
            samples = 0
            for s in iter_samples(io.BufferedReader(reader)):
                if s.error:
                    raise ManifestError(f"{storage.redact(url)}: unreadable sample {s.key!r} ({s.error})")
                _check_sample(s.fields, man, f"{storage.redact(url)} sample {s.key!r}")
                samples += 1
            while reader.readinto(bytearray(1 << 20)):  # hash the tar's padding too
                pass
        if reader.h.hexdigest() != entry["sha256"] or samples != entry["samples"]:
            raise ManifestError(
                f"{storage.redact(url)} does not match the manifest "
                f"(sha256 or sample count differ): written by another run?"
            )
        checked += 1
    return checked


def inspect(cfg: InspectConfig) -> dict[str, Any]:
    url, so = cfg.url, cfg.storage.options
    if storage.exists(storage.join(url, manifest.MANIFEST_NAME), so):
        man = manifest.load(url, so)
        first_url = manifest.shard_urls(url, man)[0]
        with storage.open_read(first_url, so) as f:
            first = next((s.fields for s in iter_samples(f) if not s.error), {})
        arrays = _check_sample(first, man, f"{storage.redact(first_url)} (first sample)")
        out = {
            "kind": "latent-dataset",
            "url": storage.redact(url),
            "shards": len(man["shards"]),
            "totals": man["totals"],
            "latent_shape": man["latent_shape"],
            "latent_dtype": man["latent_dtype"],
            "stored_arrays": arrays,
            "encoder": {k: v for k, v in man["encoder"].items() if k != "config"},
            "scale": man["scale"],
            "shift": man["shift"],
            "tasks": man["tasks"],
            "preprocessing": man["preprocessing"],
        }
        for key in ("buckets", "flip", "captions"):
            if man.get(key) is not None:
                out[key] = man[key]
        if man.get("text_encoders"):
            out["text_encoders"] = [
                {k: te[k] for k in ("name", "source", "field", "pooled_field")}
                | {"max_tokens": te["identity"]["max_tokens"], "width": te["identity"]["width"]}
                for te in man["text_encoders"]
            ]
        if cfg.verify:
            out["verified_shards"] = verify_shards(url, man, so)
        return out
    if storage.exists(storage.join(url, checkpoint.CONFIG_NAME), so):
        local = checkpoint.local_copy(url, so)
        raw = checkpoint.read_raw_config(local)
        if raw.get("_class_name"):
            return {
                "kind": "checkpoint",
                "model_kind": "diffusers",
                "class": raw["_class_name"],
                "url": storage.redact(url),
                "files": storage.listdir(url, so),
                "scaling_factor": raw.get("scaling_factor"),
            }
        info = checkpoint.read_info(local, storage.redact(url))
        return {
            "kind": "checkpoint",
            "model_kind": info.kind,
            "url": storage.redact(url),
            "files": storage.listdir(url, so),
            "format": info.format,
            "model": info.model,
            "step": info.step,
            "scale": info.scale,
            "shift": info.shift,
            "task": info.task,
            "latent_shape": info.latent_shape,
            "metrics": info.metrics,
        }
    return inspect_image_shards(url, so)


def _shard_spec(url: str, so: dict | None) -> str:
    """The shard spec ``url`` names: itself (a tar file, a glob or brace range) or the ``.tar``
    files of a folder; anything else (a missing path, a device, a folder of no known kind) is
    refused naming it."""
    if not storage.exists(url, so):
        if any(c in url for c in "*?[{"):
            return url  # a pattern: storage.expand names it when it matches nothing
        raise ConfigError(f"not found: {storage.redact(url)}")
    fs, path = storage.filesystem(url, so)
    if fs.isdir(path):
        spec = storage.join(url, "*.tar")
        if not storage.expand(spec, so, must_exist=False):
            raise ConfigError(
                f"{storage.redact(url)}: not a latent dataset (no {manifest.MANIFEST_NAME}), a checkpoint "
                f"(no {checkpoint.CONFIG_NAME}) or a folder of image shards (no .tar files)"
            )
        return spec
    if not fs.isfile(path):
        raise ConfigError(f"{storage.redact(url)}: not a file or folder that inspect can read (a device?)")
    return url


def inspect_image_shards(url: str, so: dict | None) -> dict[str, Any]:
    """Counts of an image-shard set: shards, samples, fields, unreadable samples by reason.

    A file that is not a tar at all (nothing readable from its first byte) is listed under
    ``not_tar``; a set where no shard is a tar is refused."""
    exts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples = 0
    not_tar: dict[str, str] = {}
    shards = storage.expand(_shard_spec(url, so), so)
    for shard in shards:
        with storage.open_read(shard, so) as f:
            for i, s in enumerate(iter_samples(f)):
                if i == 0 and s.error == "corrupt_tar" and not s.key:
                    not_tar[storage.redact(shard)] = s.detail or s.error
                    break
                samples += 1
                if s.error:
                    errors[s.error] += 1
                exts.update(s.fields.keys())
    if len(not_tar) == len(shards):
        first, why = next(iter(not_tar.items()))
        raise ConfigError(f"{first}: not a readable tar shard ({why})")
    out: dict[str, Any] = {
        "kind": "image-shards",
        "url": storage.redact(url),
        "shards": len(shards),
        "samples": samples,
        "fields": dict(exts),
        "unreadable": dict(errors),
    }
    if not_tar:
        out["not_tar"] = sorted(not_tar)
    return out


def run_inspect(cfg: InspectConfig) -> dict[str, Any]:
    import json

    out = inspect(cfg)
    print(json.dumps(out, indent=2))
    return out
