"""The bytes and envelope that go over the wire for one message.

Why here and not in the core's rendering: what is allowed depends on what this server
offers. The core renders one MIME message (Message-ID, Date, From, parts); this module
only adapts it to the session: RFC 2047 headers and IDNA domains unless SMTPUTF8 is
used, 8-bit parts re-encoded when the server lacks 8BITMIME, and the SIZE limit.
"""

from __future__ import annotations

import email.policy
from collections.abc import Mapping
from dataclasses import dataclass
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage

from crm_core.mail.addresses import Address
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import Outcome
from smtp_mail.classify import Failure

_ADDRESS_HEADERS = ("From", "To", "Cc", "Reply-To")


@dataclass(frozen=True)
class Envelope:
    """What MAIL FROM, RCPT TO and DATA carry for one message."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    options: tuple[str, ...]


def prepare(message: OutgoingMessage, features: Mapping[str, str], server: str) -> Envelope:
    """The envelope for this server; raises SmtpUnsendable when it cannot carry it."""
    international = message.needs_smtputf8
    if international and "smtputf8" not in features:
        raise Unsendable(_no_smtputf8(message, server))
    mime = message.to_email_message()
    options: list[str] = []
    if international:
        options += ["SMTPUTF8", "BODY=8BITMIME"]
    else:
        _ascii_address_headers(mime, message)
        if _has_8bit(mime):
            if "8bitmime" in features:
                options.append("BODY=8BITMIME")
            else:
                _seven_bit(mime)
    policy = email.policy.SMTPUTF8 if international else email.policy.SMTP
    data = mime.as_bytes(policy=policy)
    limit = _size_limit(features)
    if limit and len(data) > limit:
        raise Unsendable(_too_large(len(data), limit, server))
    if "size" in features:
        options.insert(0, f"SIZE={len(data)}")
    return Envelope(
        sender=_wire_address(message.sender, international),
        recipients=tuple(_wire_address(a, international) for a in message.recipients),
        data=data,
        options=tuple(options),
    )


class Unsendable(Exception):
    """This server can never carry the message as it is (a permanent failure)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


def _wire_address(addr: Address, international: bool) -> str:
    if international:
        return addr.email
    ascii_email = addr.ascii_email
    assert ascii_email is not None  # only international messages have non-ASCII locals
    return ascii_email


def _ascii_address_headers(mime: EmailMessage, message: OutgoingMessage) -> None:
    """Write domains as IDNA (xn--): without SMTPUTF8 a header may hold only ASCII."""
    groups: dict[str, tuple[Address, ...]] = {
        "From": (message.sender,),
        "To": message.to,
        "Cc": message.cc,
        "Reply-To": message.reply_to,
    }
    for name in _ADDRESS_HEADERS:
        addresses = groups[name]
        if name in mime and any(not a.domain.isascii() for a in addresses):
            mime.replace_header(name, [_ascii_header_address(a) for a in addresses])


def _ascii_header_address(addr: Address) -> HeaderAddress:
    local, _, domain = (addr.ascii_email or addr.email).rpartition("@")
    return HeaderAddress(display_name=addr.name, username=local, domain=domain)


def _has_8bit(mime: EmailMessage) -> bool:
    return any(
        str(part.get("Content-Transfer-Encoding", "")).lower() == "8bit" for part in mime.walk()
    )


def _seven_bit(mime: EmailMessage) -> None:
    """Re-encode 8-bit text parts as quoted-printable for a server without 8BITMIME."""
    for part in mime.walk():
        if str(part.get("Content-Transfer-Encoding", "")).lower() != "8bit":
            continue
        assert isinstance(part, EmailMessage)
        text = part.get_content()
        part.set_content(
            text,
            subtype=part.get_content_subtype(),
            charset=part.get_content_charset() or "utf-8",
            cte="quoted-printable",
        )


def _size_limit(features: Mapping[str, str]) -> int:
    raw = features.get("size", "").strip()
    return int(raw) if raw.isdigit() else 0


def _no_smtputf8(message: OutgoingMessage, server: str) -> Failure:
    names = ", ".join(a.email for a in (message.sender, *message.recipients) if a.needs_smtputf8)
    return Failure(
        Outcome.PERMANENT,
        f"{server} does not support international e-mail addresses (no SMTPUTF8), "
        f"so it cannot send to or from {names}.",
        "Use the recipient's ASCII address if they have one, or send through a server "
        "that offers SMTPUTF8 (Microsoft 365 and Gmail do).",
        "no-smtputf8",
    )


def _too_large(size: int, limit: int, server: str) -> Failure:
    return Failure(
        Outcome.PERMANENT,
        f"The message is {size / 1_048_576:.1f} MB; {server} accepts at most "
        f"{limit / 1_048_576:.1f} MB.",
        "Send smaller attachments, or share large files by link.",
        "552 5.3.4",
    )
