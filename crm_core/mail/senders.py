"""What the mails of one transaction share, read once: each sender and the domain rule.

Why: queueing a mail needs the sender's user row, their account and settings, what
stops the account, its pause and ``mail.allow_private_domains``; read for every mail,
that was five queries per mail and most of an enqueue (docs/performance.md). Within
one transaction they are read once per sender. A write in the same session to users,
settings or pauses (through the ORM or ``session.execute``) forgets what was read, so
a mail queued after a settings change is checked against the new settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from crm_core.errors import Problem
from crm_core.mail.addresses import Address, read_address
from crm_core.mail.policy import db_now
from crm_core.mail.transport import SenderAccount
from crm_core.models import AccountPause, SystemSetting, User, UserSetting
from crm_core.settings import private_domains_allowed

if TYPE_CHECKING:
    from crm_core.app import Crm

SENDERS_KEY = "crm.mail.senders"
"""Where a session keeps its transaction's :class:`Senders` (``session.info``)."""
WATCHED = (User, UserSetting, SystemSetting, AccountPause)
WATCHED_TABLES = frozenset(str(c.__tablename__) for c in WATCHED)


@dataclass(frozen=True)
class Sender:
    """A sender as a mail from them is checked: the user, account, problems, pause."""

    user: User | None
    account: SenderAccount | None
    problems: tuple[Problem, ...]
    paused: str | None = None


@dataclass
class Senders:
    """The senders resolved in one transaction, and the private-domains rule."""

    allow_private: bool
    found: dict[str, Sender] = field(default_factory=dict)
    announced: bool = False
    started: datetime | None = None
    """Whether workers were told (at commit) that this transaction queued mail."""

    def now(self, session: Session) -> datetime:
        """The database's now for this transaction's mails.

        PostgreSQL's ``now()`` is the transaction's start, so it is asked once; SQLite's
        clock is read each time (no query).
        """
        if session.get_bind().dialect.name != "postgresql":
            return db_now(session)
        if self.started is None:
            self.started = db_now(session)
        return self.started

    def sender(self, crm: Crm, session: Session, raw: str) -> Sender:
        """The sender typed as ``raw`` (resolved on first use in this transaction)."""
        known = self.found.get(raw)
        if known is None:
            known = self.found[raw] = _resolve(crm, session, raw, self.allow_private)
        return known


def senders(session: Session) -> Senders:
    """This transaction's senders (a new, empty set in a new transaction)."""
    transaction = session.get_transaction()
    held = session.info.get(SENDERS_KEY)
    if held is not None and held[0] is transaction:
        found: Senders = held[1]
        return found
    fresh = Senders(private_domains_allowed(session))
    session.info[SENDERS_KEY] = (transaction, fresh)
    return fresh


def _resolve(crm: Crm, session: Session, raw: str, allow_private: bool) -> Sender:
    found = read_address(raw, allow_private=allow_private)
    if isinstance(found, Problem):
        return Sender(None, None, (replace(found, key=f"from {raw!r}"),))
    user = _user(session, found)
    if user is None:
        problem = Problem(
            f"from {raw.strip()!r}",
            "is not a CRM user; mail can only be sent from a user's own address "
            "(see `crm users list`)",
        )
        return Sender(None, None, (problem,))
    account, problems = crm.sender_state(session, user)
    where = f"sender {user.email}"
    named = tuple(
        Problem(where + (f": {p.key}" if p.key else ""), p.message, p.fix) for p in problems
    )
    pause = session.get(AccountPause, user.id)
    return Sender(user, account, named, pause.reason if pause else None)


def _user(session: Session, address: Address) -> User | None:
    return session.scalar(select(User).where(User.email == address.email.lower()))


def forget(session: Session) -> None:
    """Drop what this session's transaction read about senders."""
    session.info.pop(SENDERS_KEY, None)


def watch(sessions: sessionmaker[Session]) -> None:
    """Forget the senders whenever a session writes users, settings or pauses."""

    def after_flush(session: Session, _context: Any) -> None:
        if SENDERS_KEY not in session.info:
            return
        changed = (*session.new, *session.dirty, *session.deleted)
        if any(isinstance(obj, WATCHED) for obj in changed):
            forget(session)

    def on_execute(state: ORMExecuteState) -> None:
        if state.is_select or SENDERS_KEY not in state.session.info:
            return
        name = getattr(getattr(state.statement, "table", None), "name", None)
        if name is None or name in WATCHED_TABLES:  # None: text SQL, it may write any
            forget(state.session)

    from sqlalchemy import event

    event.listen(sessions, "after_flush", after_flush)
    event.listen(sessions, "do_orm_execute", on_execute)
