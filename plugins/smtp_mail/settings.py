"""The SMTP transport's settings: declared fields, resolution per account, and checks.

Why one module: the rules (which fields an auth mode needs, plain text only to a
loopback server, the Entra codes for XOAUTH2) are written once, in
:func:`sending_problems`, which the core asks on save, on the first rung of Test
connection, at dry run and before every claim.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from crm_core.plugin_api import (
    FieldType,
    Problem,
    Scope,
    Secret,
    SenderAccount,
    SettingField,
    SettingNotice,
    SettingValue,
    SettingValueError,
    entra_fields,
    missing_credentials,
    set_command,
)

TRANSPORT = "smtp"
PLUGIN = "smtp_mail"

HOST = "smtp.host"
PORT = "smtp.port"
SECURITY = "smtp.security"
AUTH = "smtp.auth"
TIMEOUT = "smtp.timeout"
MAX_CONNECTIONS = "smtp.max_connections"
USERNAME = "smtp.username"
PASSWORD = "smtp.password"
CA_BUNDLE = "tls.ca_bundle"
TRANSPORT_KEY = "mail.transport"

DEFAULT_TIMEOUT = 30
#: Exchange Online's limit of concurrent SMTP connections per mailbox, the strictest
#: of the common servers (Postfix allows 50 per client by default).
DEFAULT_CONNECTIONS = 3
MOST_CONNECTIONS = 10
USER_KEYS = (USERNAME, PASSWORD)
OVERRIDABLE = (HOST, PORT, SECURITY, AUTH, MAX_CONNECTIONS)

E = TypeVar("E", bound=StrEnum)
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")


class Security(StrEnum):
    """How the connection is encrypted."""

    STARTTLS = "starttls"
    SSL = "ssl"
    NONE = "none"


class AuthMode(StrEnum):
    """How the client logs in."""

    PASSWORD = "password"
    XOAUTH2 = "xoauth2"
    NONE = "none"


DEFAULT_PORTS: Mapping[Security, int] = MappingProxyType(
    {Security.STARTTLS: 587, Security.SSL: 465, Security.NONE: 25}
)


def _validate_host(text: str) -> str:
    """Keep only a host name or IP address: customers paste URLs and host:port."""
    if "://" in text or "/" in text:
        raise SettingValueError(
            HOST, f"{text!r} looks like a URL; enter only the server name, e.g. smtp.office365.com"
        )
    bare = text.strip("[]")
    if ":" in bare and not _is_ip(bare):
        raise SettingValueError(
            HOST, f"{text!r} contains a port; enter the name here and the port in {PORT}"
        )
    if not (_is_ip(bare) or _HOST.match(bare)):
        raise SettingValueError(
            HOST, f"{text!r} is not a server name (letters, digits, dots and hyphens only)"
        )
    return bare.lower()


def _validate_port(text: str) -> str:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SettingValueError(
            PORT, f"{text!r} is not a port; use 587 (STARTTLS), 465 (SSL) or 25 (relay)"
        )
    return str(int(text))


def _validate_timeout(text: str) -> str:
    if not text.isdigit() or not 1 <= int(text) <= 600:
        raise SettingValueError(TIMEOUT, f"{text!r} is not a number of seconds from 1 to 600")
    return text


def _validate_connections(text: str) -> str:
    if not text.isdigit() or not 1 <= int(text) <= MOST_CONNECTIONS:
        raise SettingValueError(
            MAX_CONNECTIONS,
            f"{text!r} is not a number of connections from 1 to {MOST_CONNECTIONS} "
            f"(Microsoft 365 allows {DEFAULT_CONNECTIONS} per mailbox)",
        )
    return str(int(text))


def _validate_username(text: str) -> str:
    if any(ch.isspace() for ch in text):
        raise SettingValueError(USERNAME, "the username contains a space; remove it")
    return text


def smtp_fields() -> list[SettingField]:
    """The fields the SMTP transport declares (plus the shared Entra fields)."""
    return [
        SettingField(
            HOST,
            Scope.SYSTEM,
            "SMTP server",
            help="Name of the outgoing mail server, e.g. smtp.office365.com. "
            "A user may have a server of their own.",
            required_for=TRANSPORT,
            validator=_validate_host,
            user_override=True,
        ),
        SettingField(
            PORT,
            Scope.SYSTEM,
            "SMTP port",
            type=FieldType.INT,
            help="Empty: 587 for starttls, 465 for ssl, 25 for none.",
            validator=_validate_port,
            user_override=True,
        ),
        SettingField(
            SECURITY,
            Scope.SYSTEM,
            "SMTP encryption",
            type=FieldType.CHOICE,
            choices=tuple(s.value for s in Security),
            default=Security.STARTTLS.value,
            help="starttls (port 587), ssl (TLS from the first byte, port 465) or none "
            "(only for a server on this machine, or a relay without login).",
            user_override=True,
        ),
        SettingField(
            AUTH,
            Scope.SYSTEM,
            "SMTP login",
            type=FieldType.CHOICE,
            choices=tuple(a.value for a in AuthMode),
            default=AuthMode.PASSWORD.value,
            help="password (each user's username and password), xoauth2 (Microsoft 365 "
            "OAuth with the Client ID, Tenant ID and Client secret) or none (a relay).",
            user_override=True,
        ),
        SettingField(
            TIMEOUT,
            Scope.SYSTEM,
            "SMTP timeout",
            type=FieldType.INT,
            default=str(DEFAULT_TIMEOUT),
            help="Seconds to wait for the server at each step.",
            validator=_validate_timeout,
        ),
        SettingField(
            MAX_CONNECTIONS,
            Scope.SYSTEM,
            "SMTP connections per sender",
            type=FieldType.INT,
            default=str(DEFAULT_CONNECTIONS),
            help=f"How many connections one sender's mail may use at once (1 to "
            f"{MOST_CONNECTIONS}). Microsoft 365 allows {DEFAULT_CONNECTIONS} per mailbox; "
            "a server that allows fewer answers the extra ones with 421, and the mail "
            "goes over the others.",
            validator=_validate_connections,
            user_override=True,
        ),
        SettingField(
            USERNAME,
            Scope.USER,
            "SMTP username",
            help="Usually the user's full e-mail address. With xoauth2 it defaults to "
            "the user's e-mail address.",
            validator=_validate_username,
        ),
        SettingField(
            PASSWORD,
            Scope.USER,
            "SMTP password",
            type=FieldType.SECRET,
            help="The mailbox password (or an app password). Never shown again once saved.",
        ),
        *entra_fields(),
    ]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for a server on this machine (no DNS lookup: a name could lie)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SmtpSettings:
    """The resolved settings one account sends with (a user's override already applied)."""

    host: str
    port: int
    security: Security
    auth: AuthMode
    username: str
    password: Secret | None
    timeout: int
    ca_bundle: str | None
    email: str
    overridden: frozenset[str] = frozenset()
    connections: int = DEFAULT_CONNECTIONS

    @property
    def server(self) -> str:
        """host:port, as shown to people."""
        return f"{self.host}:{self.port}"

    def set_command(self, key: str, value: str = "") -> str:
        """The command that changes ``key`` where this account's value comes from."""
        scope = Scope.USER if key in USER_KEYS or key in self.overridden else Scope.SYSTEM
        return set_command(self.email, key, scope, value)


def sending_problems(account: SenderAccount) -> list[Problem]:
    """What stops this account from sending over SMTP: missing, unsafe, incomplete.

    The plugin's answer to the ``sending_problems`` hook; claim, dry run, Test
    connection, ``crm check`` and every save read it, so each rule is written once.
    """
    settings = resolve(account)
    found = _missing_basics(settings) + _plaintext_problem(settings)
    if settings.auth is AuthMode.XOAUTH2:
        found += _entra_problem(settings, {**account.system, **account.user})
    return found


def resolve(account: SenderAccount) -> SmtpSettings:
    """The account's SMTP settings, with defaults applied (no validation)."""
    security = _choice(Security, account.get_str(SECURITY), Security.STARTTLS)
    auth = _choice(AuthMode, account.get_str(AUTH), AuthMode.PASSWORD)
    username = account.get_str(USERNAME)
    if not username and auth is AuthMode.XOAUTH2:
        username = account.email
    return SmtpSettings(
        host=account.get_str(HOST).strip(),
        port=account.get_int(PORT, DEFAULT_PORTS[security]),
        security=security,
        auth=auth,
        username=username,
        password=account.get_secret(PASSWORD),
        timeout=account.get_int(TIMEOUT, DEFAULT_TIMEOUT),
        ca_bundle=account.get_str(CA_BUNDLE) or None,
        email=account.email,
        overridden=frozenset(k for k in OVERRIDABLE if k in account.user),
        connections=connections(account),
    )


def connections(account: SenderAccount) -> int:
    """How many connections this account's batch may use at once (1 to the most)."""
    wanted = account.get_int(MAX_CONNECTIONS, DEFAULT_CONNECTIONS)
    return min(max(wanted, 1), MOST_CONNECTIONS)


def _choice(kind: type[E], text: str, default: E) -> E:
    try:
        return kind(text)
    except ValueError:
        return default


def _missing_basics(s: SmtpSettings) -> list[Problem]:
    found: list[Problem] = []
    if not s.host:
        found.append(
            Problem(
                HOST,
                "No SMTP server is set (e.g. smtp.office365.com; a user may have a server "
                "of their own).",
                s.set_command(HOST),
            )
        )
    if s.auth is AuthMode.PASSWORD:
        if not s.username:
            found.append(
                Problem(
                    USERNAME,
                    "No SMTP username is set for this user (usually the full e-mail address).",
                    s.set_command(USERNAME),
                )
            )
        if s.password is None:
            found.append(
                Problem(
                    PASSWORD,
                    "No SMTP password is saved for this user (it is asked for without echo).",
                    s.set_command(PASSWORD),
                )
            )
    return found


def _plaintext_problem(s: SmtpSettings) -> list[Problem]:
    if s.security is not Security.NONE or s.auth is AuthMode.NONE or not s.host:
        return []
    if is_loopback(s.host):
        return []
    what = "the password" if s.auth is AuthMode.PASSWORD else "an OAuth token"
    return [
        Problem(
            SECURITY,
            f"{SECURITY} none with {AUTH} {s.auth.value} would send {what} unencrypted "
            f"to {s.host}; this is only allowed for a server on this machine. Use "
            f"{SECURITY} starttls (port 587) or ssl (port 465), or {AUTH} none for a relay "
            "that needs no login.",
            s.set_command(SECURITY, Security.STARTTLS.value),
            also=(AUTH, HOST),
        )
    ]


def _entra_problem(s: SmtpSettings, values: Mapping[str, object]) -> list[Problem]:
    missing = missing_credentials(values)
    if not missing:
        return []
    return [
        Problem(
            AUTH,
            f"{AUTH} xoauth2 needs the Entra app's codes (the same as for Exchange); "
            f"not set: {', '.join(missing)}.",
            "; ".join(set_command(s.email, key, Scope.SYSTEM) for key in missing),
        )
    ]


# --- check_settings ------------------------------------------------------------------


def check(
    scope: Scope,
    system: Mapping[str, SettingValue],
    user: Mapping[str, SettingValue] | None,
    user_email: str | None,
    transport: str | None = None,
) -> list[SettingNotice]:
    """Advice on the saved settings (see the hook's contract): port/security mismatch.

    At system scope the installation's own combination is judged; at user scope only
    for a user whose effective transport is SMTP (their choice or the product line's
    default), or, when the caller does not say, who has SMTP settings. What stops
    sending is :func:`sending_problems`.
    """
    if scope is Scope.SYSTEM:
        return _port_warnings(resolve(SenderAccount(0, "", "", "", TRANSPORT, system=system)))
    user_values = user or {}
    uses = transport == TRANSPORT if transport else _uses_smtp(user_values)
    if not uses:
        return []
    account = SenderAccount(0, user_email or "", "", "", TRANSPORT, system, user_values)
    return _port_warnings(resolve(account))


def _uses_smtp(user: Mapping[str, SettingValue]) -> bool:
    chosen = user.get(TRANSPORT_KEY)
    if isinstance(chosen, str) and chosen:
        return chosen == TRANSPORT
    return any(k.startswith("smtp.") for k in user)


def _port_warnings(s: SmtpSettings) -> list[SettingNotice]:
    if s.security is Security.SSL and s.port == 587:
        return [
            SettingNotice(
                PORT,
                "warning",
                "port 587 normally expects STARTTLS, not TLS from the first byte; "
                f"use {SECURITY} starttls, or port 465 with ssl.",
            )
        ]
    if s.security is Security.STARTTLS and s.port == 465:
        return [
            SettingNotice(
                PORT,
                "warning",
                "port 465 normally expects TLS from the first byte; "
                f"use {SECURITY} ssl, or port 587 with starttls.",
            )
        ]
    return []
