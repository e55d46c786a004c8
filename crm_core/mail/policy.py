"""Outbox policy: the states a mail moves through, back-off, budget, leases, one clock.

Pure functions (and :func:`db_now`, the one clock), so the rules can be read and
tested without a database or a worker. The states::

    queued ──claim──> sending ──sent──────────────> sent
      ^                  │ ├──temporary──> retry ──(due)──> sending
      │                  │ ├──permanent / lifetime spent──> failed
      │                  │ ├──ambiguous / lease expired / plugin bug──> unknown
      └─configuration / throttled─┘ (account or mailbox paused; no attempt counted)
    retry ──(some recipients delivered, the rest refused or given up)──> partial
    unknown ──reconcile / resolve --sent──> sent
    unknown ──reconcile / resolve --not-sent──> queued
    queued | retry | unknown ──cancel──> cancelled
    failed | cancelled | retry ──retry──> queued (attempts counted from 0 again)

The budget is a lifetime: a mail that keeps failing for now is tried until
``[outbox] give_up_after`` (2 days) after its enqueue, on the database's clock, its
last try due as that lifetime ends at the latest; ``max_attempts``, when set, is an
extra bound. An operator's retry counts attempts from 0 again but keeps the lifetime
(it runs from the enqueue), so a mail past it gets one more try.

Why a table and not a queue in memory: the mail must survive a crash and must not go
twice by our doing (transactional-outbox pattern). :mod:`crm_core.mail.enqueue` writes
the row in the caller's transaction; :mod:`crm_core.mail.queue` claims and records it
for the worker; :mod:`crm_core.mail.pauses`, :mod:`crm_core.mail.operations` and
:mod:`crm_core.mail.reconciler` hold the rest.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    Connection,
    func,
    select,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from crm_core.config import OutboxConfig
from crm_core.mail.transport import Outcome
from crm_core.models import OutboxState

S = OutboxState
DUE_STATES = (S.QUEUED.value, S.RETRY.value)
FINAL_STATES = (S.SENT.value, S.PARTIAL.value, S.FAILED.value, S.CANCELLED.value)


def backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Delay before try ``attempt + 1``: exponential, capped, with "equal jitter".

    Why equal jitter (half fixed, half random): many messages that failed together
    (a server restart) spread out instead of returning in one burst, yet none comes
    back sooner than half the exponential step. ``jitter`` is a number in [0, 1).
    """
    step = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return step / 2.0 + step / 2.0 * min(max(jitter, 0.0), 1.0)


def retry_delay(
    attempt: int, config: OutboxConfig, retry_after: float | None, jitter: float
) -> float:
    """The back-off, or the server's own ``retry_after`` when that is longer."""
    delay = backoff_seconds(
        attempt, config.backoff_base_seconds, config.backoff_max_seconds, jitter
    )
    return max(delay, retry_after or 0.0)


def state_after(
    outcome: Outcome, attempts: int, config: OutboxConfig, age: timedelta
) -> OutboxState:
    """The state a message moves to after its ``attempts``-th attempt ended with
    ``outcome``, ``age`` after its enqueue."""
    if outcome is Outcome.SENT:
        return S.SENT
    if outcome is Outcome.PERMANENT:
        return S.FAILED
    if outcome is Outcome.AMBIGUOUS:
        return S.UNKNOWN
    if outcome in (Outcome.CONFIGURATION, Outcome.THROTTLED):
        return S.QUEUED  # waits for the paused account or mailbox; not an attempt
    return S.FAILED if budget_spent(attempts, age, config) else S.RETRY


def budget_spent(attempts: int, age: timedelta, config: OutboxConfig) -> bool:
    """True when a mail failing for now is not tried again: its lifetime is over, or
    it had ``max_attempts`` attempts (when that is set)."""
    if age >= config.give_up_after:
        return True
    return config.max_attempts is not None and attempts >= config.max_attempts


def next_attempt_at(
    now: datetime, created_at: datetime, delay: float, config: OutboxConfig
) -> datetime:
    """When to try again: after ``delay`` seconds, but no later than the end of the
    lifetime, so the last try comes as it ends (a server's long Retry-After too)."""
    return min(now + timedelta(seconds=delay), created_at + config.give_up_after)


def gave_up(attempts: int, age: timedelta, config: OutboxConfig) -> str:
    """Why a mail failing for now is not tried again, with how long it was tried."""
    tried = _plural(attempts, "attempt")
    if age >= config.give_up_after:
        lifetime = duration_text(config.give_up_after)
        return (
            f"Gave up after trying for {duration_text(age)} ({tried}; [outbox] "
            f"give_up_after is {lifetime})"
        )
    return (
        f"Gave up after {tried} in {duration_text(age)} ([outbox] max_attempts is "
        f"{config.max_attempts})"
    )


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def duration_text(span: timedelta) -> str:
    """``2 days 1 hour``: the largest unit and the next one, when it is not 0."""
    rest = max(round(span.total_seconds()), 0)
    counts = []
    for name, size in _UNITS:
        count, rest = divmod(rest, size)
        counts.append((count, name))
    first = next((i for i, (count, _) in enumerate(counts) if count), None)
    if first is None:
        return "0 seconds"
    return " ".join(_plural(n, name) for n, name in counts[first : first + 2] if n)


def _plural(count: int, name: str) -> str:
    return f"{count} {name}{'s' if count != 1 else ''}"


def lease_until(now: datetime, lease_seconds: float) -> datetime:
    """When a claim made ``now`` expires."""
    return now + timedelta(seconds=lease_seconds)


def lease_expired(until: datetime | None, now: datetime) -> bool:
    """True when a lease has run out (a lease without an end has run out)."""
    return until is None or until <= now


@functools.lru_cache(maxsize=1)
def _now_statement() -> Select[datetime]:
    """``SELECT now()``, built once: it is asked for in every short transaction."""
    return select(func.now())


def db_now(session: Session) -> datetime:
    """Now by the database's clock: what every stored time is written and compared by.

    Why: settings, pauses, leases and due times are written and compared by processes
    on many machines; one clock (the database server's) makes a skewed application
    host harmless: it cannot lift a pause early or never, nor take over a live lease.
    PostgreSQL: ``now()``, the start of the transaction, so one transaction's stamps
    are one instant. SQLite has no server: its clock is the operating system's on the
    machine that holds the file (what SQLite's own ``'now'`` reads; read here to the
    microsecond rather than its millisecond), never a Crm's ``clock``.
    """
    if session.get_bind().dialect.name == "postgresql":
        return _postgres_now(session.connection())
    return datetime.now(UTC)


def _postgres_now(connection: Connection) -> datetime:
    """PostgreSQL's ``now()`` in UTC (this machine's clock if it gave no time)."""
    value = connection.scalar(_now_statement())
    return value.astimezone(UTC) if isinstance(value, datetime) else datetime.now(UTC)


class DbClock:
    """The database's clock, read once and then carried forward by a monotonic clock.

    Why: a worker records a batch's results in a short transaction every mail or two,
    and on PostgreSQL each reading of :func:`db_now` is a round trip of its own (a
    fifth of a result's statements). The database is still the one clock: the first
    reading comes from it, and the monotonic clock (which no change of the wall clock
    moves) only measures the time since, over a batch that its lease keeps short.
    SQLite's clock is this machine's anyway: it is read each time, as before.
    """

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self.read: tuple[datetime, float] | None = None
        """The database's time at the first reading, and the monotonic clock's then."""

    def now(self, connection: Connection) -> datetime:
        """Now by the database's clock (read on the first call; carried forward after)."""
        if connection.dialect.name != "postgresql":
            return datetime.now(UTC)  # what db_now reads on SQLite
        if self.read is None:
            self.read = (_postgres_now(connection), self.monotonic())
            return self.read[0]
        at, then = self.read
        return at + timedelta(seconds=max(self.monotonic() - then, 0.0))


def new_token() -> str:
    """A fresh lease token: unguessable and unique per claim."""
    return secrets.token_hex(16)
