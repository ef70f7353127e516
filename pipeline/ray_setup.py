"""Connecting to Ray: a cluster when one is given (``--ray-address`` or ``RAY_ADDRESS``), else local."""

from __future__ import annotations

import logging
import os

import ray

_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_loggers() -> None:
    """Silence Ray Train v2's state-API warnings on minimal installs."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def ensure_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when already connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {}
    if not (address or os.environ.get("RAY_ADDRESS")) and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address or None, ignore_reinit_error=True,
             logging_config=ray.LoggingConfig(log_level="WARNING"), **kwargs)
    quiet_ray_loggers()


def cluster_slots(num_cpus: float, num_gpus: float, reserve_cpus: float = 0.0) -> int:
    """How many tasks/actors of this shape the cluster can run at once (at least 1), leaving
    ``reserve_cpus`` free for other work (CPU-only shapes)."""
    res = ray.cluster_resources()
    if num_gpus > 0:
        return max(1, int(res.get("GPU", 0) / num_gpus))
    return max(1, int((res.get("CPU", 1) - reserve_cpus) / max(num_cpus, 1e-3)))
