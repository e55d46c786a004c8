"""Waking an idle worker when mail is queued, instead of after ``poll_seconds``.

Why: an idle worker slept ``poll_seconds`` (1 s) between polls, so a mail waited half
of that on average before it was even claimed. Now the wait ends as soon as a commit
may have queued mail; ``poll_seconds`` stays the longest wait (a retry that falls due,
a missed wake-up), so nothing depends on a wake-up arriving.

PostgreSQL: enqueue runs ``pg_notify`` in its transaction (delivered at commit, only
if it commits) and the worker ``LISTEN``\\ s on a connection of its own. SQLite has no
notifications: the worker reads ``PRAGMA data_version`` every ``interval`` seconds, a
counter that changes whenever another connection (any process) commits to the file,
without reading any table.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHANNEL = "crm_outbox"
"""The PostgreSQL notification channel for "mail was queued"."""
SQLITE_INTERVAL = 0.01
"""How often an idle worker on SQLite asks whether anything was committed (seconds)."""
_SLICE = 0.2
"""The longest a LISTEN wait runs before it looks at the stop event again."""


class Wakeup(Protocol):
    """What an idle worker waits on."""

    def wait(self, timeout: float, stop: threading.Event) -> None:
        """Return when mail may be due, when ``stop`` is set, or after ``timeout``."""
        ...

    def close(self) -> None:
        """Give back the connection."""
        ...


def announce(session: Session) -> None:
    """Tell listening workers, at commit, that this transaction queued mail."""
    if session.get_bind().dialect.name == "postgresql":
        # A SELECT construct, not text: text SQL may write anything, so it would make
        # the session forget what it read about senders (crm_core.mail.senders).
        session.execute(select(func.pg_notify(CHANNEL, "")))


def listen(engine: Engine, interval: float = SQLITE_INTERVAL) -> Wakeup:
    """The wake-up for this database (a connection of its own, held until closed)."""
    if engine.dialect.name == "postgresql":
        return _Listen(engine)
    if engine.dialect.name == "sqlite":
        return _DataVersion(engine, interval)
    return _Sleep()


class _Sleep:
    """No way to be told: wait the whole timeout."""

    def wait(self, timeout: float, stop: threading.Event) -> None:
        stop.wait(timeout)

    def close(self) -> None:
        return None


class _Listen:
    """``LISTEN crm_outbox`` on an autocommit connection outside the pool's use."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.raw: Any = None
        try:
            self._connection()  # listening before the first poll: no commit is missed
        except Exception as exc:
            log.warning("outbox wake-up: LISTEN failed, will try again: %s", exc)

    def _connection(self) -> Any:
        if self.raw is None:
            raw = self.engine.raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            driver.rollback()  # the pool's ping may have begun a transaction
            driver.autocommit = True
            driver.execute(f"LISTEN {CHANNEL}")
            self.raw = raw
        return self.raw.driver_connection

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        try:
            connection = self._connection()
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for _ in connection.notifies(timeout=min(left, _SLICE), stop_after=1):
                    return
        except Exception as exc:
            log.warning("outbox wake-up: LISTEN failed, polling instead: %s", exc)
            self.close()
            stop.wait(max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            raw.invalidate()  # never hand a LISTENing connection back to the pool


class _DataVersion:
    """SQLite: wake when ``PRAGMA data_version`` changes (another connection committed)."""

    def __init__(self, engine: Engine, interval: float) -> None:
        self.raw = engine.raw_connection()
        self.interval = interval
        self.seen = self._version()

    def _version(self) -> int:
        driver = self.raw.driver_connection
        assert driver is not None
        # On the driver's connection, outside SQLAlchemy: no BEGIN IMMEDIATE, no lock.
        return int(driver.execute("PRAGMA data_version").fetchone()[0])

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not stop.wait(min(self.interval, max(deadline - time.monotonic(), 0.0))):
            version = self._version()
            if version != self.seen:
                self.seen = version
                return
            if time.monotonic() >= deadline:
                return

    def close(self) -> None:
        self.raw.close()
