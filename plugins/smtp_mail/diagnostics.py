"""Test connection for SMTP: a ladder of steps, each green or red with reason and fix.

Why MAIL FROM with the user's own address: a login can succeed while the account may
not send as that address (Microsoft 365 5.7.60); Odoo's test passed and the first real
send failed. The ladder ends with RSET and QUIT, so nothing is ever sent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from crm_core.plugin_api import (
    ConnectionReport,
    ConnectionStep,
    Problem,
    Resources,
    SenderAccount,
    StepStatus,
)
from smtp_mail.classify import Failure, Phase, SmtpFailure, connection_failure, reply_failure
from smtp_mail.client import SmtpClient
from smtp_mail.oauth import EntraTokens
from smtp_mail.settings import (
    SECURITY,
    TRANSPORT,
    AuthMode,
    Security,
    SmtpSettings,
    is_loopback,
    resolve,
)

STEPS = ("settings", "resolve", "connect", "tls", "token", "auth", "sender")


@dataclass
class _Ladder:
    """Collects the steps; after a red one the rest are shown as skipped."""

    settings: SmtpSettings
    steps: list[ConnectionStep] = field(default_factory=list)
    failed: ConnectionStep | None = None

    def ok(self, name: str, detail: str) -> None:
        self.steps.append(ConnectionStep(name, StepStatus.OK, detail))

    def add(self, name: str, status: StepStatus, detail: str, fix: str = "") -> None:
        self.steps.append(ConnectionStep(name, status, detail, fix))

    def fail(self, name: str, failure: Failure) -> None:
        detail = f"{failure.detail} [{failure.code}]" if failure.code else failure.detail
        step = ConnectionStep(name, StepStatus.FAILED, detail, failure.fix)
        self.steps.append(step)
        self.failed = step

    def report(self) -> ConnectionReport:
        done = {s.name for s in self.steps}
        rest = [
            ConnectionStep(n, StepStatus.SKIPPED, "not tried (an earlier step failed)")
            for n in STEPS
            if n not in done and self.failed is not None and _applies(n, self.settings)
        ]
        steps = tuple(self.steps + rest)
        s = self.settings
        if self.failed is None:
            summary = f"Connected to the SMTP server {s.server}"
            if s.auth is not AuthMode.NONE:
                summary += f" as {s.username}"
        else:
            summary = f"SMTP connection failed at step '{self.failed.name}'"
        return ConnectionReport(TRANSPORT, summary, steps)


def _applies(step: str, s: SmtpSettings) -> bool:
    return step != "token" or s.auth is AuthMode.XOAUTH2


def test_connection(
    account: SenderAccount, resources: Resources, problems: Sequence[Problem]
) -> ConnectionReport:
    """Run the ladder for one account (see the module docstring).

    ``problems`` is the core's answer to what stops the account from sending; any
    of them is a red settings rung and nothing is tried on the network.
    """
    settings = resolve(account)
    ladder = _Ladder(settings)
    if problems:
        for p in problems:
            ladder.add("settings", StepStatus.FAILED, f"{p.key}: {p.message}", p.fix)
        ladder.failed = ladder.steps[0]
        return ladder.report()
    ladder.ok("settings", _describe(settings))
    tokens = EntraTokens.for_account(account, resources)
    client = SmtpClient(settings, tokens)
    try:
        _climb(ladder, client, tokens, account.email)
    finally:
        client.close()
    return ladder.report()


def _climb(ladder: _Ladder, client: SmtpClient, tokens: EntraTokens | None, email: str) -> None:
    rungs: list[Callable[[], bool]] = [
        lambda: _resolve(ladder),
        lambda: _connect(ladder, client),
        lambda: _tls(ladder, client),
        lambda: _token(ladder, tokens),
        lambda: _auth(ladder, client),
        lambda: _sender(ladder, client, email),
    ]
    for rung in rungs:
        if not rung():
            return


def _resolve(ladder: _Ladder) -> bool:
    s = ladder.settings
    try:
        infos = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        ladder.fail("resolve", connection_failure(exc, s))
        return False
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    shown = ", ".join(addresses[:3]) + (" …" if len(addresses) > 3 else "")
    ladder.ok("resolve", f"{s.host} is {shown}")
    return True


def _connect(ladder: _Ladder, client: SmtpClient) -> bool:
    s = ladder.settings
    try:
        greeting = client.connect()
    except SmtpFailure as exc:
        if exc.phase is Phase.TLS:  # TLS from the first byte: TCP itself worked
            ladder.ok("connect", f"TCP connection to {s.server} opened")
            ladder.fail("tls", exc.failure)
        else:
            ladder.fail("connect", exc.failure)
        return False
    first_line = " ".join(greeting.split())[:100]
    ladder.ok("connect", f"{s.server} answered: 220 {first_line}")
    return True


def _tls(ladder: _Ladder, client: SmtpClient) -> bool:
    s = ladder.settings
    try:
        client.secure()
    except SmtpFailure as exc:
        ladder.fail("tls", exc.failure)
        return False
    info = client.tls_info()
    if info is not None:
        version, cert = info
        ladder.ok("tls", f"{version}; {_certificate_words(cert, s.host)}")
    elif is_loopback(s.host):
        ladder.add(
            "tls", StepStatus.SKIPPED, f"not encrypted ({SECURITY} none, server on this machine)"
        )
    else:
        ladder.add(
            "tls",
            StepStatus.WARNING,
            f"not encrypted ({SECURITY} none): mail crosses the network in clear text",
            f"Use {SECURITY} starttls if {s.host} offers it.",
        )
    return True


def _token(ladder: _Ladder, tokens: EntraTokens | None) -> bool:
    if ladder.settings.auth is not AuthMode.XOAUTH2:
        return True
    assert tokens is not None  # settings problems would have stopped the ladder
    try:
        tokens.token()
    except SmtpFailure as exc:
        ladder.fail("token", exc.failure)
        return False
    ladder.ok("token", f"OAuth token obtained from {tokens.authority}")
    return True


def _auth(ladder: _Ladder, client: SmtpClient) -> bool:
    s = ladder.settings
    if s.auth is AuthMode.NONE:
        ladder.add(
            "auth",
            StepStatus.SKIPPED,
            "no login (smtp.auth none): the server must accept mail from this machine",
        )
        return True
    try:
        client.login()
    except SmtpFailure as exc:
        ladder.fail("auth", exc.failure)
        return False
    how = "XOAUTH2 (OAuth)" if s.auth is AuthMode.XOAUTH2 else "password"
    ladder.ok("auth", f"logged in as {s.username} with {how}")
    return True


def _sender(ladder: _Ladder, client: SmtpClient, email: str) -> bool:
    try:
        code, reply = client.probe_sender(email)
    except SmtpFailure as exc:
        ladder.fail("sender", exc.failure)
        return False
    if code != 250:
        ladder.fail("sender", reply_failure(Phase.MAIL, code, reply, email))
        return False
    ladder.ok("sender", f"the server accepts {email} as sender (MAIL FROM; reset, nothing sent)")
    return True


def _describe(s: SmtpSettings) -> str:
    security = {
        Security.STARTTLS: "STARTTLS",
        Security.SSL: "TLS from the first byte",
        Security.NONE: "no encryption",
    }[s.security]
    login = {
        AuthMode.PASSWORD: f"password login as {s.username}",
        AuthMode.XOAUTH2: f"OAuth (XOAUTH2) as {s.username}",
        AuthMode.NONE: "no login",
    }[s.auth]
    return f"{s.server}, {security}, {login}"


def _certificate_words(cert: dict[str, object], host: str) -> str:
    issuer = _name_part(cert.get("issuer"), ("organizationName", "commonName"))
    until = str(cert.get("notAfter", "")).strip()
    words = f"certificate valid for {host}"
    if issuer:
        words += f", issued by {issuer}"
    if until:
        words += f", expires {until}"
    return words


def _name_part(name: object, keys: tuple[str, ...]) -> str:
    """A field of a certificate name as returned by getpeercert()."""
    if not isinstance(name, tuple):
        return ""
    pairs = {k: v for rdn in name for k, v in rdn}
    return next((str(pairs[k]) for k in keys if k in pairs), "")
