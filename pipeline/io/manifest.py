"""The latent dataset manifest (``_manifest.json``) and error list (``_errors.jsonl``).

The manifest is written last; its presence means every shard is complete. Readers call
:func:`load` which refuses a missing or inconsistent manifest with a clear error.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipeline.errors import ManifestError
from pipeline.io import buckets as bucket_tables
from pipeline.io import storage

FORMAT = "latent-shards/1"
MANIFEST_NAME = "_manifest.json"
ERRORS_NAME = "_errors.jsonl"


HOLE_FIELD = "inpaint_hole.npy"  # the inpaint view's hole at the latent grid, (1, h, w), 0 or 1


def task_fields(tasks: list[str]) -> list[str]:
    """The fields a sample stores for its task views: ``TASK.npy`` (the view's latent) each, and
    :data:`HOLE_FIELD` with the ``inpaint`` view."""
    return [f"{t}.npy" for t in tasks] + ([HOLE_FIELD] if "inpaint" in tasks else [])


def build(
    records: list[dict],
    *,
    encoder: dict,
    scale: float,
    shift: float,
    latent_shape: list[int] | None,
    latent_dtype: str,
    preprocessing: dict,
    tasks: list[str],
    config: dict,
    buckets: list[dict] | None = None,
    max_aspect: float | None = None,
    flip: bool = False,
    text_encoders: list[dict] | None = None,
    captions: dict | None = None,
    base: dict | None = None,
) -> dict[str, Any]:
    """The manifest of a finished encode run.

    ``latent_shape`` is None for a bucketed dataset, whose ``buckets`` list each bucket's image
    size, latent shape and sample count. ``text_encoders`` lists each encoder's name, identity,
    stored fields and the files of its empty-caption embedding.
    """
    skipped: Counter[str] = Counter()
    for r in records:
        skipped.update(r["skipped"])
    totals = {
        "seen": sum(r["seen"] for r in records),
        "written": sum(r["written"] for r in records),
        "skipped": dict(sorted(skipped.items())),
    }
    if totals["seen"] != totals["written"] + sum(skipped.values()):
        raise AssertionError(f"seen != written + skipped: {totals}")
    fields = ["latent.npy", "std.npy", "json", *task_fields(tasks)]
    if flip:
        fields += ["latent_flip.npy", "std_flip.npy"]
    for te in text_encoders or []:
        fields += [te["field"]] + ([te["pooled_field"]] if te.get("pooled_field") else [])
    if base:
        fields += [f for f in base["fields"].values() if f]
    extra: dict[str, Any] = {"flip": flip}
    if buckets is not None:
        counts: Counter[str] = Counter()
        for r in records:
            counts.update(r.get("buckets", {}))
        extra["buckets"] = [{**b, "samples": counts.get(bucket_tables.name(b["size"]), 0)} for b in buckets]
        extra["max_aspect"] = max_aspect
    if base:
        extra["base"] = base
    if text_encoders or base:
        truncated: Counter[str] = Counter()
        for r in records:
            truncated.update(r.get("captions", {}).get("truncated", {}))
        if text_encoders:
            extra["text_encoders"] = text_encoders
        extra["captions"] = {
            **(captions or {}),
            "empty_embedded": sum(r.get("captions", {}).get("empty", 0) for r in records),
            "truncated": dict(truncated),
        }
    return {
        **extra,
        "format": FORMAT,
        "encoder": encoder,
        "scale": scale,
        "shift": shift,
        "latent_shape": latent_shape,
        "latent_dtype": latent_dtype,
        "fields": fields,
        "preprocessing": preprocessing,
        "tasks": tasks,
        "shards": [
            {"name": r["shard"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in records
        ],
        "totals": totals,
        "config": config,
    }


def write_errors(root: str, records: list[dict], storage_options: dict | None = None) -> None:
    """``_errors.jsonl``: one line per skipped sample, with its shard."""
    lines = [json.dumps({"shard": r["shard"], **e}, sort_keys=True) + "\n" for r in records for e in r["errors"]]
    storage.write_bytes(storage.join(root, ERRORS_NAME), "".join(lines).encode(), storage_options)


def write(root: str, man: dict, records: list[dict], storage_options: dict | None = None) -> None:
    """Write ``_errors.jsonl`` then ``_manifest.json`` (last)."""
    write_errors(root, records, storage_options)
    storage.write_json(storage.join(root, MANIFEST_NAME), man, storage_options)


def load(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read and check a latent dataset's manifest."""
    url = storage.join(root, MANIFEST_NAME)
    try:
        man = storage.read_json(url, storage_options)
    except FileNotFoundError:
        raise ManifestError(
            f"{storage.redact(root)} has no {MANIFEST_NAME}: not a finished latent "
            "dataset (run or resume `latent-pipeline encode`)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{storage.redact(url)} is not valid JSON: {exc}") from None
    missing = [k for k in ("format", "encoder", "scale", "shift", "latent_shape", "shards", "totals") if k not in man]
    if missing:
        raise ManifestError(f"{storage.redact(url)} lacks {missing}")
    if man["format"] != FORMAT:
        raise ManifestError(f"{storage.redact(url)}: format {man['format']!r}, expected {FORMAT!r}")
    t = man["totals"]
    if t["seen"] != t["written"] + sum(t["skipped"].values()):
        raise ManifestError(f"{storage.redact(url)}: totals inconsistent (seen != written + skipped)")
    if sum(s["samples"] for s in man["shards"]) != t["written"]:
        raise ManifestError(f"{storage.redact(url)}: shard sample counts do not add up to the total")
    if not man["shards"]:
        raise ManifestError(f"{storage.redact(url)} lists no shards")
    return man


def shard_urls(root: str, man: dict) -> list[str]:
    return [storage.join(root, s["name"]) for s in man["shards"]]
