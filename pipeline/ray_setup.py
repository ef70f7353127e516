"""Connecting to Ray: a cluster when one is given (``--ray-address`` or ``RAY_ADDRESS``), else
local; and checking a job's resource request against the cluster before anything waits on it."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from pipeline.config import ConfigError
from pipeline.console import quiet_libraries


def ensure_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    verbose = logging.getLogger("pipeline").level == logging.DEBUG
    quiet_libraries(verbose)
    kwargs: dict[str, Any] = {}
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        # a local Ray is never preempted; the watcher actor only adds a warning line to the console
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if local and num_cpus:
        kwargs["num_cpus"] = num_cpus
    if not _job_has_setup_hook():
        kwargs["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.{setup_worker.__name__}"}
    # "local" starts this run's own Ray: never Ray's auto-detection, which joins whatever local
    # Ray runs (or once ran: a crashed head leaves its record behind) on the machine
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or "local",
        ignore_reinit_error=True,
        logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        **kwargs,
    )
    quiet_libraries(verbose)


def setup_worker() -> None:
    """Worker set-up hook (every worker process of this run's jobs): redact every log record
    the worker makes, as the driver does (:func:`console.install_redaction`; the AWS
    environment's long credentials registered), and point Ray's own look-ups at this cluster
    (:func:`point_state_api_here`)."""
    from pipeline.console import install_redaction
    from pipeline.redaction import register_secrets

    register_secrets({})
    install_redaction()
    point_state_api_here()


def point_state_api_here() -> None:
    """Make Ray's own "which cluster?" look-ups in a worker find the cluster it belongs to.

    Ray Train v2's placement-group cleaner (a detached actor) asks the State API about the
    controller with no address, and the State API then auto-detects a cluster from the
    machine's running GCS processes: with a second Ray on the machine (another run, a test
    session's Ray) that fails with ``Found multiple active Ray instances`` and a traceback on the
    console. ``RAY_ADDRESS`` is what that look-up reads first."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _job_has_setup_hook() -> bool:
    """Whether a submitted job (``ray job submit --runtime-env``) already brings its own worker
    set-up hook: ray.init refuses a second one, so the job's is kept."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return False
    try:
        runtime_env = json.loads(injected).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return "worker_process_setup_hook" in runtime_env


def cluster_slots(num_cpus: float, num_gpus: float, reserve_cpus: float = 0.0) -> int:
    """How many tasks/actors of this shape the cluster can run at once (at least 1), leaving
    ``reserve_cpus`` free for other work (CPU-only shapes)."""
    res = ray.cluster_resources()
    if num_gpus > 0:
        return max(1, int(res.get("GPU", 0) / num_gpus))
    return max(1, int((res.get("CPU", 1) - reserve_cpus) / max(num_cpus, 1e-3)))


def check_fits(
    *,
    cpus: float,
    gpus: float,
    count: int = 1,
    reserve_cpus: float = 0.0,
    options: tuple[str, str, str] = ("num_cpus", "num_gpus", ""),
) -> None:
    """Refuse (ConfigError naming the option) a request the cluster can never schedule, instead of
    waiting forever: ``count`` units of ``cpus`` + ``gpus`` each, ``reserve_cpus`` kept free.

    The cluster's *total* resources are used, so an autoscaling cluster's current size decides;
    set ``--ray-address`` to a running cluster of the right size.
    """
    res = ray.cluster_resources()
    cpu_opt, gpu_opt, count_opt = options
    have_cpu, have_gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus > 0 and have_gpu < gpus:
        raise ConfigError(
            f"option {gpu_opt.replace('_', '-')!r}: {gpus:g} GPU(s) asked for, the Ray cluster has {have_gpu:g}"
        )
    if cpus > have_cpu:
        raise ConfigError(
            f"option {cpu_opt.replace('_', '-')!r}: {cpus:g} CPU(s) asked for, the Ray cluster has {have_cpu:g}"
        )
    if count_opt and (count > 1 or reserve_cpus):
        fit_cpu = int((have_cpu - reserve_cpus + 1e-9) // cpus) if cpus else count
        fit_gpu = int((have_gpu + 1e-9) // gpus) if gpus else count
        if min(fit_cpu, fit_gpu) < count:
            raise ConfigError(
                f"option {count_opt.replace('_', '-')!r}: {count} at {cpus:g} CPU / {gpus:g} GPU each do "
                f"not fit the Ray cluster ({have_cpu:g} CPU, {have_gpu:g} GPU"
                f"{f', {reserve_cpus:g} CPU kept for reads' if reserve_cpus else ''}); "
                f"at most {max(0, min(fit_cpu, fit_gpu))}"
            )


def check_memory(bytes_per_unit: float, count: int, option: str, what: str) -> None:
    """Refuse ``count`` units needing ``bytes_per_unit`` of RAM each when the Ray cluster's memory
    (what Ray offers to tasks and actors) cannot hold them, instead of swapping or being killed."""
    have = float(ray.cluster_resources().get("memory", 0))
    need = bytes_per_unit * count
    if have and need > have:
        raise ConfigError(
            f"option {option!r}: {what} needs about {bytes_per_unit / 2**30:.1f} GiB per worker "
            f"({need / 2**30:.1f} GiB for {count}), the Ray cluster offers {have / 2**30:.1f} GiB of memory"
        )
