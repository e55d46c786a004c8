"""The SMTP transport's settings: declared fields, resolution per account, and checks.

Why one module: the same rules (which fields an auth mode needs, plain text only to a
loopback server, the Entra codes for XOAUTH2) are applied on save (``check_settings``),
on the first rung of Test connection and before every send, so they must not drift.
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
    Scope,
    Secret,
    SenderAccount,
    SettingField,
    SettingNotice,
    SettingValue,
    SettingValueError,
    entra_fields,
    missing_credentials,
)

TRANSPORT = "smtp"
PLUGIN = "smtp_mail"

HOST = "smtp.host"
PORT = "smtp.port"
SECURITY = "smtp.security"
AUTH = "smtp.auth"
TIMEOUT = "smtp.timeout"
USERNAME = "smtp.username"
PASSWORD = "smtp.password"
CA_BUNDLE = "tls.ca_bundle"
TRANSPORT_KEY = "mail.transport"

DEFAULT_TIMEOUT = 30
USER_KEYS = (USERNAME, PASSWORD)
OVERRIDABLE = (HOST, PORT, SECURITY, AUTH)

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
class Problem:
    """A setting that stops the transport, with what to do about it.

    ``also`` names other keys whose save can create the same problem, so that saving
    any of them is refused (the core refuses a save only for notices on its key).
    """

    key: str
    message: str
    fix: str
    also: tuple[str, ...] = ()

    def notices(self) -> list[SettingNotice]:
        """The problem as error notices, one per key it concerns."""
        text = f"{self.message} {self.fix}"
        return [SettingNotice(key, "error", text) for key in (self.key, *self.also)]


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

    @property
    def server(self) -> str:
        """host:port, as shown to people."""
        return f"{self.host}:{self.port}"

    def problems(self, values: Mapping[str, object]) -> list[Problem]:
        """What is missing or unsafe; ``values`` are the raw values (for Entra codes)."""
        found = _missing_basics(self) + _plaintext_problem(self)
        if self.auth is AuthMode.XOAUTH2:
            found += _entra_problem(values)
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
    )


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
                "No SMTP server is set.",
                f"Set it with `crm settings set {HOST} smtp.example.com` "
                f"(or per user with `crm users set EMAIL {HOST} ...`).",
            )
        )
    if s.auth is AuthMode.PASSWORD:
        if not s.username:
            found.append(
                Problem(
                    USERNAME,
                    "No SMTP username is set for this user.",
                    f"Set it with `crm users set EMAIL {USERNAME} name@example.com` "
                    "(usually the full e-mail address).",
                )
            )
        if s.password is None:
            found.append(
                Problem(
                    PASSWORD,
                    "No SMTP password is saved for this user.",
                    f"Save it with `crm users set EMAIL {PASSWORD}` (it is read without echo).",
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
            f"to {s.host}; this is only allowed for a server on this machine.",
            f"Use {SECURITY} starttls (port 587) or ssl (port 465), or {AUTH} none "
            "for a relay that needs no login.",
            also=(AUTH, HOST),
        )
    ]


def _entra_problem(values: Mapping[str, object]) -> list[Problem]:
    missing = missing_credentials(values)
    if not missing:
        return []
    return [
        Problem(
            AUTH,
            f"{AUTH} xoauth2 needs the Entra app's codes; not set: {', '.join(missing)}.",
            "Enter Client ID, Tenant ID and Client secret with `crm settings set KEY VALUE` "
            "(the same codes as for Exchange).",
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
    """Cross-field notices for the saved settings (see the hook's contract).

    At system scope only the installation's own combination is judged; at user scope
    only for a user whose effective transport is SMTP (their choice or the product
    line's default), or, when the caller does not say, who has SMTP settings.
    """
    if scope is Scope.SYSTEM:
        account = SenderAccount(0, "", "", "", TRANSPORT, system=system)
        settings = resolve(account)
        problems = _plaintext_problem(settings)
        if settings.auth is AuthMode.XOAUTH2:
            problems += _entra_problem(system)
    else:
        user_values = user or {}
        uses = transport == TRANSPORT if transport else _uses_smtp(user_values)
        if not uses:
            return []
        account = SenderAccount(0, user_email or "", "", "", TRANSPORT, system, user_values)
        settings = resolve(account)
        problems = settings.problems({**system, **user_values})
    notices = [n for p in problems for n in p.notices()]
    return notices + _port_warnings(settings)


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
