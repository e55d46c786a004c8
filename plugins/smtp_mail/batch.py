"""One account's batch over up to ``mail.max_connections`` SMTP connections at once.

Why several connections: a message costs a round trip or two on a connection (one with
PIPELINING for MAIL, RCPT and DATA, one for the body), so against a server tens of
milliseconds away one connection sends a few dozen mails a second at best; three, as
many as Microsoft 365 allows per mailbox, send three times as many.

How it stays exactly once and crash-safe:

* the messages are handed out in the order given, one at a time, to whichever
  connection is free. Results are reported (recorded by the worker) from a thread of
  their own, beside the wire: a connection goes on with its next message while the last
  result is recorded, and only that message's final dot, the moment the server may
  accept it, waits (:class:`_Recording`). A dot leaves only when fewer than
  ``mail.max_connections`` messages before it are unreported, so the messages the
  server may have accepted and nobody recorded are always among the first
  ``max_connections`` unreported ones, in the order handed out: the transport's
  in-flight window (``in_flight_for``), as when each result was recorded before the
  connection took the next message;
* the first connection opens (and logs in) before any other is tried, so a wrong
  password costs one login, not one per connection; when it cannot open, every
  message gets its failure as before;
* an extra connection that cannot open (a server allowing fewer, answering 421) takes
  no message and simply drops out; the others carry the batch. One that cannot be
  reopened after the server closed it fails only the message it held (nothing of it
  was handed over: temporary) and drops out too, unless it is the last one left;
* a reply that throttles the mailbox (``432 4.3.2``, a 4.7.x rate limit) stops the
  hand-out: the messages not yet handed out are not tried and come back THROTTLED with
  the server's words, so they wait with the mailbox (:mod:`crm_core.mail.pacing`)
  without spending an attempt.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crm_core.plugin_api import Outcome, OutgoingMessage, SendResult
from smtp_mail.classify import SmtpFailure
from smtp_mail.client import SmtpClient, TokenSource
from smtp_mail.settings import SmtpSettings
from smtp_mail.tls import ContextSource, tls_context

log = logging.getLogger(__name__)


class _Dealer:
    """Hands out the batch's messages in order, one per call, from any thread; when they
    are all out, asks ``more`` for the next ones (until it has none)."""

    def __init__(
        self,
        messages: Sequence[OutgoingMessage],
        more: Callable[[], Sequence[OutgoingMessage]] | None = None,
    ) -> None:
        self.ids = [m.message_id for m in messages]
        """The Message-ID of every message of the batch so far, in order of place."""
        self._waiting = collections.deque(messages)
        """The messages not handed out yet (one handed out is the connection's alone:
        a batch that takes more as it sends keeps no content of the ones sent)."""
        self._more = more
        self._lock = threading.Lock()
        self._stopped = False
        self._working = 0
        self.throttled: SendResult | None = None

    def join(self) -> None:
        """A connection starts taking messages."""
        with self._lock:
            self._working += 1

    def leave(self) -> bool:
        """A broken connection asks to stop taking messages: yes unless it is the last.

        Why not always: the last one must go on, so every message gets a result (its
        failure, as with a single connection).
        """
        with self._lock:
            if self._working > 1:
                self._working -= 1
                return True
            return False

    def take(self) -> tuple[int, OutgoingMessage] | None:
        """The next message and its place, or None when none is left (or stopped).

        Asking for more holds the lock: the other connections have nothing to take
        until the answer comes anyway.
        """
        with self._lock:
            if self._stopped:
                return None
            if not self._waiting and self._more is not None:
                found = list(self._more())
                self.ids.extend(m.message_id for m in found)
                self._waiting.extend(found)
                if not found:
                    self._more = None
            if not self._waiting:
                return None
            place = len(self.ids) - len(self._waiting)
            return place, self._waiting.popleft()

    def stop(self, cause: SendResult | None = None) -> None:
        """Hand out nothing more (a connection's thread failed, or the server throttled
        the mailbox: then ``cause`` is its result)."""
        with self._lock:
            self._stopped = True
            if cause is not None and self.throttled is None:
                self.throttled = cause


class _Unrecorded(Exception):
    """Reporting stopped (a result could not be recorded, or a connection failed):
    no further message may be completed."""


class _Recording:
    """Reports results from a thread of its own, and holds each final dot until the
    results before it are recorded far enough.

    Why: recording a result is a database transaction; made in the connection's thread,
    it left the wire idle for as long. Here the connection sends the next message's
    envelope and body while results are recorded, and :meth:`before_dot` holds only the
    dot. Message ``k`` (in the order handed out; every message before it was handed
    out first) may be completed once fewer than ``window`` of the messages before it
    are unrecorded, so a worker killed at any moment leaves the messages the server may
    have accepted unrecorded only among the first ``window`` unrecorded ones, which
    the reaper counts as unknown. A message whose dot never left is discarded by the
    server when the connection drops (RFC 5321, 3.8) and is queued again.
    Results that arrive while one report runs go together in the next (one
    transaction for several).
    """

    def __init__(self, report: Callable[[Sequence[SendResult]], None], window: int) -> None:
        self._report = report
        self._window = max(window, 1)
        self._changed = threading.Condition()
        self._pending: list[tuple[int, SendResult]] = []
        self._recorded: set[int] = set()
        self._reporting = False
        self._failure: BaseException | None = None
        self._stopped = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="smtp-report", daemon=True)
        self._thread.start()

    def put(self, index: int, result: SendResult) -> None:
        """Queue the result of the ``index``-th message for reporting."""
        with self._changed:
            if self._stopped:
                raise _Unrecorded
            self._pending.append((index, result))
            self._changed.notify_all()

    def hold(self, index: int) -> _Turn:
        """What the ``index``-th message's final dot waits for."""
        return _Turn(self, index)

    def may_complete(self, index: int, wait: bool) -> bool:
        """Whether the ``index``-th message may be completed (waiting until it may, with
        ``wait``); raises _Unrecorded when reporting stopped: it must not be completed."""
        with self._changed:
            while wait and not self._stopped and not self._within(index):
                self._changed.wait()
            if self._stopped:
                raise _Unrecorded
            return self._within(index)

    def _within(self, index: int) -> bool:
        return self._unrecorded_before(index) < self._window

    def _unrecorded_before(self, index: int) -> int:
        return index - sum(1 for i in self._recorded if i < index)

    def stop(self) -> None:
        """A connection failed: hold every dot not yet sent, take no more results."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def close(self) -> None:
        """Report what is queued, end the thread; raise what reporting raised."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while (batch := self._next()) is not None:
            try:
                self._report([result for _, result in batch])
            except BaseException as exc:  # raised to the batch's caller by close()
                with self._changed:
                    self._failure = exc
                    self._stopped = True
                    self._changed.notify_all()
                return
            with self._changed:
                self._recorded.update(index for index, _ in batch)
                self._changed.notify_all()

    def _next(self) -> list[tuple[int, SendResult]] | None:
        """Every result queued so far (waiting for one); None once closed and drained."""
        with self._changed:
            while not self._pending and not self._closing:
                self._changed.wait()
            batch, self._pending = self._pending, []
            return batch or None


@dataclass(frozen=True)
class _Turn:
    """One message's :class:`~smtp_mail.client.DotHold`."""

    recording: _Recording
    index: int

    def ready(self) -> bool:
        return self.recording.may_complete(self.index, wait=False)

    def wait(self) -> None:
        self.recording.may_complete(self.index, wait=True)


@dataclass(frozen=True)
class BatchSent:
    """The results in the order of the messages, and how many connections were opened."""

    results: list[SendResult]
    connections: int


def send_batch(
    settings: SmtpSettings,
    tokens: TokenSource | None,
    messages: Sequence[OutgoingMessage],
    report: Callable[[Sequence[SendResult]], None],
    contexts: ContextSource = tls_context,
    more: Callable[[], Sequence[OutgoingMessage]] | None = None,
) -> BatchSent:
    """Send ``messages`` over up to ``settings.connections`` connections, reporting each
    result as its final reply arrives; one result per message, in their order.
    ``contexts``: where the connections get their TLS context (the worker's shared one).
    ``more``: asked for the next messages when all are out, so the open connections
    carry them too (their results follow the others')."""
    if not messages:
        return BatchSent([], 0)
    results: dict[int, SendResult] = {}
    dealer = _Dealer(messages, more)
    recording = _Recording(report, settings.connections)
    first = SmtpClient(settings, tokens, contexts)
    extra = min(settings.connections, len(messages)) - 1 if first.try_open() else 0
    clients = [first] + [SmtpClient(settings, tokens, contexts) for _ in range(extra)]

    def work(client: SmtpClient) -> None:
        with client:
            if client is not first:
                if not _opened(client):
                    return
                dealer.join()
            while (taken := dealer.take()) is not None:
                index, message = taken
                result = client.send(message, recording.hold(index))
                results[index] = result
                recording.put(index, result)
                if result.outcome is Outcome.THROTTLED:
                    dealer.stop(result)  # the rest wait with the mailbox
                    return
                if client.broken and dealer.leave():
                    return

    dealer.join()  # the first connection, before any other can ask to leave
    try:
        with ThreadPoolExecutor(max(extra, 1), thread_name_prefix="smtp-connection") as pool:
            futures = [
                pool.submit(_guarded, work, client, dealer, recording) for client in clients[1:]
            ]
            _guarded(work, first, dealer, recording)  # leaving the pool waits for the others
        for future in futures:
            future.result()  # a failure in another connection's thread is raised here
    finally:
        recording.close()  # every result reported; a failure to record is raised here
    everyone = dealer.ids
    if dealer.throttled is not None:
        cause = dealer.throttled
        held = [(i, _held(m, cause)) for i, m in enumerate(everyone) if i not in results]
        results.update(held)
        if held:
            report([result for _, result in held])
    if len(results) != len(everyone):
        raise AssertionError("a message of the batch was not sent")  # a dealer bug
    return BatchSent(
        [results[i] for i in range(len(everyone))], sum(c.connections for c in clients)
    )


def _held(message_id: str, cause: SendResult) -> SendResult:
    """A message not tried because the server throttled the mailbox before it."""
    return SendResult(
        message_id,
        Outcome.THROTTLED,
        f"Not tried: {cause.detail}",
        cause.code,
        retry_after=cause.retry_after,
        quota=cause.quota,
    )


def _opened(client: SmtpClient) -> bool:
    """Open an extra connection; False (and a log line) when the server says no."""
    try:
        client.open()
    except SmtpFailure as exc:
        log.info(
            "SMTP server %s refused an extra connection; the batch goes on without it: %s",
            client.settings.server,
            exc.failure.reply or exc.failure.detail,
        )
        return False
    return True


def _guarded(
    work: Callable[[SmtpClient], None],
    client: SmtpClient,
    dealer: _Dealer,
    recording: _Recording,
) -> None:
    """Run one connection's loop; when it fails, the others stop taking messages and
    complete none they hold (their results could be held up behind this one's).

    A stop because reporting failed ends the loop quietly: the batch's caller gets the
    reporting failure itself (:meth:`_Recording.close`).
    """
    try:
        work(client)
    except _Unrecorded:
        dealer.stop()
    except BaseException:
        dealer.stop()
        recording.stop()
        raise
