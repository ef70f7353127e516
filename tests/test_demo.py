"""The embedded default: a reduced demo runs end to end and its report has every section with numbers."""

from __future__ import annotations

import json
import logging
import re

from pipeline.stages.demo import DemoConfig, run_demo
from pipeline.stages.report import SECTIONS


def test_quick_demo_end_to_end_and_resume(tmp_path, ray_cluster, caplog):
    wd = tmp_path / "demo"
    out = run_demo(DemoConfig(workdir=str(wd), quick=True))
    report = (wd / "report.html").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in report, section
    assert report.count("data:image/png;base64,") == 6  # self-contained: every figure embedded
    assert 'src="http' not in report and "src='http" not in report
    # a loss curve (inline SVG) per training stage: train-vae, train, train-refiner, train-inpaint,
    # train-upscale4
    assert report.count('<svg xmlns="http://www.w3.org/2000/svg" class="loss-curve"') == 5
    assert "no metrics.jsonl" not in report and "no loss logged" not in report
    stages = json.loads((wd / "stages.json").read_text())
    assert set(stages) == {
        "photos",
        "shards",
        "train-vae",
        "encode",
        "text-encoder",
        "shards-captioned",
        "encode-captioned",
        "train",
        "shards-refiner",
        "train-refiner",
        "train-inpaint",
        "train-upscale4",
        "sample",
        "eval",
        "restore",
        "eval-inpaint",
        "restore-inpaint",
    }
    assert all(s["seconds"] > 0 for s in stages.values())
    ev = out["eval"]
    for name in ("model", "bicubic", "lanczos", "autoencoder"):
        assert 5 < ev["scores"][name]["psnr"] < 60 and 0 < ev["scores"][name]["ssim"] <= 1
        assert re.search(rf"<td>{name}</td><td>{ev['scores'][name]['psnr']:.2f}</td>", report)
    from pipeline.models import loading

    assert loading.load(str(wd / "upscale4")).refiner is not None  # the x4 refiner travels in the checkpoint
    assert (wd / "restored" / "_report.json").exists()
    assert json.loads((wd / "restored" / "_report.json").read_text())["written"] == 3
    _check_inpainting(wd, report)
    # text-to-image: bucketed, captioned latents; a transformer; samples per prompt at two sizes
    man = json.loads((wd / "captioned-latents" / "_manifest.json").read_text())
    assert {tuple(b["size"]) for b in man["buckets"]} == {(48, 80), (64, 64), (80, 48)}
    assert all(b["samples"] > 0 for b in man["buckets"]) and man["flip"] is True
    assert "tiny random-weight stand-in" in report
    from PIL import Image

    sheet = Image.open(wd / "samples.png")
    assert sheet.size == (150 + (2 * 80 + 6) + (2 * 48 + 6), 3 * (80 + 6))  # 2 per prompt at 80x48 and 48x80

    # a second run finds every stage done and only rewrites the report
    caplog.set_level(logging.INFO, logger="pipeline")
    caplog.clear()
    run_demo(DemoConfig(workdir=str(wd), quick=True))
    assert sum("already done" in line for line in caplog.messages) == len(stages)


def _check_inpainting(wd, report: str) -> None:
    """The inpainting refiner: calibrated, scored in the hole next to its base, and run as a job
    over the damaged held-out photos with the demo's mask folder."""
    import numpy as np
    from PIL import Image

    from pipeline.io import checkpoint

    info = checkpoint.read_info(checkpoint.local_copy(str(wd / "inpaint")))
    assert info.gain is not None and info.calibration["images"] == 3 + 6  # held-out crops + 2 of 3 photos
    ev = json.loads((wd / "eval-inpaint" / "eval.json").read_text())
    assert ev["task"] == "inpaint" and ev["gain"] == info.gain
    model, base = ev["scores"]["model"], ev["scores"]["classical_base"]
    assert model["psnr"] >= base["psnr"] - 1e-3  # the calibrated default is never below its base
    for name in ("model", "classical_base"):
        assert re.search(rf"<td>{name}</td><td>{ev['scores'][name]['psnr']:.2f}</td>", report)
    assert "id='inpainting'" in report and "restore --task inpaint --checkpoint" in report
    job = json.loads((wd / "inpainted" / "_report.json").read_text())
    assert job["written"] == 3 and job["errors"] == 0
    for name in sorted(p.name for p in (wd / "heldout").iterdir()):
        hole = np.asarray(Image.open(wd / "masks" / name)) > 127
        damaged = np.asarray(Image.open(wd / "damaged" / name).convert("RGB"))
        out = np.asarray(Image.open(wd / "inpainted" / name).convert("RGB"))
        assert 0.04 < hole.mean() < 0.26 and (damaged[hole] == 128).all()
        assert (out[~hole] == damaged[~hole]).all()  # outside the hole: the input, byte for byte
        assert (out[hole] != 128).any()  # the hole is filled
