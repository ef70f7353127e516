"""Aspect-ratio buckets: a table of image sizes of about the same area, and the bucket of an image.

A table is generated from a target area (pixels), a size multiple and a largest aspect ratio
(as kohya-ss and SimpleTuner do): for every width that is a multiple, the largest height that
is a multiple and keeps ``width * height <= area``; sizes whose aspect ratio (long side / short
side) exceeds ``max_aspect`` are left out. A table may also be given as a JSON file holding a
list of ``[width, height]`` pairs (PixArt publishes fixed tables).

An image goes to the bucket with the nearest aspect ratio in log space (a 2:1 and a 1:2 image
are equally far from square), is resized to cover it and centre-cropped. An image whose own
aspect ratio exceeds ``max_aspect`` is skipped (reason ``aspect_out_of_range``), not squeezed.
"""

from __future__ import annotations

import json
import math

from pipeline.errors import ConfigError

Size = tuple[int, int]


class BucketError(ConfigError):
    """A bucket table that cannot be used (user error)."""


def aspect(w: int, h: int) -> float:
    """Long side over short side (>= 1)."""
    return max(w, h) / min(w, h)


def generate(area: int, multiple: int, max_aspect: float) -> list[Size]:
    """Every (width, height), both multiples of ``multiple``, of the largest area up to ``area``
    per width, with aspect ratio at most ``max_aspect``; sorted by width / height."""
    if multiple < 1 or area < multiple * multiple:
        raise BucketError(f"bucket area {area} is smaller than one {multiple}x{multiple} cell")
    sizes: set[Size] = set()
    w = multiple
    while w * multiple <= area:
        h = (area // w) // multiple * multiple
        if h >= multiple and aspect(w, h) <= max_aspect + 1e-9:
            sizes.add((w, h))
        w += multiple
    if not sizes:
        raise BucketError(f"no bucket of area <= {area} in multiples of {multiple} within aspect {max_aspect:g}")
    return sort(sizes)


def sort(sizes) -> list[Size]:
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


MAX_SIDE = 8192  # as --resolution
MAX_BUCKETS = 4096


def parse(data: bytes, multiple: int, where: str, max_aspect: float = 100.0) -> list[Size]:
    """A table from a JSON file: ``[[w, h], ...]`` (or ``{"buckets": [[w, h], ...]}``), each size a
    multiple of ``multiple``, at most :data:`MAX_SIDE` a side and ``max_aspect`` long side to short."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BucketError(f"bucket table {where} is not valid JSON ({exc})") from None
    rows = doc.get("buckets") if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not rows:
        raise BucketError(f"bucket table {where} must be a non-empty list of [width, height]")
    if len(rows) > MAX_BUCKETS:
        raise BucketError(f"bucket table {where} lists {len(rows)} sizes; at most {MAX_BUCKETS}")
    sizes: list[Size] = []
    for row in rows:
        if not (
            isinstance(row, (list, tuple))
            and len(row) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in row)
        ):
            raise BucketError(f"bucket table {where}: {row!r} is not [width, height] in positive integers")
        if row[0] % multiple or row[1] % multiple:
            raise BucketError(f"bucket table {where}: {row[0]}x{row[1]} is not a multiple of {multiple}")
        if max(row) > MAX_SIDE or aspect(row[0], row[1]) > max_aspect + 1e-9:
            raise BucketError(
                f"bucket table {where}: {row[0]}x{row[1]} is over {MAX_SIDE} px a side or beyond "
                f"--max-aspect {max_aspect:g}"
            )
        sizes.append((row[0], row[1]))
    if len(set(sizes)) != len(sizes):
        raise BucketError(f"bucket table {where} lists a size twice")
    return sort(sizes)


def nearest(table: list[Size], w: int, h: int) -> Size:
    """The bucket whose aspect ratio is nearest to ``w`` / ``h`` in log space (ties: the first)."""
    target = math.log(w / h)
    return min(table, key=lambda s: abs(math.log(s[0] / s[1]) - target))


def name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"
