"""``latent-pipeline encode``: image shards -> latent shards, one Ray task per input shard.

Per input shard ``X.tar`` the output root gets:

* ``X.tar``: per sample ``key.latent.npy`` (posterior mean, float16 by default), ``key.std.npy``
  (KL encoders), ``key.json`` (input metadata + original size, crop box, resolution) and the
  input's ``key.txt`` / ``key.cls`` passed through;
* ``_shards/X.json``: that shard's record (counts, skips with reasons, sha256, settings
  fingerprint). It is written after the tar, so it marks the shard as done.

When every shard is done, ``_errors.jsonl`` and then ``_manifest.json`` are written (the
manifest last: its presence means the dataset is complete). A re-run skips done shards, so a
killed job resumes; ``overwrite`` redoes everything. Outputs are deterministic, so a resumed
run's shards are byte-identical to an uninterrupted run's.

Inside a task, a reader thread streams the tar and decodes images while the main thread runs
the encoder on full batches, so download/decode overlap with compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import (
    ConfigError,
    JobFailed,
    RayOptions,
    StorageOptions,
    check_choice,
    check_range,
    group,
    option,
    public_dict,
    require,
)
from pipeline.console import Progress, format_seconds
from pipeline.io import checkpoint, imaging, manifest, storage
from pipeline.io.tarshards import Sample, TarShardWriter, iter_samples
from pipeline.models.degrade import check_task

log = logging.getLogger("pipeline.encode")

SHARD_RECORDS = "_shards"
SETTINGS_NAME = "_settings.json"  # the settings fingerprint that owns this output
PRECISIONS = ("fp32", "fp16", "bf16")
CROPS = ("center",)


@dataclass
class EncodeConfig:
    input: str = option("", "input image shards: URL, brace range {000000..000127} or glob; comma-separated list")
    output: str = option("", "output folder/prefix for latent shards and _manifest.json")
    vae: str = option("", "autoencoder directory (built-in checkpoint or diffusers AutoencoderKL)")
    resolution: int = option(256, "square training resolution: shorter side resized, then centre-cropped")
    min_size: int = option(32, "skip images whose shorter side is below this many pixels")
    max_pixels: int = option(imaging.DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression bombs)")
    crop: str = option("center", "crop policy: center")
    batch_size: int = option(32, "images per encoder forward pass")
    precision: str = option("fp32", "encoder precision: fp32, fp16 or bf16 (fp16/bf16 on GPU)")
    latent_dtype: str = option("float16", "stored latent dtype: float16 or float32")
    num_cpus: float = option(1.0, "CPUs per encode task")
    num_gpus: float = option(0.0, "GPUs per encode task (fractional allowed, e.g. 0.25)")
    max_in_flight: int = option(0, "shards encoding at once (0: as many as the cluster fits, plus one)")
    overwrite: bool = option(False, "redo every shard even when its output exists")
    max_error_rate: float = option(0.5, "exit non-zero (dataset kept) when more than this share of samples is skipped")
    tasks: list[str] = option([], "restoration task views to add, e.g. upscale2,upscale4,restore")
    ray: RayOptions = group(RayOptions, private=True)
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "input", "output", "vae")
        self.input, self.output, self.vae = (storage.absolute(u) for u in (self.input, self.output, self.vae))
        storage.check_separate(self.output, {"input": self.input, "vae": self.vae})
        if not 8 <= self.resolution <= 8192:
            raise ConfigError("option 'resolution' must be in 8..8192")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("latent_dtype", self.latent_dtype, ("float16", "float32"))
        check_choice("crop", self.crop, CROPS)
        if not 1 <= self.batch_size <= 65536 or self.min_size < 1 or self.max_pixels < 1:
            raise ConfigError("options 'batch-size', 'min-size' and 'max-pixels' must be >= 1")
        if self.max_in_flight < 0:
            raise ConfigError("option 'max-in-flight' must be >= 0 (0: as many as the cluster fits)")
        check_range("num_cpus", self.num_cpus, 0.0, 1024.0, lo_open=True)
        check_range("num_gpus", self.num_gpus, 0.0, 64.0)
        check_range("max_error_rate", self.max_error_rate, 0.0, 1.0)
        for task in self.tasks:
            check_task(task, option="tasks")


# --------------------------------------------------------------------------- worker side

_ENCODERS: dict[tuple, Any] = {}


def _encoder(cfg: EncodeConfig):
    """The autoencoder for this worker process, loaded once and reused by every shard."""
    import torch

    from pipeline.models import autoencoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
    if device == "cpu":
        dtype = torch.float32 if cfg.precision == "fp16" else dtype
    key = (cfg.vae, device, dtype)
    if key not in _ENCODERS:
        _ENCODERS[key] = autoencoder.load(cfg.vae, cfg.storage.options).to(device, dtype)
    return _ENCODERS[key]


def settings_fingerprint(cfg: EncodeConfig, identity: dict) -> str:
    """What determines the bytes of an output shard; a re-run must match it to reuse a shard."""
    doc = {
        "format": manifest.FORMAT,
        "encoder": identity,
        "resolution": cfg.resolution,
        "crop": cfg.crop,
        "min_size": cfg.min_size,
        "max_pixels": cfg.max_pixels,
        "precision": cfg.precision,
        "latent_dtype": cfg.latent_dtype,
        "tasks": sorted(cfg.tasks),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class _Prepared:
    key: str
    pixels: np.ndarray
    meta: dict
    passthrough: dict[str, bytes]
    views: dict[str, np.ndarray]


def prepare_sample(sample: Sample, cfg: EncodeConfig) -> _Prepared:
    """Decode and preprocess one sample; raises BadImage with the skip reason."""
    from pipeline.models.degrade import task_view_pixels

    img_ext = imaging.image_field(sample.fields)
    if img_ext is None:
        raise imaging.BadImage("no_image", f"fields: {sorted(sample.fields)}")
    im = imaging.decode(sample.fields[img_ext], cfg.max_pixels)
    w, h = im.size
    if min(w, h) < cfg.min_size:
        raise imaging.BadImage("too_small", f"{w}x{h} < min_size {cfg.min_size}")
    rgb, box = imaging.resize_center_crop(imaging.to_rgb(im), cfg.resolution)
    passthrough: dict[str, bytes] = {}
    if "txt" in sample.fields:
        passthrough["txt"] = sample.fields["txt"]
    if "cls" in sample.fields:
        try:
            int(sample.fields["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise imaging.BadImage("bad_class", repr(sample.fields["cls"][:20])) from None
        passthrough["cls"] = sample.fields["cls"]
    meta: dict[str, Any] = {}
    if "json" in sample.fields:
        try:
            loaded = json.loads(sample.fields["json"])
            meta = loaded if isinstance(loaded, dict) else {"source_json": loaded}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {"source_json_invalid": True}
    meta.update(key=sample.key, original_size=[w, h], crop_box=list(box), resolution=cfg.resolution, image_ext=img_ext)
    views = {t: task_view_pixels(t, rgb, sample.key) for t in cfg.tasks}
    return _Prepared(sample.key, imaging.to_tensor_array(rgb), meta, passthrough, views)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _reader(shard_url: str, cfg: EncodeConfig, out: queue.Queue, skips: list[dict]) -> None:
    """Producer thread: stream the tar, decode, and hand over batches of prepared samples."""
    batch: list[_Prepared] = []
    seen = 0
    try:
        with storage.open_read(shard_url, cfg.storage.options) as f:
            for sample in iter_samples(f):
                seen += 1
                if sample.error:
                    skips.append({"key": sample.key or None, "reason": sample.error, "detail": sample.detail})
                    continue
                try:
                    batch.append(prepare_sample(sample, cfg))
                except imaging.BadImage as exc:
                    skips.append({"key": sample.key, "reason": exc.reason, "detail": str(exc)})
                    continue
                if len(batch) >= cfg.batch_size:
                    out.put(batch)
                    batch = []
        if batch:
            out.put(batch)
        out.put(("done", seen))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
        out.put(("error", exc))


def check_owner(cfg: EncodeConfig, fingerprint: str) -> None:
    """Refuse to commit into an output that a run with other settings has taken over since."""
    owner = storage.read_json(storage.join(cfg.output, SETTINGS_NAME), cfg.storage.options)
    if owner.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{storage.redact(cfg.output)} was taken over by an encode run with other settings; "
            "this run stops without committing (use separate outputs for separate settings)"
        )


def encode_shard(cfg: EncodeConfig, shard_url: str, out_url: str, record_url: str, fingerprint: str) -> dict:
    """Encode one shard end to end and commit it; returns the shard record."""
    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    vae = _encoder(cfg)
    np_dtype = np.float16 if cfg.latent_dtype == "float16" else np.float32
    skips: list[dict] = []
    q: queue.Queue = queue.Queue(maxsize=4)
    reader = threading.Thread(target=_reader, args=(shard_url, cfg, q, skips), daemon=True)
    reader.start()
    written = 0
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with TarShardWriter(tmp) as writer, torch.inference_mode():
            while True:
                item = q.get()
                if isinstance(item, tuple):
                    if item[0] == "error":
                        raise item[1]
                    seen = item[1]
                    break
                post = vae.encode(torch.from_numpy(np.stack([p.pixels for p in item])))
                means = post.mean.float().cpu().numpy().astype(np_dtype)
                stds = post.std.float().cpu().numpy().astype(np_dtype) if post.std is not None else None
                view_latents = _encode_views(vae, item, np_dtype)
                for i, p in enumerate(item):
                    fields = {"latent.npy": _npy(means[i])}
                    if stds is not None:
                        fields["std.npy"] = _npy(stds[i])
                    for task, lat in view_latents.items():
                        fields[f"{task}.npy"] = _npy(lat[i])
                    fields.update(p.passthrough)
                    fields["json"] = json.dumps(p.meta, sort_keys=True).encode()
                    writer.write(p.key, fields)
                    written += 1
        tmp.flush()
        size = tmp.tell()
        digest = storage.sha256_file(tmp.name)
        check_owner(cfg, fingerprint)  # settings checked at commit: a concurrent run cannot mix in
        storage.put_file(tmp.name, out_url, cfg.storage.options)
    reader.join()
    reasons = Counter(s["reason"] for s in skips)
    if seen != written + len(skips):  # the invariant every stage keeps
        raise RuntimeError(f"{shard_url}: seen {seen} != written {written} + skipped {len(skips)}")
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    record = {
        "shard": storage.basename(out_url),
        "source": storage.redact(shard_url),
        "node": node,
        "samples": written,
        "bytes": size,
        "sha256": digest,
        "seen": seen,
        "written": written,
        "skipped": dict(reasons),
        "errors": skips,
        "fingerprint": fingerprint,
        "seconds": round(time.time() - t0, 3),
    }
    storage.write_json(record_url, record, cfg.storage.options)
    return record


def _encode_views(vae, batch: list[_Prepared], np_dtype) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for task in batch[0].views if batch else {}:
        post = vae.encode(torch.from_numpy(np.stack([p.views[task] for p in batch])))
        out[task] = post.mean.float().cpu().numpy().astype(np_dtype)
    return out


# --------------------------------------------------------------------------- driver side


def output_name(shard_url: str) -> str:
    name = storage.basename(shard_url)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name + ".tar"


def plan(cfg: EncodeConfig) -> list[tuple[str, str]]:
    """(input URL, output shard name) for every input shard; names must be unique."""
    inputs = storage.expand(cfg.input, cfg.storage.options)
    pairs = [(u, output_name(u)) for u in inputs]
    names = Counter(n for _, n in pairs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ConfigError(f"two input shards map to the same output name {dup[0]!r}; encode them into separate outputs")
    return pairs


def run_encode(cfg: EncodeConfig) -> dict:
    """Run the whole encode job on Ray and return the manifest."""
    import ray

    from pipeline.models import autoencoder
    from pipeline.ray_setup import check_fits, cluster_slots, ensure_ray

    t0 = time.time()
    so = cfg.storage.options
    # pin a training output to its newest checkpoint now, so every shard uses the same weights
    cfg = dataclasses.replace(cfg, vae=checkpoint.latest_checkpoint(cfg.vae, so))
    pairs = plan(cfg)
    vae = autoencoder.load(cfg.vae, so)
    if cfg.resolution % vae.downsample:
        raise ConfigError(
            f"option 'resolution': {cfg.resolution} is not a multiple of the autoencoder's downsampling "
            f"factor {vae.downsample} (try {max(vae.downsample, cfg.resolution // vae.downsample * vae.downsample)})"
        )
    identity = vae.identity
    fingerprint = settings_fingerprint(cfg, identity)
    records_root = storage.join(cfg.output, SHARD_RECORDS)
    storage.probe_writable(cfg.output, so)
    storage.clean_partials(cfg.output)
    _take_output(cfg, fingerprint)

    done: dict[str, dict] = {}
    if not cfg.overwrite:
        existing = set(storage.listdir(cfg.output, so))
        for name in storage.listdir(records_root, so):
            shard = name[: -len(".json")]
            if not name.endswith(".json") or shard not in {n for _, n in pairs}:
                continue
            rec = storage.read_json(storage.join(records_root, name), so)
            if rec.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{storage.redact(cfg.output)} holds shards encoded with other settings "
                    "(encoder, resolution, tasks, ...); use a new output or --overwrite"
                )
            if shard in existing:
                done[shard] = rec
    todo = [(u, n) for u, n in pairs if n not in done]
    if todo:
        storage.remove(storage.join(cfg.output, manifest.MANIFEST_NAME), so)
    log.info(
        f"[encode] {len(pairs)} shards: {len(done)} already done, {len(todo)} to encode -> {storage.redact(cfg.output)}"
    )

    failures: list[str] = []
    if todo:
        ensure_ray(cfg.ray.address)
        check_fits(cpus=cfg.num_cpus, gpus=cfg.num_gpus)
        # GPU tasks default to max_calls=1 (a fresh process per task), which would reload the
        # encoder for every shard; max_calls=0 keeps the worker and its cached encoder.
        remote = ray.remote(max_calls=0, max_retries=3)(encode_shard).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, name="encode_shard"
        )
        limit = cfg.max_in_flight or cluster_slots(cfg.num_cpus, cfg.num_gpus) + 1
        progress = Progress("encode", total=len(pairs), unit="shards", logger=log)
        progress.done = len(done)
        samples = 0
        pending: dict[Any, str] = {}
        queue_ = list(todo)
        while queue_ or pending:
            while queue_ and len(pending) < limit:
                url, name = queue_.pop(0)
                ref = remote.remote(
                    cfg, url, storage.join(cfg.output, name), storage.join(records_root, name + ".json"), fingerprint
                )
                pending[ref] = name
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported, job continues
                    failures.append(name)
                    log.warning(storage.redact(f"[encode] shard {name} failed: {type(exc).__name__}: {str(exc)[:300]}"))
                    continue
                done[name] = rec
                samples += rec["written"]
                elapsed = time.time() - progress.start
                progress.advance(extra=f"samples {samples} ({samples / max(elapsed, 1e-9):.1f}/s)")
    if failures:
        raise JobFailed(
            f"{len(failures)} shard(s) failed ({', '.join(failures[:5])}); re-run the same command to retry them"
        )

    records = [done[n] for _, n in pairs]
    _check_committed(cfg, records, fingerprint)
    latent_shape = [vae.latent_channels, cfg.resolution // vae.downsample, cfg.resolution // vae.downsample]
    man = manifest.build(
        records,
        encoder=identity,
        scale=vae.scale,
        shift=vae.shift,
        latent_shape=latent_shape,
        latent_dtype=cfg.latent_dtype,
        preprocessing={
            "resolution": cfg.resolution,
            "crop": cfg.crop,
            "min_size": cfg.min_size,
            "max_pixels": cfg.max_pixels,
            "rgb_rule": "imaging.to_rgb (EXIF transpose, alpha over white, 16-bit scaled)",
        },
        tasks=list(cfg.tasks),
        config=public_dict(cfg),
    )
    tot = man["totals"]
    if not tot["written"]:  # keep _errors.jsonl for the diagnosis, but no manifest of nothing
        manifest.write_errors(cfg.output, records, so)
        raise JobFailed(
            f"encode: none of the {tot['seen']} samples could be encoded {tot['skipped']}; "
            f"see {storage.redact(storage.join(cfg.output, manifest.ERRORS_NAME))}"
        )
    manifest.write(cfg.output, man, records, so)
    seconds = time.time() - t0
    tot = man["totals"]
    log.info(
        f"[encode] done in {format_seconds(seconds)}: seen {tot['seen']} = written {tot['written']} "
        f"+ skipped {sum(tot['skipped'].values())} {tot['skipped'] or ''}; "
        f"{tot['written'] / max(seconds, 1e-9):.1f} samples/s; "
        f"manifest {storage.redact(storage.join(cfg.output, manifest.MANIFEST_NAME))}"
    )
    skipped = sum(tot["skipped"].values())
    if skipped > cfg.max_error_rate * tot["seen"]:
        raise JobFailed(
            f"encode: {skipped} of {tot['seen']} samples were skipped (more than --max-error-rate "
            f"{cfg.max_error_rate:g}); the dataset is written, see {manifest.ERRORS_NAME}"
        )
    return man


def _take_output(cfg: EncodeConfig, fingerprint: str) -> None:
    """Make this run's settings the owner of the output (``_settings.json``), or refuse when
    another run's settings own it (unless ``--overwrite``)."""
    so = cfg.storage.options
    url = storage.join(cfg.output, SETTINGS_NAME)
    if storage.exists(url, so) and not cfg.overwrite:
        if storage.read_json(url, so).get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{storage.redact(cfg.output)} holds shards encoded with other settings "
                "(encoder, resolution, tasks, ...); use a new output or --overwrite"
            )
        return
    storage.write_json(url, {"fingerprint": fingerprint}, so)


def _check_committed(cfg: EncodeConfig, records: list[dict], fingerprint: str) -> None:
    """Before the manifest: the output still belongs to these settings, and every shard record
    on storage is the one this run holds (no concurrent run replaced a shard)."""
    so = cfg.storage.options
    check_owner(cfg, fingerprint)
    for rec in records:
        stored = storage.read_json(storage.join(cfg.output, SHARD_RECORDS, rec["shard"] + ".json"), so)
        if (stored.get("fingerprint"), stored.get("sha256")) != (fingerprint, rec["sha256"]):
            raise JobFailed(
                f"{storage.redact(cfg.output)}: shard {rec['shard']} was rewritten by another run; "
                "no manifest written (re-run with --overwrite into a folder only this run uses)"
            )
