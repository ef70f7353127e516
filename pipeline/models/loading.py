"""Loading a diffusion checkpoint for inference: the denoiser (EMA weights) and its autoencoder.

A diffusion checkpoint directory holds ``ema.safetensors`` / ``model.safetensors``, the
autoencoder it was trained with under ``vae/``, a task model's pixel refiner under ``refiner/``
when it was trained with one, a text-to-image model's empty-caption inputs in
``null_text.safetensors``, and ``config.json`` (a
:class:`~pipeline.io.checkpoint.CheckpointInfo`: denoiser architecture, latent scale/shift,
task, step), so sampling and restoration need only its URL. :func:`describe` checks a
checkpoint cheaply (its and its parts' ``config.json`` only) so a driver can refuse a wrong one
before any Ray work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.io import checkpoint, storage
from pipeline.io.checkpoint import CheckpointError, CheckpointInfo
from pipeline.models import autoencoder, denoiser, text
from pipeline.models.refiner import Refiner
from pipeline.models.refiner import load as load_refiner


@dataclass
class DiffusionModel:
    denoiser: Any  # a U-Net or a DiT (pipeline.models.denoiser.build), with its .cfg
    vae: autoencoder.Autoencoder
    info: CheckpointInfo
    refiner: Refiner | None = None  # task checkpoints trained with --refiner (under refiner/)
    # text-to-image checkpoints: the denoiser's inputs for the empty caption (batch 1), as trained
    null_text: dict[str, torch.Tensor | None] | None = None

    @property
    def latent_shape(self) -> list[int]:
        return self.info.latent_shape

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(autoencoder.unscale_latents(z, self.info.scale, self.info.shift))


def describe(url: str, storage_options: dict | None = None) -> CheckpointInfo:
    """The description of the diffusion checkpoint at ``url``; CheckpointError for anything else."""
    local = checkpoint.local_copy(url, storage_options)
    where = storage.redact(url)
    raw = checkpoint.read_raw_config(local, where)
    if raw.get("_class_name"):
        raise CheckpointError(f"{where} is a diffusers {raw['_class_name']} folder, not a diffusion checkpoint")
    info = checkpoint.read_info(local, where)
    if info.kind != "diffusion":
        article = "an" if info.kind[0] in "aeiou" else "a"
        raise CheckpointError(f"{where} is {article} {info.kind} checkpoint, not a diffusion checkpoint")
    # the bundled parts' descriptions too: what :func:`load` (in an actor) reads first must not fail there
    vae_dir = checkpoint.part(local, checkpoint.VAE_DIR, where)
    if checkpoint.read_raw_config(vae_dir, f"{where}/{checkpoint.VAE_DIR}").get("_class_name") != "AutoencoderKL":
        _check_part(vae_dir, f"{where}/{checkpoint.VAE_DIR}", "autoencoder")
    refiner_dir = checkpoint.part(local, checkpoint.REFINER_DIR, where)
    if os.path.isdir(refiner_dir):
        _check_part(refiner_dir, f"{where}/{checkpoint.REFINER_DIR}", "refiner")
    return info


def _check_part(local_dir: str, where: str, kind: str) -> None:
    if checkpoint.read_info(local_dir, where).kind != kind:
        raise CheckpointError(f"{where} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} checkpoint")


def load(url: str, storage_options: dict | None = None, device: str | None = None) -> DiffusionModel:
    """Load the denoiser (EMA weights) and its autoencoder from a checkpoint URL."""
    where = storage.redact(url)
    local, info = checkpoint.load(url, "diffusion", storage_options)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net = denoiser.from_dict(info.model)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid denoiser architecture ({exc})") from None
    checkpoint.load_weights(net, local, "ema")
    # the parts inside the checkpoint (a part that is a link leaving it is refused)
    vae = autoencoder.load(checkpoint.part(local, checkpoint.VAE_DIR, where)).to(dev)
    if vae.weights_sha256 != info.vae_identity.get("weights_sha256"):
        raise CheckpointError(f"{where}: the embedded autoencoder does not match the recorded identity")
    ref = None
    refiner_dir = checkpoint.part(local, checkpoint.REFINER_DIR, where)
    if os.path.isdir(refiner_dir):
        ref = load_refiner(refiner_dir, task=info.task).to(dev)
    null_text = None
    if info.text_encoders and os.path.isfile(os.path.join(local, f"{text.NULL_TEXT}.safetensors")):
        null_text = _null_text(checkpoint.load_tensors(local, text.NULL_TEXT), info, where)
    return DiffusionModel(net.eval().to(dev), vae, info, ref, null_text)


def _null_text(stored: dict[str, torch.Tensor], info: CheckpointInfo, where: str) -> dict[str, torch.Tensor | None]:
    """The empty caption's inputs, checked against the denoiser's text widths."""
    t, m, p = stored.get("text"), stored.get("text_mask"), stored.get("pooled")
    width, pooled_width = int(info.model.get("text_dim", 0)), int(info.model.get("pooled_dim", 0))
    ok = (
        t is not None
        and m is not None
        and t.dim() == 3
        and t.shape[0] == 1
        and t.shape[2] == width
        and m.dtype == torch.bool
        and tuple(m.shape) == tuple(t.shape[:2])
        and (tuple(p.shape) == (1, pooled_width) if p is not None else not pooled_width)
    )
    if not ok:
        raise CheckpointError(
            f"{where}: {text.NULL_TEXT}.safetensors does not hold the empty caption for a {width}-wide text input"
        )
    return {"text": t, "text_mask": m, "pooled": p}
