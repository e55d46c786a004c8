"""Microsoft Entra ID app-only tokens (msal client credentials), shared by transports.

Why in the core: the guide's three codes (Client ID, Tenant ID, Client secret) serve
every Microsoft path — EWS, Graph and SMTP XOAUTH2 — so the fields, their validation
and the mapping of Entra's ``error_codes`` to advice live in one place. msal is
imported only when a token is first needed, so a product line that sends with SMTP
passwords never imports it.

Tokens: one msal ConfidentialClientApplication per (authority, tenant, client id,
secret), kept in the Crm's :class:`Resources`; msal's own cache serves the token until
five minutes before it expires, so one token request serves a whole token lifetime.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import requests.adapters

from crm_core.errors import SettingValueError, TokenError
from crm_core.fields import FieldType, Scope, SettingField
from crm_core.mail.transport import Outcome, Resources, SenderAccount
from crm_core.secret_box import Secret

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
KNOWN_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.windows.net",
        "login.microsoft.com",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login.usgovcloudapi.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
    }
)
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

CLIENT_ID = "exchange.client_id"
TENANT_ID = "exchange.tenant_id"
CLIENT_SECRET = "exchange.client_secret"
AUTHORITY = "exchange.authority"
SECRET_EXPIRES = "exchange.client_secret_expires"

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DOMAIN = re.compile(r"^(?=.{3,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_PLUGIN = "entra"


def is_guid(text: str) -> bool:
    """True for a GUID such as Entra's Client ID, Tenant ID or a Secret ID."""
    return bool(_GUID.match(text.strip()))


def _validate_client_id(text: str) -> str:
    if not is_guid(text):
        raise SettingValueError(
            CLIENT_ID,
            f"{text!r} is not a Client ID; copy the Application (client) ID, a GUID like "
            "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0, from Entra → App registrations → Overview",
        )
    return text.lower()


def _validate_tenant(text: str) -> str:
    lowered = text.strip().lower()
    if lowered == "adfs":  # AD FS: the authority is https://<adfs host>, tenant "adfs"
        return lowered
    if lowered in ("common", "organizations", "consumers"):
        raise SettingValueError(
            TENANT_ID,
            f"{text!r} cannot be used for app-only tokens; enter the Directory (tenant) ID "
            "GUID from Entra → Overview, or the tenant's domain",
        )
    if is_guid(lowered) or _DOMAIN.match(lowered):
        return lowered
    raise SettingValueError(
        TENANT_ID,
        f"{text!r} is neither a Tenant ID (a GUID, Entra → Overview) nor a domain name "
        "such as contoso.onmicrosoft.com",
    )


def _validate_authority(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise SettingValueError(
            AUTHORITY,
            f"{text!r} must be an https URL such as {DEFAULT_AUTHORITY} "
            "(national clouds: https://login.microsoftonline.us, https://login.chinacloudapi.cn)",
        )
    if parts.path.strip("/") or parts.query:
        raise SettingValueError(
            AUTHORITY,
            f"give only the host, without the tenant or a path: "
            f"https://{parts.netloc}  (the tenant is exchange.tenant_id)",
        )
    return f"https://{parts.netloc}"


def entra_fields() -> list[SettingField]:
    """The guide's "Exchange OAuth authentication" system fields.

    Declared identically by every plugin that uses them (Exchange, SMTP XOAUTH2); the
    core accepts a field declared twice only when both declarations are equal.
    """
    return [
        SettingField(
            CLIENT_ID,
            Scope.SYSTEM,
            "Client ID",
            help="Application (client) ID of the Entra app registration (a GUID).",
            validator=_validate_client_id,
            plugin=_PLUGIN,
        ),
        SettingField(
            TENANT_ID,
            Scope.SYSTEM,
            "Tenant ID",
            help="Directory (tenant) ID (a GUID) or the tenant's primary domain "
            "(adfs for an AD FS authority).",
            validator=_validate_tenant,
            plugin=_PLUGIN,
        ),
        SettingField(
            CLIENT_SECRET,
            Scope.SYSTEM,
            "Client secret",
            type=FieldType.SECRET,
            help="The client secret's Value (not its Secret ID). Never shown again once saved.",
            plugin=_PLUGIN,
        ),
        SettingField(
            AUTHORITY,
            Scope.SYSTEM,
            "Authority host",
            default=DEFAULT_AUTHORITY,
            help="Entra ID sign-in host; national clouds and ADFS use other hosts.",
            validator=_validate_authority,
            plugin=_PLUGIN,
        ),
        SettingField(
            SECRET_EXPIRES,
            Scope.SYSTEM,
            "Client secret expires",
            type=FieldType.DATE,
            help="The expiry date Entra shows beside the secret (YYYY-MM-DD); "
            "warnings start 30 days before.",
            plugin=_PLUGIN,
        ),
    ]


@dataclass(frozen=True)
class AppCredentials:
    """The app registration an account's tokens come from."""

    authority: str
    tenant: str
    client_id: str
    secret: Secret
    secret_expires: date | None = None
    ca_bundle: str | None = None

    @property
    def authority_url(self) -> str:
        """The tenant's authority URL, as msal wants it."""
        return f"{self.authority.rstrip('/')}/{self.tenant}"

    @property
    def well_known_host(self) -> bool:
        """True for Microsoft's own sign-in hosts (msal may do instance discovery)."""
        return (urlsplit(self.authority).hostname or "") in KNOWN_AUTHORITY_HOSTS


def missing_credentials(values: Mapping[str, object]) -> list[str]:
    """Keys of the OAuth fields that are not set."""
    return [k for k in (CLIENT_ID, TENANT_ID, CLIENT_SECRET) if not values.get(k)]


def credentials_for(account: SenderAccount) -> AppCredentials | None:
    """The account's app credentials, or None when any of the three codes is missing."""
    secret = account.get_secret(CLIENT_SECRET)
    client_id = account.get_str(CLIENT_ID)
    tenant = account.get_str(TENANT_ID)
    if not (secret and client_id and tenant):
        return None
    return AppCredentials(
        authority=account.get_str(AUTHORITY, DEFAULT_AUTHORITY) or DEFAULT_AUTHORITY,
        tenant=tenant,
        client_id=client_id,
        secret=secret,
        secret_expires=account.get_date(SECRET_EXPIRES),
        ca_bundle=account.get_str("tls.ca_bundle") or None,
    )


_TEMPORARY_CODES = frozenset({90006, 90024, 90033, 90055})


def explain_token_error(result: Mapping[str, Any], creds: AppCredentials) -> TokenError:
    """Turn msal's error dict into advice, branching on ``error_codes`` only."""
    codes = tuple(int(c) for c in result.get("error_codes") or () if str(c).isdigit())
    error = str(result.get("error", ""))
    corr = str(result.get("correlation_id", ""))

    def make(message: str, fix: str, outcome: Outcome = Outcome.CONFIGURATION) -> TokenError:
        return TokenError(message, fix, codes, error, outcome, corr)

    code_set = set(codes)
    if 7000215 in code_set:
        return make(
            "The client secret is not valid (AADSTS7000215): the secret's Secret ID may "
            "have been pasted instead of its Value, or the secret is wrong.",
            "In Entra → App registrations → Certificates & secrets, copy the secret's Value "
            f"(not the Secret ID) and save it with `crm settings set {CLIENT_SECRET}`.",
        )
    if 7000222 in code_set:
        when = f" on {creds.secret_expires.isoformat()}" if creds.secret_expires else ""
        return make(
            f"The client secret has expired{when} (AADSTS7000222).",
            "Create a new client secret in Entra → Certificates & secrets, save its Value "
            f"as {CLIENT_SECRET} and its expiry date as {SECRET_EXPIRES}.",
        )
    if 700016 in code_set:
        return make(
            f"Client ID {creds.client_id} is not an application in tenant {creds.tenant} "
            "(AADSTS700016).",
            "Check Client ID and Tenant ID against the app registration's Overview page; "
            "the app must be registered in (or consented to by) this tenant.",
        )
    if code_set & {90002, 900023, 90092}:
        return tenant_not_found(creds, codes)
    if code_set & {65001, 9001023}:
        return make(
            "Admin consent has not been granted for the app's permissions (AADSTS65001).",
            "In Entra → App registrations → API permissions, add the application "
            "permissions and click 'Grant admin consent'.",
        )
    if 7000112 in code_set:
        return make(
            "The application is disabled in Entra ID (AADSTS7000112).",
            "Ask the tenant administrator to enable the app registration.",
        )
    if code_set & {70011, 500011}:
        return make(
            f"Entra ID refused the requested resource or scope (AADSTS{codes[0]}).",
            "The app needs the Office 365 Exchange Online API permissions with admin consent.",
        )
    if 53003 in code_set:
        return make(
            "A Conditional Access policy blocked the app's sign-in (AADSTS53003).",
            "Ask the tenant administrator to exclude this app from the policy.",
        )
    if code_set & _TEMPORARY_CODES or error in ("temporarily_unavailable", "server_error"):
        return make(
            "Entra ID is busy or unavailable; the request will be retried.",
            "No action needed unless this persists.",
            Outcome.TEMPORARY,
        )
    shown = ", ".join(f"AADSTS{c}" for c in codes) or error or "no error code"
    return make(
        f"Entra ID refused the token request ({shown}).",
        "Check Client ID, Tenant ID and the client secret's Value.",
    )


def tenant_not_found(creds: AppCredentials, codes: tuple[int, ...] = (90002,)) -> TokenError:
    """The advice for a tenant that the authority does not know."""
    return TokenError(
        f"Tenant {creds.tenant} was not found at {creds.authority} (AADSTS90002).",
        "Check the Tenant ID (Entra → Overview shows it, with the primary domain) and, "
        f"for a national cloud, {AUTHORITY}.",
        codes,
        "invalid_tenant",
    )


class TrustAdapter(requests.adapters.HTTPAdapter):
    """An HTTPS adapter that verifies against the system store plus a private CA.

    Why not ``verify=path``: requests lets ``REQUESTS_CA_BUNDLE`` override a session's
    ``verify``, and a path *replaces* the trust store, so a private CA for an
    on-premises Exchange would make Microsoft's public endpoints fail. Here trust is
    the union of the operating system's store (``ssl.create_default_context``), the
    bundle requests chose (``REQUESTS_CA_BUNDLE`` when set) and ``tls.ca_bundle``.
    The adapter is mounted on our own sessions only, so no global state of requests,
    msal or exchangelib is changed. ``verify=False`` is never passed by our code.
    """

    def __init__(self, ca_bundle: str | None = None, **kwargs: Any) -> None:
        self._ca_bundle = ca_bundle
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._context_lock = threading.Lock()
        super().__init__(**kwargs)

    def ssl_context(self, requested: str | None) -> ssl.SSLContext:
        """The verifying context for the bundle requests chose (made once per bundle)."""
        key = requested or ""
        with self._context_lock:
            context = self._contexts.get(key)
            if context is None:
                context = ssl.create_default_context()
                for extra in (requested, self._ca_bundle):
                    if extra:
                        if os.path.isdir(extra):
                            context.load_verify_locations(capath=extra)
                        else:
                            context.load_verify_locations(cafile=extra)
                self._contexts[key] = context
            return context

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        if verify is not False and host.get("scheme") == "https":
            pool.pop("ca_certs", None)
            pool.pop("ca_cert_dir", None)
            pool["ssl_context"] = self.ssl_context(verify if isinstance(verify, str) else None)
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if verify is not False:
            # The trust anchors are in the pool's ssl_context; keep urllib3 from loading
            # certifi into that shared context on every new connection.
            conn.ca_certs = None
            conn.ca_cert_dir = None


class _TokenSession(requests.Session):
    """The HTTP client msal uses: our TLS trust and a timeout on every request."""

    def __init__(self, ca_bundle: str | None) -> None:
        super().__init__()
        self.mount("https://", TrustAdapter(ca_bundle))

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 30)
        return super().request(method, url, *args, **kwargs)


class TokenClient:
    """One msal confidential client and the lock that serialises its use."""

    def __init__(self, creds: AppCredentials) -> None:
        self.creds = creds
        self._app: Any = None
        self._lock = threading.Lock()
        self._session = _TokenSession(creds.ca_bundle)

    def _application(self) -> Any:
        if self._app is None:
            import msal  # deferred: only transports that use OAuth pay for msal

            try:
                self._app = msal.ConfidentialClientApplication(
                    self.creds.client_id,
                    client_credential=self.creds.secret.reveal(),
                    authority=self.creds.authority_url,
                    http_client=self._session,
                    instance_discovery=self.creds.well_known_host,
                    timeout=30,
                )
            except ValueError as exc:
                raise tenant_not_found(self.creds) from exc
            except requests.RequestException as exc:
                raise _network_error(self.creds, exc) from exc
        return self._app

    def token(self, scope: str) -> str:
        """An access token for ``scope`` (from msal's cache while it is fresh)."""
        with self._lock:
            app = self._application()
            try:
                result = app.acquire_token_for_client(scopes=[scope])
            except requests.RequestException as exc:
                raise _network_error(self.creds, exc) from exc
            except Exception as exc:  # msal raises MsalServiceError on HTTP 5xx
                if type(exc).__module__.startswith("msal"):
                    raise TokenError(
                        "Entra ID answered with a server error; the request will be retried.",
                        "No action needed unless this persists.",
                        outcome=Outcome.TEMPORARY,
                        error=type(exc).__name__,
                    ) from exc
                raise
        if "access_token" in result:
            return str(result["access_token"])
        raise explain_token_error(result, self.creds)

    def evict(self) -> None:
        """Forget cached tokens (after the resource refused one with 401)."""
        with self._lock:
            if self._app is not None:
                self._app.remove_tokens_for_client()

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _network_error(creds: AppCredentials, exc: requests.RequestException) -> TokenError:
    if isinstance(exc, requests.exceptions.SSLError):
        return TokenError(
            f"The TLS certificate of {creds.authority} could not be verified.",
            "If a proxy or private CA is in the path, set tls.ca_bundle to its CA file.",
            error="tls",
        )
    return TokenError(
        f"Entra ID at {creds.authority} could not be reached ({type(exc).__name__}).",
        f"Check the network and {AUTHORITY}; the request will be retried.",
        error="network",
        outcome=Outcome.TEMPORARY,
    )


def token_client(resources: Resources, creds: AppCredentials) -> TokenClient:
    """The shared msal client of this app registration, made on first use.

    Keyed per app registration (authority, tenant, client), so that every mailbox the
    app sends for shares one token; a new secret or CA bundle makes a new client and
    closes the old one instead of leaving it open under a key nobody asks for.
    """
    key = ("entra", creds.authority, creds.tenant, creds.client_id)
    secret = hashlib.sha256(creds.secret.reveal().encode()).hexdigest()
    return resources.current(key, (secret, creds.ca_bundle), lambda: TokenClient(creds))


def forget_clients(resources: Resources) -> None:
    """Drop every cached msal client (system OAuth settings changed)."""
    resources.discard(("entra",))
