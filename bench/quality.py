"""Restoration quality on whole held-out photos: the model in fidelity and detail mode next to
the classical rows (upscaling: bicubic, Lanczos, the back-projection base; ``restore``: the
degraded input and the classical restoration base), at the gain ``restore`` runs with by default
(the checkpoint's calibrated gain) unless ``--gain`` is given. ``--task inpaint``: the hole's
PSNR/SSIM of the biharmonic base, the model at gain 1 and the default, on a generated hole (boxes
and strokes, 5-25 % of each photo) per whole photo.

Uses the same `eval` the CLI runs (same degradation, restorer and scores) and adds a sharpness
figure (mean gradient magnitude of the output, relative to the original's) and the worst image's
PSNR difference to Lanczos. The held-out photos default to scikit-image's photographs that the
demo never trains on (astronaut, and the grey photos camera, moon, coins, brick, grass, gravel,
text, used as RGB).

    python bench/quality.py --checkpoint demo-out/upscale4 --task upscale4
    python bench/quality.py --checkpoint demo-out/diffusion --task inpaint
    bash bench/tasks.sh    # trains x2 and restore models at the demo's budget, then runs this on each

The inpainting refiner part (:func:`inpaint_refiner`) trains ``train-refiner --task inpaint`` for
``--refiner-steps`` on crops of the demo's training photos, calibrates its gain on the
calibration photos (whole, generated holes), then scores the hole PSNR/SSIM of the biharmonic
base and of the refiner at its calibrated gain (and at gain 1) on the held-out photos, whole,
each with a generated hole of 5-25 % (seed 1000 + its position):

    python bench/quality.py --inpaint-refiner --refiner-steps 300

The latent inpainting part (:func:`inpaint_latent`, the detail mode) trains an autoencoder
(``--vae-steps``) on 96-px crops of the demo's training photos, encodes them at 64 px with the
inpaint view (``encode --tasks inpaint``), trains ``train --task inpaint`` for ``--latent-steps``
with its gain calibrated on the calibration photos, then scores the hole of the same held-out
photos and holes as the refiner part: the base, the model at its calibrated gain and at gain 1,
in fidelity (one-step mean) and detail (``--steps``-step sample) mode. ``--workdir`` keeps the
run (a re-run with the same folder skips what is done and resumes the training):

    python bench/quality.py --inpaint-latent --vae-steps 300 --latent-steps 400 --workdir /tmp/bench-inpaint
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from pipeline.io import sample_photos
from pipeline.restoration.restorer import RestoreSettings
from pipeline.stages.eval import EvalConfig, evaluate

INPAINT_SEED = 1000  # the held-out photos' holes: seeds other than the calibration's (0, 1, ...)
HELD_OUT = ("astronaut.png", "camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png", "text.png")


def sharpness(im: Image.Image) -> float:
    """Mean gradient magnitude of the luma (a simple, monotone sharpness figure)."""
    y = np.asarray(im.convert("L"), np.float32)
    return float(np.mean(np.hypot(np.diff(y, axis=0)[:, :-1], np.diff(y, axis=1)[:-1, :])))


def inpaint_refiner(root: str, steps: int) -> dict:
    """Train, calibrate and score the inpainting refiner (see the module doc); the result's dict."""
    from pipeline.restoration import inpainter as inpainting
    from pipeline.restoration.inpaint_refiner import RefinerInpainter
    from pipeline.stages.shards import ShardsConfig, run_shards
    from pipeline.stages.train_refiner import RefinerTrainConfig, run_train_refiner

    photos, calib = os.path.join(root, "photos"), os.path.join(root, "calib")
    sample_photos.write_crops(photos, crop=192, per_photo=24, seed=4, short_side=512, png_every=1)
    run_shards(ShardsConfig(src=photos, out=os.path.join(root, "shards"), samples_per_shard=42))
    os.makedirs(calib)
    for name in sample_photos.CALIBRATION_PHOTOS:
        sample_photos.load_photo(name).save(os.path.join(calib, name.split(".")[0] + ".png"))
    t = time.perf_counter()
    run_train_refiner(
        RefinerTrainConfig(
            task="inpaint",
            images=os.path.join(root, "shards", "*.tar"),
            output=os.path.join(root, "refiner"),
            calibration_images=calib,
            workers=1,
            steps=steps,
            checkpoint_every=steps,
            log_every=max(1, steps // 5),
        )
    )
    seconds = time.perf_counter() - t  # training, held-out scoring and calibration
    inpainter = RefinerInpainter(os.path.join(root, "refiner"), "inpaint", RestoreSettings())
    photos = _held_out_holes()
    coverage = [round(float(hole.mean()), 3) for _, hole in photos]
    cal = inpainting.calibrate(inpainter, photos, (1.0,))
    rows = {
        row: {k: [round(x, 4) for x in cal.by_gain[gain][k]] for k in ("psnr", "ssim")}
        for row, gain in (("base", 0.0), ("refiner", inpainter.gain), ("gain_1", 1.0))
    }
    info = inpainter.info
    return {
        "steps": steps,
        "train_and_calibrate_seconds": round(seconds, 1),
        "steps_per_second_incl_calibration": round(steps / seconds, 2),
        "heldout_crop_psnr": {k: round(info.metrics[k], 3) for k in ("psnr_base", "psnr")},
        "calibrated_gain": inpainter.gain,
        "calibration_hole_psnr_by_gain": info.calibration["psnr_by_gain"],
        "images": list(HELD_OUT),
        "hole_coverage": coverage,
        "hole_psnr_mean": {k: round(float(np.mean(v["psnr"])), 3) for k, v in rows.items()},
        "hole_ssim_mean": {k: round(float(np.mean(v["ssim"])), 4) for k, v in rows.items()},
        "per_image": rows,
    }


def _held_out_holes() -> list:
    """The held-out photos, whole, each with its generated hole (seed :data:`INPAINT_SEED` + its position)."""
    from pipeline.models import degrade

    photos = []
    for i, name in enumerate(HELD_OUT):
        im = sample_photos.load_photo(name)
        photos.append((im, degrade.inpaint_mask(im.height, im.width, seed=INPAINT_SEED + i)))
    return photos


def inpaint_latent(root: str, vae_steps: int, steps: int, sample_steps: int) -> dict:
    """Train, calibrate and score the latent inpainting model (see the module doc); the result's dict."""
    from pipeline.io import checkpoint
    from pipeline.models import loading
    from pipeline.restoration import inpainter as inpainting
    from pipeline.restoration.restorer import Restorer
    from pipeline.stages.encode import EncodeConfig, run_encode
    from pipeline.stages.shards import ShardsConfig, run_shards
    from pipeline.stages.train import TrainConfig, calibrate, run_train
    from pipeline.train.autoencoder import VAETrainConfig, run_train_vae

    p = {k: os.path.join(root, k) for k in ("photos", "shards", "vae", "lat", "calib", "model")}
    t = time.perf_counter()
    if not os.path.exists(p["shards"]):
        sample_photos.write_crops(p["photos"], crop=96, per_photo=24)
        run_shards(ShardsConfig(src=p["photos"], out=p["shards"], samples_per_shard=48))
    shards = os.path.join(p["shards"], "*.tar")
    if not os.path.exists(p["vae"]):
        run_train_vae(
            VAETrainConfig(
                images=shards, output=p["vae"], resolution=64, eval_images=24, workers=1, steps=vae_steps,
                batch_size=16, lr=2e-3, warmup_steps=50, checkpoint_every=vae_steps, log_every=50,
            )
        )  # fmt: skip
    if not os.path.exists(os.path.join(p["lat"], "_manifest.json")):
        run_encode(EncodeConfig(input=shards, output=p["lat"], vae=p["vae"], resolution=64, tasks=["inpaint"]))
    if not os.path.exists(p["calib"]):
        os.makedirs(p["calib"])
        for name in sample_photos.CALIBRATION_PHOTOS:
            sample_photos.load_photo(name).save(os.path.join(p["calib"], name.split(".")[0] + ".png"))
    cfg = TrainConfig(
        latents=p["lat"], output=p["model"], task="inpaint", calibration_images=p["calib"], workers=1,
        steps=steps, batch_size=32, lr=1e-3, warmup_steps=50, checkpoint_every=max(50, steps // 4), log_every=50,
    )  # fmt: skip
    if not os.path.exists(p["model"]) or loading.describe(p["model"]).step < steps:
        run_train(cfg)  # (and calibrates)
    if loading.describe(p["model"]).gain is None:  # a run stopped while calibrating
        calibrate(p["model"], cfg)
    seconds = time.perf_counter() - t
    photos = _held_out_holes()
    model = loading.load(p["model"])
    out: dict = {
        "vae_steps": vae_steps,
        "steps": steps,
        "seconds_this_run": round(seconds, 1),
        "vae_heldout_psnr": round(checkpoint.read_info(checkpoint.latest_checkpoint(p["vae"])).metrics["psnr"], 3),
        "calibrated_gain": model.info.gain,
        "calibration_hole_psnr_by_gain": model.info.calibration["psnr_by_gain"],
        "images": list(HELD_OUT),
        "hole_coverage": [round(float(hole.mean()), 3) for _, hole in photos],
    }
    for mode in ("fidelity", "detail"):
        inp = Restorer(model, "inpaint", RestoreSettings(mode=mode, steps=sample_steps))
        cal = inpainting.calibrate(inp, photos, (1.0,))
        rows = {row: cal.by_gain[g] for row, g in (("base", 0.0), ("model", inp.gain), ("gain_1", 1.0))}
        base = rows["base"]["psnr"]
        out[mode] = {
            "hole_psnr_mean": {k: round(float(np.mean(v["psnr"])), 3) for k, v in rows.items()},
            "hole_ssim_mean": {k: round(float(np.mean(v["ssim"])), 4) for k, v in rows.items()},
            "gain_1_minus_base_worst_db": round(min(a - b for a, b in zip(rows["gain_1"]["psnr"], base)), 3),
            "per_image_psnr": {k: [round(x, 3) for x in v["psnr"]] for k, v in rows.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--inpaint-refiner", action="store_true", help="the inpainting refiner part instead (see above)")
    ap.add_argument("--refiner-steps", type=int, default=300, help="inpainting refiner: training steps")
    ap.add_argument("--inpaint-latent", action="store_true", help="the latent inpainting part instead (see above)")
    ap.add_argument("--vae-steps", type=int, default=300, help="latent inpainting: autoencoder training steps")
    ap.add_argument("--latent-steps", type=int, default=400, help="latent inpainting: denoiser training steps")
    ap.add_argument("--workdir", default="", help="latent inpainting: keep the run here (default: a temporary folder)")
    ap.add_argument("--task", default="upscale4")
    ap.add_argument("--images", default="", help="held-out photos (default: scikit-image's, see above)")
    ap.add_argument("--gain", type=float, default=None, help="detail gain (default: the checkpoint's calibrated one)")
    ap.add_argument("--steps", type=int, default=20, help="detail mode steps")
    ap.add_argument("--json", default="bench/results/quality.json")
    args = ap.parse_args()
    if args.inpaint_refiner or args.inpaint_latent:
        with tempfile.TemporaryDirectory() as tmp:
            if args.inpaint_refiner:
                part, res = "refiner", inpaint_refiner(tmp, args.refiner_steps)
            else:
                part, res = "latent", inpaint_latent(args.workdir or tmp, args.vae_steps, args.latent_steps, args.steps)
        return _write(args, res, os.path.join(os.path.dirname(args.json), f"quality_inpaint_{part}.json"))
    if not args.checkpoint:
        ap.error("--checkpoint is required (or --inpaint-refiner)")
    with tempfile.TemporaryDirectory() as root:
        images = args.images
        if not images:
            images = os.path.join(root, "heldout")
            os.makedirs(images)
            for name in HELD_OUT:
                path = os.path.join(sample_photos.photo_dir(), name)
                if os.path.exists(path):
                    Image.open(path).convert("RGB").save(os.path.join(images, name))
        out: dict = {"task": args.task, "checkpoint": args.checkpoint, "gain": args.gain}
        if args.task == "inpaint":
            out["inpaint"] = inpaint_scores(args, images, root)
            return _write(args, out)
        for mode in ("fidelity", "detail"):
            t = time.perf_counter()
            res = evaluate(
                EvalConfig(
                    task=args.task,
                    checkpoint=args.checkpoint,
                    images=images,
                    out=os.path.join(root, mode),
                    settings=RestoreSettings(mode=mode, gain=args.gain, steps=args.steps),
                )
            )
            seconds = time.perf_counter() - t
            s = res["scores"]
            floor, base = s[res["floor"]], s.get("back_projection") or s["classical_base"]
            worst = min(a - b for a, b in zip(s["model"]["psnr_per_image"], floor["psnr_per_image"]))
            out[mode] = {
                "seconds": round(seconds, 1),
                "images": res["images"],
                "psnr": {k: v["psnr"] for k, v in s.items()},
                "psnr_y": {k: v["psnr_y"] for k, v in s.items()},
                "ssim": {k: v["ssim"] for k, v in s.items()},
                "gain": res["gain"],
                "floor": res["floor"],
                "model_minus_floor_worst_image_db": round(worst, 3),
                "model_minus_base_mean_db": round(s["model"]["psnr"] - base["psnr"], 3),
                "calibration": {g: c["psnr"] for g, c in res["calibration"].items()},
                "recommended_gain": res["recommended_gain"],
            }
        sheet = Image.open(os.path.join(root, "detail", "side_by_side.png"))
        w = sheet.width // 5  # input | bicubic | Lanczos | model | original, one row per image
        row = [sheet.crop((c * w, 0, (c + 1) * w, sheet.height)) for c in range(5)]
        out["detail"]["sharpness_model_over_original"] = round(sharpness(row[3]) / sharpness(row[4]), 3)
        fsheet = Image.open(os.path.join(root, "fidelity", "side_by_side.png"))
        frow = [fsheet.crop((c * w, 0, (c + 1) * w, fsheet.height)) for c in range(5)]
        out["fidelity"]["sharpness_model_over_original"] = round(sharpness(frow[3]) / sharpness(frow[4]), 3)
        out["classical_sharpness_over_original"] = round(sharpness(frow[2]) / sharpness(frow[4]), 3)
    _write(args, out)


def inpaint_scores(args: argparse.Namespace, images: str, root: str) -> dict:
    """Hole PSNR/SSIM of the biharmonic base, the model at each gain and the default (``eval --task
    inpaint``: a generated hole of boxes and strokes, 5-25 % of each whole photo)."""
    t = time.perf_counter()
    res = evaluate(
        EvalConfig(
            task="inpaint",
            checkpoint=args.checkpoint,
            images=images,
            out=os.path.join(root, "inpaint"),
            settings=RestoreSettings(gain=args.gain, steps=args.steps),
        )
    )
    s, base = res["scores"], res["scores"]["classical_base"]

    def vs_base(per_image: list[float]) -> dict:
        d = [a - b for a, b in zip(per_image, base["psnr_per_image"])]
        return {"mean_db": round(float(np.mean(d)), 3), "worst_image_db": round(min(d), 3)}

    return {
        "seconds": round(time.perf_counter() - t, 1),
        "images": res["images"],
        "hole_psnr": {"base": base["psnr"], "default": s["model"]["psnr"], "gain_1": res["calibration"]["1.0"]["psnr"]},
        "hole_ssim": {"base": base["ssim"], "default": s["model"]["ssim"], "gain_1": res["calibration"]["1.0"]["ssim"]},
        "default_gain": res["gain"],
        "default_minus_base": vs_base(s["model"]["psnr_per_image"]),
        "gain_1_minus_base": vs_base(res["calibration"]["1.0"]["psnr_per_image"]),
        "calibration": {g: c["psnr"] for g, c in res["calibration"].items()},
        "recommended_gain": res["recommended_gain"],
    }


def _write(args: argparse.Namespace, out: dict, path: str = "") -> None:
    """Print the result and write it to ``path`` (default: ``--json``)."""
    path = path or args.json
    print(json.dumps(out, indent=2))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
