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

This module is the driver side: the options, the shard plan, the settings that own an output,
running the tasks and writing the manifest. The task that encodes one shard, and everything it
runs in its worker process, is :mod:`pipeline.stages.encode_worker`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    ConfigError,
    JobFailed,
    RayOptions,
    StorageOptions,
    check_limits,
    group,
    option,
    public_dict,
    require,
)
from pipeline.console import Progress, format_seconds
from pipeline.errors import UserError
from pipeline.io import buckets, checkpoint, imaging, manifest, storage
from pipeline.io.tarshards import expand_shards
from pipeline.models.degrade import RESTORE_TASKS
from pipeline.stages.encode_captions import (
    BASE_TEXT_NAME,
    describe_base,
    describe_text_encoders,
    text_field_names,
    write_base_empty,
    write_empty_captions,
)
from pipeline.stages.encode_worker import (
    SETTINGS_NAME,
    EncodePlan,
    check_owner,
    encode_shard,
    task_options,
)

log = logging.getLogger("pipeline.encode")

SHARD_RECORDS = "_shards"
PRECISIONS = ("fp32", "fp16", "bf16")
CROPS = ("center",)
DECODERS = ("pil", "torchvision")
# Memory order of the encoder's input batch. Convolutions give results that differ in the last
# bits between orders, so it is part of the settings fingerprint.
INPUT_LAYOUT = "channels_last"


@dataclass
class EncodeConfig:
    input: str = option("", "input image shards: URL, brace range {000000..000127} or glob; comma-separated list")
    output: str = option("", "output folder/prefix for latent shards and _manifest.json")
    vae: str = option("", "autoencoder directory (built-in checkpoint or diffusers AutoencoderKL)")
    base: str = option(
        "",
        "a diffusers pipeline folder (SD 1.x/2.x, SDXL, PixArt, SD3) as the base model: its autoencoder, text "
        "encoders and tokenizers encode the images and captions exactly as the pipeline conditions on them "
        "(instead of --vae and --text-encoder)",
    )
    resolution: int = option(
        256, "square training resolution: shorter side resized, then centre-cropped", range=(8, 8192)
    )
    min_size: int = option(32, "skip images whose shorter side is below this many pixels", range=(1, None))
    max_pixels: int = option(
        imaging.DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression bombs)", range=(1, None)
    )
    crop: str = option("center", "crop policy", choices=CROPS)
    batch_size: int = option(32, "images per encoder forward pass", range=(1, 65536))
    precision: str = option("fp32", "encoder precision (fp16/bf16 on GPU)", choices=PRECISIONS)
    latent_dtype: str = option("float16", "stored latent dtype", choices=("float16", "float32"))
    num_cpus: float = option(1.0, "CPUs per encode task", range=(0, 1024), lo_open=True)
    num_gpus: float = option(0.0, "GPUs per encode task (fractional allowed, e.g. 0.25)", range=(0, 64))
    max_in_flight: int = option(
        0, "shards encoding at once (0: as many as the cluster fits, plus one)", range=(0, None)
    )
    overwrite: bool = option(False, "redo every shard even when its output exists")
    max_error_rate: float = option(
        0.5, "exit non-zero (dataset kept) when more than this share of samples is skipped", range=(0, 1)
    )
    tasks: list[str] = option(
        [],
        "restoration task views to add (comma-separated; inpaint: a generated hole per sample, the view its "
        "biharmonic fill, plus the hole at the latent grid)",
        choices=RESTORE_TASKS,
        noun="task",
    )
    text_encoder: list[str] = option(
        [],
        "Hugging Face text encoder folder (model + tokenizer, safetensors weights) to embed each caption with; "
        "repeat the flag for several (e.g. a CLIP and a T5 encoder)",
    )
    caption_field: str = option("", "read the caption from this field of the sample's .json instead of its .txt")
    empty_caption: str = option(
        "embed",
        "a sample with a missing or empty caption: 'embed' (the empty-caption embedding) or 'skip'",
        choices=("embed", "skip"),
    )
    text_max_tokens: int = option(
        0,
        "tokens per caption (0: each encoder's own limit); longer captions are truncated and counted",
        range=(0, 1_000_000),
    )
    text_hidden_layer: int = option(
        -1, "hidden states stored: -1 the last layer, -2 the penultimate (SDXL-style)", range=(-1000, -1)
    )
    buckets: str = option(
        "",
        "aspect-ratio buckets: empty for square --resolution crops, 'auto' for a table generated from "
        "--bucket-area/--bucket-multiple/--max-aspect, or a JSON file of [width, height] pairs",
    )
    bucket_area: int = option(
        0, "with buckets: target area in pixels (0: --resolution squared)", range=(0, 8192 * 8192)
    )
    bucket_multiple: int = option(
        64,
        "with buckets: sides are multiples of this (autoencoder downsampling x denoiser patch/level multiple)",
        range=(1, 8192),
    )
    max_aspect: float = option(
        4.0, "with buckets: skip images whose long side exceeds this many short sides", range=(1, 100)
    )
    flip: bool = option(False, "also store the latent of the horizontally flipped image (latent_flip.npy)")
    decode_threads: int = option(
        0, "image decode threads per task (0: one per --num-cpus); the outputs do not depend on it", range=(0, 256)
    )
    decoder: str = option(
        "pil",
        "JPEG decoder: 'pil' (Pillow on the decode threads, Lanczos resize) or 'torchvision' (batched "
        "decode_jpeg on the encoder's device: nvjpeg on CUDA, antialiased bicubic resize there; other "
        "formats still use Pillow; part of the settings fingerprint)",
        choices=DECODERS,
    )
    jpeg_draft: bool = option(
        True,
        "decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain when at least twice the target size "
        "(several times faster, slightly different pixels; part of the settings fingerprint)",
    )
    ray: RayOptions = group(RayOptions, private=True)
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        if self.base:
            for name, value in (("vae", self.vae), ("text-encoder", self.text_encoder)):
                if value:
                    raise ConfigError(
                        f"option 'base' cannot be combined with {name!r}: the autoencoder, text encoders and "
                        "tokenizers all come from the base folder"
                    )
            if self.text_max_tokens or self.text_hidden_layer != -1:
                name = "text-max-tokens" if self.text_max_tokens else "text-hidden-layer"
                raise ConfigError(f"option {name!r} cannot be combined with 'base': the pipeline decides it")
            require(self, "input", "output", "base")
            self.base = storage.absolute(self.base)
        else:
            require(self, "input", "output", "vae")
        self.input, self.output = storage.absolute(self.input), storage.absolute(self.output)
        self.vae = storage.absolute(self.vae) if self.vae else ""
        self.text_encoder = [storage.absolute(u) for u in self.text_encoder]
        if self.buckets not in ("", "auto"):
            self.buckets = storage.absolute(self.buckets)
        others = {"input": self.input, **({"base": self.base} if self.base else {"vae": self.vae})}
        if self.buckets not in ("", "auto"):
            others["buckets"] = self.buckets
        storage.check_separate(self.output, others)
        for url in self.text_encoder:
            storage.check_separate(self.output, {"text-encoder": url})
        check_limits(self)
        if len(set(self.text_encoder)) != len(self.text_encoder):
            raise ConfigError("option 'text-encoder' lists the same encoder twice")
        if (self.caption_field or self.empty_caption != "embed") and not self.has_text:
            name = "caption-field" if self.caption_field else "empty-caption"
            raise ConfigError(f"option {name!r} needs --text-encoder or --base")
        if self.decoder != "pil" and self.tasks:
            raise ConfigError("option 'decoder torchvision' cannot be combined with 'tasks' (views need Pillow)")
        if self.buckets and self.tasks:
            raise ConfigError("option 'buckets' cannot be combined with 'tasks' (task views are square crops)")

    @property
    def has_text(self) -> bool:
        """Whether captions are embedded (by --text-encoder or by the --base pipeline's encoders)."""
        return bool(self.text_encoder or self.base)


def settings_fingerprint(
    cfg: EncodeConfig,
    identity: dict,
    table: list[tuple[int, int]] | None = None,
    text: list[dict] | None = None,
    base: dict | None = None,
) -> str:
    """What determines the bytes of an output shard; a re-run must match it to reuse a shard."""
    doc = {
        "format": manifest.FORMAT,
        "encoder": identity,
        "input_layout": INPUT_LAYOUT,
        "resolution": cfg.resolution,
        "crop": cfg.crop,
        "min_size": cfg.min_size,
        "max_pixels": cfg.max_pixels,
        "precision": cfg.precision,
        "latent_dtype": cfg.latent_dtype,
        "tasks": sorted(cfg.tasks),
        "jpeg_draft": cfg.jpeg_draft and cfg.decoder == "pil",
        "decoder": cfg.decoder,
        "flip": cfg.flip,
        "buckets": {"table": [list(s) for s in table], "max_aspect": cfg.max_aspect} if table else None,
        "text": {"encoders": text, "caption_field": cfg.caption_field, "empty_caption": cfg.empty_caption}
        if text or base
        else None,
    }
    if base:
        doc["base"] = base
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- driver side


def output_name(shard_url: str) -> str:
    name = storage.basename(shard_url)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name + ".tar"


def shard_pairs(cfg: EncodeConfig) -> list[tuple[str, str]]:
    """(input URL, output shard name) for every input shard; names must be unique."""
    inputs = expand_shards(cfg.input, cfg.storage.options, option="input")
    pairs = [(u, output_name(u)) for u in inputs]
    names = Counter(n for _, n in pairs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ConfigError(f"two input shards map to the same output name {dup[0]!r}; encode them into separate outputs")
    return pairs


def run_encode(cfg: EncodeConfig) -> dict:
    """Run the whole encode job on Ray and return the manifest."""
    from pipeline.models import autoencoder, base_model

    t0 = time.time()
    so = cfg.storage.options
    # pin a training output to its newest checkpoint now, so every shard uses the same weights
    if cfg.vae:
        cfg = dataclasses.replace(cfg, vae=checkpoint.latest_checkpoint(cfg.vae, so))
    pairs = shard_pairs(cfg)
    base = base_model.inspect(cfg.base, so) if cfg.base else None  # checked here, no network loaded
    vae = autoencoder.load(base_model.vae_url(base) if base else cfg.vae, so)
    if base:
        vae.source = storage.public_url(storage.join(cfg.base, "vae"))
    table = _bucket_table(cfg, vae.downsample)
    texts = describe_text_encoders(cfg) if cfg.text_encoder else []
    text_names = text_field_names([t.model_type for t in texts])
    text_docs: list[dict[str, Any]] = [{"name": n, "identity": t.identity} for n, t in zip(text_names, texts)]
    base_identity = base.identity if base else None
    if base:
        text_names = [BASE_TEXT_NAME]
    fingerprint = settings_fingerprint(cfg, vae.identity, table, text_docs, base_identity)
    encode_plan = EncodePlan(fingerprint, table, text_names)
    base_empty = describe_base(cfg) if base else None  # on a worker: the driver never loads a text encoder
    storage.probe_writable(cfg.output, so)
    storage.clean_partials(cfg.output)
    _take_output(cfg, encode_plan.fingerprint)
    empty = write_empty_captions(cfg, [t.empty for t in texts], text_names) if not base else {}
    base_entry = write_base_empty(cfg, base, base_identity, base_empty) if base else None

    done = {} if cfg.overwrite else _shards_done(cfg, pairs, encode_plan.fingerprint)
    todo = [(u, n) for u, n in pairs if n not in done]
    if todo:
        storage.remove(storage.join(cfg.output, manifest.MANIFEST_NAME), so)
    log.info(
        f"[encode] {len(pairs)} shards: {len(done)} already done, {len(todo)} to encode -> {storage.redact(cfg.output)}"
    )
    if todo:
        done.update(_encode_shards(cfg, todo, len(pairs), len(done), encode_plan))

    records = [done[n] for _, n in pairs]
    _check_committed(cfg, records, encode_plan.fingerprint)
    text_entries = [
        {
            **doc,
            "source": te.source,
            "field": f"text_{doc['name']}.npy",
            "pooled_field": f"pooled_{doc['name']}.npy" if te.identity["pooled_width"] else None,
            "empty_caption": empty[doc["name"]],
        }
        for doc, te in zip(text_docs, texts)
    ]
    man = _build_manifest(cfg, vae, table, records, text_entries, base_entry)
    _write_manifest(cfg, man, records, time.time() - t0)
    return man


def _shards_done(cfg: EncodeConfig, pairs: list[tuple[str, str]], fingerprint: str) -> dict[str, dict]:
    """The records of the shards a previous run committed with these settings (by output name);
    a record of other settings is refused."""
    so = cfg.storage.options
    records_root = storage.join(cfg.output, SHARD_RECORDS)
    wanted = {n for _, n in pairs}
    existing = set(storage.listdir(cfg.output, so))
    done: dict[str, dict] = {}
    for name in storage.listdir(records_root, so):
        shard = name[: -len(".json")]
        if not name.endswith(".json") or shard not in wanted:
            continue
        rec = storage.read_json(storage.join(records_root, name), so)
        if rec.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{storage.redact(cfg.output)} holds shards encoded with other settings "
                "(autoencoder, text encoders, resolution, buckets, tasks, ...); use a new output or --overwrite"
            )
        if shard in existing:
            done[shard] = rec
    return done


def _encode_shards(
    cfg: EncodeConfig, todo: list[tuple[str, str]], total: int, already: int, encode_plan: EncodePlan
) -> dict[str, dict]:
    """Run one encode task per shard of ``todo``, at most ``--max-in-flight`` at once, with
    progress; returns the records by shard name, or raises JobFailed naming the failed shards."""
    import ray

    from pipeline.ray_setup import check_fits, cluster_slots, ensure_ray

    ensure_ray(cfg.ray.address)
    check_fits(cpus=cfg.num_cpus, gpus=cfg.num_gpus)
    # GPU tasks default to max_calls=1 (a fresh process per task), which would reload the
    # encoder for every shard; max_calls=0 keeps the worker and its cached encoder.
    remote = ray.remote(max_calls=0, max_retries=3)(encode_shard).options(**task_options(cfg))
    limit = cfg.max_in_flight or cluster_slots(cfg.num_cpus, cfg.num_gpus) + 1
    progress = Progress("encode", total=total, unit="shards", logger=log)
    progress.done = already
    records_root = storage.join(cfg.output, SHARD_RECORDS)
    done: dict[str, dict] = {}
    failures: list[str] = []
    samples = 0
    running: dict[Any, str] = {}
    waiting = list(todo)
    while waiting or running:
        while waiting and len(running) < limit:
            url, name = waiting.pop(0)
            out_url, record_url = storage.join(cfg.output, name), storage.join(records_root, name + ".json")
            running[remote.remote(cfg, url, out_url, record_url, encode_plan)] = name
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            name = running.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported, job continues unless no shard can succeed
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, UserError) or _disk_full(cause):
                    # another run took the output over, or the disk is full: no other shard can commit
                    for other in running:
                        ray.cancel(other)
                    raise cause from None
                failures.append(name)
                first = (str(cause).strip().splitlines() or [""])[0][:300]
                log.warning(storage.redact(f"[encode] shard {name} failed: {type(cause).__name__}: {first}"))
                continue
            done[name] = rec
            samples += rec["written"]
            elapsed = time.time() - progress.start
            progress.advance(extra=f"samples {samples} ({samples / max(elapsed, 1e-9):.1f}/s)")
    if failures:
        raise JobFailed(
            f"{len(failures)} shard(s) failed ({', '.join(failures[:5])}); re-run the same command to retry them"
        )
    return done


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _build_manifest(
    cfg: EncodeConfig,
    vae: Any,
    table: list[tuple[int, int]] | None,
    records: list[dict],
    text_entries: list[dict],
    base: dict | None = None,
) -> dict:
    down, ch = vae.downsample, vae.latent_channels
    return manifest.build(
        records,
        encoder=vae.identity,
        scale=vae.scale,
        shift=vae.shift,
        latent_shape=None if table else [ch, cfg.resolution // down, cfg.resolution // down],
        latent_dtype=cfg.latent_dtype,
        preprocessing={
            "resolution": cfg.resolution,
            "crop": cfg.crop,
            "min_size": cfg.min_size,
            "max_pixels": cfg.max_pixels,
            "jpeg_draft": cfg.jpeg_draft,
            "rgb_rule": "imaging.to_rgb (EXIF transpose, alpha over white, 16-bit scaled)",
        },
        tasks=list(cfg.tasks),
        config=public_dict(cfg),
        buckets=[{"size": list(b), "latent_shape": [ch, b[1] // down, b[0] // down]} for b in table] if table else None,
        max_aspect=cfg.max_aspect if table else None,
        flip=cfg.flip,
        text_encoders=text_entries,
        captions={"field": cfg.caption_field or "txt", "empty": cfg.empty_caption},
        base=base,
    )


def _write_manifest(cfg: EncodeConfig, man: dict, records: list[dict], seconds: float) -> None:
    """Write ``_errors.jsonl`` and the manifest (none when nothing was written), print the
    summary, and fail the job when more than ``--max-error-rate`` of the samples were skipped."""
    so = cfg.storage.options
    tot = man["totals"]
    if not tot["written"]:  # keep _errors.jsonl for the diagnosis, but no manifest of nothing
        manifest.write_errors(cfg.output, records, so)
        raise JobFailed(
            f"encode: none of the {tot['seen']} samples could be encoded {tot['skipped']}; "
            f"see {storage.redact(storage.join(cfg.output, manifest.ERRORS_NAME))}"
        )
    manifest.write(cfg.output, man, records, so)
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


def _bucket_table(cfg: EncodeConfig, downsample: int) -> list[tuple[int, int]] | None:
    """The bucket table of this run (None: square crops), checked against the autoencoder."""
    if not cfg.buckets:
        if cfg.resolution % downsample:
            raise ConfigError(
                f"option 'resolution': {cfg.resolution} is not a multiple of the autoencoder's downsampling "
                f"factor {downsample} (try {max(downsample, cfg.resolution // downsample * downsample)})"
            )
        return None
    if cfg.bucket_multiple % downsample:
        raise ConfigError(
            f"option 'bucket-multiple': {cfg.bucket_multiple} is not a multiple of the autoencoder's "
            f"downsampling factor {downsample}"
        )
    try:
        if cfg.buckets == "auto":
            return buckets.generate(cfg.bucket_area or cfg.resolution**2, cfg.bucket_multiple, cfg.max_aspect)
        data = storage.read_bytes(cfg.buckets, cfg.storage.options)
        return buckets.parse(data, cfg.bucket_multiple, storage.redact(cfg.buckets), cfg.max_aspect)
    except buckets.BucketError as exc:
        raise ConfigError(f"option 'buckets': {exc}") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise ConfigError(
            f"option 'buckets': cannot read {storage.redact(cfg.buckets)} ({type(exc).__name__})"
        ) from None


def _take_output(cfg: EncodeConfig, fingerprint: str) -> None:
    """Make this run's settings the owner of the output (``_settings.json``), or refuse when
    another run's settings own it (unless ``--overwrite``)."""
    so = cfg.storage.options
    url = storage.join(cfg.output, SETTINGS_NAME)
    if storage.exists(url, so) and not cfg.overwrite:
        if storage.read_json(url, so).get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{storage.redact(cfg.output)} holds shards encoded with other settings "
                "(autoencoder, text encoders, resolution, buckets, tasks, ...); use a new output or --overwrite"
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
