"""The classical bases restoration builds on, and the scores it is measured with (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io import sample_photos
from pipeline.models import degrade
from pipeline.models.quality import psnr, psnr_y


def _down(arr: np.ndarray, scale: int) -> np.ndarray:
    h, w = arr.shape[:2]
    return degrade._resize_channels(arr, (w // scale, h // scale), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("scale", [2, 4])
def test_back_projection_is_consistent_with_its_input(scale):
    photo = sample_photos.load_photo("coffee.png").convert("RGB").resize((96, 64))
    x = degrade.back_project(photo, scale)  # the default 10 steps, on a photo
    assert x.shape == (64 * scale, 96 * scale, 3)
    assert np.abs(_down(x, scale) - np.asarray(photo, np.float32)).max() < 0.5
    lanczos = np.asarray(photo.resize((96 * scale, 64 * scale), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(_down(lanczos, scale) - np.asarray(photo, np.float32)).max() > 5  # Lanczos is not
    noise = Image.fromarray((np.random.default_rng(scale).random((20, 28, 3)) * 255).astype(np.uint8))
    err = np.abs(_down(degrade.back_project(noise, scale, iters=30), scale) - np.asarray(noise, np.float32))
    assert err.max() < 0.01  # it converges even on the hardest input


@pytest.mark.parametrize("scale", [2, 4])
def test_back_projection_is_never_below_lanczos_on_whole_photos(scale):
    for name in ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"):
        hr = sample_photos.load_photo(name).convert("RGB")
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        lr = degrade.degrade(f"upscale{scale}", hr, 0)
        target = torch.from_numpy(np.asarray(hr, np.float32).transpose(2, 0, 1) / 127.5 - 1)[None]

        def score(arr: np.ndarray) -> float:
            pred = torch.from_numpy(np.clip(arr, 0, 255).transpose(2, 0, 1) / 127.5 - 1)[None]
            return float(psnr(pred, target))

        base = score(degrade.classical_base(f"upscale{scale}", lr))
        lanczos = score(np.asarray(lr.resize(hr.size, Image.Resampling.LANCZOS), np.float32))
        assert base > lanczos + 0.05, (name, base, lanczos)


def test_the_restore_task_base_beats_its_input_on_whole_held_out_photos():
    """TV denoising + Wiener deconvolution of the known blur: tuned on the training photos, never
    below the degraded input on photos it was not tuned on."""
    import skimage.data

    for name in ("astronaut", "camera", "coins", "text"):
        hr = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((256, 256))
        lr = degrade.degrade("restore", hr, degrade.seed_for(name))
        target = np.asarray(hr, np.float64)

        def score(arr: np.ndarray) -> float:
            return 10 * np.log10(255**2 / np.mean((np.clip(arr, 0, 255) - target) ** 2))

        base = score(degrade.classical_base("restore", lr))
        assert base > score(np.asarray(lr, np.float64)) + 0.2, name


def test_luma_psnr_follows_the_literature_convention():
    a = torch.zeros(1, 3, 16, 16)
    b = a.clone()
    b[..., :2, :] = 1.0  # differences only in the top 2 rows
    assert float(psnr_y(a, b, border=2)) == pytest.approx(100.0)  # cropped away (clamped MSE)
    assert float(psnr_y(a, b)) < 30
    grey_step = torch.full((1, 3, 8, 8), 0.0)
    shifted = grey_step + 2 / 255 * 2  # +2 levels on every channel -> Y moves by 2 * 219/255 levels
    expected = 10 * np.log10(255**2 / (2 * 219 / 255) ** 2)
    assert float(psnr_y(grey_step, shifted)) == pytest.approx(expected, abs=0.05)


def test_adain_colour_fix_matches_the_base_over_the_image_not_its_padding(tmp_path):
    """The restorer pads images to its grid; the colour statistics must come from the image."""
    from helpers import tiny_diffusion_checkpoint
    from pipeline.models import loading
    from pipeline.restoration.restorer import Restorer, RestoreSettings

    model = loading.load(tiny_diffusion_checkpoint(str(tmp_path / "ck"), task="restore"))
    r = Restorer(model, "restore", RestoreSettings(color_fix="adain", gain=1.0))
    assert 33 % r.multiple and 45 % r.multiple  # the image gets padded
    rng = np.random.default_rng(0)
    arr = (100 + rng.random((33, 45, 3)) * 60).astype(np.uint8)  # mid-grey: nothing clips
    arr[-1] = 250  # a bright last row: replicate padding would repeat it and skew the statistics
    im = Image.fromarray(arr)
    out = np.asarray(r.restore(im), np.float64)
    base = degrade.classical_base("restore", im).astype(np.float64)
    np.testing.assert_allclose(out.mean((0, 1)), base.mean((0, 1)), atol=1.0)
    np.testing.assert_allclose(out.std((0, 1)), base.std((0, 1)), rtol=0.03)


def _hole(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    hole = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        hole[y0:y1, x0:x1] = True
    return hole


def test_the_inpainting_base_is_scikit_images_biharmonic_fill():
    from skimage.restoration import inpaint_biharmonic

    im = sample_photos.load_photo("coffee.png").convert("RGB").resize((160, 120))
    hole = _hole(120, 160, [(20, 30, 50, 70), (70, 100, 110, 150), (0, 0, 8, 12)])  # one at the image's corner
    base = degrade.inpaint_base(im, hole)
    own = inpaint_biharmonic(np.asarray(im, np.float32), hole, channel_axis=-1, split_into_regions=True)
    np.testing.assert_array_equal(base, own)
    np.testing.assert_array_equal(base[~hole], np.asarray(im, np.float32)[~hole])  # outside: the image itself
    assert np.abs(base[hole] - np.asarray(im, np.float32)[hole]).mean() > 1  # the hole was filled, not kept


def test_a_large_hole_is_filled_coarse_to_fine_and_continues_a_smooth_image():
    """Past ``exact_pixels`` the hole is filled at a lower resolution: on a smooth image (a linear
    ramp, which the biharmonic fill continues exactly) it stays within a level of the truth."""
    yy, xx = np.mgrid[0:128, 0:192].astype(np.float32)
    ramp = np.stack([yy, xx, 0.5 * yy + 0.3 * xx + 20], -1)
    hole = _hole(128, 192, [(30, 40, 100, 150)])
    coarse = degrade.biharmonic_fill(ramp, hole, exact_pixels=hole.sum() // 10)  # at 1/4 resolution
    np.testing.assert_array_equal(coarse[~hole], ramp[~hole])
    assert np.abs(coarse - ramp)[hole].max() < 0.05
    noisy = ramp + np.random.default_rng(0).normal(0, 20, ramp.shape).astype(np.float32)
    exact = degrade.biharmonic_fill(noisy, hole)
    fast = degrade.biharmonic_fill(noisy, hole, exact_pixels=hole.sum() // 10)
    assert not np.array_equal(exact, fast)  # the coarse route did run
    # block means average the boundary's noise: the coarse fill stays near the smooth truth, where the
    # exact solve extrapolates the noisy boundary's slopes (measured: 2.9 vs 22.6 levels)
    assert np.abs(fast - ramp)[hole].mean() < 5 < np.abs(exact - ramp)[hole].mean()
    with pytest.raises(ValueError, match="whole image"):
        degrade.biharmonic_fill(ramp, np.ones((128, 192), bool))


def test_generated_inpainting_masks_are_seeded_boxes_and_strokes_of_5_to_25_percent():
    shares = []
    for seed in range(60):
        hole = degrade.inpaint_mask(96, 128, seed)
        assert hole.shape == (96, 128) and hole.dtype == bool
        shares.append(hole.mean())
    assert min(shares) >= 0.05 and max(shares) <= 0.25 and max(shares) - min(shares) > 0.1
    np.testing.assert_array_equal(degrade.inpaint_mask(96, 128, 7), degrade.inpaint_mask(96, 128, 7))
    assert not np.array_equal(degrade.inpaint_mask(96, 128, 7), degrade.inpaint_mask(96, 128, 8))
