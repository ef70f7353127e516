"""``latent-pipeline shards SRC OUT``: pack images into img2dataset-layout WebDataset shards.

SRC is a folder tree of images (local or any fsspec URL) or a ``.txt`` file listing image
paths/URLs, one per line. Each image becomes one sample:

* ``<key>.<ext>``: the original bytes, not re-encoded (``jpeg`` is stored as ``jpg``);
* ``<key>.json``: ``{"key", "path", "width", "height"}`` (path relative to SRC);
* ``<key>.txt``: the caption from a sidecar ``<name>.txt`` next to the image, when present;
* ``<key>.cls``: the class id, when ``class_from`` is set (``folder``: the first folder of the
  relative path, ids by sorted folder name; or a JSON file mapping folder or path to an id).

Keys are stable: the relative path without extension, with unsafe characters replaced and
``/`` written as ``__`` (a short hash is appended when two files would share a key).
Files that are not readable images are skipped and recorded in ``_errors.jsonl``; ``_index.json``
lists the shards and the counts (seen = written + skipped).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from . import imaging, storage
from .config import ConfigError, option
from .progress import Progress
from .tarshards import TarShardWriter

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass
class ShardsConfig:
    src: str = option("", "folder of images, or a .txt file listing image paths/URLs")
    out: str = option("", "output folder/prefix for shard-NNNNNN.tar files")
    samples_per_shard: int = option(1000, "samples per output shard")
    class_from: str = option("", "'' (no classes), 'folder', or a JSON file mapping folder/path -> id")
    max_pixels: int = option(imaging.DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression bombs)")
    storage_options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)")

    def __post_init__(self) -> None:
        if not self.src:
            raise ConfigError("option 'src' is required: a folder of images or a .txt list")
        if not self.out:
            raise ConfigError("option 'out' is required: where the shards go")
        if self.samples_per_shard < 1:
            raise ConfigError("option 'samples_per_shard' must be >= 1")


def make_key(rel_path: str) -> str:
    stem = rel_path.rsplit(".", 1)[0]
    return "__".join(_UNSAFE.sub("_", seg).strip("_") or "_" for seg in stem.split("/"))


def list_images(cfg: ShardsConfig) -> tuple[list[tuple[str, str]], set[str]]:
    """(url, relative path) of each image under SRC, sorted by relative path, and the set of
    every file name under SRC (for caption sidecars; empty for a ``.txt`` list)."""
    so = cfg.storage_options
    if cfg.src.endswith(".txt"):
        lines = storage.read_bytes(cfg.src, so).decode("utf-8").splitlines()
        urls = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        return [(u, storage.basename(u)) for u in urls], set()
    files = storage.list_files(cfg.src, storage_options=so)
    return [(u, r) for u, r in files if r.lower().endswith(imaging.IMAGE_SUFFIXES)], {r for _, r in files}


def _class_map(cfg: ShardsConfig, rels: list[str]) -> dict[str, int] | None:
    if not cfg.class_from:
        return None
    if cfg.class_from == "folder":
        folders = sorted({r.split("/")[0] for r in rels if "/" in r})
        return {f: i for i, f in enumerate(folders)}
    mapping = storage.read_json(cfg.class_from, cfg.storage_options)
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise ConfigError("option 'class_from': the JSON file must map names to integer ids")
    return mapping


def _lookup_class(mapping: dict[str, int], rel: str) -> int | None:
    if rel in mapping:
        return mapping[rel]
    return mapping.get(rel.split("/")[0]) if "/" in rel else None


def run_shards(cfg: ShardsConfig, log=print) -> dict:
    """Pack the images; returns the ``_index.json`` content."""
    t0 = time.time()
    so = cfg.storage_options
    images, all_names = list_images(cfg)
    if not images:
        raise FileNotFoundError(f"no images found in {storage.redact(cfg.src)}")
    classes = _class_map(cfg, [r for _, r in images])

    keys: Counter[str] = Counter(make_key(r) for _, r in images)
    errors: list[dict] = []
    shards: list[dict] = []
    written = 0
    progress = Progress("shards", total=len(images), unit="images", log=log)
    batch: list[tuple[str, dict[str, bytes]]] = []

    def flush() -> None:
        nonlocal batch
        if not batch:
            return
        name = f"shard-{len(shards):06d}.tar"
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            with TarShardWriter(tmp) as w:
                for key, fields in batch:
                    w.write(key, fields)
            tmp.flush()
            storage.put_file(tmp.name, storage.join(cfg.out, name), so)
            shards.append({"name": name, "samples": len(batch), "bytes": tmp.tell(),
                           "sha256": storage.sha256_file(tmp.name)})
        batch = []

    for url, rel in images:
        progress.advance()
        try:
            data = storage.read_bytes(url, so)
            im = _probe(data, cfg.max_pixels)
        except imaging.BadImage as exc:
            errors.append({"path": rel, "reason": exc.reason, "detail": str(exc)})
            continue
        key = make_key(rel)
        if keys[key] > 1:
            key = f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        ext = rel.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
        meta = {"key": key, "path": rel, "width": im.width, "height": im.height}
        fields: dict[str, bytes] = {ext: data}
        caption_rel = rel.rsplit(".", 1)[0] + ".txt"
        if caption_rel in all_names:
            fields["txt"] = storage.read_bytes(storage.join(cfg.src, caption_rel), so)
        if classes is not None:
            cls = _lookup_class(classes, rel)
            if cls is not None:
                fields["cls"] = str(cls).encode()
                meta["class"] = cls
        fields["json"] = json.dumps(meta, sort_keys=True).encode()
        batch.append((key, fields))
        written += 1
        if len(batch) >= cfg.samples_per_shard:
            flush()
    flush()

    reasons = Counter(e["reason"] for e in errors)
    index = {"format": "image-shards/1", "shards": shards, "classes": classes,
             "totals": {"seen": len(images), "written": written, "skipped": dict(reasons)},
             "seconds": round(time.time() - t0, 3)}
    storage.write_bytes(storage.join(cfg.out, "_errors.jsonl"),
                        "".join(json.dumps(e) + "\n" for e in errors).encode(), so)
    storage.write_json(storage.join(cfg.out, "_index.json"), index, so)
    assert index["totals"]["seen"] == written + sum(reasons.values())
    log(f"[shards] {written} images in {len(shards)} shards, {sum(reasons.values())} skipped "
        f"{dict(reasons) or ''} -> {storage.redact(cfg.out)}")
    return index


def _probe(data: bytes, max_pixels: int) -> Image.Image:
    """Check that bytes are an image within the pixel limit, without decoding pixels."""
    if not data:
        raise imaging.BadImage("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any failure to identify is the same skip
        raise imaging.BadImage("not_an_image") from None
    if im.width * im.height > max_pixels:
        raise imaging.BadImage("decompression_bomb", f"{im.width}x{im.height}")
    return im
