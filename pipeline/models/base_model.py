"""A pretrained diffusers pipeline folder as the base model of a fine-tune (``encode --base``).

A base is a folder as ``DiffusionPipeline.save_pretrained`` writes it: ``model_index.json`` naming
the pipeline class and its components, one sub-folder per component. :data:`FAMILIES` is the
registry, one entry per pipeline class: the denoiser component, the text encoders in the order
the pipeline reads them and how their outputs are joined. Adding a family is one entry.

:func:`inspect` reads a folder on the driver without loading any network: the pipeline class must
be one of :data:`FAMILIES`, every component a known diffusers or transformers class, every
component the family needs present, inside the folder (no link leaving it), with safetensors
weights (``.bin`` files are pickles) and no code (``custom_pipeline``, ``auto_map``, ``.py``
files). Its identity is the pipeline class, the family and per component its class, the sha256 of
its config (a tokenizer: of its files) and of its weights, each over exactly the files loaded
(:mod:`pipeline.io.folders`).

:class:`BaseText` (on a worker: a T5-XXL is tens of GB) loads the text encoders and tokenizers and
returns a caption's conditioning exactly as the pipeline's own ``encode_prompt`` does for one
prompt (no classifier-free guidance duplication):

* ``sd`` (``StableDiffusionPipeline``): CLIP's last hidden state over the tokens padded to the
  tokenizer's ``model_max_length``, no attention mask (unless the encoder's config asks for one);
* ``sdxl``: the penultimate hidden states of both CLIP encoders concatenated on width; pooled =
  ``text_encoder_2``'s projected ``text_embeds``; the empty caption is zeros when the pipeline's
  ``force_zeros_for_empty_prompt`` is set (what it feeds for guidance);
* ``pixart`` (alpha: 120 tokens, sigma: 300): T5's last hidden state with the attention mask,
  the caption lower-cased and stripped as ``encode_prompt`` does; stored stripped to the real
  tokens with their mask (the padding rows are masked out of attention; a trainer rebuilds the
  padded mask with zeros);
* ``sd3``: CLIP-L and CLIP-G penultimate states (padded 77) concatenated on width, zero-padded to
  T5's width, concatenated on sequence with T5's last hidden state (256 tokens, padded, no
  mask); pooled = both CLIPs' ``text_embeds`` concatenated.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.io import folders, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.models import text
from pipeline.models.text import TOKENIZER_FILES

INDEX_NAME = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
# stored per sample (``key.<field>``) and once for the empty caption (``_empty_caption/<field>``)
PROMPT_EMBEDS = "prompt_embeds.npy"
POOLED = "pooled_prompt_embeds.npy"
MASK = "prompt_attention_mask.npy"

# transformers' own tokenizer classes (TokenizersBackend: transformers 5's name for a tokenizer
# read from a tokenizers tokenizer.json, what AutoTokenizer gives such a folder)
GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", *GENERIC_TOKENIZERS)
T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast", *GENERIC_TOKENIZERS)
VAE_CLASSES = ("AutoencoderKL",)
# components a pipeline may name that encoding never loads (absent or one of these classes)
IGNORED = {
    "safety_checker": ("StableDiffusionSafetyChecker",),
    "feature_extractor": ("CLIPImageProcessor", "CLIPFeatureExtractor"),
    "image_encoder": ("CLIPVisionModelWithProjection",),
}


@dataclass(frozen=True)
class TextPart:
    """One text encoder as a pipeline reads it."""

    encoder: str  # its component, e.g. "text_encoder_2"
    tokenizer: str
    classes: tuple[str, ...]  # the transformers classes it may be
    tokenizer_classes: tuple[str, ...]
    layer: int  # -1: the last hidden state, -2: the penultimate
    max_length: int = 0  # 0: the tokenizer's model_max_length
    mask: bool | None = False  # attention mask given to the encoder; None: as its config's use_attention_mask
    pooled: bool = False  # its text_embeds is (part of) the pooled embedding


@dataclass(frozen=True)
class Family:
    """What a pipeline class needs and how its ``encode_prompt`` builds the conditioning."""

    name: str
    denoiser: str  # its component: "unet" or "transformer"
    denoiser_classes: tuple[str, ...]
    text: tuple[TextPart, ...]
    join: str = "width"  # "width": concatenated on width; "sd3": CLIPs on width, padded, then T5 on sequence
    stored_mask: bool = False  # the mask is part of the conditioning (stored per sample)
    lower_case: bool = False  # the caption is lower-cased and stripped first (PixArt)
    zeros_for_empty: bool = False  # honours force_zeros_for_empty_prompt (SDXL)

    @property
    def pooled(self) -> bool:
        return any(p.pooled for p in self.text)

    @property
    def components(self) -> dict[str, tuple[str, ...]]:
        """The components encoding and training need, with their allowed classes."""
        out: dict[str, tuple[str, ...]] = {"vae": VAE_CLASSES, self.denoiser: self.denoiser_classes}
        for p in self.text:
            out[p.encoder], out[p.tokenizer] = p.classes, p.tokenizer_classes
        return out


def _clip(encoder: str, tokenizer: str, *, projection: bool, layer: int, **kw: Any) -> TextPart:
    cls = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    return TextPart(encoder, tokenizer, (cls,), CLIP_TOKENIZERS, layer, **kw)


def _t5(encoder: str, tokenizer: str, *, max_length: int, mask: bool) -> TextPart:
    return TextPart(encoder, tokenizer, ("T5EncoderModel",), T5_TOKENIZERS, -1, max_length, mask)


_SD = Family(
    "sd",
    "unet",
    ("UNet2DConditionModel",),
    (_clip("text_encoder", "tokenizer", projection=False, layer=-1, mask=None),),
)
_SDXL = Family(
    "sdxl",
    "unet",
    ("UNet2DConditionModel",),
    (
        _clip("text_encoder", "tokenizer", projection=False, layer=-2),
        _clip("text_encoder_2", "tokenizer_2", projection=True, layer=-2, pooled=True),
    ),
    zeros_for_empty=True,
)


def _pixart(max_length: int) -> Family:
    part = _t5("text_encoder", "tokenizer", max_length=max_length, mask=True)
    return Family("pixart", "transformer", ("PixArtTransformer2DModel",), (part,), stored_mask=True, lower_case=True)


_SD3 = Family(
    "sd3",
    "transformer",
    ("SD3Transformer2DModel",),
    (
        _clip("text_encoder", "tokenizer", projection=True, layer=-2, max_length=77, pooled=True),
        _clip("text_encoder_2", "tokenizer_2", projection=True, layer=-2, max_length=77, pooled=True),
        _t5("text_encoder_3", "tokenizer_3", max_length=256, mask=False),
    ),
    join="sd3",
)
FAMILIES: dict[str, Family] = {  # pipeline class -> family
    "StableDiffusionPipeline": _SD,
    "StableDiffusionXLPipeline": _SDXL,
    "PixArtAlphaPipeline": _pixart(120),
    "PixArtSigmaPipeline": _pixart(300),
    "StableDiffusion3Pipeline": _SD3,
}


# --------------------------------------------------------------------------- the folder


@dataclass
class BaseFolder:
    """A checked base pipeline folder: where it is, its family, and the files each component loads."""

    url: str
    local: str
    class_name: str
    family: Family
    config: dict  # model_index.json's own settings (force_zeros_for_empty_prompt, ...)
    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # component -> {"config", "weights"}
    classes: dict[str, str] = field(default_factory=dict)  # component -> class name

    @property
    def where(self) -> str:
        return storage.redact(self.url)

    @property
    def zeros_for_empty(self) -> bool:
        return self.family.zeros_for_empty and bool(self.config.get("force_zeros_for_empty_prompt", True))

    @property
    def identity(self) -> dict[str, Any]:
        comps = {}
        for name, f in sorted(self.files.items()):
            comps[name] = {
                "class": self.classes[name],
                "config_sha256": folders.digest(self.local, f["config"], self.where),
                "weights_sha256": folders.digest(self.local, f["weights"], self.where) if f["weights"] else None,
            }
        return {
            "pipeline": self.class_name,
            "family": self.family.name,
            "config": {k: v for k, v in sorted(self.config.items()) if isinstance(v, (bool, int, float, str))},
            "components": comps,
        }

    def fields(self) -> dict[str, str | None]:
        """The per-sample fields this family stores."""
        return {
            "prompt_embeds": PROMPT_EMBEDS,
            "pooled_prompt_embeds": POOLED if self.family.pooled else None,
            "prompt_attention_mask": MASK if self.family.stored_mask else None,
        }


def _read_index(local: str, where: str) -> dict:
    import json

    if not folders.has(local, INDEX_NAME):
        raise CheckpointError(f"{where}: no {INDEX_NAME}: not a diffusers pipeline folder")
    try:
        with open(folders.file(local, INDEX_NAME, where), "rb") as f:
            index = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: {INDEX_NAME} is not valid JSON") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: {INDEX_NAME} is not a JSON object")
    return index


def _listing(local: str, name: str) -> list[str]:
    """The files under component ``name`` (``name/...``), links included, hidden ones left out."""
    out = []
    top = os.path.join(local, name)
    for dirpath, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith("."):
                out.append(posixpath.join(name, os.path.relpath(os.path.join(dirpath, n), top).replace(os.sep, "/")))
    return out


def inspect(url: str, storage_options: dict | None = None) -> BaseFolder:
    """Check the base pipeline folder at ``url`` (copied once when remote) without loading a
    network; refusals are one line naming the component (CheckpointError / ConfigError)."""
    where = storage.redact(url)
    local = storage.download_dir(url, storage_options)
    if not os.path.isdir(local):
        raise CheckpointError(f"{where}: no such folder")
    index = _read_index(local, where)
    folders.refuse_remote_code(local, [INDEX_NAME], where)  # custom_pipeline, auto_map, ...
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ConfigError(f"{where}: a diffusers {class_name!r} pipeline; a base model is one of {', '.join(FAMILIES)}")
    family = FAMILIES[class_name]
    wanted = family.components
    comps: dict[str, tuple[str, str]] = {}
    config: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            config[name] = value  # a pipeline setting such as force_zeros_for_empty_prompt
            continue
        if len(value) != 2:
            raise CheckpointError(f"{where}: {INDEX_NAME}: component {name!r} is not [library, class]")
        library, cls = value
        if library is None and cls is None:
            continue  # an optional component that is absent
        if name == "scheduler":
            known: tuple[str, ...] = ("a diffusers scheduler",)
            ok = library == "diffusers" and isinstance(cls, str) and cls.endswith("Scheduler")
        else:
            known = wanted.get(name) or IGNORED.get(name) or ()
            ok = library in ("diffusers", "transformers", "stable_diffusion") and cls in known
        if not ok:
            raise ConfigError(
                f"{where}: component {name!r} is {library}.{cls}; a {class_name} base loads "
                f"{' / '.join(known) if known else 'no such component'} there (no code from the folder is run)"
            )
        comps[name] = (str(library), str(cls))
    code = [f for f in storage.walk_files(local) if f.lower().endswith(".py")]
    if code:
        raise ConfigError(
            f"{where}: the folder holds Python code ({code[0]}); pipelines with custom code are not loaded"
        )
    out = BaseFolder(url, local, class_name, family, config)
    for name in [*wanted, "scheduler"]:
        if name not in comps or not folders.has(local, name):
            raise CheckpointError(f"{where}: {class_name} without its {name} component ({name}/ is missing)")
        folders.subfolder(local, name, where)  # not a link leaving the folder
        out.files[name] = _component_files(local, name, comps[name], where)
        out.classes[name] = comps[name][1]
    for f in out.files.values():
        folders.refuse_remote_code(local, f["config"], where)
    return out


def _component_files(local: str, name: str, lib_cls: tuple[str, str], where: str) -> dict[str, list[str]]:
    """The config and weights files component ``name`` loads, each checked to lie inside the folder."""
    library, cls = lib_cls
    listed = _listing(local, name)
    if name == "scheduler":
        cfgs = [f"{name}/scheduler_config.json"]
        weights: list[str] = []
    elif "Tokenizer" in cls:
        cfgs = [f"{name}/{t}" for t in TOKENIZER_FILES if folders.has(local, f"{name}/{t}")]
        weights = []
        if not cfgs:
            raise CheckpointError(f"{where}: {name}/ has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    else:
        cfgs = [f"{name}/config.json"]
        base = f"{name}/diffusion_pytorch_model" if library == "diffusers" else f"{name}/model"
        weights = folders.weights(local, base, where)
        if not weights:
            pickles = [f for f in listed if f.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"{where}: {name}/ has only pickle weights ({posixpath.basename(pickles[0])}); only "
                    "safetensors are loaded: re-save the pipeline with safe_serialization=True"
                )
            raise CheckpointError(f"{where}: {name}/ has no {posixpath.basename(base)}.safetensors weights")
        for rel in weights:
            if rel.endswith(folders.SAFETENSORS):
                folders.check_safetensors(local, rel, where)
    for rel in cfgs:
        folders.file(local, rel, where)  # present, inside the folder
    return {"config": cfgs, "weights": weights}


def vae_url(base: BaseFolder) -> str:
    """The base's autoencoder folder (a checked part of the local copy), for :func:`autoencoder.load`."""
    return folders.subfolder(base.local, "vae", base.where)


def sdxl_time_ids(meta: dict) -> tuple[int, int, int, int, int, int]:
    """SDXL's ``add_time_ids`` of a cached sample, from its ``.json``: (original height, original
    width, crop top, crop left, target height, target width). The crop's top-left corner is in
    the pixels of the image resized to cover the target (as SDXL's training script records it);
    the target is the sample's bucket, or its square resolution."""
    ow, oh = meta["original_size"]
    left, top, right, bottom = meta["crop_box"]
    tw, th = meta.get("bucket") or (meta["resolution"], meta["resolution"])
    scale = max(tw / max(right - left, 1), th / max(bottom - top, 1))
    return int(oh), int(ow), round(top * scale), round(left * scale), int(th), int(tw)


# --------------------------------------------------------------------------- the text encoders


@dataclass
class Conditioning:
    """One caption's conditioning as the pipeline's ``encode_prompt`` returns it."""

    prompt_embeds: np.ndarray  # (L, D) float16
    pooled: np.ndarray | None  # (P,) float16
    mask: np.ndarray | None  # (L,) uint8 (PixArt)
    truncated: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        out = {PROMPT_EMBEDS: self.prompt_embeds}
        if self.pooled is not None:
            out[POOLED] = self.pooled
        if self.mask is not None:
            out[MASK] = self.mask
        return out


class BaseText:
    """The base's text encoders and tokenizers (loaded once per worker process)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import transformers
        from safetensors import SafetensorError

        self.base = inspect(url, storage_options)
        b, where = self.base, self.base.where
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.encoders: list[Any] = []
        self.tokenizers: list[Any] = []
        for part in b.family.text:
            enc_files, tok_files = b.files[part.encoder], b.files[part.tokenizer]
            try:
                with folders.view(b.local, [*enc_files["config"], *enc_files["weights"]], where) as seen:
                    cls = getattr(transformers, b.classes[part.encoder])
                    model, loading = cls.from_pretrained(
                        os.path.join(seen, part.encoder),
                        local_files_only=True,
                        use_safetensors=True,
                        output_loading_info=True,
                        trust_remote_code=False,
                    )
                with folders.view(b.local, tok_files["config"], where) as seen:
                    tok = getattr(transformers, b.classes[part.tokenizer]).from_pretrained(
                        os.path.join(seen, part.tokenizer), local_files_only=True, trust_remote_code=False
                    )
            except (OSError, ValueError, KeyError, AttributeError, TypeError, ImportError, SafetensorError) as exc:
                detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{where}: cannot load {part.encoder} ({detail})") from None
            text.refuse_missing_weights(loading, f"{where}: {part.encoder}'s weights", b.classes[part.encoder])
            self.encoders.append(model.eval())
            self.tokenizers.append(tok)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> BaseText:
        for m in self.encoders:
            m.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def _part(self, i: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[bool]]:
        """One encoder's hidden states (B, L, D), pooled (B, P) or None, attention mask (B, L),
        and per caption whether it was truncated."""
        part, model, tok = self.base.family.text[i], self.encoders[i], self.tokenizers[i]
        length = part.max_length or tok.model_max_length
        ids = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        full = tok(captions, truncation=False)["input_ids"]
        truncated = [len(f) > length for f in full]
        use_mask = part.mask if part.mask is not None else bool(getattr(model.config, "use_attention_mask", False))
        dev = next(model.parameters()).device
        out = model(
            ids.input_ids.to(dev),
            attention_mask=ids.attention_mask.to(dev) if use_mask else None,
            output_hidden_states=part.layer != -1,
        )
        hidden = out[0] if part.layer == -1 else out.hidden_states[part.layer]
        pooled = out[0] if part.pooled else None  # CLIPTextModelWithProjection: text_embeds
        return hidden, pooled, ids.attention_mask, truncated

    def encode(self, captions: list[str]) -> list[Conditioning]:
        """Each caption's conditioning, as ``encode_prompt(caption)`` of the pipeline gives it."""
        fam = self.base.family
        if fam.lower_case:
            captions = [c.lower().strip() for c in captions]
        parts = [self._part(i, captions) for i in range(len(fam.text))]
        truncated = [any(p[3][j] for p in parts) for j in range(len(captions))]
        if fam.join == "sd3":
            clip = torch.cat([parts[0][0], parts[1][0]], dim=-1)
            t5 = parts[2][0]
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            hidden = torch.cat([clip, t5], dim=-2)
        else:
            hidden = torch.cat([p[0] for p in parts], dim=-1)
        pooled_parts = [p[1] for p in parts if p[1] is not None]
        pooled = torch.cat(pooled_parts, dim=-1) if pooled_parts else None
        h = hidden.float().cpu().numpy().astype(np.float16)
        pl = pooled.float().cpu().numpy().astype(np.float16) if pooled is not None else None
        mask = parts[0][2].cpu().numpy().astype(np.uint8) if fam.stored_mask else None
        out = []
        for j in range(len(captions)):
            if mask is not None:  # stripped to the real tokens; the padding rows are masked out anyway
                n = int(mask[j].sum())
                out.append(Conditioning(h[j, :n], None, mask[j, :n], truncated[j]))
            else:
                out.append(Conditioning(h[j], pl[j] if pl is not None else None, None, truncated[j]))
        return out

    def empty(self) -> Conditioning:
        """The empty caption as the pipeline embeds it for guidance (SDXL with
        ``force_zeros_for_empty_prompt``: zeros shaped like any caption's)."""
        emb = self.encode([""])[0]
        if self.base.zeros_for_empty:
            return Conditioning(
                np.zeros_like(emb.prompt_embeds), None if emb.pooled is None else np.zeros_like(emb.pooled), None
            )
        return emb
