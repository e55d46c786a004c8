"""The SMTP transport's settings: declared fields, resolution per account, and checks.

Why one module: the rules (which fields an auth mode needs, plain text only to a
loopback server, the Entra codes for XOAUTH2) are written once, in
:func:`sending_problems`, which the core asks on save, on the first rung of Test
connection, at dry run and before every claim.
"""

from __future__ import annotations

import ipaddress
import re
import socket
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
    credential_problems,
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
MAX_CONNECTIONS = "mail.max_connections"  # the pacing setting (crm_core.settings)
USERNAME = "smtp.username"
PASSWORD = "smtp.password"
CA_BUNDLE = "tls.ca_bundle"
TRANSPORT_KEY = "mail.transport"
OAUTH_HOSTS = "smtp.oauth_hosts"

MICROSOFT_SMTP_HOSTS = frozenset(
    {
        "smtp.office365.com",  # Microsoft 365 worldwide
        "smtp-legacy.office365.com",
        "smtp.office365.us",  # GCC High and DoD
        "smtp.partner.outlook.cn",  # operated by 21Vianet
        "smtp.hve.mx.microsoft",  # High Volume Email
        "smtp-hve.office365.com",
    }
)
"""Where an app-only Exchange token may go over XOAUTH2 without an administrator
listing it: Microsoft's own SMTP hosts."""

DEFAULT_TIMEOUT = 30
#: Exchange Online's limit of concurrent SMTP connections per mailbox, the strictest
#: of the common servers (Postfix allows 50 per client by default).
DEFAULT_CONNECTIONS = 3
MOST_CONNECTIONS = 10
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


def _validate_oauth_hosts(text: str) -> str:
    """Host names separated by commas or blanks, each checked as ``smtp.host`` is."""
    hosts = [_validate_host(word) for word in text.replace(",", " ").split()]
    return ", ".join(dict.fromkeys(hosts))


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
            OAUTH_HOSTS,
            Scope.SYSTEM,
            "Other SMTP servers for OAuth",
            help="With xoauth2 the app-only token for Exchange (which, with "
            "full_access_as_app, can read every mailbox of the tenant) is sent only to "
            "Microsoft's SMTP servers (smtp.office365.com and the national clouds'). List "
            "here, separated by commas, any other server you trust with it (e.g. a relay "
            "of your own in front of Microsoft 365). A user cannot change this list.",
            validator=_validate_oauth_hosts,
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
            help="The mailbox password (or an app password). Never shown again once saved. "
            "It is sent only to the server, port and encryption it was saved for: after a "
            "change of any of them it must be entered again.",
            bound_to=(HOST, PORT, SECURITY),
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
    """True for a server on this machine: a loopback address, or ``localhost`` or a
    ``*.localhost`` name that resolves to loopback addresses only.

    Why resolve: RFC 6761 reserves these names for loopback, but a resolver may not
    know that (``mail.localhost`` then goes to DNS, or a hosts file maps it elsewhere),
    and a password sent unencrypted to such a name would cross the network. Other
    names are not looked up: what they resolve to is not ours to vouch for.
    """
    name = host.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name != "localhost" and not name.endswith(".localhost"):
        return False
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).partition("%")[0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


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
    oauth_hosts: frozenset[str] = frozenset()
    """Servers an administrator listed in ``smtp.oauth_hosts`` (system only)."""

    @property
    def may_get_token(self) -> bool:
        """Whether this server may be handed the app-only token (XOAUTH2)."""
        host = self.host.lower().rstrip(".")
        return host in MICROSOFT_SMTP_HOSTS or host in self.oauth_hosts

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
        found += _token_host_problem(settings)
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
        oauth_hosts=frozenset(_text(account.system.get(OAUTH_HOSTS)).replace(",", " ").split()),
        connections=connections(account),
    )


def _text(value: SettingValue | None) -> str:
    return value if isinstance(value, str) else ""


def connections(account: SenderAccount) -> int:
    """How many connections one batch of this account opens at once: ``mail.max_connections``
    (1 to the most; unset or 0: the default).

    Why the pacing setting and no SMTP one of its own: the outbox's pacing holds a
    mailbox to ``mail.max_connections`` across every worker, and gives each batch as
    many slots as it opens connections, so one number is the whole story.
    """
    wanted = account.get_int(MAX_CONNECTIONS, 0)
    return min(wanted, MOST_CONNECTIONS) if wanted > 0 else DEFAULT_CONNECTIONS


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


def _token_host_problem(s: SmtpSettings) -> list[Problem]:
    """An app-only Exchange token goes only to Microsoft or to a server an admin listed.

    Why: with ``full_access_as_app`` it reads every mailbox of the tenant, so whoever
    may change ``smtp.host`` (a user's own override included) must not be able to
    have it sent to their server.
    """
    if not s.host or s.may_get_token:
        return []
    return [
        Problem(
            HOST,
            f"{AUTH} xoauth2 sends an app-only token for Exchange, which can read every "
            f"mailbox of the tenant; it is sent only to Microsoft's SMTP servers (e.g. "
            f"smtp.office365.com), or to servers an administrator lists in "
            f"{OAUTH_HOSTS}, and {s.host} is neither.",
            s.set_command(HOST, "smtp.office365.com"),
            also=(AUTH,),
        )
    ]


def _entra_problem(s: SmtpSettings, values: Mapping[str, object]) -> list[Problem]:
    missing = missing_credentials(values)
    if not missing:
        return credential_problems(values)
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
