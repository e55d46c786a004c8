"""The Exchange transport's settings: fields, validators and cross-field checks.

Why here and not in the core: only this plugin knows what an EWS URL must look like,
that "Sync with Exchange" must be ticked, or that a username in another domain than
``exchange.domain`` is the guide's most common mistake. The OAuth fields (Client ID,
Tenant ID, Client secret, authority, secret expiry) come from :mod:`crm_core.entra`,
shared with every Microsoft transport.

Which authentication is used is derived, not chosen: when any of the three OAuth codes
is saved, app-only OAuth with impersonation (Exchange Online, or Exchange Server with
hybrid modern auth); otherwise the user's own username and password (on-premises
Exchange Server, NTLM unless ``exchange.onprem_auth`` says basic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from urllib.parse import urlsplit

from crm_core.plugin_api import (
    CLIENT_ID,
    CLIENT_SECRET,
    CREDENTIAL_KEYS,
    TENANT_ID,
    AppCredentials,
    FieldType,
    Outcome,
    Problem,
    Scope,
    Secret,
    SenderAccount,
    SettingField,
    SettingNotice,
    SettingValue,
    SettingValueError,
    TransportError,
    credential_problems,
    credentials_for,
    entra_fields,
    expiry_notices,
    explain_address,
    is_guid,
    missing_credentials,
    set_command,
)

TRANSPORT = "exchange"
PLUGIN = "exchange_mail"
EWS_CACHE = (PLUGIN, "ews")
"""Key prefix of the cached exchangelib Accounts in the Crm's Resources."""

URL = "exchange.url"
API = "exchange.api"
GRAPH_URL = "exchange.graph_url"
OAUTH_HOSTS = "exchange.oauth_hosts"
SERVER_VERSION = "exchange.server_version"
ONPREM_AUTH = "exchange.onprem_auth"
DOMAIN = "exchange.domain"
USERNAME = "exchange.username"
PASSWORD = "exchange.password"
SYNC = "exchange.sync"
CA_BUNDLE = "tls.ca_bundle"

EWS_PATH = "/EWS/Exchange.asmx"
DEFAULT_GRAPH_URL = "https://graph.microsoft.com"
EXAMPLE_URL = f"https://outlook.office365.com{EWS_PATH}"

MAIL_SEND = "Mail.Send"
READ_PERMISSION = "Mail.ReadBasic.All"
"""The one read permission named everywhere: reconciling looks a Message-ID up in the
Outbox and Sent Items, which needs no more than the basic properties of a message."""
READ_ROLES = frozenset({READ_PERMISSION, "Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"})
"""Application permissions any of which lets reconciling look a Message-ID up."""
READ_WRITE_PERMISSION = "Mail.ReadWrite"
"""Needed only for attachments of 3 MB and more: a draft and an upload session."""
GRAPH_PERMISSIONS = (
    f"Microsoft Graph application permissions {MAIL_SEND}, {READ_PERMISSION} (reconciling) "
    f"and {READ_WRITE_PERMISSION} (attachments of 3 MB and more)"
)

GUIDE_CREDENTIALS = "TestConnection error Credentials"
"""The guide's red text for credentials that do not add up; kept recognisable."""

SERVER_VERSIONS = ("online", "2013", "2013_sp1", "2016", "2019")


class Api(StrEnum):
    """Which Microsoft API carries the mail; ``auto`` is a choice, never the one used."""

    AUTO = "auto"
    EWS = "ews"
    GRAPH = "graph"


@dataclass(frozen=True)
class Cloud:
    """One Exchange Online cloud: its name and its Microsoft Graph host."""

    name: str
    graph_url: str


_GLOBAL = Cloud("Exchange Online", DEFAULT_GRAPH_URL)
EXCHANGE_ONLINE_CLOUDS: Mapping[str, Cloud] = {
    # EWS host of each cloud -> the Graph host of the same cloud (Microsoft's national
    # cloud deployment table). GCC (moderate) uses the global hosts.
    "outlook.office365.com": _GLOBAL,
    "outlook.office.com": _GLOBAL,
    "outlook.office365.us": Cloud(
        "Exchange Online (US Government GCC High)", "https://graph.microsoft.us"
    ),
    "webmail.apps.mil": Cloud(
        "Exchange Online (US Government DoD)", "https://dod-graph.microsoft.us"
    ),
    "partner.outlook.cn": Cloud(
        "Exchange Online operated by 21Vianet (China)", "https://microsoftgraph.chinacloudapi.cn"
    ),
}
"""How ``exchange.api = auto`` recognises Exchange Online: by the host of the EWS URL."""


GRAPH_HOSTS = frozenset(
    urlsplit(cloud.graph_url).hostname or "" for cloud in EXCHANGE_ONLINE_CLOUDS.values()
)
"""Microsoft Graph's host in every cloud."""

MICROSOFT_TOKEN_HOSTS = frozenset(EXCHANGE_ONLINE_CLOUDS) | GRAPH_HOSTS
"""Where the app-only token may go without an administrator listing the host: Exchange
Online's EWS hosts and Microsoft Graph's, in every cloud."""


def exchange_online_cloud(url: str) -> Cloud | None:
    """The Exchange Online cloud whose EWS host ``url`` names; None for any other server."""
    return EXCHANGE_ONLINE_CLOUDS.get((urlsplit(url).hostname or "").lower())


class AuthMode(StrEnum):
    """How the transport signs in, derived from which settings are saved."""

    OAUTH = "oauth"
    PASSWORD = "password"


# --- validators -------------------------------------------------------------------


def validate_ews_url(text: str) -> str:
    """Accept only ``https://<host>[/<prefix>]/EWS/Exchange.asmx``, exactly so cased.

    A near miss is refused with the corrected URL in the message, because the guide
    says the path must end with exactly ``/EWS/Exchange.asmx`` and case matters.
    """
    parts = urlsplit(text.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise SettingValueError(
            URL,
            f"{text!r} is not a URL; write the server's EWS address, for example {EXAMPLE_URL}",
        )
    netloc = f"{host}:{parts.port}" if parts.port else host
    if "[" in parts.netloc:  # keep IPv6 literals bracketed
        netloc = parts.netloc.rpartition("@")[2].lower()
    path = parts.path
    if path.endswith(EWS_PATH):
        fixed_path = path
    elif path.rstrip("/").lower().endswith(EWS_PATH.lower()):
        stripped = path.rstrip("/")
        fixed_path = stripped[: -len(EWS_PATH)] + EWS_PATH
    else:
        fixed_path = EWS_PATH
    suggestion = f"https://{netloc}{fixed_path}"
    if parts.scheme.lower() != "https":
        raise SettingValueError(
            URL, f"the Exchange URL must use https; did you mean {suggestion} ?"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SettingValueError(
            URL,
            f"the Exchange URL takes no query, fragment or user name; did you mean {suggestion} ?",
        )
    if path != fixed_path:
        raise SettingValueError(
            URL,
            f"the URL must end with exactly {EWS_PATH} (letter case matters); "
            f"did you mean {suggestion} ?",
        )
    return suggestion


def _validate_graph_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise SettingValueError(
            GRAPH_URL, f"{text!r} must be an https URL such as {DEFAULT_GRAPH_URL}"
        )
    if parts.path.strip("/") or parts.query:
        raise SettingValueError(
            GRAPH_URL,
            f"give only the host, without /v1.0 or a path: https://{parts.netloc.lower()}",
        )
    return f"https://{parts.netloc.lower()}"


def _validate_oauth_hosts(text: str) -> str:
    """Host names separated by commas or blanks (no scheme, path or port)."""
    hosts = []
    for word in text.replace(",", " ").split():
        host = word.lower().rstrip(".")
        if urlsplit(f"https://{host}").hostname != host or "/" in host or ":" in host:
            raise SettingValueError(
                OAUTH_HOSTS, f"{word!r} is not a host name; give names only, e.g. ews.proxy.se"
            )
        hosts.append(host)
    return ", ".join(dict.fromkeys(hosts))


def _validate_domain(text: str) -> str:
    domain = text.strip().lower().lstrip("@")
    problem = explain_address(f"user@{domain}")
    if problem or "@" in domain:
        raise SettingValueError(
            DOMAIN,
            f"{text!r} is not a domain name; enter the domain the OAuth codes belong to, "
            "e.g. organisation.se or organisation.onmicrosoft.com",
        )
    return domain


def _validate_username(text: str) -> str:
    problem = explain_address(text)
    if problem:
        raise SettingValueError(
            USERNAME,
            f"{text!r} is not a full e-mail address ({problem}); the username is the "
            "user's full primary e-mail address, e.g. name@organisation.se",
        )
    return text.strip()


# --- fields -----------------------------------------------------------------------


def fields() -> list[SettingField]:
    """The guide's System settings and the user dialog's E-mail tab, for Exchange."""
    return [
        SettingField(
            URL,
            Scope.SYSTEM,
            "Exchange URL",
            help=f"The server's EWS address; must end with exactly {EWS_PATH}, e.g. {EXAMPLE_URL}.",
            required_for=TRANSPORT,
            validator=validate_ews_url,
            plugin=PLUGIN,
        ),
        SettingField(
            API,
            Scope.SYSTEM,
            "Exchange API",
            type=FieldType.CHOICE,
            choices=tuple(a.value for a in Api),
            default=Api.AUTO.value,
            help="auto: Microsoft Graph when the Exchange URL is Exchange Online's "
            "(outlook.office365.com, or a national cloud's), else EWS. ews: Exchange Web "
            "Services (Exchange Server, and Exchange Online while Microsoft allows it). "
            f"graph: Microsoft Graph sendMail (Exchange Online; needs the {MAIL_SEND} "
            f"application permission, {READ_PERMISSION} for reconciling and "
            f"{READ_WRITE_PERMISSION} for attachments over 3 MB).",
            plugin=PLUGIN,
        ),
        SettingField(
            GRAPH_URL,
            Scope.SYSTEM,
            "Microsoft Graph URL",
            help="Microsoft Graph's host. Empty: the Graph host of the Exchange URL's cloud "
            f"({DEFAULT_GRAPH_URL}; https://graph.microsoft.us for outlook.office365.us, "
            "https://dod-graph.microsoft.us for webmail.apps.mil, "
            "https://microsoftgraph.chinacloudapi.cn for partner.outlook.cn). Set it for a "
            "proxy in front of Graph.",
            validator=_validate_graph_url,
            plugin=PLUGIN,
        ),
        SettingField(
            OAUTH_HOSTS,
            Scope.SYSTEM,
            "Other Exchange servers for OAuth",
            help="The app-only token (which, with full_access_as_app or Mail.Send, can act "
            "for every mailbox of the tenant) is sent only to Microsoft's Exchange Online "
            "and Graph hosts. List here, separated by commas, any other host you trust "
            "with it (e.g. a proxy of your own in front of Microsoft). A user cannot "
            "change this list.",
            validator=_validate_oauth_hosts,
        ),
        SettingField(
            SERVER_VERSION,
            Scope.SYSTEM,
            "Exchange server version",
            type=FieldType.CHOICE,
            choices=SERVER_VERSIONS,
            help="Pins the EWS schema version so no request is spent guessing it. "
            "Empty: 'online' with OAuth, '2016' with a password (Exchange 2016/2019 speak "
            "the same schema).",
            plugin=PLUGIN,
        ),
        SettingField(
            ONPREM_AUTH,
            Scope.SYSTEM,
            "On-premises sign-in",
            type=FieldType.CHOICE,
            choices=("ntlm", "basic"),
            default="ntlm",
            help="How users sign in with their password when OAuth is not set up "
            "(Exchange Server). Basic only over https.",
            plugin=PLUGIN,
        ),
        *entra_fields(),
        SettingField(
            DOMAIN,
            Scope.USER,
            "Domain",
            help="The domain the OAuth codes belong to, e.g. organisation.se.",
            required_for=TRANSPORT,
            validator=_validate_domain,
            plugin=PLUGIN,
        ),
        SettingField(
            USERNAME,
            Scope.USER,
            "Username",
            help="The user's full primary e-mail address (not an alias).",
            required_for=TRANSPORT,
            validator=_validate_username,
            plugin=PLUGIN,
        ),
        SettingField(
            PASSWORD,
            Scope.USER,
            "Password",
            type=FieldType.SECRET,
            help="The user's network password; used only for Exchange Server without OAuth. "
            "It is sent only to the Exchange URL it was saved for: after a change of the URL "
            "(or of the CA bundle) it must be entered again.",
            plugin=PLUGIN,
            bound_to=(URL, CA_BUNDLE),
        ),
        SettingField(
            SYNC,
            Scope.USER,
            "Sync with Exchange",
            type=FieldType.BOOL,
            help="Must be ticked to send via Exchange.",
            plugin=PLUGIN,
        ),
    ]


# --- what an account's settings amount to ------------------------------------------


@dataclass(frozen=True)
class ExchangeSettings:
    """One account's Exchange settings, resolved and typed.

    ``mailbox`` is the mailbox signed in to or impersonated (``exchange.username``);
    the user's basic e-mail is the sender (From).
    """

    url: str
    api: Api
    graph_url: str
    mode: AuthMode | None
    mailbox: str
    domain: str
    sync: bool
    app: AppCredentials | None
    password: Secret | None
    onprem_auth: str
    server_version: str
    ca_bundle: str | None
    api_choice: Api = Api.EWS
    oauth_hosts: frozenset[str] = frozenset()
    """Hosts an administrator listed in ``exchange.oauth_hosts`` (system only)."""

    @property
    def endpoint_host(self) -> str:
        """The host the mail's requests (and so the token) go to: Graph's or EWS's."""
        url = self.graph_url if self.api is Api.GRAPH else self.url
        return (urlsplit(url).hostname or "").lower().rstrip(".")

    def may_get_token(self, host: str) -> bool:
        """Whether ``host`` may be handed the app-only token."""
        host = host.lower().rstrip(".")
        return host in MICROSOFT_TOKEN_HOSTS or host in self.oauth_hosts

    @property
    def host(self) -> str:
        """The Exchange server's host name."""
        return (urlsplit(self.url).hostname or "").lower()

    @property
    def cloud(self) -> Cloud | None:
        """The Exchange Online cloud of the EWS URL; None for Exchange Server."""
        return exchange_online_cloud(self.url)

    @property
    def exchange_online(self) -> bool:
        """True for Microsoft's Exchange Online endpoint (any cloud)."""
        return self.cloud is not None

    @property
    def graph_root(self) -> str:
        """The Graph endpoint requests go to, e.g. ``https://graph.microsoft.com/v1.0``."""
        return f"{self.graph_url.rstrip('/')}/v1.0"

    @property
    def api_reason(self) -> str:
        """Why this API: the setting, or what ``auto`` recognised."""
        if self.api_choice is not Api.AUTO:
            return f"{API} = {self.api_choice.value}"
        if self.cloud is not None:
            return f"{self.cloud.name}: sending through Microsoft Graph ({API} auto)"
        return f"Exchange Server: sending through EWS ({API} auto)"


def choose_api(choice: Api, url: str) -> Api:
    """The API used: ``auto`` means Graph for Exchange Online, EWS for any other server."""
    if choice is not Api.AUTO:
        return choice
    return Api.GRAPH if exchange_online_cloud(url) else Api.EWS


def resolve(account: SenderAccount) -> ExchangeSettings:
    """Read an account's Exchange settings (secrets stay masked Secret objects)."""
    oauth_set = any(account.get(k) for k in (CLIENT_ID, TENANT_ID, *CREDENTIAL_KEYS))
    password = account.get_secret(PASSWORD)
    mode = AuthMode.OAUTH if oauth_set else AuthMode.PASSWORD if password else None
    api_text = account.get_str(API, Api.AUTO.value)
    choice = Api(api_text) if api_text in tuple(Api) else Api.AUTO
    url = account.get_str(URL)
    cloud = exchange_online_cloud(url)
    return ExchangeSettings(
        url=url,
        api=choose_api(choice, url),
        graph_url=account.get_str(GRAPH_URL) or (cloud.graph_url if cloud else DEFAULT_GRAPH_URL),
        mode=mode,
        mailbox=account.get_str(USERNAME).strip(),
        domain=account.get_str(DOMAIN).strip().lower(),
        sync=account.get_bool(SYNC),
        app=credentials_for(account) if oauth_set else None,
        password=password,
        onprem_auth=account.get_str(ONPREM_AUTH, "ntlm") or "ntlm",
        server_version=account.get_str(SERVER_VERSION),
        ca_bundle=account.get_str(CA_BUNDLE) or None,
        api_choice=choice,
        oauth_hosts=_oauth_hosts(account),
    )


def _oauth_hosts(account: SenderAccount) -> frozenset[str]:
    """The administrator's list: read from the system settings only, never a user's."""
    listed = account.system.get(OAUTH_HOSTS)
    return frozenset(listed.replace(",", " ").split()) if isinstance(listed, str) else frozenset()


def token_host_problems(settings: ExchangeSettings) -> list[Problem]:
    """The app-only token may go only to Microsoft or to a host the administrator listed;
    anyone who may change a URL must not be able to collect it."""
    host = settings.endpoint_host
    if not host or settings.may_get_token(host):
        return []
    key = GRAPH_URL if settings.api is Api.GRAPH else URL
    return [
        Problem(
            key,
            f"{host} is neither Exchange Online nor Microsoft Graph, and the app-only token "
            f"(which can act for every mailbox of the tenant) is sent only to them or to "
            f"hosts listed in {OAUTH_HOSTS}",
            f"use Microsoft's URL, or, if you trust {host} with the token (a proxy of your "
            f"own), list it: crm settings set {OAUTH_HOSTS} {host}",
        )
    ]


def guard_token_host(settings: ExchangeSettings) -> None:
    """The last check before a session that carries the token is made: raises a
    configuration error (nothing is sent) when :func:`token_host_problems` objects.
    Every path asks ``sending_problems`` first; this holds should one ever not."""
    for problem in token_host_problems(settings):
        raise TransportError(Outcome.CONFIGURATION, problem.message, "token-host")


def blocking_problems(account: SenderAccount, settings: ExchangeSettings) -> list[Problem]:
    """Everything that must be fixed before a mail can go, in the guide's order.

    The plugin's answer to ``sending_problems``: claim, dry run, Test connection,
    ``crm check`` and every save read it, so each rule is written here once.
    """
    email = account.email
    problems: list[Problem] = []
    if settings.api is Api.EWS and not settings.url:
        problems.append(url_problem())
    if settings.api is Api.GRAPH and settings.mode is AuthMode.PASSWORD:
        problems.append(
            Problem(
                API,
                "Microsoft Graph needs the OAuth codes (Client ID, Tenant ID, Client secret); "
                "a password cannot sign in to Graph (for Exchange Server, use EWS: "
                f"{set_command(email, API, Scope.SYSTEM, Api.EWS.value)})",
                _settings_commands(CLIENT_ID, TENANT_ID, CLIENT_SECRET),
            )
        )
    elif settings.mode is None:
        problems.append(
            Problem(
                CLIENT_ID,
                "neither the OAuth codes (Client ID, Tenant ID, Client secret) nor the "
                "user's password are saved (Exchange Online needs the codes; for Exchange "
                f"Server, save the user's password: {set_command(email, PASSWORD, Scope.USER)})",
                _settings_commands(CLIENT_ID, TENANT_ID, CLIENT_SECRET),
            )
        )
    elif settings.mode is AuthMode.OAUTH:
        values = {**account.system, **account.user}
        missing = missing_credentials(values)
        if missing:
            problems.append(
                Problem(
                    missing[0],
                    f"the OAuth codes are incomplete: {', '.join(missing)} not saved"
                    + (" (or a certificate)" if CLIENT_SECRET in missing else ""),
                    _settings_commands(*missing),
                )
            )
        problems.extend(credential_problems(values))
        problems.extend(token_host_problems(settings))
    if not settings.mailbox:
        problems.append(
            Problem(
                USERNAME,
                "Username is not set (the user's full primary e-mail address)",
                set_command(email, USERNAME, Scope.USER),
            )
        )
    if not settings.domain:
        problems.append(
            Problem(
                DOMAIN,
                "Domain is not set (the domain the OAuth codes belong to)",
                set_command(email, DOMAIN, Scope.USER),
            )
        )
    if not settings.sync:
        problems.append(sync_problem(email))
    return problems


def _settings_commands(*keys: str) -> str:
    """The commands that save each of ``keys`` (each asks for its value)."""
    return "; ".join(set_command("", key, Scope.SYSTEM) for key in keys)


def url_problem() -> Problem:
    """EWS needs the server's URL."""
    return Problem(
        URL, "the Exchange URL is not set", set_command("", URL, Scope.SYSTEM, EXAMPLE_URL)
    )


def sync_problem(email: str) -> Problem:
    """The guide's rule: "Sync with Exchange" must be ticked to send via Exchange."""
    return Problem(
        SYNC,
        "'Sync with Exchange' is not ticked; it must be ticked to send via Exchange "
        "(choosing which syncs is not required)",
        set_command(email, SYNC, Scope.USER, "true"),
    )


def domain_mismatch(username: str, domain: str) -> str | None:
    """The guide's advice when the username's domain differs from exchange.domain."""
    if not username or not domain or "@" not in username:
        return None
    user_domain = username.rpartition("@")[2].lower()
    if user_domain == domain:
        return None
    return (
        f"the username {username} is in domain {user_domain}, but {DOMAIN} is {domain}. "
        "The domain must be the one the OAuth codes belong to, and the username the "
        "user's full primary address in it (e.g. name@organisation.se, or "
        "name@organisation.onmicrosoft.com), not an alias in another domain"
    )


SECRET_ID_WARNING = (
    "the saved client secret looks like a Secret ID (a GUID); Entra needs the secret's "
    "Value, shown only once when the secret is created (Certificates & secrets → "
    "Client secrets → Value column)"
)


def ews_retirement_notice(url: str) -> str | None:
    """Microsoft blocks EWS in Exchange Online from 1 Oct 2026 and ends it 1 Apr 2027."""
    if exchange_online_cloud(url) is None:
        return None
    return (
        "Exchange Online blocks EWS from 1 October 2026 unless the tenant allows this "
        "app (Set-OrganizationConfig -EwsEnabled $true -EwsAllowedAppIDs <Client ID>), "
        "and shuts EWS down for good on 1 April 2027; plan the move to Microsoft Graph "
        f"(crm settings set {API} auto, or graph; {GRAPH_PERMISSIONS})"
    )


def graph_notice(cloud: Cloud, graph_url: str) -> str:
    """What ``auto`` chose for an Exchange Online URL, and the permissions it needs."""
    return (
        f"{cloud.name}: sending through Microsoft Graph ({graph_url}/v1.0), not EWS "
        f"({API} auto). Besides the guide's EWS permission (full_access_as_app), the app "
        f"needs the {GRAPH_PERMISSIONS}"
    )


def _api_notices(url: str, api: str, graph_url: str) -> list[SettingNotice]:
    """EWS retirement for an explicit ``ews`` on Exchange Online; what ``auto`` chose."""
    cloud = exchange_online_cloud(url)
    if cloud is None:
        return []
    if api == Api.EWS.value:
        return [SettingNotice(URL, "warning", ews_retirement_notice(url) or "")]
    if api == Api.AUTO.value:
        return [SettingNotice(URL, "note", graph_notice(cloud, graph_url or cloud.graph_url))]
    return []


def check(
    scope: Scope,
    system: Mapping[str, SettingValue],
    user: Mapping[str, SettingValue] | None,
    today: date,
    transport: str | None = None,
) -> list[SettingNotice]:
    """Cross-field warnings for ``crm settings show`` / ``crm users show``.

    Advice only: what stops sending is :func:`blocking_problems`. ``transport`` (the
    user's effective transport) is accepted for the hook's contract.
    """
    notices: list[SettingNotice] = []
    if scope is Scope.SYSTEM:
        secret = system.get(CLIENT_SECRET)
        if isinstance(secret, Secret) and is_guid(secret.reveal()):
            notices.append(SettingNotice(CLIENT_SECRET, "warning", SECRET_ID_WARNING))
        notices.extend(expiry_notices(system, today))
        url = system.get(URL) if isinstance(system.get(URL), str) else ""
        graph_url = system.get(GRAPH_URL)
        notices.extend(
            _api_notices(
                str(url),
                str(system.get(API) or Api.AUTO.value),
                graph_url if isinstance(graph_url, str) else "",
            )
        )
        return notices
    if user is None:
        return notices
    username, domain = user.get(USERNAME), user.get(DOMAIN)
    if isinstance(username, str) and isinstance(domain, str):
        mismatch = domain_mismatch(username, domain)
        if mismatch:
            notices.append(SettingNotice(USERNAME, "warning", mismatch))
    return notices
