"""The worker's short transactions: claim a batch under a lease, renew, record, reap.

Every function here takes a Session and never commits; the worker frames each call in
a transaction of its own and sends between them, outside any transaction.

Fencing: a claim writes a fresh ``lease_token``; every result is written with
``WHERE lease_token = <the claim's token>``, so a worker whose lease was taken over
cannot overwrite a newer claim. The reaper turns an expired ``sending`` row into
``unknown`` but keeps its token: the original worker's late result is then still the
best knowledge and may land, until anyone else (a new claim, an operator) touches it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Table,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, selectinload

from crm_core import signals
from crm_core.config import OutboxConfig
from crm_core.db import rowcount
from crm_core.mail import recipients
from crm_core.mail.addresses import Address
from crm_core.mail.message import Attachment, OutgoingMessage
from crm_core.mail.pauses import lift_changed_pauses, pause_account
from crm_core.mail.policy import (
    DUE_STATES,
    S,
    gave_up,
    lease_until,
    new_token,
    next_attempt_at,
    retry_delay,
    state_after,
)
from crm_core.mail.transport import Outcome, SenderAccount, SendResult
from crm_core.models import (
    AccountPause,
    OutboxAttempt,
    OutboxMessage,
    OutboxState,
    User,
)

if TYPE_CHECKING:
    from crm_core.app import Crm


def outgoing(row: OutboxMessage, handed_over_at: datetime | None = None) -> OutgoingMessage:
    """The row as a transport sees it (same Message-ID and Date on every attempt).

    A later attempt's envelope holds only the recipients still owed the mail (neither
    delivered nor refused); the headers keep every To and Cc.
    """

    def addresses(kind: str) -> tuple[Address, ...]:
        return tuple(Address(email, name) for email, name in row.recipient_list(kind))

    envelope: tuple[Address, ...] = ()
    if row.recipient_states:
        everyone = addresses("to") + addresses("cc") + addresses("bcc")
        owed = set(recipients.pending(row.recipient_states, [a.email for a in everyone]))
        envelope = tuple(a for a in everyone if a.email in owed)
    return OutgoingMessage(
        outbox_id=row.id,
        message_id=row.message_id,
        sender=Address(row.sender_email, row.sender_name),
        to=addresses("to"),
        cc=addresses("cc"),
        bcc=addresses("bcc"),
        reply_to=addresses("reply_to"),
        subject=row.subject,
        text=row.body_text,
        html=row.body_html,
        attachments=tuple(Attachment(a.filename, a.content_type, a.data) for a in row.attachments),
        created_at=row.created_at,
        envelope=envelope,
        handed_over_at=handed_over_at,
    )


@dataclass(frozen=True)
class Claim:
    """One message a worker holds under a lease, with what it needs to send it."""

    outbox_id: int
    token: str
    attempt_id: int
    attempt: int
    message: OutgoingMessage
    account: SenderAccount
    ledger: dict[str, Any] | None = None
    """The recipients' fates before this attempt (None: no per-recipient answer yet)."""


@dataclass(frozen=True)
class ClaimResult:
    """A claimed batch, plus how many accounts were paused instead of claimed."""

    claims: list[Claim]
    paused_accounts: int = 0
    resumed_accounts: int = 0


def claim_batch(crm: Crm, session: Session, worker: str, limit: int, now: datetime) -> ClaimResult:
    """Claim up to ``limit`` due messages of unpaused accounts under one lease.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets many workers claim disjoint rows.
    SQLite: the transaction began with ``BEGIN IMMEDIATE``, so this worker is the only
    writer until commit. An account whose settings stop it from sending is paused here
    (nothing attempted, nothing spent from the budget) and its rows stay queued.
    """
    resumed = lift_changed_pauses(session)
    paused = 0
    for _round in range(3):  # pausing frees the slots for other accounts' mail
        rows = _select_due(session, limit, now)
        if not rows:
            return ClaimResult([], paused, resumed)
        accounts, blocked = _accounts_for(crm, session, rows, now)
        paused += blocked
        rows = [r for r in rows if r.user_id in accounts]
        if rows:
            return ClaimResult(
                _claim_rows(crm, session, worker, rows, accounts, now), paused, resumed
            )
    return ClaimResult([], paused, resumed)


def _select_due(session: Session, limit: int, now: datetime) -> list[OutboxMessage]:
    paused_users = select(AccountPause.user_id)
    due_ids = (
        select(OutboxMessage.id)
        .where(
            OutboxMessage.state.in_(DUE_STATES),
            OutboxMessage.next_attempt_at <= now,
            OutboxMessage.user_id.not_in(paused_users),
        )
        .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=OutboxMessage)
    )
    ids = list(session.scalars(due_ids))
    if not ids:
        return []
    rows = session.scalars(
        select(OutboxMessage)
        .where(OutboxMessage.id.in_(ids))
        .options(selectinload(OutboxMessage.attachments))
        .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
    )
    return list(rows)


def _accounts_for(
    crm: Crm, session: Session, rows: Sequence[OutboxMessage], now: datetime
) -> tuple[dict[int, SenderAccount], int]:
    """Sender accounts that may send now; the others are paused with the reason."""
    accounts: dict[int, SenderAccount] = {}
    paused = 0
    for user_id in dict.fromkeys(r.user_id for r in rows):
        user = session.get(User, user_id)
        assert user is not None  # a foreign key guarantees it
        account, problems = crm.sender_state(session, user)
        if account is None:
            account = SenderAccount(user.id, user.email, user.name, user.product_line, "?")
        if problems:
            reason = "; ".join(str(p) for p in problems)
            paused += pause_account(session, account, reason, "settings", now)
            continue
        accounts[user_id] = account
    return accounts, paused


def _claim_rows(
    crm: Crm,
    session: Session,
    worker: str,
    rows: Sequence[OutboxMessage],
    accounts: Mapping[int, SenderAccount],
    now: datetime,
) -> list[Claim]:
    token = new_token()
    until = lease_until(now, crm.config.outbox.lease_seconds)
    numbers = _attempt_counts(session, [r.id for r in rows])
    attempts: list[tuple[OutboxMessage, OutboxAttempt]] = []
    for row in rows:
        account = accounts[row.user_id]
        row.state = S.SENDING.value
        row.attempts += 1
        row.lease_owner = worker
        row.lease_token = token
        row.lease_until = until
        row.transport = account.transport
        row.updated_at = now
        attempt = OutboxAttempt(
            outbox_id=row.id,
            number=numbers.get(row.id, 0) + 1,
            worker=worker,
            transport=account.transport,
            started_at=now,
        )
        session.add(attempt)
        attempts.append((row, attempt))
    session.flush()
    return [
        Claim(
            row.id,
            token,
            attempt.id,
            row.attempts,
            outgoing(row, now),
            accounts[row.user_id],
            row.recipient_states,
        )
        for row, attempt in attempts
    ]


def _attempt_counts(session: Session, ids: Sequence[int]) -> dict[int, int]:
    counts = session.execute(
        select(OutboxAttempt.outbox_id, func.count())
        .where(OutboxAttempt.outbox_id.in_(ids))
        .group_by(OutboxAttempt.outbox_id)
    )
    return {int(outbox_id): int(count) for outbox_id, count in counts}


def renew_leases(session: Session, tokens: Iterable[str], until: datetime) -> int:
    """Extend the leases a live worker still holds (it is slow, not dead)."""
    wanted = list(set(tokens))
    if not wanted:
        return 0
    result = session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.lease_token.in_(wanted), OutboxMessage.state == S.SENDING.value)
        .values(lease_until=until),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result)


LEASE_EXPIRED_REASON = (
    "The worker sending this mail stopped before it could record the result (its lease "
    "expired), so it may or may not have been sent. It is not sent again by itself: "
    "check with `crm outbox reconcile`, or decide with `crm outbox resolve ID --sent` "
    "or `--not-sent`."
)


NEVER_STARTED_REASON = "Queued again: the worker stopped before handing it over."


def reap_expired(
    session: Session,
    now: datetime,
    in_flight: Mapping[str, int] | Callable[[str, int], int] | None = None,
) -> list[int]:
    """Settle ``sending`` rows whose lease expired: the worker holding them is gone.

    Of each account's unreported rows under one lease, in the order they were handed
    to the transport, the first ``in_flight[transport]`` may have gone and become
    ``unknown`` (never resent silently); the rest were never handed over and are
    queued again without spending a try. A transport with no window (0) counts all
    of them as possibly gone. ``in_flight`` may instead be a function of (transport,
    user id), for windows that depend on the account (``Crm.in_flight_window``).
    """
    rows = list(
        session.execute(
            select(
                OutboxMessage.id,
                OutboxMessage.lease_token,
                OutboxMessage.user_id,
                OutboxMessage.transport,
            )
            .where(OutboxMessage.state == S.SENDING.value, OutboxMessage.lease_until < now)
            .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
            .with_for_update(skip_locked=True, of=OutboxMessage)
        )
    )
    if not rows:
        return []
    window_of = _window_lookup(in_flight)
    seen: dict[tuple[str | None, int], int] = {}
    gone: list[int] = []
    unstarted: list[int] = []
    for row_id, token, user_id, transport in rows:
        place = seen.get((token, user_id), 0)
        seen[(token, user_id)] = place + 1
        window = window_of(transport, user_id)
        (gone if not window or place < window else unstarted).append(row_id)
    _requeue_unstarted(session, unstarted, now)
    return _mark_unknown(session, gone, now)


def _window_lookup(
    in_flight: Mapping[str, int] | Callable[[str, int], int] | None,
) -> Callable[[str, int], int]:
    """(transport, user id) -> window, asked once per account."""
    if in_flight is None or isinstance(in_flight, Mapping):
        windows = in_flight or {}
        return lambda transport, _user: windows.get(transport, 0)
    known: dict[tuple[str, int], int] = {}

    def window(transport: str, user_id: int) -> int:
        if (transport, user_id) not in known:
            known[(transport, user_id)] = in_flight(transport, user_id)
        return known[(transport, user_id)]

    return window


def _requeue_unstarted(session: Session, ids: Sequence[int], now: datetime) -> None:
    """Rows a dead worker claimed but never handed over: queued again, no try spent."""
    if not ids:
        return
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(ids), OutboxMessage.state == S.SENDING.value)
        .values(
            state=S.QUEUED.value,
            attempts=OutboxMessage.attempts - 1,
            lease_owner=None,
            lease_token=None,
            lease_until=None,
            last_error=NEVER_STARTED_REASON,
            updated_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    session.execute(
        delete(OutboxAttempt).where(
            OutboxAttempt.outbox_id.in_(ids), OutboxAttempt.finished_at.is_(None)
        ),
        execution_options={"synchronize_session": False},
    )


def _mark_unknown(session: Session, ids: Sequence[int], now: datetime) -> list[int]:
    """Rows a dead worker may have sent: ``unknown``, with why, never resent by itself."""
    if not ids:
        return []
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(ids), OutboxMessage.state == S.SENDING.value)
        .values(
            state=S.UNKNOWN.value,
            last_outcome=Outcome.AMBIGUOUS.value,
            last_error=LEASE_EXPIRED_REASON,
            last_code="lease-expired",
            updated_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    session.execute(
        update(OutboxAttempt)
        .where(OutboxAttempt.outbox_id.in_(ids), OutboxAttempt.finished_at.is_(None))
        .values(outcome="lease-expired", finished_at=now, error=LEASE_EXPIRED_REASON),
        execution_options={"synchronize_session": False},
    )
    for row in session.execute(
        select(
            OutboxMessage.id,
            OutboxMessage.message_id,
            OutboxMessage.user_id,
            OutboxMessage.attempts,
        ).where(OutboxMessage.id.in_(ids))
    ):
        signals.emit_after_commit(
            session,
            "mail-unknown",
            outbox_id=row.id,
            message_id=row.message_id,
            user_id=row.user_id,
            attempt=row.attempts,
            outcome=None,
            reason=LEASE_EXPIRED_REASON,
            code="lease-expired",
        )
    return list(ids)


@dataclass
class Recorded:
    """How many results of a batch moved each message to which state."""

    counts: dict[str, int] = field(default_factory=dict)
    paused_accounts: int = 0
    stale: int = 0

    def add(self, state: str) -> None:
        """Count one message that moved to ``state``."""
        self.counts[state] = self.counts.get(state, 0) + 1

    def merge(self, other: Recorded) -> None:
        """Add another recording's counts (results recorded as they came)."""
        for state, n in other.counts.items():
            self.counts[state] = self.counts.get(state, 0) + n
        self.paused_accounts += other.paused_accounts
        self.stale += other.stale


def record_results(
    crm: Crm,
    session: Session,
    claims: Sequence[Claim],
    results: Sequence[SendResult],
    now: datetime,
    jitter: Callable[[], float] = random.random,
) -> Recorded:
    """Write each result, fenced on the claim's lease token, and log the attempt.

    Why in bulk: one statement per message was most of the worker's database time
    (the benchmark's profile). The rows still under this claim's lease are locked
    first, then all of them are written with one executemany per shape of values.
    """
    by_id = {r.message_id: r for r in results}
    recorded = Recorded()
    planned = []
    for claim in claims:
        result = by_id[claim.message.message_id]
        ledger = _ledger_after(claim, result, now)
        state = _state(crm.config.outbox, claim, result, ledger, now)
        values = _result_values(crm.config.outbox, claim, result, state, now, jitter())
        if ledger is not None:
            values["recipient_states"] = ledger
            values["last_error"] = _with_tally(values["last_error"], claim, ledger, state)
        planned.append((claim, result, state, values))
    applied = _fenced_updates(session, [(claim, values) for claim, _, _, values in planned])
    _finish_attempts(
        session,
        [(claim, result, claim.outbox_id in applied) for claim, result, _, _ in planned],
        now,
    )
    for claim, result, state, values in planned:
        if claim.outbox_id not in applied:
            recorded.stale += 1
            continue
        recorded.add(state.value)
        if result.outcome is Outcome.CONFIGURATION:
            recorded.paused_accounts += pause_account(
                session, claim.account, result.detail, result.code, now
            )
        _emit_result(session, claim, result, state, values)
    return recorded


def _ledger_after(claim: Claim, result: SendResult, now: datetime) -> dict[str, Any] | None:
    """The recipients' fates after this attempt, when they differ or differed before.

    None (the common case) when every recipient shares the message's outcome and
    always did: the message's state then says it for each of them.
    """
    if claim.ledger is None and not result.recipients:
        return None
    envelope = [a.email for a in claim.message.recipients]
    return recipients.merge(claim.ledger, envelope, result, now)


def _age(claim: Claim, now: datetime) -> timedelta:
    """How long ago the claimed message was enqueued (both on the database's clock)."""
    return now - claim.message.created_at


def _everyone(message: OutgoingMessage) -> list[str]:
    return [a.email for a in (*message.to, *message.cc, *message.bcc)]


def _state(
    config: OutboxConfig,
    claim: Claim,
    result: SendResult,
    ledger: dict[str, Any] | None,
    now: datetime,
) -> OutboxState:
    """The message's state: from its outcome, or from every recipient's fate.

    With per-recipient fates, the message is sent when every recipient has it,
    failed when none will, partial when some do and the rest are refused (or given
    up on), and otherwise waits to try the deferred ones again.
    """
    age = _age(claim, now)
    by_outcome = state_after(result.outcome, claim.attempt, config, age)
    if ledger is None or result.outcome in (Outcome.AMBIGUOUS, Outcome.CONFIGURATION):
        return by_outcome
    count = recipients.tally(ledger, _everyone(claim.message))
    if count.waiting:
        again = state_after(Outcome.TEMPORARY, claim.attempt, config, age)
        if again is S.RETRY:
            return S.RETRY
    if not count.delivered:
        return S.FAILED
    return S.SENT if len(count.delivered) == count.total else S.PARTIAL


def _with_tally(
    reason: str | None, claim: Claim, ledger: dict[str, Any], state: OutboxState
) -> str | None:
    """The reason, with who has the mail and who does not when that is mixed."""
    count = recipients.tally(ledger, _everyone(claim.message))
    if state is S.SENT or not (count.delivered or count.refused):
        return reason
    if state is S.PARTIAL:
        return f"Partly sent: {count.summary()}."
    return f"{count.summary()}. {reason or ''}".strip()


def _result_values(
    config: OutboxConfig,
    claim: Claim,
    result: SendResult,
    state: OutboxState,
    now: datetime,
    jitter: float,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "state": state.value,
        "last_outcome": result.outcome.value,
        "last_code": result.code or None,
        "last_error": explain(result, state, claim.attempt, _age(claim, now), config),
        "lease_until": None,
        "updated_at": now,
    }
    if state is not S.UNKNOWN:
        values["lease_owner"] = None
        values["lease_token"] = None
    if result.reply:
        values["server_reply"] = result.reply
    if state in (S.SENT, S.PARTIAL):
        values.update(sent_at=now, provider_ref=result.provider_ref or None, last_error=None)
    elif state is S.RETRY:
        delay = retry_delay(claim.attempt, config, result.retry_after, jitter)
        values["next_attempt_at"] = next_attempt_at(now, claim.message.created_at, delay, config)
    elif state is S.QUEUED:  # configuration: the account is paused, the try is not spent
        values.update(attempts=claim.attempt - 1, next_attempt_at=now)
    return values


def explain(
    result: SendResult,
    state: OutboxState,
    attempt: int,
    age: timedelta = timedelta(0),
    config: OutboxConfig | None = None,
) -> str:
    """The reason kept on the row, in words the sender understands.

    ``age`` is how long ago the mail was enqueued: a mail given up on says how long it
    was tried, against ``config``'s budget.
    """
    detail = result.detail or "no detail given by the transport"
    if state is S.FAILED:
        last = _last_answer(result)
        if result.outcome is Outcome.TEMPORARY:
            tried = gave_up(attempt, age, config or OutboxConfig())
            return f"{tried}. The last attempt failed with: {last}"
        return f"The mail cannot be sent as it is: {last}"
    if state is S.RETRY:
        return f"Attempt {attempt} failed for now and will be retried: {detail}"
    if state is S.UNKNOWN:
        return (
            f"The mail may or may not have been sent ({detail}). It is not sent again "
            "by itself: check with `crm outbox reconcile` or decide with "
            "`crm outbox resolve ID --sent|--not-sent`."
        )
    if state is S.QUEUED:
        return f"The sender's account is paused until its settings are fixed: {detail}"
    return detail


_RETRY_PROMISE = re.compile(
    r"[,;]?\s*(?:\bNothing;\s*)?\b(?:[\w'-]+\s+){0,3}?(?:will be|is|are)\s+"
    r"(?:tried again|retried)\b[^.;]*[.;]?",
    re.IGNORECASE,
)
"""A transport's "; it will be tried again later" (its words for a temporary failure)."""
_EMPTY_ADVICE = re.compile(r"\s*What to do:\s*$")


def _last_answer(result: SendResult) -> str:
    """What a failed mail's reason quotes: the transport's words without any promise
    of another try (written for a mail that was to be retried, untrue on a failed
    one), and the server's own answer when the transport kept it apart."""
    said = result.detail or "no detail given by the transport"
    kept = _EMPTY_ADVICE.sub("", _RETRY_PROMISE.sub("", said)).strip()
    if kept != said:
        kept = kept or "no other detail given by the transport"
        said = kept if kept.endswith((".", "!", "?")) else f"{kept}."
    if result.reply and result.reply not in said:
        said = f"{said} The server's last answer: {result.reply}"
    return said


def _fenced_update(session: Session, claim: Claim, values: Mapping[str, Any]) -> bool:
    result = session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id == claim.outbox_id,
            OutboxMessage.lease_token == claim.token,
            OutboxMessage.state.in_((S.SENDING.value, S.UNKNOWN.value)),
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result) == 1


def _fenced_updates(
    session: Session, planned: Sequence[tuple[Claim, Mapping[str, Any]]]
) -> set[int]:
    """Apply each claim's values if the row still holds its lease; the ids applied.

    The rows that qualify are selected ``FOR UPDATE`` (on SQLite the transaction is
    already the only writer), so the writes below cannot miss or hit any other row.
    """
    if not planned:
        return set()
    token_of = {claim.outbox_id: claim.token for claim, _ in planned}
    held = session.execute(
        select(OutboxMessage.id, OutboxMessage.lease_token)
        .where(
            OutboxMessage.id.in_(list(token_of)),
            OutboxMessage.state.in_((S.SENDING.value, S.UNKNOWN.value)),
        )
        .with_for_update(of=OutboxMessage)
    )
    applied = {int(row_id) for row_id, token in held if token_of[int(row_id)] == token}
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for claim, values in planned:
        if claim.outbox_id in applied:
            params = {"b_id": claim.outbox_id, "b_token": claim.token}
            params.update({f"v_{key}": value for key, value in values.items()})
            shapes.setdefault(tuple(sorted(values)), []).append(params)
    table = cast(Table, OutboxMessage.__table__)
    for keys, rows in shapes.items():
        session.execute(
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                table.c.lease_token == bindparam("b_token"),
                # not IN (...): an expanding parameter cannot be used with executemany
                or_(table.c.state == S.SENDING.value, table.c.state == S.UNKNOWN.value),
            )
            .values({key: bindparam(f"v_{key}") for key in keys}),
            rows,
        )
    return applied


def _finish_attempts(
    session: Session, finished: Sequence[tuple[Claim, SendResult, bool]], now: datetime
) -> None:
    """Close each claim's attempt log entry (one executemany for the batch)."""
    rows = []
    for claim, result, applied in finished:
        error = result.detail or None
        if not applied:
            error = f"(result arrived after the lease was taken over; not applied) {error or ''}"
        rows.append(
            {
                "b_id": claim.attempt_id,
                "v_finished_at": now,
                "v_outcome": result.outcome.value,
                "v_error": error,
                "v_code": result.code or None,
            }
        )
    if not rows:
        return
    table = cast(Table, OutboxAttempt.__table__)
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            finished_at=bindparam("v_finished_at"),
            outcome=bindparam("v_outcome"),
            error=bindparam("v_error"),
            code=bindparam("v_code"),
        ),
        rows,
    )


_SIGNAL_FOR = {
    S.SENT: "mail-sent",
    S.PARTIAL: "mail-partly-sent",
    S.RETRY: "mail-retry-scheduled",
    S.FAILED: "mail-failed",
    S.UNKNOWN: "mail-unknown",
}


def _emit_result(
    session: Session,
    claim: Claim,
    result: SendResult,
    state: OutboxState,
    values: Mapping[str, Any],
) -> None:
    name = _SIGNAL_FOR.get(state)
    if name is None:
        return
    extra = {"next_attempt_at": values["next_attempt_at"]} if state is S.RETRY else {}
    signals.emit_after_commit(
        session,
        name,
        outbox_id=claim.outbox_id,
        message_id=claim.message.message_id,
        user_id=claim.account.user_id,
        attempt=claim.attempt,
        outcome=result.outcome.value,
        reason=values.get("last_error"),
        code=result.code,
        **extra,
    )


def release(session: Session, claims: Sequence[Claim], now: datetime) -> int:
    """Give back claims a stopping worker never started: queued again, no try spent."""
    released = 0
    for claim in claims:
        values = {
            "state": S.QUEUED.value,
            "attempts": claim.attempt - 1,
            "lease_owner": None,
            "lease_token": None,
            "lease_until": None,
            "updated_at": now,
        }
        if _fenced_update(session, claim, values):
            session.execute(delete(OutboxAttempt).where(OutboxAttempt.id == claim.attempt_id))
            released += 1
    return released
