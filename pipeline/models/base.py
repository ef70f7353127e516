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

Training: :data:`TRAINING` is the one table of what differs between the families when their
denoiser trains, one :class:`Training` entry per pipeline class, each read from that pipeline's
``__call__`` in diffusers 0.42.1 (the fine-tuning loop itself has no family branches):

* the keyword arguments the pipeline passes its denoiser besides the noisy latents and the
  timestep, built from a batch's cached conditioning (:class:`Prompts`): SD 1.x/2.x
  ``encoder_hidden_states``; SDXL also ``added_cond_kwargs`` = pooled ``text_embeds`` and
  ``time_ids``; PixArt ``encoder_attention_mask`` (the cached T5 tokens, stripped, padded back
  with zero rows and a zero mask: the pipeline's padding positions get a -10000 attention bias,
  so they add exactly nothing) and ``added_cond_kwargs`` ``resolution``/``aspect_ratio``: None
  (PixArt-Σ always; PixArt-α unless its transformer's ``sample_size`` is 128, the 1024-px models,
  which get the target height and width in pixels and their ratio); SD3 ``pooled_projections``
  and the joined CLIP+T5 embeddings as cached. The timestep goes in as the objective gives it
  (integers under DDPM betas; ``sigma * 1000`` for flow, as SD3's pipeline passes it);
* which output channels train: PixArt predicts a learned variance in its second half of the
  channels (``out_channels`` = 2 x latent channels); its pipeline reads only the first half, and
  the loss is taken on that half (``model_pred.chunk(2, dim=1)[0]``), as PixArt's diffusers
  training scripts do, so the variance channels get no gradient;
* the default ``--lora-targets``: the attention projections (SD3: those of both streams of its
  joint attention, as diffusers' ``train_dreambooth_lora_sd3.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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

    @property
    def training(self) -> Training:
        return TRAINING[self.class_name]

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


# --------------------------------------------------------------------------- training


@dataclass
class Prompts:
    """A batch's cached conditioning, as tensors (B, ...): the prompt embeddings (B, L, D), the
    pooled embedding (B, P) and the attention mask (B, L) where the family caches them, and from
    each sample's ``.json`` SDXL's ``add_time_ids`` (B, 6) and the target (height, width) in
    pixels (B, 2)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor | None
    time_ids: torch.Tensor
    size: torch.Tensor

    def to(self, device: torch.device | str) -> Prompts:
        pooled, mask = (None if v is None else v.to(device) for v in (self.pooled, self.mask))
        return Prompts(self.embeds.to(device), pooled, mask, self.time_ids.to(device), self.size.to(device))


def pad_tokens(embeds: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stripped token embeddings (L_i, D) and their masks (L_i,) as one padded batch: zero rows
    and a zero mask after each caption's tokens, up to the batch's longest (numpy only: it runs
    on the stream's collating thread)."""
    n = max(len(e) for e in embeds)
    out = np.zeros((len(embeds), n, embeds[0].shape[-1]), np.float32)
    mask = np.zeros((len(embeds), n), np.int64)
    for i, (e, m) in enumerate(zip(embeds, masks)):
        out[i, : len(e)] = e
        mask[i, : len(m)] = m
    return out, mask


def _unet_call(p: Prompts, config: Any) -> dict[str, Any]:
    return {"encoder_hidden_states": p.embeds}


def _unet_text_time_call(p: Prompts, config: Any) -> dict[str, Any]:
    return {"encoder_hidden_states": p.embeds, "added_cond_kwargs": {"text_embeds": p.pooled, "time_ids": p.time_ids}}


def _pixart_sigma_call(p: Prompts, config: Any) -> dict[str, Any]:
    return {
        "encoder_hidden_states": p.embeds,
        "encoder_attention_mask": p.mask,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _pixart_alpha_call(p: Prompts, config: Any) -> dict[str, Any]:
    kw = _pixart_sigma_call(p, config)
    if config.sample_size == 128:  # PixArtAlphaPipeline: the 1024-px models take the image size
        size = p.size.to(p.embeds.dtype)
        kw["added_cond_kwargs"] = {"resolution": size, "aspect_ratio": size[:, :1] / size[:, 1:]}
    return kw


def _sd3_call(p: Prompts, config: Any) -> dict[str, Any]:
    return {"encoder_hidden_states": p.embeds, "pooled_projections": p.pooled}


@dataclass(frozen=True)
class Training:
    """How one pipeline class's denoiser trains (see the module docstring)."""

    call: Callable[[Prompts, Any], dict[str, Any]]  # (prompts, denoiser config) -> its keyword arguments
    lora_targets: str  # the default --lora-targets
    learned_variance: bool = False  # the second half of the output channels is a variance

    def prediction(self, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The output channels the objective's loss is taken on (the pipeline's own rule: the
        first half where the denoiser has twice the latent channels)."""
        if self.learned_variance and output.shape[1] == 2 * latents.shape[1]:
            return output.chunk(2, dim=1)[0]
        return output


ATTENTION = "to_q,to_k,to_v,to_out.0"
SD3_ATTENTION = (
    "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out"
)
TRAINING: dict[str, Training] = {  # pipeline class -> how its denoiser trains
    "StableDiffusionPipeline": Training(_unet_call, ATTENTION),
    "StableDiffusionXLPipeline": Training(_unet_text_time_call, ATTENTION),
    "PixArtAlphaPipeline": Training(_pixart_alpha_call, ATTENTION, learned_variance=True),
    "PixArtSigmaPipeline": Training(_pixart_sigma_call, ATTENTION, learned_variance=True),
    "StableDiffusion3Pipeline": Training(_sd3_call, SD3_ATTENTION),
}
