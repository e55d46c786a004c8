"""What operators do with the outbox: list, show, retry, cancel, resolve.

Every function here takes a Session and never commits (the CLI and the web app frame
the unit of work).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crm_core import signals
from crm_core.errors import NotFoundError, Problem, ValidationError
from crm_core.mail import recipients
from crm_core.mail.policy import DUE_STATES, S, db_now
from crm_core.models import AccountPause, OutboxMessage, Person, PersonActivity

if TYPE_CHECKING:
    from crm_core.app import Crm


@dataclass(frozen=True)
class MessageView:
    """One outbox row as operators see it (no bodies, no attachment data)."""

    id: int
    message_id: str
    state: str
    sender: str
    to: tuple[str, ...]
    subject: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    sent_at: datetime | None
    last_outcome: str | None
    last_error: str | None
    last_code: str | None
    transport: str
    paused: str | None
    recipients_summary: str | None = None
    """``sent to 3 of 5; refused: …`` when the recipients fared differently."""
    paced: str | None = None
    """Why the sender's mailbox waits (``paced: 30 a minute for anna@…; next at …``, or
    the server's pause), while the mail waits."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = dict(self.__dict__)
        data["to"] = list(self.to)
        return data


@dataclass(frozen=True)
class AttemptView:
    """One recorded attempt."""

    number: int
    worker: str
    transport: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    error: str | None
    code: str | None


@dataclass(frozen=True)
class MessageDetail:
    """Everything about one outbox message, for ``crm outbox show``."""

    view: MessageView
    recipients: dict[str, list[str]]
    attachments: tuple[tuple[str, str, int], ...]
    person: str | None
    lease_owner: str | None
    lease_until: datetime | None
    provider_ref: str | None
    attempts: tuple[AttemptView, ...]
    server_reply: str | None = None
    recipient_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every envelope recipient's fate: state (delivered, deferred, refused, unknown,
    waiting, cancelled), the server's words and when."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **self.view.as_dict(),
            "recipients": self.recipients,
            "recipient_states": self.recipient_states,
            "server_reply": self.server_reply,
            "attachments": [
                {"filename": f, "content_type": t, "bytes": n} for f, t, n in self.attachments
            ],
            "person": self.person,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
            "provider_ref": self.provider_ref,
            "attempt_log": [a.__dict__ for a in self.attempts],
        }


def _waits(crm: Crm | None, session: Session, rows: list[OutboxMessage]) -> Mapping[int, str]:
    """Why each waiting row's mailbox waits (nothing without a Crm to name mailboxes)."""
    waiting = [r.user_id for r in rows if r.state in DUE_STATES]
    if crm is None or not waiting:
        return {}
    from crm_core.mail import pacing

    return pacing.waiting_senders(crm, session, waiting, db_now(session))


def list_messages(
    session: Session,
    state: str | None = None,
    limit: int = 200,
    crm: Crm | None = None,
    *,
    user_id: int | None = None,
    offset: int = 0,
) -> list[MessageView]:
    """Outbox rows, newest first, optionally of one state or one sender user (with
    ``crm``: and why a waiting one's mailbox waits).

    ``user_id`` is how the web app shows a user only their own mail; ``offset`` pages.
    """
    if state is not None and state not in {s.value for s in S}:
        raise ValidationError(
            "Unknown state",
            [Problem("status", f"{state!r}; use one of {', '.join(s.value for s in S)}")],
        )
    query = select(OutboxMessage).order_by(OutboxMessage.id.desc()).limit(limit).offset(offset)
    if state is not None:
        query = query.where(OutboxMessage.state == state)
    if user_id is not None:
        query = query.where(OutboxMessage.user_id == user_id)
    rows = list(session.scalars(query))
    paused = {p.user_id: p.reason for p in session.scalars(select(AccountPause))}
    waits = _waits(crm, session, rows)
    return [_view(row, paused.get(row.user_id), waits.get(row.user_id)) for row in rows]


def _view(row: OutboxMessage, pause_reason: str | None, paced: str | None = None) -> MessageView:
    waiting = row.state in DUE_STATES
    return MessageView(
        id=row.id,
        message_id=row.message_id,
        state=row.state,
        sender=row.sender_email,
        to=tuple(e for e, _ in row.recipient_list("to")),
        subject=row.subject,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        sent_at=row.sent_at,
        last_outcome=row.last_outcome,
        last_error=row.last_error,
        last_code=row.last_code,
        transport=row.transport,
        paused=pause_reason if waiting else None,
        recipients_summary=_summary(row),
        paced=paced if waiting else None,
    )


def _everyone(row: OutboxMessage) -> list[str]:
    return [e for kind in ("to", "cc", "bcc") for e, _ in row.recipient_list(kind)]


def _summary(row: OutboxMessage) -> str | None:
    """Who has the mail and who not, when the recipients fared differently."""
    if not row.recipient_states:
        return None
    return recipients.tally(row.recipient_states, _everyone(row)).summary()


_SHARED_FATE = {
    S.SENT.value: recipients.DELIVERED,
    S.FAILED.value: recipients.REFUSED,
    S.UNKNOWN.value: recipients.UNKNOWN,
    S.CANCELLED.value: "cancelled",
}


def recipient_states(row: OutboxMessage) -> dict[str, dict[str, Any]]:
    """Each envelope recipient's fate; without a ledger, the message's own fate (for a
    sent message, with the server's reply and the time it was sent)."""
    ledger = row.recipient_states or {}
    shared: dict[str, Any] = {
        "state": _SHARED_FATE.get(row.state, "waiting"),
        "reply": "",
        "at": None,
    }
    if row.state == S.SENT.value and row.sent_at is not None:
        shared.update(reply=row.server_reply or "", at=row.sent_at.isoformat())
    return {address: dict(ledger.get(address) or shared) for address in _everyone(row)}


def count_messages(
    session: Session, state: str | None = None, *, user_id: int | None = None
) -> int:
    """How many outbox rows there are (of one state, of one user), for "200 of 202"."""
    query = select(func.count()).select_from(OutboxMessage)
    if state is not None:
        query = query.where(OutboxMessage.state == state)
    if user_id is not None:
        query = query.where(OutboxMessage.user_id == user_id)
    return int(session.scalar(query) or 0)


def count_waiting(session: Session) -> int:
    """How many messages are still to be sent (queued, retry or being sent)."""
    waiting = (*DUE_STATES, S.SENDING.value)
    query = select(func.count()).select_from(OutboxMessage).where(OutboxMessage.state.in_(waiting))
    return int(session.scalar(query) or 0)


def get_message(session: Session, outbox_id: int, lock: bool = False) -> OutboxMessage:
    """The outbox row, or NotFoundError.

    ``lock`` reads it afresh under a row lock, held until the caller's transaction
    ends: an operator's retry, cancel or resolve then decides on the row as it is,
    and no worker can claim it or record a result in between (on PostgreSQL a claim
    skips a locked row; a late result waits and then finds the new state).
    """
    row = session.get(
        OutboxMessage, outbox_id, with_for_update=lock or None, populate_existing=lock
    )
    if row is None:
        raise NotFoundError(f"no outbox message #{outbox_id}; see `crm outbox list`")
    return row


def show_message(session: Session, outbox_id: int, crm: Crm | None = None) -> MessageDetail:
    """One message with its recipients, attachments and attempt log (with ``crm``: and
    why its mailbox waits)."""
    row = get_message(session, outbox_id)
    pause = session.get(AccountPause, row.user_id)
    paced = _waits(crm, session, [row]).get(row.user_id)
    person = session.get(Person, row.person_id) if row.person_id else None
    return MessageDetail(
        view=_view(row, pause.reason if pause else None, paced),
        recipients={
            k: [e for e, _ in row.recipient_list(k)] for k in ("to", "cc", "bcc", "reply_to")
        },
        attachments=tuple((a.filename, a.content_type, len(a.data)) for a in row.attachments),
        person=person.email if person else None,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
        provider_ref=row.provider_ref,
        server_reply=row.server_reply,
        recipient_states=recipient_states(row),
        attempts=tuple(
            AttemptView(
                a.number,
                a.worker,
                a.transport,
                a.started_at,
                a.finished_at,
                a.outcome,
                a.error,
                a.code,
            )
            for a in row.attempt_log
        ),
    )


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a person's history; a mail's carries its outbox state."""

    at: datetime
    kind: str
    summary: str
    outbox_id: int | None
    state: str | None
    recipients: str | None = None
    """``sent to 3 of 5; refused: …`` when the recipients fared differently."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def person_history(
    session: Session, person: Person, limit: int = 50
) -> tuple[list[HistoryEntry], int]:
    """A person's newest activities (up to ``limit``) and how many there are in all."""
    where = PersonActivity.person_id == person.id
    total = session.scalar(select(func.count()).select_from(PersonActivity).where(where))
    rows = session.execute(
        select(PersonActivity, OutboxMessage)
        .outerjoin(OutboxMessage, OutboxMessage.id == PersonActivity.outbox_id)
        .where(where)
        .order_by(PersonActivity.created_at.desc(), PersonActivity.id.desc())
        .limit(limit)
    )
    entries = [
        HistoryEntry(
            a.created_at,
            a.kind,
            a.summary,
            a.outbox_id,
            mail.state if mail else None,
            _summary(mail) if mail else None,
        )
        for a, mail in rows
    ]
    return entries, int(total or 0)


def refusal(row: OutboxMessage, action: str, hint: str) -> ValidationError:
    """The error for an action the message's state does not allow, with what to do."""
    return ValidationError(
        f"Cannot {action} outbox message #{row.id}",
        [Problem(f"state {row.state}", hint)],
    )


def retry(session: Session, outbox_id: int, now: datetime | None = None) -> OutboxMessage:
    """Queue a failed, cancelled or waiting message again, due now.

    A partly sent message is queued again for the recipients who do not have it.
    Attempts are counted from 0 again; the lifetime (``[outbox] give_up_after``) still
    runs from the enqueue, so a mail past it gets one more try.
    """
    now = now or db_now(session)
    row = get_message(session, outbox_id, lock=True)
    if row.state == S.UNKNOWN.value:
        raise refusal(
            row,
            "retry",
            "it may already have been sent; check with `crm outbox reconcile`, or decide "
            "with `crm outbox resolve ID --not-sent` (queues it again) or `--sent`",
        )
    if row.state in (S.SENDING.value, S.SENT.value):
        raise refusal(row, "retry", "it is being sent or was sent")
    if row.state == S.PARTIAL.value and row.recipient_states:
        row.recipient_states = _forget_refusals(row.recipient_states)
    _requeue(row, now, reset_budget=row.state != S.QUEUED.value)
    return row


def _forget_refusals(ledger: dict[str, Any]) -> dict[str, Any]:
    """The ledger with refused recipients owed the mail again (an operator retries)."""
    return {a: e for a, e in ledger.items() if e.get("state") == recipients.DELIVERED}


def cancel(session: Session, outbox_id: int, now: datetime | None = None) -> OutboxMessage:
    """Cancel a message that has not been sent (queued, retry or unknown)."""
    now = now or db_now(session)
    row = get_message(session, outbox_id, lock=True)
    if row.state not in (*DUE_STATES, S.UNKNOWN.value):
        hint = (
            "a worker is sending it right now; look again in a moment"
            if row.state == S.SENDING.value
            else "it is already final"
        )
        raise refusal(row, "cancel", hint)
    row.state = S.CANCELLED.value
    row.lease_owner = row.lease_token = None
    row.lease_until = None
    row.updated_at = now
    signals.emit_after_commit(
        session, "mail-cancelled", outbox_id=row.id, message_id=row.message_id, user_id=row.user_id
    )
    return row


def resolve(
    session: Session, outbox_id: int, sent: bool, now: datetime | None = None, why: str = ""
) -> OutboxMessage:
    """An operator's decision on an ``unknown`` message: sent, or not sent (requeued)."""
    now = now or db_now(session)
    row = get_message(session, outbox_id, lock=True)
    if row.state != S.UNKNOWN.value:
        raise refusal(row, "resolve", "only messages in state unknown need a decision")
    apply_resolution(session, row, sent, why or "decided by an operator", now)
    return row


def unknown_since(
    session: Session, since: datetime | None, lock: bool = False
) -> list[OutboxMessage]:
    """Messages in state ``unknown`` that became so at or after ``since`` (oldest first).

    ``lock`` holds them under row locks until the caller's transaction ends, so a bulk
    decision applies to exactly the messages it was shown.
    """
    query = select(OutboxMessage).where(OutboxMessage.state == S.UNKNOWN.value)
    if since is not None:
        query = query.where(OutboxMessage.updated_at >= since)
    query = query.order_by(OutboxMessage.updated_at, OutboxMessage.id)
    if lock:
        query = query.with_for_update(of=OutboxMessage).execution_options(populate_existing=True)
    return list(session.scalars(query))


def resolve_unknown(
    session: Session, since: datetime | None, sent: bool, now: datetime | None = None
) -> list[OutboxMessage]:
    """An operator's decision on every ``unknown`` message since ``since`` at once.

    Why: SMTP cannot look anywhere to settle a lost answer, so after an outage an
    operator who has checked with the recipients' side settles them together.
    """
    now = now or db_now(session)
    rows = unknown_since(session, since, lock=True)
    for row in rows:
        apply_resolution(session, row, sent, "decided by an operator, with others", now)
    return rows


def apply_resolution(
    session: Session, row: OutboxMessage, sent: bool, why: str, now: datetime
) -> None:
    """Settle an ``unknown`` message: sent (final), or not sent (queued again)."""
    if sent:
        row.state = S.SENT.value
        row.sent_at = now
        row.last_error = f"Confirmed sent ({why})."
        if row.recipient_states:
            row.recipient_states = _all_delivered(row, why, now)
        row.lease_owner = row.lease_token = None
        row.lease_until = None
        row.updated_at = now
        signals.emit_after_commit(
            session,
            "mail-sent",
            outbox_id=row.id,
            message_id=row.message_id,
            user_id=row.user_id,
            attempt=None,
            outcome=None,
            reason=row.last_error,
            code="",
        )
        return
    _requeue(row, now, reset_budget=False)
    row.last_error = f"Not sent ({why}); queued again."


def _all_delivered(row: OutboxMessage, why: str, now: datetime) -> dict[str, Any]:
    """The ledger once an unknown attempt is settled as sent: its recipients have it."""
    ledger = dict(row.recipient_states or {})
    for address in recipients.pending(ledger, _everyone(row)):
        ledger[address] = {"state": recipients.DELIVERED, "reply": why, "at": now.isoformat()}
    return ledger


def _requeue(row: OutboxMessage, now: datetime, reset_budget: bool) -> None:
    row.state = S.QUEUED.value
    row.next_attempt_at = now
    row.lease_owner = row.lease_token = None
    row.lease_until = None
    row.updated_at = now
    if reset_budget:
        row.attempts = 0
