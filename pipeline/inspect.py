"""``latent-pipeline inspect URL``: summarise a latent dataset, an image-shard set or a checkpoint."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np

from . import checkpoint, manifest, storage
from .tarshards import iter_samples


def _first_sample(url: str, storage_options: dict | None) -> dict[str, bytes]:
    with storage.open_read(url, storage_options) as f:
        for s in iter_samples(f):
            if not s.error:
                return s.fields
    return {}


def _array_info(data: bytes) -> dict[str, Any]:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def inspect(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    so = storage_options
    if storage.exists(storage.join(url, manifest.MANIFEST_NAME), so):
        man = manifest.load(url, so)
        first = _first_sample(manifest.shard_urls(url, man)[0], so)
        arrays = {k: _array_info(v) for k, v in first.items() if k.endswith(".npy")}
        return {"kind": "latent-dataset", "url": storage.redact(url), "shards": len(man["shards"]),
                "totals": man["totals"], "latent_shape": man["latent_shape"], "latent_dtype": man["latent_dtype"],
                "stored_arrays": arrays, "encoder": {k: v for k, v in man["encoder"].items() if k != "config"},
                "scale": man["scale"], "shift": man["shift"], "tasks": man["tasks"],
                "preprocessing": man["preprocessing"]}
    if storage.exists(storage.join(url, checkpoint.CONFIG_NAME), so):
        cfg = storage.read_json(storage.join(url, checkpoint.CONFIG_NAME), so)
        files = storage.listdir(url, so)
        kind = "diffusers" if cfg.get("_class_name") == "AutoencoderKL" else cfg.get("kind", "unknown")
        keep = ("model", "step", "scale", "shift", "task", "vae", "latent_shape", "metrics")
        return {"kind": "checkpoint", "model_kind": kind, "url": storage.redact(url), "files": files,
                **{k: cfg[k] for k in keep if k in cfg},
                **({"scaling_factor": cfg.get("scaling_factor")} if "_class_name" in cfg else {})}
    shards = storage.expand(url if url.endswith(".tar") or "*" in url or "{" in url else storage.join(url, "*.tar"), so)
    exts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples = 0
    for shard in shards:
        with storage.open_read(shard, so) as f:
            for s in iter_samples(f):
                samples += 1
                if s.error:
                    errors[s.error] += 1
                exts.update(s.fields.keys())
    return {"kind": "image-shards", "url": storage.redact(url), "shards": len(shards), "samples": samples,
            "fields": dict(exts), "unreadable": dict(errors)}
