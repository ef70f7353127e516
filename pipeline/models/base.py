"""A pretrained diffusers base model (a pipeline folder) as fine-tuning and export read it.

:func:`open_base` checks a folder once: ``model_index.json`` names a supported pipeline class
(its family: ``sd``, ``sdxl``, ``pixart``, ``sd3``), every component comes from diffusers or
transformers, no Python code and no pickle-only weights. Every file that is read afterwards is
one of :meth:`Base.files` (the component's configs and tokenizer files and the safetensors
weights a library loads, each inside the folder: :mod:`pipeline.io.folders`), and the
libraries load from a private view of exactly those files.

Identity: :meth:`Base.identity` is the digest of each component's files. A latent cache made
for a base records :meth:`Base.cache_identity` (the autoencoder, text encoders and tokenizers:
what made the latents and embeddings) in its manifest's ``base``; a fine-tune checkpoint records
the whole :meth:`Base.identity` (denoiser included), so that training on a cache of another base
and resuming or exporting over another base are refused in one line.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import folders, storage

INDEX_NAME = "model_index.json"
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
}
DENOISER = {"sd": "unet", "sdxl": "unet", "pixart": "transformer", "sd3": "transformer"}
# the components whose outputs a latent cache holds (latents, prompt embeddings)
CONDITIONING = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
WEIGHTS = ".safetensors"


@dataclass
class Base:
    """A checked local base folder."""

    local: str
    where: str  # how messages name it (credentials redacted)
    class_name: str
    family: str
    components: dict[str, str] = field(default_factory=dict)  # name -> library

    @property
    def denoiser(self) -> str:
        return DENOISER[self.family]

    def files(self, name: str) -> list[str]:
        """Exactly the files a library loads for component ``name``: its configs and tokenizer
        files, and its safetensors weights (one file, or an index and the shards it names)."""
        library = self.components[name]
        sub = folders.subfolder(self.local, name, self.where)
        base = f"{name}/diffusion_pytorch_model" if library == "diffusers" else f"{name}/model"
        weights = folders.weights(self.local, base, self.where)
        for rel in weights:
            if rel.endswith(WEIGHTS):
                folders.check_safetensors(self.local, rel, self.where)
        out = list(weights)
        for dirpath, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if n.startswith(".") or n.lower().endswith((WEIGHTS, ".index.json", ".py", *PICKLE_SUFFIXES)):
                    continue
                rel = posixpath.join(name, os.path.relpath(os.path.join(dirpath, n), sub).replace(os.sep, "/"))
                folders.file(self.local, rel, self.where)
                out.append(rel)
        folders.refuse_remote_code(self.local, out, self.where)
        return out

    def identity(self) -> dict[str, str]:
        """Each component's digest over exactly its loaded files."""
        return {name: folders.digest(self.local, self.files(name), self.where) for name in sorted(self.components)}

    def cache_identity(self) -> dict[str, str]:
        """The identity of what made a latent cache: autoencoder, text encoders, tokenizers."""
        return {k: v for k, v in self.identity().items() if k in CONDITIONING}

    def config(self, name: str, file: str = "config.json") -> dict[str, Any]:
        rel = f"{name}/{file}"
        with open(folders.file(self.local, rel, self.where), "rb") as f:
            data = json.loads(f.read())
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.where}: {rel} is not a JSON object")
        return data

    def scheduler_config(self) -> dict[str, Any]:
        if "scheduler" not in self.components:
            raise CheckpointError(f"{self.where}: no scheduler component: its training objective is unknown")
        return self.config("scheduler", "scheduler_config.json")

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (``2 ** (levels - 1)``, as the pipelines compute it)."""
        return 2 ** (len(self.config("vae")["block_out_channels"]) - 1)

    def load_denoiser(self):
        """The denoiser (UNet or transformer), loaded from a view of exactly its files."""
        import diffusers

        name = self.denoiser
        cls = getattr(diffusers, self.config(name)["_class_name"])
        with folders.view(self.local, self.files(name), self.where) as view:
            return cls.from_pretrained(view, subfolder=name, use_safetensors=True, local_files_only=True)

    def pipeline_files(self, skip: tuple[str, ...] = ()) -> list[str]:
        """``model_index.json`` and every component's files (those of ``skip`` left out)."""
        out = [INDEX_NAME]
        for name in sorted(self.components):
            if name not in skip:
                out += self.files(name)
        return out


def is_base(url: str, storage_options: dict | None = None) -> bool:
    return storage.exists(storage.join(url, INDEX_NAME), storage_options)


def open_base(url: str, storage_options: dict | None = None, option: str = "base") -> Base:
    """The checked base folder at ``url`` (copied locally once); refusals name ``option``."""
    where = f"option '{option}': {storage.redact(url)}"
    if not is_base(url, storage_options):
        raise ConfigError(f"{where}: no {INDEX_NAME}: not a diffusers pipeline folder")
    local = storage.download_dir(url, storage_options)
    with open(folders.file(local, INDEX_NAME, where), "rb") as f:
        try:
            index = json.loads(f.read())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{where}: {INDEX_NAME} is not valid JSON") from None
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in FAMILIES:
        raise ConfigError(f"{where}: a diffusers {cls!r} pipeline; supported bases: {', '.join(FAMILIES)}")
    components: dict[str, str] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        if len(value) != 2 or value[0] not in LIBRARIES:
            raise ConfigError(
                f"{where}: component {name!r} is {value!r}; only diffusers and transformers components load"
            )
        components[name] = str(value[0])
    base = Base(local, where, str(cls), FAMILIES[str(cls)], components)
    for required in (base.denoiser, "vae", "scheduler"):
        if required not in components:
            raise CheckpointError(f"{where}: {cls} without its {required} component")
    code = [f for f in storage.walk_files(local) if f.lower().endswith(".py")]
    if code:
        raise ConfigError(f"{where}: the folder holds Python code ({code[0]}); no code from a folder runs")
    if not any(f.endswith(WEIGHTS) for f in base.files(base.denoiser)):
        raise CheckpointError(f"{where}: {base.denoiser}/ has no {WEIGHTS} weights (pickles are not loaded)")
    return base


def check_cache(base: Base, man: dict, where: str) -> None:
    """Refuse a latent cache (its manifest ``man``) that was not made with this base's
    autoencoder and text encoders: its latents or embeddings mean something else to the model."""
    recorded = man.get("base")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
        raise ConfigError(f"{where}: the latent cache records no base model (encode it with `encode --base`)")
    if recorded.get("family") != base.family:
        raise ConfigError(f"{where}: a cache of a {recorded.get('family')!r} base, not of this {base.family!r} base")
    have, want = recorded["identity"], base.cache_identity()
    differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if differ:
        named = base.where.split(": ", 1)[-1]
        raise ConfigError(
            f"{where}: the latent cache was made with another {', '.join(differ)} than {named}'s "
            "(re-encode with `encode --base` of this base)"
        )
