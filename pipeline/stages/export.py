"""``latent-pipeline export``: a ``finetune`` checkpoint as what diffusers users load.

* a LoRA run of a base whose pipeline class has diffusers' LoRA loader (SD 1.x/2.x, SDXL,
  SD3/3.5) -> ``OUTPUT/pytorch_lora_weights.safetensors`` (diffusers' own LoRA format, written by
  the base pipeline class's ``save_lora_weights`` from peft's state dict (peft's key names), as
  ``unet_lora_layers`` or ``transformer_lora_layers``, with the adapter config as metadata),
  which ``pipe.load_lora_weights(OUTPUT)`` loads onto the base;
* a LoRA run of a PixArt-α/Σ base (diffusers 0.42.1 has no LoRA loader for PixArt pipelines,
  and ``PixArtTransformer2DModel`` has no ``load_lora_adapter``) -> a peft adapter folder,
  ``OUTPUT/adapter_config.json`` + ``OUTPUT/adapter_model.safetensors``, as PixArt's own LoRA
  scripts save it, which peft loads onto the base's transformer::

      from peft import PeftModel
      pipe.transformer = PeftModel.from_pretrained(pipe.transformer, OUTPUT).merge_and_unload()

* a full fine-tune -> a complete pipeline folder: the base's other components (exactly the
  files a pipeline loads, copied) and the trained denoiser (UNet or transformer), which
  ``DiffusionPipeline.from_pretrained(OUTPUT)`` loads.

The base is the one the checkpoint records (``--base`` names another copy of it); a folder whose
components differ from the recorded identity is refused in one line. ``--weights ema`` (the
default) exports the EMA weights, ``raw`` the last optimizer step's. The checkpoint is read onto
its base by :func:`pipeline.train.finetuned.load`, as ``sample --checkpoint`` reads it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from pipeline.config import StorageOptions, check_limits, group, option, require
from pipeline.io import folders, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.models import base as basemod
from pipeline.train import finetuned

log = logging.getLogger("pipeline.export")
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class ExportConfig:
    checkpoint: str = option("", "a finetune checkpoint, or a finetune output (its latest checkpoint)")
    output: str = option("", "output folder: the LoRA file, or a complete pipeline folder")
    weights: str = option("ema", "which weights to export", choices=("ema", "raw"))
    base: str = option("", "the base pipeline folder (default: the one the checkpoint records)")
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "checkpoint", "output")
        self.checkpoint, self.output = storage.absolute(self.checkpoint), storage.absolute(self.output)
        self.base = storage.absolute(self.base)
        check_limits(self)
        storage.check_separate(self.output, {"checkpoint": self.checkpoint, "base": self.base})


def run_export(cfg: ExportConfig) -> str:
    """Write the export; returns the output URL."""
    import torch

    so = cfg.storage.options
    tuned = finetuned.load(cfg.checkpoint, cfg.base, cfg.weights, so)
    base = tuned.base
    with tempfile.TemporaryDirectory() as out:
        if tuned.lora:
            what = _export_lora(tuned, out)
        else:
            _copy_files(base, [r for r in base.pipeline_files(skip=(base.denoiser,)) if r != basemod.INDEX_NAME], out)
            with open(os.path.join(out, basemod.INDEX_NAME), "w") as f:  # only the components copied
                json.dump(base.exported_index(), f, indent=2)
            with torch.no_grad():
                tuned.denoiser.save_pretrained(os.path.join(out, base.denoiser), safe_serialization=True)
            what = "a pipeline folder"
        storage.upload_dir(out, cfg.output, so, commit_last="")
    log.info(f"[export] step {tuned.info.step} {cfg.weights} weights as {what} -> {storage.redact(cfg.output)}")
    return cfg.output


def _export_lora(tuned: finetuned.Finetuned, out: str) -> str:
    """Write the run's adapters into ``out``; returns what was written, for the log line."""
    import diffusers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    base, denoiser = tuned.base, tuned.denoiser
    # peft's own key names (``lora_A``/``lora_B``), as diffusers' SD3 example saves them: every
    # loader takes them, where ``convert_state_dict_to_diffusers`` renames only the to_q/k/v/out
    # keys (``lora.down``), which SD3's loader then drops
    state = get_peft_model_state_dict(denoiser)
    pipeline = getattr(diffusers, base.class_name)
    if not hasattr(pipeline, "save_lora_weights"):  # no LoRA loader in diffusers (PixArt): peft's folder
        model = get_peft_model(base.load_denoiser(), LoraConfig(**tuned.lora))
        prefixed = {f"base_model.model.{k}": v for k, v in state.items()}  # names inside the PeftModel
        unexpected = list(getattr(set_peft_model_state_dict(model, prefixed), "unexpected_keys", []))
        if unexpected:
            raise CheckpointError(f"adapter tensors do not fit the base's denoiser: {unexpected[:3]}")
        model.save_pretrained(out, safe_serialization=True)
        os.remove(os.path.join(out, "README.md"))  # peft's model card template, no information
        return "a peft adapter folder"
    metadata = denoiser.peft_config["default"].to_dict()
    layers = {f"{base.denoiser}_lora_layers": state, f"{base.denoiser}_lora_adapter_metadata": metadata}
    pipeline.save_lora_weights(out, **layers, safe_serialization=True)
    return "LoRA weights"


def _copy_files(base: basemod.Base, rels: list[str], out: str) -> None:
    """Copy exactly ``rels`` of the base (each checked to lie inside it) into ``out``."""
    for rel in rels:
        dest = os.path.join(out, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(folders.file(base.local, rel, base.where), dest)
