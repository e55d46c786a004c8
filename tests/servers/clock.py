"""The clock a stand-in reads and sleeps on: the system's, or one a test moves by hand.

Why: a stand-in's behaviour in time (a token's expiry, a Sent Items copy that shows up
late, an injected delay) must be testable without the test sleeping, and the test must
assert on what the stand-in did, never on how long the test took. Every stand-in takes
``clock=``; the default is :data:`SYSTEM_CLOCK`, so production-like runs keep real time.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """Epoch seconds (``time()``) and a way to wait (``sleep()``)."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Real time: ``time.time`` and ``time.sleep``."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told.

    ``time()`` starts at the real time of construction (so dates a stand-in derives from
    it look current) and changes only through :meth:`advance`, or when a sleeper wakes:
    ``sleep(s)`` returns at once with the clock at least ``s`` later than when the sleep
    began. Every sleep is recorded in :attr:`sleeps`.

    :meth:`hold` makes sleepers block until :meth:`release`, so a test can see a
    stand-in *holding* requests (a slow server) and count them with
    :meth:`wait_for_sleepers`, instead of guessing from elapsed time.

    Also usable where a library reads ``time.time()`` through its module's ``time``
    attribute: ``monkeypatch.setattr(module, "time", clock)``.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._cond = threading.Condition()
        self._held = False
        self._sleeping = 0
        self._sleeps: list[float] = []

    def time(self) -> float:
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._cond:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Record the sleep; block while held; wake with the clock ``seconds`` on."""
        if seconds <= 0:
            return
        with self._cond:
            began = self._now
            self._sleeps.append(seconds)
            self._sleeping += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: not self._held)
            finally:
                self._sleeping -= 1
            self._now = max(self._now, began + seconds)

    @property
    def sleeps(self) -> list[float]:
        """Every sleep asked for, oldest first (a copy)."""
        with self._cond:
            return list(self._sleeps)

    def hold(self) -> None:
        """From now on, sleepers block until :meth:`release`."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        """Wake every held sleeper; later sleeps return at once again."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def wait_for_sleepers(self, count: int, timeout: float = 10.0) -> int:
        """Block until ``count`` threads are asleep (held); the number asleep now.

        The timeout only fires when the stand-in never got there: a failure.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._sleeping >= count, timeout)
            return self._sleeping
