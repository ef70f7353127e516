"""Reading and writing WebDataset tar shards (img2dataset layout) without trusting their content.

A shard is a tar whose members are ``<key>.<ext>``; consecutive members with the same key form
one sample (the WebDataset convention). Reading never extracts to disk, never unpickles, caps
member sizes, and turns every problem into a sample with an ``error`` reason instead of an
exception, so a stage can count and record it:

* ``unsafe_key``: absolute paths, ``..`` segments, control characters, backslashes;
* ``duplicate_key``: a key seen earlier in the same shard (the first one wins);
* ``member_too_large``: a member above the size cap (bombs inside compressed tars);
* ``corrupt_tar``: the tar stream broke; one record stands for the unreadable rest.

Writing is deterministic (fixed mtime, owner and mode; members in the order given), so a
re-run produces byte-identical shards.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
_KEY_SEGMENT = re.compile(r"^[\w\-+=@ ]+$", re.UNICODE)


@dataclass
class Sample:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.latent.npy`` -> (``dir/abc``, ``latent.npy``) as WebDataset splits names."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def is_safe_key(key: str) -> bool:
    """Keys become member names and relative output paths: allow plain relative segments only."""
    if not key or key.startswith("/") or len(key) > 512:
        return False
    return all(seg not in (".", "..") and _KEY_SEGMENT.match(seg) for seg in key.split("/"))


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes header errors that ``tarfile`` would otherwise treat as a silent end of archive."""

    @classmethod
    def fromtarfile(cls, tar):  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            tar.corrupt_header = exc  # a zero block (EOFHeaderError) is the normal end
            raise


def iter_samples(fileobj: IO[bytes], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield the samples of a tar stream (``.tar``, ``.tar.gz`` ...), in order."""
    seen: set[str] = set()
    current: Sample | None = None

    def finish(s: Sample | None) -> Iterator[Sample]:
        if s is None:
            return
        if s.error is None and not is_safe_key(s.key):
            s.error, s.fields = "unsafe_key", {}
        elif s.error is None and s.key in seen:
            s.error, s.fields = "duplicate_key", {}
        seen.add(s.key)
        yield s

    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if current is None or key != current.key or ext in current.fields:
                    yield from finish(current)
                    current = Sample(key)
                if member.size > max_member_bytes:
                    current.error = "member_too_large"
                    current.detail = f"{member.name}: {member.size} bytes"
                    continue
                f = tar.extractfile(member)
                current.fields[ext] = f.read() if f is not None else b""
            bad_header = getattr(tar, "corrupt_header", None)
            if bad_header is not None:
                raise tarfile.ReadError(f"invalid header after {tar.offset} bytes: {bad_header}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        yield from finish(current)
        current = None
        yield Sample(key="", error="corrupt_tar", detail=f"{type(exc).__name__}: {str(exc)[:160]}")
    yield from finish(current)


class TarShardWriter:
    """Write samples into a tar file object deterministically."""

    def __init__(self, fileobj: IO[bytes]):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if not is_safe_key(key):
            raise ValueError(f"unsafe key {key!r}")
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
