"""A ``finetune`` run's weights on its base, as a diffusers pipeline in memory, and drawing from it.

* :func:`load` is what ``export`` and ``sample --checkpoint`` both read: the checkpoint, the
  base it records (or another copy of it) checked against the recorded identity, and the base's
  denoiser with the trained weights loaded (a full fine-tune) or the trained LoRA adapters added
  (:func:`~pipeline.train.finetune.add_lora`, as the run trained them). :meth:`Finetuned.pipeline`
  puts that denoiser into the base's own pipeline (scheduler, VAE, text encoders).
* :func:`draw` runs a pipeline with its own scheduler: the prompts as text, or as the embeddings
  the pipeline's ``encode_prompt`` gives (:func:`embeds`), with a CPU generator seeded once, so
  the images are those of ``pipe(prompts, generator=torch.Generator().manual_seed(seed))``.
* :class:`ValidationGrids`: ``finetune --validation-prompt`` on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from pipeline.io import checkpoint, storage
from pipeline.io.checkpoint import CheckpointError, CheckpointInfo
from pipeline.models import base as basemod
from pipeline.models.base_model import BaseText, Conditioning
from pipeline.models.generate import save_grid

log = logging.getLogger("pipeline.train")


@dataclass
class Finetuned:
    """A fine-tune checkpoint on its checked base."""

    info: CheckpointInfo
    base: basemod.Base
    denoiser: Any  # the base's denoiser with the trained weights, or with the trained adapters added (eval mode)

    @property
    def lora(self) -> dict:
        """The run's adapter config (peft ``LoraConfig`` fields); {} for a full fine-tune."""
        return self.info.base.get("lora") or {}

    def pipeline(self, **given: Any):
        """The base's pipeline around the trained denoiser (``given``: other components replaced)."""
        return self.base.load_pipeline(**{self.base.denoiser: self.denoiser, **given})


def load(url: str, base_url: str = "", weights: str = "ema", storage_options: dict | None = None) -> Finetuned:
    """The fine-tune checkpoint at ``url`` (or a run output's latest) on its base: the one the
    checkpoint records, or ``base_url`` (another copy of it; option ``base``), refused in one line
    unless its components are the recorded ones. ``weights``: ``ema`` or ``raw`` (the last
    optimizer step's)."""
    from pipeline.train.finetune import add_lora  # the adapters exactly as the run added them

    local, info = checkpoint.load(url, "finetune", storage_options)
    where = storage.redact(url)
    base_url = base_url or info.base.get("url", "")
    if not base_url:
        raise CheckpointError(f"{where} records no base: pass --base")
    base = basemod.open_base(base_url, storage_options)
    if base.identity() != info.base.get("identity"):
        raise CheckpointError(
            f"option 'base': {storage.redact(base_url)} is not the base {where} was trained on "
            "(its components differ from the recorded identity)"
        )
    tensors = checkpoint.load_tensors(local, "ema" if weights == "ema" else "model")
    denoiser = base.load_denoiser()
    lora = info.base.get("lora")
    target = add_lora(denoiser, lora) if lora else denoiser
    try:
        target.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit the base's denoiser ({str(exc).splitlines()[0][:160]})"
        ) from None
    return Finetuned(info, base, denoiser.requires_grad_(False).eval())


def embeds(prompts: list[Conditioning], empty: Conditioning) -> dict[str, torch.Tensor]:
    """The pipeline's ``prompt_embeds`` (pooled, attention mask) keyword arguments for the
    prompts' conditioning as :class:`BaseText` gives it (exactly ``encode_prompt``'s), and the
    empty caption's as the ``negative_`` ones (what the pipeline feeds for guidance). Masked
    embeddings (PixArt, stored stripped) are zero-padded to the longest, their mask with zeros."""
    conds = [*prompts, *[empty] * len(prompts)]
    length = max(c.prompt_embeds.shape[0] for c in conds)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, [(0, length - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

    arrays = {"prompt_embeds": np.stack([pad(c.prompt_embeds) for c in conds]).astype(np.float32)}
    if empty.pooled is not None:
        arrays["pooled_prompt_embeds"] = np.stack([cast(np.ndarray, c.pooled) for c in conds]).astype(np.float32)
    if empty.mask is not None:
        arrays["prompt_attention_mask"] = np.stack([pad(cast(np.ndarray, c.mask)) for c in conds]).astype(np.int64)
    n, out = len(prompts), {}
    for key, a in arrays.items():
        out[key], out[f"negative_{key}"] = torch.from_numpy(a[:n]), torch.from_numpy(a[n:])
    return out


def without_text(base: basemod.Base) -> dict[str, None]:
    """The components to leave out of a pipeline that gets prompt embeddings: its text encoders
    and tokenizers."""
    return {name: None for part in base.folder.family.text for name in (part.encoder, part.tokenizer)}


@torch.no_grad()
def draw(
    pipe: Any,
    *,
    prompts: list[str] | None = None,
    embeddings: dict[str, torch.Tensor] | None = None,
    steps: int,
    guidance: float | None = None,
    seed: int = 0,
    width: int = 0,
    height: int = 0,
    **call: Any,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], drawn in one batch by ``pipe`` with its own scheduler from
    ``prompts`` or their ``embeddings`` (:func:`embeds`); ``guidance``: its ``guidance_scale``
    (None: the pipeline's default); ``width``/``height`` 0: the pipeline's default size; ``call``:
    more keyword arguments of the pipeline's call."""
    kw: dict[str, Any] = {"prompt": prompts, **call} if prompts is not None else dict(call)
    if embeddings is not None:  # (PixArt's negative_prompt defaults to "", which excludes its embeddings)
        kw.update({k: v.to(pipe.device) for k, v in embeddings.items()}, negative_prompt=None)
    if guidance is not None:
        kw["guidance_scale"] = guidance
    if width:
        kw.update(width=width, height=height)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(**kw, num_inference_steps=steps, generator=gen, output_type="pt").images
    return (out.float().cpu() * 2 - 1).clamp(-1, 1)


class ValidationGrids:
    """``finetune --validation-prompt``, on rank 0 only: a grid of the prompts (one image each,
    the same seed every time) after every ``--sample-every`` steps and the last, written to
    ``OUTPUT/samples/step_<step>.png``, drawn with the EMA weights (what ``export`` writes by
    default) by the base's pipeline and scheduler at its default size and guidance.

    The prompts are embedded once, here, with the base's own text encoders (:class:`BaseText`:
    exactly ``encode_prompt``), which are then freed: the pipeline has no text encoders and takes
    ``prompt_embeds`` (and the pooled embeddings and masks); its VAE decodes."""

    def __init__(
        self,
        cfg: Any,
        base: basemod.Base,
        unet: torch.nn.Module,
        trained: torch.nn.Module,
        ema: torch.nn.Module,
        device: torch.device,
        autocast: Any,
    ):
        self.cfg, self.autocast = cfg, autocast
        text = BaseText(cfg.base, cfg.storage.options)
        self.embeddings = embeds(text.encode(list(cfg.validation_prompt)), text.empty())
        del text
        # a full fine-tune's EMA copy is a whole denoiser; a LoRA run's EMA holds only the adapters,
        # copied into the training denoiser's adapters while drawing
        lora = trained is not unet
        self.denoiser = unet if lora else ema
        self.pairs = list(zip(trained.parameters(), ema.parameters())) if lora else []
        self.pipe = base.load_pipeline(**{base.denoiser: self.denoiser}, **without_text(base)).to(device)

    def __call__(self, done: int) -> None:
        """Draw and write the grid if step ``done`` is a sampling step."""
        if not self.cfg.sample_due(done):
            return
        with self._ema(), self.autocast:
            images = draw(self.pipe, embeddings=self.embeddings, steps=self.cfg.sample_steps, seed=self.cfg.seed)
        url = self.cfg.sample_url(done)
        save_grid(images, url, self.cfg.storage.options)
        log.info(f"[finetune] step {done}: {images.shape[0]} validation samples -> {storage.redact(url)}")

    @contextlib.contextmanager
    def _ema(self) -> Iterator[None]:
        """The EMA weights in the pipeline's denoiser, in eval mode, for the duration."""
        was_training = self.denoiser.training
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in self.pairs]
            for p, e in self.pairs:
                p.copy_(e)
        self.denoiser.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), s in zip(self.pairs, saved):
                    p.copy_(s)
            self.denoiser.train(was_training)
