"""The captions side of the ``encode`` driver: the text encoders (``--text-encoder``) or the base
pipeline's (``--base``) described on a worker, since the driver never holds a text encoder, and
the empty caption each stores under ``_empty_caption/`` for classifier-free guidance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.tarshards import npy_bytes
from pipeline.stages.encode_worker import TextEncoderFacts, base_empty_caption, task_options, text_encoder_facts

if TYPE_CHECKING:
    from pipeline.stages.encode import EncodeConfig


def text_field_names(model_types: list[str]) -> list[str]:
    """A short unique name per text encoder (``clip``, ``t5``, ``clip2``, ...): its fields are
    ``text_<name>.npy`` (hidden states) and ``pooled_<name>.npy``."""
    from pipeline.models.text import short_name

    names: list[str] = []
    for mt in model_types:
        base = short_name(mt)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}{n}"
        names.append(name)
    return names


def on_encode_worker(cfg: EncodeConfig, fn: Any, name: str) -> Any:
    """``fn(cfg)`` in a Ray task with the encode tasks' own options, environment included: the
    same worker pool, so the worker that loads the text encoders here keeps them for its shards.
    The driver never holds a text encoder (a T5-XXL is tens of GB), and a wrong folder still
    fails in one line before any shard starts."""
    import ray

    from pipeline.ray_setup import check_fits, ensure_ray

    ensure_ray(cfg.ray.address)
    check_fits(cpus=cfg.num_cpus, gpus=cfg.num_gpus)
    remote = ray.remote(max_calls=0, max_retries=0)(fn).options(**{**task_options(cfg), "name": name})
    try:
        return ray.get(remote.remote(cfg))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):  # a wrong folder or option: one line
            raise exc.cause from None
        raise


def describe_text_encoders(cfg: EncodeConfig) -> list[TextEncoderFacts]:
    """The text encoders' facts (type, identity, empty-caption embedding), from a worker."""
    return on_encode_worker(cfg, text_encoder_facts, "describe_text_encoders")


EMPTY_CAPTION_DIR = "_empty_caption"
BASE_TEXT_NAME = "base"  # the captions' counts (truncated) of a --base run are kept under this name


def describe_base(cfg: EncodeConfig) -> Any:
    """The base's empty-caption conditioning (a base_model.Conditioning), from a worker that loads
    the base's text encoders (and keeps them for its shards)."""
    return on_encode_worker(cfg, base_empty_caption, "describe_base")


def write_base_empty(cfg: EncodeConfig, base: Any, identity: dict | None, empty: Any) -> dict:
    """Store the base's empty caption (as its pipeline embeds it for guidance) under
    ``_empty_caption/``; returns the manifest's ``base`` entry."""
    files = {}
    for name, arr in empty.arrays().items():
        files[name] = f"{EMPTY_CAPTION_DIR}/{name}"
        storage.write_bytes(storage.join(cfg.output, files[name]), npy_bytes(arr), cfg.storage.options)
    return {
        "source": storage.public_url(cfg.base),
        "identity": identity,
        "family": base.family.name,
        "pipeline": base.class_name,
        "fields": base.fields(),
        "max_sequence_length": max(p.max_length for p in base.family.text) if base.family.stored_mask else None,
        "empty_caption": {**files, "zeros": base.zeros_for_empty},
    }


def write_empty_captions(cfg: EncodeConfig, empties: list, names: list[str]) -> dict[str, dict]:
    """Store each encoder's empty-caption embedding (what classifier-free guidance trains the
    unconditional case on) under ``_empty_caption/``; returns the file names per encoder."""
    out: dict[str, dict] = {}
    for emb, name in zip(empties, names):
        files: dict[str, Any] = {"hidden": f"{EMPTY_CAPTION_DIR}/text_{name}.npy", "tokens": int(emb.hidden.shape[0])}
        storage.write_bytes(storage.join(cfg.output, files["hidden"]), npy_bytes(emb.hidden), cfg.storage.options)
        if emb.pooled is not None:
            files["pooled"] = f"{EMPTY_CAPTION_DIR}/pooled_{name}.npy"
            storage.write_bytes(storage.join(cfg.output, files["pooled"]), npy_bytes(emb.pooled), cfg.storage.options)
        out[name] = files
    return out
