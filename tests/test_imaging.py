import numpy as np
import pytest
from PIL import Image

from helpers import bad_input_members, encode_image, photo_crops, png_16bit, png_bit_depth
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


@pytest.mark.parametrize("filter_type", range(5))
def test_16bit_png_decodes_with_all_its_bits_whatever_its_row_filter(filter_type):
    arr = np.random.default_rng(filter_type).integers(0, 65536, (19, 23, 3)).astype(np.uint16)
    im, levels = imaging.decode_pixels(png_16bit(arr, filter_type))
    assert im.mode == "RGB" and levels is not None and levels.shape == (19, 23, 3)
    assert np.array_equal(np.round(levels * 257), arr)  # Pillow's own RGB keeps only the high byte
    assert np.array_equal(np.asarray(im), arr >> 8)
    _grey, g = imaging.decode_pixels(png_16bit(arr[..., 1], filter_type))
    assert g is not None and np.array_equal(np.round(g * 257), np.repeat(arr[..., 1:2], 3, -1))


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_16bit_tiff_decodes_with_all_its_bits(byteorder, compression):
    import io

    import tifffile

    arr = np.random.default_rng(7).integers(0, 65536, (17, 29, 3)).astype(np.uint16)
    for a, photometric in ((arr, "rgb"), (arr[..., 0], "minisblack")):
        buf = io.BytesIO()
        tifffile.imwrite(buf, a, byteorder=byteorder, compression=compression, photometric=photometric)
        _im, levels = imaging.decode_pixels(buf.getvalue())
        assert levels is not None
        want = a if a.ndim == 3 else np.repeat(a[..., None], 3, -1)
        assert np.array_equal(np.round(levels * 257), want)


def test_16bit_levels_are_written_as_16bit_png_and_tiff_and_8bit_sources_have_none():
    arr = np.random.default_rng(3).integers(0, 65536, (11, 13, 3)).astype(np.uint16)
    levels = arr / np.float32(257)
    for fmt in imaging.FORMATS_16BIT:
        data = imaging.encode_16bit(levels, fmt)
        assert data[:4] == (b"\x89PNG" if fmt == "PNG" else b"II*\x00")
        _im, back = imaging.decode_pixels(data)
        assert back is not None and np.array_equal(np.round(back * 257), arr)
        _g, grey = imaging.decode_pixels(imaging.encode_16bit(levels, fmt, grey=True))
        luma = levels @ np.array([0.299, 0.587, 0.114], np.float32)
        assert grey is not None and np.abs(grey[..., 0] - luma).max() <= 0.5 / 257 + 1e-4
    assert png_bit_depth(imaging.encode_16bit(levels, "PNG")) == 16
    for mode in ("RGB", "L", "RGBA", "P"):
        assert imaging.decode_pixels(encode_image(Image.new(mode, (8, 8)), "PNG"))[1] is None
