"""The durable outbox: every mail is a row before it is a network send.

Why a table and not a queue in memory: the mail must survive a crash and must not go
twice by our doing (transactional-outbox pattern). :func:`enqueue` writes the row in the
caller's transaction, so the CRM change and the mail commit together or not at all.
Workers (:mod:`crm_core.mail.worker`) then move each row through these states::

    queued ──claim──> sending ──sent──────────────> sent
      ^                  │ ├──temporary──> retry ──(due)──> sending
      │                  │ ├──permanent / budget spent──> failed
      │                  │ ├──ambiguous / lease expired / plugin bug──> unknown
      └──configuration───┘ └ (account paused; not an attempt against the budget)
    unknown ──reconcile / resolve --sent──> sent
    unknown ──reconcile / resolve --not-sent──> queued
    queued | retry | unknown ──cancel──> cancelled
    failed | cancelled | retry ──retry──> queued (fresh budget)

Every function here takes a Session and never commits (the caller frames the unit of
work), except :func:`reconcile`, which must ask a transport between two transactions.

Fencing: a claim writes a fresh ``lease_token``; every result is written with
``WHERE lease_token = <the claim's token>``, so a worker whose lease was taken over
cannot overwrite a newer claim. The reaper turns an expired ``sending`` row into
``unknown`` but keeps its token: the original worker's late result is then still the
best knowledge and may land, until anyone else (a new claim, an operator) touches it.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    CursorResult,
    Table,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from crm_core import signals
from crm_core.config import OutboxConfig
from crm_core.errors import CrmError, MailValidationError, NotFoundError, Problem, ValidationError
from crm_core.mail.addresses import Address, explain_address, header_problem, validate_addresses
from crm_core.mail.message import Attachment, OutgoingMessage, make_message_id
from crm_core.mail.transport import Outcome, SenderAccount, SendResult
from crm_core.models import (
    AccountPause,
    OutboxAttachment,
    OutboxAttempt,
    OutboxMessage,
    OutboxState,
    Person,
    PersonActivity,
    SystemSetting,
    User,
    UserSetting,
    utcnow,
)

if TYPE_CHECKING:
    from crm_core.app import Crm

S = OutboxState
DUE_STATES = (S.QUEUED.value, S.RETRY.value)
FINAL_STATES = (S.SENT.value, S.FAILED.value, S.CANCELLED.value)


# --- pure policy: back-off, budget, leases ------------------------------------------


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


def state_after(outcome: Outcome, attempts: int, max_attempts: int) -> OutboxState:
    """The state a message moves to after one attempt ended with ``outcome``."""
    if outcome is Outcome.SENT:
        return S.SENT
    if outcome is Outcome.PERMANENT:
        return S.FAILED
    if outcome is Outcome.AMBIGUOUS:
        return S.UNKNOWN
    if outcome is Outcome.CONFIGURATION:
        return S.QUEUED  # waits for the paused account; not an attempt
    return S.FAILED if attempts >= max_attempts else S.RETRY


def lease_until(now: datetime, lease_seconds: float) -> datetime:
    """When a claim made ``now`` expires."""
    return now + timedelta(seconds=lease_seconds)


def lease_expired(until: datetime | None, now: datetime) -> bool:
    """True when a lease has run out (a lease without an end has run out)."""
    return until is None or until <= now


def db_now(session: Session) -> datetime:
    """Now by the database's clock on PostgreSQL, else by this machine's.

    Why: leases, back-off and due times are compared by workers on many machines; one
    clock (the database server's) makes a skewed worker clock harmless. SQLite is
    single-machine, so the local clock is that one clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.now()))
        if isinstance(value, datetime):
            return value.astimezone(UTC)
    return utcnow()


def new_token() -> str:
    """A fresh lease token: unguessable and unique per claim."""
    return secrets.token_hex(16)


# --- enqueue ------------------------------------------------------------------------


@dataclass(frozen=True)
class MailRequest:
    """What a caller wants sent. The From address is always the sender user's own."""

    sender_email: str
    to: Sequence[str]
    subject: str
    text: str
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    reply_to: Sequence[str] = ()
    html: str | None = None
    attachments: Sequence[Attachment] = ()
    person_email: str | None = None


@dataclass(frozen=True)
class Queued:
    """A message written to the outbox; ``paused`` says why it will wait, if it will."""

    outbox_id: int
    message_id: str
    state: str
    paused: str | None = None


@dataclass(frozen=True)
class Plan:
    """What ``crm send --dry-run`` reports: where the mail would go and what stops it."""

    sender: str
    product_line: str | None = None
    product_line_label: str = ""
    transport: str | None = None
    transport_reason: str = ""
    account: str = ""
    server: str = ""
    notes: tuple[str, ...] = ()
    paused: str | None = None
    problems: tuple[Problem, ...] = ()
    size_bytes: int = 0
    recipients: int = 0

    @property
    def ok(self) -> bool:
        """True when the mail would be queued."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": self.ok,
            "sender": self.sender,
            "product_line": self.product_line,
            "product_line_label": self.product_line_label,
            "transport": self.transport,
            "transport_reason": self.transport_reason,
            "account": self.account,
            "server": self.server,
            "notes": list(self.notes),
            "paused": self.paused,
            "problems": [str(p) for p in self.problems],
            "size_bytes": self.size_bytes,
            "recipients": self.recipients,
        }


@dataclass
class _Checked:
    """The outcome of validating a request: resolved objects and every problem."""

    problems: list[Problem] = field(default_factory=list)
    user: User | None = None
    account: SenderAccount | None = None
    person: Person | None = None
    message: OutgoingMessage | None = None


def enqueue(crm: Crm, session: Session, request: MailRequest) -> Queued:
    """Validate everything, then queue the mail in the caller's transaction.

    Raises MailValidationError ("Error validating e-mail") listing every problem;
    nothing is written then. On success the Message-ID is fixed for every attempt.
    """
    checked = _check(crm, session, request)
    if checked.problems:
        raise MailValidationError(checked.problems)
    assert checked.user and checked.account and checked.message
    row = _outbox_row(
        checked.user, checked.account, checked.message, checked.person, db_now(session)
    )
    session.add(row)
    session.flush()
    if checked.person is not None:
        session.add(
            PersonActivity(
                person_id=checked.person.id,
                user_id=checked.user.id,
                outbox_id=row.id,
                kind="mail",
                summary=f"Mail “{row.subject}” from {row.sender_email} (outbox #{row.id})",
            )
        )
    signals.emit_after_commit(
        session,
        "mail-queued",
        outbox_id=row.id,
        message_id=row.message_id,
        user_id=row.user_id,
        person_id=row.person_id,
    )
    pause = session.get(AccountPause, checked.user.id)
    return Queued(row.id, row.message_id, row.state, pause.reason if pause else None)


def plan(crm: Crm, session: Session, request: MailRequest) -> Plan:
    """Say which product line, transport, account and server would send, and why."""
    checked = _check(crm, session, request)
    user, account = checked.user, checked.account
    if user is None or account is None:
        return Plan(sender=request.sender_email, problems=tuple(checked.problems))
    line = crm.config.product_line(user.product_line)
    chosen = crm.settings_store().user_values(session, user.id).get("mail.transport")
    reason = (
        f"the user's setting mail.transport = {chosen!r}"
        if chosen
        else f"product line {line.name!r} default_transport = {line.default_transport!r}"
    )
    route = crm.describe_route(account) if account.transport in crm.transports(line.name) else None
    pause = session.get(AccountPause, user.id)
    message = checked.message
    return Plan(
        sender=account.email,
        product_line=line.name,
        product_line_label=line.label,
        transport=account.transport,
        transport_reason=reason,
        account=route.account if route else account.email,
        server=route.server if route else "(the transport does not say)",
        notes=route.notes if route else (),
        paused=pause.reason if pause else None,
        problems=tuple(checked.problems),
        size_bytes=message.size_estimate() if message else 0,
        recipients=len(message.recipients) if message else 0,
    )


def _check(crm: Crm, session: Session, request: MailRequest) -> _Checked:
    checked = _Checked()
    checked.user = _sender_user(session, request.sender_email, checked.problems)
    if checked.user is not None:
        checked.account, problems = account_problems(crm, session, checked.user)
        for problem in problems:
            where = f"sender {checked.user.email}" + (f": {problem.key}" if problem.key else "")
            checked.problems.append(Problem(where, problem.message, problem.fix))
    to, cc, bcc, reply_to = (
        _addresses(raw, name, checked.problems)
        for raw, name in (
            (request.to, "to"),
            (request.cc, "cc"),
            (request.bcc, "bcc"),
            (request.reply_to, "reply-to"),
        )
    )
    if not request.to:
        checked.problems.append(Problem("to", "at least one To recipient is required"))
    checked.problems.extend(_content_problems(request))
    if request.person_email:
        checked.person = session.scalar(
            select(Person).where(Person.email == request.person_email.strip().lower())
        )
        if checked.person is None:
            checked.problems.append(
                Problem("person", f"no person with e-mail {request.person_email!r} in the register")
            )
    if checked.user is not None:
        checked.message = OutgoingMessage(
            outbox_id=0,
            message_id=make_message_id(checked.user.email.rpartition("@")[2]),
            sender=Address(checked.user.email, checked.user.name),
            to=tuple(to),
            cc=tuple(cc),
            bcc=tuple(bcc),
            reply_to=tuple(reply_to),
            subject=request.subject.strip(),
            text=request.text,
            html=request.html,
            attachments=tuple(request.attachments),
        )
        checked.problems.extend(_limit_problems(crm, checked.message))
    return checked


def account_problems(
    crm: Crm, session: Session, user: User
) -> tuple[SenderAccount | None, list[Problem]]:
    """The user's sender account and what stops it from sending.

    A configuration that no longer fits the user (a product line removed from
    crm.toml) is one more problem of this account, not a crash of every worker.
    """
    try:
        account = crm.sender_account(session, user)
        return account, crm.sender_problems(account)
    except CrmError as exc:
        return None, [Problem("", str(exc))]


def _sender_user(session: Session, raw: str, problems: list[Problem]) -> User | None:
    reason = explain_address(raw)
    if reason is not None:
        problems.append(Problem(f"from {raw!r}", reason))
        return None
    user = session.scalar(select(User).where(User.email == raw.strip().lower()))
    if user is None:
        problems.append(
            Problem(
                f"from {raw.strip()!r}",
                "is not a CRM user; mail can only be sent from a user's own address "
                "(see `crm users list`)",
            )
        )
    return user


def _addresses(raws: Sequence[str], name: str, problems: list[Problem]) -> list[Address]:
    if isinstance(raws, str):  # a lone string would be split into characters
        raws = [raws]
    good, bad = validate_addresses(raws, name)
    problems.extend(bad)
    return good


def _content_problems(request: MailRequest) -> list[Problem]:
    problems: list[Problem] = []
    if not request.subject.strip():
        problems.append(Problem("subject", "a subject is required"))
    subject_problem = header_problem(request.subject, "subject")
    if subject_problem:
        problems.append(subject_problem)
    for att in request.attachments:
        where = f"attachment {att.filename!r}"
        if not att.filename.strip():
            problems.append(Problem("attachment", "a file name is required"))
        name_problem = header_problem(att.filename, where)
        if name_problem:
            problems.append(name_problem)
        main, _, sub = att.content_type.partition("/")
        if not main or not sub or header_problem(att.content_type, "type"):
            problems.append(
                Problem(where, f"content type {att.content_type!r} is not type/subtype")
            )
    return problems


def _limit_problems(crm: Crm, message: OutgoingMessage) -> list[Problem]:
    limits = crm.config.mail
    problems: list[Problem] = []
    size = message.size_estimate()
    if size > limits.max_message_bytes:
        problems.append(
            Problem(
                "size",
                f"the mail would be about {_mb(size)} with attachments; the limit is "
                f"{_mb(limits.max_message_bytes)} ([mail] max_message_bytes)",
            )
        )
    count = len(message.recipients)
    if count > limits.max_recipients:
        problems.append(
            Problem(
                "recipients",
                f"{count} recipients; the limit is {limits.max_recipients} ([mail] max_recipients)",
            )
        )
    return problems


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _outbox_row(
    user: User,
    account: SenderAccount,
    message: OutgoingMessage,
    person: Person | None,
    now: datetime,
) -> OutboxMessage:
    return OutboxMessage(
        message_id=message.message_id,
        user_id=user.id,
        person_id=person.id if person else None,
        product_line=user.product_line,
        transport=account.transport,
        sender_email=user.email,
        sender_name=user.name,
        recipients={
            "to": [[a.email, a.name] for a in message.to],
            "cc": [[a.email, a.name] for a in message.cc],
            "bcc": [[a.email, a.name] for a in message.bcc],
            "reply_to": [[a.email, a.name] for a in message.reply_to],
        },
        subject=message.subject,
        body_text=message.text,
        body_html=message.html,
        size_bytes=message.size_estimate(),
        state=S.QUEUED.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
        attachments=[
            OutboxAttachment(filename=a.filename, content_type=a.content_type, data=a.data)
            for a in message.attachments
        ],
    )


def outgoing(row: OutboxMessage) -> OutgoingMessage:
    """The row as a transport sees it (same Message-ID and Date on every attempt)."""

    def addresses(kind: str) -> tuple[Address, ...]:
        return tuple(Address(email, name) for email, name in row.recipient_list(kind))

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
    )


# --- claiming, recording, reaping (the worker's short transactions) ----------------------


@dataclass(frozen=True)
class Claim:
    """One message a worker holds under a lease, with what it needs to send it."""

    outbox_id: int
    token: str
    attempt_id: int
    attempt: int
    message: OutgoingMessage
    account: SenderAccount


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
        account, problems = account_problems(crm, session, user)
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
        Claim(row.id, token, attempt.id, row.attempts, outgoing(row), accounts[row.user_id])
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
    return _rowcount(result)


LEASE_EXPIRED_REASON = (
    "The worker sending this mail stopped before it could record the result (its lease "
    "expired), so it may or may not have been sent. It is not sent again by itself: "
    "check with `crm outbox reconcile`, or decide with `crm outbox resolve ID --sent` "
    "or `--not-sent`."
)


def reap_expired(session: Session, now: datetime) -> list[int]:
    """Turn ``sending`` rows whose lease expired into ``unknown`` (never resent silently)."""
    ids = list(
        session.scalars(
            select(OutboxMessage.id)
            .where(OutboxMessage.state == S.SENDING.value, OutboxMessage.lease_until < now)
            .with_for_update(skip_locked=True, of=OutboxMessage)
        )
    )
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
        select(OutboxMessage.id, OutboxMessage.message_id, OutboxMessage.user_id).where(
            OutboxMessage.id.in_(ids)
        )
    ):
        signals.emit_after_commit(
            session,
            "mail-unknown",
            outbox_id=row.id,
            message_id=row.message_id,
            user_id=row.user_id,
            reason=LEASE_EXPIRED_REASON,
        )
    return ids


@dataclass
class Recorded:
    """How many results of a batch moved each message to which state."""

    counts: dict[str, int] = field(default_factory=dict)
    paused_accounts: int = 0
    stale: int = 0

    def add(self, state: str) -> None:
        """Count one message that moved to ``state``."""
        self.counts[state] = self.counts.get(state, 0) + 1


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
        state = state_after(result.outcome, claim.attempt, crm.config.outbox.max_attempts)
        values = _result_values(crm.config.outbox, claim, result, state, now, jitter())
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
        "last_error": explain(result, state, claim.attempt),
        "lease_until": None,
        "updated_at": now,
    }
    if state is not S.UNKNOWN:
        values["lease_owner"] = None
        values["lease_token"] = None
    if state is S.SENT:
        values.update(sent_at=now, provider_ref=result.provider_ref or None, last_error=None)
    elif state is S.RETRY:
        delay = retry_delay(claim.attempt, config, result.retry_after, jitter)
        values["next_attempt_at"] = now + timedelta(seconds=delay)
    elif state is S.QUEUED:  # configuration: the account is paused, the try is not spent
        values.update(attempts=claim.attempt - 1, next_attempt_at=now)
    return values


def explain(result: SendResult, state: OutboxState, attempt: int) -> str:
    """The reason kept on the row, in words the sender understands."""
    detail = result.detail or "no detail given by the transport"
    if state is S.FAILED and result.outcome is Outcome.TEMPORARY:
        return f"Gave up after {attempt} attempts; the last one failed with: {detail}"
    if state is S.FAILED:
        return f"The mail cannot be sent as it is: {detail}"
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
    return _rowcount(result) == 1


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


# --- account pauses -------------------------------------------------------------------


def pause_account(
    session: Session, account: SenderAccount, reason: str, code: str, now: datetime
) -> int:
    """Pause an account after a configuration error; 1 if newly paused, else 0.

    ``INSERT … ON CONFLICT DO NOTHING``: two workers may hit the same bad account at
    once, and the first reason is kept.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(AccountPause)
        .values(
            user_id=account.user_id,
            transport=account.transport,
            reason=reason or "the transport reported a configuration error",
            code=code or None,
            paused_at=now,
        )
        .on_conflict_do_nothing(index_elements=[AccountPause.user_id])
        .returning(AccountPause.user_id)
    )
    created = session.execute(stmt).scalar() is not None
    if created:
        signals.emit_after_commit(
            session,
            "account-paused",
            user_id=account.user_id,
            email=account.email,
            transport=account.transport,
            reason=reason,
        )
    return int(created)


def lift_changed_pauses(session: Session) -> int:
    """Lift pauses whose user's or the system's settings changed since the pause.

    Why here and not in a signal receiver: settings are often saved by another process
    (``crm users set`` while workers run elsewhere); comparing ``updated_at`` with
    ``paused_at`` works across processes and machines. Removing a setting
    (``unset``) leaves no timestamp; ``crm outbox resume`` covers that.
    """
    changed_system = exists().where(SystemSetting.updated_at > AccountPause.paused_at)
    changed_user = exists().where(
        UserSetting.user_id == AccountPause.user_id,
        UserSetting.updated_at > AccountPause.paused_at,
    )
    lifted = list(
        session.execute(
            select(AccountPause.user_id, User.email)
            .join(User, User.id == AccountPause.user_id)
            .where(changed_system | changed_user)
        )
    )
    for user_id, email in lifted:
        _lift(session, user_id, email, "settings changed")
    return len(lifted)


def resume(session: Session, email: str) -> AccountPause | None:
    """Lift a user's pause (the operator says it is fixed); the pause lifted, or None."""
    user = _user(session, email)
    pause = session.get(AccountPause, user.id)
    if pause is not None:
        _lift(session, user.id, user.email, "resumed by an operator")
    return pause


def _lift(session: Session, user_id: int, email: str, why: str) -> None:
    result = session.execute(delete(AccountPause).where(AccountPause.user_id == user_id))
    if _rowcount(result):
        signals.emit_after_commit(session, "account-resumed", user_id=user_id, email=email, why=why)


def pauses(session: Session) -> list[tuple[AccountPause, str]]:
    """Every paused account with the user's e-mail, oldest first."""
    rows = session.execute(
        select(AccountPause, User.email)
        .join(User, User.id == AccountPause.user_id)
        .order_by(AccountPause.paused_at)
    )
    return [(pause, email) for pause, email in rows]


def _user(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise NotFoundError(f"no user with e-mail {email!r}; see `crm users list`")
    return user


# --- operators: list, show, retry, cancel, resolve ----------------------------------------


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **self.view.as_dict(),
            "recipients": self.recipients,
            "attachments": [
                {"filename": f, "content_type": t, "bytes": n} for f, t, n in self.attachments
            ],
            "person": self.person,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
            "provider_ref": self.provider_ref,
            "attempt_log": [a.__dict__ for a in self.attempts],
        }


def list_messages(
    session: Session, state: str | None = None, limit: int = 200
) -> list[MessageView]:
    """Outbox rows, newest first, optionally of one state."""
    if state is not None and state not in {s.value for s in S}:
        raise ValidationError(
            "Unknown state",
            [Problem("status", f"{state!r}; use one of {', '.join(s.value for s in S)}")],
        )
    query = select(OutboxMessage).order_by(OutboxMessage.id.desc()).limit(limit)
    if state is not None:
        query = query.where(OutboxMessage.state == state)
    rows = list(session.scalars(query))
    paused = {p.user_id: p.reason for p in session.scalars(select(AccountPause))}
    return [_view(row, paused.get(row.user_id)) for row in rows]


def _view(row: OutboxMessage, pause_reason: str | None) -> MessageView:
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
    )


def get_message(session: Session, outbox_id: int) -> OutboxMessage:
    """The outbox row, or NotFoundError."""
    row = session.get(OutboxMessage, outbox_id)
    if row is None:
        raise NotFoundError(f"no outbox message #{outbox_id}; see `crm outbox list`")
    return row


def show_message(session: Session, outbox_id: int) -> MessageDetail:
    """One message with its recipients, attachments and attempt log."""
    row = get_message(session, outbox_id)
    pause = session.get(AccountPause, row.user_id)
    person = session.get(Person, row.person_id) if row.person_id else None
    return MessageDetail(
        view=_view(row, pause.reason if pause else None),
        recipients={
            k: [e for e, _ in row.recipient_list(k)] for k in ("to", "cc", "bcc", "reply_to")
        },
        attachments=tuple((a.filename, a.content_type, len(a.data)) for a in row.attachments),
        person=person.email if person else None,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
        provider_ref=row.provider_ref,
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


def person_history(session: Session, person: Person) -> list[tuple[datetime, str, str]]:
    """A person's activities, a mail's followed by its outbox state (via the link)."""
    linked = [a.outbox_id for a in person.activities if a.outbox_id is not None]
    found = session.execute(
        select(OutboxMessage.id, OutboxMessage.state).where(OutboxMessage.id.in_(linked))
    )
    state_of = {row_id: state for row_id, state in found}
    return [
        (
            a.created_at,
            a.kind,
            f"{a.summary} — {state_of[a.outbox_id]}" if a.outbox_id in state_of else a.summary,
        )
        for a in person.activities
    ]


def _refuse(row: OutboxMessage, action: str, hint: str) -> ValidationError:
    return ValidationError(
        f"Cannot {action} outbox message #{row.id}",
        [Problem(f"state {row.state}", hint)],
    )


def retry(session: Session, outbox_id: int, now: datetime | None = None) -> OutboxMessage:
    """Queue a failed, cancelled or waiting message again, due now, with a fresh budget."""
    now = now or db_now(session)
    row = get_message(session, outbox_id)
    if row.state == S.UNKNOWN.value:
        raise _refuse(
            row,
            "retry",
            "it may already have been sent; check with `crm outbox reconcile`, or decide "
            "with `crm outbox resolve ID --not-sent` (queues it again) or `--sent`",
        )
    if row.state in (S.SENDING.value, S.SENT.value):
        raise _refuse(row, "retry", "it is being sent or was sent")
    _requeue(row, now, reset_budget=row.state != S.QUEUED.value)
    return row


def cancel(session: Session, outbox_id: int, now: datetime | None = None) -> OutboxMessage:
    """Cancel a message that has not been sent (queued, retry or unknown)."""
    now = now or db_now(session)
    row = get_message(session, outbox_id)
    if row.state not in (*DUE_STATES, S.UNKNOWN.value):
        hint = (
            "a worker is sending it right now; look again in a moment"
            if row.state == S.SENDING.value
            else "it is already final"
        )
        raise _refuse(row, "cancel", hint)
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
    row = get_message(session, outbox_id)
    if row.state != S.UNKNOWN.value:
        raise _refuse(row, "resolve", "only messages in state unknown need a decision")
    _apply_resolution(session, row, sent, why or "decided by an operator", now)
    return row


def _apply_resolution(
    session: Session, row: OutboxMessage, sent: bool, why: str, now: datetime
) -> None:
    if sent:
        row.state = S.SENT.value
        row.sent_at = now
        row.last_error = f"Confirmed sent ({why})."
        row.lease_owner = row.lease_token = None
        row.lease_until = None
        row.updated_at = now
        signals.emit_after_commit(
            session, "mail-sent", outbox_id=row.id, message_id=row.message_id, user_id=row.user_id
        )
        return
    _requeue(row, now, reset_budget=False)
    row.last_error = f"Not sent ({why}); queued again."


def _requeue(row: OutboxMessage, now: datetime, reset_budget: bool) -> None:
    row.state = S.QUEUED.value
    row.next_attempt_at = now
    row.lease_owner = row.lease_token = None
    row.lease_until = None
    row.updated_at = now
    if reset_budget:
        row.attempts = 0


@dataclass(frozen=True)
class ReconcileReport:
    """What reconciling one ``unknown`` message found and did."""

    outbox_id: int
    message_id: str
    sent: bool | None
    detail: str
    applied: bool


def reconcile(crm: Crm, outbox_id: int | None = None) -> list[ReconcileReport]:
    """Ask each transport whether its ``unknown`` messages went out, and apply the answer.

    Found → sent; certainly not sent → queued again; cannot tell → stays unknown for
    ``crm outbox resolve``. The transport is asked between two short transactions; the
    answer is applied only if nobody touched the row meanwhile.
    """
    with crm.transaction() as session:
        snapshot = _unknown_for_reconcile(crm, session, outbox_id)
    answers: list[tuple[int, str | None, str, bool | None, str]] = []
    groups: dict[str, list[tuple[int, str | None, OutgoingMessage, SenderAccount]]] = {}
    for item in snapshot:
        groups.setdefault(item[3].key, []).append(item)
    for group in groups.values():
        account = group[0][3]
        found = _ask_transport(crm, account, [m for _, _, m, _ in group])
        for row_id, token, message, _ in group:
            sent, detail = found.get(message.message_id, (None, "the transport gave no answer"))
            answers.append((row_id, token, message.message_id, sent, detail))
    reports: list[ReconcileReport] = []
    with crm.transaction() as session:
        for row_id, token, message_id, sent, detail in answers:
            applied = False
            row = session.get(OutboxMessage, row_id, with_for_update=True)
            untouched = (
                row is not None and row.state == S.UNKNOWN.value and row.lease_token == token
            )
            if row is not None and untouched and sent is not None:
                _apply_resolution(session, row, sent, f"reconciled: {detail}", db_now(session))
                applied = True
            reports.append(ReconcileReport(row_id, message_id, sent, detail, applied))
    return reports


def _unknown_for_reconcile(
    crm: Crm, session: Session, outbox_id: int | None
) -> list[tuple[int, str | None, OutgoingMessage, SenderAccount]]:
    query = select(OutboxMessage).where(OutboxMessage.state == S.UNKNOWN.value)
    if outbox_id is not None:
        row = get_message(session, outbox_id)
        if row.state != S.UNKNOWN.value:
            raise _refuse(row, "reconcile", "only messages in state unknown are reconciled")
        query = query.where(OutboxMessage.id == outbox_id)
    items = []
    accounts: dict[int, SenderAccount] = {}
    for row in session.scalars(query.options(selectinload(OutboxMessage.attachments))):
        if row.user_id not in accounts:
            user = session.get(User, row.user_id)
            assert user is not None
            accounts[row.user_id] = crm.sender_account(session, user)
        # Ask the transport that tried to send it, even if the user switched since.
        account = replace(accounts[row.user_id], transport=row.transport)
        items.append((row.id, row.lease_token, outgoing(row), account))
    return items


def _ask_transport(
    crm: Crm, account: SenderAccount, messages: Sequence[OutgoingMessage]
) -> dict[str, tuple[bool | None, str]]:
    try:
        results = crm.reconcile_mail(account, messages)
    except Exception as exc:  # a transport that cannot look must not stop the others
        return {
            m.message_id: (None, f"could not look: {type(exc).__name__}: {exc}") for m in messages
        }
    return {r.message_id: (r.sent, r.detail) for r in results}


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)
