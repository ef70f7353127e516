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
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def to_tensor_array(im: Image.Image) -> np.ndarray:
    """RGB image -> float32 array (3, H, W) in [-1, 1], the autoencoders' input convention."""
    arr = np.asarray(im, dtype=np.float32)
    return (arr.transpose(2, 0, 1) / 127.5) - 1.0


def from_tensor_array(arr: np.ndarray) -> Image.Image:
    """float array (3, H, W) in [-1, 1] -> RGB image (clipped)."""
    arr = np.clip((np.asarray(arr, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return Image.fromarray(np.round(arr).astype(np.uint8).transpose(1, 2, 0), "RGB")
