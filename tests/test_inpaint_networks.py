"""Pretrained inpainting networks (spandrel's LaMa, MAT from spandrel_extra_arches) in the restore
job: the architectures' own published configurations with random weights, saved as safetensors,
run through ``restore --task inpaint`` on the S3 test endpoint and ``eval --task inpaint``;
exactness against the library's own call, the crops around holes, refusals on the driver."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import photo_crops, pickle_payload
from pipeline import cli
from pipeline.config import ConfigError
from pipeline.io import storage
from pipeline.models import degrade
from pipeline.restoration import backends, inpaint_networks, networks
from pipeline.restoration.inpaint_networks import NetworkInpainter, crops
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.restore import RestoreConfig, run_restore


def _save(net: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def lama_file(tmp_path_factory):
    """big-lama's architecture (spandrel's LaMa, 51M parameters), random weights; its last
    convolution scaled up so that, as in a trained network, the fill varies with its context."""
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(0)
    net = LaMa(in_nc=4, out_nc=3)
    with torch.no_grad():
        net.model.model[-2].weight.mul_(100)
    return _save(net, tmp_path_factory.mktemp("lama") / "big-lama.safetensors")


@pytest.fixture(scope="module")
def mat_file(tmp_path_factory):
    """MAT's architecture (spandrel_extra_arches, 62M parameters, 512x512), random weights."""
    networks.install_extra_arches()
    from spandrel_extra_arches.architectures.MAT import MAT

    torch.manual_seed(1)
    return _save(MAT(), tmp_path_factory.mktemp("mat") / "mat.safetensors")


def _own_call(url: str, im: Image.Image, hole: np.ndarray, like: NetworkInpainter) -> np.ndarray:
    """The network's own call as a user makes it: spandrel's loader, ``descriptor(uint8 / 255,
    mask)``; MAT's latent and its call's random state as the backend's (drawn from --seed)."""
    import spandrel

    own = spandrel.ModelLoader().load_from_file(url).eval()
    if own.architecture.id == "MAT":
        own.model.z = like.net.model.z.clone()
    x = torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0)[None]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(like.opts.seed)
        y = own(x, torch.from_numpy(hole.astype(np.float32))[None, None])
    return np.round(y[0].numpy().transpose(1, 2, 0) * 255)


def test_crops_around_holes_merge_and_respect_the_working_size():
    hole = np.zeros((300, 400), bool)
    assert crops(hole[:64, :64], 64, 16) == [(0, 64, 0, 64)]  # fits: the whole image, one call
    hole[20:30, 20:40] = True  # two holes far apart, one near the first
    hole[250:260, 350:360] = True
    hole[40:44, 60:64] = True
    boxes = sorted(crops(hole, 128, 16))
    # the two near holes share one crop (their contexts meet); the far one has its own
    assert len(boxes) == 2
    (a, b) = boxes
    assert a[0] == 0 and a[2] == 0 and a[1] >= 44 + 32 and a[3] >= 64 + 32  # each hole + >= 32 px context
    assert b == (250 - 32, 260 + 32, 350 - 32, 360 + 32)
    for y0, y1, x0, x1 in boxes:  # every hole pixel in exactly one crop
        assert hole[y0:y1, x0:x1].any()
    assert sum(hole[y0:y1, x0:x1].sum() for y0, y1, x0, x1 in boxes) == hole.sum()
    # a fixed-size architecture (MAT) gets crops of its size, within the image
    assert crops(hole, 512, 512) == [(0, 300, 0, 400)]
    wide = np.zeros((600, 1500), bool)
    wide[100:110, 700:710] = True
    assert crops(wide, 512, 512) == [(0, 512, 449, 961)]


def test_inpainting_networks_are_recognised_and_refused_for_other_tasks(lama_file, mat_file, tmp_path, capsys):
    from spandrel.architectures.Compact import Compact

    assert networks.describe(lama_file, "") == "inpaint" == backends.check(mat_file, "inpaint")
    with pytest.raises(ConfigError, match=r"inpainting network \(LaMa\), so its task is 'inpaint', not 'upscale4'"):
        backends.check(lama_file, "upscale4")
    sr = _save(Compact(num_feat=8, num_conv=2, upscale=2), tmp_path / "x2.safetensors")
    with pytest.raises(ConfigError, match=r"x2 .* so its task is 'upscale2', not 'inpaint'"):
        backends.check(sr, "inpaint")
    (tmp_path / "in").mkdir()
    photo_crops(1, 16)[0].save(tmp_path / "in" / "a.png")
    marker = str(tmp_path / "pwned")
    (tmp_path / "lama.pth").write_bytes(pickle_payload(marker))
    for ckpt, task, says in (
        (lama_file, "upscale4", "so its task is 'inpaint', not 'upscale4'"),
        (sr, "inpaint", "so its task is 'upscale2', not 'inpaint'"),
        (str(tmp_path / "lama.pth"), "inpaint", "pickles"),
    ):
        args = ["restore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--checkpoint", ckpt]
        rc = cli.main([*args, "--task", task, "--mask", str(tmp_path / "in")])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if says in ln]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not os.path.exists(marker) and not (tmp_path / "o").exists()


def _put(bucket: str, name: str, im: Image.Image) -> None:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    storage.write_bytes(f"{bucket}/{name}", buf.getvalue())


def _get(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB"))


def _inpaint_job(bucket: str, ckpt: str, out: str, **settings) -> dict:
    return run_restore(
        RestoreConfig(
            input=f"{bucket}/in",
            output=f"{bucket}/{out}",
            checkpoint=ckpt,
            task="inpaint",
            mask=f"{bucket}/masks",
            actors=1,
            cpus_per_actor=0.5,
            settings=RestoreSettings(**settings),
        )
    )


def test_lama_inpaints_on_s3_exactly_as_its_own_call(lama_file, bucket, ray_cluster):
    # one image within the tile (one call: the network's own), one larger (crops around its holes)
    images = [photo_crops(1, 48, seed=50)[0], photo_crops(1, 150, seed=51)[0].crop((0, 0, 150, 100))]
    holes = [degrade.inpaint_mask(48, 48, seed=60).copy(), np.zeros((100, 150), bool)]
    holes[0][20:34, 16:32] = True  # a box too, so that the hole has an interior (feather weight 1)
    holes[1][10:22, 12:30] = True
    holes[1][70:90, 120:135] = True
    for i, (im, hole) in enumerate(zip(images, holes)):
        _put(bucket, f"in/p{i}.png", im)
        _put(bucket, f"masks/p{i}.png", Image.fromarray(hole.astype(np.uint8) * 255, "L"))
    storage.write_bytes(f"{bucket}/nets/lama.safetensors", open(lama_file, "rb").read())
    remote = f"{bucket}/nets/lama.safetensors"
    tile = 64
    for out, gain in (("default", None), ("zero", 0.0)):
        report = _inpaint_job(bucket, remote, out, tile=tile, overlap=8, gain=gain)
        assert (report["written"], report["errors"], report["task"]) == (2, 0, "inpaint")
    inp = networks.load(lama_file, "inpaint", RestoreSettings(tile=tile, overlap=8))
    assert isinstance(inp, NetworkInpainter) and inp.gain == 1.0 and inp.size == tile
    for i, (im, hole) in enumerate(zip(images, holes)):
        px, default, zero = np.asarray(im), _get(f"{bucket}/default/p{i}.png"), _get(f"{bucket}/zero/p{i}.png")
        assert 0 < hole.mean() <= 0.25
        for out in (default, zero):
            np.testing.assert_array_equal(out[~hole], px[~hole])  # outside the hole: byte-identical
        base = np.round(np.clip(degrade.inpaint_base(im, hole), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(zero, base)  # gain 0: exactly the biharmonic base
        assert np.abs(default.astype(int) - base)[hole].mean() > 2  # the default is the network's fill
    # within the tile: the hole's interior (feather weight 1) is the network's own call
    inner = degrade.feather(holes[0]) >= 1
    assert inner.sum() > 20
    diff = np.abs(_get(f"{bucket}/default/p0.png").astype(float) - _own_call(lama_file, images[0], holes[0], inp))
    assert diff[inner].max() <= 1, diff[inner].max()
    # larger than the tile: each hole's crop (its box and 32 px of context, within 64 px: run as
    # it is) gets the network's own call on that crop, the other hole's pixels given as the base
    im, hole = images[1], holes[1]
    known = np.where(hole[..., None], degrade.inpaint_base(im, hole), np.asarray(im, np.float32))
    default = _get(f"{bucket}/default/p1.png").astype(float)
    for y0, y1, x0, x1 in crops(hole, tile, 16):
        assert max(y1 - y0, x1 - x0) <= tile
        region = hole[y0:y1, x0:x1]
        crop = Image.fromarray(np.round(known[y0:y1, x0:x1]).astype(np.uint8))
        own = _own_call(lama_file, crop, region, inp)
        interior = (degrade.feather(hole) >= 1)[y0:y1, x0:x1]
        assert np.abs(default[y0:y1, x0:x1] - own)[interior].max() <= 1


def test_mat_inpaints_as_its_own_call_at_512(mat_file, bucket, ray_cluster):
    im = photo_crops(1, 64, seed=70)[0]
    hole = degrade.inpaint_mask(64, 64, seed=71)
    _put(bucket, "in/m.png", im)
    _put(bucket, "masks/m.png", Image.fromarray(hole.astype(np.uint8) * 255, "L"))
    report = _inpaint_job(bucket, mat_file, "mat", seed=3)
    assert (report["written"], report["errors"]) == (1, 0)
    out = _get(f"{bucket}/mat/m.png")
    np.testing.assert_array_equal(out[~hole], np.asarray(im)[~hole])
    inp = networks.load(mat_file, "inpaint", RestoreSettings(seed=3))
    assert isinstance(inp, NetworkInpainter) and inp.size == 512 == inpaint_networks.working_size(inp.net, 64)
    inner = degrade.feather(hole) >= 1
    diff = np.abs(out.astype(float) - _own_call(mat_file, im, hole, inp))
    assert inner.sum() > 20 and diff[inner].max() <= 1, diff[inner].max()


def test_eval_scores_lama_against_the_biharmonic_base(lama_file, tmp_path):
    from pipeline.stages.eval import EvalConfig, evaluate, format_table

    (tmp_path / "hr").mkdir()
    for i, im in enumerate(photo_crops(2, 48, seed=80)):
        im.save(tmp_path / "hr" / f"p{i}.png")
    result = evaluate(
        EvalConfig(task="inpaint", checkpoint=lama_file, images=str(tmp_path / "hr"), out=str(tmp_path / "e"))
    )
    scores = result["scores"]
    assert set(scores) >= {"model", "classical_base"}
    assert len(scores["model"]["psnr_per_image"]) == 2
    assert scores["model"]["psnr_per_image"] != scores["classical_base"]["psnr_per_image"]
    table = format_table(result)
    assert (tmp_path / "e" / "eval.json").exists() and "classical_base" in table
    assert "1.0" in result["calibration"] and "recommended --gain" in table  # the network's own fill is gain 1
