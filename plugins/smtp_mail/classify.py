"""Every way an SMTP exchange can fail, classified for the outbox.

The rule of thumb (see :class:`crm_core.mail.transport.Outcome`):

* nothing was handed over yet and trying later may work → ``temporary``
  (4xx replies, refused or dropped connections, timeouts, DNS "try again");
* the server refused this message or recipient for good → ``permanent``
  (5xx on RCPT or DATA, a message larger than the server's SIZE, an international
  address the server cannot carry);
* the account or installation is wrong and every message would fail the same way →
  ``configuration`` (535 and other 5xx on AUTH, 5xx on MAIL FROM such as 5.7.60 send-as
  denied, TLS certificate failures, unknown host, STARTTLS or AUTH not offered, and any
  5xx whose enhanced code is about the account, e.g. 5.7.57 or 5.7.64 on RCPT);
* the connection was lost after the final dot, before the server's answer →
  ``ambiguous``: the server may have taken the message;
* the server asks the mailbox to slow down (Microsoft 365's ``432 4.3.2
  STOREDRV.ClientSubmit; sender thread limit exceeded``, a 4.7.x rate reply) →
  ``throttled``: the mailbox is paused for every worker and no try is counted; its
  daily quota spent (``554 5.2.0 …SubmissionQuotaExceededException``) → ``throttled``
  with ``quota``: paused until its 24-hour window rolls, and the sender is told;
* a reply about the order of commands (503 bad sequence, enhanced X.5.1) to our own
  MAIL, RCPT or DATA → ``temporary``: the session was out of step, not the account;
  the client resets it (RSET) and the message goes again later. Never
  ``configuration``: pausing an account for our own session state helps nobody.
"""

from __future__ import annotations

import errno
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from crm_core.plugin_api import Outcome, SendResult
from smtp_mail.hints import Hint, enhanced_code, explain, reply_code
from smtp_mail.settings import CA_BUNDLE, HOST, PORT, SECURITY, Security, SmtpSettings


class Phase(StrEnum):
    """Where in the SMTP exchange something failed."""

    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True)
class Failure:
    """A classified failure: outcome, what happened, what to do, the server's code,
    and the server's own reply line (kept: a mail administrator asks for it)."""

    outcome: Outcome
    detail: str
    fix: str = ""
    code: str = ""
    reply: str = ""
    retry_after: float | None = None
    quota: bool = False

    @property
    def text(self) -> str:
        """Detail and fix in one text, for the person who sent the mail."""
        return f"{self.detail} What to do: {self.fix}" if self.fix else self.detail

    def result(self, message_id: str) -> SendResult:
        """The failure as one message's SendResult."""
        return SendResult(
            message_id,
            self.outcome,
            self.text,
            self.code,
            retry_after=self.retry_after,
            reply=self.reply,
            quota=self.quota,
        )


class SmtpFailure(Exception):
    """Raised inside the client to stop an exchange with a classified Failure."""

    def __init__(self, failure: Failure, phase: Phase) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        self.phase = phase


def _text(reply: bytes | str) -> str:
    raw = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(raw.split())


def said(code: int, reply: bytes | str) -> str:
    """A reply as the server said it, on one line: ``250 2.0.0 Ok: queued as 4Xb``."""
    return f"{code} {_text(reply)}".strip()


def too_many_recipients(code: int, reply: bytes | str) -> bool:
    """Postfix's ``452 4.5.3 Error: too many recipients`` (or the older 552 form).

    Why it is not about the recipient: the server takes no more RCPTs in this
    transaction, so the rest of the envelope waits for another attempt (RFC 5321
    4.5.3.1.10 asks clients to treat the 552 form as temporary too).
    """
    text = _text(reply)
    lowered = text.lower()
    return code in (452, 552) and (
        enhanced_code(text) in ("4.5.3", "5.5.3") or "too many recipients" in lowered
    )


# --- replies ---------------------------------------------------------------------------


def reply_failure(
    phase: Phase,
    code: int,
    reply: bytes | str,
    subject: str = "",
    oauth: bool = False,
    email: str = "",
) -> Failure:
    """Classify a negative reply to a command (``subject``: the address concerned;
    ``email``: the sending user, named in the fix)."""
    failure = _classify_reply(phase, code, _text(reply), subject, oauth, email)
    return replace(failure, reply=said(code, reply))


def _classify_reply(
    phase: Phase, code: int, text: str, subject: str, oauth: bool, email: str
) -> Failure:
    hint = explain(code, text, oauth, email)
    answered = f"the server answered {code} {text}".rstrip()
    if phase is Phase.AUTH:
        return _auth_failure(code, answered, hint)
    about = f" for {subject}" if subject else ""
    if phase in _TRANSACTION and out_of_sequence(code, text):
        return _out_of_sequence(phase, about, answered, reply_code(code, text))
    throttled = _throttled(code, text, answered)
    if throttled is not None:
        return throttled
    if 400 <= code < 500:
        return Failure(
            Outcome.TEMPORARY,
            f"{_PHASE_WORDS[phase]}{about} was deferred: {answered}.",
            hint.fix if hint else "Nothing; it will be tried again later.",
            reply_code(code, text),
        )
    outcome = _permanent_outcome(phase, code, text, hint)
    detail = f"{_PHASE_WORDS[phase]}{about} was refused: {answered}."
    if hint:
        detail = f"{detail} {hint.meaning}"
    return Failure(outcome, detail, hint.fix if hint else "", reply_code(code, text))


_TRANSACTION = frozenset({Phase.MAIL, Phase.RCPT, Phase.DATA})

THROTTLE_SECONDS = 60.0
"""How long a mailbox waits after a throttling reply (SMTP replies name no time)."""

_RATE_WORDS = ("rate", "limit", "too many", "throttl", "try again later")


def _throttled(code: int, text: str, answered: str) -> Failure | None:
    """The server asks the mailbox to wait: its sending threads, its rate, its daily quota."""
    enhanced = enhanced_code(text)
    lowered = text.lower()
    if "submissionquotaexceeded" in lowered:
        return Failure(
            Outcome.THROTTLED,
            "Microsoft 365 sends no more mail from this mailbox for now: it has reached its "
            f"daily limit of recipients (10,000 in 24 hours): {answered}.",
            "Nothing; the mail goes out by itself once the limit's 24-hour window rolls. "
            "For mailings to many people use a bulk-mail service rather than a person's "
            "mailbox.",
            reply_code(code, text),
            quota=True,
        )
    sender_threads = code == 432 and enhanced == "4.3.2"
    rate = enhanced.startswith("4.7.") and any(word in lowered for word in _RATE_WORDS)
    if not (sender_threads or rate):
        return None
    return Failure(
        Outcome.THROTTLED,
        f"The server asked this mailbox to send more slowly: {answered}.",
        "Nothing; the mail goes out by itself shortly.",
        reply_code(code, text),
        retry_after=THROTTLE_SECONDS,
    )


def out_of_sequence(code: int, text: str) -> bool:
    """A reply about the order of commands, not about the message: 503, or X.5.1.

    Why both: 503 is "bad sequence of commands" (RFC 5321), and RFC 3463's X.5.1
    ("invalid command") is what Postfix puts on 503 and on "554 5.5.1 Error: no valid
    recipients".
    """
    return code == 503 or (code >= 500 and enhanced_code(text) == "5.5.1")


def _out_of_sequence(phase: Phase, about: str, answered: str, code: str) -> Failure:
    return Failure(
        Outcome.TEMPORARY,
        f"{_PHASE_WORDS[phase]}{about} was not taken because the SMTP session was out of "
        f"step ({answered}); this is about the order of commands, not the message or the "
        "account. The session is reset.",
        "Nothing; it will be tried again later. If it keeps happening, send the server's "
        "answer to its administrator.",
        code,
    )


_PHASE_WORDS: Mapping[Phase, str] = MappingProxyType(
    {
        Phase.CONNECT: "The connection",
        Phase.TLS: "Encryption",
        Phase.AUTH: "The login",
        Phase.MAIL: "The sender",
        Phase.RCPT: "The recipient",
        Phase.DATA: "The message",
    }
)


_WHILE: Mapping[Phase, str] = MappingProxyType(
    {
        Phase.CONNECT: "while connecting",
        Phase.TLS: "while setting up encryption",
        Phase.AUTH: "while logging in",
        Phase.MAIL: "at the start of the message (MAIL FROM)",
        Phase.RCPT: "while naming the recipients (RCPT TO)",
        Phase.DATA: "while sending the message (DATA, before its final dot)",
    }
)


def _permanent_outcome(phase: Phase, code: int, text: str, hint: Hint | None) -> Outcome:
    if hint is not None and hint.account_wide:
        return Outcome.CONFIGURATION
    if phase is Phase.MAIL:
        too_big = code == 552 or enhanced_code(text) in ("5.3.4", "5.2.3")
        return Outcome.PERMANENT if too_big else Outcome.CONFIGURATION
    if phase in (Phase.CONNECT, Phase.TLS, Phase.AUTH):
        return Outcome.CONFIGURATION
    return Outcome.PERMANENT


def _auth_failure(code: int, said: str, hint: Hint | None) -> Failure:
    if 400 <= code < 500:
        return Failure(
            Outcome.TEMPORARY,
            f"The login could not be checked right now: {said}.",
            "Nothing; it will be tried again later.",
            reply_code(code, said),
        )
    meaning = hint.meaning if hint else "The server refused the login."
    fix = hint.fix if hint else "Check smtp.username and smtp.password."
    return Failure(Outcome.CONFIGURATION, f"{meaning} ({said})", fix, reply_code(code, said))


def disconnected(
    phase: Phase, dot_sent: bool, server: str, last_reply: str = "", cause: str = ""
) -> Failure:
    """The connection was lost; after the final dot nobody knows if the mail went.

    Why the step, the server's last reply (kept as the result's ``reply``) and the
    client's ``cause``: they are the evidence for whoever settles an unknown message,
    since SMTP has no Sent folder to look in.
    """
    evidence = _evidence(last_reply, cause)
    if dot_sent:
        return Failure(
            Outcome.AMBIGUOUS,
            f"The connection to {server} was lost after the whole message was sent (after "
            "the final dot of DATA, waiting for the server's confirmation); it may or may "
            f"not have been delivered.{evidence}",
            "Ask the recipient whether it arrived, or ask the mail server's administrator "
            "to look for its Message-ID in the server's log, before sending it again.",
            "disconnected-after-data",
            last_reply,
        )
    return Failure(
        Outcome.TEMPORARY,
        f"The connection to {server} was lost {_WHILE[phase]}, before the message was "
        f"handed over.{evidence}",
        "Nothing; it will be tried again later.",
        "disconnected",
        last_reply,
    )


def lost_while(phase: Phase) -> str:
    """What a recipient is told when the connection broke before its message went."""
    return f"no reply: the connection was lost {_WHILE[phase]}"


def _evidence(last_reply: str, cause: str) -> str:
    said_last = f" The server's last reply was: {last_reply}." if last_reply else ""
    ended = f" The connection ended with: {cause}." if cause else ""
    return said_last + ended


# --- exceptions while connecting -------------------------------------------------------


def connection_failure(
    exc: BaseException, s: SmtpSettings, phase: Phase = Phase.CONNECT
) -> Failure:
    """Classify an exception raised while connecting, encrypting, greeting or logging in."""
    if isinstance(exc, socket.gaierror):
        return _dns_failure(exc, s)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_failure(exc, s)
    if isinstance(exc, ssl.SSLError):
        return _tls_failure(exc, s)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Failure(
            Outcome.CONFIGURATION,
            f"{s.server} does not offer STARTTLS, so the connection cannot be encrypted.",
            f"Check {HOST} and {PORT}; if the server offers TLS from the first byte (port "
            f"465) set {SECURITY} ssl.",
            "no-starttls",
        )
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        if isinstance(exc.__context__, TimeoutError):  # smtplib re-raises read timeouts
            return _timeout_failure(s, phase)
        return disconnected(phase, False, s.server)
    if isinstance(exc, smtplib.SMTPHeloError):  # EHLO/HELO refused: about the connection
        return reply_failure(Phase.CONNECT, exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPResponseException):
        return reply_failure(phase, exc.smtp_code, exc.smtp_error)
    if isinstance(exc, ConnectionRefusedError):
        return Failure(
            Outcome.TEMPORARY,
            f"Nothing accepts connections on {s.server} (connection refused).",
            f"If this persists, check {HOST} and {PORT} (587 for starttls, 465 for ssl, "
            "25 for a relay).",
            "connection-refused",
        )
    if isinstance(exc, TimeoutError):
        return _timeout_failure(s, phase)
    if isinstance(exc, ValueError):  # e.g. a host name IDNA cannot encode
        return Failure(
            Outcome.CONFIGURATION,
            f"{s.host!r} cannot be used as a server name ({exc}).",
            f"Check {HOST}.",
            "bad-host",
        )
    return Failure(
        Outcome.TEMPORARY,
        f"{s.server} could not be reached ({_describe_oserror(exc)}).",
        "Check the network or firewall; it will be tried again later.",
        "network",
    )


def _dns_failure(exc: socket.gaierror, s: SmtpSettings) -> Failure:
    if exc.errno == socket.EAI_AGAIN:
        return Failure(
            Outcome.TEMPORARY,
            f"The name {s.host} could not be looked up right now (DNS did not answer).",
            "Nothing; it will be tried again later.",
            "dns-temporary",
        )
    return Failure(
        Outcome.CONFIGURATION,
        f"The SMTP server name {s.host} was not found (DNS: unknown host).",
        f"Check {HOST} for typos, e.g. smtp.office365.com.",
        "unknown-host",
    )


def certificate_failure(exc: ssl.SSLCertVerificationError, s: SmtpSettings) -> Failure:
    """A certificate that is not trusted, not for this host, or expired."""
    reason = getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or str(exc)
    lowered = reason.lower()
    if "mismatch" in lowered:
        fix = (
            f"Set {HOST} to the name on the server's certificate (e.g. smtp.office365.com, "
            "not an IP address or another alias)."
        )
    elif "expired" in lowered:
        fix = "The server's certificate has expired; its administrator must renew it."
    else:
        fix = (
            f"If the server uses a private certificate authority, set {CA_BUNDLE} to the "
            "CA's PEM file (or SSL_CERT_FILE for the whole system)."
        )
    return Failure(
        Outcome.CONFIGURATION,
        f"The TLS certificate of {s.host} could not be verified: {reason}.",
        fix,
        "tls-certificate",
    )


def _tls_failure(exc: ssl.SSLError, s: SmtpSettings) -> Failure:
    reason = getattr(exc, "reason", "") or str(exc)
    if s.security is Security.SSL:
        fix = (
            f"Port {s.port} may not speak TLS from the first byte: use {SECURITY} starttls "
            "with port 587, or ssl with port 465."
        )
    else:
        fix = f"Check {SECURITY} and {PORT}; the server and this client share no TLS version."
    return Failure(
        Outcome.CONFIGURATION,
        f"The TLS handshake with {s.server} failed ({reason}).",
        fix,
        "tls",
    )


def _timeout_failure(s: SmtpSettings, phase: Phase) -> Failure:
    fix = f"Check the network or firewall (outgoing port {s.port}); it will be tried again later."
    if phase is Phase.CONNECT and s.security is not Security.SSL:
        fix = (
            f"If port {s.port} expects TLS from the first byte (usually 465), set "
            f"{SECURITY} ssl; otherwise check the network or firewall."
        )
    return Failure(
        Outcome.TEMPORARY,
        f"{s.server} did not answer within {s.timeout} seconds.",
        fix,
        "timeout",
    )


def _describe_oserror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or name}"
    return type(exc).__name__
