"""``latent-pipeline export``: a ``finetune`` checkpoint as what diffusers users load.

* a LoRA run -> ``OUTPUT/pytorch_lora_weights.safetensors`` (diffusers' own LoRA format, written
  by the base pipeline class's ``save_lora_weights`` from peft's state dict, with the adapter
  config as metadata), which ``pipe.load_lora_weights(OUTPUT)`` loads onto the base;
* a full fine-tune -> a complete pipeline folder: the base's other components (exactly the
  files a pipeline loads, copied) and the trained denoiser, which
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
            _export_lora(tuned, out)
        else:
            _copy_files(base, [r for r in base.pipeline_files(skip=(base.denoiser,)) if r != basemod.INDEX_NAME], out)
            with open(os.path.join(out, basemod.INDEX_NAME), "w") as f:  # only the components copied
                json.dump(base.exported_index(), f, indent=2)
            with torch.no_grad():
                tuned.denoiser.save_pretrained(os.path.join(out, base.denoiser), safe_serialization=True)
        storage.upload_dir(out, cfg.output, so, commit_last="")
    what = "LoRA adapters" if tuned.lora else "pipeline folder"
    log.info(f"[export] step {tuned.info.step} {cfg.weights} weights as a {what} -> {storage.redact(cfg.output)}")
    return cfg.output


def _export_lora(tuned: finetuned.Finetuned, out: str) -> None:
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = tuned.denoiser
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    getattr(diffusers, tuned.base.class_name).save_lora_weights(
        out, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, safe_serialization=True
    )


def _copy_files(base: basemod.Base, rels: list[str], out: str) -> None:
    """Copy exactly ``rels`` of the base (each checked to lie inside it) into ``out``."""
    for rel in rels:
        dest = os.path.join(out, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(folders.file(base.local, rel, base.where), dest)
