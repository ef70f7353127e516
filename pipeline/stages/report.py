"""The demo's self-contained ``report.html``: every image embedded, opens from disk.

Sections: timing (seconds and throughput per stage), data (counts, skips), autoencoder
(held-out reconstructions, PSNR/SSIM), samples, upscaling (before/after next to bicubic and
Lanczos, the PSNR/SSIM table with the autoencoder ceiling, the restore job's report), inpainting
(hole, biharmonic base, model and original side by side, the hole PSNR/SSIM table of the model
next to the base with its calibrated gain, the restore job's output), training (a loss table, and
the loss curve of each training stage, drawn as inline SVG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.io import storage
from pipeline.io.checkpoint import latest_checkpoint
from pipeline.io.imaging import from_tensor_array, to_tensor_array
from pipeline.models import autoencoder
from pipeline.models.quality import psnr, ssim

SECTIONS = ("timing", "data", "autoencoder", "samples", "upscaling", "inpainting", "training")
LOSS_CURVES = (  # (demo stage, its training output in the demo's paths, what it trains)
    ("train-vae", "vae", "autoencoder"),
    ("train", "diffusion", "text-to-image transformer"),
    ("train-refiner", "refiner4", "x4 pixel refiner"),
    ("train-inpaint", "inpaint", "inpainting refiner"),
    ("train-upscale4", "upscale4", "x4 upscaling diffusion"),
)


def _img(data: bytes | Image.Image, alt: str, width: int | None = None) -> str:
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        data.save(buf, format="PNG")
        data = buf.getvalue()
    style = f' style="width:{width}px;image-rendering:pixelated"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}"{style}>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _reconstructions(vae_url: str, heldout: str) -> tuple[Image.Image, dict]:
    vae = autoencoder.load(vae_url)
    names = sorted(f for f in os.listdir(heldout) if f.endswith(".png"))[:6]
    x = torch.from_numpy(
        np.stack([to_tensor_array(Image.open(os.path.join(heldout, n)).convert("RGB")) for n in names])
    )
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mean).float().clamp(-1, 1)
    h, w = x.shape[-2:]
    sheet = Image.new("RGB", (len(names) * w, 2 * h), "white")
    for i in range(len(names)):
        sheet.paste(from_tensor_array(x[i].numpy()), (i * w, 0))
        sheet.paste(from_tensor_array(rec[i].numpy()), (i * w, h))
    return sheet, {"psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean())}


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of images of one size as one sheet."""
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (len(rows[0]) * w, len(rows) * h), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * w, r * h))
    return sheet


def _outputs(restored: str) -> list[tuple[str, Image.Image]]:
    """(name, image) of the first restore job outputs in ``restored``."""
    names = sorted(f for f in os.listdir(restored) if f.endswith(".png"))[:4]
    return [(n, Image.open(os.path.join(restored, n)).convert("RGB")) for n in names]


def _before_after(lowres: str, restored: str) -> Image.Image:
    rows = []
    for n, out in _outputs(restored):
        lr = Image.open(os.path.join(lowres, n)).convert("RGB")
        rows.append([lr.resize(out.size, Image.Resampling.NEAREST), lr.resize(out.size, Image.Resampling.BICUBIC), out])
    return _grid(rows)


def _filled(damaged: str, inpainted: str, originals: str) -> Image.Image:
    return _grid(
        [
            [
                Image.open(os.path.join(damaged, n)).convert("RGB"),
                out,
                Image.open(os.path.join(originals, n)).convert("RGB"),
            ]
            for n, out in _outputs(inpainted)
        ]
    )


def _metric_rows(run: str) -> list[dict] | None:
    """The rows of a training output's ``metrics.jsonl`` (None when it has none); lines that are
    not a JSON object are passed over."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _loss_summary(run: str) -> list:
    rows = [r for r in _metric_rows(run) or [] if "loss" in r and "samples_per_s" in r]
    if not rows:
        return ["-", "-", "-", "-"]
    return [
        rows[-1]["step"],
        f"{rows[0]['loss']:.4f}",
        f"{rows[-1]['loss']:.4f}",
        f"{np.mean([r['samples_per_s'] for r in rows]):.1f}",
    ]


def _number(v: object) -> float | None:
    """``v`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def loss_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(step, loss) of every row with a finite loss, by step; a step logged twice keeps its last row."""
    by_step: dict[float, float] = {}
    for r in rows:
        step, loss = _number(r.get("step")), _number(r.get("loss"))
        if step is not None and loss is not None:
            by_step[step] = loss
    return sorted(by_step.items())


CHART_W, CHART_H = 360, 200
PLOT = (70, 28, CHART_W - 16, CHART_H - 40)  # left, top, right, bottom of the plot area in the SVG


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    """The map of [lo, hi] onto [a, b] (a constant range onto its middle)."""
    if hi == lo:
        return lambda v: (a + b) / 2
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:g}" y="{y:g}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def _step_text(step: float) -> str:
    return f"{step:.0f}" if float(step).is_integer() else f"{step:g}"


def _axis_labels(steps: list[float], losses: list[float], log_y: bool) -> str:
    """Each axis's min and max at its ends (one label in the middle where they are equal), and its title."""
    left, top, right, bottom = PLOT
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    lo, hi = min(losses), max(losses)
    y_ends = [(bottom, lo), (top + 4, hi)] if hi > lo else [(mid_y + 4, lo)]
    x_ends = [(left, min(steps)), (right, max(steps))] if max(steps) > min(steps) else [(mid_x, steps[0])]
    y_title = "loss (log scale)" if log_y else "loss"
    return "".join(
        [
            *(_text(left - 4, y, f"{v:.3g}", "end") for y, v in y_ends),
            *(_text(x, bottom + 14, _step_text(v)) for x, v in x_ends),
            _text(12, mid_y, y_title, extra=f' transform="rotate(-90 12 {mid_y:g})"'),
            _text(mid_x, bottom + 28, "step"),
        ]
    )


def loss_svg(points: list[tuple[float, float]], title: str) -> str:
    """An inline SVG line chart of (step, loss) ``points`` (at least one, by step), y on a log scale
    when every loss is positive and they span more than a factor of 3."""
    steps, losses = [x for x, _ in points], [y for _, y in points]
    log_y = min(losses) > 0 and max(losses) > 3 * min(losses)
    ys = [math.log10(v) for v in losses] if log_y else losses
    left, top, right, bottom = PLOT
    sx, sy = _scale(min(steps), max(steps), left, right), _scale(min(ys), max(ys), bottom, top)
    xy = [(sx(x), sy(y)) for x, y in zip(steps, ys)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2"/>' for x, y in xy) if len(xy) <= 40 else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-curve" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" font-family="sans-serif" font-size="11" role="img">'
        f"<title>{html.escape(title)}: loss by step</title>"
        + _text(CHART_W / 2, 14, title, extra=' font-size="12"')
        + f'<path d="M{left},{top} V{bottom} H{right}" fill="none" stroke="#888"/>'
        + _axis_labels(steps, losses, log_y)
        + f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
        f'<g fill="#1f77b4">{dots}</g></svg>'
    )


def loss_curve(run: str, title: str) -> str:
    """The loss chart of the training output ``run`` (its ``metrics.jsonl``), or a short note saying
    why there is none."""
    rows = _metric_rows(run)
    points = loss_points(rows or [])
    if not points:
        why = "no metrics.jsonl" if rows is None else "no loss logged in its metrics.jsonl"
        return f"<p class='note'>{html.escape(title)}: {why}.</p>"
    first, last = points[0][1], points[-1][1]
    return (
        f"<figure>{loss_svg(points, title)}<figcaption>{len(points)} logs, loss {first:.4g} at step "
        f"{points[0][0]:g} to {last:.4g} at step {points[-1][0]:g}.</figcaption></figure>"
    )


def _page_head(stages: dict[str, dict], total_seconds: float) -> list[str]:
    stage_seconds = sum(s["seconds"] for s in stages.values())
    return [
        "<!doctype html><html><head><meta charset='utf-8'><title>latent-pipeline demo report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.3em 0}"
        "figcaption{color:#555;font-size:.9em}.curves{display:flex;flex-wrap:wrap;gap:0 1.5em}"
        ".curves figure{margin:.3em 0;max-width:360px}.note{color:#555}</style></head><body>",
        "<h1>latent-pipeline: demo report</h1>",
        f"<p>Local Ray, local folders, scikit-image's bundled photos. Stages took {stage_seconds:.0f} s in "
        f"total ({total_seconds:.0f} s in the last invocation).</p>",
    ]


def _timing_section(stages: dict[str, dict]) -> list[str]:
    rows = [
        [k, v["seconds"], v.get("items") or "-", f"{v['rate']} {v.get('unit', '')}/s" if v.get("rate") else "-"]
        for k, v in stages.items()
    ]
    return [
        "<h2 id='timing'>Time and throughput per stage</h2>",
        _table(["stage", "seconds", "items", "throughput"], rows),
    ]


def _totals_row(dataset: str, index: dict) -> list:
    """Seen, written, skipped and shard counts of a shard index or a latent manifest."""
    t = index["totals"]
    return [dataset, t["seen"], t["written"], sum(t["skipped"].values()), len(index["shards"])]


def _data_section(p: dict[str, str]) -> list[str]:
    shards_index = storage.read_json(os.path.join(p["image-shards"], "_index.json"))
    man = storage.read_json(os.path.join(p["latents"], "_manifest.json"))
    cap_man = storage.read_json(os.path.join(p["captioned-latents"], "_manifest.json"))
    te = cap_man["text_encoders"][0]
    return [
        "<h2 id='data'>Data</h2>",
        _table(
            ["dataset", "seen", "written", "skipped", "shards"],
            [
                _totals_row("image shards", shards_index),
                _totals_row("latent shards", man),
                _totals_row("captioned latent shards (buckets)", cap_man),
            ],
        ),
        _table(
            ["bucket (w x h px)", "latent shape", "samples"],
            [[f"{b['size'][0]} x {b['size'][1]}", str(b["latent_shape"]), b["samples"]] for b in cap_man["buckets"]],
        ),
        f"<p>Captioned latents: one bucket per aspect ratio, flipped latents stored too; caption embeddings "
        f"from text encoder <code>{te['name']}</code> ({te['identity']['model_type']}, width "
        f"{te['identity']['width']}, up to {te['identity']['max_tokens']} tokens, padding stripped). The demo's "
        "text encoder is a <b>tiny random-weight stand-in</b> built offline (CLIP architecture, a word-level "
        "tokenizer trained on the demo's captions): it tells the captions apart but knows no meaning. With a "
        "real CLIP or T5 folder the same commands apply (docs/verbs.md).</p>",
        f"<p>Latents {man['latent_shape']} ({man['latent_dtype']}), scale {man['scale']:.4f}, "
        f"task views {man['tasks']}.</p>",
    ]


def _autoencoder_section(p: dict[str, str]) -> list[str]:
    m = storage.read_json(storage.join(latest_checkpoint(p["vae"]), "config.json")).get("metrics", {})
    recon_sheet, recon_scores = _reconstructions(p["vae"], p["heldout"])
    return [
        "<h2 id='autoencoder'>Autoencoder</h2>",
        _table(
            ["held-out images", "PSNR dB (start)", "PSNR dB (trained)", "SSIM (trained)"],
            [
                [
                    "training held-out shard",
                    f"{m.get('psnr_initial', float('nan')):.2f}",
                    f"{m.get('psnr', float('nan')):.2f}",
                    f"{m.get('ssim', float('nan')):.4f}",
                ],
                ["held-out photo (128 px, below)", "-", f"{recon_scores['psnr']:.2f}", f"{recon_scores['ssim']:.4f}"],
            ],
        ),
        f"<figure>{_img(recon_sheet, 'reconstructions', 768)}<figcaption>Top: held-out photo crops "
        "(never trained on). Bottom: their reconstructions through the autoencoder.</figcaption></figure>",
    ]


def _samples_section(p: dict[str, str]) -> list[str]:
    t2i = storage.read_json(storage.join(latest_checkpoint(p["diffusion"]), "config.json"))
    mc = t2i["model"]
    with open(p["samples.png"], "rb") as f:
        png = f.read()
    return [
        "<h2 id='samples'>Text-to-image samples</h2>",
        f"<figure>{_img(png, 'samples', 640)}<figcaption>Samples per prompt (rows) at two aspect "
        f"ratios (columns: 80x48 and 48x80 px), from a text-conditioned transformer ({mc['arch']}, hidden "
        f"{mc.get('hidden')}, depth {mc.get('depth')}, patch {mc.get('patch')}; {t2i['step']} steps on the "
        "bucketed latents, caption dropout 0.1), Heun sampler, classifier-free guidance 3 on the text, "
        "decoded with the run's autoencoder.</figcaption></figure>",
    ]


def _eval_outputs(eval_dir: str, job_dir: str) -> tuple[dict, dict, bytes]:
    """An ``eval`` output's result, the restore job's report and eval's side-by-side PNG."""
    with open(os.path.join(eval_dir, "side_by_side.png"), "rb") as f:
        side_by_side = f.read()
    return (
        storage.read_json(os.path.join(eval_dir, "eval.json")),
        storage.read_json(os.path.join(job_dir, "_report.json")),
        side_by_side,
    )


def _eval_tables(ev: dict, scored: str, gain: str, floor: str) -> tuple[str, str]:
    """The scores table of an ``eval`` result (``scored``: what PSNR/SSIM are measured on) and its
    gain calibration table (never below ``floor``)."""
    scores = _table(
        ["method", f"{scored}PSNR dB", f"{scored}SSIM"],
        [[k, f"{v['psnr']:.2f}", f"{v['ssim']:.4f}"] for k, v in ev["scores"].items()],
    )
    calibration = _table(
        [gain, f"{scored}PSNR dB", f"{scored}SSIM", f"never below {floor}"],
        [[g, f"{c['psnr']:.2f}", f"{c['ssim']:.4f}", c["never_below_baseline"]] for g, c in ev["calibration"].items()],
    )
    return scores, calibration


def _upscaling_section(p: dict[str, str]) -> list[str]:
    ev, restore_report, side_by_side = _eval_outputs(p["eval"], p["restored"])
    scores, calibration = _eval_tables(ev, "", "detail gain", "Lanczos")
    return [
        "<h2 id='upscaling'>Upscaling x4 (held-out photo)</h2>",
        scores,
        f"<p>Model at detail gain {ev['gain']} (calibrated on held-out photos at training; the restore job "
        f"uses it too); never below Lanczos per image and at least the back-projection base on average: "
        f"{ev['model_never_below_lanczos']}; the gain these images recommend: {ev['recommended_gain']}. "
        "The autoencoder row is the original passed through the "
        "autoencoder: the ceiling of a method that decodes whole images.</p>",
        calibration,
        f"<figure>{_img(side_by_side, 'eval side by side', 900)}<figcaption>Per row: low-resolution "
        "input (nearest), bicubic, Lanczos, model, original.</figcaption></figure>",
        f"<figure>{_img(_before_after(p['lowres'], p['restored']), 'restore job output', 600)}"
        f"<figcaption>The Ray Data restore job's outputs. Per row: input (nearest), bicubic, restored. "
        f"{restore_report['written']} written, {restore_report['errors']} errors, "
        f"{restore_report['images_per_s']} images/s.</figcaption></figure>",
    ]


def _inpainting_section(p: dict[str, str]) -> list[str]:
    ev, job, side_by_side = _eval_outputs(p["eval-inpaint"], p["inpainted"])
    scores, calibration = _eval_tables(ev, "hole ", "gain", "the base")
    base = ev["scores"]["classical_base"]["psnr"]
    return [
        "<h2 id='inpainting'>Inpainting (held-out photo, generated holes)</h2>",
        scores,
        f"<p>A pixel refiner over the biharmonic fill (classical_base), trained on the demo's photo crops with "
        f"generated holes (boxes and strokes); scored in the hole only (outside it every output is the "
        f"original). Model at gain {ev['gain']}, calibrated at training on other held-out photos: "
        + (
            "every gain above 0 fell below the base on some calibration photo, so the default is the base itself; "
            if not ev["gain"]
            else ""
        )
        + f"{ev['scores']['model']['psnr'] - base:+.2f} dB over the base; never below it per photo and on "
        f"average: {ev['model_never_below_lanczos']}; the gain these photos recommend: {ev['recommended_gain']}. "
        f"After the demo, <code>latent-pipeline restore --task inpaint --checkpoint {html.escape(p['inpaint'])} "
        "--mask FOLDER</code> fills your own holes with it.</p>",
        calibration,
        f"<figure>{_img(side_by_side, 'inpainting side by side', 800)}<figcaption>Per row: the hole (grey), the "
        "classical base (biharmonic fill), the refiner at gain 1, the model at its calibrated gain, the "
        "original.</figcaption></figure>",
        f"<figure>{_img(_filled(p['damaged'], p['inpainted'], p['heldout']), 'inpainting job output', 480)}"
        f"<figcaption>The Ray Data job <code>restore --task inpaint --mask masks</code> over the damaged photos. "
        f"Per row: input, restored, original. {job['written']} written, {job['errors']} errors, "
        f"{job['images_per_s']} images/s.</figcaption></figure>",
    ]


def _training_section(p: dict[str, str]) -> list[str]:
    return [
        "<h2 id='training'>Training</h2>",
        _table(
            ["run", "steps", "loss (first log)", "loss (last log)", "samples/s"],
            [
                ["text-to-image (transformer, buckets)", *_loss_summary(p["diffusion"])],
                ["upscale4 (residual over Lanczos)", *_loss_summary(p["upscale4"])],
                ["inpainting refiner (residual over the biharmonic fill)", *_loss_summary(p["inpaint"])],
                ["autoencoder", *_loss_summary(p["vae"])],
            ],
        ),
        "<h3>Loss curves</h3>",
        "<div class='curves'>"
        + "".join(loss_curve(p[out], f"{stage} ({what})") for stage, out, what in LOSS_CURVES)
        + "</div>",
    ]


def write_report(workdir: str, p: dict[str, str], stages: dict[str, dict], total_seconds: float) -> str:
    """Write ``workdir/report.html`` from the demo's outputs (``p``: the path of each) and stage timings."""
    parts = [
        *_page_head(stages, total_seconds),
        *_timing_section(stages),
        *_data_section(p),
        *_autoencoder_section(p),
        *_samples_section(p),
        *_upscaling_section(p),
        *_inpainting_section(p),
        *_training_section(p),
        "</body></html>",
    ]
    out = os.path.join(workdir, "report.html")
    with open(out, "w") as f:
        f.write("\n".join(parts))
    return out
