"""A protocol-faithful local SMTP server (aiosmtpd) for tests and benchmarks.

Why: the SMTP transport must be exercised with the real ``smtplib`` over real sockets,
including TLS with certificate verification, SASL (PLAIN, LOGIN, XOAUTH2) and the
failures a real server produces: 4xx/5xx replies, dropped connections and the
"ambiguous" case where the message arrived but the reply never did.

Two ways to run it:

* in-process: ``with SmtpServer(...) as server:`` runs aiosmtpd's ``Controller`` in a
  thread on 127.0.0.1 and records every accepted message in ``server.received``;
* as a process (benchmarks, multi-process tests)::

      python -m tests.servers.smtp --port 0 --security none --record FILE

  which prints ``READY <port>``, then ``ACCEPTED <Message-ID>`` for each accepted
  message as it is accepted (and appends the Message-ID to ``FILE``).
  ``start_smtp_process()`` wraps that for tests: its ``wait_for()`` waits on those
  lines, so nothing polls.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import email
import email.policy
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, AnyStr, Literal, Self, get_args

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

if TYPE_CHECKING:
    from .tls import TestCA

Security = Literal["starttls", "ssl", "none"]
AuthMechanism = Literal["PLAIN", "LOGIN", "XOAUTH2"]
FaultName = Literal[
    "rcpt_temporary",
    "rcpt_permanent",
    "mail_from_reject",
    "data_temporary",
    "data_permanent",
    "drop_after_data",
    "drop_before_data",
    "drop_at_rcpt",
    "auth_response",
    "close_idle",
    "refuse_connection",
]

FAULT_NAMES: frozenset[str] = frozenset(get_args(FaultName))
AUTH_MECHANISMS: tuple[str, ...] = get_args(AuthMechanism)
COUNTER_NAMES = (
    "connections",
    "auth_attempts",
    "auth_successes",
    "starttls_count",
    "ehlo_count",
    "rsets",
    "rcpt_commands",
    "data_commands",
    "peak_connections",
    "refused_connections",
)

#: Reply lines used when a fault has no ``response`` of its own. Wording follows
#: Exchange Online where it has a well-known reply.
DEFAULT_FAULT_RESPONSES: Mapping[str, str | None] = MappingProxyType(
    {
        "rcpt_temporary": "451 4.3.0 Temporary server error. Please try again later",
        "rcpt_permanent": "550 5.1.1 User unknown; recipient address rejected",
        "mail_from_reject": (
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
        ),
        "data_temporary": "451 4.3.0 Message deferred, please try again later",
        "data_permanent": "554 5.6.0 Message rejected: invalid content",
        "drop_after_data": None,
        "drop_before_data": None,
        "drop_at_rcpt": None,
        "auth_response": (
            "535 5.7.139 Authentication unsuccessful, "
            "SmtpClientAuthentication is disabled for the Tenant."
        ),
        "close_idle": None,
        "refuse_connection": None,  # TOO_MANY_CONNECTIONS, defined below
    }
)

XOAUTH2_FAILURE = "535 5.7.3 Authentication unsuccessful"
#: Postfix's answer once a transaction has ``smtpd_recipient_limit`` recipients.
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
#: Postfix's answer to a command out of sequence (aiosmtpd's lacks the enhanced code).
_BAD_SEQUENCE = ("503 Error: ", "503 5.5.1 Error: ")
AUTH_SUCCESS = "235 2.7.0 Authentication successful"
#: Exchange Online's maximum message size (36 MiB), advertised with SIZE.
EXCHANGE_SIZE_LIMIT = 37_748_736
#: Exchange Online's greeting to a connection beyond its limit of concurrent
#: connections (three per mailbox).
TOO_MANY_CONNECTIONS = (
    "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, "
    "closing transmission channel"
)
#: How long MAIL waits for ``hold_mail_until_connections`` before going on anyway (a
#: guard, so a client that never opens them fails its test instead of hanging it).
HOLD_GUARD_SECONDS = 10.0

_MESSAGE_ID_RE = re.compile(rb"^message-id:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.I | re.M)
_FOLD_RE = re.compile(rb"\r?\n[ \t]+")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_message_id(data: bytes) -> str | None:
    """The Message-ID header of a raw message, found without parsing the message.

    Why: process mode must stay fast under benchmark load; a regex over the header
    block is enough to identify what arrived.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    header = data if end < 0 else data[: end + 1]
    match = _MESSAGE_ID_RE.search(header)
    if match is None:
        return None
    value = _FOLD_RE.sub(b" ", match.group(1)).strip()
    return value.decode("utf-8", "replace") or None


def _queue_id() -> str:
    """A Postfix-like queue id, different for every accepted message."""
    return uuid.uuid4().hex[:11].upper()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` where (at the moment) nothing listens.

    Why: "connection refused" tests need an address that is certainly closed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port``: a server could take it now (as a restarted one does,
    with SO_REUSEADDR, past the closed connections' TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Received:
    """One message the server accepted (or, for ``drop_after_data``, swallowed)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage
    auth_user: str | None
    connection_id: int
    message_id: str | None
    tls: bool
    smtp_utf8: bool
    mail_options: list[str] = field(default_factory=list)
    queue_id: str = ""


@dataclass
class Fault:
    """A named failure the server injects into matching SMTP exchanges.

    ``times``: fire only this many times (``None`` = every time); ``skip``: let the
    first N matching events pass first; ``address``: only for this address
    (case-insensitive; RCPT faults match the recipient, ``mail_from_reject`` the
    sender, message faults the sender or any recipient, ``auth_response`` the SASL
    user); ``response``: the reply line instead of the default;
    ``after_messages``: for ``close_idle``, close a connection once it has had this
    many messages accepted. ``refuse_connection`` greets a new connection with
    Exchange's ``421 4.3.2`` (too many connections) and closes it; with ``skip`` the
    first ones get through. ``fired`` counts how often the fault has fired.
    """

    name: FaultName
    times: int | None = None
    address: str | None = None
    response: str | None = None
    skip: int = 0
    after_messages: int = 1
    fired: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.name not in FAULT_NAMES:
            raise ValueError(f"unknown fault {self.name!r}; known: {sorted(FAULT_NAMES)}")

    @property
    def reply(self) -> str | None:
        """The reply line this fault sends (None: the connection just closes)."""
        return self.response or DEFAULT_FAULT_RESPONSES[self.name]

    @property
    def exhausted(self) -> bool:
        """True once the fault has fired ``times`` times."""
        return self.times is not None and self.fired >= self.times


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning logged on every AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Protocol(SMTP):
    """One SMTP connection: aiosmtpd's SMTP plus connection ids, real drops, and
    Postfix's session state.

    Why a subclass: the handler hooks cannot close a connection before the reply is
    sent, nor act on the DATA command itself; these overrides can. Like Postfix (and
    unlike aiosmtpd), a 4xx or 5xx after the final dot leaves the transaction open
    until RSET, so a client that sends MAIL next gets ``503 5.5.1 Error: nested MAIL
    command``; a client that resets is served as before.
    """

    # RFC 4954 section 4: SASL response lines may be up to 12288 octets, and a real
    # XOAUTH2 response (an Entra JWT) is 1.5-3 KB; aiosmtpd's default of 1001 would
    # answer "500 Line is longer than limit". (aiosmtpd uses it for DATA lines too.)
    line_length_limit = 12288

    def __init__(self, owner: SmtpServer, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = owner
        self.connection_id = 0
        self.accepted = 0
        self.dropped = False
        self.hold_transaction = False
        self.refused = False

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new TCP connection (not the STARTTLS re-wrap)
            self.connection_id = self.owner._connection_opened(
                self, transport.get_extra_info("peername")
            )
            self.refused = self.owner._over_limit(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._connection_closed(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if self.dropped:  # the connection is gone: never let a reply slip out
            return
        if self.refused and isinstance(status, str) and status.startswith("220 "):
            # Over the connection limit (or refused by a fault): Exchange's 421 instead
            # of the greeting.
            await super().push(TOO_MANY_CONNECTIONS)
            if self.transport is not None:
                self.transport.close()
            return
        if isinstance(status, str) and status.startswith(_BAD_SEQUENCE[0]):
            await super().push(status.replace(*_BAD_SEQUENCE, 1))
            return
        await super().push(status)

    def _set_post_data_state(self) -> None:
        if self.hold_transaction:  # refused after the dot: Postfix keeps it until RSET
            self.hold_transaction = False
            return
        self.envelope = self._create_envelope()  # what aiosmtpd's own does

    def _set_rset_state(self) -> None:
        self.hold_transaction = False
        self._set_post_data_state()

    def drop(self) -> None:
        """Close the TCP connection now, without any reply or TLS close_notify."""
        self.dropped = True
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()

    def uses_tls(self) -> bool:
        """Whether this connection is encrypted (implicit TLS or after STARTTLS)."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def envelope_addresses(self) -> list[str]:
        """Sender and recipients of the current transaction, for fault matching."""
        envelope = self.envelope
        if envelope is None:
            return []
        return [a for a in [envelope.mail_from, *envelope.rcpt_tos] if a]

    async def check_auth_needed(self, caller_method: str) -> bool:
        # Enforced here rather than via aiosmtpd's auth_required, which warns on every
        # connection when TLS is not required for AUTH (plain-text benchmarks).
        assert self.session is not None
        if self.owner.auth_required and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    async def smtp_AUTH(self, arg: str) -> None:
        self.owner._bump("auth_attempts")
        await super().smtp_AUTH(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.owner._bump("rcpt_commands")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.owner._bump("data_commands")
        envelope = self.envelope
        if (
            envelope is not None
            and envelope.rcpt_tos
            and not arg
            and self.owner._take_fault("drop_before_data", self.envelope_addresses())
        ):
            self.drop()
            return
        before = self.accepted
        addresses = self.envelope_addresses()
        await super().smtp_DATA(arg)
        if self.accepted == before or self.dropped:
            return
        accepted = self.accepted
        fault = self.owner._take_fault(
            "close_idle", addresses, lambda f: accepted >= f.after_messages
        )
        if fault is not None:
            if fault.reply:
                await self.push(fault.reply)
            if self.transport is not None:
                self.transport.close()


class _Handler:
    """aiosmtpd handler hooks: envelope checks, recording, faults, XOAUTH2."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        self.owner._bump("ehlo_count")
        if not self.owner.auth_mechanisms:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        if self.owner.pipelining:  # as Postfix and Exchange Online do (RFC 2920)
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    def handle_STARTTLS(self, server: _Protocol, session: Session, envelope: Envelope) -> bool:
        self.owner._bump("starttls_count")
        return True

    async def handle_RSET(self, server: _Protocol, session: Session, envelope: Envelope) -> str:
        self.owner._bump("rsets")
        return "250 2.0.0 Resetting"

    async def handle_QUIT(self, server: _Protocol, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Service closing transmission channel"

    async def handle_MAIL(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self.owner._hold_for_connections()
        fault = self.owner._take_fault("mail_from_reject", [address])
        if fault is not None:
            return fault.reply or ""
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.owner._take_fault("drop_at_rcpt", [address]):
            server.drop()
            return ""
        for name in ("rcpt_permanent", "rcpt_temporary"):
            fault = self.owner._take_fault(name, [address])
            if fault is not None:
                return fault.reply or ""
        limit = self.owner.recipient_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: _Protocol, session: Session, envelope: Envelope) -> str:
        addresses = server.envelope_addresses()
        for name in ("data_permanent", "data_temporary"):
            fault = self.owner._take_fault(name, addresses)
            if fault is not None:
                server.hold_transaction = True
                return fault.reply or ""
        queue_id = _queue_id()
        self.owner._record(server, session, envelope, queue_id)
        server.accepted += 1
        if self.owner._take_fault("drop_after_data", addresses):
            server.drop()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        self.owner._record_error(error)
        return f"500 Error: ({error.__class__.__name__}) {error}"

    def check_login(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: LoginPassword,
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for PLAIN and LOGIN, against ``users``."""
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.owner.users.get(user) == password
        return self.owner._auth_verdict(user, ok, failure=None)

    async def auth_XOAUTH2(self, server: _Protocol, args: list[str]) -> AuthResult:
        """SASL XOAUTH2: ``user=<u>^Aauth=Bearer <token>^A^A``, both SASL forms."""
        if len(args) == 2:
            try:
                raw = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        else:
            blob = await server.challenge_auth("", encode_to_b64=False)
            if blob is MISSING:  # "*" or bad base64: aiosmtpd already replied 501
                return AuthResult(success=False, handled=True)
            raw = blob
        fields = dict(
            part.split("=", 1)
            for part in raw.decode("utf-8", "replace").split("\x01")
            if "=" in part
        )
        user = fields.get("user", "")
        bearer = fields.get("auth", "")
        token = bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else ""
        validator = self.owner.token_validator
        ok = bool(user and token and validator is not None and validator(user, token))
        return self.owner._auth_verdict(user, ok, failure=XOAUTH2_FAILURE)


class _Controller(Controller):
    """aiosmtpd's Controller, able to bind port 0 and create our protocol.

    Why: the stock Controller cannot report the port the OS picked, and its
    start-up probe connection must not count as a client connection.
    """

    def __init__(self, owner: SmtpServer, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = owner

    def factory(self) -> SMTP:
        return self.owner._make_protocol(self.loop)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
        )
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    def _trigger_server(self) -> None:
        with contextlib.ExitStack() as stack:
            family = socket.AF_INET6 if ":" in self.hostname else socket.AF_INET
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.settimeout(1.0)
            sock.bind((self.hostname, 0))
            self.owner._ignore_peer(sock.getsockname())  # before the server can accept it
            sock.connect((self.hostname, self.port))
            if self.ssl_context is not None:
                probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                probe.check_hostname = False
                probe.verify_mode = ssl.CERT_NONE  # a local liveness probe only
                sock = stack.enter_context(probe.wrap_socket(sock))
            sock.recv(1024)

    async def abort_connections(self) -> None:
        """Abort every open connection and let their tasks finish (clean shutdown)."""
        for protocol in self.owner._live_protocols():
            protocol.drop()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


class SmtpServer:
    """A local SMTP server on 127.0.0.1 with recording and fault injection.

    Why: tests and benchmarks need a real server that behaves like Exchange Online
    (STARTTLS, AUTH, enhanced status codes) and fails on demand.

    ``security``: "starttls" (STARTTLS offered and required before MAIL/AUTH), "ssl"
    (implicit TLS from the first byte) or "none"; TLS modes need ``ssl_context``
    (e.g. ``TestCA.server_context()``). ``users`` serve AUTH PLAIN/LOGIN;
    ``token_validator(user, token)`` serves XOAUTH2. ``auth_mechanisms`` defaults to
    PLAIN+LOGIN when ``users`` are given plus XOAUTH2 when a validator is; pass ``()``
    to offer no AUTH at all. With ``auth_require_tls`` (default) AUTH is only offered
    and accepted on an encrypted connection. ``recipient_limit`` is Postfix's
    ``smtpd_recipient_limit``: RCPTs beyond it in one transaction get ``452 4.5.3``.
    Accepted messages are answered ``250 2.0.0 Ok: queued as <queue id>`` (Postfix's
    words; the id is in :attr:`Received.queue_id`). ``store=False`` skips parsing and keeps
    only Message-IDs (process mode). ``on_accept(message_id)`` is called on the server
    thread, in order, for each accepted message that has a Message-ID.

    ``pipelining`` (default on, as Postfix and Exchange Online) advertises PIPELINING
    (aiosmtpd reads pipelined commands in order either way). ``connection_limit``: a
    connection beyond that many open at once is greeted with Exchange's ``421 4.3.2``
    and closed (counted in ``refused_connections``). ``hold_mail_until_connections``:
    every MAIL waits until that many connections have been opened, so a test can be
    sure a client's parallel connections were all open at once (``peak_connections``
    counts the most that were).
    """

    def __init__(
        self,
        *,
        security: Security = "none",
        ssl_context: ssl.SSLContext | None = None,
        users: Mapping[str, str] | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        require_starttls: bool = True,
        token_validator: Callable[[str, str], bool] | None = None,
        smtputf8: bool = True,
        hostname: str = "localhost",
        host: str = "127.0.0.1",
        port: int = 0,
        data_size_limit: int | None = EXCHANGE_SIZE_LIMIT,
        recipient_limit: int | None = None,
        pipelining: bool = True,
        connection_limit: int | None = None,
        hold_mail_until_connections: int | None = None,
        store: bool = True,
        faults: Iterable[Fault] = (),
        on_accept: Callable[[str], None] | None = None,
    ) -> None:
        if security not in get_args(Security):
            raise ValueError(f"security must be one of {get_args(Security)}, not {security!r}")
        if security != "none" and ssl_context is None:
            raise ValueError(f"security={security!r} needs an ssl_context")
        self.security: Security = security
        self.ssl_context = ssl_context
        self.users: dict[str, str] = dict(users or {})
        self.token_validator = token_validator
        if auth_mechanisms is None:
            auth_mechanisms = (["PLAIN", "LOGIN"] if self.users else []) + (
                ["XOAUTH2"] if token_validator else []
            )
        unknown = set(auth_mechanisms) - set(AUTH_MECHANISMS)
        if unknown:
            raise ValueError(f"unknown AUTH mechanisms {sorted(unknown)}; use {AUTH_MECHANISMS}")
        self.auth_mechanisms: tuple[str, ...] = tuple(auth_mechanisms)
        self.auth_required = auth_required
        self.auth_require_tls = auth_require_tls
        self.require_starttls = require_starttls
        self.smtputf8 = smtputf8
        self.hostname = hostname
        self.host = host
        self.port = port
        self.data_size_limit = data_size_limit
        self.recipient_limit = recipient_limit
        self.pipelining = pipelining
        self.connection_limit = connection_limit
        self.hold_mail_until_connections = hold_mail_until_connections
        self.store = store
        self.on_accept = on_accept

        self._cond = threading.Condition(threading.RLock())
        self._received: list[Received] = []
        self._message_ids: list[str] = []
        self._accepted_total = 0
        self._errors: list[Exception] = []
        self._counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._faults: list[Fault] = list(faults)
        self._next_connection_id = 1
        self._ignored_peers: set[tuple[str, int]] = set()
        self._live: set[_Protocol] = set()  # touched only on the event-loop thread
        self._open = 0  # client connections open now (counted under _cond)
        self._counted: set[_Protocol] = set()  # those counted in _open (event-loop thread)
        self._enough: asyncio.Event | None = None  # created on the event-loop thread
        self._handler = _Handler(self)
        self._controller: _Controller | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Listen (again on the same port after a ``stop()``) and serve in a thread."""
        if self._controller is not None:
            raise RuntimeError("SMTP server already running")
        self._enough = None  # an Event belongs to one event loop; start() makes a new one
        controller = _Controller(
            self,
            self._handler,
            hostname=self.host,
            port=self.port,
            ssl_context=self.ssl_context if self.security == "ssl" else None,
        )
        try:
            controller.start()
        except BaseException:
            if controller._thread is not None:
                controller.stop()
            elif not controller.loop.is_closed():
                controller.loop.close()
            raise
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        """Abort open connections, stop listening and join the server thread.

        Afterwards the port refuses connections (the ``refuse`` case).
        """
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(
                controller.abort_connections(), controller.loop
            ).result(timeout=5)
        controller.stop()

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._controller is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    free_port = staticmethod(free_port)

    # -- faults ------------------------------------------------------------------

    def inject(
        self,
        name: FaultName,
        *,
        times: int | None = None,
        address: str | None = None,
        response: str | None = None,
        skip: int = 0,
        after_messages: int = 1,
    ) -> Fault:
        """Add a fault; it applies from the next matching SMTP exchange on."""
        fault = Fault(
            name,
            times=times,
            address=address,
            response=response,
            skip=skip,
            after_messages=after_messages,
        )
        with self._cond:
            self._faults.append(fault)
        return fault

    def clear_faults(self, name: FaultName | None = None) -> None:
        """Remove all faults, or those called ``name``."""
        with self._cond:
            self._faults = [f for f in self._faults if name is not None and f.name != name]

    def active_faults(self) -> list[Fault]:
        """The faults that can still fire."""
        with self._cond:
            return list(self._faults)

    # -- recordings --------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Snapshot of the accepted messages, in arrival order."""
        with self._cond:
            return list(self._received)

    def message_ids(self, start: int = 0) -> list[str]:
        """Message-IDs of accepted messages (those that had one), from index ``start``."""
        with self._cond:
            return self._message_ids[start:]

    @property
    def accepted_count(self) -> int:
        """How many messages were accepted (also counted when ``store=False``)."""
        with self._cond:
            return self._accepted_total

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until ``count`` messages were accepted; raise TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._accepted_total >= count, timeout):
                raise TimeoutError(
                    f"expected {count} messages within {timeout}s, got {self._accepted_total}"
                )
            return list(self._received)

    @property
    def errors(self) -> list[Exception]:
        """Exceptions raised while handling commands (TLS handshake failures included)."""
        with self._cond:
            return list(self._errors)

    def clear_records(self) -> None:
        """Forget received messages, errors and counters (faults stay)."""
        with self._cond:
            self._received.clear()
            self._message_ids.clear()
            self._errors.clear()
            self._accepted_total = 0
            self._counts = dict.fromkeys(self._counts, 0)

    def _count(self, name: str) -> int:
        with self._cond:
            return self._counts[name]

    def wait_for_count(self, name: str, count: int, timeout: float = 10.0) -> None:
        """Block until the counter ``name`` (e.g. ``data_commands``) reached ``count``;
        raise TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._counts[name] >= count, timeout):
                raise TimeoutError(
                    f"expected {name} to reach {count} within {timeout}s, got {self._counts[name]}"
                )

    @property
    def connections(self) -> int:
        """TCP connections accepted (the Controller's start-up probe excluded)."""
        return self._count("connections")

    @property
    def auth_attempts(self) -> int:
        """AUTH commands received."""
        return self._count("auth_attempts")

    @property
    def auth_successes(self) -> int:
        """AUTH exchanges that ended in 235."""
        return self._count("auth_successes")

    @property
    def starttls_count(self) -> int:
        """Completed STARTTLS handshakes."""
        return self._count("starttls_count")

    @property
    def ehlo_count(self) -> int:
        """EHLO commands answered."""
        return self._count("ehlo_count")

    @property
    def rsets(self) -> int:
        """RSET commands received."""
        return self._count("rsets")

    @property
    def rcpt_commands(self) -> int:
        """RCPT commands received, whatever the answer."""
        return self._count("rcpt_commands")

    @property
    def data_commands(self) -> int:
        """DATA commands received, whatever the answer."""
        return self._count("data_commands")

    @property
    def peak_connections(self) -> int:
        """The most client connections that were open at the same time."""
        return self._count("peak_connections")

    @property
    def refused_connections(self) -> int:
        """Connections greeted with 421 because ``connection_limit`` were open."""
        return self._count("refused_connections")

    # -- internals, called from the event-loop thread ------------------------------

    def _make_protocol(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        tls_context = self.ssl_context if self.security == "starttls" else None
        return _Protocol(
            self,
            self._handler,
            loop=loop,
            hostname=self.hostname,
            ident="ESMTP crm-mail test server ready",
            tls_context=tls_context,
            require_starttls=self.require_starttls and tls_context is not None,
            # Implicit TLS is invisible to aiosmtpd, so it must not insist on STARTTLS.
            auth_require_tls=self.auth_require_tls and self.security != "ssl",
            auth_exclude_mechanism=[m for m in AUTH_MECHANISMS if m not in self.auth_mechanisms],
            authenticator=self._handler.check_login,
            enable_SMTPUTF8=self.smtputf8,
            data_size_limit=self.data_size_limit,
        )

    def _ignore_peer(self, address: tuple[str, int]) -> None:
        with self._cond:
            self._ignored_peers.add(address)

    def _connection_opened(self, protocol: _Protocol, peer: Any) -> int:
        self._live.add(protocol)
        with self._cond:
            if isinstance(peer, tuple) and peer[:2] in self._ignored_peers:
                self._ignored_peers.discard(peer[:2])
                return 0
            self._counts["connections"] += 1
            self._open += 1
            self._counts["peak_connections"] = max(self._counts["peak_connections"], self._open)
            connection_id = self._next_connection_id
            self._next_connection_id += 1
        hold = self.hold_mail_until_connections
        if hold is not None and connection_id >= hold:
            self._enough_event().set()
        return connection_id

    def _connection_closed(self, protocol: _Protocol) -> None:
        self._live.discard(protocol)
        if protocol.connection_id and protocol in self._counted:
            self._counted.discard(protocol)
            with self._cond:
                self._open -= 1

    def _over_limit(self, protocol: _Protocol) -> bool:
        """Whether this new connection is refused: one more than ``connection_limit``,
        or a ``refuse_connection`` fault fires for it."""
        if not protocol.connection_id:
            return False
        self._counted.add(protocol)
        limit = self.connection_limit
        with self._cond:
            over = limit is not None and self._open > limit
        if not over and self._take_fault("refuse_connection", []) is None:
            return False
        self._bump("refused_connections")
        return True

    def _enough_event(self) -> asyncio.Event:
        if self._enough is None:
            self._enough = asyncio.Event()
        return self._enough

    async def _hold_for_connections(self) -> None:
        """MAIL waits until ``hold_mail_until_connections`` connections were opened."""
        if self.hold_mail_until_connections is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._enough_event().wait(), HOLD_GUARD_SECONDS)

    def _live_protocols(self) -> list[_Protocol]:
        return list(self._live)

    def _bump(self, name: str) -> None:
        with self._cond:
            self._counts[name] += 1
            self._cond.notify_all()

    def _record_error(self, error: Exception) -> None:
        with self._cond:
            self._errors.append(error)

    def _take_fault(
        self,
        name: FaultName,
        addresses: Iterable[str],
        condition: Callable[[Fault], bool] | None = None,
    ) -> Fault | None:
        """The fault that fires now for ``name``, if any; consumes one of its ``times``."""
        wanted = {a.lower() for a in addresses}
        with self._cond:
            for fault in self._faults:
                if fault.name != name:
                    continue
                if fault.address is not None and fault.address.lower() not in wanted:
                    continue
                if condition is not None and not condition(fault):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                fault.fired += 1
                if fault.exhausted:
                    self._faults.remove(fault)
                return fault
        return None

    def _auth_verdict(self, user: str, ok: bool, failure: str | None) -> AuthResult:
        fault = self._take_fault("auth_response", [user])
        if fault is not None:
            return AuthResult(success=False, handled=False, message=fault.reply)
        if not ok:
            return AuthResult(success=False, handled=False, message=failure)
        self._bump("auth_successes")
        return AuthResult(success=True, auth_data=user, message=AUTH_SUCCESS)

    def _record(
        self, protocol: _Protocol, session: Session, envelope: Envelope, queue_id: str
    ) -> None:
        data: bytes = envelope.original_content or b""
        message_id = find_message_id(data)
        received: Received | None = None
        if self.store:
            message = email.message_from_bytes(data, policy=email.policy.default)
            auth_data = session.auth_data if session.authenticated else None
            received = Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=data,
                message=message,
                auth_user=auth_data if isinstance(auth_data, str) else None,
                connection_id=protocol.connection_id,
                message_id=message_id,
                tls=protocol.uses_tls(),
                smtp_utf8=bool(envelope.smtp_utf8),
                mail_options=list(envelope.mail_options),
                queue_id=queue_id,
            )
        with self._cond:
            if received is not None:
                self._received.append(received)
            if message_id is not None:
                self._message_ids.append(message_id)
            self._accepted_total += 1
            self._cond.notify_all()
        if message_id is not None and self.on_accept is not None:
            self.on_accept(message_id)


# -- process mode ------------------------------------------------------------------


def _tls_context_from_files(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT, reporting each accepted Message-ID at once.

    Each one is appended to ``--record`` and printed as ``ACCEPTED <Message-ID>`` (after
    ``READY <port>``), both flushed before the next message is handled.
    """
    parser = argparse.ArgumentParser(prog="python -m tests.servers.smtp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--security", choices=get_args(Security), default="none")
    parser.add_argument("--certfile", help="PEM with key and chain (TLS modes)")
    parser.add_argument("--keyfile")
    parser.add_argument("--record", required=True, type=Path)
    parser.add_argument("--auth-user")
    parser.add_argument("--auth-password", default="")
    parser.add_argument("--hostname", default="localhost")
    args = parser.parse_args(argv)

    ssl_context = None
    if args.security != "none":
        if not args.certfile:
            parser.error(f"--security {args.security} needs --certfile")
        ssl_context = _tls_context_from_files(args.certfile, args.keyfile)
    users = {args.auth_user: args.auth_password} if args.auth_user else {}
    # Block the stop signals in every thread (the server's inherits this mask) and take
    # them with sigwait() below: no handler, no wake-up loop.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    say = threading.Lock()

    def report(line: str) -> None:
        with say:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    with args.record.open("a", encoding="utf-8") as record:

        def accepted(message_id: str) -> None:
            record.write(f"{message_id}\n")
            record.flush()
            report(f"ACCEPTED {message_id}")

        server = SmtpServer(
            security=args.security,
            ssl_context=ssl_context,
            users=users,
            auth_required=bool(users),
            auth_require_tls=args.security != "none",
            hostname=args.hostname,
            host=args.host,
            port=args.port,
            store=False,
            on_accept=accepted,
        )
        server.start()
        try:
            report(f"READY {server.port}")
            signal.sigwait(stop_signals)
        finally:
            server.stop()
    return 0


class SmtpProcess:
    """A ``python -m tests.servers.smtp`` child process (see ``start_smtp_process``).

    A reader thread takes the child's stdout line by line: ``READY <port>``, then one
    ``ACCEPTED <Message-ID>`` per accepted message. ``wait_for`` waits on those lines
    (a condition), so a test waits exactly as long as the server takes.
    """

    def __init__(self, process: subprocess.Popen[bytes], record_path: Path, log_path: Path) -> None:
        self.process = process
        self.host = "127.0.0.1"
        self.port = 0
        self.record_path = record_path
        self.log_path = log_path
        self._cond = threading.Condition()
        self._ready: int | None = None
        self._accepted: list[str] = []
        self._accepted_at: dict[str, float] = {}
        self._unexpected: list[str] = []
        self._closed = False
        self._reader = threading.Thread(
            target=self._read, name=f"smtp-process-{process.pid}-stdout", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                kind, _, rest = line.partition(" ")
                with self._cond:
                    if kind == "READY" and self._ready is None:
                        self._ready = int(rest)
                    elif kind == "ACCEPTED":
                        self._accepted.append(rest)
                        self._accepted_at.setdefault(rest, time.monotonic())
                    else:
                        self._unexpected.append(line)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def wait_ready(self, timeout: float) -> int:
        """The port, once the child printed ``READY``; raise if it exits or says else."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._ready is not None or self._closed or bool(self._unexpected),
                timeout,
            )
            ready, unexpected, closed = self._ready, list(self._unexpected), self._closed
        if ready is not None:
            self.port = ready
            return ready
        if unexpected:
            raise RuntimeError(f"unexpected first line from SMTP process: {unexpected[0]!r}")
        if closed:
            raise RuntimeError(f"SMTP process exited early (code {self.process.wait()})")
        raise TimeoutError(f"SMTP process not READY after {timeout}s")

    def message_ids(self) -> list[str]:
        """Message-IDs in the record file (each written before it is reported)."""
        if not self.record_path.exists():
            return []
        return self.record_path.read_text(encoding="utf-8").splitlines()

    def accepted(self) -> list[str]:
        """Message-IDs reported so far, in order of acceptance."""
        with self._cond:
            return list(self._accepted)

    def accepted_at(self) -> dict[str, float]:
        """When each Message-ID was first reported (this process's monotonic clock):
        the server reports a message as it answers 250 to it, so a benchmark can
        measure the time from a commit to that answer."""
        with self._cond:
            return dict(self._accepted_at)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        """Block until ``count`` Message-IDs were reported; the timeout means failure."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._accepted) >= count or self._closed, timeout)
            got = list(self._accepted)
        if len(got) < count:
            raise TimeoutError(f"expected {count} Message-IDs, got {len(got)}")
        return got

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the child and reap it; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout)  # the child is gone: its stdout ends
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_smtp_process(
    tmp_path: Path,
    *,
    port: int = 0,
    security: Security = "none",
    auth_user: str | None = None,
    auth_password: str | None = None,
    ca: TestCA | None = None,
    hostname: str = "localhost",
    ready_timeout: float = 15.0,
) -> SmtpProcess:
    """Launch the server as a separate process and wait until it listens.

    Why: benchmarks and multi-process tests must not share the GIL or event loop with
    the code under test. TLS modes need ``ca`` (a ``TestCA``) to issue the certificate.
    """
    tag = uuid.uuid4().hex[:8]
    record_path = tmp_path / f"smtp-{tag}.ids"
    log_path = tmp_path / f"smtp-{tag}.log"
    command = [
        sys.executable,
        "-m",
        "tests.servers.smtp",
        "--port",
        str(port),
        "--security",
        security,
        "--record",
        str(record_path),
        "--hostname",
        hostname,
    ]
    if security != "none":
        if ca is None:
            raise ValueError(f"security={security!r} needs ca=TestCA")
        certfile = tmp_path / f"smtp-{tag}.pem"
        ca.ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
            str(certfile)
        )
        command += ["--certfile", str(certfile)]
    if auth_user is not None:
        command += ["--auth-user", auth_user, "--auth-password", auth_password or ""]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
        )
    smtp_process = SmtpProcess(process, record_path, log_path)
    try:
        smtp_process.wait_ready(ready_timeout)
    except BaseException:
        smtp_process.stop(timeout=2)
        raise
    return smtp_process


if __name__ == "__main__":
    sys.exit(main())
