"""Self-describing checkpoint directories: ``config.json`` (a :class:`CheckpointInfo`) plus
safetensors weights.

Every kind of checkpoint (``autoencoder``, ``diffusion``, ``refiner``, ``finetune``) uses the same
tensor names (a LoRA ``finetune`` holds only its adapter tensors; ``base`` records its base):

* ``model.safetensors``: the raw training weights (what a resumed run continues from);
* ``ema.safetensors``: the EMA weights (what inference and ``--init-from`` load);
* ``optimizer.safetensors``: the optimizer state, flattened to tensors (its JSON part lives in
  :attr:`CheckpointInfo.optimizer`).

A diffusion checkpoint also carries the autoencoder it was trained with under ``vae/``, and a
task checkpoint trained with ``--refiner`` its pixel refiner under ``refiner/``.
``config.json`` is written by :func:`save` and read by :func:`read_info` only, and carries a
format version that is checked on load. Nothing here unpickles: tensors are read with
safetensors, everything else is JSON. A checkpoint directory can live on local disk or object
storage; remote ones are copied to a private local cache. Every file read lies inside the
checkpoint (:mod:`pipeline.io.folders`): a file or part (``vae/``, ``refiner/``) that is a link
leaving it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.io import folders, storage

FORMAT = "latent-pipeline-checkpoint/2"
CONFIG_NAME = "config.json"
RUN_NAME = "run"  # a training output keeps its checkpoints in <output>/run/checkpoint_<step>/
KINDS = ("autoencoder", "diffusion", "refiner", "finetune")
VAE_DIR = "vae"  # where a diffusion checkpoint keeps its autoencoder
REFINER_DIR = "refiner"  # where a task checkpoint keeps its pixel refiner (train --refiner)


@dataclass
class CheckpointInfo:
    """What ``config.json`` says about a checkpoint."""

    kind: str  # one of KINDS
    model: dict[str, Any]  # the network's architecture config
    step: int = 0
    scale: float = 1.0  # raw latent -> unit-variance latent: (z - shift) * scale
    shift: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)  # the public training config
    metrics: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)  # param groups + scalar state
    # diffusion checkpoints only
    task: str = ""  # restoration task the model was trained for; '' = generator (refiners: their task)
    latent_shape: list[int] = field(default_factory=list)
    residual_scale: float = 1.0
    vae_identity: dict[str, Any] = field(default_factory=dict)  # identity of the autoencoder under vae/
    latents: str = ""  # the dataset it was trained on (credentials redacted)
    gain: float | None = None  # task models: the detail gain calibrated on held-out photos (restore's default)
    calibration: dict[str, Any] = field(default_factory=dict)  # what that calibration measured
    # text-to-image models: the text encoders (name, width, pooled width, identity, source) whose
    # cached embeddings it was trained on, and the latent shapes of the dataset's buckets
    text_encoders: list[dict[str, Any]] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)
    # fine-tunes of a diffusers base (``finetune``): the base (url, family, class, identity of
    # each component), the objective it was trained with, and the LoRA config ({} = full fine-tune)
    base: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown checkpoint kind {self.kind!r}; expected one of {KINDS}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "checkpoint") -> CheckpointInfo:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where}: {CONFIG_NAME} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: {CONFIG_NAME} is not a JSON object")
        if data.get("_class_name"):
            raise CheckpointError(
                f"{where} is a diffusers {data['_class_name']} folder, not a latent-pipeline checkpoint"
            )
        if data.get("format") != FORMAT:
            raise CheckpointError(
                f"{where}: checkpoint format {data.get('format')!r}, expected {FORMAT!r} "
                "(written by another version of latent-pipeline; re-train or convert)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{where}: {CONFIG_NAME} has unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"{where}: {CONFIG_NAME} is incomplete ({exc})") from None


def save(local_dir: str, info: CheckpointInfo, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write one ``<name>.safetensors`` per entry of ``tensors``, then ``config.json``."""
    os.makedirs(local_dir, exist_ok=True)
    for name, state in tensors.items():
        flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(flat, os.path.join(local_dir, f"{name}.safetensors"))
    with open(os.path.join(local_dir, CONFIG_NAME), "w") as f:
        f.write(info.to_json())


def _path(local_dir: str, name: str, where: str = "") -> str:
    """``local_dir/name``, refused when it is a link leaving ``local_dir`` (missing: as it is)."""
    return folders.file(local_dir, name, where) if folders.has(local_dir, name) else os.path.join(local_dir, name)


def part(local_dir: str, name: str, where: str = "") -> str:
    """The folder of a checkpoint's part (:data:`VAE_DIR`, :data:`REFINER_DIR`), refused when it
    is a link leaving the checkpoint (a missing part: its path as it is)."""
    return folders.subfolder(local_dir, name, where) if folders.has(local_dir, name) else os.path.join(local_dir, name)


def read_info(local_dir: str, where: str = "") -> CheckpointInfo:
    try:
        with open(_path(local_dir, CONFIG_NAME, where), "rb") as f:
            return CheckpointInfo.from_json(f.read(), where or local_dir)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{where or local_dir} is not a checkpoint: no {CONFIG_NAME}") from None


def read_raw_config(local_dir: str, where: str = "") -> dict[str, Any]:
    """``config.json`` as a plain dict (to tell a diffusers folder from a checkpoint)."""
    try:
        with open(_path(local_dir, CONFIG_NAME, where), "rb") as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{local_dir}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{local_dir}: {CONFIG_NAME} is not a JSON object")
    return data


def local_copy(url: str, storage_options: dict | None = None) -> str:
    """A local directory holding the checkpoint at ``url`` (or a run output's newest checkpoint)."""
    latest = latest_checkpoint(url, storage_options)
    path = storage.download_dir(latest, storage_options)
    if latest != url and not storage.is_remote(url):  # run/checkpoint_<step> must lie inside the output
        root = storage.download_dir(url, storage_options)  # a local folder's own path
        folders.subfolder(root, latest[len(url.rstrip("/")) :].strip("/"), storage.redact(url))
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(f"{storage.redact(url)} is not a checkpoint: no {CONFIG_NAME}")
    return path


def load(url: str, kind: str, storage_options: dict | None = None) -> tuple[str, CheckpointInfo]:
    """(local directory, description) of a checkpoint of ``kind``; refuses any other kind."""
    local = local_copy(url, storage_options)
    info = read_info(local, storage.redact(url))
    if info.kind != kind:
        raise CheckpointError(
            f"{storage.redact(url)} is a{'n' if info.kind[0] in 'aeiou' else ''} "
            f"{info.kind} checkpoint, not a{'n' if kind[0] in 'aeiou' else ''} {kind} checkpoint"
        )
    return local, info


def load_tensors(local_dir: str, name: str) -> dict[str, torch.Tensor]:
    path = _path(local_dir, f"{name}.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{local_dir}: checkpoint has no {name}.safetensors")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{local_dir}: {name}.safetensors is damaged ({str(exc)[:120]})") from None


def load_weights(module: torch.nn.Module, local_dir: str, name: str) -> None:
    """Load ``<name>.safetensors`` into ``module``; a mismatch is a CheckpointError."""
    state = load_tensors(local_dir, name)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(
            f"{local_dir}: {name}.safetensors does not fit the recorded architecture ({first})"
        ) from None


def sha256(local_dir: str, name: str) -> str:
    return storage.sha256_file(_path(local_dir, f"{name}.safetensors"))


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
    raise CheckpointError(f"no checkpoint at or under {storage.redact(url)}")
