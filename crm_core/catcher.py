"""A local mail catcher for development: an SMTP server on loopback that keeps mail.

Why: ``make run`` must show the whole product without a real mail server. The demo
user's SMTP settings point here, so a mail goes the real way (the outbox, a worker,
the SMTP transport over a socket) and lands in a Maildir folder that the web app's
catcher screen reads. Every message is kept as received, with the envelope added as
``X-Envelope-From`` and ``X-Envelope-To`` headers: the envelope is the only place a
Bcc recipient is visible.

It listens on 127.0.0.1 only and accepts any sender and recipient without a login;
it is not a mail server, and nothing it receives goes further.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import mailbox
import socket
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
ENVELOPE_FROM = "X-Envelope-From"
ENVELOPE_TO = "X-Envelope-To"
MAX_BYTES = 50 * 1024 * 1024


def listen(port: int, host: str = HOST) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port); OSError when taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(32)
    except OSError:
        sock.close()
        raise
    return sock


class _Keeper:
    """aiosmtpd's handler: write each message, envelope first, into the Maildir."""

    def __init__(self, catcher: MailCatcher) -> None:
        self.catcher = catcher

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.catcher.keep(envelope.mail_from or "", list(envelope.rcpt_tos), content)
        return "250 2.0.0 Kept by the crm-mail catcher"


class _Controller(Controller):
    """aiosmtpd's Controller on a socket bound beforehand.

    Why: binding in the caller's thread reports a taken port at once (the stock
    Controller waits out its ready timeout), and port 0 gives the port the OS chose.
    """

    def __init__(self, handler: _Keeper, sock: socket.socket) -> None:
        super().__init__(
            handler, hostname=HOST, port=sock.getsockname()[1], data_size_limit=MAX_BYTES
        )
        self.sock = sock

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(self._factory_invoker, sock=self.sock)

    def _trigger_server(self) -> None:
        with socket.create_connection((HOST, self.port), 1.0) as probe:
            probe.recv(1024)


class MailCatcher:
    """The SMTP server and its Maildir folder; ``start()`` runs it in a thread."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.folder = folder
        self.port = port
        self._controller: _Controller | None = None
        self._kept = 0
        self._changed = threading.Condition()

    def start(self) -> Self:
        """Listen on 127.0.0.1 (OSError when the port is taken) and serve in a thread."""
        if self._controller is not None:
            raise RuntimeError("the mail catcher is already running")
        mailbox.Maildir(self.folder, create=True)
        sock = listen(self.port)
        controller = _Controller(_Keeper(self), sock)
        try:
            controller.start()
        except BaseException:
            with contextlib.suppress(Exception):
                controller.stop(no_assert=True)
            sock.close()
            raise
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening and join the server thread; the port is free afterwards."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
            controller.sock.close()

    def keep(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
        """Write one message with its envelope as headers; its Maildir key."""
        head = f"{ENVELOPE_FROM}: <{mail_from}>\n{ENVELOPE_TO}: {', '.join(rcpt_tos)}\n"
        data = head.encode("utf-8") + content.replace(b"\r\n", b"\n")
        key = mailbox.Maildir(self.folder, create=True).add(data)
        with self._changed:
            self._kept += 1
            self._changed.notify_all()
        return key

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until this catcher has kept ``count`` messages (for tests and scripts)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._kept >= count, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- reading what was caught ---------------------------------------------------------


@dataclass(frozen=True)
class Caught:
    """One kept message, as the list shows it."""

    key: str
    sender: str
    to: str
    subject: str
    received: datetime


@dataclass(frozen=True)
class Attachment:
    """A part that is a file: its name, type and size."""

    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Letter:
    """One kept message, opened: headers, bodies as text, attachments."""

    summary: Caught
    envelope_from: str
    envelope_to: str
    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    attachments: list[Attachment]


def _box(folder: Path) -> mailbox.Maildir | None:
    return mailbox.Maildir(folder, create=False) if (folder / "new").is_dir() else None


def _header(message: EmailMessage, name: str) -> str:
    """A header's decoded value ("" when missing or beyond decoding)."""
    try:
        return str(message.get(name) or "")
    except Exception:  # a malformed header must not hide the rest of the mail
        return ""


def _summary(key: str, raw: mailbox.MaildirMessage) -> Caught:
    message = email.message_from_bytes(raw.as_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return Caught(
        key=key,
        sender=_header(message, "From"),
        to=_header(message, "To"),
        subject=_header(message, "Subject"),
        received=datetime.fromtimestamp(raw.get_date(), UTC),
    )


def list_caught(folder: Path) -> list[Caught]:
    """Every kept message, newest first."""
    box = _box(folder)
    if box is None:
        return []
    found = [_summary(key, raw) for key, raw in box.items()]
    return sorted(found, key=lambda c: (c.received, c.key), reverse=True)


def open_caught(folder: Path, key: str) -> Letter | None:
    """The kept message ``key``, or None when there is no such message."""
    box = _box(folder)
    if box is None or "/" in key or key.startswith("."):
        return None
    try:
        raw = box.get_message(key)
    except KeyError:
        return None
    message = email.message_from_bytes(raw.as_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return Letter(
        summary=_summary(key, raw),
        envelope_from=_header(message, ENVELOPE_FROM),
        envelope_to=_header(message, ENVELOPE_TO),
        headers=[
            (name, _header_value(value))
            for name, value in message.items()
            if name not in (ENVELOPE_FROM, ENVELOPE_TO)
        ],
        text=_body(message, "plain"),
        html=_body(message, "html"),
        attachments=_attachments(message),
    )


def _header_value(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # a malformed header is shown as Python sees it
        return repr(value)


def _body(message: EmailMessage, kind: str) -> str | None:
    part = message.get_body(preferencelist=(kind,))
    if part is None or not isinstance(part, EmailMessage):
        return None
    try:
        return str(part.get_content())
    except (LookupError, ValueError):  # an unknown charset: show the bytes decoded loosely
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


def _attachments(message: EmailMessage) -> list[Attachment]:
    found = []
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        found.append(
            Attachment(
                filename=str(part.get_filename() or ""),
                content_type=part.get_content_type(),
                size=len(payload) if isinstance(payload, bytes) else 0,
            )
        )
    return found
