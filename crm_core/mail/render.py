"""The one rendering of an outbox message as bytes: done once, at enqueue.

Why once: every attempt of a mail must send the same bytes (same Message-ID, Date,
From, parts) so a recipient's duplicate detection works, and rendering MIME was the
largest cost of sending (docs/performance.md). The bytes are stored on the outbox row
(``outbox.mime``) and a transport sends them as they are.

The bytes use 8-bit text where the text is not ASCII (every current server offers
8BITMIME); :func:`render` with ``eight_bit=False`` gives the 7-bit form (quoted-
printable) for a server without it. Without SMTPUTF8 a header may only hold ASCII:
names are RFC 2047 words and domains IDNA, unless an address has a non-ASCII local
part, when the whole message is UTF-8 (the server must offer SMTPUTF8).
"""

from __future__ import annotations

import email.policy
import email.utils
import secrets
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from typing import cast

from crm_core.mail.addresses import Address
from crm_core.mail.message import OutgoingMessage

_ADDRESS_HEADERS = ("From", "To", "Cc", "Reply-To")
_WIRE_COMPAT32 = email.policy.compat32.clone(linesep="\r\n")


def render(message: OutgoingMessage, eight_bit: bool = True) -> bytes:
    """The message's bytes on the wire (CRLF line ends, Bcc never in the headers).

    Raises what the ``email`` package and the codecs raise for text they cannot
    encode (ValueError, LookupError, email.errors.MessageError).
    """
    if message.needs_smtputf8:
        return message.to_email_message().as_bytes(policy=email.policy.SMTPUTF8)
    if not message.attachments:
        return _direct_render(message, eight_bit) or _plain_render(message, eight_bit)
    return _mime_render(message, eight_bit)


_MAX_HEADER = 78
"""RFC 5322's recommended line length: a longer header is folded, by compat32."""
_MAX_LINE = 998


def _direct_render(message: OutgoingMessage, eight_bit: bool) -> bytes | None:
    """The commonest mail written directly, or None when it needs the email package.

    Why: even compat32 spent ~0.3 ms per small mail folding headers that need no
    folding, now paid by every enqueue. Written directly when every header is ASCII
    and fits on one line, and every body line fits: then the bytes are what the
    email package would write, up to the order of headers and the boundary.
    """
    headers = _direct_headers(message)
    if headers is None:
        return None
    parts = [_direct_part(message.text, "plain", eight_bit)]
    if message.html is not None:
        parts.append(_direct_part(message.html, "html", eight_bit))
    if any(p is None for p in parts):
        return None
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if len(parts) == 1:
        return head.encode("ascii") + b"MIME-Version: 1.0\r\n" + cast(bytes, parts[0])
    boundary = f"=_crm_{secrets.token_hex(16)}"
    marker = f"--{boundary}".encode("ascii")
    if any(marker in cast(bytes, p) for p in parts):
        return None
    body = b"".join(marker + b"\r\n" + cast(bytes, p) + b"\r\n" for p in parts)
    return (
        head.encode("ascii")
        + f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"'
        f"\r\n\r\n".encode("ascii")
        + body
        + marker
        + b"--\r\n"
    )


def _direct_headers(message: OutgoingMessage) -> list[tuple[str, str]] | None:
    values = [
        ("Message-ID", message.message_id),
        ("Date", email.utils.format_datetime(message.created_at)),
        ("From", _compat_address(message.sender)),
        ("To", ", ".join(_compat_address(a) for a in message.to)),
    ]
    if message.cc:
        values.append(("Cc", ", ".join(_compat_address(a) for a in message.cc)))
    if message.reply_to:
        values.append(("Reply-To", ", ".join(_compat_address(a) for a in message.reply_to)))
    values.append(("Subject", message.subject))
    for name, value in values:
        if not value.isascii() or len(name) + 2 + len(value) > _MAX_HEADER:
            return None
        if "\r" in value or "\n" in value:
            return None
    return values


def _direct_part(text: str, subtype: str, eight_bit: bool) -> bytes | None:
    """A text part's headers and body, or None when it needs encoding or folding."""
    if not text.endswith("\n"):
        text += "\n"
    if "\r" in text or not (eight_bit or text.isascii()):
        return None
    lines = text.split("\n")
    if any(len(line.encode()) > _MAX_LINE for line in lines):
        return None
    charset, encoding = ("us-ascii", "7bit") if text.isascii() else ("utf-8", "8bit")
    head = (
        f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return head.encode("ascii") + "\r\n".join(lines[:-1]).encode() + b"\r\n"


def _mime_render(message: OutgoingMessage, eight_bit: bool) -> bytes:
    """The full rendering (the ``email`` package's modern API): attachments."""
    mime = message.to_email_message()
    _ascii_address_headers(mime, message)
    if not eight_bit and _has_8bit(mime):
        _seven_bit(mime)
    return mime.as_bytes(policy=email.policy.SMTP)


def _plain_render(message: OutgoingMessage, eight_bit: bool) -> bytes:
    """The common case (ASCII addresses, text and maybe HTML, no attachments), fast.

    Why: the modern ``email`` API (header registry, content manager, policy folding)
    cost ~0.5 ms per small message, more than the SMTP exchange itself on a LAN. The
    compat32 classes render the same message (same Message-ID, Date, From/To/Cc/
    Reply-To with IDNA domains and RFC 2047 names, Subject, multipart/alternative)
    about five times faster.
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
    return mime.as_bytes(policy=_WIRE_COMPAT32)


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
