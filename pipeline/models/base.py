"""A pretrained diffusers base model (a pipeline folder) as fine-tuning and export read it.

The folder is checked once, by :func:`base_model.inspect` (the one check ``encode --base``
uses too): ``model_index.json`` names a supported pipeline class (its family), every component
comes from diffusers or transformers, no Python code and no pickle-only weights, and the files
each component loads lie inside the folder (:mod:`pipeline.io.folders`). :class:`Base` adds
what training and export need on top: the denoiser, the scheduler's config (the objective), and
loading from a private view of exactly the checked files.

Identity: :meth:`Base.identity` is the per-component identity :func:`base_model.inspect`
computes (class, config and weights digests), the one a latent cache records in its
manifest's ``base``. A fine-tune checkpoint records the whole of it (denoiser included); a cache
is checked on the components that made it (:data:`CONDITIONING`), so training on a cache of
another base, and resuming or exporting over another base, are refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import folders, storage
from pipeline.models import base_model
from pipeline.models.base_model import INDEX_NAME, BaseFolder

# the components whose outputs a latent cache holds (latents, prompt embeddings)
CONDITIONING = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class Base:
    """A checked local base folder."""

    folder: BaseFolder
    where: str  # how messages name it (credentials redacted)

    @property
    def local(self) -> str:
        return self.folder.local

    @property
    def class_name(self) -> str:
        return self.folder.class_name

    @property
    def family(self) -> str:
        return self.folder.family.name

    @property
    def denoiser(self) -> str:
        return self.folder.family.denoiser

    def files(self, name: str) -> list[str]:
        """Exactly the files a library loads for component ``name``: its configs and tokenizer
        files, and its safetensors weights (one file, or an index and the shards it names)."""
        f = self.folder.files[name]
        return [*f["config"], *f["weights"]]

    def identity(self) -> dict[str, Any]:
        """Each component's class and the digests of exactly its loaded files."""
        return self.folder.identity["components"]

    def config(self, name: str, file: str = "config.json") -> dict[str, Any]:
        rel = f"{name}/{file}"
        with open(folders.file(self.local, rel, self.where), "rb") as f:
            data = json.loads(f.read())
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.where}: {rel} is not a JSON object")
        return data

    def scheduler_config(self) -> dict[str, Any]:
        return self.config("scheduler", "scheduler_config.json")

    def load_denoiser(self):
        """The denoiser (UNet or transformer), loaded from a view of exactly its files."""
        import diffusers

        name = self.denoiser
        cls = getattr(diffusers, self.config(name)["_class_name"])
        with folders.view(self.local, self.files(name), self.where) as view:
            return cls.from_pretrained(view, subfolder=name, use_safetensors=True, local_files_only=True)

    def pipeline_files(self, skip: tuple[str, ...] = ()) -> list[str]:
        """``model_index.json`` and every checked component's files (those of ``skip`` left out)."""
        out = [INDEX_NAME]
        for name in sorted(self.folder.files):
            if name not in skip:
                out += self.files(name)
        return out

    def index(self) -> dict[str, Any]:
        """The base's ``model_index.json``."""
        with open(folders.file(self.local, INDEX_NAME, self.where), "rb") as f:
            return json.loads(f.read())

    def unchecked(self) -> list[str]:
        """The optional components ``model_index.json`` names that are neither checked nor loaded
        (a safety checker, a feature extractor, ...)."""
        return [
            n
            for n, v in self.index().items()
            if isinstance(v, list) and not n.startswith("_") and n not in self.folder.files
        ]

    def exported_index(self) -> dict[str, Any]:
        """The base's ``model_index.json`` with only the components an export copies (the
        :meth:`unchecked` ones set absent)."""
        return {**self.index(), **{name: [None, None] for name in self.unchecked()}}

    def load_pipeline(self, **given: Any):
        """The base's diffusers pipeline, loaded from a view of exactly the checked files.
        ``given`` components replace the base's own (a module already in memory, such as a
        fine-tuned denoiser, or None to leave one out, such as the text encoders when the prompt
        embeddings are given); the :meth:`unchecked` components are left out."""
        import diffusers

        absent: dict[str, Any] = dict.fromkeys(self.unchecked())
        with folders.view(self.local, self.pipeline_files(skip=tuple(given)), self.where) as view:
            pipe = getattr(diffusers, self.class_name).from_pretrained(
                view, **absent, **given, use_safetensors=True, local_files_only=True
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def open_base(url: str, storage_options: dict | None = None, option: str = "base") -> Base:
    """The checked base folder at ``url`` (copied locally once); refusals name ``option``."""
    where = f"option '{option}': {storage.redact(url)}"
    if not storage.exists(storage.join(url, INDEX_NAME), storage_options):
        raise ConfigError(f"{where}: no {INDEX_NAME}: not a diffusers pipeline folder")
    return Base(base_model.inspect(url, storage_options), where)


def check_cache(base: Base, man: dict, where: str) -> None:
    """Refuse a latent cache (its manifest ``man``) that was not made with this base's
    autoencoder and text encoders: its latents or embeddings mean something else to the model."""
    recorded = man.get("base")
    identity = recorded.get("identity") if isinstance(recorded, dict) else None
    if (
        not isinstance(recorded, dict)
        or not isinstance(identity, dict)
        or not isinstance(identity.get("components"), dict)
    ):
        raise ConfigError(f"{where}: the latent cache records no base model (encode it with `encode --base`)")
    if recorded.get("family") != base.family:
        raise ConfigError(f"{where}: a cache of a {recorded.get('family')!r} base, not of this {base.family!r} base")
    have = {k: v for k, v in identity["components"].items() if k in CONDITIONING}
    want = {k: v for k, v in base.identity().items() if k in CONDITIONING}
    differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if differ:
        named = base.where.split(": ", 1)[-1]
        raise ConfigError(
            f"{where}: the latent cache was made with another {', '.join(differ)} than {named}'s "
            "(re-encode with `encode --base` of this base)"
        )
