"""One SMTP session with smtplib: open, send a batch, close (Django's backend shape).

When the server offers PIPELINING (RFC 2920; Postfix and Exchange Online do), MAIL,
every RCPT and DATA go in one write and their replies are read in order: one round
trip instead of two plus one per recipient, which is what decides the rate when the
server is tens of milliseconds away. smtplib cannot pipeline, so that exchange is
written here on its ``send`` and ``getreply``.

Why the session is written out step by step instead of calling ``send_message``:
the outbox must know *where* a failure happened. A refused MAIL FROM, refused
recipients, a refused DATA and a connection lost after the final dot mean different
things (see :mod:`smtp_mail.classify`), and smtplib's ``sendmail`` hides the step.

Secrets: the password, the OAuth token and the SASL strings made from them are only
ever passed to ``docmd``; smtplib's debug output stays off and nothing here logs them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from crm_core.plugin_api import Outcome, OutgoingMessage, SendResult
from smtp_mail.classify import (
    Failure,
    Phase,
    SmtpFailure,
    connection_failure,
    disconnected,
    lost_while,
    out_of_sequence,
    reply_failure,
    said,
    too_many_recipients,
)
from smtp_mail.recipients import Tally
from smtp_mail.render import Envelope, Unsendable, prepare
from smtp_mail.settings import AUTH, CA_BUNDLE, OAUTH_HOSTS, AuthMode, Security, SmtpSettings
from smtp_mail.tls import ContextSource, tls_context

if TYPE_CHECKING:
    from _socket import _Address as _SourceAddress


log = logging.getLogger(__name__)

_MAX_CHALLENGES = 3
_LEADING_DOT = re.compile(rb"(?m)^\.")
_MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, incl. CRLF


class DotHold(Protocol):
    """What a message's final dot waits for: how a batch holds a message back until the
    results before it are recorded (:mod:`smtp_mail.batch`)."""

    def ready(self) -> bool:
        """Whether the message may be completed now (asked before its body is sent)."""
        ...

    def wait(self) -> None:
        """Wait until it may (its body has left); raise to abandon the message."""
        ...


class TokenSource(Protocol):
    """Where XOAUTH2 tokens come from (msal in production)."""

    def token(self) -> str:
        """A bearer token; raises SmtpFailure when none can be had."""
        ...

    def evict(self) -> None:
        """Forget the cached token (the server refused it)."""
        ...


class _Wire(smtplib.SMTP):
    """smtplib.SMTP that notes whether the final dot of DATA has left, and whether the
    session must be reset before the next message.

    Why: a connection lost before the dot means the server has nothing (temporary);
    lost after it, the server may have accepted the message (ambiguous). After a 4xx
    or 5xx to MAIL, RCPT or the end of DATA a server may keep the transaction open
    (Postfix does), and the next MAIL would get ``503 nested MAIL command``.
    """

    dot_sent = False
    needs_reset = False
    last_reply = ""
    _host: str

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: _SourceAddress | None = None
    ) -> tuple[int, bytes]:
        # smtplib sets the name TLS checks the certificate against only in __init__,
        # which would also connect; a verified session must name the host it dialled.
        self._host = host
        reply = super().connect(host, port, source_address)
        # A dot held back (DotHold) goes as a small write of its own: without this,
        # Nagle's algorithm would hold it until the server acknowledged the body.
        if self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reply

    def message(self, data: bytes, hold: DotHold | None = None) -> tuple[int, bytes]:
        """The message after DATA's 354 (dot-stuffed, as smtplib's ``data`` does), and
        the reply after the final dot.

        When ``hold`` is not ready, the body goes and the dot that completes it waits
        for ``hold``; if that raises, the connection is closed without the dot, so the
        server discards the message (RFC 5321, 3.8), and the exception goes on.
        """
        body = _LEADING_DOT.sub(b"..", data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.dot_sent = False
        ready = True
        if hold is not None:
            try:
                ready = hold.ready()
                if not ready:
                    self.send(body)
                    hold.wait()
            except BaseException:
                self.close()  # mid-DATA: a QUIT now would only be more of the body
                raise
        self.send(body + b".\r\n" if ready else b".\r\n")
        self.dot_sent = True  # sendall returned: the whole of it left
        return self.getreply()

    def pipeline(self, envelope: Envelope) -> None:
        """MAIL FROM, every RCPT TO and DATA in one write (RFC 2920)."""
        self.dot_sent = False  # a dot of an earlier message says nothing about this one
        options = "".join(f" {o}" for o in envelope.options)
        if any(o.upper() == "SMTPUTF8" for o in envelope.options):
            self.command_encoding = "utf-8"  # what smtplib's mail() does for SMTPUTF8
        # <address> as written: smtplib's quoteaddr parses each one again (a tenth of
        # the sending thread's time), and these are checked addr-specs already, with
        # no quotes, spaces or angle brackets (enqueue refuses quoted local parts).
        lines = [f"MAIL FROM:<{envelope.sender}>{options}"]
        lines += [f"RCPT TO:<{r}>" for r in envelope.recipients]
        lines.append("DATA")
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("command contains a line break")  # as smtplib's putcmd
        self.send("".join(f"{line}\r\n" for line in lines).encode(self.command_encoding))

    def getreply(self) -> tuple[int, bytes]:
        # Kept as evidence for a connection lost mid-transaction. Only replies after
        # AUTH are ever shown (MAIL, RCPT, DATA), never a SASL exchange.
        code, reply = super().getreply()
        self.last_reply = said(code, reply)
        return code, reply


class _WireSSL(_Wire, smtplib.SMTP_SSL):
    """The same, with TLS from the first byte (port 465)."""


class SmtpClient:
    """An SMTP session for one account: :meth:`open`, :meth:`send` each message, :meth:`close`.

    ``open`` runs connect → (STARTTLS → EHLO) → AUTH once; ``send`` reuses the
    connection and, when the server has closed an idle connection before a message
    was handed over, reconnects once for that message. ``close`` is idempotent.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        tokens: TokenSource | None = None,
        contexts: ContextSource = tls_context,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.contexts = contexts
        """Where the TLS context comes from: a new one each time (Test connection), or
        the worker's shared one (:func:`smtp_mail.tls.shared_contexts`)."""
        self._conn: _Wire | None = None
        self._broken: Failure | None = None
        self.connections = 0

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> SmtpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Connect, encrypt and log in; raises SmtpFailure with the failing phase."""
        if self._conn is not None:
            return
        self.connect()
        self.secure()
        self.login()

    def close(self) -> None:
        """QUIT and close the socket; safe to call twice or on a dead connection."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(smtplib.SMTPException, OSError):
            conn.quit()
        conn.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- the steps of open(), also run one by one by Test connection --------------------

    def connect(self) -> str:
        """Open TCP (and TLS for ssl) and read the greeting; returns the greeting."""
        s = self.settings
        try:
            conn = self._new_wire()
            code, greeting = conn.connect(s.host, s.port)
        except (OSError, ValueError) as exc:
            phase = Phase.TLS if isinstance(exc, ssl.SSLError) else Phase.CONNECT
            raise SmtpFailure(connection_failure(exc, s, phase), phase) from exc
        if code != 220:
            conn.close()
            raise SmtpFailure(reply_failure(Phase.CONNECT, code, greeting), Phase.CONNECT)
        self._conn = conn
        self.connections += 1
        return greeting.decode("utf-8", "replace")

    def _new_wire(self) -> _Wire:
        s = self.settings
        if s.security is Security.SSL:
            return _WireSSL(timeout=s.timeout, context=self._tls_context())
        return _Wire(timeout=s.timeout)

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return self.contexts(self.settings.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            failure = Failure(
                Outcome.CONFIGURATION,
                f"The CA bundle {self.settings.ca_bundle} cannot be read ({exc}).",
                f"Set {CA_BUNDLE} to a readable PEM file of the CA certificates.",
                "tls-ca-bundle",
            )
            raise SmtpFailure(failure, Phase.TLS) from exc

    def secure(self) -> None:
        """EHLO, and for starttls: STARTTLS and EHLO again (the step Airflow missed)."""
        conn = self._require()
        s = self.settings
        try:
            conn.ehlo_or_helo_if_needed()
            if s.security is Security.STARTTLS:
                if not conn.has_extn("starttls"):
                    raise smtplib.SMTPNotSupportedError("STARTTLS not offered")
                conn.starttls(context=self._tls_context())  # raises unless 220
                conn.ehlo()
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise SmtpFailure(connection_failure(exc, s, Phase.TLS), Phase.TLS) from exc
        except SmtpFailure:
            self._drop()
            raise

    def tls_info(self) -> tuple[str, dict[str, object]] | None:
        """(TLS version, peer certificate) of the current connection, or None."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return None
        cert = sock.getpeercert() or {}
        return sock.version() or "TLS", dict(cert)

    def login(self) -> None:
        """AUTH once with the configured mechanism (nothing for auth none)."""
        s = self.settings
        if s.auth is AuthMode.NONE:
            return
        conn = self._require()
        offered = conn.esmtp_features.get("auth", "").upper().split()
        try:
            if s.auth is AuthMode.XOAUTH2:
                self._login_xoauth2(conn, offered)
            else:
                self._login_password(conn, offered)
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise SmtpFailure(connection_failure(exc, s, Phase.AUTH), Phase.AUTH) from exc
        except SmtpFailure:
            self._drop()
            raise

    def _login_password(self, conn: _Wire, offered: Sequence[str]) -> None:
        s = self.settings
        user = s.username.encode()
        password = s.password.reveal().encode() if s.password is not None else b""
        if "PLAIN" in offered:
            code, reply = _sasl(conn, "PLAIN", b"\0" + user + b"\0" + password, None, password)
        elif "LOGIN" in offered:
            code, reply = _sasl(
                conn,
                "LOGIN",
                user,
                lambda c: user if b"user" in c.lower() else password,
                password,
            )
        else:
            raise SmtpFailure(self._no_mechanism(offered, "PLAIN or LOGIN"), Phase.AUTH)
        if code not in (235, 503):
            failure = reply_failure(Phase.AUTH, code, reply, email=self.settings.email)
            raise SmtpFailure(failure, Phase.AUTH)

    def _login_xoauth2(self, conn: _Wire, offered: Sequence[str]) -> None:
        if "XOAUTH2" not in offered:
            raise SmtpFailure(self._no_mechanism(offered, "XOAUTH2"), Phase.AUTH)
        assert self.tokens is not None, "xoauth2 needs a token source"
        if not self.settings.may_get_token:  # sending_problems stops it before; never here
            raise SmtpFailure(
                Failure(
                    Outcome.CONFIGURATION,
                    f"{self.settings.host} may not be sent an Exchange token.",
                    f"Use Microsoft's SMTP server, or list it in {OAUTH_HOSTS}.",
                    "token-host",
                ),
                Phase.AUTH,
            )
        code, reply = self._xoauth2_once(conn)
        if code >= 500:
            # The cached token may have been revoked or expired early: once more, fresh.
            log.info("SMTP server refused the OAuth token (%s); fetching a new one", code)
            self.tokens.evict()
            code, reply = self._xoauth2_once(conn)
        if code not in (235, 503):
            raise SmtpFailure(reply_failure(Phase.AUTH, code, reply, oauth=True), Phase.AUTH)

    def _xoauth2_once(self, conn: _Wire) -> tuple[int, bytes]:
        assert self.tokens is not None
        token = self.tokens.token()
        sasl = f"user={self.settings.username}\x01auth=Bearer {token}\x01\x01".encode()
        return _sasl(conn, "XOAUTH2", sasl, lambda _challenge: b"", token.encode())

    def _no_mechanism(self, offered: Sequence[str], wanted: str) -> Failure:
        s = self.settings
        if not offered:
            return Failure(
                Outcome.CONFIGURATION,
                f"{s.server} does not offer a login (no AUTH in its EHLO answer).",
                f"If it is a relay that accepts mail from this server without login, set "
                f"{AUTH} none; otherwise check smtp.security (many servers offer AUTH only "
                "after STARTTLS) and smtp.port (587, not 25).",
                "no-auth",
            )
        return Failure(
            Outcome.CONFIGURATION,
            f"{s.server} offers AUTH {' '.join(offered)}, but not {wanted}.",
            f"Choose a matching {AUTH} (password uses PLAIN or LOGIN, xoauth2 needs "
            "Microsoft 365's XOAUTH2).",
            "auth-mechanism",
        )

    def _require(self) -> _Wire:
        if self._conn is None:
            raise SmtpFailure(
                disconnected(Phase.CONNECT, False, self.settings.server), Phase.CONNECT
            )
        return self._conn

    # --- sending -------------------------------------------------------------------------

    def send(self, message: OutgoingMessage, hold: DotHold | None = None) -> SendResult:
        """Send one message on the open connection (opening or reopening it as needed);
        its final dot waits for ``hold`` (see :class:`DotHold`)."""
        for attempt in (1, 2):
            try:
                self._ensure_open()
                return self._transaction(message, hold)
            except _Stale:
                self._drop()
                if attempt == 2:
                    failure = disconnected(Phase.MAIL, False, self.settings.server)
                    return failure.result(message.message_id)
                log.info("SMTP server %s closed the connection; reconnecting", self.settings.server)
            except SmtpFailure as exc:
                return exc.failure.result(message.message_id)
            except Unsendable as exc:
                return exc.failure.result(message.message_id)
        raise AssertionError("unreachable")

    @property
    def broken(self) -> bool:
        """Whether the connection could not be (re)opened: every send now fails."""
        return self._broken is not None

    def try_open(self) -> bool:
        """Open now; False when it cannot (each :meth:`send` then returns why)."""
        try:
            self._ensure_open()
        except SmtpFailure:
            return False
        return True

    def _ensure_open(self) -> None:
        if self._broken is not None:
            raise SmtpFailure(self._broken, Phase.CONNECT)
        try:
            self.open()
        except SmtpFailure as exc:
            self._broken = exc.failure  # one failed open serves the rest of the batch
            raise

    def probe_sender(self, address: str) -> tuple[int, str]:
        """MAIL FROM ``address`` then RSET, sending nothing (Test connection's last rung)."""
        conn = self._require()
        try:
            code, reply = conn.mail(address)
            conn.rset()
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise SmtpFailure(
                disconnected(Phase.MAIL, False, self.settings.server), Phase.MAIL
            ) from exc
        return code, reply.decode("utf-8", "replace")

    def _transaction(self, message: OutgoingMessage, hold: DotHold | None) -> SendResult:
        conn = self._require()
        envelope = prepare(message, conn.esmtp_features, self.settings.server)
        mid = message.message_id
        self._reset_if_needed(conn)
        if conn.has_extn("pipelining"):
            return self._pipelined(conn, envelope, mid, hold)
        try:
            code, reply = conn.mail(envelope.sender, envelope.options)
        except (smtplib.SMTPException, OSError) as exc:
            raise _Stale from exc
        if code == 421:
            raise _Stale
        if code != 250:
            conn.needs_reset = True
            return reply_failure(Phase.MAIL, code, reply, envelope.sender).result(mid)
        return self._recipients_and_data(conn, envelope, mid, hold)

    def _pipelined(
        self, conn: _Wire, envelope: Envelope, mid: str, hold: DotHold | None
    ) -> SendResult:
        """MAIL, RCPT… and DATA in one write, then each reply in order (RFC 2920).

        Every reply is checked, as RFC 2920 asks: a refused MAIL makes the RCPT and
        DATA replies meaningless (they are read and ignored); when no RCPT was accepted
        the DATA reply (503 or 554) speaks for nobody and no body is sent; the session
        is reset (RSET) before the next message after any refusal. Nothing of the
        message has been handed over until DATA's 354, so a connection found dead
        before the MAIL reply is reopened for the message, as in the step-by-step path.
        """
        try:
            conn.pipeline(envelope)
            code, reply = conn.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            raise _Stale from exc
        if code == 421:
            raise _Stale
        if code != 250:
            conn.needs_reset = True
            self._skip_replies(conn, len(envelope.recipients) + 1)
            return reply_failure(Phase.MAIL, code, reply, envelope.sender).result(mid)
        tally = Tally(envelope)
        phase = Phase.RCPT
        try:
            ended = self._recipient_replies(conn, tally)
            if ended is not None and self._conn is not conn:  # 421: nothing more comes
                return tally.ended(mid, ended)
            phase = Phase.DATA
            code, reply = conn.getreply()
            if ended is not None or not tally.accepted or code != 354:
                return self._no_message(conn, tally, mid, ended, code, reply)
            answer = conn.message(tally.envelope.data, hold)
            return self._after_dot(conn, tally, mid, *answer)
        except (smtplib.SMTPException, OSError) as exc:
            return self._lost(conn, tally, mid, phase, exc)

    def _skip_replies(self, conn: _Wire, count: int) -> None:
        """Read the replies of a refused transaction's pipelined commands, unheeded."""
        try:
            for _ in range(count):
                conn.getreply()
        except (smtplib.SMTPException, OSError):
            self._drop()  # the next message gets a fresh connection

    def _recipient_replies(self, conn: _Wire, tally: Tally) -> Failure | None:
        """Each RCPT's reply in order; the failure that ends the transaction, if one does.

        A 421 ends it at once (the server closes; nothing more will come). The replies
        of the other recipients are read even after a reply about the order of
        commands, so the DATA reply is the next one on the wire.
        """
        ended: Failure | None = None
        full: list[str] = []
        limit_reply: tuple[int, bytes] = (0, b"")
        for rcpt in tally.envelope.recipients:
            code, reply = conn.getreply()
            if code in (250, 251):
                tally.accept(rcpt)
                continue
            conn.needs_reset = True
            if code == 421:
                self._drop()
                return reply_failure(Phase.RCPT, code, reply, tally.names[rcpt])
            if out_of_sequence(code, reply.decode("utf-8", "replace")):
                ended = ended or reply_failure(Phase.RCPT, code, reply, tally.names[rcpt])
            elif too_many_recipients(code, reply):
                if not full:
                    limit_reply = (code, reply)
                full.append(rcpt)
            else:
                tally.refuse(rcpt, code, reply)
        if full:
            tally.defer_rest(full, *limit_reply)
        return ended

    def _no_message(
        self,
        conn: _Wire,
        tally: Tally,
        mid: str,
        ended: Failure | None,
        code: int,
        reply: bytes,
    ) -> SendResult:
        """The transaction ends without the body: RCPT failures decide, or DATA's refusal.

        A 354 here (the server would take a body we will not send) is answered by
        closing the connection, never with a dot: a dot would deliver an empty message
        to whoever was accepted.
        """
        conn.needs_reset = True
        if code == 354 or code == 421:
            self._drop()
        if ended is not None or not tally.accepted:
            return tally.ended(mid, ended)  # DATA's 503/554 speaks for nobody
        return tally.ended(mid, reply_failure(Phase.DATA, code, reply))

    def _reset_if_needed(self, conn: _Wire) -> None:
        """RSET after a refused transaction, as smtplib's own sendmail() does.

        Why before the next message rather than at once: nothing of this message has
        left yet, so a connection found dead here is simply reopened for it.
        """
        if not conn.needs_reset:
            return
        try:
            code, _ = conn.rset()
        except (smtplib.SMTPException, OSError) as exc:
            raise _Stale from exc
        if code != 250:
            raise _Stale
        conn.needs_reset = False

    def _recipients_and_data(
        self, conn: _Wire, envelope: Envelope, mid: str, hold: DotHold | None
    ) -> SendResult:
        """RCPT for each recipient, then DATA when the server accepted at least one."""
        tally = Tally(envelope)
        phase = Phase.RCPT
        try:
            ended = self._name_recipients(conn, tally)
            if ended is not None or not tally.accepted:
                return tally.ended(mid, ended)
            phase = Phase.DATA
            return self._data(conn, tally, mid, hold)
        except (smtplib.SMTPException, OSError) as exc:
            return self._lost(conn, tally, mid, phase, exc)

    def _lost(
        self, conn: _Wire, tally: Tally, mid: str, phase: Phase, exc: BaseException
    ) -> SendResult:
        """The connection broke mid-transaction: unknown after the final dot, else temporary."""
        dot_sent = phase is Phase.DATA and conn.dot_sent  # not a dot of an earlier message
        self._drop()
        failure = disconnected(phase, dot_sent, self.settings.server, conn.last_reply, str(exc))
        if dot_sent:
            return tally.lost(mid, failure)
        return tally.ended(mid, failure, why=lost_while(phase))

    def _name_recipients(self, conn: _Wire, tally: Tally) -> Failure | None:
        """RCPT TO each recipient; the failure that ends the transaction, if one does."""
        rcpts = tally.envelope.recipients
        for index, rcpt in enumerate(rcpts):
            code, reply = conn.rcpt(rcpt)
            if code in (250, 251):
                tally.accept(rcpt)
                continue
            conn.needs_reset = True
            if code == 421 or out_of_sequence(code, reply.decode("utf-8", "replace")):
                if code == 421:
                    self._drop()
                return reply_failure(Phase.RCPT, code, reply, tally.names[rcpt])
            if too_many_recipients(code, reply):
                tally.defer_rest(rcpts[index:], code, reply)
                return None
            tally.refuse(rcpt, code, reply)
        return None

    def _data(self, conn: _Wire, tally: Tally, mid: str, hold: DotHold | None) -> SendResult:
        """DATA and the message; the reply after the final dot decides for the accepted."""
        conn.dot_sent = False  # a dot of an earlier message says nothing about this one
        conn.putcmd("data")
        code, reply = conn.getreply()
        if code != 354:  # DATA itself refused
            conn.needs_reset = True
            return tally.ended(mid, reply_failure(Phase.DATA, code, reply))
        return self._after_dot(conn, tally, mid, *conn.message(tally.envelope.data, hold))

    def _after_dot(
        self, conn: _Wire, tally: Tally, mid: str, code: int, reply: bytes
    ) -> SendResult:
        """The reply after the final dot decides for every accepted recipient.

        A 250 ends the transaction, so a recipient refused on the way needs no RSET
        before the next message (it would cost a round trip).
        """
        if code == 250:
            conn.needs_reset = False
            return tally.delivered(mid, code, reply)
        conn.needs_reset = True
        if code == 421:
            self._drop()
        return tally.ended(mid, reply_failure(Phase.DATA, code, reply))


class _Stale(Exception):
    """The connection was found closed before anything of the message was handed over."""


def _sasl(
    conn: smtplib.SMTP,
    mechanism: str,
    initial: bytes,
    answer: Callable[[bytes], bytes] | None,
    secret: bytes = b"",
) -> tuple[int, bytes]:
    """AUTH, then answer challenges (RFC 4954), with UTF-8 SASL strings.

    Why not smtplib's ``auth``: it encodes responses as ASCII, so a password with
    å, ä or ö fails before it reaches the server (SASL strings are UTF-8, RFC 4616),
    and it always sends the initial response on the command line, which RFC 4954
    forbids when the line would exceed 512 octets, as XOAUTH2 tokens usually do.
    The reply is returned with anything we sent (and ``secret``) masked, because it
    ends up in results and logs and some servers echo a line they did not like.
    """
    sent = [_b64(initial)]
    if len(f"AUTH {mechanism} {sent[0]}\r\n") <= _MAX_COMMAND_LINE:
        code, reply = conn.docmd("AUTH", f"{mechanism} {sent[0]}")
        pending: bytes | None = None
    else:
        code, reply = conn.docmd("AUTH", mechanism)
        pending = initial
    rounds = 0
    while code == 334 and rounds < _MAX_CHALLENGES:
        rounds += 1
        if pending is not None:
            response, pending = pending, None
        else:
            response = answer(_decode_challenge(reply)) if answer is not None else b""
        sent.append(_b64(response))
        code, reply = conn.docmd(sent[-1])
    return code, mask(reply, [s.encode() for s in sent] + [secret])


def _decode_challenge(reply: bytes) -> bytes:
    try:
        return base64.b64decode(reply or b"")
    except binascii.Error:  # not base64: answer as to an empty challenge
        return b""


def mask(reply: bytes, secrets: Sequence[bytes]) -> bytes:
    """``reply`` with every secret of four bytes or more replaced by ********."""
    for secret in secrets:
        if len(secret) >= 4:
            reply = reply.replace(secret, b"********")
    return reply


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
