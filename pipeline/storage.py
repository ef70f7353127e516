"""The one module that touches storage: local paths and fsspec URLs (s3://, gs://, file://, ...).

Every stage reads and writes through these functions, so that retries, atomic commits,
URL expansion and credential handling live in one place.

* S3-compatible endpoints are configured the standard way (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...) or with ``storage_options``
  (the ``--storage-options`` JSON), passed straight to the fsspec filesystem.
* Writes are atomic: an output appears under its final name only when complete
  (a local file is written beside its target under a hidden ``.part`` name and renamed;
  an object-store upload is a single PUT / multipart upload that commits on completion).
* Transient errors (connection resets, timeouts, throttling) are retried with exponential
  backoff; "not found" and "permission denied" are not.
* Credentials never appear in messages: :func:`redact` strips them from URLs and
  storage options are never formatted into errors or logs.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from braceexpand import braceexpand

T = TypeVar("T")

PART_SUFFIX = ".part"
_GLOB_CHARS = re.compile(r"[*?\[]")
_CRED_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


class StorageError(RuntimeError):
    """A storage operation failed after retries, with the URL (credentials redacted)."""


def redact(url: str) -> str:
    """Remove ``user:password@`` from a URL so it can be logged."""
    return _CRED_IN_URL.sub(r"\g<scheme>***@", str(url))


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than ``file``."""
    proto = fsspec.utils.get_protocol(str(url))
    return proto not in ("file", "local")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with ``/``."""
    out = str(base)
    for p in parts:
        out = out.rstrip("/") + "/" + str(p).lstrip("/")
    return out


def basename(url: str) -> str:
    return posixpath.basename(str(url).rstrip("/"))


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fs, path)`` for ``url``; ``storage_options`` go to the fsspec filesystem."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path


def _unstrip(fs, url: str, path: str) -> str:
    """Turn a path returned by ``fs`` back into a URL of the same scheme as ``url``."""
    if not is_remote(url):
        return path
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------- retries

_TRANSIENT_NAMES = ("Timeout", "Throttl", "SlowDown", "ServiceUnavailable", "InternalError",
                    "ConnectionError", "EndpointConnectionError", "ReadTimeout", "ClientOSError",
                    "ServerDisconnected", "IncompleteRead", "ProtocolError", "RequestTimeTooSkewed")


def is_transient(exc: BaseException) -> bool:
    """Whether an exception is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        ValueError, TypeError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = type(exc).__name__ + " " + str(exc)[:200]
    return any(name in text for name in _TRANSIENT_NAMES) or " 503" in text or " 500" in text


def retry(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2,
          max_delay: float = 10.0) -> T:
    """Call ``fn`` and retry transient failures with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- listing

def expand(patterns: str | list[str], storage_options: dict[str, Any] | None = None,
           *, must_exist: bool = True) -> list[str]:
    """Expand shard specs into a sorted, de-duplicated list of URLs.

    Each pattern may use brace ranges (``shard-{000000..000127}.tar``), globs (``*``, ``?``,
    ``[..]``) or name a single file. A comma-separated string is several patterns. A pattern
    that matches nothing raises ``FileNotFoundError`` naming it (when ``must_exist``).
    """
    if isinstance(patterns, str):
        patterns = [p for p in (s.strip() for s in patterns.split(",")) if p] \
            if "{" not in patterns else [patterns]
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if _GLOB_CHARS.search(url):
                fs, path = filesystem(url, storage_options)
                found = sorted(retry(lambda: fs.glob(path), what=f"glob {redact(url)}"))
                found = [f for f in found if not basename(f).startswith(".")]
                if not found and must_exist:
                    raise FileNotFoundError(f"no files match {redact(url)!r}")
                out.extend(_unstrip(fs, url, f) for f in found)
            else:
                if must_exist and not exists(url, storage_options):
                    raise FileNotFoundError(f"not found: {redact(url)}")
                out.append(url)
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)

    def _exists() -> bool:
        fs.invalidate_cache(path)  # other processes write here: never trust a cached listing
        return fs.exists(path)
    return retry(_exists, what=f"exists {redact(url)}")


def listdir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under a directory/prefix; empty when it does not exist."""
    fs, path = filesystem(url, storage_options)

    def _ls() -> list[str]:
        try:
            fs.invalidate_cache(path)
            return [basename(p) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
    return sorted(retry(_ls, what=f"list {redact(url)}"))


def walk_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """All file paths below ``url``, relative to it, sorted (hidden names skipped)."""
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    files = retry(lambda: fs.find(root), what=f"walk {redact(url)}")
    rels = []
    for f in files:
        rel = posixpath.relpath(f, root) if not is_remote(url) else f[len(root):].lstrip("/")
        rel = rel.replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        rels.append(rel)
    return sorted(rels)


def safe_relpath(rel: str) -> bool:
    """Whether ``rel`` may be joined under an output root: relative, no ``..``, no odd characters."""
    if not rel or rel.startswith(("/", "~")) or "\\" in rel or len(rel) > 1024:
        return False
    if any(ord(c) < 32 for c in rel):
        return False
    return all(seg not in ("", ".", "..") for seg in rel.split("/"))


def list_files(url: str, suffixes: tuple[str, ...] = (), storage_options: dict[str, Any] | None = None
               ) -> list[tuple[str, str]]:
    """``(url, relative path)`` of the files of a folder/prefix (walked recursively) or of a
    glob/brace pattern (relative path = the file name), keeping names ending in ``suffixes``
    (case-insensitive; all when empty). Hidden files are skipped."""
    keep = tuple(x.lower() for x in suffixes)
    if _GLOB_CHARS.search(url) or "{" in url:
        pairs = [(u, basename(u)) for u in expand(url, storage_options)]
    else:
        pairs = [(join(url, r), r) for r in walk_files(url, storage_options)]
    return [(u, r) for u, r in pairs if not keep or r.lower().endswith(keep)]


# --------------------------------------------------------------------------- reading

def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return retry(lambda: fs.cat_file(path), what=f"read {redact(url)}")


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options).decode("utf-8"))


@contextmanager
def open_read(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """A streaming binary reader (the open itself is retried)."""
    fs, path = filesystem(url, storage_options)
    f = retry(lambda: fs.open(path, "rb"), what=f"open {redact(url)}")
    try:
        yield f
    finally:
        f.close()


def download_dir(url: str, storage_options: dict[str, Any] | None = None,
                 cache_root: str | None = None) -> str:
    """Return a local directory with the contents of ``url`` (copied once for remote URLs)."""
    if not is_remote(url):
        fs, path = filesystem(url, storage_options)
        return path
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = cache_root or os.path.join(tempfile.gettempdir(), "latent-pipeline-cache")
    local = os.path.join(root, key)
    if os.path.isdir(local) and os.path.exists(os.path.join(local, ".complete")):
        return local
    tmp = f"{local}.{uuid.uuid4().hex}{PART_SUFFIX}"
    os.makedirs(tmp)
    fs, path = filesystem(url, storage_options)
    for rel in walk_files(url, storage_options):
        dest = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        retry(lambda rel=rel, dest=dest: fs.get_file(path.rstrip("/") + "/" + rel, dest),
              what=f"download {redact(url)}/{rel}")
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, local)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return local


# --------------------------------------------------------------------------- writing

def put_file(local_path: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a finished local file to ``url`` atomically."""
    fs, path = filesystem(url, storage_options)
    if is_remote(url):
        retry(lambda: fs.put_file(local_path, path), what=f"upload {redact(url)}")
        return
    _local_atomic(path, lambda tmp: shutil.copyfile(local_path, tmp))


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` atomically (visible only when complete)."""
    fs, path = filesystem(url, storage_options)
    if is_remote(url):
        retry(lambda: fs.pipe_file(path, data), what=f"write {redact(url)}")
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _local_atomic(path, write)


def _local_atomic(path: str, fill: Callable[[str], None]) -> None:
    """Fill a hidden ``.part`` file beside ``path``, then rename it into place (or remove it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _local_part_name(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), storage_options)


def upload_dir(local_dir: str, url: str, storage_options: dict[str, Any] | None = None,
               commit_last: str = "config.json") -> None:
    """Copy every file under ``local_dir`` to ``url``, each atomically, ``commit_last`` last.

    Readers treat the ``commit_last`` file (a checkpoint's ``config.json``) as the sign that the
    directory is complete, so it is written only after everything else.
    """
    rels = []
    for root, _dirs, files in os.walk(local_dir):
        rels += [os.path.relpath(os.path.join(root, n), local_dir).replace(os.sep, "/") for n in files]
    for rel in sorted(rels, key=lambda r: (r == commit_last, r)):
        put_file(os.path.join(local_dir, *rel.split("/")), join(url, rel), storage_options)


def remove(url: str, storage_options: dict[str, Any] | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        retry(lambda: fs.rm(path, recursive=recursive), what=f"remove {redact(url)}")
    except FileNotFoundError:
        pass


def clean_partials(url: str) -> int:
    """Delete leftover ``.part`` files of killed writers under a local directory."""
    if is_remote(url) or not os.path.isdir(url):
        return 0
    n = 0
    for p in _glob.glob(os.path.join(url, "**", f".*{PART_SUFFIX}"), recursive=True):
        os.remove(p)
        n += 1
    return n


def _local_part_name(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
