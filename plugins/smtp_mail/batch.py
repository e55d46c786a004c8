"""One account's batch over up to ``smtp.max_connections`` SMTP connections at once.

Why several connections: a message costs a round trip or two on a connection (one with
PIPELINING for MAIL, RCPT and DATA, one for the body), so against a server tens of
milliseconds away one connection sends a few dozen mails a second at best; three, as
many as Microsoft 365 allows per mailbox, send three times as many.

How it stays exactly once and crash-safe:

* the messages are handed out in the order given, one at a time, to whichever
  connection is free, and a connection takes the next only after the result of its
  last one was reported; so of the unreported messages at most one per connection is
  in flight, and they are the first ones (the transport's in-flight window);
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

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from crm_core.plugin_api import Outcome, OutgoingMessage, SendResult
from smtp_mail.classify import SmtpFailure
from smtp_mail.client import SmtpClient, TokenSource
from smtp_mail.settings import SmtpSettings

log = logging.getLogger(__name__)


class _Dealer:
    """Hands out the batch's messages in order, one per call, from any thread."""

    def __init__(self, messages: Sequence[OutgoingMessage]) -> None:
        self._next: Iterator[tuple[int, OutgoingMessage]] = iter(enumerate(messages))
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
        """The next message and its place, or None when none is left (or stopped)."""
        with self._lock:
            return None if self._stopped else next(self._next, None)

    def stop(self, cause: SendResult | None = None) -> None:
        """Hand out nothing more (a connection's thread failed, or the server throttled
        the mailbox: then ``cause`` is its result)."""
        with self._lock:
            self._stopped = True
            if cause is not None and self.throttled is None:
                self.throttled = cause


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
) -> BatchSent:
    """Send ``messages`` over up to ``settings.connections`` connections, reporting each
    result as its final reply arrives; one result per message, in their order."""
    if not messages:
        return BatchSent([], 0)
    results: list[SendResult | None] = [None] * len(messages)
    dealer = _Dealer(messages)
    reporting = threading.Lock()
    first = SmtpClient(settings, tokens)
    extra = min(settings.connections, len(messages)) - 1 if first.try_open() else 0
    clients = [first] + [SmtpClient(settings, tokens) for _ in range(extra)]

    def work(client: SmtpClient) -> None:
        with client:
            if client is not first:
                if not _opened(client):
                    return
                dealer.join()
            while (taken := dealer.take()) is not None:
                index, message = taken
                result = client.send(message)
                results[index] = result
                with reporting:
                    report([result])
                if result.outcome is Outcome.THROTTLED:
                    dealer.stop(result)  # the rest wait with the mailbox
                    return
                if client.broken and dealer.leave():
                    return

    dealer.join()  # the first connection, before any other can ask to leave
    with ThreadPoolExecutor(max(extra, 1), thread_name_prefix="smtp-connection") as pool:
        futures = [pool.submit(_guarded, work, client, dealer) for client in clients[1:]]
        _guarded(work, first, dealer)  # leaving the pool waits for the others
    for future in futures:
        future.result()  # a failure in another connection's thread is raised here
    if dealer.throttled is not None:
        cause = dealer.throttled
        held = [(i, _held(m, cause)) for i, m in enumerate(messages) if results[i] is None]
        for index, result in held:
            results[index] = result
        if held:
            report([result for _, result in held])
    sent = [r for r in results if r is not None]
    if len(sent) != len(messages):
        raise AssertionError("a message of the batch was not sent")  # a dealer bug
    return BatchSent(sent, sum(c.connections for c in clients))


def _held(message: OutgoingMessage, cause: SendResult) -> SendResult:
    """A message not tried because the server throttled the mailbox before it."""
    return SendResult(
        message.message_id,
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


def _guarded(work: Callable[[SmtpClient], None], client: SmtpClient, dealer: _Dealer) -> None:
    """Run one connection's loop; when it fails, the others stop taking messages."""
    try:
        work(client)
    except BaseException:
        dealer.stop()
        raise
