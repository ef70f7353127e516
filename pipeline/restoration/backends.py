"""The one place that tells the three kinds of restoration checkpoint apart, for the drivers
(``restore``, ``eval``) and the actors: a latent-pipeline diffusion checkpoint (:mod:`restorer`),
a pretrained network file that spandrel recognises (:mod:`networks`), or a diffusers
super-resolution pipeline folder (:mod:`pipelines`)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigError
from pipeline.models import loading
from pipeline.restoration import networks, pipelines
from pipeline.restoration.restorer import Restorer, RestoreSettings, check_compatible


def kind(url: str, storage_options: dict | None = None) -> str:
    """``network``, ``pipeline`` or ``checkpoint``."""
    if networks.is_network_file(url):
        return "network"
    if pipelines.is_pipeline_folder(url, storage_options):
        return "pipeline"
    return "checkpoint"


def check(url: str, task: str, storage_options: dict | None = None, prompt: str = "") -> str:
    """The task the checkpoint at ``url`` will run (``task`` or its own), or one line saying why
    it cannot; reads descriptions only, so drivers call it before any Ray work."""
    k = kind(url, storage_options)
    if prompt and k != "pipeline":
        raise ConfigError(f"option 'prompt': only a {pipelines.SD_UPSCALE} folder takes a prompt")
    if k == "network":
        return networks.describe(url, task, storage_options)
    if k == "pipeline":
        return pipelines.describe(url, task, storage_options, prompt=prompt)
    return check_compatible(loading.describe(url, storage_options), task)


def load(url: str, task: str, opts: RestoreSettings, storage_options: dict | None = None, prompt: str = "") -> Any:
    """A restorer for the checkpoint at ``url``: ``restore_many``/``restore`` and ``task``,
    ``scale``, ``gain`` whatever its kind."""
    k = kind(url, storage_options)
    if k == "network":
        return networks.NetworkRestorer(url, task, opts, storage_options)
    if k == "pipeline":
        return pipelines.PipelineRestorer(url, task, opts, storage_options, prompt=prompt)
    return Restorer(loading.load(url, storage_options), task, opts)
