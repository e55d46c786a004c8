"""What ``crm outbox work`` shows while it runs: a line per batch, and a live line.

Why: a worker that prints nothing until it stops looks hung. Each batch is one line
(account, count, outcomes, time); in a terminal a live line below them shows sent,
failed and remaining mail and the rate, redrawn in place after every batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from crm_core.cli.output import printable

if TYPE_CHECKING:
    from crm_core.mail.worker import BatchReport

_CLEAR = "\r\x1b[K"


class Progress:
    """Counts batches as they are recorded and keeps the live line up to date."""

    def __init__(
        self,
        stream: TextIO,
        remaining: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.remaining = remaining
        self.clock = clock
        self.started = clock()
        self.sent = 0
        self.failed = 0
        self.shown = False

    def batch(self, report: BatchReport) -> None:
        """A batch was recorded: count it and redraw the live line."""
        self.sent += report.counts.get("sent", 0)
        self.failed += report.counts.get("failed", 0)
        self._draw()

    def line(self, text: str) -> None:
        """Print a whole line above the live one."""
        prefix = _CLEAR if self.shown else ""
        self.stream.write(f"{prefix}{printable(text)}\n")
        self.shown = False
        self._draw()

    def status(self) -> str:
        """``sent 120 · failed 2 · remaining 380 · 41.5 mail/s``."""
        elapsed = max(self.clock() - self.started, 1e-9)
        return (
            f"sent {self.sent} · failed {self.failed} · remaining {self.remaining()} · "
            f"{self.sent / elapsed:.1f} mail/s"
        )

    def _draw(self) -> None:
        if self.live and (self.sent or self.failed):
            self.stream.write(f"{_CLEAR}{self.status()}")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        """End the live line, so the next output starts on a line of its own."""
        if self.shown:
            self.stream.write("\n")
            self.shown = False


class ProgressHandler(logging.Handler):
    """A log handler that prints through :class:`Progress`, keeping the live line whole."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.line(self.format(record))
