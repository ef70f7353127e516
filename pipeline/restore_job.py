"""``latent-pipeline restore``: restore / upscale images in bulk with Ray Data actor pools.

Pipeline: the driver lists inputs (image files under a prefix or glob, or image WebDataset
shards) and drops those whose output already exists (re-runs resume) -> a read stage (Ray
tasks: file bytes, or the samples of a shard) -> ``map_batches(RestoreActor)`` on an actor
pool, each actor loading the checkpoint once -> outputs written by the actors through the
storage module -> one small result row per input back to the driver, which writes
``_errors.jsonl`` and ``_report.json``.

Per-image rules: EXIF orientation applied; the model sees 8-bit RGB (imaging.to_rgb); grey
inputs (L, 16-bit, float) are written back as 8-bit grey; an alpha channel is carried over,
resized with Lanczos (dropped for JPEG output); 16-bit inputs are written as 8-bit. A bad input
becomes an error row with its reason; it never fails the job or drops a block.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import imaging, storage
from .config import ConfigError, option
from .progress import Progress, format_seconds
from .restoration import RESTORE_TASKS, RestoreOptions
from .tarshards import iter_samples

FORMATS = ("png", "jpg", "webp", "same")
GREY_MODES = ("L", "I;16", "I;16L", "I;16B", "I", "F", "1")
EXISTS = "exists"  # read-stage marker: the output is already there (a re-run skips it)


@dataclass
class RestoreConfig:
    input: str = option("", "images: a folder/prefix, a glob, or image shards (*.tar, brace ranges)")
    output: str = option("", "output folder/prefix: same relative paths, extension per --format")
    checkpoint: str = option("", "diffusion checkpoint (or a training output: its newest checkpoint)")
    task: str = option("", f"one of {', '.join(RESTORE_TASKS)} (default: the checkpoint's task)")
    scale: int = option(0, "upscale factor 2 or 4 (shorthand for --task upscale2/upscale4)")
    mask: str = option("", "inpainting masks: 'alpha' (the input's transparency) or a folder of masks "
                           "with the inputs' relative paths (white = fill)")
    steps: int = option(20, "sampler steps")
    strength: float = option(1.0, "detail gain for task models; noise level (0..1) for zero-shot")
    tile: int = option(256, "tile size in pixels (memory is bounded by it)")
    overlap: int = option(32, "tile overlap in pixels")
    format: str = option("png", "output format: png, jpg, webp, or same (as the input)")
    batch_size: int = option(8, "images per actor batch (same-size images share model calls)")
    actors: int = option(0, "actor pool size (0: as many as the cluster fits, leaving room for reads)")
    cpus_per_actor: float = option(1.0, "CPUs per actor")
    gpus_per_actor: float = option(0.0, "GPUs per actor (fractional allowed)")
    seed: int = option(0, "random seed")
    sampler: str = option("euler", "euler or heun")
    color_fix: str = option("none", "colour correction to the input: none or adain")
    max_pixels: int = option(16 * 1024 * 1024, "skip inputs with more pixels")
    overwrite: bool = option(False, "redo outputs that already exist")
    ray_address: str = option("", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    storage_options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)")

    def __post_init__(self) -> None:
        for name in ("input", "output", "checkpoint"):
            if not getattr(self, name):
                raise ConfigError(f"option {name!r} is required")
        if self.scale:
            if self.scale not in (2, 4):
                raise ConfigError("option 'scale' must be 2 or 4")
            if self.task and self.task != f"upscale{self.scale}":
                raise ConfigError(f"options 'scale' {self.scale} and 'task' {self.task!r} disagree")
            self.task = f"upscale{self.scale}"
        if self.task and self.task not in RESTORE_TASKS:
            raise ConfigError(f"option 'task' must be one of {RESTORE_TASKS}")
        if self.format not in FORMATS:
            raise ConfigError(f"option 'format' must be one of {FORMATS}")
        if self.color_fix not in ("none", "adain"):
            raise ConfigError("option 'color_fix' must be none or adain")
        if self.tile < 32 or not 0 <= self.overlap < self.tile // 2:
            raise ConfigError("option 'tile' must be >= 32 and 'overlap' in [0, tile/2)")
        if self.batch_size < 1 or self.steps < 1 or self.cpus_per_actor <= 0:
            raise ConfigError("options 'batch_size', 'steps' and 'cpus_per_actor' must be positive")


def output_rel(rel: str, fmt: str) -> str:
    stem, _, ext = rel.rpartition(".") if "." in rel.rsplit("/", 1)[-1] else (rel, "", "")
    return f"{stem}.{ext.lower() if fmt == 'same' and ext else ('png' if fmt == 'same' else fmt)}"


def _is_shards(cfg: RestoreConfig) -> bool:
    return any(p.strip().endswith((".tar", ".tar}", ".tgz", ".tar.gz")) for p in cfg.input.split(","))


def list_inputs(cfg: RestoreConfig) -> list[dict]:
    """Items for the read stage: ``{"url", "rel"}`` for files, ``{"url"}`` for shards."""
    so = cfg.storage_options
    if _is_shards(cfg):
        return [{"url": u, "rel": ""} for u in storage.expand(cfg.input, so)]
    files = [(u, r) for u, r in storage.list_files(cfg.input, imaging.IMAGE_SUFFIXES, so) if not r.startswith("_")]
    if not files:
        raise FileNotFoundError(f"no images under {storage.redact(cfg.input)}")
    return [{"url": u, "rel": r} for u, r in files]


# --------------------------------------------------------------------------- read stage (tasks)


def read_files(batch: dict[str, np.ndarray], cfg: RestoreConfig, existing: frozenset) -> dict[str, list]:
    out: dict[str, list] = {"rel": [], "data": [], "error": []}
    for url, rel in zip(batch["url"], batch["rel"]):
        if not cfg.overwrite and output_rel(rel, cfg.format) in existing:
            out["rel"].append(str(rel))
            out["data"].append(b"")
            out["error"].append(EXISTS)
            continue
        try:
            data, err = storage.read_bytes(str(url), cfg.storage_options), ""
        except OSError as exc:
            data, err = b"", f"unreadable: {type(exc).__name__}"
        out["rel"].append(str(rel))
        out["data"].append(data)
        out["error"].append(err)
    return out


def read_shard(row: dict[str, Any], cfg: RestoreConfig, existing: frozenset) -> list[dict[str, Any]]:
    rows = []
    name = storage.basename(row["url"])
    try:
        with storage.open_read(row["url"], cfg.storage_options) as f:
            for s in iter_samples(f):
                if s.error:
                    rows.append({"rel": f"{name}/{s.key}" if s.key else name, "data": b"",
                                 "error": s.error})
                    continue
                ext = imaging.image_field(s.fields)
                rel = f"{s.key}.{ext or 'png'}"
                if not cfg.overwrite and output_rel(rel, cfg.format) in existing:
                    rows.append({"rel": rel, "data": b"", "error": EXISTS})
                    continue
                rows.append({"rel": rel, "data": s.fields.get(ext, b"") if ext else b"",
                             "error": "" if ext else "no_image"})
    except OSError as exc:
        rows.append({"rel": name, "data": b"", "error": f"unreadable: {type(exc).__name__}"})
    return rows


# --------------------------------------------------------------------------- actor stage


class RestoreActor:
    """Loads the checkpoint once per actor; restores and writes each image of a batch."""

    loads = 0  # per process: how many times a model was loaded here

    def __init__(self, cfg: RestoreConfig):
        import torch

        from . import sampling
        from .restoration import Restorer

        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        model = sampling.load(cfg.checkpoint, cfg.storage_options)
        task = cfg.task or model.config.get("task") or ""
        if not task:
            raise ConfigError("the checkpoint is unconditional: choose a --task for zero-shot restoration")
        self.restorer = Restorer(model, RestoreOptions(task=task, steps=cfg.steps, strength=cfg.strength,
                                                       tile=cfg.tile, overlap=cfg.overlap, seed=cfg.seed,
                                                       sampler=cfg.sampler, color_fix=cfg.color_fix))
        self.task = task
        RestoreActor.loads += 1
        self.actor_id = f"{os.getpid()}-{id(self)}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        t0 = time.perf_counter()
        rels = [str(r) for r in batch["rel"]]
        status, reason, detail = ["written"] * len(rels), [""] * len(rels), [""] * len(rels)
        loaded: dict[int, tuple] = {}  # index -> (decoded image, mask)
        for i, (rel, data, err) in enumerate(zip(rels, batch["data"], batch["error"])):
            if err == EXISTS:
                status[i] = "skipped"
            elif err:
                status[i], reason[i] = "error", str(err)
            elif not storage.safe_relpath(rel):
                status[i], reason[i] = "error", "unsafe_path"
            else:
                self._guard(i, status, reason, detail, lambda i=i, data=data: loaded.__setitem__(
                    i, self._load(rels[i], bytes(data))))
        # same-size images go through the model together; a failing group is retried one by one
        outputs: dict[int, Any] = {}
        plain = [i for i in loaded if loaded[i][1] is None]
        if plain:
            try:
                outputs.update(zip(plain, self.restorer.restore_many([imaging.to_rgb(loaded[i][0]) for i in plain])))
            except Exception:  # noqa: BLE001 - isolate the bad image below
                pass
        for i in loaded:
            if i not in outputs:
                im, mask = loaded[i]
                self._guard(i, status, reason, detail, lambda i=i, im=im, mask=mask: outputs.__setitem__(
                    i, self.restorer.restore(imaging.to_rgb(im), mask)))
        for i in outputs:
            self._guard(i, status, reason, detail, lambda i=i: self._write(rels[i], loaded[i][0], outputs[i]))
        seconds = (time.perf_counter() - t0) / max(1, len(rels))
        return {"rel": rels, "status": status, "reason": reason, "detail": detail,
                "seconds": [seconds] * len(rels), "actor": [self.actor_id] * len(rels),
                "loads": [RestoreActor.loads] * len(rels)}

    @staticmethod
    def _guard(i: int, status: list, reason: list, detail: list, fn) -> None:
        """Run ``fn``; a failure marks image ``i`` as an error row instead of failing the job."""
        try:
            fn()
        except imaging.BadImage as exc:
            status[i], reason[i], detail[i] = "error", exc.reason, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image never fails the job
            status[i], reason[i], detail[i] = "error", "restore_failed", f"{type(exc).__name__}: {str(exc)[:200]}"

    def _mask(self, rel: str, im) -> Any:
        cfg = self.cfg
        if self.task != "inpaint":
            return None
        if cfg.mask == "alpha" or not cfg.mask:
            alpha = imaging.split_alpha(im)
            if alpha is None:
                raise imaging.BadImage("no_mask", "input has no alpha channel to use as the mask")
            return alpha.point(lambda a: 255 if a < 128 else 0)  # transparent = fill
        stem = rel.rsplit(".", 1)[0]
        for cand in (rel, stem + ".png"):
            url = storage.join(cfg.mask, cand)
            if storage.exists(url, cfg.storage_options):
                return imaging.decode(storage.read_bytes(url, cfg.storage_options), cfg.max_pixels)
        raise imaging.BadImage("no_mask", f"no mask for {rel} under {storage.redact(cfg.mask)}")

    def _load(self, rel: str, data: bytes) -> tuple:
        im = imaging.decode(data, self.cfg.max_pixels)
        return im, self._mask(rel, im)

    def _write(self, rel: str, im, out) -> None:
        """Carry alpha and grey over from the input ``im`` and write the restored ``out``."""
        from PIL import Image

        cfg = self.cfg
        alpha = imaging.split_alpha(im) if self.task != "inpaint" else None
        if im.mode in GREY_MODES or im.mode == "LA":
            out = out.convert("L")
        fmt = cfg.format if cfg.format != "same" else (rel.rsplit(".", 1)[-1].lower() if "." in rel else "png")
        fmt = {"jpeg": "jpg", "tif": "png", "tiff": "png", "bmp": "png"}.get(fmt, fmt)
        if alpha is not None and fmt != "jpg":
            out = out.convert("LA" if out.mode == "L" else "RGBA")
            out.putalpha(alpha.resize(out.size, Image.Resampling.LANCZOS))
        buf = io.BytesIO()
        out.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                 **({"quality": 95} if fmt in ("jpg", "webp") else {}))
        storage.write_bytes(storage.join(cfg.output, output_rel(rel, cfg.format)), buf.getvalue(),
                            cfg.storage_options)

    def restore_one(self, rel: str, data: bytes) -> None:
        """Decode, restore and write one image (the unbatched path, used by bench/restore.py)."""
        im, mask = self._load(rel, data)
        self._write(rel, im, self.restorer.restore(imaging.to_rgb(im), mask))


# --------------------------------------------------------------------------- driver


def _pool_size(cfg: RestoreConfig) -> int:
    from .ray_setup import cluster_slots

    # leave half a CPU for the read tasks: a pool that takes every CPU deadlocks Ray Data
    return cfg.actors or cluster_slots(cfg.cpus_per_actor, cfg.gpus_per_actor, reserve_cpus=0.5)


def run_restore(cfg: RestoreConfig, log=print) -> dict:
    import ray
    import ray.data

    from .ray_setup import ensure_ray

    t0 = time.time()
    so = cfg.storage_options
    items = list_inputs(cfg)
    existing = frozenset() if cfg.overwrite else frozenset(
        r for r in (storage.walk_files(cfg.output, so) if storage.exists(cfg.output, so) else [])
        if not r.startswith("_"))
    ensure_ray(cfg.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pool = _pool_size(cfg)
    shards = _is_shards(cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    if shards:
        ds = ds.flat_map(read_shard, fn_args=(cfg, existing), num_cpus=0.5)
    else:
        ds = ds.map_batches(read_files, fn_args=(cfg, existing), batch_size=cfg.batch_size, num_cpus=0.5)
    ds = ds.map_batches(RestoreActor, fn_constructor_args=(cfg,), batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=cfg.cpus_per_actor,
                        num_gpus=cfg.gpus_per_actor or None)
    total = None if shards else len(items)
    log(f"[restore] {len(items)} input {'shards' if shards else 'images'}, "
        f"{len(existing)} outputs already present; {pool} actor(s) -> {storage.redact(cfg.output)}")
    progress = Progress("restore", total=total, unit="images", log=log)
    rows = []
    for row in ds.iter_rows():
        rows.append(row)
        progress.advance()
    errors = [{"key": r["rel"], "reason": r["reason"], "detail": r["detail"]} for r in rows if r["status"] == "error"]
    status = Counter(r["status"] for r in rows)
    seconds = time.time() - t0
    report = {"seen": len(rows), "written": status["written"], "skipped_existing": status["skipped"],
              "errors": len(errors), "errors_by_reason": dict(Counter(e["reason"] for e in errors)),
              "seconds": round(seconds, 2), "images_per_s": round(status["written"] / max(seconds, 1e-9), 3),
              "actors": sorted({r["actor"] for r in rows}), "model_loads": _loads(rows),
              "task": cfg.task, "checkpoint": storage.redact(cfg.checkpoint)}
    assert report["seen"] == report["written"] + report["skipped_existing"] + report["errors"]
    storage.write_bytes(storage.join(cfg.output, "_errors.jsonl"),
                        "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode(), so)
    storage.write_json(storage.join(cfg.output, "_report.json"), report, so)
    log(f"[restore] done in {format_seconds(seconds)}: {report['written']} written, {report['skipped_existing']} skipped, {len(errors)} errors "
        f"{report['errors_by_reason'] or ''}; {report['images_per_s']:.2f} images/s; "
        f"report {storage.redact(storage.join(cfg.output, '_report.json'))}")
    return report


def _loads(rows: list[dict]) -> dict[str, int]:
    """Model loads seen per actor (its highest count): 1 each when the model stays resident."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["actor"]] = max(out.get(r["actor"], 0), int(r["loads"]))
    return out
