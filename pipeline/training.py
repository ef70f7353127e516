"""What both training loops share: the loop options, Ray Train placement, checkpoints, metrics.

The loops themselves (``train_diffusion.py``, ``train_vae.py``) stay explicit and read top to
bottom; this module only holds the plumbing they call:

* :class:`LoopConfig`: options common to both loops;
* :func:`fit`: build the ``TorchTrainer`` (workers, GPUs, failure policy, checkpoint pruning,
  storage on disk or object storage) and run a loop function;
* :func:`save_checkpoint` / :func:`restore_checkpoint`: self-describing checkpoint directories
  (safetensors + ``config.json``), the optimizer state flattened into safetensors + JSON so that
  loading never unpickles;
* :class:`MetricsLog`: JSONL + TensorBoard on rank 0, copied to the output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint, storage
from .config import ConfigError, option, to_dict

from .checkpoint import RUN_NAME


@dataclass
class LoopConfig:
    output: str = option("", "output folder/URL: checkpoints, metrics.jsonl, tensorboard/, samples/")
    workers: int = option(1, "Ray Train workers (one DDP rank each)")
    cpus_per_worker: float = option(1.0, "CPUs per worker")
    gpus_per_worker: float = option(0.0, "GPUs per worker (0: CPU training with gloo)")
    steps: int = option(1000, "optimizer steps in total (a resumed run continues to this count)")
    batch_size: int = option(32, "samples per rank per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(3e-4, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(100, "linear learning-rate warmup steps")
    grad_clip: float = option(1.0, "gradient norm clip (0: off)")
    ema_decay: float = option(0.999, "EMA decay of the weights")
    bf16: bool = option(True, "bf16 autocast on GPU (ignored on CPU)")
    seed: int = option(0, "random seed")
    checkpoint_every: int = option(200, "steps between checkpoints")
    keep_checkpoints: int = option(3, "checkpoints kept (older ones pruned)")
    max_failures: int = option(1, "worker failures to recover from (restart from the latest checkpoint)")
    log_every: int = option(20, "steps between metric lines")
    sample_every: int = option(0, "steps between sample grids written to samples/ (0: only at the end)")
    init_from: str = option("", "checkpoint to warm-start a *new* run from (weights only)")
    ray_address: str = option("", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    storage_options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)")

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("option 'output' is required")
        for name in ("workers", "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option {name!r} must be >= 1")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError("option 'lr' must be > 0 and 'ema_decay' in [0, 1)")


def public_config(cfg: Any) -> dict:
    """A config as recorded in checkpoints: without storage options (credentials)."""
    d = to_dict(cfg)
    d.pop("storage_options", None)
    d.pop("ray_address", None)
    return d


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: ``min(decay, (1 + step) / (10 + step))``, so a short run's EMA is not
    dominated by the random initial weights (0.999 ** 600 would still keep 55% of them)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


class StepWindow:
    """Sums over the steps since the last metric line: averaged values, throughput, data wait."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.wait, self.seconds = 0, 0.0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def step(self, seconds: float, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        self.seconds += seconds

    def flush(self, **extra: float) -> dict[str, float]:
        """The window's metrics (means, samples/s, data-wait share), then start a new window."""
        n = max(self.steps, 1)
        out = {k: v / n for k, v in self.sums.items()}
        out.update(extra, samples_per_s=n * self.samples_per_step / max(self.seconds, 1e-9),
                   data_wait_share=self.wait / max(self.seconds, 1e-9))
        self._reset()
        return out


# --------------------------------------------------------------------------- optimizer state


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(step: int, metrics: dict, config: dict, tensors: dict[str, dict[str, torch.Tensor]],
                    extra_dirs: dict[str, str] | None = None) -> None:
    """Report ``metrics`` and, on rank 0, a checkpoint directory. Every rank must call this."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, os.path.join(d, name), ignore=shutil.ignore_patterns(".*"))
        checkpoint.save(d, {**config, "step": step}, tensors)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def restore_checkpoint() -> str | None:
    """A local copy of the run's latest checkpoint (after a restart or re-run), or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = tempfile.mkdtemp(prefix="ckpt-")
    return ckpt.to_directory(local)


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """Rank 0's metric history: ``metrics.jsonl`` and TensorBoard events, mirrored to the output.

    On a resumed run the existing ``metrics.jsonl`` is read back and lines past the resumed step
    are dropped, so the history is continuous.
    """

    def __init__(self, output: str, start_step: int, storage_options: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.output, self.so = output, storage_options
        self.dir = tempfile.mkdtemp(prefix="metrics-")
        self.lines: list[str] = []
        url = storage.join(output, "metrics.jsonl")
        if storage.exists(url, storage_options):
            for line in storage.read_bytes(url, storage_options).decode().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= start_step:
                    self.lines.append(line)
        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.lines.append(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}))
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def sync(self) -> None:
        self.tb.flush()
        storage.write_bytes(storage.join(self.output, "metrics.jsonl"), ("\n".join(self.lines) + "\n").encode(),
                            self.so)
        tb_dir = os.path.join(self.dir, "tensorboard")
        storage.upload_dir(tb_dir, storage.join(self.output, "tensorboard"), self.so, commit_last="")


# --------------------------------------------------------------------------- placement


def _run_storage(output: str, storage_options: dict | None):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if not storage.is_remote(output):
        path = os.path.abspath(output)
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output, storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def fit(loop_fn, loop_config: dict, cfg: LoopConfig):
    """Run ``loop_fn`` on ``cfg.workers`` Ray Train workers; re-running resumes the same run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_setup import ensure_ray

    ensure_ray(cfg.ray_address)
    storage_path, fs = _run_storage(cfg.output, cfg.storage_options)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    return trainer.fit()
