"""Self-describing checkpoint directories: ``config.json`` plus safetensors weights.

Nothing here unpickles: tensors are read with safetensors, everything else is JSON. A checkpoint
directory can live on local disk or object storage; remote ones are copied to a local cache.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import storage

CONFIG_NAME = "config.json"
RUN_NAME = "run"  # a training output keeps its checkpoints in <output>/run/checkpoint_<step>/


def save(local_dir: str, config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``config.json`` and one ``<name>.safetensors`` per entry of ``tensors``."""
    os.makedirs(local_dir, exist_ok=True)
    for name, state in tensors.items():
        flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(flat, os.path.join(local_dir, f"{name}.safetensors"))
    with open(os.path.join(local_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def local_copy(url: str, storage_options: dict | None = None) -> str:
    """A local directory holding the checkpoint at ``url`` (or a run output's newest checkpoint)."""
    path = storage.download_dir(latest_checkpoint(url, storage_options), storage_options)
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"{storage.redact(url)} is not a checkpoint: no {CONFIG_NAME}")
    return path


def read_config(local_dir: str) -> dict[str, Any]:
    with open(os.path.join(local_dir, CONFIG_NAME)) as f:
        return json.load(f)


def load_tensors(local_dir: str, name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(local_dir, f"{name}.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint has no {name}.safetensors")
    return load_file(path)


def sha256(local_dir: str, name: str) -> str:
    return storage.sha256_file(os.path.join(local_dir, f"{name}.safetensors"))


def latest_checkpoint(url: str, storage_options: dict | None = None) -> str:
    """``url`` itself when it is a checkpoint, else the newest checkpoint of a run output."""
    if storage.exists(storage.join(url, CONFIG_NAME), storage_options):
        return url
    run = storage.join(url, RUN_NAME)
    names = sorted(n for n in storage.listdir(run, storage_options) if n.startswith("checkpoint_"))
    for name in reversed(names):
        cand = storage.join(run, name)
        if storage.exists(storage.join(cand, CONFIG_NAME), storage_options):
            return cand
    raise FileNotFoundError(f"no checkpoint at or under {storage.redact(url)}")
