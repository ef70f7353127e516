"""Real sample photos for the embedded default: scikit-image's bundled photographs, cut into crops.

Nothing is downloaded: only the photos that ship inside the installed scikit-image package are
used. Each photo becomes a class (its folder); crops are written as JPEG (and a few as PNG) so
the shards stage sees ordinary files. Some photos are held out whole for evaluation.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Colour photographs shipped in skimage/data (file name -> class folder).
PHOTOS = {
    "chelsea.png": "cat",
    "coffee.png": "coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "hubble_deep_field.jpg": "hubble",
    "retina.jpg": "retina",
    "ihc.png": "ihc",
}
# Short captions per class, for the text-to-image part of the demo.
CAPTIONS = {
    "cat": "a photo of a cat",
    "coffee": "a photo of coffee",
    "rocket": "a photo of a rocket",
    "motorcycle": "a photo of a motorcycle",
    "hubble": "a photo of galaxies",
    "retina": "a photo of a retina",
    "ihc": "a photo of stained cells",
}
HELD_OUT_PHOTO = "astronaut.png"  # never cut into training crops; evaluation images come from it
# Other photos never trained on, for calibration only (not in bench/quality.py's set either): a
# calibration on crops of one photo picked gains that whole photos of other content did not bear.
CALIBRATION_PHOTOS = ("cell.png", "page.png", "clock_motion.png")


def photo_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def load_photo(name: str) -> Image.Image:
    path = os.path.join(photo_dir(), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"scikit-image does not ship {name} in {photo_dir()}")
    return Image.open(path).convert("RGB")


def _at_most(im: Image.Image, short_side: int) -> Image.Image:
    """Bring a big photo down (shorter side ``short_side``) so a crop holds a recognisable part of the scene."""
    scale = short_side / min(im.size)
    if scale >= 1:
        return im
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)


def write_crops(
    out_dir: str,
    crop: int = 96,
    per_photo: int = 24,
    seed: int = 0,
    photos: dict[str, str] | None = None,
    short_side: int = 256,
    png_every: int = 6,
) -> int:
    """Write ``per_photo`` random square crops of each photo into ``out_dir/<class>/``, from the
    photo brought down to ``short_side``; every ``png_every``-th crop is a PNG, the others JPEG."""
    rng = np.random.default_rng(seed)
    n = 0
    for fname, cls in (photos or PHOTOS).items():
        im = _at_most(load_photo(fname), short_side)
        os.makedirs(os.path.join(out_dir, cls), exist_ok=True)
        for i in range(per_photo):
            x = int(rng.integers(0, im.width - crop + 1))
            y = int(rng.integers(0, im.height - crop + 1))
            tile = im.crop((x, y, x + crop, y + crop))
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ext = "png" if i % png_every == 0 else "jpg"
            path = os.path.join(out_dir, cls, f"{cls}_{i:03d}.{ext}")
            tile.save(path, quality=95) if ext == "jpg" else tile.save(path)
            n += 1
    return n


def write_captioned_crops(out_dir: str, sizes: list[tuple[int, int]], per_photo: int = 24, seed: int = 3) -> int:
    """Crops of each photo at the given (width, height) sizes in turn (mixed aspect ratios),
    each with a ``.txt`` caption from :data:`CAPTIONS` beside it (``name.jpg`` + ``name.txt``)."""
    rng = np.random.default_rng(seed)
    n = 0
    for fname, cls in PHOTOS.items():
        im = _at_most(load_photo(fname), 256)
        os.makedirs(os.path.join(out_dir, cls), exist_ok=True)
        for i in range(per_photo):
            w, h = sizes[i % len(sizes)]
            x = int(rng.integers(0, im.width - w + 1))
            y = int(rng.integers(0, im.height - h + 1))
            stem = os.path.join(out_dir, cls, f"{cls}_{i:03d}")
            im.crop((x, y, x + w, y + h)).save(stem + ".jpg", quality=95)
            with open(stem + ".txt", "w") as f:
                f.write(CAPTIONS[cls])
            n += 1
    return n


def write_calibration(out_dir: str, size: int = 128, count: int = 6, seed: int = 2) -> list[str]:
    """Calibration images: ``count`` crops of the held-out photo (other than the evaluation crops
    for another ``seed``) and two crops of each of :data:`CALIBRATION_PHOTOS`."""
    paths = write_held_out(out_dir, size, count, seed)
    rng = np.random.default_rng(seed)
    for name in CALIBRATION_PHOTOS:
        im = load_photo(name)
        for i in range(2):
            for _ in range(50):  # a crop with some content (a flat patch says nothing about a gain)
                x = int(rng.integers(0, im.width - size + 1))
                y = int(rng.integers(0, im.height - size + 1))
                crop = im.crop((x, y, x + size, y + size))
                if float(np.asarray(crop.convert("L"), np.float32).std()) >= 12:
                    break
            p = os.path.join(out_dir, f"{name.split('.')[0]}_{i}.png")
            crop.save(p)
            paths.append(p)
    return paths


def write_held_out(out_dir: str, size: int = 128, count: int = 6, seed: int = 1) -> list[str]:
    """Held-out evaluation images: crops of a photo never used for training."""
    rng = np.random.default_rng(seed)
    im = load_photo(HELD_OUT_PHOTO)
    scale = 384 / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(count):
        x = int(rng.integers(0, im.width - size + 1))
        y = int(rng.integers(0, im.height - size + 1))
        p = os.path.join(out_dir, f"heldout_{i:02d}.png")
        im.crop((x, y, x + size, y + size)).save(p)
        paths.append(p)
    return paths
