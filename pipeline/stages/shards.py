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
import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.config import ConfigError, JobFailed, StorageOptions, check_limits, group, option, require
from pipeline.console import Progress
from pipeline.io import imaging, storage
from pipeline.io.tarshards import TarShardWriter

log = logging.getLogger("pipeline.shards")
INDEX_NAME, ERRORS_NAME = "_index.json", "_errors.jsonl"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass
class ShardsConfig:
    src: str = option("", "folder of images, or a .txt file listing image paths/URLs")
    out: str = option("", "output folder/prefix for shard-NNNNNN.tar files")
    samples_per_shard: int = option(1000, "samples per output shard", range=(1, None))
    class_from: str = option("", "'' (no classes), 'folder', or a JSON file mapping folder/path -> id")
    max_pixels: int = option(
        imaging.DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression bombs)", range=(1, None)
    )
    overwrite: bool = option(False, "replace the shards of an earlier run in OUT")
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "src", "out")
        self.src, self.out = storage.absolute(self.src), storage.absolute(self.out)
        if self.class_from and self.class_from != "folder":
            self.class_from = storage.absolute(self.class_from)
        check_limits(self)
        src_root = self.src.rsplit("/", 1)[0] if self.src.endswith(".txt") else self.src
        storage.check_separate(self.out, {"src": src_root}, option="out")


def make_key(rel_path: str) -> str:
    stem = rel_path.rsplit(".", 1)[0]
    return "__".join(_UNSAFE.sub("_", seg).strip("_") or "_" for seg in stem.split("/"))


def list_images(cfg: ShardsConfig) -> tuple[list[tuple[str, str]], set[str], list[dict]]:
    """(url, relative path) of each image under SRC, sorted by relative path; the set of every
    file name under SRC (for caption sidecars; empty for a ``.txt`` list); and error rows for
    the files that are neither an allowed image nor a caption sidecar (counted, not dropped)."""
    so = cfg.storage.options
    if cfg.src.endswith(".txt"):
        try:
            lines = storage.read_bytes(cfg.src, so).decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"option 'src': {storage.redact(cfg.src)} is not a UTF-8 list of image paths") from None
        urls = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        images = [(storage.absolute(u), storage.basename(u)) for u in urls]
        refused = [
            {"path": r, "reason": "not_an_allowed_image_format", "detail": ""}
            for _, r in images
            if not r.lower().endswith(imaging.IMAGE_SUFFIXES)
        ]
        return [(u, r) for u, r in images if r.lower().endswith(imaging.IMAGE_SUFFIXES)], set(), refused
    listed = storage.list_files(cfg.src, storage_options=so, hidden=True)
    refused = [{"path": r, "reason": "hidden_file", "detail": ""} for _, r in listed if storage.is_hidden(r)]
    files = [(u, r) for u, r in listed if not storage.is_hidden(r)]
    names = {r for _, r in files}
    images = [(u, r) for u, r in files if r.lower().endswith(imaging.IMAGE_SUFFIXES)]
    image_stems = {r.rsplit(".", 1)[0] for _, r in images}
    refused += [
        {"path": r, "reason": "not_an_allowed_image_format", "detail": f"allowed: {', '.join(imaging.IMAGE_EXTS)}"}
        for _, r in files
        if not r.lower().endswith(imaging.IMAGE_SUFFIXES)
        and not (r.endswith(".txt") and r.rsplit(".", 1)[0] in image_stems)
    ]
    return images, names, refused


def _class_map(cfg: ShardsConfig, rels: list[str]) -> dict[str, int] | None:
    if not cfg.class_from:
        return None
    if cfg.class_from == "folder":
        folders = sorted({r.split("/")[0] for r in rels if "/" in r})
        return {f: i for i, f in enumerate(folders)}
    mapping = storage.read_json(cfg.class_from, cfg.storage.options)
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise ConfigError("option 'class_from': the JSON file must map names to integer ids")
    return mapping


def _lookup_class(mapping: dict[str, int], rel: str) -> int | None:
    if rel in mapping:
        return mapping[rel]
    return mapping.get(rel.split("/")[0]) if "/" in rel else None


def _prepare_output(cfg: ShardsConfig) -> None:
    """Refuse to mix with an earlier run's shards, unless ``--overwrite`` (which removes them)."""
    so = cfg.storage.options
    earlier = [
        n
        for n in storage.listdir(cfg.out, so)
        if (n.startswith("shard-") and n.endswith(".tar")) or n in (INDEX_NAME, ERRORS_NAME)
    ]
    if earlier and not cfg.overwrite:
        raise ConfigError(
            f"option 'out': {storage.redact(cfg.out)} already holds shards of an earlier run; "
            "choose an empty folder or pass --overwrite to replace them"
        )
    for name in earlier:
        storage.remove(storage.join(cfg.out, name), so)
    storage.clean_partials(cfg.out)
    storage.probe_writable(cfg.out, so)


def run_shards(cfg: ShardsConfig) -> dict:
    """Pack the images; returns the ``_index.json`` content."""
    t0 = time.time()
    so = cfg.storage.options
    images, all_names, refused = list_images(cfg)
    if not images and not refused:
        raise FileNotFoundError(f"no images found in {storage.redact(cfg.src)}")
    classes = _class_map(cfg, [r for _, r in images])
    _prepare_output(cfg)

    keys: Counter[str] = Counter(make_key(r) for _, r in images)
    errors: list[dict] = list(refused)
    shards: list[dict] = []
    written = 0
    # every input counts, the ones refused up front (formats, names) too: they are done already
    progress = Progress("shards", total=len(images) + len(refused), unit="images", logger=log)
    progress.done = len(refused)
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
            shards.append(
                {"name": name, "samples": len(batch), "bytes": tmp.tell(), "sha256": storage.sha256_file(tmp.name)}
            )
        batch = []

    for url, rel in images:
        progress.advance()
        try:
            data = storage.read_bytes(url, so)
            im = _probe(data, cfg.max_pixels)
        except imaging.BadImage as exc:
            errors.append({"path": rel, "reason": exc.reason, "detail": str(exc)})
            continue
        except OSError as exc:  # unreadable (permissions, a vanished file, ...): an error row
            errors.append(
                {"path": rel, "reason": "unreadable", "detail": storage.redact(f"{type(exc).__name__}: {exc}")[:200]}
            )
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
    index: dict[str, Any] = {
        "format": "image-shards/1",
        "shards": shards,
        "classes": classes,
        "totals": {"seen": len(images) + len(refused), "written": written, "skipped": dict(reasons)},
        "seconds": round(time.time() - t0, 3),
    }
    storage.write_bytes(storage.join(cfg.out, ERRORS_NAME), "".join(json.dumps(e) + "\n" for e in errors).encode(), so)
    storage.write_json(storage.join(cfg.out, INDEX_NAME), index, so)
    if index["totals"]["seen"] != written + sum(reasons.values()):
        raise RuntimeError(f"shards: seen != written + skipped: {index['totals']}")
    log.info(
        f"[shards] {written} images in {len(shards)} shards, {sum(reasons.values())} skipped "
        f"{dict(reasons) or ''} -> {storage.redact(cfg.out)}"
    )
    if not written:
        raise JobFailed(
            f"shards: none of the {index['totals']['seen']} files was a usable image; "
            f"see {storage.redact(storage.join(cfg.out, ERRORS_NAME))}"
        )
    return index


def _probe(data: bytes, max_pixels: int) -> Image.Image:
    """Check that bytes are an image within the pixel limit, without decoding pixels."""
    if not data:
        raise imaging.BadImage("empty_file")
    try:
        im = Image.open(io.BytesIO(data), formats=imaging.ALLOWED_FORMATS)
    except Exception:  # noqa: BLE001 - any failure to identify is the same skip
        raise imaging.BadImage("not_an_image") from None
    if im.width * im.height > max_pixels:
        raise imaging.BadImage("decompression_bomb", f"{im.width}x{im.height}")
    return im
