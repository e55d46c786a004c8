"""Microsoft Entra ID app-only tokens (msal client credentials), shared by transports.

Why in the core: the guide's three codes (Client ID, Tenant ID, Client secret) serve
every Microsoft path — EWS, Graph and SMTP XOAUTH2 — so the fields, their validation
and the mapping of Entra's ``error_codes`` to advice live in one place. msal is
imported only when a token is first needed, so a product line that sends with SMTP
passwords never imports it.

The token client itself is in :mod:`crm_core.tokens` and TLS trust in
:mod:`crm_core.trust`: they need requests, and this module is imported whenever a
Microsoft transport's settings are read, which must stay cheap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from crm_core.errors import SettingValueError, TokenError
from crm_core.fields import FieldType, Scope, SettingField
from crm_core.mail.transport import Outcome, Resources, SenderAccount
from crm_core.secret_box import Secret

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
CA_BUNDLE = "tls.ca_bundle"

CLIENT_SECRET_DESTINATION = (AUTHORITY, TENANT_ID, CLIENT_ID, CA_BUNDLE)
"""What decides where the client secret goes: Entra ID's host (and whom the TLS check
trusts for it), and the tenant and app it signs in as."""

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
            help="The client secret's Value (not its Secret ID). Never shown again once saved. "
            "It is sent only to the authority, tenant and app it was saved for: after a "
            "change of any of them (or of the CA bundle) it must be entered again.",
            plugin=_PLUGIN,
            bound_to=CLIENT_SECRET_DESTINATION,
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
        ca_bundle=account.get_str(CA_BUNDLE) or None,
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


def forget_clients(resources: Resources) -> None:
    """Drop every cached msal client (system OAuth settings changed)."""
    resources.discard(("entra",))
