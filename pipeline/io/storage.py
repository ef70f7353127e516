"""The one module that touches storage: local paths and fsspec URLs (s3://, gs://, file://, ...).

Every stage reads and writes through these functions, so that retries, atomic commits,
URL expansion and credential handling live in one place.

* S3-compatible endpoints are configured the standard way (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...) or with ``storage_options``
  (the ``--storage-options`` JSON), passed straight to the fsspec filesystem.
* Writes are atomic: an output appears under its final name only when complete
  (a local file is written beside its target under a hidden ``.part`` name and renamed;
  an object-store upload is a single PUT / multipart upload that commits on completion).
* Transient errors (connection resets, timeouts, throttling, an endpoint that is down) are
  retried with exponential backoff and full jitter for up to ``$LATENT_PIPELINE_RETRY_SECONDS``
  (60 s), reads of a stream included; "not found" and "permission denied" are not.
* Credentials never appear in printed text: :func:`redact` strips them from messages and logs.
  Stored values are never redacted: they hold no credentials by construction, and a URL is
  stored as :func:`public_url` gives it (true, without ``user:password@``).
"""

from __future__ import annotations

import functools
import glob as _glob
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, TypeVar, cast

import fsspec
from braceexpand import braceexpand

from pipeline.io.retries import retry
from pipeline.redaction import add_secret, redact
from pipeline.redaction import public_url as public_url  # re-exported: stages store URLs through storage
from pipeline.redaction import register_secrets as register_secrets  # re-exported for the option groups

T = TypeVar("T")

PART_SUFFIX = ".part"
_GLOB_CHARS = re.compile(r"[*?\[]")


def absolute(url: str) -> str:
    """A local path made absolute (so Ray workers, whose working folder differs, see the same
    file); URLs unchanged but checked (:func:`check_url`). A comma-separated list is handled
    item by item."""
    if not url:
        return url
    if "," in url and "{" not in url:
        return ",".join(absolute(u.strip()) for u in url.split(",") if u.strip())
    if is_remote(url):
        check_url(url)
        _register_userinfo(url)
        return url
    if url.startswith("file://"):
        return url
    return os.path.abspath(os.path.expanduser(url))


# object stores whose URL names a bucket (container) first: no user-info, no port
_BUCKET_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs")


def _shown(url: str) -> str:
    """A URL with credentials, shown without any of them: everything up to its last ``@``
    (before any space or quote) is dropped."""
    scheme, _, rest = str(url).partition("://")
    if "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return redact(url)


def check_url(url: str) -> None:
    """Raise :class:`ConfigError` (one line, no credentials) for a URL that cannot work:
    ``user:password@`` in an object-store URL (there it would be read as part of the bucket
    name; credentials go in ``--storage-options`` or the environment), a bucket name with
    characters no bucket has, or a port that is not a number."""
    import urllib.parse

    from pipeline.errors import ConfigError

    url = str(url)
    if "://" not in url:
        return
    scheme = url.split("://", 1)[0].lower()
    if scheme in _BUCKET_SCHEMES:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if re.search(r"[@:\s'\"]", bucket):
            raise ConfigError(
                f"URL {_shown(url)}: a {scheme}:// URL takes no user:password@ (nor ':' or '@' in its "
                "bucket name); give credentials in --storage-options or the environment (AWS_ACCESS_KEY_ID, ...)"
            )
        return
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        raise ConfigError(f"URL {_shown(url)}: its port is not a number") from None


def _register_userinfo(url: str) -> None:
    """User-info that :func:`redact`'s patterns cannot delimit (its password holds spaces or
    quotes) is registered whole (``user:pass word``), so that no later printed line shows it."""
    rest = str(url).partition("://")[2]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo = authority[: authority.rfind("@")] if "@" in authority else ""
    if re.search(r"[\s'\"]", userinfo):
        add_secret(userinfo)


# other spellings of one object store, so that overlap checks compare like with like
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}


def _root_of(url: str) -> str:
    """The folder/prefix that an input spec reads from: the part before any glob or brace."""
    cut = min([i for i in (url.find("*"), url.find("?"), url.find("["), url.find("{")) if i >= 0] or [len(url)])
    head = url[:cut]
    if cut < len(url):
        head = head.rsplit("/", 1)[0] if "/" in head else ""
    return head.rstrip("/")


def _canonical(url: str) -> str:
    if is_remote(url):
        proto = fsspec.utils.get_protocol(url)
        proto = _SCHEME_ALIASES.get(proto, proto)
        path = url.split("://", 1)[1]  # as text: no filesystem (nor its package) is needed to compare
        return f"{proto}://{str(path).strip('/')}"
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.realpath(os.path.abspath(path or "."))


def check_separate(output: str, inputs: dict[str, str], *, option: str = "output") -> None:
    """Refuse an ``output`` that equals, contains or lies inside one of ``inputs`` (option name ->
    URL, folder or pattern): no run may write over, into or around what it reads.

    A folder input is read recursively, so nothing below it may be an output. A glob or brace
    pattern reads what it matches: the output may not be its folder or contain it, and may lie
    below that folder only where the pattern cannot match (a non-recursive pattern whose name
    part does not match the output's folder name).
    """
    import fnmatch

    from pipeline.errors import ConfigError

    out = _canonical(output)

    def refuse(name: str, spec: str) -> None:
        raise ConfigError(
            f"option {option!r} ({redact(output)}) overlaps option {name!r} ({redact(spec)}): "
            "a run never writes into, over or around its inputs; choose a separate folder"
        )

    def inside(a: str, b: str) -> bool:  # a is b or below it
        return a == b or a.startswith(b.rstrip("/") + "/")

    for name, spec in inputs.items():
        if not spec:
            continue
        parts = [spec] if "{" in spec else [p.strip() for p in spec.split(",") if p.strip()]
        for part in parts:
            if not (_GLOB_CHARS.search(part) or "{" in part):
                inp = _canonical(part)
                if inside(out, inp) or inside(inp, out):
                    refuse(name, spec)
                continue
            root = _canonical(_root_of(part) or ".")
            if inside(root, out):
                refuse(name, spec)
            if inside(out, root):
                tail = part[len(_root_of(part)) :].lstrip("/")
                first = out[len(root) :].lstrip("/").split("/", 1)[0]
                if "/" in tail or "**" in tail or "{" in tail or fnmatch.fnmatch(first, tail):
                    refuse(name, spec)


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
    """Return ``(fs, path)`` for ``url``; ``storage_options`` go to the fsspec filesystem.

    A URL that cannot work (:func:`check_url`) and storage options the filesystem does not take
    (an unknown key, ``client_kwargs`` that is not a mapping, ...) raise :class:`ConfigError`
    naming them, here, when the filesystem is first built (an S3 client is created then, which
    needs no network), rather than as a library's error at the first read."""
    from pipeline.errors import ConfigError

    check_url(url)
    so = storage_options or {}
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **so)
        if type(fs).__name__ == "S3FileSystem" and getattr(fs, "_s3", None) is None:
            fs.connect()  # builds the client from the options: a wrong option fails now
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        if so:
            try:
                fsspec.core.url_to_fs(str(url))
            except (TypeError, AttributeError, ValueError, KeyError):
                pass
            else:
                raise ConfigError(
                    f"option 'storage-options' does not suit {_shown(url)}: {type(exc).__name__}: {reason}"
                ) from None
        raise ConfigError(f"URL {_shown(url)} cannot be used: {type(exc).__name__}: {reason}") from None
    return fs, path


def _unstrip(fs, url: str, path: str) -> str:
    """Turn a path returned by ``fs`` back into a URL of the same scheme as ``url``."""
    if not is_remote(url):
        return path
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------- listing


def expand(
    patterns: str | list[str], storage_options: dict[str, Any] | None = None, *, must_exist: bool = True
) -> list[str]:
    """Expand shard specs into a sorted, de-duplicated list of URLs.

    Each pattern may use brace ranges (``shard-{000000..000127}.tar``), globs (``*``, ``?``,
    ``[..]``) or name a single file. A comma-separated string is several patterns. A pattern
    that matches nothing raises ``FileNotFoundError`` naming it (when ``must_exist``).
    """
    if isinstance(patterns, str):
        patterns = [p for p in (s.strip() for s in patterns.split(",")) if p] if "{" not in patterns else [patterns]
    out: list[str] = []
    for pattern in patterns:
        literal = "{" in pattern and exists(pattern, storage_options)  # a name that has braces
        for url in [pattern] if literal else braceexpand(pattern):
            if _GLOB_CHARS.search(url) and not exists(url, storage_options):  # `photos [v1]` is a name
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
    return list(dict.fromkeys(out))  # de-duplicated, first occurrence kept


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


def walk_files(url: str, storage_options: dict[str, Any] | None = None, *, hidden: bool = False) -> list[str]:
    """All file paths below ``url``, relative to it, sorted (names starting with ``.`` only
    when ``hidden``)."""
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    files = retry(lambda: fs.find(root), what=f"walk {redact(url)}")
    rels = []
    for f in files:
        rel = posixpath.relpath(f, root) if not is_remote(url) else f[len(root) :].lstrip("/")
        rel = rel.replace(os.sep, "/")
        if not hidden and is_hidden(rel):
            continue
        rels.append(rel)
    return sorted(rels)


def is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def safe_relpath(rel: str) -> bool:
    """Whether ``rel`` may be joined under an output root: relative, no ``..``, no odd characters."""
    if not rel or rel.startswith(("/", "~")) or "\\" in rel or len(rel) > 1024:
        return False
    if any(ord(c) < 32 for c in rel):
        return False
    return all(seg not in ("", ".", "..") for seg in rel.split("/"))


def list_files(
    url: str, suffixes: tuple[str, ...] = (), storage_options: dict[str, Any] | None = None, *, hidden: bool = False
) -> list[tuple[str, str]]:
    """``(url, relative path)`` of the files of a folder/prefix (walked recursively) or of a
    glob/brace pattern (relative path = the file name), keeping names ending in ``suffixes``
    (case-insensitive; all when empty). Hidden files are listed only when ``hidden``."""
    keep = tuple(x.lower() for x in suffixes)
    fs, path = filesystem(url, storage_options)
    if (_GLOB_CHARS.search(url) or "{" in url) and not exists(url, storage_options):
        pairs = [(u, basename(u)) for u in expand(url, storage_options)]
    elif retry(lambda: fs.isfile(path), what=f"stat {redact(url)}"):  # one file: itself
        pairs = [(url, basename(url))]
    else:
        pairs = [(join(url, r), r) for r in walk_files(url, storage_options, hidden=hidden)]
    return [(u, r) for u, r in pairs if not keep or r.lower().endswith(keep)]


# --------------------------------------------------------------------------- reading


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return retry(lambda: fs.cat_file(path), what=f"read {redact(url)}")


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options).decode("utf-8"))


@contextmanager
def open_read(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """A streaming binary reader. The open and every read are retried (:func:`retry`): a read
    that fails on a transient error re-opens the file and continues at the same offset, so a
    storage outage in the middle of a stream costs a pause, not the stream."""
    fs, path = filesystem(url, storage_options)
    f = _ResumingReader(fs, path, f"read {redact(url)}")
    try:
        yield cast(IO[bytes], f)
    finally:
        f.close()


class _ResumingReader(io.RawIOBase):
    """A read-only file over ``fs.open(path)`` that re-opens and seeks back after a transient
    error (the remote file is expected to stay as it is while it is read)."""

    def __init__(self, fs: Any, path: str, what: str):
        super().__init__()
        self._fs, self._path, self._what = fs, path, what
        self._pos = 0
        self._f: Any = None
        retry(self._file, what=what)

    def _file(self) -> Any:
        if self._f is None:
            f = self._fs.open(self._path, "rb")
            if self._pos:
                f.seek(self._pos)
            self._f = f
        return self._f

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with suppress(Exception):
                f.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = retry(lambda: self._file().seek(offset, whence), what=self._what)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        def once() -> bytes:
            try:
                data = self._file().read(-1 if size is None else size)
            except Exception:
                self._drop()  # the next try opens the file afresh at the same offset
                raise
            self._pos += len(data)
            return data

        return retry(once, what=self._what)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def download_dir(url: str, storage_options: dict[str, Any] | None = None, cache_root: str | None = None) -> str:
    """Return a local directory with the contents of ``url`` (copied once for remote URLs).

    The cache entry is keyed by the endpoint, the URL and the *content* (each file's name, size
    and ETag or modification time), so a replaced remote file is downloaded again and two
    endpoints never share an entry. The cache lives in a folder private to this user (mode
    0700, owned by them); a folder that another user could have pre-seeded is not used.
    """
    if not is_remote(url):
        fs, path = filesystem(url, storage_options)
        return path
    fs, path = filesystem(url, storage_options)
    root_path = path.rstrip("/")

    def _find() -> dict[str, Any]:
        fs.invalidate_cache(root_path)  # the content identity must be read now, never a cached listing
        return fs.find(root_path, detail=True)

    listing = retry(_find, what=f"walk {redact(url)}")
    files = []
    for f, info in sorted(listing.items()):
        rel = f[len(root_path) :].lstrip("/")
        if rel and not is_hidden(rel):
            version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
            files.append((rel, int(info.get("size") or 0), str(version)))
    endpoint = (
        (storage_options or {}).get("client_kwargs", {}).get("endpoint_url")
        or (storage_options or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    )
    key = hashlib.sha256(json.dumps([endpoint, url, files]).encode()).hexdigest()[:24]
    root = cache_root or _private_cache_root()
    local = os.path.join(root, key)
    if os.path.isdir(local) and os.path.exists(os.path.join(local, ".complete")):
        return local
    tmp = f"{local}.{uuid.uuid4().hex}{PART_SUFFIX}"
    os.makedirs(tmp)
    for rel, _size, _version in files:
        dest = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        src = path.rstrip("/") + "/" + rel
        retry(functools.partial(fs.get_file, src, dest), what=f"download {redact(url)}/{rel}")
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, local)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _private_cache_root() -> str:
    """``$LATENT_PIPELINE_CACHE`` or ``<tmp>/latent-pipeline-<uid>``: created 0700, and refused
    when it belongs to someone else or others may write to it."""
    root = os.environ.get("LATENT_PIPELINE_CACHE") or os.path.join(
        tempfile.gettempdir(), f"latent-pipeline-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    )
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.stat(root)
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise PermissionError(
            f"cache folder {root} is not private to this user (owner or mode); remove it or set LATENT_PIPELINE_CACHE"
        )
    return root


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


def _local_atomic(path: str, fill: Callable[[str], object]) -> None:
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


def upload_dir(
    local_dir: str, url: str, storage_options: dict[str, Any] | None = None, commit_last: str = "config.json"
) -> None:
    """Copy every file under ``local_dir`` to ``url``, each atomically, ``commit_last`` last.

    Readers treat the ``commit_last`` file (a checkpoint's ``config.json``) as the sign that the
    directory is complete, so it is written only after everything else.
    """
    rels = []
    for root, _dirs, files in os.walk(local_dir):
        rels += [os.path.relpath(os.path.join(root, n), local_dir).replace(os.sep, "/") for n in files]
    for rel in sorted(rels, key=lambda r: (r == commit_last, r)):
        put_file(os.path.join(local_dir, *rel.split("/")), join(url, rel), storage_options)


def probe_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail now, naming ``url``, when it cannot be written (before any work is done)."""
    from pipeline.errors import ConfigError

    probe = join(url, f".write-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"", storage_options)
        remove(probe, storage_options)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"output {redact(url)} is not writable: {redact(str(reason))}") from None


def remove(url: str, storage_options: dict[str, Any] | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(url, storage_options)
    with suppress(FileNotFoundError):
        retry(lambda: fs.rm(path, recursive=recursive), what=f"remove {redact(url)}")


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
    """A hidden temporary name beside ``path``; short enough for any name the target may have
    (file systems allow 255 bytes: a long target name is not repeated in it)."""
    d, name = os.path.split(os.path.abspath(path))
    stem = name if len(name.encode()) <= 200 else hashlib.sha256(name.encode()).hexdigest()[:16]
    return os.path.join(d, f".{stem}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
