"""Image decoding and preprocessing shared by every stage.

Decoding is defensive: a size limit is checked from the header before any pixel is decoded
(decompression bombs), truncated files fail instead of being padded, and every problem is a
:class:`BadImage` with a short machine-readable ``reason``.

RGB rule (documented in docs/verbs.md, under ``encode``):

* EXIF orientation is applied first.
* ``RGB`` is kept; ``L``/``1``/``CMYK``/``YCbCr``/``LAB``/``HSV`` are converted by Pillow.
* 16-bit and 32-bit integer grey (``I;16*``, ``I``) is scaled from 0..65535 to 0..255
  (values are clipped to that range first); float grey (``F``) is clipped to 0..255.
* Anything with transparency (``RGBA``, ``LA``, ``P``/``PA`` with a transparent index) is
  composited over white; the alpha is available separately from :func:`split_alpha`.

16 bits (``restore``): :func:`decode_pixels` also returns the pixels of a 16-bit RGB or grey
PNG/TIFF as float *levels* (``Pixels``: float32 (H, W, 3) on the 0..255 scale, a 16-bit value
``v`` being ``v / 257``), where Pillow's RGB image keeps only the high byte; the restorers take
and return either kind (an 8-bit image stays an 8-bit image), and :func:`encode_16bit` writes
levels back as a 16-bit PNG or TIFF.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit before decoding

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
# The only decoders Pillow may use, whatever a file's name or first bytes claim: never EPS/PS
# (Ghostscript), PDF, SVG-like or other plugins that run external programs or parse complex input.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16- and 32-bit integer grey
GREY_MODES = ("L", *WIDE_GREY_MODES, "F", "1")  # written back as 8-bit grey by restore
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 MPix: a 8k x 8k photo passes, a bomb does not
# An image to restore: an 8-bit Pillow image, or a 16-bit source's float levels (module docstring)
Pixels = Image.Image | np.ndarray
PixelsT = TypeVar("PixelsT", Image.Image, np.ndarray)  # one kind in, the same kind out
# Pillow unpacks 16-bit RGB to its high byte; the same decode with the other byte order's rawmode
# unpacks the low byte (filters and decompression run on the raw bytes, before unpacking)
_LOW_BYTE = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGB;16N": "RGB;16B" if sys.byteorder == "little" else "RGB;16L",
}


class BadImage(ValueError):
    """An input image that cannot be used; ``reason`` is a short stable token."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes with a pixel limit and EXIF orientation applied (mode unchanged)."""
    return decode_for(data, max_pixels)[0]


# plan(w, h) -> the smallest decoded (w, h) the caller needs, or None for full size
DecodePlan = Callable[[int, int], "tuple[int, int] | None"]


def decode_for(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, plan: DecodePlan | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode with a pixel limit; returns the image and its full (oriented) size ``(w, h)``.

    ``plan`` sees the full size before any pixel is decoded: it may raise :class:`BadImage`
    (too small, aspect out of range, ...) or return the smallest size it needs. A JPEG at least
    twice that size is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's
    ``draft``), several times faster; the returned image is then smaller than ``(w, h)`` by an
    exact power-of-two factor and never smaller than the size asked for.
    """
    with _decode_errors():
        im, (w, h), swapped = _open(data, max_pixels)
        needed = plan(w, h) if plan is not None else None
        if needed is not None and im.format == "JPEG" and min(w // needed[0], h // needed[1]) >= 2:
            im.draft(None, (needed[1], needed[0]) if swapped else needed)
        im.load()
        im = ImageOps.exif_transpose(im)
    return im, (w, h)


def decode_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, np.ndarray | None]:
    """:func:`decode`, and for a 16-bit RGB or grey source its RGB pixels as float levels
    (``Pixels``; None for any other source). Two decodes of a 16-bit RGB file: Pillow's own (the
    high bytes) and one with the rawmode of the other byte order (the low bytes)."""
    im = decode(data, max_pixels)
    if im.mode in WIDE_GREY_MODES:
        grey = np.clip(np.asarray(im, np.float32), 0, 65535) / 257.0
        return im, np.repeat(grey[..., None], 3, axis=-1)
    if im.mode != "RGB":
        return im, None
    with _decode_errors():  # (the pixel limit was checked by the decode above; getexif would load)
        low = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        tiles = [t._replace(args=_low_byte_args(t.args)) for t in low.tile]
        if not tiles or any(t.args is None for t in tiles):
            return im, None  # an 8-bit RGB source
        low.tile = tiles
        low.load()
        low_bytes = np.asarray(ImageOps.exif_transpose(low), np.float32)
    return im, (np.asarray(im, np.float32) * 256 + low_bytes) / 257.0


def _low_byte_args(args):
    """A tile's decoder arguments with the rawmode that unpacks the low byte, or None when the
    tile is not 16-bit RGB (PNG: the rawmode; TIFF: a tuple starting with it)."""
    rawmode = args[0] if isinstance(args, tuple) else args
    other = _LOW_BYTE.get(rawmode) if isinstance(rawmode, str) else None
    if other is None:
        return None
    return (other, *args[1:]) if isinstance(args, tuple) else other


def rgb_levels(im: Pixels) -> np.ndarray:
    """An image to restore as float32 (H, W, 3) levels on the 0..255 scale (exact for 8 bits)."""
    return im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB"), np.float32)


def like(src: PixelsT, levels: np.ndarray) -> PixelsT:
    """Restored ``levels`` in the kind of ``src``: an 8-bit RGB image (rounded) for an image,
    float levels (clipped, not rounded) for levels."""
    levels = np.clip(np.asarray(levels, np.float32), 0, 255)
    return levels if isinstance(src, np.ndarray) else to_8bit(levels)


def to_8bit(im: Pixels) -> Image.Image:
    """Either kind as an 8-bit RGB image (levels rounded)."""
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    return Image.fromarray(np.round(np.clip(im, 0, 255)).astype(np.uint8), "RGB")


def size_of(im: Pixels) -> tuple[int, int]:
    """(width, height) of either kind."""
    return (im.shape[1], im.shape[0]) if isinstance(im, np.ndarray) else im.size


FORMATS_16BIT = ("PNG", "TIFF")  # the output formats that hold 16 bits per channel


def encode_16bit(levels: np.ndarray, fmt: str, grey: bool = False) -> bytes:
    """Float levels (H, W, 3) as a 16-bit PNG or TIFF (``grey``: one channel, Pillow's ``L``
    luma weights), values ``round(levels * 257)``."""
    if grey:
        levels = levels @ np.array([0.299, 0.587, 0.114], np.float32)
    arr = np.round(np.clip(levels, 0, 255) * 257).astype(np.uint16)
    if fmt == "TIFF":
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, photometric="minisblack" if grey else "rgb", compression="zlib")
        return buf.getvalue()
    return _png_16bit(arr)


def _png_16bit(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey or RGB), every row with the Up filter (Pillow writes no 16-bit RGB)."""
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1).astype(">u2").view(np.uint8).reshape(h, -1)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, rows.shape[1]), np.uint8))  # uint8: modulo 256
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def header_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The oriented (w, h) from the header alone (no pixel decoded), with the pixel limit."""
    with _decode_errors():
        return _open(data, max_pixels)[1]


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int], bool]:
    """Open (no pixels decoded yet), check the pixel limit; the oriented size and whether the
    EXIF orientation swaps the axes."""
    if not data:
        raise BadImage("empty_file")
    im: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    swapped = im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    return im, ((h, w) if swapped else (w, h)), swapped


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Every decoding problem as a BadImage with its reason; bomb warnings are errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not_an_image") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ) as exc:
        raise BadImage("corrupt_image", type(exc).__name__ + ": " + str(exc)[:120]) from None


_ORIENTATION = 0x0112


def image_field(fields: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member (first of :data:`IMAGE_EXTS`), or None."""
    return next((e for e in IMAGE_EXTS if e in fields), None)


def sample_rgb(fields: dict[str, bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A shard sample's image decoded to RGB; BadImage (``no_image``, ...) when there is none."""
    ext = image_field(fields)
    if ext is None:
        raise BadImage("no_image", f"fields: {sorted(fields)}")
    return to_rgb(decode(fields[ext], max_pixels))


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by the rule in the module docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in WIDE_GREY_MODES:
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def split_alpha(im: Image.Image) -> Image.Image | None:
    """The alpha channel as an ``L`` image, or None when the image has no transparency."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def center_crop_box(w: int, h: int, aspect: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
    """The largest centred box of aspect ``aspect`` (width, height) in a ``w`` x ``h`` image, as
    (left, top, right, bottom); the default is the largest centred square."""
    aw, ah = aspect
    if w * ah > h * aw:  # wider than the aspect: full height
        cw, ch = min(w, round(h * aw / ah)), h
    else:
        cw, ch = w, min(h, round(w * ah / aw))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def resize_cover(
    im: Image.Image, size: tuple[int, int], source_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize to cover ``size`` (width, height) and centre-crop to it, with Lanczos.

    Returns the image and the crop box in the *source* image's pixels. ``source_size`` is the
    full size when ``im`` was decoded at a reduced scale (:func:`decode_for`); the box is then
    mapped onto the reduced image. An image already at ``size`` is returned unchanged.
    """
    w, h = source_size or im.size
    box = center_crop_box(w, h, size)
    if im.size == size and (w, h) == size:
        return im, box
    if im.size != (w, h):
        f = 1 / round(w / im.width)  # draft decodes at exactly 1/2, 1/4 or 1/8 (sizes rounded up)
        scaled = (box[0] * f, box[1] * f, box[2] * f, box[3] * f)
        return im.resize(size, Image.Resampling.LANCZOS, box=scaled), box
    return im.resize(size, Image.Resampling.LANCZOS, box=box), box


def resize_center_crop(im: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize the shorter side to ``resolution`` and centre-crop to a square (:func:`resize_cover`)."""
    return resize_cover(im, (resolution, resolution))


def to_tensor_array(im: Pixels) -> np.ndarray:
    """RGB image (or float levels) -> float32 array (3, H, W) in [-1, 1], the autoencoders' input
    convention."""
    arr = np.asarray(im, dtype=np.float32)
    return (arr.transpose(2, 0, 1) / 127.5) - 1.0


def from_tensor_array(arr: np.ndarray) -> Image.Image:
    """float array (3, H, W) in [-1, 1] -> RGB image (clipped)."""
    arr = np.clip((np.asarray(arr, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return Image.fromarray(np.round(arr).astype(np.uint8).transpose(1, 2, 0), "RGB")
