"""A diffusers pipeline folder as a restoration backend: which classes ``restore`` runs, the
checks every folder passes before diffusers sees it, and the one load. The running of each
class is its own module: :mod:`pipelines` (the x4 super-resolution pipelines) and
:mod:`inpaint_pipeline` (``StableDiffusionInpaintPipeline``).

A pipeline folder has ``model_index.json`` at its root; its class must be one of :data:`KINDS`
(each with the task it runs and the components it needs). Only safetensors weights are loaded
(``use_safetensors=True``; a component with ``.bin`` / ``.pt`` / ``.ckpt`` weights only is
refused on the driver: they are pickles), only from the local copy (``local_files_only``), and
no code from the folder is run: every component must come from diffusers or transformers, and a
folder holding ``.py`` files or configs asking for remote code is refused. diffusers loads from
a private view of exactly the files it needs, each checked to lie inside the folder (an index
whose shards lie elsewhere, or a link leaving the folder, is refused) and each safetensors
header read first (:mod:`pipeline.io.folders`). A remote folder is copied once into the private
cache (:func:`storage.download_dir`); the restorers load the pipeline once per actor.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.io import checkpoint, folders, storage

INDEX_NAME = "model_index.json"
LDM_SR = "LDMSuperResolutionPipeline"
SD_UPSCALE = "StableDiffusionUpscalePipeline"
SD_INPAINT = "StableDiffusionInpaintPipeline"


@dataclass(frozen=True)
class PipelineKind:
    task: str  # the one task the class runs
    required: tuple[str, ...]  # its components (others, such as a safety checker, are optional)
    networks: tuple[str, ...]  # the required components that are networks (must have safetensors weights)
    takes_prompt: bool = False


KINDS = {
    LDM_SR: PipelineKind("upscale4", ("vqvae", "unet", "scheduler"), ("vqvae", "unet")),
    SD_UPSCALE: PipelineKind(
        "upscale4",
        ("vae", "text_encoder", "tokenizer", "unet", "low_res_scheduler", "scheduler"),
        ("vae", "text_encoder", "unet"),
        takes_prompt=True,
    ),
    SD_INPAINT: PipelineKind(
        "inpaint", ("vae", "text_encoder", "tokenizer", "unet", "scheduler"), ("vae", "text_encoder", "unet"), True
    ),
}
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
# libraries a component may come from: diffusers' own modules ("stable_diffusion" is the safety
# checker's) and transformers; anything else would import code shipped with the folder
LIBRARIES = ("diffusers", "transformers", "stable_diffusion")


def is_pipeline_folder(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``--checkpoint`` names a diffusers pipeline folder (``model_index.json`` at its root)."""
    return storage.exists(storage.join(url, INDEX_NAME), storage_options)


def class_of(url: str, storage_options: dict | None = None) -> str:
    """The pipeline class a folder's ``model_index.json`` names ("" when there is none to read)."""
    try:
        index = storage.read_json(storage.join(url, INDEX_NAME), storage_options)
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""


def inspect(url: str, storage_options: dict | None = None, where: str = "") -> tuple[str, dict[str, str]]:
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
    if not isinstance(cls, str) or cls not in KINDS:
        runs = ", ".join(f"{name} ({kind.task})" for name, kind in KINDS.items())
        raise ConfigError(f"{where}: a diffusers {cls!r} pipeline; restore runs only the pipelines {runs}")
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
    kind = KINDS[cls]
    missing = [c for c in kind.required if c not in components]
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
        if name in kind.networks:
            raise checkpoint.CheckpointError(f"{where}: {name}/ has no {WEIGHTS_SUFFIX} weights")
    return cls, components


def files(local: str, cls: str, components: dict[str, str], where: str) -> list[str]:
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
        if name in KINDS[cls].networks and not weights:
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


def check_task(cls: str, task: str) -> str:
    """The task a pipeline of class ``cls`` runs, or a ConfigError when ``--task`` asks another."""
    own = KINDS[cls].task
    if task and task != own:
        what = "an inpainting" if own == "inpaint" else "a x4 super-resolution"
        raise ConfigError(f"option 'task': {cls} is {what} pipeline, so its task is {own!r}, not {task!r}")
    return own


def describe(url: str, task: str, storage_options: dict | None = None, prompt: str = "") -> str:
    """The task the pipeline at ``url`` runs, checked against ``--task`` (and a ``--prompt``
    against the class) on the driver, in one line."""
    cls, components = inspect(url, storage_options)
    if not storage.is_remote(url):  # a local folder's files are checked here (a remote one's in the actor)
        files(storage.download_dir(url, storage_options), cls, components, storage.redact(url))
    own = check_task(cls, task)
    if prompt and not KINDS[cls].takes_prompt:
        takers = " or ".join(name for name, kind in KINDS.items() if kind.takes_prompt)
        raise ConfigError(f"option 'prompt': only a {takers} takes a prompt, not a {cls}")
    return own


def load(url: str, task: str, storage_options: dict | None = None, device: str | None = None) -> tuple[Any, str]:
    """The pipeline at ``url`` (checked again on the copy that is loaded, and against ``task``),
    on ``device`` (default: CUDA when there is one), and its class name."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors import SafetensorError

    where = storage.redact(url)
    local = storage.download_dir(url, storage_options)  # a local folder as is; a remote one copied once
    cls, components = inspect(local, where=where)  # the copy that is loaded is the one checked
    checked = files(local, cls, components, where)
    check_task(cls, task)
    diffusers_logging.disable_progress_bar()
    try:
        with folders.view(local, checked, where) as seen:  # diffusers sees exactly the files checked
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
    if type(pipe).__name__ != cls:
        raise checkpoint.CheckpointError(f"{where}: loaded a {type(pipe).__name__}, not a {cls}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))), cls
