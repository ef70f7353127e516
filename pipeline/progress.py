"""Progress lines for long work: done / total, rate, ETA; throttled to one line every few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Report progress of ``total`` units (``total=None`` when unknown)."""

    def __init__(self, stage: str, total: int | None, unit: str, log: Callable[[str], None] = _stderr,
                 every: float = 2.0):
        self.stage, self.total, self.unit, self.log, self.every = stage, total, unit, log, every
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
            self.log(self.line())

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        msg = f"[{self.stage}] {self.unit} {self.done}/{total}  {self.rate:.1f}/s"
        if self.total and self.done and self.done < self.total:
            msg += f"  ETA {format_seconds((self.total - self.done) / max(self.rate, 1e-9))}"
        return msg + (f"  {self.extra}" if self.extra else "")
