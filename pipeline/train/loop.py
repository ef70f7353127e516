"""What every training loop shares: the loop options, Ray Train placement, checkpoints, metrics.

The loops themselves stay explicit and read top to bottom: the diffusion loop in
``train/diffusion.py`` and the one skeleton of the two pixel-space loops (``train-vae``,
``train-refiner``) in ``train/pixel_loop.py``. This module only holds the plumbing they call:

* :class:`LoopConfig`: options common to every loop;
* :func:`fit`: build the ``TorchTrainer`` (workers, GPUs, failure policy, checkpoint pruning,
  storage on disk or object storage) and run a loop function;
* the steps every loop takes in the same way, so they cannot drift: :func:`resume_or_init`,
  :func:`set_lr`, :func:`grad_sync`, :func:`optimizer_step`, :func:`save_checkpoint` (the
  optimizer state flattened into safetensors + JSON so that loading never unpickles);
* :func:`wrap_model`: DDP (Ray Train's ``prepare_model``) or FSDP2 (``fully_shard``: each rank
  holds a shard of the weights, gradients, optimizer state and EMA). Checkpoints hold *full*
  tensors either way (:func:`full_tensor`, gathered on every rank, written by rank 0) and load
  into either layout (:func:`laid_out_like`), so a sharded run's checkpoint resumes, exports and
  warm-starts exactly like a DDP one;
* :class:`MetricsLog`: JSONL + TensorBoard on rank 0, copied to the output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import RayOptions, StorageOptions, check_limits, group, option, require
from pipeline.io import checkpoint, storage
from pipeline.io.checkpoint import RUN_NAME, CheckpointInfo


@dataclass
class LoopConfig:
    """Options every training loop shares (composed into each verb's config)."""

    output: str = option("", "output folder/URL: checkpoints, metrics.jsonl, tensorboard/, samples/")
    workers: int = option(1, "Ray Train workers (one DDP rank each)", range=(1, None))
    cpus_per_worker: float = option(1.0, "CPUs per worker", range=(0, None), lo_open=True)
    gpus_per_worker: float = option(0.0, "GPUs per worker (0: CPU training with gloo)", range=(0, None))
    steps: int = option(1000, "optimizer steps in total (a resumed run continues to this count)", range=(1, None))
    batch_size: int = option(32, "samples per rank per micro-step", range=(1, None))
    grad_accum: int = option(1, "micro-steps per optimizer step", range=(1, None))
    lr: float = option(3e-4, "peak AdamW learning rate", range=(0, 10), lo_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", range=(0, 10))
    warmup_steps: int = option(100, "linear learning-rate warmup steps", range=(0, None))
    grad_clip: float = option(1.0, "gradient norm clip (0: off)", range=(0, None))
    ema_decay: float = option(0.999, "EMA decay of the weights", range=(0, 1), hi_open=True)
    bf16: bool = option(True, "bf16 autocast on GPU (ignored on CPU)")
    seed: int = option(0, "random seed")
    checkpoint_every: int = option(200, "steps between checkpoints", range=(1, None))
    keep_checkpoints: int = option(3, "checkpoints kept (older ones pruned)", range=(1, None))
    max_failures: int = option(
        1, "worker failures to recover from (restart from the latest checkpoint)", range=(0, None)
    )
    log_every: int = option(20, "steps between metric lines", range=(1, None))
    sample_every: int = option(
        0, "steps between sample grids written to samples/ (0: only at the end)", range=(0, None)
    )
    init_from: str = option("", "checkpoint to warm-start a *new* run from (its EMA weights)")
    ray: RayOptions = group(RayOptions, private=True)
    storage: StorageOptions = group(StorageOptions, private=True)

    def __post_init__(self) -> None:
        require(self, "output")
        self.output, self.init_from = storage.absolute(self.output), storage.absolute(self.init_from)
        check_limits(self)

    def sample_due(self, done: int) -> bool:
        """Whether a sample grid is drawn after step ``done``: every ``--sample-every`` and at the end."""
        return bool(self.sample_every and done % self.sample_every == 0) or done == self.steps

    def sample_url(self, done: int) -> str:
        """Where the grid of step ``done`` goes: ``OUTPUT/samples/step_<step>.png``."""
        return storage.join(self.output, "samples", f"step_{done:08d}.png")


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
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


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
        out.update(
            extra,
            samples_per_s=n * self.samples_per_step / max(self.seconds, 1e-9),
            data_wait_share=self.wait / max(self.seconds, 1e-9),
        )
        self._reset()
        return out


def log_step(
    done: int, cfg: LoopConfig, window: StepWindow, lr: float, metrics_log: MetricsLog | None, verb: str
) -> dict[str, float]:
    """At a metrics step (every ``--log-every`` and the last): the window's metrics, written to
    ``metrics.jsonl`` and printed as one line on rank 0; ``{}`` at any other step."""
    if not (done % cfg.log_every == 0 or done == cfg.steps):
        return {}
    metrics = window.flush(lr=lr)
    if metrics_log is not None:
        metrics_log.log(done, metrics)
        logging.getLogger(f"pipeline.{verb.replace('-', '_')}").info(
            f"[{verb}] step {done}/{cfg.steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
            f"{metrics['samples_per_s']:.1f} samples/s data-wait {100 * metrics['data_wait_share']:.1f}%"
        )
    return metrics


def loss_text(metrics: dict[str, float]) -> str:
    """``"loss 0.1234 "`` when this step closed a metrics window (a checkpoint step may not)."""
    return f"loss {metrics['loss']:.4f} " if "loss" in metrics else ""


# --------------------------------------------------------------------------- optimizer state


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat full tensors (safetensors) and JSON metadata.
    Under FSDP a collective: every rank calls it."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = full_tensor(value)
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what :func:`optimizer_to_tensors` wrote; per-parameter tensors are laid out as their
    parameter (sharded under FSDP)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        if torch.is_tensor(value) and int(idx) < len(params) and value.shape == params[int(idx)].shape:
            value = laid_out_like(value, params[int(idx)])
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- the shared loop steps


def new_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def resume_or_init(
    model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, cfg: LoopConfig, kind: str
) -> tuple[int, CheckpointInfo | None]:
    """Load the run's latest checkpoint after a restart or re-run (raw weights, EMA, optimizer),
    else warm-start from ``cfg.init_from`` (its EMA weights into both copies). Returns the step
    to continue from and the resumed checkpoint's description (None for a fresh start)."""
    local = restore_checkpoint()
    if local is not None:
        info = checkpoint.read_info(local)
        load_weights(model, local, "model")
        load_weights(ema, local, "ema")
        optimizer_from_tensors(opt, checkpoint.load_tensors(local, "optimizer"), info.optimizer)
        return int(info.step), info
    if cfg.init_from:
        init, _info = checkpoint.load(cfg.init_from, kind, cfg.storage.options)
        load_weights(model, init, "ema")
        load_weights(ema, init, "ema")
    return 0, None


def load_weights(module: torch.nn.Module, local_dir: str, name: str) -> None:
    """:func:`checkpoint.load_weights` into ``module`` as it is laid out: the full tensors of a
    checkpoint become this rank's shards of a sharded (FSDP) module."""
    current = module.state_dict()
    if not any(is_sharded(v) for v in current.values()):
        checkpoint.load_weights(module, local_dir, name)
        return
    state = checkpoint.load_tensors(local_dir, name)
    if state.keys() != current.keys() or any(state[k].shape != current[k].shape for k in state):
        raise checkpoint.CheckpointError(f"{local_dir}: {name}.safetensors does not fit the recorded architecture")
    module.load_state_dict({k: laid_out_like(v, current[k]) for k, v in state.items()})


def set_lr(opt: torch.optim.Optimizer, step: int, cfg: LoopConfig) -> float:
    lr = lr_at(step, cfg)
    for group_ in opt.param_groups:
        group_["lr"] = lr
    return lr


def grad_sync(ddp: Any, micro: int, cfg: LoopConfig, world: int) -> contextlib.AbstractContextManager:
    """DDP (and FSDP) reduce gradients only on the last micro-step of an accumulation."""
    last = micro == cfg.grad_accum - 1
    if last or world == 1:
        return contextlib.nullcontext()
    return ddp.no_sync() if hasattr(ddp, "no_sync") else _fsdp_no_sync(ddp)


@contextlib.contextmanager
def _fsdp_no_sync(model: Any):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def optimizer_step(
    ddp: torch.nn.Module, opt: torch.optim.Optimizer, ema: torch.nn.Module, step: int, cfg: LoopConfig
) -> float:
    """Clip, step, zero the gradients and update the EMA; returns the gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(ema, unwrap(ddp), ema_decay_at(step, cfg.ema_decay))
    return float(full_tensor(grad_norm))


def save_checkpoint(
    step: int,
    metrics: dict,
    info: CheckpointInfo,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    extra_dirs: dict[str, str] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Report ``metrics`` and, on rank 0, a checkpoint directory. Every rank must call this
    (under FSDP every rank takes part in gathering the full tensors).

    ``extra_dirs``: folders copied in (name -> local path); ``extra_tensors``: more
    ``<name>.safetensors`` files beside the model, EMA and optimizer weights."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    tensors = {"model": full_state_dict(unwrap(model)), "ema": full_state_dict(ema)}
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    info.optimizer, info.step = opt_meta, step
    with tempfile.TemporaryDirectory() as d:
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, os.path.join(d, name), ignore=shutil.ignore_patterns(".*"))
        checkpoint.save(d, info, {**tensors, "optimizer": opt_tensors, **(extra_tensors or {})})
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_{step:08d}"
        )


# --------------------------------------------------------------------------- DDP or FSDP


def wrap_model(model: torch.nn.Module, fsdp: bool = False, ema: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model as the loop calls it: DDP through Ray Train's ``prepare_model``, or, with
    ``fsdp``, sharded in place with FSDP2 (``fully_shard``) and its EMA copy sharded the same
    way. Ray Train's own ``prepare_model(parallel_strategy="fsdp")`` wraps FSDP1 and refuses
    CPU workers; FSDP2 runs on gloo too. Build the optimizer after this: it steps the shards."""
    import ray.train.torch

    if not fsdp:
        return ray.train.torch.prepare_model(model)
    for module in (model, ema) if ema is not None else (model,):
        shard(module)
    return model


def shard(module: torch.nn.Module) -> None:
    """FSDP2 over ``module``: one unit per block the model names as not to be split (a diffusers
    model's ``_no_split_modules``: its transformer and ResNet blocks), innermost first, then the
    root (what is left: embeddings, norms, convolutions in and out)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(module, "_no_split_modules", None) or ())
    for sub in reversed(list(module.modules())):
        if sub is not module and type(sub).__name__ in names:
            fully_shard(sub)
    fully_shard(module)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP shard gathered from every rank (a collective), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with full tensors (under FSDP a collective: every rank calls it)."""
    return {k: full_tensor(v) for k, v in module.state_dict().items()}


def laid_out_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as ``like``: this rank's shard when ``like`` is sharded (every rank
    holds the full tensor, so no communication), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def restore_checkpoint() -> str | None:
    """A local copy of the run's latest checkpoint (after a restart or re-run), or None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = tempfile.mkdtemp(prefix="ckpt-")
    return ckpt.to_directory(local)


def worker_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; logging on rank 0 only."""
    import ray.train
    import ray.train.torch

    from pipeline.console import setup_logging

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging()
    if rank != 0:
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    return rank, world, ray.train.torch.get_device()


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
        storage.write_bytes(
            storage.join(self.output, "metrics.jsonl"), ("\n".join(self.lines) + "\n").encode(), self.so
        )
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


def checkpoint_url(path: str, output: str) -> str:
    """The URL of a checkpoint Ray Train reported at ``path`` for a run writing to ``output``
    (Ray Train reports remote paths without their scheme)."""
    if storage.is_remote(output) and "://" not in path:
        return output.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def fit(loop_fn, loop_config: dict, cfg: LoopConfig):
    """Run ``loop_fn`` on ``cfg.workers`` Ray Train workers; re-running resumes the same run."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_setup import check_fits, ensure_ray

    verbose = logging.getLogger("pipeline").level == logging.DEBUG
    ensure_ray(cfg.ray.address)
    check_fits(
        cpus=cfg.cpus_per_worker,
        gpus=cfg.gpus_per_worker,
        count=cfg.workers,
        options=("cpus_per_worker", "gpus_per_worker", "workers"),
    )
    storage.probe_writable(cfg.output, cfg.storage.options)
    storage_path, fs = _run_storage(cfg.output, cfg.storage.options)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            # Ray Train's own "worker group started" lines only with --verbose (a Train v2 option:
            # ray.train exports v2's RunConfig at run time, the type stubs see the v1 one)
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),  # type: ignore[call-arg]
        ),
    )
    return trainer.fit()
