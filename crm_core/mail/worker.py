"""The outbox worker: claim a batch, send it per account, record each result.

Why this shape: a database transaction is never held open across a network send.
Each poll is three kinds of short transactions — reap expired leases (at start, then
every tenth of a lease), claim a batch, record one account's results — with the sends
in between, outside any transaction.
The batch is grouped by sender account so a transport can reuse one connection or
session per account, and groups are sent in parallel by ``concurrency`` threads
(one thread per account at a time, so a transport's cached connection is never shared).
While sends run, the main thread renews the leases it holds, so a slow but live worker
is not mistaken for a dead one; a killed worker's leases simply run out and the next
poll of any worker turns them into ``unknown``.

Stopping (SIGTERM/SIGINT set ``stop``): sends in flight finish and are recorded; groups
not yet started are released back to ``queued`` without spending a try.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from crm_core import credential_expiry
from crm_core.db import driver_said
from crm_core.errors import TransportError
from crm_core.mail import pacing, policy, queue, reconciler, wakeup
from crm_core.mail.queue import Claim
from crm_core.mail.transport import Outcome, SendResult
from crm_core.models import OutboxState

if TYPE_CHECKING:
    from crm_core.app import Crm
    from crm_core.mail.message import OutgoingMessage

EXPIRY_CHECK_SECONDS = 24 * 3600
"""How often a running worker looks at its credentials' expiry dates."""

REAP_EVERY_MAX_SECONDS = 30.0
"""The longest a running worker goes between two looks for expired leases."""

MORE_BATCHES = 10
"""A batch that takes more of its sender's mail as it sends stops at this many batches'
worth (``outbox.batch_size`` each), so that the worker's line per batch keeps coming."""

log = logging.getLogger(__name__)
attempts = logging.getLogger("crm_core.mail.attempts")
"""Each attempt's outcome: shown by ``crm -v outbox work``."""


@dataclass
class WorkerStats:
    """What a worker did: messages per outcome, leases reaped, accounts paused."""

    polls: int = 0
    reaped: int = 0
    claimed: int = 0
    sent: int = 0
    partial: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0
    deferred: int = 0
    released: int = 0
    stale: int = 0
    reconciled: int = 0
    paused_accounts: int = 0
    resumed_accounts: int = 0
    paused_mailboxes: int = 0

    def __iadd__(self, other: WorkerStats) -> WorkerStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class _GroupResult:
    claims: Sequence[Claim]
    results: Sequence[SendResult] | None  # None: released unsent (stopping)
    recorded: queue.Recorded = field(default_factory=queue.Recorded)
    released: int = 0
    seconds: float = 0.0


class _Recorder:
    """Records one group's results as they come, each message once.

    Why: a transport reports results while it sends (``report``), then returns them
    all; whatever was recorded already is not recorded again, and a result for a
    message that is not in this group is ignored.
    """

    def __init__(self, crm: Crm, claims: Sequence[Claim], monotonic: Callable[[], float]) -> None:
        self.crm = crm
        self.clock = policy.DbClock(monotonic)
        self.claims = {c.message.message_id: c for c in claims}
        self.results: dict[str, SendResult] = {}
        self.recorded = queue.Recorded()
        self.lock = threading.Lock()
        self.connection: Connection | None = None
        """Held from the first result to :meth:`close`: one checkout for the batch."""
        self.alone = False
        """Whether the held connection commits each statement (results written alone)."""

    def add(self, claims: Sequence[Claim]) -> None:
        """More messages of the batch (taken while it sends): their results count too."""
        with self.lock:
            self.claims.update((c.message.message_id, c) for c in claims)

    def last(self) -> Claim:
        """The batch's last message, in the order they were handed out."""
        with self.lock:
            return next(reversed(self.claims.values()))

    def all_claims(self) -> list[Claim]:
        """Every message of the batch, those taken while it sent included."""
        with self.lock:
            return list(self.claims.values())

    def record(self, results: Sequence[SendResult]) -> None:
        """Write the results not written yet: each alone where it can be (PostgreSQL),
        the rest in one short transaction."""
        with self.lock:
            fresh = [
                r
                for r in results
                if r.message_id in self.claims and r.message_id not in self.results
            ]
            if not fresh:
                return
            if self.connection is None:
                self.connection = self.crm.engine.connect()
            alone = [r for r in fresh if queue.records_alone(self.connection, r)]
            if alone:
                self._record_alone(alone)
            rest = [r for r in fresh if r.message_id not in self.results]
            if rest:
                self._record_together(rest)
            for result in fresh:  # written: only what the batch's log line needs is kept
                claim = self.claims[result.message_id]
                self.claims[result.message_id] = replace(claim, message=_shed(claim.message))

    def _record_together(self, results: Sequence[SendResult]) -> None:
        """Write ``results`` in one transaction: on the held connection without a Session
        when they pause nothing (:func:`queue.record_plain`), else with their pauses
        (:func:`queue.record_results`)."""
        claims = [self.claims[r.message_id] for r in results]
        connection = cast(Connection, self.connection)
        if self.alone:  # the held connection commits each statement: use another
            with self.crm.transaction() as session:
                now = self.clock.now(session.connection())
                done = queue.record_results(self.crm, session, claims, results, now)
        elif all(queue.pauses_nothing(r) for r in results):
            done = queue.record_plain(
                self.crm, connection, claims, results, self.clock.now(connection)
            )
        else:
            with self.crm.transaction_on(connection) as session:
                now = self.clock.now(session.connection())
                done = queue.record_results(self.crm, session, claims, results, now)
        self.results.update((r.message_id, r) for r in results)
        self.recorded.merge(done)

    def _record_alone(self, results: Sequence[SendResult]) -> None:
        """Write each result in a statement that is its own transaction
        (:func:`queue.record_alone`), on the held connection set to autocommit."""
        connection = cast(Connection, self.connection)
        if not self.alone:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            self.alone = True
        for result in results:
            claim = self.claims[result.message_id]
            now = self.clock.now(connection)
            done = queue.record_alone(self.crm, connection, claim, result, now)
            self.results[result.message_id] = result
            self.recorded.merge(done)

    def close(self) -> None:
        """Give the connection back to the pool."""
        with self.lock:
            if self.connection is not None:
                self.connection.close()
                self.connection = None

    def finish(self, seconds: float) -> _GroupResult:
        """The group's results (in claim order) and what recording them did."""
        ordered = [self.results[m] for m in self.claims if m in self.results]
        claims = list(self.claims.values())
        return _GroupResult(claims, ordered, self.recorded, seconds=seconds)


class _More:
    """The batch's next mail, for a transport that asks (``send_mail``'s ``more``):
    :func:`queue.claim_more`, under the batch's lease.

    Why bounded: a poll that went on while one sender's queue lasted would starve the
    worker's other duties and its progress line, so the batch stops taking more once
    it holds ``MORE_BATCHES`` batches' worth, when the worker stops, or when it is time
    to look for expired leases (at most every 30 s).

    How it keeps the wire busy: on PostgreSQL, once the transport has asked, the next
    mail is claimed ahead, in a thread of its own, while the mail just given is sent
    (rows are locked one by one, so the recording goes on meanwhile); what was claimed
    ahead and not given is released when the batch ends. On SQLite a claim holds the
    one write lock, so it is made when asked, with the results' recording held back
    on its own lock: the recorder then waits for a lock that wakes it at once, not for
    SQLite's busy handler, which sleeps a millisecond or more at a time.
    """

    def __init__(self, worker: Worker, recorder: _Recorder, stop: threading.Event) -> None:
        self.worker = worker
        self.recorder = recorder
        self.stop = stop
        self.limit = worker.config.batch_size * MORE_BATCHES
        pace = recorder.last().pace
        self.all_open = pace is None or len(recorder.claims) >= pace.parallel
        """Whether the batch began with a message for each of its connections: one that
        began with fewer opened fewer, and the next claim opens them all."""
        self.ahead: Future[list[Claim]] | None = None
        self.pool: ThreadPoolExecutor | None = None
        if worker.crm.engine.dialect.name == "postgresql":
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="outbox-more")

    def __call__(self) -> list[OutgoingMessage]:
        if not self._may_go_on():
            return []
        last = self.recorder.last()  # before the recorder's lock: last() takes it
        if self.pool is None:
            with self.recorder.lock:
                found = self._claim(last, self._room())
        else:
            found = self.ahead.result() if self.ahead else self._claim(last, self._room())
            self.ahead = None
        self.recorder.add(found)
        if found and self.pool is not None and self._room() > 0:
            self.ahead = self.pool.submit(self._claim, found[-1], self._room())
        return [c.message for c in found]

    def _may_go_on(self) -> bool:
        worker = self.worker
        return (
            self.all_open
            and self._room() > 0
            and not self.stop.is_set()
            and worker.clock() < worker.reap_at
        )

    def _room(self) -> int:
        return min(self.worker.config.batch_size, self.limit - len(self.recorder.claims))

    def _claim(self, last: Claim, room: int) -> list[Claim]:
        worker = self.worker
        with worker.crm.transaction() as session:
            now = self.recorder.clock.now(session.connection())  # the batch's reading
            return queue.claim_more(worker.crm, session, worker.name, last, room, now)

    def close(self) -> None:
        """The batch is over: give back what was claimed ahead and not given."""
        if self.pool is None:
            return
        try:
            unused = self.ahead.result() if self.ahead else []
            if unused:
                with self.worker.crm.transaction() as session:
                    queue.release(session, unused, policy.db_now(session))
        except DBAPIError as exc:  # their lease runs out, and the reaper queues them again
            log.warning(
                "outbox worker %s: mail claimed ahead left to its lease: %s",
                self.worker.name,
                driver_said(exc),
            )
        finally:
            self.pool.shutdown()


@dataclass(frozen=True)
class BatchReport:
    """One account's batch, as recorded: for the log line and a live progress display."""

    email: str
    transport: str
    counts: dict[str, int]
    seconds: float

    @property
    def messages(self) -> int:
        """How many messages the batch held."""
        return sum(self.counts.values())

    def __str__(self) -> str:
        outcomes = ", ".join(f"{state} {n}" for state, n in sorted(self.counts.items()))
        return (
            f"batch for {self.email} via {self.transport}: {self.messages} message(s), "
            f"{outcomes or 'none recorded'}, in {self.seconds:.2f} s"
        )


def default_name() -> str:
    """host:pid:random — unique per worker, readable in ``crm outbox show``."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Sends what the outbox holds; one per process, or several on many machines."""

    def __init__(
        self,
        crm: Crm,
        name: str | None = None,
        concurrency: int = 1,
        on_batch: Callable[[BatchReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        daily_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.crm = crm
        self.name = name or default_name()
        self.concurrency = concurrency
        self.config = crm.config.outbox
        self.on_batch = on_batch
        self.clock = clock
        self.reconcile_at = clock()  # a worker that starts looks at unknown mail first
        self.reap_at = clock()  # and for expired leases
        self.reap_every = min(self.config.lease_seconds / 10.0, REAP_EVERY_MAX_SECONDS)
        """Why not every poll: a lease lasts minutes, so a dead worker's mail waits for
        its lease to run out whatever the reaper does; looking a tenth of a lease later
        changes little, while a busy worker polls many times a second."""
        self.daily_clock = daily_clock
        """Schedules the daily look at credentials' expiry (what is due is decided by the
        database's clock in :mod:`crm_core.credential_expiry`)."""
        self.expiry_check_at: float | None = None  # due at start
        self.after_user = 0  # the last sender a claim looked at: the next starts after it
        crm.resources.set_pool_size(concurrency)  # shared HTTP pools fit the threads

    def run_once(self, stop: threading.Event | None = None) -> WorkerStats:
        """Drain what is due now, then return (``crm outbox work --once``)."""
        stop = stop or threading.Event()
        total = WorkerStats()
        self.check_expiry_when_due()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="outbox") as pool:
            while not stop.is_set():
                step = self.poll(pool, stop)
                total += step
                if not (step.claimed or step.paused_accounts):  # a pause frees slots
                    break
        return total

    def run(self, stop: threading.Event) -> WorkerStats:
        """Poll until ``stop`` is set; when nothing is due, wait until mail is queued
        (:mod:`crm_core.mail.wakeup`) or ``poll_seconds`` pass, whichever is first."""
        total = WorkerStats()
        woken = wakeup.listen(self.crm.engine)
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="outbox") as pool:
                self._run(pool, woken, stop, total)
        finally:
            woken.close()
        return total

    def _run(
        self,
        pool: ThreadPoolExecutor,
        woken: wakeup.Wakeup,
        stop: threading.Event,
        total: WorkerStats,
    ) -> None:
        while not stop.is_set():
            try:
                step = self.poll(pool, stop)
            except DBAPIError as exc:
                # The database went away (restart, failover). What this worker held
                # is fenced by its lease, so waiting and polling again is safe.
                log.warning(
                    "outbox worker %s: database error, retrying: %s", self.name, driver_said(exc)
                )
                stop.wait(max(self.config.poll_seconds, 1.0))
                continue
            total += step
            total.reconciled += self.reconcile_when_due()
            self.check_expiry_when_due()
            if not (step.claimed or step.paused_accounts):
                woken.wait(self.config.poll_seconds, stop)

    def reap_when_due(self) -> int:
        """Settle expired leases (:func:`queue.reap_expired`) at start, then every
        ``reap_every`` seconds: how many became ``unknown``."""
        if self.clock() < self.reap_at:
            return 0
        self.reap_at = self.clock() + self.reap_every
        with self.crm.transaction() as session:
            now = policy.db_now(session)
            window = functools.partial(self.crm.in_flight_window, session)
            return len(queue.reap_expired(session, now, window))

    def reconcile_when_due(self) -> int:
        """Ask the transports about ``unknown`` mail every ``reconcile_seconds``.

        Why in the worker: a lookup that was "too soon to tell" (Exchange still filing
        the copy) must be asked again later, and nobody should have to remember to.
        Safe with many workers: an answer is applied only to a row nobody touched.
        """
        if self.clock() < self.reconcile_at:
            return 0
        self.reconcile_at = self.clock() + self.config.reconcile_seconds
        try:
            reports = reconciler.reconcile(self.crm)
        except DBAPIError as exc:
            log.warning(
                "outbox worker %s: reconcile skipped, database error: %s",
                self.name,
                driver_said(exc),
            )
            return 0
        settled = sum(1 for r in reports if r.applied)
        if reports:
            log.info("reconciled %d unknown message(s): %d settled", len(reports), settled)
        return settled

    def check_expiry_when_due(self) -> None:
        """At start and then daily: signal app credentials that near their expiry
        (:mod:`crm_core.credential_expiry`; each threshold once, whichever worker)."""
        now = self.daily_clock()
        if self.expiry_check_at is not None and now < self.expiry_check_at:
            return
        self.expiry_check_at = now + EXPIRY_CHECK_SECONDS
        try:
            for expiry in credential_expiry.check(self.crm):
                log.warning("%s", expiry.message())
        except DBAPIError as exc:
            log.warning(
                "outbox worker %s: expiry check skipped, database error: %s",
                self.name,
                driver_said(exc),
            )

    def poll(self, pool: ThreadPoolExecutor, stop: threading.Event) -> WorkerStats:
        """One round: reap expired leases, claim a batch, send it, record results."""
        stats = WorkerStats(polls=1)
        stats.reaped = self.reap_when_due()
        with self.crm.transaction() as session:
            claimed = queue.claim_batch(
                self.crm,
                session,
                self.name,
                self.config.batch_size,
                policy.db_now(session),
                self.after_user,
            )
        self.after_user = claimed.last_user
        stats.claimed = len(claimed.claims)
        stats.paused_accounts = claimed.paused_accounts
        stats.resumed_accounts = claimed.resumed_accounts
        if claimed.claims:
            self._send_and_record(pool, claimed.claims, stop, stats)
        return stats

    def _send_and_record(
        self,
        pool: ThreadPoolExecutor,
        claims: Sequence[Claim],
        stop: threading.Event,
        stats: WorkerStats,
    ) -> None:
        groups: dict[str, list[Claim]] = defaultdict(list)
        for claim in claims:
            groups[claim.account.key].append(claim)
        alone = len(groups) == 1  # one sender: its batch may take more as it goes
        pending: set[Future[_GroupResult]] = {
            pool.submit(self._send_group, group, stop, alone) for group in groups.values()
        }
        token = claims[0].token  # one claim, one token for the whole batch
        renew_every = max(self.config.lease_seconds / 3.0, 0.05)
        while pending:
            done, pending = wait(pending, timeout=renew_every, return_when=FIRST_COMPLETED)
            for future in done:
                self._count(future.result(), stats)
            if pending:
                self._renew(token)

    def _send_group(
        self, claims: Sequence[Claim], stop: threading.Event, alone: bool = False
    ) -> _GroupResult:
        """Send one account's messages and record each result as the transport learns it.

        Runs in a pool thread. Results the transport reports while it sends are
        recorded there and then (each in a short transaction of its own), so a worker
        killed mid-batch leaves only the messages in flight to the reaper. ``alone``:
        the poll's only account, whose batch may take more of its mail (:class:`_More`).
        """
        if stop.is_set():
            with self.crm.transaction() as session:
                released = queue.release(session, claims, policy.db_now(session))
            return _GroupResult(claims, None, released=released)
        recorder = _Recorder(self.crm, claims, self.clock)
        started = time.monotonic()  # for the batch's log line, never for a decision
        more = _More(self, recorder, stop) if alone else None
        try:
            results = self._send(claims, recorder, more)
            recorder.record(results)  # what the transport did not report as it went
        finally:
            if more is not None:
                more.close()
            recorder.close()
            self._free_slots(claims)  # the batch's connections are closed, whatever happened
        return recorder.finish(time.monotonic() - started)

    def _send(
        self,
        claims: Sequence[Claim],
        recorder: _Recorder,
        more: Callable[[], list[OutgoingMessage]] | None = None,
    ) -> Sequence[SendResult]:
        """The transport's results; a failure of the whole send as each message's (those
        the batch took while it sent included)."""
        account = claims[0].account
        try:
            return self.crm.send_mail(account, [c.message for c in claims], recorder.record, more)
        except DBAPIError:
            # Recording a result failed (the database went away): the transport stopped
            # the batch and completed nothing after it. Not the transport's failure:
            # what was not recorded stays under the lease, and the reaper settles it.
            raise
        except TransportError as exc:
            outcome = _outcome(exc.outcome)
            messages = [c.message for c in recorder.all_claims()]
            return [SendResult(m.message_id, outcome, str(exc), exc.code) for m in messages]
        except Exception as exc:  # a plugin bug: we cannot tell what it sent
            log.exception("transport %s raised while sending for %s", account.transport, account)
            detail = (
                f"the {account.transport} transport failed unexpectedly "
                f"({type(exc).__name__}: {exc})"
            )
            messages = [c.message for c in recorder.all_claims()]
            return [
                SendResult(m.message_id, Outcome.AMBIGUOUS, detail, "plugin-error")
                for m in messages
            ]

    def _free_slots(self, claims: Sequence[Claim]) -> None:
        """The batch is over: the connections it held on its mailbox are free again.

        After a failed batch too, or its mailbox would count them until the lease ran
        out; if the database is still away, the lease frees them.
        """
        claim = claims[0]
        if not (claim.slots and claim.pace is not None):
            return
        try:
            with self.crm.transaction() as session:
                pacing.release(session, claim.pace.mailbox, claim.token, claim.account.user_id)
        except DBAPIError as exc:
            log.warning(
                "outbox worker %s: slots left to their lease: %s", self.name, driver_said(exc)
            )

    def _count(self, group: _GroupResult, stats: WorkerStats) -> None:
        """Add one group's recorded results to the poll's totals, and say so."""
        stats.released += group.released
        if group.results is None:
            return
        counts = group.recorded.counts
        self._report(group, dict(counts))
        stats.sent += counts.get(OutboxState.SENT.value, 0)
        stats.partial += counts.get(OutboxState.PARTIAL.value, 0)
        stats.retry += counts.get(OutboxState.RETRY.value, 0)
        stats.failed += counts.get(OutboxState.FAILED.value, 0)
        stats.unknown += counts.get(OutboxState.UNKNOWN.value, 0)
        stats.deferred += counts.get(OutboxState.QUEUED.value, 0)
        stats.stale += group.recorded.stale
        stats.paused_accounts += group.recorded.paused_accounts
        stats.paused_mailboxes += group.recorded.paused_mailboxes

    def _report(self, group: _GroupResult, counts: dict[str, int]) -> None:
        """One INFO line per batch; one line per attempt on ``crm_core.mail.attempts``."""
        account = group.claims[0].account
        report = BatchReport(account.email, account.transport, counts, group.seconds)
        log.info("%s", report)
        by_id = {c.message.message_id: c for c in group.claims}
        for result in group.results or ():
            claim = by_id[result.message_id]
            code = f" [{result.code}]" if result.code else ""
            attempts.info(
                "#%d %s attempt %d: %s%s %s",
                claim.outbox_id,
                claim.message.message_id,
                claim.attempt,
                result.outcome.value,
                code,
                result.detail,
            )
        if self.on_batch is not None:
            self.on_batch(report)

    def _renew(self, token: str) -> None:
        with self.crm.transaction() as session:
            until = policy.lease_until(policy.db_now(session), self.config.lease_seconds)
            queue.renew_leases(session, [token], until)


def _shed(message: OutgoingMessage) -> OutgoingMessage:
    """``message`` without its content, once its result is written.

    Why: a batch that takes more as it sends would otherwise keep every message it
    sent until it ends, ten batches' worth of bodies and attachments, where a worker
    held one batch's before.
    """
    return replace(message, text="", html=None, attachments=(), rendered=None)


def _outcome(value: Any) -> Outcome:
    """A TransportError's outcome; an unrecognised one counts as ambiguous (safe)."""
    try:
        return Outcome(value)
    except ValueError:
        return Outcome.AMBIGUOUS
