"""The restoration backends: the one list of what ``restore`` and ``eval`` can run, for the
drivers (:func:`check`, before any Ray work) and the actors (:func:`load`).

A backend claims a checkpoint URL, checks it cheaply (descriptions only, one line for a wrong
one) and loads a :class:`RestorerLike` for a task. :data:`BACKENDS` is tried in order; an
inpainting refiner (a ``train-refiner --task inpaint`` output) is used as it is; the
project's own diffusion checkpoints come last and claim whatever the others do not. Adding a
backend is one module (its check and its restorer) and one :class:`Backend` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from pipeline.config import ConfigError
from pipeline.io.imaging import PixelsT
from pipeline.models import loading
from pipeline.restoration import inpaint_pipeline, inpaint_refiner, networks, pipeline_folders, pipelines
from pipeline.restoration.restorer import Restorer, RestoreSettings, check_compatible


class RestorerLike(Protocol):
    """What every backend's restorer offers the actors and ``eval``: an 8-bit image in gives an
    8-bit image out, 16-bit levels in give levels out (:data:`imaging.Pixels`)."""

    task: str
    scale: int
    gain: float

    def restore(self, im: PixelsT, mask: Image.Image | None = None) -> PixelsT: ...

    def restore_many(self, images: list[PixelsT]) -> list[PixelsT]: ...


@dataclass(frozen=True)
class Backend:
    """``claims(url, storage_options)``: is this backend's kind of checkpoint at ``url``;
    ``check(url, task, storage_options, prompt)``: the task it will run, or a one-line error;
    ``load(url, task, settings, storage_options, prompt)``: its restorer (in an actor)."""

    name: str
    claims: Callable[[str, dict | None], bool]
    check: Callable[[str, str, dict | None, str], str]
    load: Callable[[str, str, RestoreSettings, dict | None, str], RestorerLike]
    takes_prompt: bool = False


def _no_prompt(check: Callable[[str, str, dict | None], str]) -> Callable[[str, str, dict | None, str], str]:
    return lambda url, task, so, prompt: check(url, task, so)


BACKENDS: list[Backend] = [
    Backend(
        "network",
        lambda url, so: networks.is_network_file(url),
        _no_prompt(networks.describe),
        lambda url, task, opts, so, prompt: networks.load(url, task, opts, so),
    ),
    Backend(  # a StableDiffusionInpaintPipeline folder (before the other pipeline folders)
        "inpaint-pipeline",
        lambda url, so: pipeline_folders.class_of(url, so) == pipeline_folders.SD_INPAINT,
        inpaint_pipeline.describe,
        lambda url, task, opts, so, prompt: inpaint_pipeline.PipelineInpainter(url, task, opts, so, prompt=prompt),
        takes_prompt=True,
    ),
    Backend(  # the x4 super-resolution pipeline folders (and any other folder, refused by its check)
        "pipeline",
        pipeline_folders.is_pipeline_folder,
        pipeline_folders.describe,
        lambda url, task, opts, so, prompt: pipelines.PipelineRestorer(url, task, opts, so, prompt=prompt),
        takes_prompt=True,
    ),
    Backend(  # a train-refiner --task inpaint output, used as it is
        "refiner",
        inpaint_refiner.is_refiner,
        _no_prompt(inpaint_refiner.check),
        lambda url, task, opts, so, prompt: inpaint_refiner.RefinerInpainter(url, task, opts, so),
    ),
    Backend(  # last: whatever the others do not claim is read as a latent-pipeline checkpoint
        "checkpoint",
        lambda url, so: True,
        lambda url, task, so, prompt: check_compatible(loading.describe(url, so), task),
        lambda url, task, opts, so, prompt: Restorer(loading.load(url, so), task, opts),
    ),
]


def backend_for(url: str, storage_options: dict | None = None) -> Backend:
    """The first backend of :data:`BACKENDS` that claims ``url``."""
    return next(b for b in BACKENDS if b.claims(url, storage_options))


def check(url: str, task: str, storage_options: dict | None = None, prompt: str = "") -> str:
    """The task the checkpoint at ``url`` will run (``task`` or its own), or one line saying why
    it cannot; reads descriptions only, so drivers call it before any Ray work."""
    backend = backend_for(url, storage_options)
    if prompt and not backend.takes_prompt:
        takers = " or ".join(name for name, kind in pipeline_folders.KINDS.items() if kind.takes_prompt)
        raise ConfigError(f"option 'prompt': only a {takers} folder takes a prompt")
    return backend.check(url, task, storage_options, prompt)


def load(
    url: str, task: str, opts: RestoreSettings, storage_options: dict | None = None, prompt: str = ""
) -> RestorerLike:
    """The restorer of the checkpoint at ``url``, whatever its backend."""
    return backend_for(url, storage_options).load(url, task, opts, storage_options, prompt)
