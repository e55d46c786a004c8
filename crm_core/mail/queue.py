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

import functools
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select, Update

from crm_core import signals
from crm_core.config import OutboxConfig
from crm_core.db import rowcount
from crm_core.mail import pacing, recipients
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
    OutboxAttachment,
    OutboxAttempt,
    OutboxMessage,
    OutboxState,
    User,
    UTCDateTime,
    recipient_list,
)

if TYPE_CHECKING:
    from crm_core.app import Crm


def outgoing(
    row: OutboxMessage | DueRow, handed_over_at: datetime | None = None
) -> OutgoingMessage:
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
        rendered=row.mime,
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
    pace: pacing.Pace | None = None
    """The sender's mailbox and its limits (None: no pacing, e.g. a test's own claim)."""
    slots: int = 0
    """Connections or requests this claim's batch holds on the mailbox (0: none counted)."""
    due_at: datetime | None = None
    """When the row was due: with ``outbox_id``, its place in the order the reaper
    assumes the batch's messages were handed out (:func:`claim_more` keeps it)."""


@dataclass(frozen=True)
class ClaimResult:
    """A claimed batch, plus how many accounts were paused instead of claimed."""

    claims: list[Claim]
    paused_accounts: int = 0
    resumed_accounts: int = 0
    last_user: int = 0
    """The last sender looked at: the next claim starts after it, so every sender
    gets a turn."""


def claim_batch(
    crm: Crm, session: Session, worker: str, limit: int, now: datetime, after: int = 0
) -> ClaimResult:
    """Claim up to ``limit`` due messages of unpaused accounts under one lease.

    Fair and paced: the senders with due mail are taken in turn (from the one after
    ``after``), each gets a share of the batch, and no mailbox gets more than its
    pacing allows (:mod:`crm_core.mail.pacing`); what is left waits in ``queued``,
    spending nothing. PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets many workers claim
    disjoint rows. SQLite: the transaction began with ``BEGIN IMMEDIATE``, so this
    worker is the only writer until commit. An account whose settings stop it from
    sending is paused here (nothing attempted, nothing spent from the budget) and its
    rows stay queued.
    """
    resumed = lift_changed_pauses(session)
    paused = 0
    waiting: set[int] = set()  # their secret no key here decrypts: not paused, skipped
    last = after
    for _round in range(3):  # pausing frees the slots for other accounts' mail
        users = _due_users(session, limit, now, after, waiting)
        if not users:
            break
        last = users[-1]
        known = len(waiting)
        accounts, blocked = _accounts_for(crm, session, users, now, waiting)
        paused += blocked
        paces = {uid: pacing.pace_for(crm, account) for uid, account in accounts.items()}
        budgets = pacing.budgets(session, paces.values(), now)
        ready = [u for u in users if u in accounts]
        picked = _pick_rows(session, ready, paces, budgets, limit, now)
        if picked:
            claims = _claim_rows(crm, session, worker, picked, accounts, paces, budgets, now)
            return ClaimResult(claims, paused, resumed, last)
        if not blocked and len(waiting) == known:
            break
    return ClaimResult([], paused, resumed, last)


def claim_more(
    crm: Crm, session: Session, worker: str, last: Claim, limit: int, now: datetime
) -> list[Claim]:
    """Up to ``limit`` more of ``last``'s sender's due mail for the batch ``last`` ends,
    under the same lease, while the sender is the only one with due mail.

    Why: a transport that keeps its connections open takes them instead of ending the
    batch (:func:`crm_core.hookspecs.send_mail`'s ``more``), so a mass mailing pays for
    one session, not one per batch, and the next claim waits for no reconnect.

    Nothing is taken when another sender has due mail (it gets its turn at the next
    claim, as it would after a batch), when the account is paused or its settings
    changed since the batch began, or when the mailbox's pacing has no room; the
    batch's connections (its slots) are not counted again. Only rows after ``last`` in
    the order of due time and id are taken, so the batch's messages stay in the order
    the reaper assumes they were handed out (:func:`reap_expired`).
    """
    user_id = last.account.user_id
    if last.due_at is None or last.pace is None:
        return []
    if _due_users(session, 2, now, 0) != [user_id]:
        return []
    accounts, _paused = _accounts_for(crm, session, [user_id], now, set())
    account = accounts.get(user_id)
    if account is None or account != last.account or pacing.pace_for(crm, account) != last.pace:
        return []
    budgets = pacing.budgets(session, [last.pace], now, connections=False)
    budget = budgets.get(last.pace.mailbox)
    if budget is None:
        return []
    want = budget.room(user_id, limit)
    due = _due_rows(session, user_id, now, want, [], (last.due_at, last.outbox_id))
    rows = budget.take(user_id, due)
    if not rows:
        return []
    paces = {user_id: last.pace}
    return _claim_rows(
        crm, session, worker, rows, {user_id: account}, paces, budgets, now, last.token
    )


def _next_user(prev: str) -> str:
    """SQL for the least user id above ``prev`` with due mail: one index probe per state
    (on ``ix_outbox_due_by_user``), so finding each sender costs the same however much
    mail any sender has queued."""
    probes = " UNION ALL ".join(
        f"SELECT min(user_id) AS u FROM outbox WHERE state = '{state}' "
        f"AND user_id > {prev} AND next_attempt_at <= :now"
        for state in DUE_STATES
    )
    return f"(SELECT min(u) FROM ({probes}) AS probe)"


_DUE_USERS = text(
    f"""
    WITH RECURSIVE due(uid, n) AS (
        SELECT {_next_user(":after")}, 1
        UNION ALL
        SELECT {_next_user("due.uid")}, n + 1 FROM due WHERE due.uid IS NOT NULL AND n < :many
    )
    SELECT uid FROM due WHERE uid IS NOT NULL
    """
).bindparams(bindparam("now", type_=UTCDateTime()))


def _due_users(
    session: Session, limit: int, now: datetime, after: int, waiting: Collection[int] = ()
) -> list[int]:
    """Up to ``limit`` unpaused senders with due mail, in turn from the one after ``after``
    (then from the start again); ``waiting`` ones are left out too."""
    paused = set(session.scalars(select(AccountPause.user_id))) | set(waiting)
    many = limit + len(paused)
    first = session.scalars(_DUE_USERS, {"now": now, "after": after, "many": many})
    found = [int(u) for u in first]
    if after and len(found) < many:
        again = session.scalars(_DUE_USERS, {"now": now, "after": 0, "many": many})
        found += [int(u) for u in again if int(u) <= after]
    return [u for u in dict.fromkeys(found) if u not in paused][:limit]


def _pick_rows(
    session: Session,
    users: Sequence[int],
    paces: Mapping[int, pacing.Pace],
    budgets: Mapping[str, pacing.Budget],
    limit: int,
    now: datetime,
) -> list[DueRow]:
    """Each sender's oldest due rows: a fair share each, then what is left over to those
    with more, never beyond a mailbox's budget. Locked rows are skipped."""
    open_users = [u for u in users if paces[u].mailbox in budgets]
    picked: dict[int, list[DueRow]] = {u: [] for u in open_users}
    while open_users and sum(map(len, picked.values())) < limit:
        share = max(1, (limit - sum(map(len, picked.values()))) // len(open_users))
        still: list[int] = []
        for user_id in open_users:
            room = limit - sum(map(len, picked.values()))
            budget = budgets[paces[user_id].mailbox]
            want = budget.room(user_id, min(share, room))
            if want <= 0:
                continue
            taken = picked[user_id]
            due = _due_rows(session, user_id, now, want, [r.id for r in taken])
            rows = budget.take(user_id, due)
            taken.extend(rows)
            if len(rows) == want and budget.room(user_id, 1):
                still.append(user_id)
        open_users = still
    return [row for rows in picked.values() for row in rows]


@dataclass(frozen=True)
class DueRow:
    """A due outbox row as a claim reads it: what a send needs, without the ORM.

    Why not the mapped class: loading a batch as ORM objects (identity map, instance
    state, a second query for the attachments' relationship) was a sixth of a worker's
    CPU time; these rows are read once, sent, and never written through the ORM.
    """

    id: int
    message_id: str
    user_id: int
    attempts: int
    sender_email: str
    sender_name: str
    recipients: dict[str, Any]
    recipient_states: dict[str, Any] | None
    subject: str
    body_text: str
    body_html: str | None
    mime: bytes | None
    created_at: datetime
    due_at: datetime
    attachments: tuple[Attachment, ...] = ()

    def recipient_list(self, kind: str) -> list[tuple[str, str]]:
        """[(email, name)] for ``kind`` in to, cc, bcc, reply_to."""
        return recipient_list(self.recipients, kind)


_DUE_COLUMNS = tuple(f.name for f in fields(DueRow) if f.name not in ("attachments", "due_at"))


def _due_rows(
    session: Session,
    user_id: int,
    now: datetime,
    n: int,
    besides: Sequence[int],
    after: tuple[datetime, int] | None = None,
) -> list[DueRow]:
    """Up to ``n`` of a sender's due rows, oldest first, locked (locked ones skipped).

    One query per due state, each read in the order of ``ix_outbox_due_by_user``, then
    merged. Why not ``state IN (…)`` in one: no index gives one order across two states,
    so PostgreSQL read and sorted every due row of the sender to return the first ``n``
    (with 100,000 queued, 120 ms of a claim's 184). Rows of the second query that the merge
    leaves out stay locked only until the claim commits. ``after``: only rows that come
    after this (due time, id) in that order.
    """
    connection = session.connection()
    params: dict[str, Any] = {"user_id": user_id, "now": now, "n": n}
    if besides:
        params["besides"] = list(besides)
    if after is not None:
        params["after_due"], params["after_id"] = after
    found = [
        dict(row._mapping)
        for state in DUE_STATES
        for row in connection.execute(
            _due_rows_statement(state, bool(besides), after is not None), params
        )
    ]
    found.sort(key=lambda row: (row["due_at"], row["id"]))
    del found[n:]
    if not found:
        return []
    attached: dict[int, list[Attachment]] = {}
    ids = {"ids": [row["id"] for row in found]}
    for outbox_id, filename, content_type, data in connection.execute(
        _attachments_statement(), ids
    ):
        attached.setdefault(outbox_id, []).append(Attachment(filename, content_type, data))
    return [DueRow(**row, attachments=tuple(attached.get(row["id"], ()))) for row in found]


@functools.lru_cache(maxsize=8)
def _due_rows_statement(state: str, besides: bool, after: bool = False) -> Select[Any]:
    """The SELECT of :func:`_due_rows` for one ``state``, built once (as
    :func:`_claim_statement`); ``besides``: leaving out the ids already taken;
    ``after``: only rows after a (due time, id), still read in the index's order."""
    table = cast(Table, OutboxMessage.__table__)
    query = (
        select(
            *(table.c[name] for name in _DUE_COLUMNS),
            table.c.next_attempt_at.label("due_at"),
        )
        .where(
            table.c.state == state,
            table.c.user_id == bindparam("user_id"),
            table.c.next_attempt_at <= bindparam("now"),
        )
        .order_by(table.c.next_attempt_at, table.c.id)
        .limit(bindparam("n"))
        .with_for_update(skip_locked=True)
    )
    if besides:
        query = query.where(table.c.id.not_in(bindparam("besides", expanding=True)))
    if after:
        due, after_due = table.c.next_attempt_at, bindparam("after_due", type_=UTCDateTime())
        query = query.where(
            due >= after_due,
            or_(due > after_due, table.c.id > bindparam("after_id")),
        )
    return query


@functools.lru_cache(maxsize=1)
def _attachments_statement() -> Select[Any]:
    """The attachments of a set of rows, in the order they were added."""
    files = cast(Table, OutboxAttachment.__table__)
    return (
        select(files.c.outbox_id, files.c.filename, files.c.content_type, files.c.data)
        .where(files.c.outbox_id.in_(bindparam("ids", expanding=True)))
        .order_by(files.c.id)
    )


def _accounts_for(
    crm: Crm, session: Session, users: Sequence[int], now: datetime, waiting: set[int]
) -> tuple[dict[int, SenderAccount], int]:
    """Sender accounts that may send now; the others are paused with the reason.

    An account that needs a secret no key here decrypts is not paused: that is an
    installation-wide error (logged, and shown by ``crm check``), not the account's,
    and its mail waits in ``waiting`` until the key is back (a reload needs no restart).
    """
    accounts: dict[int, SenderAccount] = {}
    paused = 0
    for user_id in users:
        user = session.get(User, user_id)
        assert user is not None  # a foreign key guarantees it
        account, problems = crm.sender_state(session, user)
        if account is None:
            account = SenderAccount(user.id, user.email, user.name, user.product_line, "?")
        if any(p.key in account.unreadable for p in problems):
            waiting.add(user_id)
            continue
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
    rows: Sequence[DueRow],
    accounts: Mapping[int, SenderAccount],
    paces: Mapping[int, pacing.Pace],
    budgets: Mapping[str, pacing.Budget],
    now: datetime,
    token: str | None = None,
) -> list[Claim]:
    """Put ``rows`` under a lease (``token``: a batch's own, when it takes more) and open
    an attempt for each; the claims, in the order of ``rows``."""
    token = token or new_token()
    until = lease_until(now, crm.config.outbox.lease_seconds)
    numbers = _attempt_counts(session, [r.id for r in rows])
    by_transport: dict[str, list[int]] = {}
    for row in rows:
        by_transport.setdefault(accounts[row.user_id].transport, []).append(row.id)
    connection = session.connection()
    for transport, ids in by_transport.items():
        # one UPDATE per transport, not the ORM's flush of each row (a statement each)
        connection.execute(
            _claim_statement(),
            {
                "ids": ids,
                "worker": worker,
                "token": token,
                "until": until,
                "transport": transport,
                "now": now,
            },
        )
    attempt_ids = _start_attempts(
        session,
        [(row.id, numbers.get(row.id, 0) + 1, accounts[row.user_id].transport) for row in rows],
        worker,
        now,
    )
    per_user = Counter(row.user_id for row in rows)
    slots = {
        user_id: pacing.group_slots(budgets.get(paces[user_id].mailbox), count)
        for user_id, count in per_user.items()
    }
    used = {paces[u].mailbox: budgets[paces[u].mailbox] for u in per_user}
    groups = [(u, paces[u].mailbox, slots[u]) for u in per_user]
    pacing.commit(session, used, groups, token, until, now)
    return [
        Claim(
            row.id,
            token,
            attempt_id,
            row.attempts + 1,  # the row as read, before this claim's UPDATE
            outgoing(row, now),
            accounts[row.user_id],
            row.recipient_states,
            paces[row.user_id],
            slots[row.user_id],
            row.due_at,
        )
        for row, attempt_id in zip(rows, attempt_ids, strict=True)
    ]


@functools.lru_cache(maxsize=1)
def _claim_statement() -> Update:
    """The UPDATE that puts a claim's rows of one transport under its lease.

    Why built once: building it per claim (an IN of 50 ids coerced one by one, and its
    cache key) cost more than running it on SQLite.
    """
    table = cast(Table, OutboxMessage.__table__)
    return (
        update(table)
        .where(table.c.id.in_(bindparam("ids", expanding=True)))
        .values(
            state=S.SENDING.value,
            attempts=table.c.attempts + 1,
            lease_owner=bindparam("worker"),
            lease_token=bindparam("token"),
            lease_until=bindparam("until"),
            transport=bindparam("transport"),
            updated_at=bindparam("now"),
        )
    )


def _start_attempts(
    session: Session, started: Sequence[tuple[int, int, str]], worker: str, now: datetime
) -> list[int]:
    """Open an attempt log entry per (outbox id, number, transport); their ids, in order.

    Why one Core statement, each id read back with its outbox id: the ORM's flush (and
    a RETURNING in parameter order) inserted these one row at a time, a statement per
    claimed mail; a claim holds each outbox row once, so the pairs say which is which.
    """
    table = cast(Table, OutboxAttempt.__table__)
    inserted = session.execute(
        insert(table).returning(table.c.outbox_id, table.c.id),
        [
            {
                "outbox_id": outbox_id,
                "number": number,
                "worker": worker,
                "transport": transport,
                "started_at": now,
            }
            for outbox_id, number, transport in started
        ],
    )
    ids = {int(outbox_id): int(row_id) for outbox_id, row_id in inserted}
    return [ids[outbox_id] for outbox_id, _, _ in started]


def _attempt_counts(session: Session, ids: Sequence[int]) -> dict[int, int]:
    """How many attempts each row's log holds (the next attempt's number follows)."""
    counts = session.connection().execute(_attempt_counts_statement(), {"ids": list(ids)})
    return {int(outbox_id): int(count) for outbox_id, count in counts}


@functools.lru_cache(maxsize=1)
def _attempt_counts_statement() -> Select[Any]:
    """Built once, as :func:`_claim_statement`."""
    table = cast(Table, OutboxAttempt.__table__)
    return (
        select(table.c.outbox_id, func.count())
        .where(table.c.outbox_id.in_(bindparam("ids", expanding=True)))
        .group_by(table.c.outbox_id)
    )


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
    pacing.renew(session, wanted, until)
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
    paused_mailboxes: int = 0
    stale: int = 0

    def add(self, state: str) -> None:
        """Count one message that moved to ``state``."""
        self.counts[state] = self.counts.get(state, 0) + 1

    def merge(self, other: Recorded) -> None:
        """Add another recording's counts (results recorded as they came)."""
        for state, n in other.counts.items():
            self.counts[state] = self.counts.get(state, 0) + n
        self.paused_accounts += other.paused_accounts
        self.paused_mailboxes += other.paused_mailboxes
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
    planned: list[_Planned] = []
    untils: dict[int, datetime] = {}
    for claim in claims:
        result = by_id[claim.message.message_id]
        reason = None
        if result.outcome is Outcome.THROTTLED:
            untils[claim.outbox_id] = _paused_until(session, claim, result, now)
            reason = throttled_text(result, _pace(claim), untils[claim.outbox_id])
        state, values = _planned(crm.config.outbox, claim, result, now, jitter(), reason)
        planned.append((claim, result, state, values))
    applied = _write(session.connection(), planned, now)
    for claim, result, state, values in planned:
        if claim.outbox_id not in applied:
            recorded.stale += 1
            continue
        recorded.add(state.value)
        if result.outcome is Outcome.CONFIGURATION:
            recorded.paused_accounts += pause_account(
                session, claim.account, result.detail, result.code, now
            )
        if result.outcome is Outcome.THROTTLED:
            recorded.paused_mailboxes += pacing.pause(
                session,
                _pace(claim),
                claim.account,
                untils[claim.outbox_id],
                result.detail,
                result.code,
                now,
            )
        signal = _result_signal(claim, result, state, values)
        if signal is not None:
            signals.emit_after_commit(session, signal[0], **signal[1])
    return recorded


_Planned = tuple[Claim, SendResult, OutboxState, dict[str, Any]]


def _write(connection: Connection, planned: Sequence[_Planned], now: datetime) -> set[int]:
    """Each planned row's values where its lease still holds, and every attempt closed;
    the ids of the rows written."""
    applied = _fenced_updates(connection, [(claim, values) for claim, _, _, values in planned])
    _finish_attempts(
        connection,
        [(claim, result, claim.outbox_id in applied) for claim, result, _, _ in planned],
        now,
    )
    return applied


def pauses_nothing(result: SendResult) -> bool:
    """Whether writing ``result`` is all its recording does: a refused login pauses the
    account and throttling the mailbox, each in the transaction of its result."""
    return result.outcome not in (Outcome.CONFIGURATION, Outcome.THROTTLED)


def record_plain(
    crm: Crm,
    connection: Connection,
    claims: Sequence[Claim],
    results: Sequence[SendResult],
    now: datetime,
    jitter: Callable[[], float] = random.random,
) -> Recorded:
    """What :func:`record_results` does for results that pause nothing, in a
    transaction of the caller's ``connection`` without a Session.

    Why: on SQLite a worker records a result every mail or two, and a Session's set-up,
    begin and commit cost more than the two UPDATEs (about 50 of 135 µs of CPU). The
    signals are sent once the transaction has committed, as after a Session's commit.
    """
    by_id = {r.message_id: r for r in results}
    planned: list[_Planned] = []
    for claim in claims:
        result = by_id[claim.message.message_id]
        state, values = _planned(crm.config.outbox, claim, result, now, jitter())
        planned.append((claim, result, state, values))
    with connection.begin():
        applied = _write(connection, planned, now)
    return _committed(crm, planned, applied)


def _committed(crm: Crm, planned: Sequence[_Planned], applied: set[int]) -> Recorded:
    """Count written results (committed already) and send their signals now."""
    recorded = Recorded()
    for claim, result, state, values in planned:
        if claim.outbox_id not in applied:
            recorded.stale += 1
            continue
        recorded.add(state.value)
        signal = _result_signal(claim, result, state, values)
        if signal is not None:
            signals.send_now(crm, signal[0], **signal[1])
    return recorded


def records_alone(connection: Connection, result: SendResult) -> bool:
    """Whether :func:`record_alone` writes ``result``: on PostgreSQL, when it pauses
    nothing (a refused login pauses the account, throttling the mailbox: those are
    written by :func:`record_results`, in a transaction with the pause)."""
    return connection.dialect.name == "postgresql" and pauses_nothing(result)


def record_alone(
    crm: Crm,
    connection: Connection,
    claim: Claim,
    result: SendResult,
    now: datetime,
    jitter: Callable[[], float] = random.random,
) -> Recorded:
    """Write one result and close its attempt in one statement, atomic by itself.

    Why: on PostgreSQL each statement is a round trip, and a worker records a result
    every mail or two; BEGIN, the row's UPDATE, the attempt's UPDATE and COMMIT made
    the recording, not the wire, the bound of a batch. One statement with the row's
    fenced UPDATE and the attempt's UPDATE as data-modifying CTEs is a transaction of
    its own on a ``connection`` in autocommit (the caller's), and says whether the
    lease still held. What it records is what :func:`record_results` would; its
    signal is sent at once, the write being committed already.
    """
    state, values = _planned(crm.config.outbox, claim, result, now, jitter())
    params = _fenced_params(claim, values)
    params.update(_finish_params(claim, result, now))
    applied = bool(connection.scalar(_alone_statement(tuple(sorted(values))), params))
    return _committed(
        crm, [(claim, result, state, values)], {claim.outbox_id} if applied else set()
    )


def _planned(
    config: OutboxConfig,
    claim: Claim,
    result: SendResult,
    now: datetime,
    jitter: float,
    reason: str | None = None,
) -> tuple[OutboxState, dict[str, Any]]:
    """The state a result moves its message to, and the row's values for it
    (``reason``: the sender's text when the transport's own is not the one to show)."""
    ledger = _ledger_after(claim, result, now)
    state = _state(config, claim, result, ledger, now)
    values = _result_values(config, claim, result, state, now, jitter)
    if reason is not None:
        values["last_error"] = reason
    if ledger is not None:
        values["recipient_states"] = ledger
        values["last_error"] = _with_tally(values["last_error"], claim, ledger, state)
    return state, values


THROTTLE_BACK_OFF = 60.0
"""Seconds a mailbox waits after a throttling answer that named no time."""


def _pace(claim: Claim) -> pacing.Pace:
    """The claim's mailbox (a claim made without pacing: the sender's own address)."""
    return claim.pace or pacing.Pace(f"{claim.account.transport}:{claim.account.email}")


def _paused_until(session: Session, claim: Claim, result: SendResult, now: datetime) -> datetime:
    """Until when a throttling answer pauses the mailbox: the server's time, or for a
    spent daily quota the end of its rolling day."""
    if result.quota:
        return pacing.quota_until(session, _pace(claim), claim.account.user_id, now)
    wait = result.retry_after if result.retry_after else THROTTLE_BACK_OFF
    return now + timedelta(seconds=max(wait, 1.0))


def throttled_text(result: SendResult, pace: pacing.Pace, until: datetime) -> str:
    """What the sender reads on a mail the server held back: why, and when it goes."""
    detail = result.detail or "The server asked the mailbox to send more slowly."
    return (
        f"{detail} Sending from {pace.name} is paused until {pacing.clock_text(until)}; "
        "the mail waits and then goes by itself (no attempt was counted)."
    )


def _ledger_after(claim: Claim, result: SendResult, now: datetime) -> dict[str, Any] | None:
    """The recipients' fates after this attempt, when they differ or differed before.

    None (the common case) when every recipient shares the message's outcome and
    always did: the message's state then says it for each of them. That includes a
    transport's report of every recipient delivered (SMTP reports each RCPT): a ledger
    of it would only repeat the row's state, reply and time, at a cost on every mail.
    """
    if claim.ledger is None and recipients.all_delivered(result):
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
    if ledger is None or result.outcome in (
        Outcome.AMBIGUOUS,
        Outcome.CONFIGURATION,
        Outcome.THROTTLED,
    ):
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
    elif state is S.QUEUED:  # account or mailbox paused: the try is not spent
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


@functools.lru_cache(maxsize=64)
def _fenced_statement(keys: tuple[str, ...]) -> Update:
    """The UPDATE that writes ``keys`` to one row still under the claim's lease.

    Why built once per shape of values: building and keying a fresh statement cost
    more than executing it (about 0.3 ms against 0.1 ms per statement on SQLite), and a
    result is recorded every mail or two. A handful of shapes exist (one per outcome).
    """
    table = cast(Table, OutboxMessage.__table__)
    return (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.lease_token == bindparam("b_token"),
            # not IN (...): an expanding parameter cannot be used with executemany
            or_(table.c.state == S.SENDING.value, table.c.state == S.UNKNOWN.value),
        )
        .values({key: bindparam(f"v_{key}") for key in keys})
    )


@functools.lru_cache(maxsize=1)
def _held_statement() -> Select[int, str | None]:
    """The rows of a set that are still being sent (or unknown), locked, with their lease."""
    return (
        select(OutboxMessage.id, OutboxMessage.lease_token)
        .where(
            OutboxMessage.id.in_(bindparam("ids", expanding=True)),
            OutboxMessage.state.in_((S.SENDING.value, S.UNKNOWN.value)),
        )
        .with_for_update(of=OutboxMessage)
    )


@functools.lru_cache(maxsize=1)
def _finish_statement() -> Update:
    """The UPDATE that closes one attempt log entry."""
    table = cast(Table, OutboxAttempt.__table__)
    return (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            finished_at=bindparam("v_finished_at"),
            outcome=bindparam("v_outcome"),
            error=bindparam("v_error"),
            code=bindparam("v_code"),
        )
    )


def _fenced_params(claim: Claim, values: Mapping[str, Any]) -> dict[str, Any]:
    params = {"b_id": claim.outbox_id, "b_token": claim.token}
    params.update({f"v_{key}": value for key, value in values.items()})
    return params


def _fenced_update(connection: Connection, claim: Claim, values: Mapping[str, Any]) -> bool:
    """Write ``values`` if the row still holds the claim's lease (its row count says)."""
    statement = _fenced_statement(tuple(sorted(values)))
    result = connection.execute(statement, _fenced_params(claim, values))
    return rowcount(result) == 1


def _fenced_updates(
    connection: Connection, planned: Sequence[tuple[Claim, Mapping[str, Any]]]
) -> set[int]:
    """Apply each claim's values if the row still holds its lease; the ids applied.

    The rows that qualify are selected ``FOR UPDATE`` (on SQLite the transaction is
    already the only writer), so the writes below cannot miss or hit any other row.
    """
    if not planned:
        return set()
    if len(planned) == 1:  # one UPDATE's row count says it: no need to lock first
        claim, values = planned[0]
        return {claim.outbox_id} if _fenced_update(connection, claim, values) else set()
    token_of = {claim.outbox_id: claim.token for claim, _ in planned}
    held = connection.execute(_held_statement(), {"ids": list(token_of)})
    applied = {int(row_id) for row_id, token in held if token_of[int(row_id)] == token}
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for claim, values in planned:
        if claim.outbox_id in applied:
            shapes.setdefault(tuple(sorted(values)), []).append(_fenced_params(claim, values))
    for keys, rows in shapes.items():
        connection.execute(_fenced_statement(keys), rows)
    return applied


def _finish_attempts(
    connection: Connection, finished: Sequence[tuple[Claim, SendResult, bool]], now: datetime
) -> None:
    """Close each claim's attempt log entry (one executemany for the batch)."""
    rows = []
    for claim, result, applied in finished:
        row = _finish_params(claim, result, now)
        rows.append(
            {
                "b_id": row["a_id"],
                "v_finished_at": now,
                "v_outcome": row["a_outcome"],
                "v_error": row["a_error"] if applied else row["a_stale_error"],
                "v_code": row["a_code"],
            }
        )
    if rows:
        connection.execute(_finish_statement(), rows)


def _finish_params(claim: Claim, result: SendResult, now: datetime) -> dict[str, Any]:
    """What closes a claim's attempt: its error as applied, and as a late result's."""
    error = result.detail or None
    return {
        "a_id": claim.attempt_id,
        "a_finished_at": now,
        "a_outcome": result.outcome.value,
        "a_error": error,
        "a_stale_error": STALE_PREFIX + (error or ""),
        "a_code": result.code or None,
    }


STALE_PREFIX = "(result arrived after the lease was taken over; not applied) "
"""Begins the attempt log's error of a result that came after its lease was lost."""


@functools.lru_cache(maxsize=64)
def _alone_statement(keys: tuple[str, ...]) -> Select[bool]:
    """PostgreSQL: the fenced UPDATE of ``keys`` and the attempt's close, as one statement
    that answers whether the lease held (see :func:`record_alone`).

    The attempt is closed either way, as :func:`_finish_attempts` does: with the error,
    or marked as a late result's when the row's lease was taken over.
    """
    table = cast(Table, OutboxAttempt.__table__)
    fenced = _fenced_statement(keys).returning(OutboxMessage.__table__.c.id).cte("fenced")
    applied = exists(select(fenced.c.id))
    text_type = table.c.error.type
    finished = (
        update(table)
        .where(table.c.id == bindparam("a_id"))
        .values(
            finished_at=bindparam("a_finished_at"),
            outcome=bindparam("a_outcome"),
            error=case(
                (applied, bindparam("a_error", type_=text_type)),
                else_=bindparam("a_stale_error", type_=text_type),
            ),
            code=bindparam("a_code"),
        )
        .returning(table.c.id)
        .cte("finished")
    )
    return select(applied.label("applied")).add_cte(finished)


_SIGNAL_FOR = {
    S.SENT: "mail-sent",
    S.PARTIAL: "mail-partly-sent",
    S.RETRY: "mail-retry-scheduled",
    S.FAILED: "mail-failed",
    S.UNKNOWN: "mail-unknown",
}


def _result_signal(
    claim: Claim,
    result: SendResult,
    state: OutboxState,
    values: Mapping[str, Any],
) -> tuple[str, dict[str, Any]] | None:
    """The signal a recorded result sends, and its payload (None: a state without one)."""
    name = _SIGNAL_FOR.get(state)
    if name is None:
        return None
    extra = {"next_attempt_at": values["next_attempt_at"]} if state is S.RETRY else {}
    return name, dict(
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
        if _fenced_update(session.connection(), claim, values):
            session.execute(delete(OutboxAttempt).where(OutboxAttempt.id == claim.attempt_id))
            released += 1
    for claim in {(c.token, c.account.user_id): c for c in claims if c.slots}.values():
        pacing.release(session, _pace(claim).mailbox, claim.token, claim.account.user_id)
    return released
