"""``latent-pipeline eval``: score a restoration checkpoint against classical baselines.

Held-out images are degraded with the same pipeline as training (:mod:`degrade`), restored with
the same core as ``restore`` (:mod:`restoration`), and scored against the originals (RGB PSNR,
luma PSNR with a ``scale``-pixel border cropped as in the super-resolution literature, SSIM)
next to the classical rows and the autoencoder's own reconstruction of the original (the ceiling
a latent method decoding whole images would hit). Classical rows: for upscaling, bicubic and
Lanczos resizes of the same input and the back-projection base (the classical floor of every
upscaling output); for ``restore``, the degraded input itself and the classical restoration base
(denoised and deconvolved). The per-image floor is Lanczos for upscaling and the degraded input
for ``restore``. ``inpaint`` (:func:`score_inpaint`) scores a generated hole per image
(:func:`degrade.inpaint_mask`) in the hole only, the classical fill being the row and the floor.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, StorageOptions, check_limits, group, option, require, to_dict
from pipeline.io import imaging, storage
from pipeline.models import degrade, loading
from pipeline.models.degrade import INPAINT
from pipeline.models.quality import psnr, psnr_y, ssim
from pipeline.restoration import backends, inpainter
from pipeline.restoration.inpainter import Inpainter, Scores, new_scores
from pipeline.restoration.restorer import Restorer, RestoreSettings, pad_to

log = logging.getLogger("pipeline.eval")

GAINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # detail gains tried by the calibration
# "Never below the floor" counts a difference smaller than the noise of rounding to 8 bits (the
# MSE of a uniform error of one level, 1/12 level^2) as a tie: on near-flat images (50 dB and
# more) PSNR differences of a few hundredths of a dB are rounding, not restoration.
ROUNDING_MSE = 1 / 12


def _mse(psnr_db: float) -> float:
    """The mean squared error, in 8-bit levels squared, of a PSNR."""
    return 255.0**2 * 10 ** (-psnr_db / 10)


def never_worse(psnrs: list[float], floor: list[float]) -> bool:
    """Per image, never worse than the floor (a difference under 8-bit rounding noise is a tie)."""
    return all(_mse(a) <= _mse(b) + ROUNDING_MSE for a, b in zip(psnrs, floor))


@dataclass
class EvalConfig:
    task: str = option(
        "upscale4",
        "restoration task (inpaint: a hole generated per image, boxes and strokes over 5 to 25 per cent "
        "of it, scored in the hole)",
        choices=degrade.RESTORE_TASKS,
        noun="task",
    )
    checkpoint: str = option(
        "",
        "diffusion checkpoint (or a training output), or a pretrained network file (spandrel) or diffusers "
        "pipeline folder, as `restore` takes (scored without a gain calibration or an autoencoder row)",
    )
    images: str = option("", "held-out images: a folder/prefix or a glob")
    lowres: str = option(
        "",
        "ready-made inputs (low-resolution or degraded) with the same relative names as --images "
        "(default: made from --images with the task's degradation)",
    )
    out: str = option("eval", "folder for eval.json and side_by_side.png")
    max_images: int = option(16, "images scored at most", range=(1, None))
    settings: RestoreSettings = group(RestoreSettings)  # the same settings `restore` runs with
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        check_limits(self)
        require(self, "checkpoint", "images", "out")
        self.checkpoint, self.images, self.out = (storage.absolute(u) for u in (self.checkpoint, self.images, self.out))
        self.lowres = storage.absolute(self.lowres)
        if self.lowres and self.task == degrade.INPAINT:
            raise ConfigError("option 'lowres': eval --task inpaint generates its holes; it takes no ready-made inputs")
        storage.check_separate(
            self.out, {"images": self.images, "checkpoint": self.checkpoint, "lowres": self.lowres}, option="out"
        )


def _t(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(imaging.to_tensor_array(im))[None]


def evaluate(cfg: EvalConfig) -> dict:
    """Score the checkpoint and write ``eval.json`` and ``side_by_side.png`` to ``--out``."""
    so = cfg.storage.options
    backends.check(cfg.checkpoint, cfg.task, so)
    storage.probe_writable(cfg.out, so)
    result, panels = score(cfg)
    storage.write_json(storage.join(cfg.out, "eval.json"), result, so)
    storage.write_bytes(storage.join(cfg.out, "side_by_side.png"), _side_by_side(panels), so)
    log.info(format_table(result))
    return result


def score(cfg: EvalConfig) -> tuple[dict, list[list[Image.Image]]]:
    """The scores, the gain calibration and the first rows of the side-by-side sheet (no writes)."""
    if cfg.task == INPAINT:
        return score_inpaint(cfg)
    so = cfg.storage.options
    # a pretrained network or pipeline has no parts to compose at other gains, nor an autoencoder
    model, restorer, pretrained = None, None, None
    if backends.backend_for(cfg.checkpoint, so).name == "checkpoint":
        model = loading.load(cfg.checkpoint, so)
        restorer = Restorer(model, cfg.task, cfg.settings)
    else:
        pretrained = backends.load(cfg.checkpoint, cfg.task, cfg.settings, so)
    scale = degrade.TASKS[cfg.task].scale
    pairs = storage.list_files(cfg.images, imaging.IMAGE_SUFFIXES, so)[: cfg.max_images]
    if not pairs:
        raise FileNotFoundError(f"no images at {storage.redact(cfg.images)}")
    # the classical rows: resizes and the back-projection base (upscaling); the degraded input and the
    # classical restoration base (same-size tasks)
    classical = ("bicubic", "lanczos", "back_projection") if scale > 1 else ("input", "classical_base")
    names = ("model", *classical, *(("autoencoder",) if model is not None else ()))
    rows: dict[str, Scores] = {k: new_scores() for k in names}
    calib: dict[float, Scores] = {g: new_scores() for g in GAINS}
    panels: list[list[Image.Image]] = []
    for url, rel in pairs:
        pair = _image_pair(cfg, url, rel, scale)
        if pair is None:
            continue
        hr, lr = pair
        target = _t(hr)

        def add(into: Scores, pred: torch.Tensor) -> None:
            into["psnr"].append(float(psnr(pred, target)))
            into["psnr_y"].append(float(psnr_y(pred, target, border=scale)))
            into["ssim"].append(float(ssim(pred, target)))

        if restorer is not None:
            parts = restorer.parts(lr)
            by_gain = {g: restorer.compose(parts, g) for g in {*GAINS, parts.gain}}  # each composed once
            for g in GAINS:
                add(calib[g], _t(by_gain[g]))
            outs, base = {"model": by_gain[parts.gain]}, by_gain[0.0]  # --gain 0 is exactly the classical base
        else:
            assert pretrained is not None
            raw = np.round(np.clip(degrade.classical_base(cfg.task, lr), 0, 255)).astype(np.uint8)
            outs, base = {"model": pretrained.restore(lr)}, Image.fromarray(raw, "RGB")
            add(calib[0.0], _t(base))
        outs.update(_classical_outputs(lr, hr, base, scale))
        for name, im in outs.items():
            add(rows[name], _t(im))
        if model is not None:
            add(rows["autoencoder"], _reconstruction(model, target))
        if len(panels) < 4:
            panels.append(
                [lr.resize(hr.size, Image.Resampling.NEAREST), *(outs[k] for k in classical[:2]), outs["model"], hr]
            )
    if not rows["model"]["psnr"]:
        raise ConfigError(
            f"option 'images': none of the images under {storage.redact(cfg.images)} is large enough to score"
        )
    return _summary(cfg, rows, calib, "lanczos" if scale > 1 else "input", restorer, model), panels


def score_inpaint(cfg: EvalConfig) -> tuple[dict, list[list[Image.Image]]]:
    """``eval --task inpaint``: per held-out image a generated hole (:func:`degrade.inpaint_mask`,
    seeded by the file name), filled by the classical base and by the inpainter (any inpainting
    backend) at each calibration gain, scored in the hole only (outside it every output is the
    original): :func:`inpainter.calibrate`."""
    so = cfg.storage.options
    model = loading.load(cfg.checkpoint, so) if backends.backend_for(cfg.checkpoint, so).name == "checkpoint" else None
    inp = (
        Restorer(model, INPAINT, cfg.settings)
        if model is not None
        else backends.load(cfg.checkpoint, INPAINT, cfg.settings, so)
    )
    if not isinstance(inp, Inpainter):
        raise ConfigError(f"option 'checkpoint': {storage.redact(cfg.checkpoint)} does not inpaint")
    pairs = storage.list_files(cfg.images, imaging.IMAGE_SUFFIXES, so)[: cfg.max_images]
    if not pairs:
        raise FileNotFoundError(f"no images at {storage.redact(cfg.images)}")
    photos = []
    for url, rel in pairs:
        hr = imaging.to_rgb(imaging.decode(storage.read_bytes(url, so)))
        if min(hr.size) < 16:
            log.warning(f"[eval] {rel}: {hr.size} is too small to score; left out")
            continue
        photos.append((hr, degrade.inpaint_mask(hr.height, hr.width, degrade.seed_for(storage.basename(url)))))
    if not photos:
        raise ConfigError(f"option 'images': none of the images under {storage.redact(cfg.images)} is large enough")
    cal = inpainter.calibrate(inp, photos, GAINS, keep=4)
    panels = []
    for (hr, hole), outs in zip(photos, cal.outputs):
        masked = np.asarray(hr).copy()
        masked[hole] = 128
        panels.append([Image.fromarray(masked), outs[0.0], outs[1.0], outs[inp.gain], hr])
    rows = {"model": cal.by_gain[inp.gain], "classical_base": cal.by_gain[0.0]}
    return _summary(cfg, rows, cal.by_gain, "classical_base", inp, model), panels


def _image_pair(cfg: EvalConfig, url: str, rel: str, scale: int) -> tuple[Image.Image, Image.Image] | None:
    """(original, degraded input) of one held-out image: the ``--lowres`` file, or the original
    degraded with the task's own degradation; None for an image too small to score."""
    hr = imaging.to_rgb(imaging.decode(storage.read_bytes(url, cfg.storage.options)))
    if cfg.lowres:
        lr = _ready_made_input(cfg, rel)
        if hr.width < lr.width * scale or hr.height < lr.height * scale:
            raise ConfigError(f"option 'lowres': {rel} is {lr.size}, too large for its original {hr.size} at x{scale}")
        return hr.crop((0, 0, lr.width * scale, lr.height * scale)), lr
    # a multiple of the scale, so the degraded input is exactly 1/scale (the restorer pads the rest)
    if min(hr.size) < 8 * scale:
        log.warning(f"[eval] {rel}: {hr.size} is too small to score at x{scale}; left out")
        return None
    hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
    return hr, degrade.degrade(cfg.task, hr, degrade.seed_for(storage.basename(url)))


def _classical_outputs(lr: Image.Image, hr: Image.Image, base: Image.Image, scale: int) -> dict[str, Image.Image]:
    """The classical rows of one image: resizes and the base (upscaling), or the input and the base."""
    if scale > 1:
        return {
            "bicubic": lr.resize(hr.size, Image.Resampling.BICUBIC),
            "lanczos": lr.resize(hr.size, Image.Resampling.LANCZOS),
            "back_projection": base,
        }
    return {"input": lr, "classical_base": base}


@torch.no_grad()
def _reconstruction(model, target: torch.Tensor) -> torch.Tensor:
    """The autoencoder's own reconstruction of the original (the ceiling of a latent method),
    padded to the autoencoder's multiple and cropped back."""
    padded, (th, tw) = pad_to(target, model.vae.downsample)
    recon = model.vae.decode(model.vae.encode(padded.to(model.vae.device)).mean).float().clamp(-1, 1)
    return recon.cpu()[..., :th, :tw]


def _summary(
    cfg: EvalConfig, rows: dict[str, Scores], calib: dict[float, Scores], floor: str, restorer, model
) -> dict[str, Any]:
    """The result: mean scores per row, the calibration of the gain and the recommended gain."""
    table = {
        k: {
            "psnr": round(float(np.mean(v["psnr"])), 3),
            "psnr_y": round(float(np.mean(v["psnr_y"])), 3),
            "ssim": round(float(np.mean(v["ssim"])), 4),
            "psnr_per_image": [round(p, 3) for p in v["psnr"]],
        }
        for k, v in rows.items()
    }
    # the floor a gain must keep: never below Lanczos on any image (upscaling; for `restore`, never
    # below the degraded input itself; for `inpaint`, the classical fill) in PSNR, and on average at
    # least the classical base
    ref = rows[floor]
    base_mean = float(np.mean(calib[0.0]["psnr"]))

    def never_below(r: Scores) -> bool:
        return never_worse(r["psnr"], ref["psnr"]) and float(np.mean(r["psnr"])) >= base_mean - 1e-4

    calibration = (
        {}
        if restorer is None
        else {
            str(g): {
                "psnr": round(float(np.mean(c["psnr"])), 3),
                "ssim": round(float(np.mean(c["ssim"])), 4),
                "psnr_per_image": [round(p, 3) for p in c["psnr"]],
                "never_below_baseline": never_below(c),
            }
            for g, c in calib.items()
        }
    )
    safe = [g for g in GAINS if never_below(calib[g])] if restorer is not None else []
    return {
        "task": cfg.task,
        "images": len(rows["model"]["psnr"]),
        "settings": to_dict(cfg.settings),
        "gain": restorer.gain if restorer is not None else None,
        "checkpoint_step": model.info.step if model is not None else None,
        "scores": table,
        "floor": floor,
        "model_never_below_lanczos": never_below(rows["model"]),
        "calibration": calibration,
        # a pretrained network or pipeline has no gain to calibrate
        "recommended_gain": (
            None if restorer is None else max(safe, key=lambda g: np.mean(calib[g]["psnr"])) if safe else 0.0
        ),
    }


def _ready_made_input(cfg: EvalConfig, rel: str) -> Image.Image:
    """The ``--lowres`` file for original ``rel``: the same relative name, any allowed extension."""
    stem = rel.rsplit(".", 1)[0]
    for cand in [rel] + [f"{stem}.{ext}" for ext in imaging.IMAGE_EXTS]:
        url = storage.join(cfg.lowres, cand)
        if storage.exists(url, cfg.storage.options):
            return imaging.to_rgb(imaging.decode(storage.read_bytes(url, cfg.storage.options)))
    raise ConfigError(f"option 'lowres': no input for {rel} under {storage.redact(cfg.lowres)}")


def format_table(result: dict) -> str:
    step = result["checkpoint_step"]
    lines = [
        f"eval {result['task']} on {result['images']} held-out images"
        + (f" (checkpoint step {step}):" if step is not None else " (a pretrained network or pipeline):"),
        f"{'method':<17}{'PSNR dB':>9}{'PSNR-Y**':>10}{'SSIM':>8}",
    ]
    for name, s in result["scores"].items():
        label = "autoencoder*" if name == "autoencoder" else name
        lines.append(f"{label:<17}{s['psnr']:>9.2f}{s['psnr_y']:>10.2f}{s['ssim']:>8.4f}")
    if "autoencoder" in result["scores"]:
        lines.append("* reconstruction of the original through the autoencoder: the ceiling of whole-image decoding")
    lines.append("** luma PSNR with a border of <scale> pixels cropped (the super-resolution papers' convention)")
    lines.append(
        f"model never below {result['floor']} (PSNR per image) and at least the base on average: "
        f"{result['model_never_below_lanczos']}"
    )
    if result["calibration"]:
        lines.append(
            "detail gain (--gain) calibration: "
            + ", ".join(
                f"{g}: {c['psnr']:.2f} dB{'' if c['never_below_baseline'] else ' (below baseline on some image)'}"
                for g, c in result["calibration"].items()
            )
        )
        lines.append(
            f"recommended --gain: {result['recommended_gain']} (the best mean PSNR among the gains never below "
            f"{result['floor']} on any of these images, nor below the classical base on average; 0 = the base)"
        )
    return "\n".join(lines)


def _side_by_side(panels: list[list[Image.Image]]) -> bytes:
    """Rows of: input (nearest) | bicubic | Lanczos | model | original (upscaling); input | input |
    classical base | model | original (``restore``)."""
    w, h = panels[0][0].size
    sheet = Image.new("RGB", (5 * w, len(panels) * h), (255, 255, 255))
    for r, row in enumerate(panels):
        for c, im in enumerate(row):
            sheet.paste(im.resize((w, h)), (c * w, r * h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
