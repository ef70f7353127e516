"""Reading and writing WebDataset tar shards (img2dataset layout) without trusting their content.

A shard is a tar whose members are ``<key>.<ext>``; consecutive members with the same key form
one sample (the WebDataset convention). Reading never extracts to disk, never unpickles, caps
member sizes, and turns every problem into a sample with an ``error`` reason instead of an
exception, so a stage can count and record it:

* ``unsafe_key``: absolute paths, ``..`` segments, control characters, backslashes;
* ``duplicate_key``: a key seen earlier in the same shard (the first one wins);
* ``member_too_large`` / ``sample_too_large``: a member, or a sample's members together, above
  the size caps (bombs inside compressed tars); the members are skipped, not read;
* ``shard_too_large``: the shard's decompressed members passed the per-shard cap; one record
  stands for the unread rest;
* ``not_a_regular_file``: a link, device or FIFO member (directories are ignored);
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

import numpy as np

DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SAMPLE_BYTES = 512 * 1024 * 1024  # all members of one sample: what a reader holds at once
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024 * 1024  # all members of one shard, decompressed
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
    key = f"{head}/{stem}" if head else ("/" + stem if name.startswith("/") else stem)  # keep '/abs' unsafe
    return key, ext.lower() if dot else ""


def is_safe_key(key: str) -> bool:
    """Keys become member names and relative output paths: allow plain relative segments only."""
    if not key or key.startswith("/") or len(key) > 512:
        return False
    return all(seg not in (".", "..") and _KEY_SEGMENT.match(seg) for seg in key.split("/"))


_USTAR_TEMPLATE = (
    tarfile.NUL * 100  # name
    + b"0000644\0"  # mode
    + b"0000000\0"  # uid
    + b"0000000\0"  # gid
    + b"%011o\0"  # size
    + b"00000000000\0"  # mtime
    + b" " * 8  # checksum, counted as spaces
    + tarfile.REGTYPE
    + tarfile.NUL * 100  # linkname
    + tarfile.POSIX_MAGIC
    + tarfile.NUL * (32 + 32 + 8 + 8 + 155 + 12)  # uname, gname, devmajor, devminor, prefix, padding
)


def _member_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes for a regular member in PAX format with this writer's fixed
    fields (tested byte for byte against ``TarInfo.tobuf``)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)  # its defaults are the writer's fields: mtime 0, mode 0644, owner 0, ""
        info.size = size
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    block = raw + (_USTAR_TEMPLATE % size)[len(raw) :]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes header errors that ``tarfile`` would otherwise treat as a silent end of archive."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            if type(exc).__name__ in ("InvalidHeaderError", "TruncatedHeaderError"):
                tar.corrupt_header = exc  # a zero block (EOFHeaderError) is the normal end
            raise


def iter_samples(
    fileobj: IO[bytes],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Iterator[Sample]:
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

    shard_bytes = sample_bytes = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_name(member.name)
                if current is None or key != current.key or ext in current.fields:
                    yield from finish(current)
                    current, sample_bytes = Sample(key), 0
                if not member.isfile():
                    current.error, current.fields = "not_a_regular_file", {}
                    current.detail = f"{member.name}: tar member type {member.type!r}"
                    continue
                if current.error is not None:
                    continue  # the sample is already refused: do not read the rest of it
                sample_bytes += member.size
                shard_bytes += member.size
                if shard_bytes > max_shard_bytes:
                    current = None
                    yield Sample(key="", error="shard_too_large", detail=f"over {max_shard_bytes} bytes decompressed")
                    return
                if member.size > max_member_bytes or sample_bytes > max_sample_bytes:
                    too_big = "member_too_large" if member.size > max_member_bytes else "sample_too_large"
                    current.error, current.fields = too_big, {}
                    current.detail = f"{member.name}: {member.size} bytes ({sample_bytes} in the sample)"
                    continue
                f = tar.extractfile(member)
                current.fields[ext] = f.read() if f is not None else b""
            bad_header = getattr(tar, "corrupt_header", None)
            if bad_header is not None:
                raise tarfile.ReadError(f"invalid header after {tar.offset} bytes: {bad_header}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None and current.error is None:  # cut off mid-sample: its fields are partial
            current.error, current.fields = "corrupt_tar", {}
            current.detail = "the tar broke inside this sample"
        yield from finish(current)
        current = None
        yield Sample(key="", error="corrupt_tar", detail=f"{type(exc).__name__}: {str(exc)[:160]}")
    yield from finish(current)


class TarShardWriter:
    """Write samples into a tar file object deterministically.

    The bytes are ``tarfile``'s own (PAX format, mtime 0, mode 0644, owner 0, no owner names,
    records padded to 10 KiB): an ASCII member name of up to 100 bytes gets its ustar header from
    a template (7 vs 30 us per member with its data: ``tarfile.addfile`` copies a TarInfo and
    rebuilds every field for each member); any other name takes ``TarInfo.tobuf``'s PAX header.
    """

    def __init__(self, fileobj: IO[bytes]):
        self._f = fileobj
        self._offset = fileobj.tell()
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if not is_safe_key(key):
            raise ValueError(f"unsafe key {key!r}")
        for ext, data in fields.items():
            pad = tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)
            member = b"".join((_member_header(f"{key}.{ext}", len(data)), data, pad))
            self._f.write(member)  # one call: a file object's wrapper costs more than the copy
            self._offset += len(member)
        self.samples += 1

    def close(self) -> None:
        end = tarfile.BLOCKSIZE * 2  # two zero blocks, then zeros to the end of the record
        self._f.write(tarfile.NUL * (end + -(self._offset + end) % tarfile.RECORDSIZE))

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as a ``.npy`` member (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` member as an array; object arrays (pickles) are refused by numpy."""
    return np.load(io.BytesIO(data), allow_pickle=False)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand_shards(spec: str, storage_options: dict | None = None, *, option: str = "input") -> list[str]:
    """The shard URLs ``spec`` names (:func:`storage.expand`: brace ranges, globs, files, a
    comma-separated list), where a folder stands for the shard files in it (sorted; hidden files
    left out). A folder without shards is a ConfigError naming ``option``."""
    from pipeline.errors import ConfigError
    from pipeline.io import storage

    out: list[str] = []
    for url in storage.expand(spec, storage_options):
        if url.endswith(SHARD_SUFFIXES):  # no look-up for what is named as a shard (thousands on S3)
            out.append(url)
            continue
        fs, path = storage.filesystem(url, storage_options)
        if not fs.isdir(path):
            out.append(url)
            continue
        found = storage.expand(storage.join(url, "*"), storage_options, must_exist=False)
        shards = [u for u in found if u.endswith(SHARD_SUFFIXES)]
        if not shards:
            raise ConfigError(
                f"option {option!r}: {storage.redact(url)} is a folder without shards ({', '.join(SHARD_SUFFIXES)})"
            )
        out.extend(shards)
    return list(dict.fromkeys(out))
