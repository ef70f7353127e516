"""What a user sees: logging set-up and progress lines.

Every module logs through ``logging.getLogger("pipeline.<stage>")``; :func:`setup_logging`
(called once by the CLI) prints those lines plainly, once each, and keeps Ray's and other
libraries' internals out of the console unless ``--verbose`` is given. Training workers log
on rank 0 only. Progress lines (done / total, rate, ETA) are throttled to one every few seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

log = logging.getLogger("pipeline")

# library loggers that talk too much at their default level for a batch job's console
_NOISY = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.air",
    "diffusers",
    "transformers",
    "urllib3",
    "botocore",
    "s3fs",
    "fsspec",
    "filelock",
    "torch.distributed",
    "ray.train.v2",
)


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (message, traceback, stack) passes :func:`redaction.redact`."""

    def format(self, record: logging.LogRecord) -> str:
        from pipeline.redaction import redact

        return redact(super().format(record))


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Make a log record fit to print, whichever handler prints it: its message rendered and
    redacted, its traceback rendered and redacted (a formatter prints the rendered text)."""
    from pipeline.redaction import redact

    if getattr(record, "_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is left for logging to report
        return record
    record.msg, record.args = redact(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._redacted = True
    return record


def install_redaction() -> None:
    """Pass every log record made in this process, by any logger, through :func:`redaction.redact`
    (a record factory: it covers handlers that libraries such as Ray add later, and Python's
    last-resort handler). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_pipeline_redacts", False):
        return

    def make(*args: object, **kwargs: object) -> logging.LogRecord:
        return _redact_record(factory(*args, **kwargs))

    make._pipeline_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


def setup_logging(verbose: bool = False) -> None:
    """Plain ``pipeline`` lines on stderr; library internals only with ``verbose``. Every line
    any logger prints, tracebacks included, passes :func:`redaction.redact` first.

    Also sets the environment that Ray workers inherit, so the libraries they load stay quiet in
    the same way. (Ray's C++ core still prints its own error lines; silencing them with
    ``RAY_BACKEND_LOG_LEVEL`` makes every process announce the setting, which is worse.)
    """
    root = logging.getLogger("pipeline")
    if not any(getattr(h, "_pipeline", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(message)s"))
        handler._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    install_redaction()
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool = False) -> None:
    """Raise the level of library loggers (and the env their worker processes read)."""
    level = logging.INFO if verbose else logging.ERROR
    for name in _NOISY:
        logging.getLogger(name).setLevel(level)
    # Ray Train v2 names this logger after its file, so RunConfig's log level misses its
    # "Reporting training result ..." dump on every report (training workers have it loaded)
    train_context = sys.modules.get("ray.train.v2._internal.execution.context")
    if train_context is not None:
        logging.getLogger(train_context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(accelerate|Accelerate).*")


def format_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Report progress of ``total`` units (``total=None`` when unknown) on ``logger``."""

    def __init__(
        self, stage: str, total: int | None, unit: str, logger: logging.Logger | None = None, every: float = 2.0
    ):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.log = logger or log
        self.done = 0
        self.extra = ""
        self.start = self._last = time.time()

    @property
    def rate(self) -> float:
        return self.done / max(time.time() - self.start, 1e-9)

    def advance(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        if extra:
            self.extra = extra
        now = time.time()
        if force or now - self._last >= self.every or (self.total is not None and self.done >= self.total):
            self._last = now
            self.log.info(self.line())

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        msg = f"[{self.stage}] {self.unit} {self.done}/{total}  {self.rate:.1f}/s"
        if self.total and self.done and self.done < self.total:
            msg += f"  ETA {format_seconds((self.total - self.done) / max(self.rate, 1e-9))}"
        return msg + (f"  {self.extra}" if self.extra else "")
