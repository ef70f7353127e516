"""Caption embeddings from Hugging Face ``transformers`` text encoders (CLIP, T5, ...).

A text encoder is a folder (local or on object storage) as ``save_pretrained`` writes it: the
model's ``config.json`` and safetensors weights, and its tokenizer's files. Only safetensors
weights are loaded (``.bin`` files are pickles) and no remote code runs.

:meth:`TextEncoder.encode` returns, per caption, the hidden states of the real tokens only (the
padding stripped: a short caption costs a few rows, not ``max_tokens``), the pooled embedding
where the model has one (CLIP), and whether the caption was truncated at ``max_tokens``. The
hidden states of the unpadded tokens are the encoder's own output on the unpadded caption: the
padding mask keeps padding out of attention.

:attr:`TextEncoder.identity` (model type, hashes of the weights, tokenizer and config files
loaded, max tokens, width, hidden layer) is what a cached embedding depends on; encode and train
compare it to refuse mixing. Exactly the files loaded are hashed, and each must lie inside the
folder (:mod:`pipeline.io.folders`): a weights index naming shards elsewhere is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from pipeline.io import folders, storage
from pipeline.io.checkpoint import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "vocab.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_ENCODER_CLASSES = {  # model_type -> the transformers class holding only the text encoder
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


@dataclass
class Embedding:
    hidden: np.ndarray  # (tokens, width) float16, padding stripped
    pooled: np.ndarray | None  # (pooled width,) float16, or None
    truncated: bool


def short_name(model_type: str) -> str:
    """``clip_text_model`` -> ``clip``; the name that prefixes a text encoder's stored fields."""
    base = {"clip_text_model": "clip", "umt5": "t5", "mt5": "t5"}.get(model_type, model_type)
    return re.sub(r"[^a-z0-9]", "", base.lower()) or "text"


class TextEncoder:
    """One text encoder and its tokenizer, loaded once per worker."""

    def __init__(self, url: str, storage_options: dict | None = None, *, max_tokens: int = 0, hidden_layer: int = -1):
        import transformers

        where = storage.redact(url)
        local = storage.download_dir(url, storage_options)
        if not folders.has(local, "config.json"):
            raise CheckpointError(f"{where} is not a transformers text encoder folder: no config.json")
        # exactly the files loaded, each inside the folder: config, weights (an index and its
        # shards), tokenizer files; checked, hashed and handed to transformers as a private view
        toks = [n for n in TOKENIZER_FILES if folders.has(local, n)]
        folders.refuse_remote_code(local, ["config.json", *toks], where)  # before transformers is asked
        weights = folders.weights(local, "model", where)
        if not weights:
            raise CheckpointError(
                f"{where}: only safetensors weights are loaded (no model.safetensors or "
                "model.safetensors.index.json; .bin files are pickles)"
            )
        if not toks:
            raise CheckpointError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
        for n in weights:
            if n.endswith(folders.SAFETENSORS):
                folders.check_safetensors(local, n, where)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            with folders.view(local, ["config.json", *weights, *toks], where) as seen:
                config = transformers.AutoConfig.from_pretrained(seen, local_files_only=True, trust_remote_code=False)
                known = (*_ENCODER_CLASSES.values(), "CLIPTextModelWithProjection")
                cls_name = next(
                    (a for a in (config.architectures or []) if a in known),
                    _ENCODER_CLASSES.get(config.model_type, "AutoModel"),
                )
                cls = getattr(transformers, cls_name)
                model, loading = cls.from_pretrained(
                    seen,
                    local_files_only=True,
                    use_safetensors=True,
                    output_loading_info=True,
                    trust_remote_code=False,
                )
                if getattr(model.config, "is_encoder_decoder", False):
                    model = model.get_encoder()
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    seen, local_files_only=True, trust_remote_code=False
                )
        except (OSError, ValueError, KeyError, AttributeError, TypeError, ImportError, SafetensorError) as exc:
            raise CheckpointError(f"{where}: cannot load the text encoder ({str(exc).splitlines()[0][:160]})") from None
        refuse_missing_weights(loading, f"{where}: the weights", cls_name)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.model: Any = model.eval()
        self.tokenizer: Any = tokenizer
        self.model_type: str = config.model_type
        limits = [
            v
            for v in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
            if isinstance(v, int) and 0 < v < 1_000_000
        ]
        limit = min(limits) if limits else 512
        if max_tokens > limit:
            raise CheckpointError(f"{where}: max tokens {max_tokens} exceeds the encoder's limit {limit}")
        self.max_tokens = max_tokens or limit
        layers = int(getattr(config, "num_hidden_layers", getattr(config, "num_layers", 0)) or 0)
        if not -layers <= hidden_layer < 0:
            raise CheckpointError(f"{where}: hidden layer {hidden_layer} is not in -{layers}..-1")
        self.hidden_layer = hidden_layer
        self.width = int(getattr(config, "hidden_size", getattr(config, "d_model", 0)))
        self.source = storage.public_url(url)  # stored: true, without user-info
        self._weights_sha256 = folders.digest(local, weights, where)
        self._tokenizer_sha256 = folders.digest(local, toks, where)
        self._config_sha256 = folders.digest(local, ["config.json"], where)
        self.pooled_width = self._pooled_width()

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "weights_sha256": self._weights_sha256,
            "tokenizer_sha256": self._tokenizer_sha256,
            "config_sha256": self._config_sha256,
            "max_tokens": self.max_tokens,
            "width": self.width,
            "hidden_layer": self.hidden_layer,
            "pooled_width": self.pooled_width,
        }

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def _pooled_width(self) -> int:
        """The pooled embedding's width (0: none). A tokenizer that gives the empty caption no
        tokens (no start or end token) is fine for an encoder without a pooled embedding: such a
        caption is an empty (0, width) embedding, which the denoisers read as no text (their null
        token alone). A pooled embedding of no tokens is undefined, so that encoder is refused."""
        empty_has_tokens = bool(self._token_counts([""])[0])
        probe = "" if empty_has_tokens else "a"
        if not self._token_counts([probe])[0]:
            raise CheckpointError(f"{self.source}: its tokenizer gives the caption {probe!r} no tokens")
        pooled = self._forward([probe])[1]
        width = 0 if pooled is None else int(pooled.shape[-1])
        if width and not empty_has_tokens:
            raise CheckpointError(
                f"{self.source}: its tokenizer gives the empty caption no tokens (it adds no start or end "
                f"token), and a pooled {self.model_type} embedding of no tokens is undefined; use the "
                "model's own tokenizer"
            )
        return width

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(captions, truncation=False)["input_ids"]]

    @torch.no_grad()
    def _forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        dev = next(self.model.parameters()).device
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(dev)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=self.hidden_layer != -1,
        )
        hidden = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        return hidden, pooled, batch["attention_mask"]

    def encode(self, captions: list[str]) -> list[Embedding]:
        """Embeddings of ``captions`` (an empty string gives the empty-caption embedding). A caption
        the tokenizer gives no tokens is a (0, width) embedding, without running the model (only
        encoders without a pooled embedding have such captions: see :meth:`_pooled_width`)."""
        lengths = self._token_counts(captions)
        live = [i for i, n in enumerate(lengths) if n]
        out = [Embedding(np.zeros((0, self.width), np.float16), None, False) for _ in captions]
        if len(live) < len(captions) and self.pooled_width:
            raise CheckpointError(f"{self.source}: its tokenizer gives a caption no tokens; no pooled embedding")
        if not live:
            return out
        hidden, pooled, mask = self._forward([captions[i] for i in live])
        counts = mask.sum(dim=1).tolist()
        h = hidden.float().cpu().numpy()
        p = pooled.float().cpu().numpy() if pooled is not None else None
        for j, i in enumerate(live):
            out[i] = Embedding(
                h[j, : counts[j]].astype(np.float16),
                p[j].astype(np.float16) if p is not None else None,
                lengths[i] > self.max_tokens,
            )
        return out


def build_stand_in(
    out_dir: str,
    corpus: list[str],
    *,
    kind: str = "clip",
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_tokens: int = 16,
    seed: int = 0,
) -> str:
    """Save a tiny random-weight text encoder and a word-level tokenizer trained on ``corpus``.

    A stand-in for tests and the offline demo (nothing is downloaded): the embeddings carry the
    words' identity, not their meaning. ``kind`` is ``clip`` (CLIPTextModel: causal, pooled
    embedding at the end token) or ``t5`` (T5EncoderModel: bidirectional, no pooled embedding).
    """
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    transformers.logging.disable_progress_bar()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    ids = {s: tok.token_to_id(s) for s in specials}
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_tokens,
    )
    torch.manual_seed(seed)
    config: Any
    if kind == "clip":
        config = transformers.CLIPTextConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_tokens,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
        )
        model: Any = transformers.CLIPTextModel(config)
    elif kind == "t5":
        config = transformers.T5Config(
            vocab_size=tok.get_vocab_size(),
            d_model=width,
            d_kv=width // heads,
            d_ff=4 * width,
            num_layers=layers,
            num_heads=heads,
            pad_token_id=ids["<pad>"],
            eos_token_id=ids["</s>"],
        )
        model = transformers.T5EncoderModel(config)
    else:
        raise ValueError(f"unknown stand-in kind {kind!r}")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- conditioning tensors
# Several encoders condition one model as in SD3: each encoder's tokens are zero-padded to the
# widest encoder's width and the sequences are concatenated; pooled embeddings are concatenated.


@dataclass
class TextSpec:
    """How a model reads a dataset's caption embeddings: the encoders (name, width, pooled width,
    identity, source) in order; ``text_dim`` and ``pooled_dim`` follow from them."""

    encoders: list[dict]

    @property
    def text_dim(self) -> int:
        return max((e["width"] for e in self.encoders), default=0)

    @property
    def pooled_dim(self) -> int:
        return sum(e["pooled_width"] for e in self.encoders)

    @classmethod
    def from_manifest(cls, man: dict) -> TextSpec:
        return cls(
            [
                {
                    "name": te["name"],
                    "width": te["identity"]["width"],
                    "pooled_width": te["identity"]["pooled_width"],
                    "identity": te["identity"],
                    "source": te.get("source", ""),
                }
                for te in man.get("text_encoders") or []
            ]
        )

    def join(self, hidden: list[np.ndarray], pooled: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """One sample's tokens (L, text_dim) float32 and pooled (pooled_dim,) from its encoders'."""
        d = self.text_dim
        tokens = np.concatenate(
            [np.pad(h.astype(np.float32), ((0, 0), (0, d - h.shape[1]))) for h in hidden]
        ) if hidden else np.zeros((0, d), np.float32)  # fmt: skip
        kept: list[np.ndarray] = [p.astype(np.float32) for p in pooled if p is not None]
        return tokens, (np.concatenate(kept) if kept else None)


def pad_tokens(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences (L_i, D) -> (B, max L, D) zero-padded, and the mask (B, max L), True = real."""
    length = max((s.shape[0] for s in seqs), default=0)
    width = seqs[0].shape[1] if seqs else 0
    out = np.zeros((len(seqs), length, width), np.float32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


NULL_TEXT = "null_text"  # <checkpoint>/null_text.safetensors: the denoiser's inputs for the empty caption


def repeat(kw: dict[str, torch.Tensor | None], n: int) -> dict[str, torch.Tensor | None]:
    """Text inputs of batch 1 (such as the empty caption's) as a batch of ``n`` (no copy)."""
    return {k: v.expand(n, *v.shape[1:]) if v is not None else None for k, v in kw.items()}


def load_recorded(spec: TextSpec, paths: list[str], storage_options: dict | None = None) -> list[TextEncoder]:
    """The text encoders a model was trained with, from their recorded sources or from ``paths``
    (in the same order); refuses one whose identity differs from the recorded one."""
    paths = paths or [e["source"] for e in spec.encoders]
    if len(paths) != len(spec.encoders):
        names = ", ".join(e["name"] for e in spec.encoders)
        raise CheckpointError(
            f"the model was trained with {len(spec.encoders)} text encoder(s) ({names}), given {len(paths)}"
        )
    out = []
    for e, url in zip(spec.encoders, paths):
        ident = e["identity"]
        if url == e["source"] and not storage.exists(url, storage_options):
            raise CheckpointError(
                f"the text encoder recorded in the checkpoint ({e['name']}: {url}) is not there; "
                "pass its folder with --text-encoder"
            )
        te = TextEncoder(url, storage_options, max_tokens=ident["max_tokens"], hidden_layer=ident["hidden_layer"])
        if te.identity != ident:
            differs = sorted(k for k in {*ident, *te.identity} if te.identity.get(k) != ident.get(k))
            raise CheckpointError(
                f"text encoder {storage.redact(url)} is not the one the model was trained with "
                f"({e['name']}: {', '.join(differs)} differ)"
            )
        out.append(te)
    return out


def condition(
    encoders: list[TextEncoder], spec: TextSpec, prompts: list[str], truncated: list[str] | None = None
) -> dict[str, torch.Tensor | None]:
    """Denoiser keyword inputs (``text``, ``text_mask``, ``pooled``) for ``prompts``, built as
    training saw them (float16 embeddings joined by :meth:`TextSpec.join`). The names of the
    encoders that had to truncate a prompt are appended to ``truncated``."""
    per_encoder = [te.encode(prompts) for te in encoders]
    if truncated is not None:
        truncated += [e["name"] for e, embs in zip(spec.encoders, per_encoder) if any(x.truncated for x in embs)]
    joined = [
        spec.join([e[i].hidden for e in per_encoder], [e[i].pooled for e in per_encoder]) for i in range(len(prompts))
    ]
    tokens, mask = pad_tokens([t for t, _ in joined])
    pooled = torch.from_numpy(np.stack([p for _, p in joined if p is not None])) if spec.pooled_dim else None
    return {"text": torch.from_numpy(tokens), "text_mask": torch.from_numpy(mask), "pooled": pooled}


def refuse_missing_weights(loading_info: dict, what: str, cls_name: str) -> None:
    """transformers fills weights it cannot find with random values and only warns: refuse
    instead (``loading_info`` from ``from_pretrained(..., output_loading_info=True)``)."""
    missing = list(loading_info.get("missing_keys") or []) + list(loading_info.get("mismatched_keys") or [])
    if missing:
        raise CheckpointError(
            f"{what} do not match {cls_name} ({len(missing)} missing or mismatched, e.g. {missing[0]}); "
            "is config.json the model's own?"
        )
