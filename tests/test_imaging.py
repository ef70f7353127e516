import numpy as np
import pytest
from PIL import Image

from helpers import bad_input_members, encode_image, photo_crops
from pipeline.io import imaging


def test_exif_orientation_is_applied():
    im = photo_crops(1, 64)[0].resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = imaging.decode(encode_image(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (48, 64)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    photo = photo_crops(1, 32)[0]
    if mode == "I;16":
        im = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    elif mode == "F":
        im = photo.convert("L").convert("F")
    else:
        im = photo.convert(mode)
    rgb = imaging.to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    if mode in ("I;16", "L"):  # 16-bit grey scales to the same 8-bit grey
        ref = np.asarray(photo.convert("L"), dtype=np.int16)
        assert np.abs(np.asarray(rgb, dtype=np.int16)[..., 0] - ref).max() <= 1


def test_alpha_is_composited_over_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert imaging.to_rgb(im).getpixel((0, 0)) == (255, 255, 255)
    assert imaging.split_alpha(im).getpixel((0, 0)) == 0


def test_bad_inputs_raise_reasons():
    members, expect = bad_input_members()
    data = dict(members)
    for name, reason in [
        ("truncated.jpg", "corrupt_image"),
        ("zero.jpg", "empty_file"),
        ("notimage.png", "not_an_image"),
        ("bomb.png", "decompression_bomb"),
    ]:
        with pytest.raises(imaging.BadImage) as err:
            imaging.decode(data[name])
        assert err.value.reason == reason == expect[name.split(".")[0]]


def test_resize_center_crop_box_in_original_pixels():
    im = Image.new("RGB", (200, 100))
    out, box = imaging.resize_center_crop(im, 50)
    assert out.size == (50, 50) and box == (50, 0, 150, 100)
    same, _ = imaging.resize_center_crop(Image.new("RGB", (50, 50)), 50)
    assert same.size == (50, 50)
