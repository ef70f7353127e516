"""The demo report on a synthetic workdir: every file ``write_report`` reads, written for real."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

from PIL import Image

from helpers import photo_crops
from pipeline.models import autoencoder
from pipeline.stages import report
from pipeline.stages.demo import PATHS

STAGE_OUTPUTS = ("vae", "diffusion", "refiner4", "inpaint", "upscale4")


def _json(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_metrics(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def training_rows(first: float, last: float, steps: int = 40, every: int = 10) -> list[dict]:
    """Rows as ``MetricsLog`` writes them: a loss window every ``every`` steps, then a checkpoint
    row without a loss (held-out scores only)."""
    n = steps // every
    rows: list[dict] = [
        {
            "step": (i + 1) * every,
            "time": 1000.0 + i,
            "loss": first * (last / first) ** (i / max(n - 1, 1)),
            "grad_norm": 1.0,
            "lr": 1e-3,
            "samples_per_s": 20.0 + i,
            "data_wait_share": 0.1,
        }
        for i in range(n)
    ]
    rows.append({"step": steps, "time": 2000.0, "psnr": 20.0, "ssim": 0.5})
    return rows


def synthetic_workdir(root: str) -> dict[str, str]:
    """A demo workdir with every file the report reads; returns the demo's path table."""
    p = {n: os.path.join(root, n) for n in PATHS}
    totals = {"seen": 10, "written": 9, "skipped": {"corrupt_image": 1}}
    _json(os.path.join(p["image-shards"], "_index.json"), {"totals": totals, "shards": [{}, {}]})
    _json(
        os.path.join(p["latents"], "_manifest.json"),
        {"totals": totals, "shards": [{}], "latent_shape": [4, 8, 8], "latent_dtype": "float16", "scale": 0.5,
         "tasks": ["upscale4"]},
    )  # fmt: skip
    _json(
        os.path.join(p["captioned-latents"], "_manifest.json"),
        {
            "totals": {"seen": 6, "written": 6, "skipped": {}},
            "shards": [{}],
            "buckets": [{"size": [64, 64], "latent_shape": [4, 8, 8], "samples": 6}],
            "text_encoders": [{"name": "te0", "identity": {"model_type": "clip", "width": 64, "max_tokens": 16}}],
        },
    )
    _json(
        os.path.join(p["diffusion"], "config.json"),
        {"model": {"arch": "dit", "hidden": 64, "depth": 2, "patch": 2}, "step": 40},
    )
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], p["vae"])
    gains = {"0.5": {"psnr": 21.0, "ssim": 0.6, "never_below_baseline": True}}
    _json(
        os.path.join(p["eval"], "eval.json"),
        {
            "scores": {k: {"psnr": 20.0 + i, "ssim": 0.5} for i, k in enumerate(("model", "bicubic", "lanczos"))},
            "gain": 0.5,
            "model_never_below_lanczos": True,
            "recommended_gain": 0.5,
            "calibration": gains,
        },
    )
    _json(
        os.path.join(p["eval-inpaint"], "eval.json"),
        {
            "scores": {"model": {"psnr": 17.25, "ssim": 0.8}, "classical_base": {"psnr": 16.5, "ssim": 0.78}},
            "gain": 1.0,
            "model_never_below_lanczos": True,
            "recommended_gain": 1.0,
            "calibration": {"1.0": {"psnr": 17.25, "ssim": 0.8, "never_below_baseline": True}},
        },
    )
    for job in ("restored", "inpainted"):
        _json(os.path.join(p[job], "_report.json"), {"written": 2, "errors": 0, "images_per_s": 1.5})
    for folder in ("heldout", "lowres", "damaged"):
        os.makedirs(p[folder])
    for i, im in enumerate(photo_crops(2, 64)):
        for folder in ("heldout", "restored", "damaged", "inpainted"):
            im.save(os.path.join(p[folder], f"h{i}.png"))
        im.resize((16, 16)).save(os.path.join(p["lowres"], f"h{i}.png"))
    Image.new("RGB", (40, 20), "gray").save(p["samples.png"])
    for ev in ("eval", "eval-inpaint"):
        Image.new("RGB", (40, 20), "gray").save(os.path.join(p[ev], "side_by_side.png"))
    for i, name in enumerate(STAGE_OUTPUTS):
        write_metrics(os.path.join(p[name], "metrics.jsonl"), training_rows(1.0 + i, 0.1 + i / 10))
    return p


SVG = "{http://www.w3.org/2000/svg}"


def _chart(fragment: str) -> ET.Element:
    """The chart's ``<svg>`` element, parsing the whole fragment as XML."""
    root = ET.fromstring(fragment)
    svg = root if root.tag == f"{SVG}svg" else root.find(f"{SVG}svg")
    assert svg is not None, fragment
    return svg


def _polyline(svg: ET.Element) -> list[tuple[float, float]]:
    line = svg.find(f"{SVG}polyline")
    assert line is not None
    return [(float(x), float(y)) for x, y in (pt.split(",") for pt in line.get("points", "").split())]


def _labels(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text")]


def test_loss_curve_from_a_metrics_file_in_step_order(tmp_path):
    run = tmp_path / "run"
    rows = [
        {"step": 30, "loss": 0.2, "samples_per_s": 10.0},
        {"step": 10, "loss": 2.0, "samples_per_s": 10.0},
        {"step": 20, "loss": 0.5, "samples_per_s": 10.0},
        {"step": 30, "psnr": 21.0},  # a checkpoint row: no loss
        {"step": 35, "loss": float("nan")},
        {"step": 40, "loss": 0.1, "samples_per_s": 10.0},
    ]
    write_metrics(str(run / "metrics.jsonl"), rows)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "loss": 0.0\n7\n')  # a truncated line and a line that is no object
    assert report.loss_points(report._metric_rows(str(run)) or []) == [
        (10.0, 2.0),
        (20.0, 0.5),
        (30.0, 0.2),
        (40.0, 0.1),
    ]
    fragment = report.loss_curve(str(run), "train (text-to-image)")
    svg = _chart(fragment)
    pts = _polyline(svg)
    assert len(pts) == 4
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    assert xs == sorted(xs) and len(set(xs)) == 4  # left to right by step
    assert ys == sorted(ys) and len(set(ys)) == 4  # a falling loss goes down the chart (SVG y grows downwards)
    left, top, right, bottom = report.PLOT
    assert (xs[0], ys[0]) == (left, top) and (xs[-1], ys[-1]) == (right, bottom)
    labels = _labels(svg)
    assert {"2", "0.1", "10", "40", "step", "loss (log scale)"} <= set(labels)  # min/max of each axis
    assert "train (text-to-image)" in labels
    assert "4 logs, loss 2 at step 10 to 0.1 at step 40" in fragment


def test_loss_curve_log_scale_only_over_a_wide_range():
    wide = report.loss_svg([(0, 1.0), (10, 0.1), (20, 0.01)], "wide")
    ys = [y for _, y in _polyline(_chart(wide))]
    assert abs((ys[0] + ys[2]) / 2 - ys[1]) < 0.2  # a decade apart, equally spaced: log scale
    assert "loss (log scale)" in _labels(_chart(wide))
    narrow = report.loss_svg([(0, 0.3), (10, 0.2), (20, 0.25)], "narrow")
    ys = [y for _, y in _polyline(_chart(narrow))]
    assert abs(ys[2] - (ys[0] + ys[1]) / 2) < 0.2  # 0.25 halfway between 0.3 and 0.2: linear
    assert "loss" in _labels(_chart(narrow)) and "loss (log scale)" not in _labels(_chart(narrow))
    negative = report.loss_svg([(0, 1.0), (10, -1.0)], "negative")  # a loss below zero: linear
    assert "loss (log scale)" not in _labels(_chart(negative))


def test_loss_curve_one_point_and_a_flat_loss_and_escaped_title():
    one = _chart(report.loss_svg([(7, 0.5)], "a <b> & c"))
    assert _polyline(one) == [((report.PLOT[0] + report.PLOT[2]) / 2, (report.PLOT[1] + report.PLOT[3]) / 2)]
    assert "a <b> & c" in _labels(one) and _labels(one).count("0.5") == 1
    flat = _polyline(_chart(report.loss_svg([(0, 0.5), (10, 0.5), (20, 0.5)], "flat")))
    assert len({y for _, y in flat}) == 1 and len({x for x, _ in flat}) == 3


def test_loss_curve_without_a_loss_is_a_note(tmp_path):
    missing = report.loss_curve(str(tmp_path / "nothing"), "train-vae (autoencoder)")
    assert "<svg" not in missing and "no metrics.jsonl" in missing and "train-vae" in missing
    write_metrics(str(tmp_path / "empty" / "metrics.jsonl"), [])
    write_metrics(str(tmp_path / "noloss" / "metrics.jsonl"), [{"step": 10, "psnr": 20.0}])
    for name in ("empty", "noloss"):
        note = report.loss_curve(str(tmp_path / name), "train")
        assert "<svg" not in note and "no loss logged" in note
        ET.fromstring(note)


def test_write_report_on_a_synthetic_workdir(tmp_path):
    p = synthetic_workdir(str(tmp_path))
    stages = {
        "photos": {"seconds": 2.0, "items": 24, "unit": "images", "rate": 12.0},
        "text-encoder": {"seconds": 0.5, "items": None, "unit": "", "rate": None},
    }
    out = report.write_report(str(tmp_path), p, stages, total_seconds=3.0)
    html = open(out).read()
    for section in report.SECTIONS:
        assert f"id='{section}'" in html, section
    assert html.count("data:image/png;base64,") == 6
    assert "+0.75 dB over the base" in html  # the inpainting section: model vs the biharmonic fill
    assert "<td>photos</td><td>2.0</td><td>24</td><td>12.0 images/s</td>" in html
    assert "<td>image shards</td><td>10</td><td>9</td><td>1</td><td>2</td>" in html
    assert "<td>autoencoder</td><td>40</td><td>1.0000</td><td>0.1000</td><td>21.5</td>" in html
    charts = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(charts) == len(report.LOSS_CURVES) == 5
    titles = [_labels(_chart(c))[0] for c in charts]
    assert titles == [f"{stage} ({what})" for stage, _, what in report.LOSS_CURVES]
    assert html.index("id='training'") < html.index("<svg")

    # a stage without metrics, another with no loss rows: notes in their place, the rest drawn
    os.remove(os.path.join(p["refiner4"], "metrics.jsonl"))
    write_metrics(os.path.join(p["upscale4"], "metrics.jsonl"), [{"step": 10, "psnr": 20.0}])
    html = open(report.write_report(str(tmp_path), p, stages, total_seconds=3.0)).read()
    assert html.count("<svg") == 3
    assert "train-refiner (x4 pixel refiner): no metrics.jsonl." in html
    assert "train-upscale4 (x4 upscaling diffusion): no loss logged in its metrics.jsonl." in html
