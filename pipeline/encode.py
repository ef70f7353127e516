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
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import checkpoint, imaging, manifest, storage
from .config import ConfigError, option, to_dict
from .progress import Progress, format_seconds
from .tarshards import Sample, TarShardWriter, iter_samples

SHARD_RECORDS = "_shards"
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
    tasks: list[str] = option([], "restoration task views to add, e.g. upscale2,upscale4,restore")
    ray_address: str = option("", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    storage_options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)")

    def __post_init__(self) -> None:
        for name in ("input", "output", "vae"):
            if not getattr(self, name):
                raise ConfigError(f"option {name!r} is required")
        if self.resolution < 8:
            raise ConfigError("option 'resolution' must be >= 8")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"option 'precision' must be one of {PRECISIONS}")
        if self.latent_dtype not in ("float16", "float32"):
            raise ConfigError("option 'latent_dtype' must be float16 or float32")
        if self.crop not in CROPS:
            raise ConfigError(f"option 'crop' must be one of {CROPS}")
        if self.batch_size < 1 or self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError("options 'batch_size' and 'num_cpus' must be positive, 'num_gpus' >= 0")
        from .degrade import TASKS  # the task registry lives with the degradations

        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"option 'tasks': unknown task {bad[0]!r}; choose from {sorted(TASKS)}")


# --------------------------------------------------------------------------- worker side

_ENCODERS: dict[tuple, Any] = {}


def _encoder(cfg: EncodeConfig):
    """The autoencoder for this worker process, loaded once and reused by every shard."""
    import torch

    from . import autoencoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
    if device == "cpu":
        dtype = torch.float32 if cfg.precision == "fp16" else dtype
    key = (cfg.vae, device, dtype)
    if key not in _ENCODERS:
        _ENCODERS[key] = autoencoder.load(cfg.vae, cfg.storage_options).to(device, dtype)
    return _ENCODERS[key]


def settings_fingerprint(cfg: EncodeConfig, identity: dict) -> str:
    """What determines the bytes of an output shard; a re-run must match it to reuse a shard."""
    doc = {"format": manifest.FORMAT, "encoder": identity, "resolution": cfg.resolution,
           "crop": cfg.crop, "min_size": cfg.min_size, "max_pixels": cfg.max_pixels,
           "precision": cfg.precision, "latent_dtype": cfg.latent_dtype, "tasks": sorted(cfg.tasks)}
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
    from .degrade import task_view_pixels

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
    meta.update(key=sample.key, original_size=[w, h], crop_box=list(box), resolution=cfg.resolution,
                image_ext=img_ext)
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
        with storage.open_read(shard_url, cfg.storage_options) as f:
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
        storage.put_file(tmp.name, out_url, cfg.storage_options)
    reader.join()
    reasons = Counter(s["reason"] for s in skips)
    if seen != written + len(skips):  # the invariant every stage keeps
        raise RuntimeError(f"{shard_url}: seen {seen} != written {written} + skipped {len(skips)}")
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    record = {"shard": storage.basename(out_url), "source": storage.redact(shard_url), "node": node,
              "samples": written, "bytes": size, "sha256": digest, "seen": seen, "written": written,
              "skipped": dict(reasons), "errors": skips, "fingerprint": fingerprint,
              "seconds": round(time.time() - t0, 3)}
    storage.write_json(record_url, record, cfg.storage_options)
    return record


def _encode_views(vae, batch: list[_Prepared], np_dtype) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for task in (batch[0].views if batch else {}):
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
    inputs = storage.expand(cfg.input, cfg.storage_options)
    pairs = [(u, output_name(u)) for u in inputs]
    names = Counter(n for _, n in pairs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ConfigError(f"two input shards map to the same output name {dup[0]!r}; "
                          "encode them into separate outputs")
    return pairs


def run_encode(cfg: EncodeConfig, log=print) -> dict:
    """Run the whole encode job on Ray and return the manifest."""
    import ray

    from . import autoencoder
    from .ray_setup import cluster_slots, ensure_ray

    t0 = time.time()
    so = cfg.storage_options
    # pin a training output to its newest checkpoint now, so every shard uses the same weights
    cfg = dataclasses.replace(cfg, vae=checkpoint.latest_checkpoint(cfg.vae, so))
    pairs = plan(cfg)
    vae = autoencoder.load(cfg.vae, so)
    identity = vae.identity
    fingerprint = settings_fingerprint(cfg, identity)
    records_root = storage.join(cfg.output, SHARD_RECORDS)
    storage.clean_partials(cfg.output)

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
                    "(encoder, resolution, tasks, ...); use a new output or --overwrite")
            if shard in existing:
                done[shard] = rec
    todo = [(u, n) for u, n in pairs if n not in done]
    if todo:
        storage.remove(storage.join(cfg.output, manifest.MANIFEST_NAME), so)
    log(f"[encode] {len(pairs)} shards: {len(done)} already done, {len(todo)} to encode "
        f"-> {storage.redact(cfg.output)}")

    failures: list[str] = []
    if todo:
        ensure_ray(cfg.ray_address)
        # GPU tasks default to max_calls=1 (a fresh process per task), which would reload the
        # encoder for every shard; max_calls=0 keeps the worker and its cached encoder.
        remote = ray.remote(max_calls=0, max_retries=3)(encode_shard).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, name="encode_shard")
        limit = cfg.max_in_flight or cluster_slots(cfg.num_cpus, cfg.num_gpus) + 1
        progress = Progress("encode", total=len(pairs), unit="shards", log=log)
        progress.done = len(done)
        samples = 0
        pending: dict[Any, str] = {}
        queue_ = list(todo)
        while queue_ or pending:
            while queue_ and len(pending) < limit:
                url, name = queue_.pop(0)
                ref = remote.remote(cfg, url, storage.join(cfg.output, name),
                                    storage.join(records_root, name + ".json"), fingerprint)
                pending[ref] = name
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported, job continues
                    failures.append(name)
                    log(f"[encode] shard {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                done[name] = rec
                samples += rec["written"]
                elapsed = time.time() - progress.start
                progress.advance(extra=f"samples {samples} ({samples / max(elapsed, 1e-9):.1f}/s)")
    if failures:
        raise RuntimeError(f"{len(failures)} shard(s) failed ({', '.join(failures[:5])}); "
                           "re-run the same command to retry them")

    records = [done[n] for _, n in pairs]
    latent_shape = [vae.latent_channels, cfg.resolution // vae.downsample, cfg.resolution // vae.downsample]
    man = manifest.build(records, encoder=identity, scale=vae.scale, shift=vae.shift,
                         latent_shape=latent_shape, latent_dtype=cfg.latent_dtype,
                         preprocessing={"resolution": cfg.resolution, "crop": cfg.crop,
                                        "min_size": cfg.min_size, "max_pixels": cfg.max_pixels,
                                        "rgb_rule": "imaging.to_rgb (EXIF transpose, alpha over white, 16-bit scaled)"},
                         tasks=list(cfg.tasks), config=_public_config(cfg))
    manifest.write(cfg.output, man, records, so)
    seconds = time.time() - t0
    tot = man["totals"]
    log(f"[encode] done in {format_seconds(seconds)}: seen {tot['seen']} = written {tot['written']} "
        f"+ skipped {sum(tot['skipped'].values())} {tot['skipped'] or ''}; "
        f"{tot['written'] / max(seconds, 1e-9):.1f} samples/s; "
        f"manifest {storage.redact(storage.join(cfg.output, manifest.MANIFEST_NAME))}")
    return man


def _public_config(cfg: EncodeConfig) -> dict:
    """The config as recorded in the manifest: never storage options (credentials)."""
    d = to_dict(cfg)
    d.pop("storage_options", None)
    d.pop("ray_address", None)
    return d
