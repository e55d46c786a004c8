"""The bytes and envelope that go over the wire for one message.

The core renders each message once, at enqueue, and stores the bytes (RFC 2047
headers and IDNA domains unless SMTPUTF8 is needed, 8-bit text where the text needs
it); this module only fits them to the session: the envelope, BODY=8BITMIME or
SMTPUTF8, the core's 7-bit rendering when the server lacks 8BITMIME, and SIZE.

A message that cannot be rendered or encoded (a control character in a header, text
that no charset can encode, an international address without SMTPUTF8) raises
:class:`Unsendable`: a permanent failure of that message alone, so the rest of the
batch is sent.
"""

from __future__ import annotations

import email.errors
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from crm_core.plugin_api import Address, Outcome, OutgoingMessage, render_message
from smtp_mail.classify import Failure

# C0 controls but tab, DEL, C1 controls and the Unicode line separators: the email
# package folds or splits a header at some of them (a vertical tab becomes a line
# break), and smtplib refuses a command line holding CR or LF.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "\x00": "NUL",
        "\n": "line feed",
        "\v": "vertical tab",
        "\f": "form feed",
        "\r": "carriage return",
        "\x1b": "escape",
        "\x7f": "delete",
        "\x85": "next line",
        "\u2028": "line separator",
        "\u2029": "paragraph separator",
    }
)

# What the email package and the codecs raise for content they cannot encode
# (UnicodeError and idna's errors are ValueErrors). A TypeError stays a bug.
_ENCODING_ERRORS = (ValueError, LookupError, email.errors.MessageError)


@dataclass(frozen=True)
class Envelope:
    """What MAIL FROM, RCPT TO and DATA carry for one message.

    ``recipients`` are the RCPT addresses as written on the wire (IDNA domains
    without SMTPUTF8), each once; ``addresses`` the same recipients as the outbox
    knows them (``Address.email``), in the same order, for the results.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    options: tuple[str, ...]
    addresses: tuple[str, ...] = ()


def prepare(message: OutgoingMessage, features: Mapping[str, str], server: str) -> Envelope:
    """The envelope for this server; raises Unsendable when it cannot carry it."""
    if not message.recipients:
        raise Unsendable(
            Failure(Outcome.PERMANENT, "The message has no recipients.", "", "no-recipients")
        )
    _refuse_control_characters(message)
    try:
        return _prepare(message, features, server)
    except _ENCODING_ERRORS as exc:
        raise Unsendable(_unencodable(exc)) from exc


def _prepare(message: OutgoingMessage, features: Mapping[str, str], server: str) -> Envelope:
    """The stored bytes (rendered once, at enqueue), or the core's rendering of them:
    for a row queued before bytes were stored, or in 7 bits for a server without
    8BITMIME when the stored bytes hold 8-bit text."""
    international = message.needs_smtputf8
    if international and "smtputf8" not in features:
        raise Unsendable(_no_smtputf8(message, server))
    eight_bit = "8bitmime" in features
    data = message.rendered
    if data is None or not (eight_bit or data.isascii()):
        data = render_message(message, eight_bit)
    options = ["SMTPUTF8", "BODY=8BITMIME"] if international else []
    if not international and not data.isascii():
        options.append("BODY=8BITMIME")
    return _finish(message, data, options, features, server)


def _finish(
    message: OutgoingMessage,
    data: bytes,
    options: list[str],
    features: Mapping[str, str],
    server: str,
) -> Envelope:
    """Check the SIZE limit and build the envelope around the rendered bytes."""
    international = "SMTPUTF8" in options
    limit = _size_limit(features)
    if limit and len(data) > limit:
        raise Unsendable(_too_large(len(data), limit, server))
    if "size" in features:
        options.insert(0, f"SIZE={len(data)}")
    rcpts: dict[str, str] = {}  # one RCPT per mailbox, even when it is both To and Cc
    for addr in message.recipients:
        rcpts.setdefault(_wire_address(addr, international), addr.email)
    return Envelope(
        sender=_wire_address(message.sender, international),
        recipients=tuple(rcpts),
        data=data,
        options=tuple(options),
        addresses=tuple(rcpts.values()),
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


def _refuse_control_characters(message: OutgoingMessage) -> None:
    """Refuse a header or envelope text with a control character, naming it.

    Why before rendering: the email package does not always raise; it may turn a
    vertical tab into a line break and send a broken header.
    """
    for what, text in _header_texts(message):
        found = _CONTROL.search(text)
        if found is not None:
            raise Unsendable(_control_character(what, found.group()))


def _header_texts(message: OutgoingMessage) -> Iterator[tuple[str, str]]:
    """Each text that goes into a header or an SMTP command, with its name."""
    yield "the subject", message.subject
    groups = (
        ("From", (message.sender,)),
        ("To", message.to),
        ("Cc", message.cc),
        ("Bcc", message.bcc),
        ("Reply-To", message.reply_to),
        ("envelope", message.envelope),
    )
    for field, addresses in groups:
        for addr in addresses:
            yield f"the {field} address {addr.email!r}", addr.email
            yield f"the {field} name of {addr.email}", addr.name
    for att in message.attachments:
        yield f"the attachment name {att.filename!r}", att.filename
        yield f"the content type of {att.filename!r}", att.content_type


def _control_character(what: str, char: str) -> Failure:
    name = _CONTROL_NAMES.get(char, "a control character")
    return Failure(
        Outcome.PERMANENT,
        f"The message cannot be sent: {what} contains a {name} (U+{ord(char):04X}), "
        "which a mail header cannot carry.",
        "Remove the character, then send the message again.",
        "bad-header",
    )


def _unencodable(exc: Exception) -> Failure:
    return Failure(
        Outcome.PERMANENT,
        f"The message could not be encoded for sending ({type(exc).__name__}: {exc}); "
        "nothing of it was sent.",
        "Look for unusual characters in the subject, the names, the text and the "
        "attachments' names; correct them, then send the message again.",
        "unencodable",
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
