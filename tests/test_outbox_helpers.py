"""Shared pieces of the outbox tests: a scripted in-test transport and small helpers.

The scripted transport is a real pluggy plugin registered on a real Crm (no mocks);
each message's outcomes are scripted by subject, so a test says "first temporary,
then sent" and looks at what the outbox made of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update

from crm_core import directory, hookimpl
from crm_core.app import Crm
from crm_core.mail import enqueue
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import (
    Outcome,
    RecipientResult,
    RecipientStatus,
    ReconcileResult,
    Resources,
    SenderAccount,
    SendResult,
    TransportSpec,
)
from crm_core.models import MailboxSlot, OutboxMessage, OutboxState, utcnow

SCRIPTED = "scripted"

SCRIPTED_CONFIG = """\
[product_lines.commercial]
plugins = ["test_transport", "maildir_mail"]
default_transport = "scripted"

[product_lines.rentals]
plugins = ["test_transport", "maildir_mail"]
default_transport = "scripted"

[outbox]
lease_seconds = 300
max_attempts = 3
backoff_base_seconds = 10
backoff_max_seconds = 100
batch_size = 50
poll_seconds = 0.05
"""


@dataclass(eq=False)  # a plugin is hashable (pluggy keeps plugins in sets)
class Scripted:
    """A transport whose results are scripted per subject (default: sent).

    ``script[subject]`` is a list of (outcome, detail, code, retry_after) used one per
    attempt (the last one repeats). ``calls`` records every batch as
    (account email, [Message-ID]); ``delivered`` every Message-ID reported sent.
    ``hook`` runs inside send_mail before answering (to stall or inspect).

    ``per_recipient[subject]`` is, per attempt, the status of each address (the others
    of the envelope are delivered): the transport then answers per recipient, as
    SMTP does, and ``received`` counts each (Message-ID, address) delivered.
    ``report_each`` makes it report every result as soon as it has it, as the real
    transports do; ``fail_after`` makes it raise after that many messages.
    """

    script: dict[str, list[tuple[Outcome, str, str, float | None]]] = field(default_factory=dict)
    calls: list[tuple[str, list[str]]] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    raise_error: Exception | None = None
    hook: Callable[[SenderAccount, Sequence[OutgoingMessage]], None] | None = None
    reconcile_answers: dict[str, bool | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: dict[str, int] = field(default_factory=dict)
    per_recipient: dict[str, list[dict[str, RecipientStatus]]] = field(default_factory=dict)
    received: list[tuple[str, str]] = field(default_factory=list)
    envelopes: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    report_each: bool = False
    fail_after: int | None = None
    in_flight: int = 0

    @hookimpl
    def register_transports(self) -> list[TransportSpec]:
        return [TransportSpec(SCRIPTED, "Scripted test transport", in_flight=self.in_flight)]

    @hookimpl
    def send_mail(
        self,
        account: SenderAccount,
        messages: Sequence[OutgoingMessage],
        resources: Resources,
        report: Callable[[Sequence[SendResult]], None],
    ) -> list[SendResult]:
        with self.lock:
            self.calls.append((account.email, [m.message_id for m in messages]))
        if self.hook is not None:
            self.hook(account, messages)
        if self.raise_error is not None:
            raise self.raise_error
        results: list[SendResult] = []
        for message in messages:
            if self.fail_after is not None and len(results) >= self.fail_after:
                raise RuntimeError("the transport broke down mid-batch")
            results.append(self._result(message))
            if self.report_each:
                report(results[-1:])
        return results

    def _result(self, message: OutgoingMessage) -> SendResult:
        with self.lock:
            n = self.seen.get(message.message_id, 0)
            self.seen[message.message_id] = n + 1
            envelope = tuple(a.email for a in message.recipients)
            self.envelopes.append((message.message_id, envelope))
            per_attempt = self.per_recipient.get(message.subject)
            if per_attempt is not None:
                return self._per_recipient(message, per_attempt[min(n, len(per_attempt) - 1)])
            steps = self.script.get(message.subject) or [(Outcome.SENT, "", "", None)]
            outcome, detail, code, retry_after = steps[min(n, len(steps) - 1)]
            if outcome is Outcome.SENT:
                self.delivered.append(message.message_id)
                self.received.extend((message.message_id, a) for a in envelope)
        reply = "250 2.0.0 Ok: queued as 4XbScripted" if outcome is Outcome.SENT else ""
        return SendResult(message.message_id, outcome, detail, code, retry_after, "ref", reply)

    def _per_recipient(
        self, message: OutgoingMessage, statuses: dict[str, RecipientStatus]
    ) -> SendResult:
        """Answer for each recipient, as SMTP answers each RCPT (the lock is held)."""
        answers = []
        for address in (a.email for a in message.recipients):
            status = statuses.get(address, RecipientStatus.DELIVERED)
            reply = {
                RecipientStatus.DELIVERED: "250 2.1.5 Ok",
                RecipientStatus.DEFERRED: "452 4.5.3 Error: too many recipients",
                RecipientStatus.REFUSED: f"550 5.1.1 <{address}>: Recipient address rejected",
            }[status]
            answers.append(RecipientResult(address, status, reply))
            if status is RecipientStatus.DELIVERED:
                self.received.append((message.message_id, address))
        delivered = any(a.status is RecipientStatus.DELIVERED for a in answers)
        deferred = any(a.status is RecipientStatus.DEFERRED for a in answers)
        outcome = (
            Outcome.SENT if delivered else Outcome.TEMPORARY if deferred else Outcome.PERMANENT
        )
        if delivered:
            self.delivered.append(message.message_id)
        reply = "250 2.0.0 Ok: queued as 4XbScripted" if delivered else ""
        return SendResult(
            message.message_id,
            outcome,
            "" if delivered else "no recipient accepted",
            "",
            None,
            "ref",
            reply,
            tuple(answers),
        )

    @hookimpl
    def reconcile_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
    ) -> list[ReconcileResult]:
        return [
            ReconcileResult(m.message_id, self.reconcile_answers.get(m.message_id), "scripted")
            for m in messages
        ]


def scripted_crm(
    make_crm: Callable[..., Crm],
    config: str = SCRIPTED_CONFIG,
    clock: Callable[[], datetime] | None = None,
) -> tuple[Crm, Scripted]:
    """A Crm whose product lines send through a fresh Scripted transport (``clock``:
    the host's own, e.g. a skewed one)."""
    transport = Scripted()
    crm = make_crm(config, extra_plugins=(("test_transport", transport),), clock=clock)
    return crm, transport


def add_people(crm: Crm, *users: str) -> None:
    """Users (commercial) and one person, per@example.com."""
    with crm.transaction() as session:
        for email in users:
            directory.add_user(session, email, email.split("@")[0].title(), "commercial")
        directory.add_person(session, "per@example.com", "Per Persson", "0701")


def queue_mail(
    crm: Crm, subject: str = "Hello", sender: str = "anna@example.se", **kw: object
) -> int:
    """Queue one valid mail; its outbox id."""
    request = enqueue.MailRequest(
        sender_email=sender,
        to=kw.pop("to", ["per@example.com"]),  # type: ignore[arg-type]
        subject=subject,
        text="Hej!",
        **kw,  # type: ignore[arg-type]
    )
    with crm.transaction() as session:
        return enqueue.enqueue(crm, session, request).outbox_id


def row(crm: Crm, outbox_id: int) -> OutboxMessage:
    """A fresh copy of one outbox row (with its attempt log loaded)."""
    with crm.transaction() as session:
        found = session.get(OutboxMessage, outbox_id)
        assert found is not None
        _ = list(found.attempt_log)
        return found


def states(crm: Crm) -> dict[int, str]:
    """Every row's state by id."""
    with crm.transaction() as session:
        return {
            i: state for i, state in session.execute(select(OutboxMessage.id, OutboxMessage.state))
        }


def time_passes(crm: Crm) -> None:
    """Make every waiting retry due now (instead of sleeping through the back-off)."""
    with crm.transaction() as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.state == OutboxState.RETRY.value)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def enqueued_ago(crm: Crm, outbox_id: int, age: timedelta) -> None:
    """Move a message's enqueue ``age`` further into the past (instead of waiting)."""
    with crm.transaction() as session:
        found = session.get(OutboxMessage, outbox_id)
        assert found is not None
        found.created_at -= age


def leases_expire(crm: Crm) -> None:
    """Make every lease of a ``sending`` row run out now (instead of sleeping through it),
    and with them the mailbox slots held under the same leases (pacing)."""
    past = utcnow() - timedelta(seconds=1)
    with crm.transaction() as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.state == OutboxState.SENDING.value)
            .values(lease_until=past)
        )
        session.execute(update(MailboxSlot).values(lease_until=past))
