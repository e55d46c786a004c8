"""Pacing per sender mailbox, shared by every worker through the database.

Why in the database: Exchange Online counts each mailbox's messages a minute,
recipients a day and connections at once, whichever worker sends; only the database
sees every worker. Each claim locks the mailbox's :class:`MailboxPace` row (PostgreSQL:
``FOR UPDATE SKIP LOCKED``, so a claim never waits for another; SQLite: the claim's
``BEGIN IMMEDIATE``), works out what the mailbox may still send from the rolling
windows (:class:`MailboxSend`) and the slots in flight (:class:`MailboxSlot`, under the
claim's lease, so a dead worker's slots run out), and takes no more. What it cannot
take waits in ``queued``, spending no attempt; the row says why and until when.

A server's throttling answer (``THROTTLED``) pauses the mailbox until the time it gave,
for every worker. Every time is the database's clock (:func:`policy.db_now`).

Every function here takes a Session and never commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from crm_core import signals
from crm_core.db import upsert
from crm_core.mail.transport import SenderAccount
from crm_core.models import MailboxPace, MailboxSend, MailboxSlot, OutboxMessage
from crm_core.settings import MAX_CONNECTIONS, RATE_PER_MINUTE, RECIPIENTS_PER_DAY

if TYPE_CHECKING:
    from crm_core.app import Crm


class Recipients(Protocol):
    """A queued message as the daily limit sees it: its recipients by kind."""

    @property
    def recipients(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Recipients)

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
QUOTA_GUESS = timedelta(hours=1)
"""How long a spent daily quota pauses a mailbox when nothing we sent says when its
24-hour window rolls (the server may count mail sent from elsewhere)."""


def mailbox_name(key: str) -> str:
    """The address a mailbox key ends with (``smtp:host:anna@…`` → ``anna@…``)."""
    return key.rpartition(":")[2]


@dataclass(frozen=True)
class Pace:
    """One account's mailbox and the limits that hold for it, settings applied."""

    mailbox: str
    per_minute: int = 0
    recipients_per_day: int = 0
    connections: int = 0
    parallel: int = 1

    @property
    def name(self) -> str:
        """The mailbox as the sender reads it."""
        return mailbox_name(self.mailbox)

    @property
    def counted(self) -> bool:
        """True when the rolling windows are kept for this mailbox."""
        return bool(self.per_minute or self.recipients_per_day)

    @property
    def limited(self) -> bool:
        """True when any limit holds, so a claim must lock the mailbox's row."""
        return self.counted or bool(self.connections)


def pace_for(crm: Crm, account: SenderAccount) -> Pace:
    """The account's mailbox with the transport's defaults, overridden by the
    system's or the user's ``mail.*`` settings (unset: the default; 0: no limit)."""
    limits = crm.mailbox_limits(account)

    def setting(key: str, default: int) -> int:
        return max(account.get_int(key, default), 0)

    return Pace(
        limits.mailbox,
        setting(RATE_PER_MINUTE, limits.per_minute),
        setting(RECIPIENTS_PER_DAY, limits.recipients_per_day),
        setting(MAX_CONNECTIONS, limits.connections),
        max(limits.parallel, 1),
    )


def recipients_of(row: Recipients) -> int:
    """How many envelope recipients a message has (what the daily limit counts)."""
    return sum(len(row.recipients.get(kind, [])) for kind in ("to", "cc", "bcc"))


@dataclass
class Budget:
    """What one mailbox may still send in this claim (None: no limit)."""

    pace: Pace
    messages: int | None = None
    recipients: int | None = None
    slots: int | None = None
    first_in_day: bool = True
    taken: int = 0
    taken_recipients: int = 0
    held: str = ""
    groups: dict[int, int] = field(default_factory=dict)
    """Messages taken per account (each account's batch holds its own slots)."""

    def slots_taken(self) -> int:
        """Slots the account batches taken so far hold."""
        return sum(min(self.pace.parallel, n) for n in self.groups.values())

    def room(self, user_id: int, wanted: int) -> int:
        """How many more of ``wanted`` messages the account's batch may take now."""
        if self.messages is not None:
            wanted = min(wanted, self.messages - self.taken)
        if self.slots is not None:
            have = self.groups.get(user_id, 0)
            free = self.slots - (self.slots_taken() - min(self.pace.parallel, have))
            if free <= 0:
                return 0
            if free < self.pace.parallel:
                wanted = min(wanted, free - have)  # a smaller batch runs fewer at once
        return max(wanted, 0)

    def take(self, user_id: int, rows: Sequence[R]) -> list[R]:
        """The rows the account's batch takes, in order, within the recipients' budget."""
        kept: list[R] = []
        for row in rows:
            count = recipients_of(row)
            alone = self.first_in_day and not self.taken_recipients  # else never sendable
            over = self.recipients is not None and self.taken_recipients + count > self.recipients
            if over and not alone:
                self.held = "day"
                break
            kept.append(row)
            self.taken += 1
            self.taken_recipients += count
        self.groups[user_id] = self.groups.get(user_id, 0) + len(kept)
        return kept


def budgets(
    session: Session, paces: Iterable[Pace], now: datetime, connections: bool = True
) -> dict[str, Budget]:
    """A budget for each mailbox that may send now; the others are left out.

    Left out: a mailbox the server paused, one our limits hold, and (PostgreSQL) one
    whose row another worker's claim holds at this moment (it is looked at again on
    the next poll). ``connections=False``: for a batch that holds its connections
    already and takes more messages over them, the slots are not counted.
    """
    wanted = {pace.mailbox: pace for pace in paces}
    if not wanted:
        return {}
    limited = sorted(m for m, pace in wanted.items() if pace.limited)
    _create_rows(session, limited)
    rows = {
        row.mailbox: row
        for row in session.scalars(select(MailboxPace).where(MailboxPace.mailbox.in_(list(wanted))))
    }
    locked = _lock_rows(session, limited)
    found: dict[str, Budget] = {}
    for mailbox, pace in wanted.items():
        row = rows.get(mailbox)
        if row is not None and _waits(row, now):
            continue
        if not pace.limited:
            found[mailbox] = Budget(pace)
        elif mailbox in locked:
            budget = _budget(session, pace, now, connections)
            if budget is not None:
                found[mailbox] = budget
    return found


def _waits(row: MailboxPace, now: datetime) -> bool:
    """True while the server's pause or our own limits hold the mailbox."""
    return any(until is not None and until > now for until in (row.paused_until, row.paced_until))


def _create_rows(session: Session, mailboxes: Sequence[str]) -> None:
    """Make the rows a claim must lock (two workers may both try: nothing happens)."""
    if mailboxes:
        insert = upsert(session, MailboxPace)
        session.execute(
            insert.values([{"mailbox": m} for m in mailboxes]).on_conflict_do_nothing(
                index_elements=[MailboxPace.mailbox]
            )
        )


def _lock_rows(session: Session, mailboxes: Sequence[str]) -> set[str]:
    """Lock the mailboxes' rows; those another claim holds are skipped, never waited for."""
    if not mailboxes:
        return set()
    query = (
        select(MailboxPace.mailbox)
        .where(MailboxPace.mailbox.in_(list(mailboxes)))
        .order_by(MailboxPace.mailbox)
        .with_for_update(skip_locked=True)
    )
    return set(session.scalars(query))


def _budget(session: Session, pace: Pace, now: datetime, connections: bool) -> Budget | None:
    """What a locked mailbox may still send; None (and why, on its row) when nothing."""
    session.execute(
        delete(MailboxSend).where(MailboxSend.mailbox == pace.mailbox, MailboxSend.at <= now - DAY)
    )
    session.execute(
        delete(MailboxSlot).where(
            MailboxSlot.mailbox == pace.mailbox, MailboxSlot.lease_until <= now
        )
    )
    budget = Budget(pace)
    if pace.per_minute:
        sent, oldest = _window(session, pace.mailbox, now - MINUTE, MailboxSend.messages)
        budget.messages = pace.per_minute - sent
        if budget.messages <= 0 and oldest is not None:
            _hold(session, pace, oldest + MINUTE, f"{pace.per_minute} a minute")
            return None
    if pace.recipients_per_day:
        counted, oldest = _window(session, pace.mailbox, now - DAY, MailboxSend.recipients)
        budget.recipients = pace.recipients_per_day - counted
        budget.first_in_day = counted == 0
        if budget.recipients <= 0 and oldest is not None:
            _hold(session, pace, oldest + DAY, f"{pace.recipients_per_day} recipients a day")
            return None
    if pace.connections and connections:
        in_flight = session.scalar(
            select(func.coalesce(func.sum(MailboxSlot.slots), 0)).where(
                MailboxSlot.mailbox == pace.mailbox, MailboxSlot.lease_until > now
            )
        )
        budget.slots = pace.connections - int(in_flight or 0)
        if budget.slots <= 0:
            return None  # frees when a batch ends; nothing to wait for by the clock
    return budget


def _window(
    session: Session, mailbox: str, since: datetime, column: InstrumentedAttribute[int]
) -> tuple[int, datetime | None]:
    """The sum of ``column`` over the mailbox's sends after ``since``, and the oldest."""
    total, oldest = session.execute(
        select(func.coalesce(func.sum(column), 0), func.min(MailboxSend.at)).where(
            MailboxSend.mailbox == mailbox, MailboxSend.at > since
        )
    ).one()
    return int(total or 0), oldest


def _hold(session: Session, pace: Pace, until: datetime, limit: str) -> None:
    """Our limit holds the mailbox until ``until``: written where ``outbox show`` reads it."""
    session.execute(
        update(MailboxPace)
        .where(MailboxPace.mailbox == pace.mailbox)
        .values(paced_until=until, paced_reason=f"paced: {limit} for {pace.name}")
    )


def commit(
    session: Session,
    budgets_used: Mapping[str, Budget],
    groups: Sequence[tuple[int, str, int]],
    token: str,
    lease_until: datetime,
    now: datetime,
) -> None:
    """Write what a claim took: its sends (for the windows), its slots (under its lease),
    and for a mailbox whose budget is now spent, until when it waits.

    ``groups`` are (user id, mailbox, slots) for each account's batch.
    """
    for mailbox, budget in budgets_used.items():
        if budget.taken and budget.pace.counted:
            session.add(
                MailboxSend(
                    mailbox=mailbox,
                    at=now,
                    messages=budget.taken,
                    recipients=budget.taken_recipients,
                )
            )
            _hold_if_spent(session, budget, now)
    for user_id, mailbox, slots in groups:
        if slots:
            session.add(
                MailboxSlot(
                    mailbox=mailbox,
                    lease_token=token,
                    user_id=user_id,
                    slots=slots,
                    lease_until=lease_until,
                )
            )
    session.flush()


def _hold_if_spent(session: Session, budget: Budget, now: datetime) -> None:
    """After a claim: a budget now spent makes the mailbox wait for its window to move."""
    pace = budget.pace
    if budget.messages is not None and budget.taken >= budget.messages:
        _, oldest = _window(session, pace.mailbox, now - MINUTE, MailboxSend.messages)
        _hold(session, pace, (oldest or now) + MINUTE, f"{pace.per_minute} a minute")
    elif budget.held == "day":
        _, oldest = _window(session, pace.mailbox, now - DAY, MailboxSend.recipients)
        _hold(session, pace, (oldest or now) + DAY, f"{pace.recipients_per_day} recipients a day")


def group_slots(budget: Budget | None, count: int) -> int:
    """The slots one account's batch of ``count`` messages holds on its mailbox."""
    if budget is None or budget.slots is None or not count:
        return 0
    return min(budget.pace.parallel, count)


def release(session: Session, mailbox: str, token: str, user_id: int) -> None:
    """A batch has ended: its slots are free for the next claim."""
    session.execute(
        delete(MailboxSlot).where(
            MailboxSlot.mailbox == mailbox,
            MailboxSlot.lease_token == token,
            MailboxSlot.user_id == user_id,
        )
    )


def renew(session: Session, tokens: Sequence[str], until: datetime) -> None:
    """A live worker's slots last as long as its claim's lease."""
    session.execute(
        update(MailboxSlot)
        .where(MailboxSlot.lease_token.in_(list(tokens)))
        .values(lease_until=until),
        execution_options={"synchronize_session": False},
    )


def pause(
    session: Session,
    pace: Pace,
    account: SenderAccount,
    until: datetime,
    reason: str,
    code: str,
    now: datetime,
) -> bool:
    """The server asked the mailbox to wait: no worker sends from it before ``until``.

    A later time wins over an earlier one (two workers may be told at once); True when
    the mailbox was not paused before (a pause moved on is not a new one).
    """
    _create_rows(session, [pace.mailbox])
    row = session.get(MailboxPace, pace.mailbox, with_for_update=True, populate_existing=True)
    assert row is not None  # just made
    before = row.paused_until
    if before is not None and before >= until:
        return False
    row.paused_until = until
    row.pause_reason = reason
    row.pause_code = code or None
    if before is not None and before > now:
        return False
    signals.emit_after_commit(
        session,
        "mailbox-paused",
        mailbox=pace.mailbox,
        user_id=account.user_id,
        email=account.email,
        until=until,
        reason=reason,
        code=code,
    )
    return True


def quota_until(session: Session, pace: Pace, user_id: int, now: datetime) -> datetime:
    """When a spent daily quota frees again: 24 hours after the oldest send of the
    rolling day we know of (our windows, else the user's sent mail), else in an hour."""
    _, oldest = _window(session, pace.mailbox, now - DAY, MailboxSend.recipients)
    if oldest is None:
        oldest = session.scalar(
            select(func.min(OutboxMessage.sent_at)).where(
                OutboxMessage.user_id == user_id, OutboxMessage.sent_at > now - DAY
            )
        )
    return oldest + DAY if oldest is not None else now + QUOTA_GUESS


def waiting(session: Session, pace: Pace, now: datetime) -> str | None:
    """Why the mailbox waits now and until when, for ``crm outbox show``; None if it
    does not."""
    row = session.get(MailboxPace, pace.mailbox)
    return None if row is None else _why_waits(row, pace.name, now)


def _why_waits(row: MailboxPace, name: str, now: datetime) -> str | None:
    if row.paused_until is not None and row.paused_until > now:
        said = f" ({row.pause_code})" if row.pause_code else ""
        return (
            f"the server paused sending from {name}{said}; next at "
            f"{clock_text(row.paused_until)}: {row.pause_reason or ''}".rstrip(": ")
        )
    if row.paced_until is not None and row.paced_until > now:
        return f"{row.paced_reason}; next at {clock_text(row.paced_until)}"
    return None


def waiting_mailboxes(session: Session, now: datetime) -> list[tuple[str, str]]:
    """Every mailbox that waits now, with why and until when (``crm outbox pauses``):
    the server's pauses and our own limits, which hold every sender of that mailbox."""
    rows = session.scalars(
        select(MailboxPace)
        .where((MailboxPace.paused_until > now) | (MailboxPace.paced_until > now))
        .order_by(MailboxPace.mailbox)
    )
    found = []
    for row in rows:
        words = _why_waits(row, mailbox_name(row.mailbox), now)
        if words is not None:
            found.append((row.mailbox, words))
    return found


def waiting_senders(
    crm: Crm, session: Session, user_ids: Iterable[int], now: datetime
) -> dict[int, str]:
    """Why each of these senders' mailboxes waits now (only those that wait), for
    ``crm outbox list`` and ``show``: the server's pause, or our own limits."""
    from crm_core.models import User

    found: dict[int, str] = {}
    for user_id in set(user_ids):
        user = session.get(User, user_id)
        account = crm.sender_state(session, user)[0] if user is not None else None
        if account is None:
            continue
        said = waiting(session, pace_for(crm, account), now)
        if said is not None:
            found[user_id] = said
    return found


def clock_text(at: datetime) -> str:
    """``2026-12-08 10:42:13 UTC``: the database's clock, as every stored time."""
    return f"{at:%Y-%m-%d %H:%M:%S} UTC"
