"""Retries of transient storage errors: exponential backoff with full jitter (as the AWS SDKs'
standard retry mode), bounded by elapsed time, so a storage outage of tens of seconds is ridden
out and a permanent error ("not found", "permission denied") fails at once. Used by
:mod:`pipeline.io.storage` for every call that touches storage.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


_TRANSIENT_NAMES = (
    "Timeout",
    "Throttl",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "ConnectionError",
    "EndpointConnectionError",
    "ReadTimeout",
    "ClientOSError",
    "ServerDisconnected",
    "IncompleteRead",
    "ProtocolError",
    "RequestTimeTooSkewed",
)


def is_transient(exc: BaseException) -> bool:
    """Whether an exception is worth retrying (network trouble, throttling, 5xx)."""
    if isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
    ):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = type(exc).__name__ + " " + str(exc)[:200]
    return any(name in text for name in _TRANSIENT_NAMES) or " 503" in text or " 500" in text


RETRY_SECONDS_ENV = "LATENT_PIPELINE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0


def retry_budget() -> float:
    """How long :func:`retry` keeps retrying one operation: ``$LATENT_PIPELINE_RETRY_SECONDS``
    (default 60 s), so that a storage outage of tens of seconds is ridden out."""
    try:
        return max(0.0, float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)))
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    budget: float | None = None,
    base_delay: float = 0.25,
    max_delay: float = 8.0,
    attempts: int | None = None,
) -> T:
    """Call ``fn`` and retry transient failures (:func:`is_transient`) with exponential backoff
    and full jitter (the AWS SDKs' "standard" retry mode: sleep a uniform random time in
    ``[0, min(max_delay, base_delay * 2**n)]``) until ``budget`` seconds (default
    :func:`retry_budget`) have passed since the first try; then the last error is raised.
    ``attempts`` additionally caps the number of tries. Other errors are raised at once."""
    budget = retry_budget() if budget is None else budget
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or (attempts is not None and attempt >= attempts):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            if time.monotonic() - start + delay > budget:
                raise
            time.sleep(delay)
