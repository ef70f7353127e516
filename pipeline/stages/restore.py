"""``latent-pipeline restore``: restore / upscale images in bulk with Ray Data actor pools.

Pipeline: the driver checks the options and the checkpoint (one line and no Ray work for a
wrong one), lists inputs (image files under a prefix or glob, or image WebDataset shards) and
drops those whose output already exists (re-runs resume; a run with nothing left to do finishes
without starting Ray) -> a read stage (Ray tasks: file bytes, or the samples of a shard) ->
``map_batches(RestoreActor)`` on an actor pool, each actor loading the checkpoint once ->
outputs written by the actors through the storage module -> one small result row per input back
to the driver, which writes ``_errors.jsonl`` and ``_report.json``.

Per-image rules: EXIF orientation applied; the model sees 8-bit RGB (imaging.to_rgb), or for a
16-bit RGB or grey PNG/TIFF its float levels (imaging.decode_pixels: every backend keeps the 16
bits and the output is written as a 16-bit PNG or TIFF; as 8 bits for JPEG/WebP/BMP); grey
inputs are written back as grey; an alpha channel is carried over, resized with Lanczos
(dropped for JPEG output). Output names
come from :func:`output_name` alone; two inputs that would share an output name are both error
rows (``output_name_collision``). Inpainting masks come from the input's alpha, a mask folder or
each shard sample's ``key.mask.png`` (the default for shard input); a missing mask or one of
another size is an error row. A bad input becomes an error row with its reason; it never
fails the job or drops a block. seen = written + skipped_existing + errors, always.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobFailed, RayOptions, StorageOptions, check_limits, group, option, require
from pipeline.console import Progress, format_seconds
from pipeline.io import checkpoint, imaging, storage
from pipeline.io.tarshards import SHARD_SUFFIXES, expand_shards, iter_samples
from pipeline.models.degrade import INPAINT, RESTORE_TASKS, UPSCALE_TASKS
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.restore_actor import EXISTS, FORMATS, MASK_MEMBER, NO_SPACE, RestoreActor, output_name

log = logging.getLogger("pipeline.restore")

REPORT_NAME, ERRORS_NAME = "_report.json", "_errors.jsonl"


@dataclass
class RestoreConfig:
    input: str = option("", "images: a folder/prefix, a glob, or image shards (*.tar, brace ranges)")
    output: str = option("", "output folder/prefix: same relative paths, extension per --format")
    checkpoint: str = option(
        "",
        "diffusion checkpoint (or a training output: its newest checkpoint), or a pretrained network file "
        "that spandrel recognises (ESRGAN, Real-ESRGAN, SwinIR, HAT, ...; .safetensors only), or for "
        "--task inpaint a train-refiner --task inpaint output (the refiner over the biharmonic fill), or a "
        "diffusers pipeline folder (LDM / SD x4 upscalers; a StableDiffusionInpaintPipeline for --task inpaint)",
    )
    task: str = option("", "restoration task (default: the checkpoint's task)", choices=RESTORE_TASKS, noun="task")
    scale: int = option(
        0,
        "upscale factor, shorthand for --task " + "/".join(UPSCALE_TASKS.values()),
        choices=tuple(UPSCALE_TASKS),
    )
    prompt: str = option(
        "",
        "StableDiffusionUpscalePipeline and StableDiffusionInpaintPipeline folders only: the text prompt, "
        "with the pipeline's default guidance scale (9 and 7.5; default: the empty prompt, no guidance)",
    )
    mask: str = option(
        "",
        "inpainting masks (white = fill, the image's own size): 'alpha' (the input's transparency), "
        "'member' (image shards: each sample's key.mask.png) or a folder of masks with the inputs' "
        "relative paths (default: member for shard input, else alpha)",
    )
    format: str = option(
        "png",
        "output format (same: the input's own, TIFF and BMP included); 16-bit PNG/TIFF inputs are written "
        "with 16 bits as PNG or TIFF",
        choices=FORMATS,
    )
    batch_size: int = option(8, "images per actor batch (same-size images share model calls)", range=(1, 4096))
    actors: int = option(0, "actor pool size (0: as many as the cluster fits, leaving room for reads)", range=(0, None))
    cpus_per_actor: float = option(1.0, "CPUs per actor", range=(0, 1024), lo_open=True)
    gpus_per_actor: float = option(0.0, "GPUs per actor (fractional allowed)", range=(0, 64))
    max_pixels: int = option(16 * 1024 * 1024, "skip inputs with more pixels", range=(1, None))
    max_error_rate: float = option(
        0.5, "exit non-zero (outputs kept) when more than this share of inputs failed", range=(0, 1)
    )
    overwrite: bool = option(False, "redo outputs that already exist")
    settings: RestoreSettings = group(RestoreSettings)
    ray: RayOptions = group(RayOptions, private=True)
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "input", "output", "checkpoint")
        self.input, self.output = storage.absolute(self.input), storage.absolute(self.output)
        self.checkpoint = storage.absolute(self.checkpoint)
        if self.mask not in ("", "alpha", "member"):
            self.mask = storage.absolute(self.mask)
        check_limits(self)
        if self.scale:
            if self.task and self.task != UPSCALE_TASKS[self.scale]:
                raise ConfigError(f"option 'scale': {self.scale} disagrees with --task {self.task}")
            self.task = UPSCALE_TASKS[self.scale]
        storage.check_separate(
            self.output,
            {
                "input": self.input,
                "checkpoint": self.checkpoint,
                "mask": "" if self.mask in ("alpha", "member") else self.mask,
            },
        )


def _is_shards(cfg: RestoreConfig) -> bool:
    """Whether ``--input`` names image shards: shard files or patterns, or a folder that holds
    shards and no image (the output of ``shards``, say)."""
    specs = [p.strip() for p in cfg.input.split(",")]
    if any(p.endswith((*SHARD_SUFFIXES, ".tar}")) for p in specs):
        return True
    so = cfg.storage.options
    if len(specs) != 1 or any(c in specs[0] for c in "*?[{") or not storage.exists(specs[0], so):
        return False
    fs, path = storage.filesystem(specs[0], so)
    if not fs.isdir(path):
        return False
    names = [u.lower() for u in storage.expand(storage.join(specs[0], "*"), so, must_exist=False)]
    return any(n.endswith(SHARD_SUFFIXES) for n in names) and not any(n.endswith(imaging.IMAGE_SUFFIXES) for n in names)


def list_inputs(cfg: RestoreConfig) -> tuple[list[dict], list[dict]]:
    """Items for the read stage (``{"url", "rel"}``; ``rel`` empty for shards) and the error rows
    of inputs refused up front (unsafe names, output-name collisions, formats not allowed)."""
    so = cfg.storage.options
    if _is_shards(cfg):
        return [{"url": u, "rel": ""} for u in expand_shards(cfg.input, so, option="input")], []
    listed = storage.list_files(cfg.input, (), so, hidden=True)
    if not listed:
        raise FileNotFoundError(f"no files under {storage.redact(cfg.input)}")
    errors: list[dict] = []
    files = []
    for u, r in listed:
        if storage.is_hidden(r):
            errors.append({"key": r, "reason": "hidden_file", "detail": "names starting with '.' are not restored"})
        elif not r.lower().endswith(imaging.IMAGE_SUFFIXES):
            errors.append(
                {
                    "key": r,
                    "reason": "not_an_allowed_image_format",
                    "detail": f"allowed: {', '.join(imaging.IMAGE_EXTS)}",
                }
            )
        elif not storage.safe_relpath(r):
            errors.append({"key": r, "reason": "unsafe_path", "detail": ""})
        else:
            files.append((u, r))
    by_output: dict[str, list[str]] = {}
    for _u, r in files:
        by_output.setdefault(output_name(r, cfg.format)[0], []).append(r)
    clash = {r for rels in by_output.values() if len(rels) > 1 for r in rels}
    for r in sorted(clash):
        errors.append(
            {
                "key": r,
                "reason": "output_name_collision",
                "detail": f"{', '.join(by_output[output_name(r, cfg.format)[0]])} -> {output_name(r, cfg.format)[0]}",
            }
        )
    items = [{"url": u, "rel": r} for u, r in files if r not in clash]
    if not items and not errors:
        raise FileNotFoundError(f"no images under {storage.redact(cfg.input)}")
    return items, errors


# --------------------------------------------------------------------------- read stage (tasks)


def read_files(batch: dict[str, np.ndarray], cfg: RestoreConfig, existing: frozenset) -> dict[str, list]:
    out: dict[str, list] = {"rel": [], "data": [], "error": [], "mask": []}
    for url, rel in zip(batch["url"], batch["rel"]):
        out["mask"].append(b"")  # masks of files come from --mask (alpha or a folder), read by the actor
        if not cfg.overwrite and output_name(str(rel), cfg.format)[0] in existing:
            out["rel"].append(str(rel))
            out["data"].append(b"")
            out["error"].append(EXISTS)
            continue
        try:
            data, err = storage.read_bytes(str(url), cfg.storage.options), ""
        except OSError as exc:
            data, err = b"", f"unreadable: {type(exc).__name__}"
        out["rel"].append(str(rel))
        out["data"].append(data)
        out["error"].append(err)
    return out


def shard_folder(url: str) -> str:
    """Outputs of a shard's samples go under the shard's name, so keys of two shards never collide."""
    name = storage.basename(url)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_shard(row: dict[str, Any], cfg: RestoreConfig, existing: frozenset) -> list[dict[str, Any]]:
    rows = []
    folder = shard_folder(row["url"])
    try:
        with storage.open_read(row["url"], cfg.storage.options) as f:
            for s in iter_samples(f):
                if s.error:
                    rel = f"{folder}/{s.key}" if s.key else folder
                    rows.append({"rel": rel, "data": b"", "error": s.error, "mask": b""})
                    continue
                ext = imaging.image_field(s.fields)
                rel = f"{folder}/{s.key}.{ext or 'png'}"
                if not cfg.overwrite and output_name(rel, cfg.format)[0] in existing:
                    rows.append({"rel": rel, "data": b"", "error": EXISTS, "mask": b""})
                    continue
                rows.append(
                    {
                        "rel": rel,
                        "data": s.fields.get(ext, b"") if ext else b"",
                        "error": "" if ext else "no_image",
                        "mask": s.fields.get(MASK_MEMBER, b""),  # the sample's own mask, if it has one
                    }
                )
    except OSError as exc:
        rows.append({"rel": folder, "data": b"", "error": f"unreadable: {type(exc).__name__}", "mask": b""})
    return rows


# --------------------------------------------------------------------------- driver


def _pool_size(cfg: RestoreConfig, batches: int) -> int:
    """``--actors``, or as many as the cluster fits (at most one per batch of work)."""
    from pipeline.ray_setup import check_fits, cluster_slots

    # leave half a CPU for the read tasks: a pool that takes every CPU deadlocks Ray Data
    check_fits(
        cpus=cfg.cpus_per_actor,
        gpus=cfg.gpus_per_actor,
        count=cfg.actors or 1,
        reserve_cpus=0.5,
        options=("cpus_per_actor", "gpus_per_actor", "actors"),
    )
    fits = cluster_slots(cfg.cpus_per_actor, cfg.gpus_per_actor, reserve_cpus=0.5)
    return cfg.actors or max(1, min(fits, batches))


def _existing_outputs(cfg: RestoreConfig) -> frozenset:
    so = cfg.storage.options
    if cfg.overwrite or not storage.exists(cfg.output, so):
        return frozenset()
    storage.clean_partials(cfg.output)  # a killed run's half-written files
    return frozenset(r for r in storage.walk_files(cfg.output, so) if not r.startswith("_"))


def run_restore(cfg: RestoreConfig) -> dict:
    from pipeline.restoration import backends

    t0 = time.time()
    so = cfg.storage.options
    # the checkpoint, network or pipeline is checked first: one line, before any Ray work
    task = backends.check(cfg.checkpoint, cfg.task, so, prompt=cfg.prompt)
    _say_if_uncalibrated(cfg, task)
    items, refused = list_inputs(cfg)
    shards = _is_shards(cfg)
    if task == INPAINT:  # where the masks come from, decided once on the driver
        if cfg.mask == "member" and not shards:
            raise ConfigError("option 'mask': 'member' reads each shard sample's key.mask.png; the input is not shards")
        cfg = dataclasses.replace(cfg, mask=cfg.mask or ("member" if shards else "alpha"))
    if shards:
        folders = Counter(shard_folder(i["url"]) for i in items)
        dup = [f for f, n in folders.items() if n > 1]
        if dup:
            raise ConfigError(f"option 'input': two shards are named {dup[0]!r}; restore them into separate outputs")
    storage.probe_writable(cfg.output, so)
    existing = _existing_outputs(cfg)
    todo = items if shards else [i for i in items if output_name(i["rel"], cfg.format)[0] not in existing]
    todo_rels = {i["rel"] for i in todo}
    rows = [
        {"rel": i["rel"], "status": "skipped", "reason": "", "detail": "", "actor": ""}
        for i in items
        if not shards and i["rel"] not in todo_rels
    ]
    rows += [
        {"rel": e["key"], "status": "error", "reason": e["reason"], "detail": e["detail"], "actor": ""} for e in refused
    ]
    log.info(
        f"[restore] {len(items)} input {'shards' if shards else 'images'} ({len(refused)} refused), "
        f"{len(existing)} outputs already present -> {storage.redact(cfg.output)}"
    )
    pool = 0
    if todo:
        pool = _run_pool(cfg, task, todo, existing, shards, rows)
    return _finish(cfg, task, rows, pool, time.time() - t0)


def _say_if_uncalibrated(cfg: RestoreConfig, task: str) -> None:
    """A task model without a calibrated gain restores at the classical base by default: say so."""
    from pipeline.models import loading
    from pipeline.restoration import backends

    backend = backends.backend_for(cfg.checkpoint, cfg.storage.options).name
    if cfg.settings.gain is not None or backend not in ("checkpoint", "refiner"):
        return
    if backend == "refiner":  # an inpainting refiner: calibrated by train-refiner --calibration-images
        info = checkpoint.load(cfg.checkpoint, "refiner", cfg.storage.options)[1]
    else:
        info = loading.describe(cfg.checkpoint, cfg.storage.options)
    if info.task and info.gain is None:
        log.warning(
            f"[restore] {storage.redact(cfg.checkpoint)} has no calibrated gain: restoring {task} at --gain 0, "
            "exactly the classical base; calibrate it (train or train-refiner --calibration-images, or eval) "
            "or pass --gain"
        )


def _run_pool(
    cfg: RestoreConfig, task: str, todo: list[dict], existing: frozenset, shards: bool, rows: list[dict]
) -> int:
    import ray.data

    from pipeline.ray_setup import ensure_ray

    ensure_ray(cfg.ray.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # at most one actor per batch of files, or per shard (a shard's samples arrive as one block)
    pool = _pool_size(cfg, len(todo) if shards else -(-len(todo) // cfg.batch_size))
    ds: Any = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 64)))
    if shards:
        ds = ds.flat_map(read_shard, fn_args=(cfg, existing), num_cpus=0.5)
    else:
        ds = ds.map_batches(read_files, fn_args=(cfg, existing), batch_size=cfg.batch_size, num_cpus=0.5)
    ds = ds.map_batches(
        RestoreActor,
        fn_constructor_args=(cfg, task),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    log.info(f"[restore] {len(todo)} to do on {pool} actor(s)")
    # every input counts: those skipped (done before) and refused up front are already done
    progress = Progress("restore", total=None if shards else len(todo) + len(rows), unit="images", logger=log)
    progress.done = len(rows)
    for row in ds.iter_rows():
        rows.append(row)
        progress.advance()
    return pool


def _finish(cfg: RestoreConfig, task: str, rows: list[dict], pool: int, seconds: float) -> dict:
    so = cfg.storage.options
    errors = [{"key": r["rel"], "reason": r["reason"], "detail": r["detail"]} for r in rows if r["status"] == "error"]
    status = Counter(r["status"] for r in rows)
    report: dict[str, Any] = {
        "seen": len(rows),
        "written": status["written"],
        "skipped_existing": status["skipped"],
        "errors": len(errors),
        "errors_by_reason": dict(Counter(e["reason"] for e in errors)),
        "seconds": round(seconds, 2),
        "images_per_s": round(status["written"] / max(seconds, 1e-9), 3),
        "actors": sorted({r["actor"] for r in rows if r["actor"]}),
        "pool": pool,
        "task": task,
        "checkpoint": storage.public_url(cfg.checkpoint),
    }
    if report["seen"] != report["written"] + report["skipped_existing"] + report["errors"]:
        raise RuntimeError(f"restore: seen != written + skipped + errors: {report}")
    storage.write_bytes(
        storage.join(cfg.output, ERRORS_NAME),
        "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode(),
        so,
    )
    storage.write_json(storage.join(cfg.output, REPORT_NAME), report, so)
    log.info(
        f"[restore] done in {format_seconds(seconds)}: {report['written']} written, "
        f"{report['skipped_existing']} skipped, {len(errors)} errors {report['errors_by_reason'] or ''}; "
        f"{report['images_per_s']:.2f} images/s; report {storage.redact(storage.join(cfg.output, REPORT_NAME))}"
    )
    if report["errors_by_reason"].get(NO_SPACE):
        raise JobFailed(
            f"restore: no space left on the device of {storage.redact(cfg.output)} "
            f"({report['errors_by_reason'][NO_SPACE]} outputs not written); free space and re-run to finish"
        )
    attempted = report["seen"] - report["skipped_existing"]
    if attempted and not report["written"]:
        raise JobFailed(
            f"restore: none of the {attempted} inputs it tried was written; "
            f"see {storage.redact(cfg.output)}/{ERRORS_NAME}"
        )
    if attempted and report["errors"] > cfg.max_error_rate * attempted:
        raise JobFailed(
            f"restore: {report['errors']} of {attempted} inputs failed "
            f"(more than --max-error-rate {cfg.max_error_rate:g}); see {storage.redact(cfg.output)}/{ERRORS_NAME}"
        )
    return report
