"""The worker side of ``encode``: the Ray task that encodes one image shard into one latent
shard and commits it (:func:`encode_shard`), and what it needs in its process.

Inside a task, a reader thread streams the tar and decodes images on a pool of threads while
the main thread runs the encoder on full batches, so download, decode and compute overlap. The
autoencoder and text encoders are loaded once per worker process and reused by every shard it
encodes. The driver side (options, planning, the manifest) is :mod:`pipeline.stages.encode`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.io import buckets, imaging, storage
from pipeline.io.tarshards import Sample, TarShardWriter, iter_samples, npy_bytes

if TYPE_CHECKING:
    from pipeline.stages.encode import EncodeConfig

SETTINGS_NAME = "_settings.json"  # the settings fingerprint that owns an output
# Environment of the encode tasks' worker processes. OpenMP threads that spin-wait after each
# parallel region (libgomp's default) take the cores the decode threads need, while a real
# encoder's forward is as fast without spinning (bench/encode.py measures both; the figures are
# in docs/benchmarks.md). A variable set in the driver's environment is left to the user.
TASK_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE"}

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
    key = (cfg.vae, cfg.base, device, dtype)
    if key not in _ENCODERS:
        if cfg.base:
            from pipeline.models import base_model

            url = base_model.vae_url(base_model.inspect(cfg.base, cfg.storage.options))
        else:
            url = cfg.vae
        _ENCODERS[key] = autoencoder.load(url, cfg.storage.options).to(device, dtype)
    return _ENCODERS[key]


def _base_text(cfg: EncodeConfig) -> Any:
    """The ``--base`` pipeline's text encoders (a base_model.BaseText) for this worker process,
    loaded once; None without ``--base``."""
    if not cfg.base:
        return None
    from pipeline.models.base_model import BaseText

    device, dtype = _device_dtype(cfg.precision)
    key = ("base", cfg.base, device, dtype)
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = BaseText(cfg.base, cfg.storage.options).to(device, dtype)
    return _TEXT_ENCODERS[key]


def base_empty_caption(cfg: EncodeConfig) -> Any:
    """Runs on a worker: the base's empty caption as its pipeline embeds it for guidance."""
    return _base_text(cfg).empty()


def _text_encoders(cfg: EncodeConfig) -> list:
    """The text encoders for this worker process, in ``--text-encoder`` order, loaded once."""
    device, dtype = _device_dtype(cfg.precision)
    key = (tuple(cfg.text_encoder), device, dtype, cfg.text_max_tokens, cfg.text_hidden_layer)
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = [te.to(device, dtype) for te in _load_text_encoders(cfg)]
    return _TEXT_ENCODERS[key]


@dataclass
class EncodePlan:
    """What the driver decided and every task must share: the settings fingerprint, the bucket
    table (None: square crops at ``resolution``) and the text encoders' field names."""

    fingerprint: str
    buckets: list[tuple[int, int]] | None
    text_names: list[str]


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

    def choose_size(w: int, h: int) -> tuple[int, int] | None:
        """Pick the target size from the header; returns the decode size the crop needs (draft)."""
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
        choose_size(w, h)
        rgb, box = None, imaging.center_crop_box(w, h, chosen[0])
    else:
        im, (w, h) = imaging.decode_for(data, cfg.max_pixels, choose_size)
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
    caption = _caption(sample, meta, cfg) if cfg.has_text else None
    meta.update(key=sample.key, original_size=[w, h], crop_box=list(box), resolution=cfg.resolution, image_ext=img_ext)
    if table:
        meta["bucket"] = list(size)
    if rgb is None:
        return _Prepared(sample.key, size, None, meta, passthrough, {}, caption, data, box)
    views = {t: task_view_pixels(t, rgb, sample.key) for t in cfg.tasks}
    # uint8 until the batch is on the encoder's device: a quarter of the bytes to copy and move
    return _Prepared(sample.key, size, np.array(rgb), meta, passthrough, views, caption)


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
    # kept in the pixels' own channels-last memory order (encode.INPUT_LAYOUT): no transposing
    # copy, and CPU convolutions are faster on it than on NCHW memory (bench/encode.py)
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


def _base_arrays(base: Any, name: str, batch: list[_Prepared]) -> list[tuple[dict[str, np.ndarray], dict]]:
    """Per sample, the base pipeline's conditioning by field name and its counts for the .json."""
    rows: list[tuple[dict[str, np.ndarray], dict]] = []
    for emb in base.encode([p.caption or "" for p in batch]):
        tokens = int(emb.mask.sum()) if emb.mask is not None else int(emb.prompt_embeds.shape[0])
        rows.append((emb.arrays(), {name: {"tokens": tokens, "truncated": emb.truncated}}))
    return rows


def encode_shard(cfg: EncodeConfig, shard_url: str, out_url: str, record_url: str, plan: EncodePlan) -> dict:
    """Encode one shard end to end and commit it; returns the shard record."""
    import torch

    t0 = time.time()
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    vae = _encoder(cfg)
    texts = _text_encoders(cfg) if cfg.text_encoder else []
    base = _base_text(cfg)
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
                if base is not None:
                    text = _base_arrays(base, plan.text_names[0], batch)
                else:
                    text = _text_arrays(texts, plan.text_names, batch) if texts else [({}, {})] * len(batch)
                for p, arrays, bad, (text_arrays, text_info) in zip(batch, latents, non_finite, text):
                    bad_text = next((k for k, a in text_arrays.items() if not np.isfinite(a).all()), None)
                    if bad or bad_text:
                        reason = "non_finite_latent" if bad else "non_finite_text"
                        skips.append({"key": p.key, "reason": reason, "detail": f"{bad or bad_text} has NaN or Inf"})
                        continue
                    fields = {k: npy_bytes(a) for k, a in {**arrays, **text_arrays}.items()}
                    fields.update(p.passthrough)
                    meta = dict(p.meta)
                    if cfg.has_text:
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
    if cfg.has_text:
        record["captions"] = {"empty": empty_captions, "truncated": {n: truncated[n] for n in plan.text_names}}
    storage.write_json(record_url, record, cfg.storage.options)
    return record


def _load_text_encoders(cfg: EncodeConfig) -> list:
    """Load each text encoder (on a worker: see :func:`_text_encoders`)."""
    from pipeline.models.text import TextEncoder

    return [
        TextEncoder(u, cfg.storage.options, max_tokens=cfg.text_max_tokens, hidden_layer=cfg.text_hidden_layer)
        for u in cfg.text_encoder
    ]


@dataclass
class TextEncoderFacts:
    """What the driver needs of a text encoder: its type and identity (for the fingerprint) and
    its empty-caption embedding (stored once for classifier-free guidance)."""

    model_type: str
    identity: dict
    source: str  # where it was loaded from (credentials redacted)
    empty: Any  # text.Embedding of ""


def text_encoder_facts(cfg: EncodeConfig) -> list[TextEncoderFacts]:
    """Runs on a worker: load (and keep, for that worker's shards) the text encoders on the
    encode tasks' device and precision, so the empty caption is embedded as samples are."""
    return [TextEncoderFacts(te.model_type, te.identity, te.source, te.encode([""])[0]) for te in _text_encoders(cfg)]


def task_options(cfg: EncodeConfig) -> dict[str, Any]:
    """Ray options of an encode task: its resources, and :data:`TASK_ENV_VARS` not set by the user."""
    env = {k: v for k, v in TASK_ENV_VARS.items() if k not in os.environ}
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "name": "encode_shard"}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options
