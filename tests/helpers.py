"""Test data: real photo crops and a corpus of bad inputs."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from pipeline.io import sample_photos


def photo_crops(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """``n`` real photo crops (scikit-image photos) of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    names = list(sample_photos.PHOTOS)
    out = []
    for i in range(n):
        im = sample_photos.load_photo(names[i % len(names)])
        im = im.resize((max(size, im.width // 3), max(size, im.height // 3)))
        x = int(rng.integers(0, im.width - size + 1))
        y = int(rng.integers(0, im.height - size + 1))
        out.append(im.crop((x, y, x + size, y + size)))
    return out


def write_photo_folder(root: str, n: int = 12, size: int = 64) -> list[str]:
    """A folder tree of JPEG/PNG photos in two class folders, with one caption sidecar."""
    rels = []
    for i, im in enumerate(photo_crops(n, size)):
        cls = "a" if i % 2 == 0 else "b"
        ext = "png" if i % 3 == 0 else "jpg"
        rel = f"{cls}/img_{i:03d}.{ext}"
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        im.save(os.path.join(root, rel), quality=95)
        rels.append(rel)
    with open(os.path.join(root, "a", "img_000.txt"), "w") as f:
        f.write("a caption")
    return rels


def encode_image(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def bad_input_members() -> tuple[list[tuple[str, bytes]], dict[str, str | None]]:
    """Tar members covering every bad-input case, and the expected outcome per key.

    Outcome is a skip reason, or None for a sample that must be encoded.
    """
    photo = photo_crops(1, 64)[0]
    jpeg = encode_image(photo, "JPEG", quality=90)
    members: list[tuple[str, bytes]] = []
    expect: dict[str, str | None] = {}

    def add(key: str, ext: str, data: bytes, outcome: str | None) -> None:
        members.append((f"{key}.{ext}", data))
        expect[key] = outcome

    add("good", "jpg", jpeg, None)
    add("truncated", "jpg", jpeg[: len(jpeg) // 2], "corrupt_image")
    add("zero", "jpg", b"", "empty_file")
    add("notimage", "png", b"this is not an image at all", "not_an_image")
    add("cmyk", "jpg", encode_image(photo.convert("CMYK"), "JPEG"), None)
    arr16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    add("gray16", "png", encode_image(Image.fromarray(arr16), "PNG"), None)
    add("palette", "png", encode_image(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None)
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    add("alpha", "png", encode_image(rgba, "PNG"), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    add("exif", "jpg", encode_image(photo.resize((64, 48)), "JPEG", exif=exif.tobytes()), None)
    add("tiny", "png", encode_image(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "too_small")
    add("bomb", "png", _bomb_png(), "decompression_bomb")
    add("badclass", "jpg", jpeg, "bad_class")
    members.append(("badclass.cls", b"not-a-number"))
    add("onlymeta", "json", b'{"a": 1}', "no_image")
    add("dup", "jpg", jpeg, None)
    members.append(("dup.jpg", jpeg))  # the same key again within the sample
    members.append(("../escape.jpg", jpeg))
    expect["../escape"] = "unsafe_key"
    members.append(("/abs/path.jpg", jpeg))
    expect["/abs/path"] = "unsafe_key"
    return members, expect


def _bomb_png() -> bytes:
    """A small PNG that declares 20000 x 20000 pixels (400 MPix) of one colour."""
    im = Image.new("1", (20000, 20000))
    return encode_image(im, "PNG", optimize=True)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def tiny_diffusion_checkpoint(path: str, num_classes: int = 0, task: str = "") -> str:
    """A real (untrained) diffusion checkpoint written through the library's own functions:
    a tiny denoiser, its autoencoder under ``vae/`` and the checkpoint description."""
    import torch

    from pipeline.io import checkpoint
    from pipeline.models import autoencoder, denoiser

    vae_dir = os.path.join(path, checkpoint.VAE_DIR)
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], vae_dir)
    vae = autoencoder.load(vae_dir)
    cfg = denoiser.config_for("tiny", num_classes=num_classes, cond_channels=4 if task else 0)
    torch.manual_seed(0)
    net = denoiser.build(cfg)
    info = checkpoint.CheckpointInfo(
        kind="diffusion", model=denoiser.to_dict(cfg), task=task, latent_shape=[4, 8, 8], vae_identity=vae.identity
    )
    checkpoint.save(path, info, {"model": net.state_dict(), "ema": net.state_dict()})
    return path


class RunsCommand:
    """Unpickling this object runs a shell command: a pickle payload for refusal tests."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickle_payload(marker: str) -> bytes:
    """Pickle bytes that create the file ``marker`` when unpickled (they must never be)."""
    import pickle

    return pickle.dumps({"weights": RunsCommand(f"touch {marker}")})


def png_16bit(arr: np.ndarray, filter_type: int = 0) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16) with every row under one PNG filter
    (0 none, 1 sub, 2 up, 3 average, 4 Paeth), written here byte by byte: Pillow writes no 16-bit RGB."""
    import struct
    import zlib

    h = arr.shape[0]
    bpp = 2 * (1 if arr.ndim == 2 else arr.shape[2])
    rows = arr.reshape(h, -1).astype(">u2").view(np.uint8).reshape(h, -1).astype(np.int32)
    out = []
    for y in range(h):
        x, up = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = [0 * x, left, up, (left + up) // 2, paeth][filter_type]
        out.append(bytes([filter_type]) + ((x - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", arr.shape[1], h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(out)))
        + chunk(b"IEND", b"")
    )


def png_bit_depth(data: bytes) -> int:
    """The bit depth a PNG's header declares."""
    return data[24]


def gradient_16bit(w: int, h: int) -> np.ndarray:
    """A smooth 16-bit RGB gradient (uint16 (h, w, 3)) with far more than 256 levels per channel."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    return np.round(np.stack([x, y, (x + y) / 2], -1) * 50000 + 5000).astype(np.uint16)
