"""Putting a mail in the outbox: validate everything, then write the row.

Every function here takes a Session and never commits: :func:`enqueue` writes in the
caller's transaction, so the CRM change and the mail commit together or not at all.
:func:`plan` answers ``crm send --dry-run`` with the same checks and writes nothing.
"""

from __future__ import annotations

import email.errors
import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Select, Table, func, insert, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from crm_core import signals
from crm_core.errors import MailValidationError, Problem
from crm_core.mail import wakeup
from crm_core.mail.addresses import Address, header_problem, read_address, validate_addresses
from crm_core.mail.message import Attachment, OutgoingMessage, make_message_id
from crm_core.mail.policy import S
from crm_core.mail.render import render
from crm_core.mail.senders import senders
from crm_core.mail.transport import SenderAccount
from crm_core.models import (
    AccountPause,
    OutboxAttachment,
    OutboxMessage,
    Person,
    PersonActivity,
    User,
)

if TYPE_CHECKING:
    from crm_core.app import Crm


@dataclass(frozen=True)
class MailRequest:
    """What a caller wants sent. The From address is always the sender user's own.

    Every address may carry a display name (``Per Persson <per@example.se>``), which
    is kept; one value holds one address. The sender's typed name is not used: From
    carries the user's name from the register. With ``person_email``, that person's
    name from the register is the display name of their address among the
    recipients, replacing a typed one, so the mail greets them as the CRM knows them.
    Private domains (corp.local) are refused for the sender and every recipient
    unless ``mail.allow_private_domains`` is set: one rule for the installation, the
    same one the register applies when users and persons are added.
    """

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
            "problems": [p.as_dict() for p in self.problems],
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
    paused: str | None = None


def enqueue(crm: Crm, session: Session, request: MailRequest) -> Queued:
    """Validate everything, then queue the mail in the caller's transaction.

    Raises MailValidationError ("Error validating e-mail") listing every problem;
    nothing is written then. On success the Message-ID is fixed for every attempt.
    """
    return enqueue_many(crm, session, [request], labels=[""])[0]


def enqueue_many(
    crm: Crm,
    session: Session,
    requests: Sequence[MailRequest],
    labels: Sequence[str] | None = None,
) -> list[Queued]:
    """Queue many mails in the caller's transaction: all of them, or none.

    Each is checked as :func:`enqueue` checks one; each sender is resolved once (see
    :mod:`crm_core.mail.senders`) and the rows are written with one INSERT per table.
    Raises MailValidationError listing every problem of every mail, each named by its
    label (default ``mail 1``, ``mail 2``, ...); nothing is written then.
    """
    names = list(labels) if labels is not None else [f"mail {i + 1}" for i in range(len(requests))]
    if len(names) != len(requests):
        raise ValueError("one label per request")
    checked = [_check(crm, session, request) for request in requests]
    problems = [
        _labelled(p, name) for c, name in zip(checked, names, strict=True) for p in c.problems
    ]
    if problems:
        raise MailValidationError(problems)
    if not checked:
        return []
    known = senders(session)
    now = known.now(session)
    values = [_outbox_values(c, now) for c in checked]
    ids = _insert_rows(session, values)
    _insert_attachments(session, checked, ids)
    _insert_activities(session, checked, values, ids, now)
    if not known.announced:  # once per transaction: PostgreSQL delivers one anyway
        wakeup.announce(session)
        known.announced = True
    for outbox_id, row in zip(ids, values, strict=True):
        signals.emit_after_commit(
            session,
            "mail-queued",
            outbox_id=outbox_id,
            message_id=row["message_id"],
            user_id=row["user_id"],
            person_id=row["person_id"],
        )
    return [
        Queued(outbox_id, row["message_id"], row["state"], c.paused)
        for outbox_id, row, c in zip(ids, values, checked, strict=True)
    ]


def check_many(
    crm: Crm,
    session: Session,
    requests: Sequence[MailRequest],
    labels: Sequence[str] | None = None,
) -> list[Problem]:
    """Every problem :func:`enqueue_many` would refuse these mails for; writes nothing."""
    return _check_all(crm, session, requests, labels)[1]


def _check_all(
    crm: Crm, session: Session, requests: Sequence[MailRequest], labels: Sequence[str] | None
) -> tuple[list[_Checked], list[Problem]]:
    names = list(labels) if labels is not None else [f"mail {i + 1}" for i in range(len(requests))]
    if len(names) != len(requests):
        raise ValueError("one label per request")
    checked = [_check(crm, session, request) for request in requests]
    problems = [
        _labelled(p, name) for c, name in zip(checked, names, strict=True) for p in c.problems
    ]
    return checked, problems


def _labelled(problem: Problem, label: str) -> Problem:
    if not label:
        return problem
    return replace(problem, key=f"{label}: {problem.key}" if problem.key else label)


def _insert_rows(session: Session, values: Sequence[dict[str, Any]]) -> list[int]:
    """Write every row with one executemany; the new ids, in order.

    PostgreSQL: the ids are taken from the table's sequence first (one query), so the
    INSERT needs no RETURNING and psycopg sends the rows as one pipelined executemany;
    SQLAlchemy's multi-row VALUES form of RETURNING made psycopg parse a query with a
    placeholder per value (most of a bulk enqueue's time). One row, and SQLite: RETURNING
    (one round trip), in order.
    """
    table = cast(Table, OutboxMessage.__table__)
    if session.get_bind().dialect.name == "postgresql" and len(values) > 1:
        ids = [int(i) for i in session.scalars(_next_ids(len(values)))]
        session.execute(insert(table), [{**v, "id": i} for v, i in zip(values, ids, strict=True)])
        return ids
    return [int(i) for i in session.scalars(_insert_returning_ids(), list(values))]


@functools.lru_cache(maxsize=1)
def _insert_returning_ids() -> ReturningInsert[int]:
    """The outbox INSERT … RETURNING id, built once: building and keying it afresh
    for every mail cost a sixth of a single enqueue's CPU (262 against 221 µs)."""
    table = cast(Table, OutboxMessage.__table__)
    return insert(table).returning(table.c.id, sort_by_parameter_order=True)


def _next_ids(count: int) -> Select[Any]:
    sequence = func.pg_get_serial_sequence(OutboxMessage.__tablename__, "id")
    return select(func.nextval(sequence)).select_from(func.generate_series(1, count))


def _insert_attachments(session: Session, checked: Sequence[_Checked], ids: Sequence[int]) -> None:
    rows = [
        {
            "outbox_id": outbox_id,
            "filename": a.filename,
            "content_type": a.content_type,
            "data": a.data,
        }
        for c, outbox_id in zip(checked, ids, strict=True)
        if c.message is not None
        for a in c.message.attachments
    ]
    if rows:
        session.execute(insert(cast(Table, OutboxAttachment.__table__)), rows)


def _insert_activities(
    session: Session,
    checked: Sequence[_Checked],
    values: Sequence[dict[str, Any]],
    ids: Sequence[int],
    now: datetime,
) -> None:
    """The person's history line for each mail sent with ``person_email``."""
    rows = [
        {
            "person_id": c.person.id,
            "user_id": row["user_id"],
            "outbox_id": outbox_id,
            "kind": "mail",
            "summary": f"Mail “{row['subject']}” from {row['sender_email']} (outbox #{outbox_id})",
            "created_at": now,
        }
        for c, row, outbox_id in zip(checked, values, ids, strict=True)
        if c.person is not None
    ]
    if rows:
        session.execute(insert(cast(Table, PersonActivity.__table__)), rows)


def is_queued(session: Session, message_id: str) -> bool:
    """Whether the outbox holds the mail with this Message-ID (committed, or in this
    session): what a caller interrupted mid-commit asks before it tries again."""
    found = session.scalar(select(OutboxMessage.id).where(OutboxMessage.message_id == message_id))
    return found is not None


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
    known = senders(session)
    sender = known.sender(crm, session, request.sender_email)
    allow_private = known.allow_private
    checked = _Checked(list(sender.problems), sender.user, sender.account, paused=sender.paused)
    to, cc, bcc, reply_to = (
        _addresses(raw, name, allow_private, checked.problems)
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
        checked.person = _person(session, request.person_email, checked.problems)
    checked.problems.extend(_register_name_problems(checked.user, checked.person))
    if checked.user is not None:
        checked.message = OutgoingMessage(
            outbox_id=0,
            message_id=make_message_id(checked.user.email.rpartition("@")[2], crm.clock()),
            sender=Address(checked.user.email, checked.user.name),
            to=_named(to, checked.person),
            cc=_named(cc, checked.person),
            bcc=_named(bcc, checked.person),
            reply_to=_named(reply_to, checked.person),
            subject=request.subject.strip(),
            text=request.text,
            html=request.html,
            attachments=tuple(request.attachments),
        )
        checked.problems.extend(_limit_problems(crm, checked.message))
        if checked.account is not None:
            checked.problems.extend(crm.message_problems(checked.account, checked.message))
    return checked


def _person(session: Session, raw: str, problems: list[Problem]) -> Person | None:
    """The register's person for ``crm send --person`` (which may carry a name too)."""
    found = read_address(raw, allow_private=True)  # a lookup: the register decides
    email = found.email if isinstance(found, Address) else raw.strip()
    person = session.scalar(select(Person).where(Person.email == email.lower()))
    if person is None:
        problems.append(Problem("person", f"no person with e-mail {raw!r} in the register"))
    return person


def _register_name_problems(user: User | None, person: Person | None) -> list[Problem]:
    """The register's names become display names (From, the person's To): checked
    here too, because a name saved before the register refused control characters
    would otherwise break the worker's batch."""
    named = [(f"sender {user.email}: name", user.name)] if user else []
    if person is not None:
        named.append((f"person {person.email}: name", person.name))
    found = (header_problem(name, where) for where, name in named)
    return [problem for problem in found if problem is not None]


def _addresses(
    raws: Sequence[str], name: str, allow_private: bool, problems: list[Problem]
) -> list[Address]:
    if isinstance(raws, str):  # a lone string would be split into characters
        raws = [raws]
    good, bad = validate_addresses(raws, name, allow_private=allow_private)
    problems.extend(bad)
    return good


def _named(addresses: list[Address], person: Person | None) -> tuple[Address, ...]:
    """The person's own address carries their name from the register.

    Always, even over a typed name: the register is where names are kept right; a
    typed one may be a nickname, a typo or a copy from another mail.
    """
    if person is None or not person.name.strip():
        return tuple(addresses)
    name = unicodedata.normalize("NFC", person.name.strip())
    return tuple(replace(a, name=name) if a.email.lower() == person.email else a for a in addresses)


MAX_SUBJECT_CHARS = 998 - len("Subject: ")
"""A header line holds at most 998 characters (RFC 5322, 2.1.1). A subject is folded
at its spaces, but a run without one cannot be, and a server refused such a line
("500 Line too long") only when the worker sent it; so the subject as a whole is held to
what fits on the one line, a limit that no real subject reaches."""


def _content_problems(request: MailRequest) -> list[Problem]:
    problems: list[Problem] = []
    if not request.subject.strip():
        problems.append(Problem("subject", "a subject is required"))
    subject_problem = header_problem(request.subject, "subject")
    if subject_problem:
        problems.append(subject_problem)
    if len(request.subject.strip()) > MAX_SUBJECT_CHARS:
        problems.append(
            Problem(
                "subject",
                f"is {len(request.subject.strip())} characters long; mail allows at most "
                f"{MAX_SUBJECT_CHARS}",
                "shorten the subject and put the rest in the body",
            )
        )
    problems.extend(_body_problems(request))
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


def _body_problems(request: MailRequest) -> list[Problem]:
    """A NUL character is refused in the text and HTML bodies: SMTP forbids it in a
    mail's text (RFC 5322, 2.3), servers cut or refuse the mail at it, and it is
    never part of text a person wrote."""
    bodies = (("body", request.text), ("html", request.html or ""))
    return [
        Problem(
            where,
            f"contains a NUL character (U+0000) at position {text.index(chr(0))}",
            "remove it; a binary file is sent with --attach",
        )
        for where, text in bodies
        if "\0" in text
    ]


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


def _outbox_values(checked: _Checked, now: datetime) -> dict[str, Any]:
    """The outbox row's columns for a checked mail."""
    user, account, message, person = checked.user, checked.account, checked.message, checked.person
    assert user is not None and account is not None and message is not None
    return {
        "message_id": message.message_id,
        "user_id": user.id,
        "person_id": person.id if person else None,
        "product_line": user.product_line,
        "transport": account.transport,
        "sender_email": user.email,
        "sender_name": user.name,
        "recipients": {
            "to": [[a.email, a.name] for a in message.to],
            "cc": [[a.email, a.name] for a in message.cc],
            "bcc": [[a.email, a.name] for a in message.bcc],
            "reply_to": [[a.email, a.name] for a in message.reply_to],
        },
        "subject": message.subject,
        "body_text": message.text,
        "body_html": message.html,
        "size_bytes": message.size_estimate(),
        "mime": _rendered(message, now),
        "state": S.QUEUED.value,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _rendered(message: OutgoingMessage, now: datetime) -> bytes | None:
    """The bytes every attempt sends (Date: the row's ``created_at``), or None when
    the text cannot be encoded: the transport then renders it and says why not."""
    try:
        return render(replace(message, created_at=now))
    except (ValueError, LookupError, email.errors.MessageError):
        return None
