"""The bytes and envelope that go over the wire for one message.

Why here and not in the core's rendering: what is allowed depends on what this server
offers. The core renders one MIME message (Message-ID, Date, From, parts); this module
only adapts it to the session: RFC 2047 headers and IDNA domains unless SMTPUTF8 is
used, 8-bit parts re-encoded when the server lacks 8BITMIME, and the SIZE limit.

A message that cannot be rendered or encoded (a control character in a header, text
that no charset can encode, an international address without SMTPUTF8) raises
:class:`Unsendable`: a permanent failure of that message alone, so the rest of the
batch is sent.
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from types import MappingProxyType

from crm_core.plugin_api import Address, Outcome, OutgoingMessage
from smtp_mail.classify import Failure

_ADDRESS_HEADERS = ("From", "To", "Cc", "Reply-To")

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
    international = message.needs_smtputf8
    if international and "smtputf8" not in features:
        raise Unsendable(_no_smtputf8(message, server))
    if not international and not message.attachments:
        return _finish(message, *_plain_render(message, "8bitmime" in features), features, server)
    return _finish(message, *_mime_render(message, features), features, server)


def _mime_render(message: OutgoingMessage, features: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The full rendering: attachments, international addresses, anything."""
    international = message.needs_smtputf8
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
    return mime.as_bytes(policy=policy), options


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


_WIRE_COMPAT32 = email.policy.compat32.clone(linesep="\r\n")


def _plain_render(message: OutgoingMessage, eight_bit: bool) -> tuple[bytes, list[str]]:
    """The common case (ASCII addresses, text and maybe HTML, no attachments), fast.

    Why: the modern ``email`` API (header registry, content manager, policy folding)
    cost ~0.5 ms per small message, more than the SMTP exchange itself on a LAN
    (benchmark profile, docs/performance.md). The compat32 classes render the same
    message (same Message-ID, Date, From/To/Cc/Reply-To with IDNA domains and RFC 2047
    names, Subject, multipart/alternative) about five times faster. Messages with
    attachments or international addresses keep the full rendering.
    """
    parts = [_text_part(message.text, "plain", eight_bit)]
    if message.html is not None:
        parts.append(_text_part(message.html, "html", eight_bit))
    mime: Message
    if len(parts) == 1:
        mime = parts[0]
    else:
        mime = MIMEMultipart("alternative", _subparts=parts)
        for part in parts:
            del part["MIME-Version"]
    mime["Message-ID"] = message.message_id
    mime["Date"] = email.utils.format_datetime(message.created_at)
    mime["From"] = _compat_address(message.sender)
    mime["To"] = ", ".join(_compat_address(a) for a in message.to)
    if message.cc:
        mime["Cc"] = ", ".join(_compat_address(a) for a in message.cc)
    if message.reply_to:
        mime["Reply-To"] = ", ".join(_compat_address(a) for a in message.reply_to)
    subject = message.subject
    # A Header object is how compat32 takes an RFC 2047 value (email.header docs).
    mime["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    options = ["BODY=8BITMIME"] if eight_bit and not _all_ascii(message) else []
    return mime.as_bytes(policy=_WIRE_COMPAT32), options


def _text_part(text: str, subtype: str, eight_bit: bool) -> Message:
    if not text.endswith("\n"):
        text += "\n"  # as the full rendering's content manager does
    if text.isascii():
        return MIMEText(text, subtype, "us-ascii")
    charset = Charset("utf-8")
    # 8bit only where the server offers 8BITMIME, else quoted-printable. (typeshed
    # types body_encoding as int; None is the documented "no encoding".)
    charset.body_encoding = None if eight_bit else QP  # type: ignore[assignment]
    part = MIMENonMultipart("text", subtype)
    part.set_payload(text, charset)
    return part


def _compat_address(addr: Address) -> str:
    wire = addr.ascii_email or addr.email
    return email.utils.formataddr((addr.name, wire), "utf-8") if addr.name else wire


def _all_ascii(message: OutgoingMessage) -> bool:
    return message.text.isascii() and (message.html is None or message.html.isascii())


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
