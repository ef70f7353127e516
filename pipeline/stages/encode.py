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
import math
import os
import queue
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
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
from pipeline.io import buckets, checkpoint, imaging, manifest, storage
from pipeline.io.tarshards import Sample, TarShardWriter, iter_samples
from pipeline.models.degrade import check_task

log = logging.getLogger("pipeline.encode")

SHARD_RECORDS = "_shards"
SETTINGS_NAME = "_settings.json"  # the settings fingerprint that owns this output
PRECISIONS = ("fp32", "fp16", "bf16")
CROPS = ("center",)
DECODERS = ("pil", "torchvision")
# Environment of the encode tasks' worker processes. OpenMP threads that spin-wait after each
# parallel region (libgomp's default) take the cores the decode threads need: with a free
# encoder, 2 decode threads gave 1.28-1.37x one thread with spinning and 1.64-1.65x without, and
# a real encoder's forward measured the same either way (bench/encode.py). A variable set in
# the driver's environment is left to the user.
TASK_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE"}
# Memory order of the encoder's input batch. Convolutions give results that differ in the last
# bits between orders, so it is part of the settings fingerprint.
INPUT_LAYOUT = "channels_last"


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
    text_encoder: list[str] = option(
        [],
        "Hugging Face text encoder folder (model + tokenizer, safetensors weights) to embed each caption with; "
        "repeat the flag for several (e.g. a CLIP and a T5 encoder)",
    )
    caption_field: str = option("", "read the caption from this field of the sample's .json instead of its .txt")
    empty_caption: str = option(
        "embed", "a sample with a missing or empty caption: 'embed' (the empty-caption embedding) or 'skip'"
    )
    text_max_tokens: int = option(
        0, "tokens per caption (0: each encoder's own limit); longer captions are truncated and counted"
    )
    text_hidden_layer: int = option(-1, "hidden states stored: -1 the last layer, -2 the penultimate (SDXL-style)")
    buckets: str = option(
        "",
        "aspect-ratio buckets: empty for square --resolution crops, 'auto' for a table generated from "
        "--bucket-area/--bucket-multiple/--max-aspect, or a JSON file of [width, height] pairs",
    )
    bucket_area: int = option(0, "with buckets: target area in pixels (0: --resolution squared)")
    bucket_multiple: int = option(
        64, "with buckets: sides are multiples of this (autoencoder downsampling x denoiser patch/level multiple)"
    )
    max_aspect: float = option(4.0, "with buckets: skip images whose long side exceeds this many short sides")
    flip: bool = option(False, "also store the latent of the horizontally flipped image (latent_flip.npy)")
    decode_threads: int = option(
        0, "image decode threads per task (0: one per --num-cpus); the outputs do not depend on it"
    )
    decoder: str = option(
        "pil",
        "JPEG decoder: 'pil' (Pillow on the decode threads, Lanczos resize) or 'torchvision' (batched "
        "decode_jpeg on the encoder's device: nvjpeg on CUDA, antialiased bicubic resize there; other "
        "formats still use Pillow; part of the settings fingerprint)",
    )
    jpeg_draft: bool = option(
        True,
        "decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain when at least twice the target size "
        "(several times faster, slightly different pixels; part of the settings fingerprint)",
    )
    ray: RayOptions = group(RayOptions, private=True)
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "input", "output", "vae")
        self.input, self.output, self.vae = (storage.absolute(u) for u in (self.input, self.output, self.vae))
        self.text_encoder = [storage.absolute(u) for u in self.text_encoder]
        if self.buckets not in ("", "auto"):
            self.buckets = storage.absolute(self.buckets)
        others = {"input": self.input, "vae": self.vae}
        if self.buckets not in ("", "auto"):
            others["buckets"] = self.buckets
        storage.check_separate(self.output, others)
        for url in self.text_encoder:
            storage.check_separate(self.output, {"text-encoder": url})
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
        check_choice("empty_caption", self.empty_caption, ("embed", "skip"))
        if len(set(self.text_encoder)) != len(self.text_encoder):
            raise ConfigError("option 'text-encoder' lists the same encoder twice")
        if (self.caption_field or self.empty_caption != "embed") and not self.text_encoder:
            raise ConfigError("options 'caption-field' and 'empty-caption' need --text-encoder")
        check_range("text_max_tokens", self.text_max_tokens, 0, 1_000_000)
        check_range("text_hidden_layer", self.text_hidden_layer, -1000, -1)
        check_range("bucket_area", self.bucket_area, 0, 8192 * 8192)
        check_range("bucket_multiple", self.bucket_multiple, 1, 8192)
        check_range("max_aspect", self.max_aspect, 1.0, 100.0)
        check_range("decode_threads", self.decode_threads, 0, 256)
        check_choice("decoder", self.decoder, DECODERS)
        if self.decoder != "pil" and self.tasks:
            raise ConfigError("option 'decoder torchvision' cannot be combined with 'tasks' (views need Pillow)")
        if self.buckets and self.tasks:
            raise ConfigError("option 'buckets' cannot be combined with 'tasks' (task views are square crops)")


# --------------------------------------------------------------------------- worker side

_ENCODERS: dict[tuple, Any] = {}
_TEXT_ENCODERS: dict[tuple, Any] = {}


def _device_dtype(precision: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device == "cpu":
        dtype = torch.float32 if precision == "fp16" else dtype
    return device, dtype


def _encoder(cfg: EncodeConfig):
    """The autoencoder for this worker process, loaded once and reused by every shard."""
    from pipeline.models import autoencoder

    device, dtype = _device_dtype(cfg.precision)
    key = (cfg.vae, device, dtype)
    if key not in _ENCODERS:
        _ENCODERS[key] = autoencoder.load(cfg.vae, cfg.storage.options).to(device, dtype)
    return _ENCODERS[key]


def _text_encoders(cfg: EncodeConfig) -> list:
    """The text encoders for this worker process, in ``--text-encoder`` order, loaded once."""
    device, dtype = _device_dtype(cfg.precision)
    key = (tuple(cfg.text_encoder), device, dtype, cfg.text_max_tokens, cfg.text_hidden_layer)
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = [te.to(device, dtype) for te in _load_text_encoders(cfg)]
    return _TEXT_ENCODERS[key]


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


@dataclass
class EncodePlan:
    """What the driver decided and every task must share: the settings fingerprint, the bucket
    table (None: square crops at ``resolution``) and the text encoders' field names."""

    fingerprint: str
    buckets: list[tuple[int, int]] | None
    text_names: list[str]


def settings_fingerprint(
    cfg: EncodeConfig, identity: dict, table: list[tuple[int, int]] | None = None, text: list[dict] | None = None
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
        if text
        else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class _Prepared:
    key: str
    size: tuple[int, int]  # (width, height) of the crop that is encoded
    pixels: Any  # (H, W, 3) uint8, numpy; a device tensor from the device decoder; None before it
    meta: dict
    passthrough: dict[str, bytes]
    views: dict[str, np.ndarray]
    caption: str | None  # None: no text encoders
    jpeg: bytes | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass
class _Batch:
    """Prepared samples of one size, with their pixels stacked by the reader thread (so the
    thread that runs the encoder does not copy them); ``pixels`` is None when some are left
    to the device decoder."""

    items: list[_Prepared]
    pixels: np.ndarray | None


def _batch(items: list[_Prepared]) -> _Batch:
    ready = all(isinstance(p.pixels, np.ndarray) for p in items)
    return _Batch(items, np.stack([p.pixels for p in items]) if ready else None)


def _caption(sample: Sample, meta: dict, cfg: EncodeConfig) -> str:
    """The sample's caption by the documented rule; raises BadImage to skip it."""
    if cfg.caption_field:
        if meta.get("source_json_invalid"):
            raise imaging.BadImage("bad_caption", "the sample's .json is not valid JSON (--caption-field)")
        value = meta.get(cfg.caption_field)
        if value is not None and not isinstance(value, str):
            raise imaging.BadImage("bad_caption", f"json field {cfg.caption_field!r} is {type(value).__name__}")
        text = value or ""
    else:
        try:
            text = sample.fields.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise imaging.BadImage("bad_caption", "caption is not UTF-8") from None
    text = text.strip()
    if not text and cfg.empty_caption == "skip":
        raise imaging.BadImage("no_caption", "missing or empty caption (--empty-caption skip)")
    return text


def prepare_sample(sample: Sample, cfg: EncodeConfig, table: list[tuple[int, int]] | None = None) -> _Prepared:
    """Decode and preprocess one sample; raises BadImage with the skip reason."""
    from pipeline.models.degrade import task_view_pixels

    img_ext = imaging.image_field(sample.fields)
    if img_ext is None:
        raise imaging.BadImage("no_image", f"fields: {sorted(sample.fields)}")
    chosen: list[tuple[int, int]] = []

    def plan(w: int, h: int) -> tuple[int, int] | None:
        """Pick the target size from the header; the decode size the crop needs (draft)."""
        if min(w, h) < cfg.min_size:
            raise imaging.BadImage("too_small", f"{w}x{h} < min_size {cfg.min_size}")
        if table:
            if buckets.aspect(w, h) > cfg.max_aspect:
                raise imaging.BadImage(
                    "aspect_out_of_range", f"{w}x{h} is {buckets.aspect(w, h):.2f}:1 > --max-aspect {cfg.max_aspect:g}"
                )
            size = buckets.nearest(table, w, h)
        else:
            size = (cfg.resolution, cfg.resolution)
        chosen.append(size)
        if not cfg.jpeg_draft or cfg.decoder != "pil":
            return None
        left, top, right, bottom = imaging.center_crop_box(w, h, size)
        s = max(size[0] / (right - left), size[1] / (bottom - top))
        return math.ceil(w * s), math.ceil(h * s)

    data = sample.fields[img_ext]
    if cfg.decoder == "torchvision" and imaging.is_jpeg(data):
        w, h = imaging.header_size(data, cfg.max_pixels)
        plan(w, h)
        rgb, box = None, imaging.center_crop_box(w, h, chosen[0])
    else:
        im, (w, h) = imaging.decode_for(data, cfg.max_pixels, plan)
        rgb, box = imaging.resize_cover(imaging.to_rgb(im), chosen[0], (w, h))
    size = chosen[0]
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
    caption = _caption(sample, meta, cfg) if cfg.text_encoder else None
    meta.update(key=sample.key, original_size=[w, h], crop_box=list(box), resolution=cfg.resolution, image_ext=img_ext)
    if table:
        meta["bucket"] = list(size)
    if rgb is None:
        return _Prepared(sample.key, size, None, meta, passthrough, {}, caption, data, box)
    views = {t: task_view_pixels(t, rgb, sample.key) for t in cfg.tasks}
    # uint8 until the batch is on the encoder's device: a quarter of the bytes to copy and move
    return _Prepared(sample.key, size, np.array(rgb), meta, passthrough, views, caption)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_threads(cfg: EncodeConfig) -> int:
    return cfg.decode_threads or max(1, int(cfg.num_cpus))


def _reader(
    shard_url: str, cfg: EncodeConfig, table: list[tuple[int, int]] | None, out: queue.Queue, skips: list[dict]
) -> None:
    """Producer thread: stream the tar, decode on a pool of threads (Pillow releases the GIL
    while decoding and resizing), and hand over batches of prepared samples of one size.

    Samples are taken in tar order whatever the number of threads, so outputs do not depend on it.
    """
    pending: dict[tuple[int, int], list[_Prepared]] = {}
    seen = 0
    threads = decode_threads(cfg)

    def take(sample: Sample, job) -> None:
        if job is None:
            skips.append({"key": sample.key or None, "reason": sample.error, "detail": sample.detail})
            return
        try:
            p = job.result()
        except imaging.BadImage as exc:
            skips.append({"key": sample.key, "reason": exc.reason, "detail": str(exc)})
            return
        batch = pending.setdefault(p.size, [])
        batch.append(p)
        if len(batch) >= cfg.batch_size:
            out.put(_batch(pending.pop(p.size)))

    try:
        with (
            storage.open_read(shard_url, cfg.storage.options) as f,
            ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool,
        ):
            window: deque = deque()
            for sample in iter_samples(f):
                seen += 1
                job = None if sample.error else pool.submit(prepare_sample, sample, cfg, table)
                window.append((sample, job))
                while len(window) > 2 * threads:
                    take(*window.popleft())
            while window:
                take(*window.popleft())
        for size in sorted(pending):
            out.put(_batch(pending[size]))
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


def _device_decode(batch: list[_Prepared], device, skips: list[dict]) -> list[_Prepared]:
    """Decode the batch's JPEGs left to the device (nvjpeg on CUDA) in one call, crop and
    resize there (antialiased bicubic); a JPEG that fails is skipped as ``corrupt_image``."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    def decode_jpeg(data, **kw):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return _decode_jpeg(data, **kw)

    todo = [p for p in batch if p.pixels is None]
    if not todo:
        return batch
    datas = [torch.frombuffer(bytearray(p.jpeg or b""), dtype=torch.uint8) for p in todo]
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batched call: find it one by one
        images = []
        for d in datas:
            try:
                images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError as exc:
                images.append(exc)
    failed = set()
    for p, im in zip(todo, images):
        if isinstance(im, Exception):
            skips.append({"key": p.key, "reason": "corrupt_image", "detail": f"decode_jpeg: {str(im)[:120]}"})
            failed.add(p.key)
            continue
        left, top, right, bottom = p.box
        x = im[None, :, top:bottom, left:right].float()
        x = torch.nn.functional.interpolate(x, size=(p.size[1], p.size[0]), mode="bicubic", antialias=True)
        p.pixels = x[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0)
    return [p for p in batch if p.key not in failed]


def _latent_arrays(vae, batch: _Batch, np_dtype, flip: bool) -> tuple[list[dict[str, np.ndarray]], list[str | None]]:
    """Per sample of a batch (one size): its latent arrays by field name, and the first field
    that holds NaN or Inf (None when all are finite; checked on the whole batch at once)."""
    import torch

    items, n = batch.items, len(batch.items)
    if batch.pixels is not None:
        u8 = torch.from_numpy(batch.pixels).to(vae.device)
    else:  # some pixels come from the device decoder
        u8 = torch.stack([torch.as_tensor(p.pixels).to(vae.device) for p in items])
    # (N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the same arithmetic as imaging.to_tensor_array,
    # kept in the pixels' own channels-last memory order (INPUT_LAYOUT): no transposing copy, and
    # the encoder's convolutions ran 1.5x faster on it than on NCHW memory (bench/encode.py)
    x = u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip:  # one forward pass for the images and their mirror images (a flip is exact on pixels)
        x = torch.cat([x, x.flip(-1)])
    post = vae.encode(x)
    means = post.mean.float().cpu().numpy().astype(np_dtype)
    stds = post.std.float().cpu().numpy().astype(np_dtype) if post.std is not None else None
    fields = {"latent.npy": means[:n]}
    if stds is not None:
        fields["std.npy"] = stds[:n]
    if len(means) > n:
        fields["latent_flip.npy"] = means[n:]
        if stds is not None:
            fields["std_flip.npy"] = stds[n:]
    for task in items[0].views:
        post = vae.encode(torch.from_numpy(np.stack([p.views[task] for p in items])))
        fields[f"{task}.npy"] = post.mean.float().cpu().numpy().astype(np_dtype)
    bad: list[str | None] = [None] * n
    for name, arr in fields.items():
        for i in np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(1)):
            bad[i] = bad[i] or name
    return [{name: arr[i] for name, arr in fields.items()} for i in range(n)], bad


def _text_arrays(encoders: list, names: list[str], batch: list[_Prepared]) -> list[tuple[dict[str, np.ndarray], dict]]:
    """Per sample, its caption embeddings by field name and the token counts for its .json."""
    rows: list[tuple[dict[str, np.ndarray], dict]] = [({}, {}) for _ in batch]
    for te, name in zip(encoders, names):
        for (arrays, info), emb in zip(rows, te.encode([p.caption or "" for p in batch])):
            arrays[f"text_{name}.npy"] = emb.hidden
            if emb.pooled is not None:
                arrays[f"pooled_{name}.npy"] = emb.pooled
            info[name] = {"tokens": int(emb.hidden.shape[0]), "truncated": emb.truncated}
    return rows


def encode_shard(cfg: EncodeConfig, shard_url: str, out_url: str, record_url: str, plan: EncodePlan) -> dict:
    """Encode one shard end to end and commit it; returns the shard record."""
    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    vae = _encoder(cfg)
    texts = _text_encoders(cfg)
    np_dtype = np.float16 if cfg.latent_dtype == "float16" else np.float32
    skips: list[dict] = []
    sizes: Counter[str] = Counter()
    empty_captions = 0
    truncated: Counter[str] = Counter()
    q: queue.Queue = queue.Queue(maxsize=4)
    reader = threading.Thread(target=_reader, args=(shard_url, cfg, plan.buckets, q, skips), daemon=True)
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
                if cfg.decoder != "pil":
                    item = _Batch(_device_decode(item.items, vae.device, skips), None)
                    if not item.items:
                        continue
                latents, non_finite = _latent_arrays(vae, item, np_dtype, cfg.flip)
                batch = item.items
                text = _text_arrays(texts, plan.text_names, batch) if texts else [({}, {})] * len(batch)
                for p, arrays, bad, (text_arrays, text_info) in zip(batch, latents, non_finite, text):
                    bad_text = next((k for k, a in text_arrays.items() if not np.isfinite(a).all()), None)
                    if bad or bad_text:
                        reason = "non_finite_latent" if bad else "non_finite_text"
                        skips.append({"key": p.key, "reason": reason, "detail": f"{bad or bad_text} has NaN or Inf"})
                        continue
                    fields = {k: _npy(a) for k, a in {**arrays, **text_arrays}.items()}
                    fields.update(p.passthrough)
                    meta = dict(p.meta)
                    if texts:
                        meta["text"] = text_info
                        empty_captions += not p.caption
                        truncated.update({name: int(info["truncated"]) for name, info in text_info.items()})
                    fields["json"] = json.dumps(meta, sort_keys=True).encode()
                    writer.write(p.key, fields)
                    sizes[buckets.name(p.size)] += 1
                    written += 1
        tmp.flush()
        size = tmp.tell()
        digest = storage.sha256_file(tmp.name)
        check_owner(cfg, plan.fingerprint)  # settings checked at commit: a concurrent run cannot mix in
        storage.put_file(tmp.name, out_url, cfg.storage.options)
    reader.join()
    reasons = Counter(s["reason"] for s in skips)
    if seen != written + len(skips):  # the invariant every stage keeps
        raise RuntimeError(f"{shard_url}: seen {seen} != written {written} + skipped {len(skips)}")
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    record = {
        "shard": storage.basename(out_url),
        "source": storage.public_url(shard_url),
        "node": node,
        "samples": written,
        "bytes": size,
        "sha256": digest,
        "seen": seen,
        "written": written,
        "skipped": dict(reasons),
        "errors": skips,
        "fingerprint": plan.fingerprint,
        "seconds": round(time.time() - t0, 3),
    }
    if plan.buckets:
        record["buckets"] = dict(sorted(sizes.items()))
    if texts:
        record["captions"] = {"empty": empty_captions, "truncated": {n: truncated[n] for n in plan.text_names}}
    storage.write_json(record_url, record, cfg.storage.options)
    return record


# --------------------------------------------------------------------------- driver side


def task_options(cfg: EncodeConfig) -> dict[str, Any]:
    """Ray options of an encode task: its resources, and :data:`TASK_ENV_VARS` not set by the user."""
    env = {k: v for k, v in TASK_ENV_VARS.items() if k not in os.environ}
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "name": "encode_shard"}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


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
    identity = vae.identity
    table = _bucket_table(cfg, vae.downsample)
    texts = _describe_text_encoders(cfg) if cfg.text_encoder else []
    text_names = text_field_names([t.model_type for t in texts])
    text_docs: list[dict[str, Any]] = [{"name": n, "identity": t.identity} for n, t in zip(text_names, texts)]
    plan_ = EncodePlan(settings_fingerprint(cfg, identity, table, text_docs), table, text_names)
    fingerprint = plan_.fingerprint
    records_root = storage.join(cfg.output, SHARD_RECORDS)
    storage.probe_writable(cfg.output, so)
    storage.clean_partials(cfg.output)
    _take_output(cfg, fingerprint)
    empty = _write_empty_captions(cfg, [t.empty for t in texts], text_names)

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
                    "(autoencoder, text encoders, resolution, buckets, tasks, ...); use a new output or --overwrite"
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
        remote = ray.remote(max_calls=0, max_retries=3)(encode_shard).options(**task_options(cfg))
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
                    cfg, url, storage.join(cfg.output, name), storage.join(records_root, name + ".json"), plan_
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
    down, ch = vae.downsample, vae.latent_channels
    man = manifest.build(
        records,
        encoder=identity,
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
        text_encoders=[
            {
                **doc,
                "source": te.source,
                "field": f"text_{doc['name']}.npy",
                "pooled_field": f"pooled_{doc['name']}.npy" if te.identity["pooled_width"] else None,
                "empty_caption": empty[doc["name"]],
            }
            for doc, te in zip(text_docs, texts)
        ],
        captions={"field": cfg.caption_field or "txt", "empty": cfg.empty_caption},
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


def _load_text_encoders(cfg: EncodeConfig) -> list:
    """Load each text encoder (on a worker: see :func:`_text_encoders`)."""
    from pipeline.models.text import TextEncoder

    return [
        TextEncoder(u, cfg.storage.options, max_tokens=cfg.text_max_tokens, hidden_layer=cfg.text_hidden_layer)
        for u in cfg.text_encoder
    ]


@dataclass
class _TextEncoderFacts:
    """What the driver needs of a text encoder: its type and identity (for the fingerprint) and
    its empty-caption embedding (stored once for classifier-free guidance)."""

    model_type: str
    identity: dict
    source: str  # where it was loaded from (credentials redacted)
    empty: Any  # text.Embedding of ""


def _text_encoder_facts(cfg: EncodeConfig) -> list[_TextEncoderFacts]:
    """Runs on a worker: load (and keep, for that worker's shards) the text encoders on the
    encode tasks' device and precision, so the empty caption is embedded as samples are."""
    return [_TextEncoderFacts(te.model_type, te.identity, te.source, te.encode([""])[0]) for te in _text_encoders(cfg)]


def _describe_text_encoders(cfg: EncodeConfig) -> list[_TextEncoderFacts]:
    """The text encoders' facts, from a Ray task with the encode tasks' resources: the driver
    never holds a text encoder (a T5-XXL is tens of GB), and a wrong folder still fails in one
    line before any shard starts."""
    import ray

    from pipeline.ray_setup import check_fits, ensure_ray

    ensure_ray(cfg.ray.address)
    check_fits(cpus=cfg.num_cpus, gpus=cfg.num_gpus)
    # the encode tasks' own options, environment included: the same worker pool, so the worker
    # that loaded the encoders here keeps them for its shards
    options = {**task_options(cfg), "name": "describe_text_encoders"}
    remote = ray.remote(max_calls=0, max_retries=0)(_text_encoder_facts).options(**options)
    try:
        return ray.get(remote.remote(cfg))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (checkpoint.CheckpointError, ConfigError)):  # a wrong folder or option: one line
            raise exc.cause from None
        raise


EMPTY_CAPTION_DIR = "_empty_caption"


def _write_empty_captions(cfg: EncodeConfig, empties: list, names: list[str]) -> dict[str, dict]:
    """Store each encoder's empty-caption embedding (what classifier-free guidance trains the
    unconditional case on) under ``_empty_caption/``; returns the file names per encoder."""
    out: dict[str, dict] = {}
    for emb, name in zip(empties, names):
        files: dict[str, Any] = {"hidden": f"{EMPTY_CAPTION_DIR}/text_{name}.npy", "tokens": int(emb.hidden.shape[0])}
        storage.write_bytes(storage.join(cfg.output, files["hidden"]), _npy(emb.hidden), cfg.storage.options)
        if emb.pooled is not None:
            files["pooled"] = f"{EMPTY_CAPTION_DIR}/pooled_{name}.npy"
            storage.write_bytes(storage.join(cfg.output, files["pooled"]), _npy(emb.pooled), cfg.storage.options)
        out[name] = files
    return out


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
