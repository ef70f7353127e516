"""Pretrained diffusers x4 super-resolution pipelines in the same job: a diffusers pipeline folder
(``model_index.json`` at its root) of class ``LDMSuperResolutionPipeline`` (latent diffusion:
VQModel + UNet2DModel + scheduler) or ``StableDiffusionUpscalePipeline`` (AutoencoderKL +
UNet2DConditionModel + CLIP text encoder + two schedulers; run with the empty prompt).

Only safetensors weights are loaded (``use_safetensors=True``; a component with ``.bin`` /
``.pt`` / ``.ckpt`` weights only is refused on the driver: they are pickles), only from the local
copy (``local_files_only``), and no code from the folder is run: the pipeline class must be one of
the two above and every component must come from diffusers or transformers. diffusers loads
from a private view of exactly the files it needs, each checked to lie inside the folder (an
index whose shards lie elsewhere, or a link leaving the folder, is refused) and each
safetensors header read first (:mod:`pipeline.io.folders`). A remote folder is
copied once into the private cache (:func:`storage.download_dir`); the pipeline is loaded once per
actor.

Both pipelines are x4, so the task is ``upscale4``. The low-resolution input is reflect-padded to
a multiple of the pipeline's size unit (32 for LDM, whose own preprocessing would otherwise resize
it) and the output cropped back to exactly 4x the input. Large images run tile by tile with
blended overlaps (:mod:`tiling`; tiles of ``--tile / 4`` input pixels), so memory is bounded by
``--tile``; images of one size go through the pipeline in one batched call. ``--steps`` is the
number of inference steps and ``--seed`` seeds the sampler noise (each pipeline call starts from
a generator seeded with it, so a tile's noise does not continue across tiles).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError
from pipeline.io import checkpoint, folders, storage
from pipeline.io.imaging import PixelsT, like, rgb_levels
from pipeline.models.tiling import tiled_apply
from pipeline.restoration.restorer import RestoreSettings, indices_by_size

INDEX_NAME = "model_index.json"
LDM_SR = "LDMSuperResolutionPipeline"
SD_UPSCALE = "StableDiffusionUpscalePipeline"
# the components each supported pipeline needs (others, such as a safety checker, are optional)
REQUIRED = {
    LDM_SR: ("vqvae", "unet", "scheduler"),
    SD_UPSCALE: ("vae", "text_encoder", "tokenizer", "unet", "low_res_scheduler", "scheduler"),
}
SCALE, TASK = 4, "upscale4"
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
# libraries a component may come from: diffusers' own modules ("stable_diffusion" is the safety
# checker's) and transformers; anything else would import code shipped with the folder
LIBRARIES = ("diffusers", "transformers", "stable_diffusion")
# the components of each that are networks (must have safetensors weights)
NETWORKS = {LDM_SR: ("vqvae", "unet"), SD_UPSCALE: ("vae", "text_encoder", "unet")}
LDM_MULTIPLE = 32  # LDMSuperResolutionPipeline resizes a PIL input to a multiple of 32


def is_pipeline_folder(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``--checkpoint`` names a diffusers pipeline folder (``model_index.json`` at its root)."""
    return storage.exists(storage.join(url, INDEX_NAME), storage_options)


def _inspect(url: str, storage_options: dict | None = None, where: str = "") -> tuple[str, dict[str, str]]:
    """The pipeline's class name and its components' libraries, after checking the folder is one
    that is loaded (one line)."""
    where = where or storage.redact(url)
    if not storage.is_remote(url) and folders.has(storage.download_dir(url), INDEX_NAME):
        folders.file(storage.download_dir(url), INDEX_NAME, where)  # not a link leaving the folder
    try:
        index = storage.read_json(storage.join(url, INDEX_NAME), storage_options)
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"{where}: no {INDEX_NAME}: not a diffusers pipeline folder") from None
    except (ValueError, UnicodeDecodeError):
        raise checkpoint.CheckpointError(f"{where}: {INDEX_NAME} is not valid JSON") from None
    if not isinstance(index, dict):
        raise checkpoint.CheckpointError(f"{where}: {INDEX_NAME} is not a JSON object")
    cls = index.get("_class_name")
    if not isinstance(cls, str) or cls not in REQUIRED:
        raise ConfigError(
            f"{where}: a diffusers {cls!r} pipeline; restore runs only the x4 super-resolution pipelines "
            f"{' and '.join(REQUIRED)}"
        )
    components: dict[str, str] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue  # metadata and config values (e.g. max_noise_level)
        if len(value) != 2:
            raise checkpoint.CheckpointError(f"{where}: {INDEX_NAME}: component {name!r} is not [library, class]")
        library, class_name = value
        if library is None and class_name is None:
            continue  # an optional component that is absent
        if library not in LIBRARIES:
            raise ConfigError(
                f"{where}: component {name!r} comes from {library!r}; only diffusers and transformers "
                "components are loaded (no code from the folder is run)"
            )
        components[name] = str(library)
    missing = [c for c in REQUIRED[cls] if c not in components]
    if missing:
        raise checkpoint.CheckpointError(f"{where}: {cls} without its {', '.join(missing)} component(s)")
    files = storage.walk_files(url, storage_options)
    code = [f for f in files if f.lower().endswith(".py")]
    if code:
        raise ConfigError(
            f"{where}: the folder holds Python code ({code[0]}); pipelines with custom code are not loaded"
        )
    for name in components:
        under = [f for f in files if f.startswith(name + "/")]
        if any(f.endswith(WEIGHTS_SUFFIX) for f in under):
            continue
        pickles = [f for f in under if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise checkpoint.CheckpointError(
                f"{where}: {name}/ has only pickle weights ({posixpath.basename(pickles[0])}); only safetensors "
                "are loaded: re-save the pipeline with safe_serialization=True"
            )
        if name in NETWORKS[cls]:
            raise checkpoint.CheckpointError(f"{where}: {name}/ has no {WEIGHTS_SUFFIX} weights")
    return cls, components


def _files(local: str, cls: str, components: dict[str, str], where: str) -> list[str]:
    """Exactly the files diffusers loads from the local pipeline folder ``local``: ``model_index.json``
    and, per component, its configs and tokenizer files and its safetensors weights (one file,
    or an index and the shards it names); each lies inside the folder, and each safetensors
    header is read. Other weights (variants, pickles) are not among them, so they cannot load."""
    out = [INDEX_NAME]
    for name, library in components.items():
        if not folders.has(local, name):
            continue  # diffusers names what is missing
        sub = folders.subfolder(local, name, where)
        base = f"{name}/diffusion_pytorch_model" if library == "diffusers" else f"{name}/model"
        weights = folders.weights(local, base, where)
        if name in NETWORKS[cls] and not weights:
            raise checkpoint.CheckpointError(f"{where}: {name}/ has no {posixpath.basename(base)}{WEIGHTS_SUFFIX}")
        for rel in weights:
            if rel.endswith(WEIGHTS_SUFFIX):
                folders.check_safetensors(local, rel, where)
        out += weights
        for dirpath, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                rel = posixpath.join(name, os.path.relpath(os.path.join(dirpath, n), sub).replace(os.sep, "/"))
                if n.startswith(".") or n.lower().endswith((WEIGHTS_SUFFIX, ".index.json", ".py", *PICKLE_SUFFIXES)):
                    continue
                folders.file(local, rel, where)  # a config or tokenizer file: not a link leaving the folder
                out.append(rel)
    folders.refuse_remote_code(local, out, where)
    return out


def _check_task(cls: str, task: str) -> None:
    if task and task != TASK:
        raise ConfigError(
            f"option 'task': {cls} is a x{SCALE} super-resolution pipeline, so its task is {TASK!r}, not {task!r}"
        )


def describe(url: str, task: str, storage_options: dict | None = None, prompt: str = "") -> str:
    """The task the pipeline at ``url`` runs (``upscale4``), checked against ``--task`` (and a
    ``--prompt`` against the class) on the driver, in one line."""
    class_name, components = _inspect(url, storage_options)
    if not storage.is_remote(url):  # a local folder's files are checked here (a remote one's in the actor)
        _files(storage.download_dir(url, storage_options), class_name, components, storage.redact(url))
    _check_task(class_name, task)
    if prompt and class_name != SD_UPSCALE:
        raise ConfigError(f"option 'prompt': only a {SD_UPSCALE} takes a prompt, not a {class_name}")
    return TASK


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of (B, C, h, w) up to a multiple (repeatedly for tiny sides,
    replicating a side of one pixel)."""
    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    while ph or pw:
        dh, dw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
        if not dh and not dw:
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, dw, 0, dh), mode="reflect")
        ph, pw = ph - dh, pw - dw
    return x


class PipelineRestorer:
    """Upscales images x4 with a diffusers pipeline; the same interface as :class:`Restorer`."""

    def __init__(
        self,
        url: str,
        task: str,
        opts: RestoreSettings,
        storage_options: dict | None = None,
        device: str | None = None,
        *,
        prompt: str = "",
    ):
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from safetensors import SafetensorError

        where = storage.redact(url)
        local = storage.download_dir(url, storage_options)  # a local folder as is; a remote one copied once
        self.class_name, components = _inspect(local, where=where)  # the copy that is loaded is the one checked
        files = _files(local, self.class_name, components, where)
        _check_task(self.class_name, task)
        self.task, self.scale, self.opts, self.gain, self.prompt = TASK, SCALE, opts, 1.0, prompt
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        diffusers_logging.disable_progress_bar()
        try:
            with folders.view(local, files, where) as seen:  # diffusers sees exactly the files checked
                pipe: Any = DiffusionPipeline.from_pretrained(
                    seen,
                    use_safetensors=True,
                    local_files_only=True,
                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,  # (it needs accelerate)
                )
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as exc:
            detail = " ".join(str(exc).split())[:160]
            raise checkpoint.CheckpointError(
                f"{where}: diffusers could not load the pipeline ({type(exc).__name__}: {detail})"
            ) from None
        if type(pipe).__name__ != self.class_name:
            raise checkpoint.CheckpointError(f"{where}: loaded a {type(pipe).__name__}, not a {self.class_name}")
        vae = pipe.vqvae if self.class_name == LDM_SR else pipe.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if factor != SCALE:
            raise checkpoint.CheckpointError(f"{where}: its autoencoder decodes at x{factor}, not x{SCALE}")
        # the size unit of the input: LDM's own preprocessing rounds to 32; the SD UNet halves it per level
        self.multiple = (
            LDM_MULTIPLE if self.class_name == LDM_SR else max(8, 2 ** (len(pipe.unet.config.block_out_channels) - 1))
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    @torch.no_grad()
    def _call(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline call: (B, 3, h, w) in [0, 1], h and w multiples of ``self.multiple`` ->
        (B, 3, 4h, 4w) in [0, 1]."""
        generator = torch.Generator("cpu").manual_seed(self.opts.seed)
        common = {"num_inference_steps": self.opts.steps, "generator": generator, "output_type": "pt"}
        if self.class_name == LDM_SR:  # takes a tensor in [-1, 1] as it is
            out = self.pipe(image=x * 2 - 1, **common).images
        else:  # takes a tensor in [0, 1]; the empty prompt needs no classifier-free guidance (both halves agree)
            out = self.pipe(
                prompt=[self.prompt] * x.shape[0],
                image=x,
                guidance_scale=9.0 if self.prompt else 1.0,
                **common,
            ).images
        return out.float().clamp(0, 1)

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1]: padded, tile by tile, cropped back."""
        h, w = x.shape[-2:]
        padded = _pad(x.to(self.device), self.multiple)
        tile = max(self.multiple, (self.opts.tile // SCALE) // self.multiple * self.multiple)
        overlap = max(0, min(self.opts.overlap // SCALE, tile // 2 - 1))
        y = tiled_apply(self._call, padded, tile, overlap, factor=SCALE, batch=max(1, 8 // x.shape[0]))
        return y[:, :, : h * SCALE, : w * SCALE]

    @torch.no_grad()
    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]:
        """Upscale several images, those of one size in one batch."""
        out: list[PixelsT | None] = [None] * len(images)
        for idx in indices_by_size(images):
            # exactly the pipelines' own conversion of a PIL image: uint8 / 255 in float32
            x = torch.from_numpy(np.stack([rgb_levels(images[i]).transpose(2, 0, 1) for i in idx]) / 255.0)
            y = self._run(x).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = like(images[i], y[j].transpose(1, 2, 0) * 255)
        return out  # type: ignore[return-value]

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT:
        return self.restore_many([im])[0]
