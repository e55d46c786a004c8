"""The CRM's tables, in SQLAlchemy 2.0 typed style.

Every timestamp is stored and returned as an aware UTC datetime (SQLite keeps no time
zone, so :class:`UTCDateTime` restores it), because lease and back-off arithmetic
across machines must not depend on local time. No timestamp has a default: the
service that makes a row writes each one from :func:`crm_core.mail.policy.db_now`,
the database's clock, so no application host's clock decides what is compared
(settings with pauses, leases, due times), and a forgotten one fails the insert (NOT
NULL) instead of quietly taking this machine's time.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

BigId = BigInteger().with_variant(Integer(), "sqlite")


def recipient_list(recipients: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """[(email, name)] for ``kind`` in to, cc, bcc, reply_to, from a row's stored
    ``recipients`` (the mapped row's and a claim's plain row's one reading of them)."""
    return [(str(e), str(n)) for e, n in recipients.get(kind, [])]


def utcnow() -> datetime:
    """Now by this machine's clock, aware, in UTC (the default of ``Crm.clock``)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """The one declarative base of crm_core."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Role(StrEnum):
    """A CRM user's role."""

    ADMIN = "admin"
    USER = "user"


class OutboxState(StrEnum):
    """Where an outbox message is in its life; see crm_core.mail.policy."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    UNKNOWN = "unknown"
    CANCELLED = "cancelled"
    PARTIAL = "partial"
    """Final: delivered to some recipients, refused (or given up) for the others."""


class Person(Base):
    """A contact in the CRM register (the guide's "intressent")."""

    __tablename__ = "persons"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320), unique=True)
    mobile: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]

    activities: Mapped[list[PersonActivity]] = relationship(
        back_populates="person", order_by="PersonActivity.id"
    )

    def __repr__(self) -> str:
        return f"Person(id={self.id!r}, email={self.email!r})"


class User(Base):
    """A CRM user; ``email`` is the sender address of every mail they send."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320), unique=True)
    product_line: Mapped[str] = mapped_column(String(40))
    role: Mapped[str] = mapped_column(String(20), default=Role.USER.value)
    created_at: Mapped[datetime]
    password_hash: Mapped[str | None] = mapped_column(String(200))
    """Argon2 hash of the web sign-in password; None: the user cannot sign in yet."""

    def __repr__(self) -> str:
        return f"User(id={self.id!r}, email={self.email!r}, product_line={self.product_line!r})"


class AuditEntry(Base):
    """Who did what, when: settings changed (never their values), mail sent, retried,
    cancelled or resolved. ``actor`` is a user's e-mail, or ``cli:<os user>``."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(60))
    target: Mapped[str] = mapped_column(String(400))
    detail: Mapped[str] = mapped_column(Text, default="")


class SignInFailures(Base):
    """Failed sign-ins counted per account and per client address, for rate limiting.

    In the database, so that every web process of an installation counts together.
    """

    __tablename__ = "sign_in_failures"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime]
    locked_until: Mapped[datetime | None]


class SystemSetting(Base):
    """One installation-wide setting; secrets hold ciphertext only."""

    __tablename__ = "system_settings"

    key: Mapped[str] = mapped_column(String(120), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    secret: Mapped[bool] = mapped_column(Boolean, default=False)
    fingerprint: Mapped[str | None] = mapped_column(String(16))
    bound_to: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """A secret's destination when it was saved: {key: value} of its field's
    ``bound_to`` settings. None for rows saved before bindings existed."""
    updated_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"SystemSetting({self.key!r}, secret={self.secret!r})"


class UserSetting(Base):
    """One per-user setting; secrets hold ciphertext only."""

    __tablename__ = "user_settings"

    user_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(120), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    secret: Mapped[bool] = mapped_column(Boolean, default=False)
    fingerprint: Mapped[str | None] = mapped_column(String(16))
    bound_to: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """As :attr:`SystemSetting.bound_to`, with the user's overrides applied."""
    updated_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"UserSetting(user_id={self.user_id!r}, {self.key!r}, secret={self.secret!r})"


class SecretKeyVersion(Base):
    """One row: how many times the installation's secret key was rotated.

    Why in the database: every process (workers on many machines) reads it cheaply
    and reloads its keys when it went up, and a rotation holds its row lock while it
    re-encrypts, so that a secret saved meanwhile waits and is encrypted with the new
    key instead of the retired one.
    """

    __tablename__ = "secret_key_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    key_id: Mapped[str | None] = mapped_column(String(16))
    """:meth:`crm_core.secret_box.SecretBox.key_id` of the key the last rotation
    encrypted with; None before the first rotation."""


class OutboxMessage(Base):
    """A mail in the durable outbox, from enqueue to its final state.

    ``lease_token`` fences results: a worker writes an outcome only if the token it
    claimed with is still the row's token, so a worker whose lease expired cannot
    overwrite a newer claim.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        Index("ix_outbox_due_by_user", "state", "user_id", "next_attempt_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(250), unique=True)
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id"), index=True)
    person_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("persons.id"))
    product_line: Mapped[str] = mapped_column(String(40))
    transport: Mapped[str] = mapped_column(String(40))
    sender_email: Mapped[str] = mapped_column(String(320))
    sender_name: Mapped[str] = mapped_column(String(200), default="")
    recipients: Mapped[dict[str, Any]] = mapped_column(JSON)
    subject: Mapped[str] = mapped_column(Text)
    body_text: Mapped[str] = mapped_column(Text)
    body_html: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20), default=OutboxState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(120))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    last_outcome: Mapped[str | None] = mapped_column(String(20))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_code: Mapped[str | None] = mapped_column(String(120))
    provider_ref: Mapped[str | None] = mapped_column(String(250))
    server_reply: Mapped[str | None] = mapped_column(Text)
    mime: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The message's bytes, rendered once at enqueue and sent by every attempt (None:
    queued before revision 0004, or not renderable; the transport renders then)."""
    recipient_states: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Each recipient's fate so far: address -> {"state", "reply", "at"}; None before
    any attempt answered per recipient (all share the message's state)."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    attachments: Mapped[list[OutboxAttachment]] = relationship(
        back_populates="message", cascade="all, delete-orphan", order_by="OutboxAttachment.id"
    )
    attempt_log: Mapped[list[OutboxAttempt]] = relationship(
        back_populates="message", cascade="all, delete-orphan", order_by="OutboxAttempt.id"
    )

    def recipient_list(self, kind: str) -> list[tuple[str, str]]:
        """[(email, name)] for ``kind`` in to, cc, bcc, reply_to."""
        return recipient_list(self.recipients, kind)

    def __repr__(self) -> str:
        return f"OutboxMessage(id={self.id!r}, state={self.state!r}, {self.message_id!r})"


class OutboxAttachment(Base):
    """A file attached to an outbox message, stored with it so nothing is lost."""

    __tablename__ = "outbox_attachments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("outbox.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(120))
    data: Mapped[bytes] = mapped_column(LargeBinary)

    message: Mapped[OutboxMessage] = relationship(back_populates="attachments")

    def __repr__(self) -> str:
        return f"OutboxAttachment({self.filename!r}, {len(self.data)} bytes)"


class OutboxAttempt(Base):
    """One attempt to send an outbox message: when, by which transport, and how it ended."""

    __tablename__ = "outbox_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("outbox.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(120))
    transport: Mapped[str] = mapped_column(String(40))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    code: Mapped[str | None] = mapped_column(String(120))

    message: Mapped[OutboxMessage] = relationship(back_populates="attempt_log")

    def __repr__(self) -> str:
        return f"OutboxAttempt(outbox_id={self.outbox_id!r}, #{self.number}, {self.outcome!r})"


class CredentialWarning(Base):
    """An expiry warning already sent for an app credential: once per threshold.

    Keyed by the credential's setting, its expiry date (a new credential starts its
    own warnings) and the threshold in days (60, 30, 7; 0 once expired).
    """

    __tablename__ = "credential_warnings"

    key: Mapped[str] = mapped_column(String(120), primary_key=True)
    expires: Mapped[date] = mapped_column(primary_key=True)
    threshold: Mapped[int] = mapped_column(Integer, primary_key=True)
    sent_at: Mapped[datetime]


class AccountPause(Base):
    """A sender account paused after a configuration error, until settings are fixed."""

    __tablename__ = "account_pauses"

    user_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    transport: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    code: Mapped[str | None] = mapped_column(String(120))
    paused_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"AccountPause(user_id={self.user_id!r}, {self.transport!r})"


class MailboxPace(Base):
    """One sender mailbox's pacing state, shared by every worker through the database.

    The row is what a claim locks while it decides how much the mailbox may send.
    ``paused_until``: the server asked it to wait (429, 432 4.3.2, ErrorServerBusy,
    the daily quota), with the reason the sender is shown. ``paced_until``: our own
    limits hold it until then (a minute's or a day's budget is spent).
    """

    __tablename__ = "mailbox_pacing"

    mailbox: Mapped[str] = mapped_column(String(400), primary_key=True)
    paused_until: Mapped[datetime | None]
    pause_reason: Mapped[str | None] = mapped_column(Text)
    pause_code: Mapped[str | None] = mapped_column(String(120))
    paced_until: Mapped[datetime | None]
    paced_reason: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"MailboxPace({self.mailbox!r})"


class MailboxSlot(Base):
    """Connections or requests one claim holds on a mailbox, under the claim's lease.

    Why a lease: a worker that dies never gives its slots back; they count only
    until ``lease_until``, which the live worker renews with its claim's.
    """

    __tablename__ = "mailbox_slots"

    mailbox: Mapped[str] = mapped_column(String(400), primary_key=True)
    lease_token: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    lease_until: Mapped[datetime]


class MailboxSend(Base):
    """Messages and recipients one claim took from a mailbox's budget, for the rolling
    minute and 24-hour windows (kept for a day)."""

    __tablename__ = "mailbox_sends"
    __table_args__ = (Index("ix_mailbox_sends_at", "mailbox", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(400))
    at: Mapped[datetime]
    messages: Mapped[int] = mapped_column(Integer)
    recipients: Mapped[int] = mapped_column(Integer)


class PersonActivity(Base):
    """An entry in a person's history, e.g. a mail sent to them."""

    __tablename__ = "person_activities"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    person_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("persons.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    outbox_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("outbox.id"))
    kind: Mapped[str] = mapped_column(String(40))
    summary: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]

    person: Mapped[Person] = relationship(back_populates="activities")

    def __repr__(self) -> str:
        return f"PersonActivity(person_id={self.person_id!r}, {self.kind!r})"
