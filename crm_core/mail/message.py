"""The message a transport is asked to send, and its one MIME rendering.

Why one rendering: SMTP, the Maildir development transport and any MIME-based plugin
must produce the same bytes for the same outbox row (same Message-ID, Date, From), so
a retry is the same message and a recipient's duplicate detection can work.
"""

from __future__ import annotations

import email.policy
import email.utils
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage

from crm_core.mail.addresses import Address, ascii_domain


@dataclass(frozen=True)
class Attachment:
    """A file attached to a message."""

    filename: str
    content_type: str
    data: bytes

    def __repr__(self) -> str:
        return f"Attachment({self.filename!r}, {self.content_type!r}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class OutgoingMessage:
    """One outbox message, as a transport sees it.

    ``message_id`` was made once at enqueue (with angle brackets) and is reused by
    every attempt, so that a resend can be recognised (and reconciled in Exchange's
    Sent Items by its InternetMessageId).

    ``envelope`` names the recipients this attempt is for, when it is not all of them
    (a later attempt for recipients that were deferred); the headers still show every
    To and Cc. ``handed_over_at`` is when the message was last handed to a transport
    (the start of its latest attempt), on the database's clock: a lookup of a lost
    answer measures "too soon to tell" from it, never from the enqueue.
    """

    outbox_id: int
    message_id: str
    sender: Address
    to: tuple[Address, ...]
    subject: str
    text: str
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    envelope: tuple[Address, ...] = ()
    handed_over_at: datetime | None = None
    rendered: bytes | None = field(default=None, repr=False)
    """The bytes rendered once at enqueue (:mod:`crm_core.mail.render`), sent on every
    attempt; None for a mail queued before they were stored."""

    @property
    def recipients(self) -> tuple[Address, ...]:
        """The envelope recipients of this attempt: To, Cc and Bcc, or ``envelope``."""
        return self.envelope or (self.to + self.cc + self.bcc)

    @property
    def needs_smtputf8(self) -> bool:
        """True when any address has a non-ASCII local part."""
        return any(a.needs_smtputf8 for a in (self.sender, *self.recipients))

    def to_email_message(self) -> EmailMessage:
        """Render as MIME: multipart/alternative for HTML, attachments as parts.

        Bcc is never written into the headers; transports take it from
        :attr:`recipients` for the envelope.
        """
        msg = EmailMessage(policy=email.policy.SMTPUTF8)
        msg["Message-ID"] = self.message_id
        msg["Date"] = email.utils.format_datetime(self.created_at)
        msg["From"] = _header_address(self.sender)
        msg["To"] = [_header_address(a) for a in self.to]
        if self.cc:
            msg["Cc"] = [_header_address(a) for a in self.cc]
        if self.reply_to:
            msg["Reply-To"] = [_header_address(a) for a in self.reply_to]
        msg["Subject"] = self.subject
        msg["MIME-Version"] = "1.0"
        msg.set_content(self.text)
        if self.html is not None:
            msg.add_alternative(self.html, subtype="html")
        for att in self.attachments:
            maintype, _, subtype = att.content_type.partition("/")
            msg.add_attachment(
                att.data,
                maintype=maintype or "application",
                subtype=subtype or "octet-stream",
                filename=att.filename,
            )
        return msg

    def size_estimate(self) -> int:
        """Bytes on the wire, roughly (attachments grow by a third in base64)."""
        body = len(self.text.encode()) + len((self.html or "").encode())
        return body + sum(len(a.data) * 4 // 3 + 200 for a in self.attachments) + 2048


def _header_address(addr: Address) -> HeaderAddress:
    local, _, domain = addr.email.rpartition("@")
    return HeaderAddress(display_name=addr.name, username=local, domain=domain)


def make_message_id(sender_domain: str, now: datetime | None = None) -> str:
    """A new globally unique Message-ID in the sender's domain, with angle brackets.

    ``now`` (default: this machine's clock) is only the readable part; the random
    token makes it unique.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    token = secrets.token_hex(12)
    domain = ascii_domain(sender_domain) if sender_domain else "crm.invalid"
    return f"<crm.{stamp}.{token}@{domain}>"
