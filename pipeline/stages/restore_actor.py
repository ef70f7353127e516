"""The actor stage of ``restore``: :class:`RestoreActor` loads the restorer once per actor and,
per batch, decodes each image (and its mask), restores same-size images together, and writes
each output through the storage module; every image that fails becomes an error row, never a
failed batch. :func:`output_name` is the one rule for an output's name and format, used by the
driver to find outputs that already exist. The driver is :mod:`pipeline.stages.restore`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.io import imaging, storage
from pipeline.models.degrade import INPAINT

if TYPE_CHECKING:
    from pipeline.stages.restore import RestoreConfig

FORMATS = ("png", "jpg", "webp", "same")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF", "bmp": "BMP"}
# kept as they are by --format same: every allowed input format (archives and scans are TIFF)
_SAME_EXT = {ext: ext for ext in ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp")}
MASK_MEMBER = "mask.png"  # an image shard's own inpainting mask: ``key.mask.png`` beside ``key.jpg``
EXISTS = "exists"  # read-stage marker: the output is already there (a re-run skips it)
NO_SPACE = "no_space_left"  # error reason of a write that found the output's device full


def output_name(rel: str, fmt: str) -> tuple[str, str]:
    """The one place that decides an output: (relative output path, Pillow format name).

    ``same`` keeps the input's format and extension (png, jpg/jpeg, webp, tif/tiff, bmp); a name
    without a known extension is written as PNG and named ``.png``, so a file's name always
    matches its bytes.
    """
    head, _, base = rel.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = ext.lower()
    out_ext = _SAME_EXT.get(ext, "png") if fmt == "same" else fmt
    name = f"{stem}.{out_ext}"
    return (f"{head}/{name}" if head else name), _PIL_FORMAT[out_ext]


class RestoreActor:
    """Loads the checkpoint once per actor; restores and writes each image of a batch."""

    def __init__(self, cfg: RestoreConfig, task: str):
        import torch

        from pipeline.restoration import backends

        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg, self.task = cfg, task
        self.restorer = backends.load(cfg.checkpoint, task, cfg.settings, cfg.storage.options, prompt=cfg.prompt)
        self.actor_id = f"{os.getpid()}-{id(self)}"  # the report lists the actors (one model load each)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        t0 = time.perf_counter()
        rels = [str(r) for r in batch["rel"]]
        status, reason, detail = ["written"] * len(rels), [""] * len(rels), [""] * len(rels)
        loaded: dict[int, tuple] = {}  # index -> (decoded image, mask, what to restore)
        members = batch["mask"] if "mask" in batch else [b""] * len(rels)
        for i, (rel, data, err, member) in enumerate(zip(rels, batch["data"], batch["error"], members)):
            if err == EXISTS:
                status[i] = "skipped"
            elif err:
                status[i], reason[i] = "error", str(err)
            elif not storage.safe_relpath(rel):
                status[i], reason[i] = "error", "unsafe_path"
            else:
                self._guard(
                    i,
                    status,
                    reason,
                    detail,
                    lambda i=i, data=data, member=member: loaded.__setitem__(
                        i, self._load(rels[i], bytes(data), bytes(member))
                    ),
                )
        # same-size images go through the model together; a failing group is retried one by one
        outputs: dict[int, Any] = {}
        plain = [i for i in loaded if loaded[i][1] is None]
        if plain:
            with contextlib.suppress(Exception):  # a failing group: the images are isolated one by one below
                outputs.update(zip(plain, self.restorer.restore_many([loaded[i][2] for i in plain])))
        for i in loaded:
            if i not in outputs:
                _im, mask, pixels = loaded[i]
                self._guard(
                    i,
                    status,
                    reason,
                    detail,
                    lambda i=i, pixels=pixels, mask=mask: outputs.__setitem__(i, self.restorer.restore(pixels, mask)),
                )
        for i in outputs:
            self._guard(i, status, reason, detail, lambda i=i: self._write(rels[i], loaded[i][0], outputs[i]))
        seconds = (time.perf_counter() - t0) / max(1, len(rels))
        return {
            "rel": rels,
            "status": status,
            "reason": reason,
            "detail": detail,
            "seconds": [seconds] * len(rels),
            "actor": [self.actor_id] * len(rels),
        }

    @staticmethod
    def _guard(i: int, status: list, reason: list, detail: list, fn) -> None:
        """Run ``fn``; a failure marks image ``i`` as an error row instead of failing the job."""
        try:
            fn()
        except imaging.BadImage as exc:
            status[i], reason[i], detail[i] = "error", exc.reason, str(exc)
        except OSError as exc:  # a write that failed: disk full, permission, ...
            status[i], reason[i], detail[i] = (
                "error",
                NO_SPACE if exc.errno == errno.ENOSPC else "write_failed",
                storage.redact(f"{type(exc).__name__}: {exc}")[:200],
            )
        except Exception as exc:  # noqa: BLE001 - one bad image never fails the job
            status[i], reason[i], detail[i] = "error", "restore_failed", f"{type(exc).__name__}: {str(exc)[:200]}"

    def _mask(self, rel: str, im, member: bytes) -> Any:
        """The inpainting mask of ``rel`` (white = fill): the input's alpha, the shard sample's
        ``key.mask.png`` member, or the file of the same name under the mask folder; an image
        without its mask, or with a mask of another size, is an error row."""
        cfg = self.cfg
        if self.task != INPAINT:
            return None
        if cfg.mask in ("", "alpha"):  # the driver resolves "" (member for shards); a lone actor reads alpha
            alpha = imaging.split_alpha(im)
            if alpha is None:
                raise imaging.BadImage("no_mask", "input has no alpha channel to use as the mask")
            mask = alpha.point(lambda a: 255 if a < 128 else 0)  # transparent = fill
        elif cfg.mask == "member":
            if not member:
                raise imaging.BadImage("no_mask", f"the shard has no {MASK_MEMBER} member for {rel}")
            mask = imaging.decode(member, cfg.max_pixels)
        else:
            mask = self._mask_file(rel)
        if mask.size != im.size:
            raise imaging.BadImage(
                "mask_size", f"the mask is {mask.width}x{mask.height}, the image {im.width}x{im.height}"
            )
        return mask

    def _mask_file(self, rel: str) -> Any:
        cfg = self.cfg
        stem = rel.rsplit(".", 1)[0]
        for cand in (rel, stem + ".png"):
            url = storage.join(cfg.mask, cand)
            if storage.exists(url, cfg.storage.options):
                return imaging.decode(storage.read_bytes(url, cfg.storage.options), cfg.max_pixels)
        raise imaging.BadImage("no_mask", f"no mask for {rel} under {storage.redact(cfg.mask)}")

    def _load(self, rel: str, data: bytes, member: bytes = b"") -> tuple:
        """(decoded image, mask, what the restorer gets: a 16-bit source's levels, else 8-bit RGB)."""
        im, levels = imaging.decode_pixels(data, self.cfg.max_pixels)
        return im, self._mask(rel, im, member), imaging.to_rgb(im) if levels is None else levels

    def _write(self, rel: str, im, out) -> None:
        """Carry alpha and grey over from the input ``im`` and write the restored ``out``; levels
        of a 16-bit source are written with 16 bits where the format holds them (PNG, TIFF)."""
        from PIL import Image

        cfg = self.cfg
        out_rel, fmt = output_name(rel, cfg.format)
        grey = im.mode in imaging.GREY_MODES or im.mode == "LA"
        if isinstance(out, np.ndarray) and fmt in imaging.FORMATS_16BIT:
            data = imaging.encode_16bit(out, fmt, grey=grey)
            storage.write_bytes(storage.join(cfg.output, out_rel), data, cfg.storage.options)
            return
        out = imaging.to_8bit(out)
        alpha = imaging.split_alpha(im) if self.task != INPAINT else None
        if grey:
            out = out.convert("L")
        if alpha is not None and fmt != "JPEG":
            out = out.convert("LA" if out.mode == "L" else "RGBA")
            out.putalpha(alpha.resize(out.size, Image.Resampling.LANCZOS))
        buf = io.BytesIO()
        out.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        storage.write_bytes(storage.join(cfg.output, out_rel), buf.getvalue(), cfg.storage.options)

    def restore_one(self, rel: str, data: bytes) -> None:
        """Decode, restore and write one image (the unbatched path, used by bench/restore.py)."""
        im, mask, pixels = self._load(rel, data)
        self._write(rel, im, self.restorer.restore(pixels, mask))
