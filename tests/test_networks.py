"""Pretrained networks (anything spandrel recognises) in the restore job: sizes, tiling, equality
with the library's own call, refusals of pickles and unknown files, and the Ray Data job."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import photo_crops, pickle_payload
from pipeline import cli
from pipeline.config import ConfigError
from pipeline.io.checkpoint import CheckpointError
from pipeline.models import tiling
from pipeline.restoration import networks
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.restore import RestoreConfig, run_restore


def _compact(path, scale: int, num_conv: int = 2, gain: float = 1.0) -> str:
    """A tiny random Real-ESRGAN Compact network, saved as safetensors; ``gain`` scales its
    convolutions so that, as in a trained network, each pixel depends strongly on its context."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(scale)
    net = Compact(num_feat=8, num_conv=num_conv, upscale=scale)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 4:
                p.mul_(gain)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def x2_net(tmp_path_factory):
    return _compact(tmp_path_factory.mktemp("net") / "compact_x2.safetensors", 2)


def _own_call(url: str, im: Image.Image) -> np.ndarray:
    """The network's own call on the image, as a user runs it: spandrel's loader, uint8 / 255."""
    import spandrel

    own = spandrel.ModelLoader().load_from_file(url).eval()
    with torch.no_grad():
        y = own(torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0)[None])
    return np.round(y[0].numpy().transpose(1, 2, 0) * 255)


def test_a_network_restores_at_its_scale_and_matches_the_library_call(x2_net):
    assert networks.describe(x2_net, "") == "upscale2"
    r = networks.load(x2_net, "", RestoreSettings(tile=512))
    im = photo_crops(1, 24, seed=1)[0]
    out = r.restore(im)
    assert out.size == (48, 48) and r.task == "upscale2"
    # within one tile: exactly the network's own call, pixel for pixel
    assert np.array_equal(np.asarray(out, np.float32), _own_call(x2_net, im))


def test_tiled_network_matches_the_library_call_and_batches_by_size(tmp_path):
    # reach of 4 input pixels (four 3x3 convolutions), strong weights: tile edges would show
    net = _compact(tmp_path / "strong_x2.safetensors", 2, num_conv=2, gain=2.0)
    ims = [*photo_crops(2, 150, seed=2), photo_crops(1, 40, seed=3)[0]]
    # 64-px input tiles with a 16-px overlap: a quarter of it (4 px) covers the network's reach
    settings = RestoreSettings(tile=128, overlap=32)
    assert len(tiling.windows(150, 150, 64, 16)) > 4
    tiled = networks.load(net, "upscale2", settings).restore_many(ims)
    for out, im in zip(tiled, ims):
        assert out.size == (2 * im.width, 2 * im.height)
        diff = np.abs(np.asarray(out, np.float32) - _own_call(net, im))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_16bit_levels_go_through_a_network_unrounded(x2_net):
    import spandrel

    from helpers import gradient_16bit

    levels = gradient_16bit(30, 20) / np.float32(257)
    out = networks.load(x2_net, "", RestoreSettings()).restore(levels)
    own = spandrel.ModelLoader().load_from_file(x2_net).eval()
    with torch.no_grad():
        ref = own(torch.from_numpy(levels.transpose(2, 0, 1) / 255.0)[None])[0].numpy().transpose(1, 2, 0) * 255
    assert isinstance(out, np.ndarray) and out.shape == (40, 60, 3)
    assert np.abs(out - ref).max() < 1e-3  # the network's own call, not rounded to 8 bits
    assert len(np.unique(np.round(out[..., 0] * 257))) > 256


def test_pickles_and_unknown_files_are_refused_on_the_driver(tmp_path, x2_net, capsys):
    marker = str(tmp_path / "pwned")
    (tmp_path / "evil.pth").write_bytes(pickle_payload(marker))
    with pytest.raises(ConfigError, match="pickles"):
        networks.describe(str(tmp_path / "evil.pth"), "")
    save_file({"not.a.network": torch.zeros(3)}, str(tmp_path / "random.safetensors"))
    with pytest.raises(CheckpointError, match="no network architecture"):
        networks.describe(str(tmp_path / "random.safetensors"), "")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        networks.describe(str(tmp_path / "junk.safetensors"), "")
    with pytest.raises(ConfigError, match="its task is 'upscale2', not 'upscale4'"):
        networks.describe(x2_net, "upscale4")
    (tmp_path / "in").mkdir()
    photo_crops(1, 16)[0].save(tmp_path / "in" / "a.png")
    rc = cli.main(
        [
            "restore",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "o"),
            "--checkpoint",
            str(tmp_path / "evil.pth"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "pickles" in err and "Traceback" not in err
    assert not os.path.exists(marker) and not (tmp_path / "o").exists()


def test_the_restore_job_runs_a_network(x2_net, tmp_path, ray_cluster):
    (tmp_path / "in").mkdir()
    for i, im in enumerate(photo_crops(3, 32, seed=4)):
        im.save(tmp_path / "in" / f"p{i}.png")
    Image.new("L", (20, 12), 90).save(tmp_path / "in" / "grey.png")
    report = run_restore(
        RestoreConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), checkpoint=x2_net, cpus_per_actor=0.5)
    )
    assert (report["written"], report["errors"], report["task"]) == (4, 0, "upscale2")
    assert Image.open(tmp_path / "o" / "p0.png").size == (64, 64)
    grey = Image.open(tmp_path / "o" / "grey.png")
    assert grey.size == (40, 24) and grey.mode == "L"


def test_eval_scores_a_network_next_to_the_classical_rows(x2_net, tmp_path):
    from pipeline.models import degrade
    from pipeline.models.quality import psnr
    from pipeline.stages.eval import EvalConfig, evaluate, format_table

    (tmp_path / "hr").mkdir()
    for i, im in enumerate(photo_crops(2, 48, seed=14)):
        im.save(tmp_path / "hr" / f"p{i}.png")
    cfg = EvalConfig(task="upscale2", checkpoint=x2_net, images=str(tmp_path / "hr"), out=str(tmp_path / "e"))
    result = evaluate(cfg)
    scores = result["scores"]
    assert set(scores) == {"model", "bicubic", "lanczos", "back_projection"}  # no autoencoder to reconstruct with
    assert result["calibration"] == {} and result["recommended_gain"] is None and result["checkpoint_step"] is None
    # the model row is the network's own output on the task's degradation of each photo
    r = networks.load(x2_net, "upscale2", RestoreSettings())
    want = []
    for i in range(2):
        hr = Image.open(tmp_path / "hr" / f"p{i}.png").convert("RGB")
        lr = degrade.degrade("upscale2", hr, degrade.seed_for(f"p{i}.png"))
        out, ref = (
            torch.from_numpy(np.asarray(x, np.float32).transpose(2, 0, 1) / 127.5 - 1)[None]
            for x in (r.restore(lr), hr)
        )
        want.append(float(psnr(out, ref)))
    assert scores["model"]["psnr_per_image"] == pytest.approx(want, abs=1e-3)
    assert scores["back_projection"]["psnr"] > scores["bicubic"]["psnr"]
    table = format_table(result)
    assert (tmp_path / "e" / "eval.json").exists() and "a pretrained network or pipeline" in table
    assert "autoencoder" not in table and "recommended --gain" not in table
    with pytest.raises(ConfigError, match="so its task is 'upscale2', not 'upscale4'"):
        evaluate(EvalConfig(task="upscale4", checkpoint=x2_net, images=str(tmp_path / "hr"), out=str(tmp_path / "f")))
