"""Microsoft Entra ID app-only tokens (msal client credentials), shared by transports.

Why in the core: the guide's three codes (Client ID, Tenant ID, Client secret) serve
every Microsoft path — EWS, Graph and SMTP XOAUTH2 — so the fields, their validation
and the mapping of Entra's ``error_codes`` to advice live in one place. msal is
imported only when a token is first needed, so a product line that sends with SMTP
passwords never imports it. :mod:`crm_core.certificates` (cryptography's x509, a fifth
of a worker's start-up beyond SQLAlchemy) is imported only where a certificate is saved
or checked: the worker reads these settings at start, certificates or not.

The token client itself is in :mod:`crm_core.tokens` and TLS trust in
:mod:`crm_core.trust`: they need requests, and this module is imported whenever a
Microsoft transport's settings are read, which must stay cheap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from crm_core.errors import Problem, SettingValueError, TokenError
from crm_core.fields import FieldType, Scope, SettingField, SettingNotice
from crm_core.mail.transport import Outcome, Resources, SenderAccount
from crm_core.secret_box import Secret

if TYPE_CHECKING:
    from crm_core import certificates

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
CERTIFICATE = "exchange.certificate"
CERTIFICATE_PASSPHRASE = "exchange.certificate_passphrase"
CERTIFICATE_2 = "exchange.certificate_2"
CERTIFICATE_2_PASSPHRASE = "exchange.certificate_2_passphrase"
CERTIFICATE_SLOTS = (
    (CERTIFICATE, CERTIFICATE_PASSPHRASE),
    (CERTIFICATE_2, CERTIFICATE_2_PASSPHRASE),
)
"""Where certificates are saved, each with its passphrase: two, for a rotation."""
CREDENTIAL_KEYS = (CERTIFICATE, CERTIFICATE_2, CLIENT_SECRET)
"""Any one of these proves the app to Entra ID."""
EXPIRY_WARNING_DAYS = (60, 30, 7)
"""Warnings about a credential's expiry start at the first, and sharpen at each."""

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
            "warnings come 60, 30 and 7 days before.",
            plugin=_PLUGIN,
        ),
        *_certificate_fields(CERTIFICATE, CERTIFICATE_PASSPHRASE, "Certificate", ""),
        *_certificate_fields(
            CERTIFICATE_2,
            CERTIFICATE_2_PASSPHRASE,
            "Second certificate",
            " The second one serves a rotation: the newer certificate is tried first.",
        ),
    ]


def _certificate_fields(key: str, passphrase: str, label: str, more: str) -> list[SettingField]:
    """A certificate credential and its passphrase (both secret, read like a secret)."""
    return [
        SettingField(
            key,
            Scope.SYSTEM,
            label,
            type=FieldType.SECRET,
            help="The app's certificate with its private key: a PEM file (key and "
            "certificate) or a PFX file, read from standard input "
            f"(`crm settings set {key} < app.pem`). Used instead of the client secret; "
            "Microsoft recommends a certificate for production." + more,
            # Not bound_to a destination: the private key never leaves, and the
            # assertion it signs names the token endpoint it is for (its audience),
            # so a changed authority receives nothing it could use elsewhere.
            validator=_validate_first if key == CERTIFICATE else _validate_second,
            plugin=_PLUGIN,
            multiline=True,
        ),
        SettingField(
            passphrase,
            Scope.SYSTEM,
            f"{label} passphrase",
            type=FieldType.SECRET,
            help=f"The passphrase of {key}'s private key or PFX file, when it has one.",
            plugin=_PLUGIN,
        ),
    ]


def _validate_first(text: str) -> str:
    return _validate_certificate(CERTIFICATE, text)


def _validate_second(text: str) -> str:
    return _validate_certificate(CERTIFICATE_2, text)


def _validate_certificate(key: str, text: str) -> str:
    """Refuse on save what can be seen without the passphrase; the rest is a problem
    of the passphrase's (see :func:`credential_problems`)."""
    from crm_core import certificates

    try:
        stored = certificates.normalise(text)
        certificates.load(stored, None, date.today())
    except certificates.PassphraseNeeded:
        cert = certificates.read_certificate(stored)
        if cert is not None and cert.not_valid_after_utc.date() < date.today():
            raise SettingValueError(
                key,
                f"the certificate expired on {cert.not_valid_after_utc.date().isoformat()}; "
                f"make a new one ({certificates.MAKE_ONE})",
            ) from None
    except certificates.CertificateProblem as exc:
        raise SettingValueError(key, str(exc)) from None
    return stored


@dataclass(frozen=True)
class Credential:
    """One way the app proves itself to Entra ID: a client secret or a certificate."""

    key: str
    """The setting that holds it, e.g. exchange.certificate."""
    secret: Secret | None = None
    certificate: certificates.CertificateCredential | None = None
    expires: date | None = None

    @property
    def is_certificate(self) -> bool:
        """True for a certificate credential."""
        return self.certificate is not None

    def describe(self) -> str:
        """What people are shown: which credential, never its value."""
        if self.certificate is not None:
            return (
                f"the certificate {self.key} (thumbprint {self.certificate.sha1}, "
                f"valid until {self.certificate.expires.isoformat()})"
            )
        return f"the client secret {self.key}"

    def msal_credential(self) -> str | dict[str, str]:
        """msal's ``client_credential`` for this credential."""
        if self.certificate is not None:
            return self.certificate.msal_credential()
        assert self.secret is not None
        return self.secret.reveal()

    def digest(self) -> str:
        """Identifies the credential's value (for keying caches), without showing it."""
        if self.certificate is not None:
            material = self.certificate.sha1 + self.certificate.key_pem.reveal()
        else:
            material = self.secret.reveal() if self.secret is not None else ""
        return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class AppCredentials:
    """The app registration an account's tokens come from.

    ``credentials`` are tried in order: certificates before the client secret (a
    certificate saved beside a secret is the move Microsoft recommends), the newer
    certificate (by the date it became valid) before the older.
    """

    authority: str
    tenant: str
    client_id: str
    credentials: tuple[Credential, ...]
    ca_bundle: str | None = None

    @property
    def authority_url(self) -> str:
        """The tenant's authority URL, as msal wants it."""
        return f"{self.authority.rstrip('/')}/{self.tenant}"

    @property
    def well_known_host(self) -> bool:
        """True for Microsoft's own sign-in hosts (msal may do instance discovery)."""
        return (urlsplit(self.authority).hostname or "") in KNOWN_AUTHORITY_HOSTS

    @property
    def secret(self) -> Secret | None:
        """The client secret's Value, when one is saved."""
        return next((c.secret for c in self.credentials if c.secret is not None), None)

    @property
    def secret_expires(self) -> date | None:
        """The client secret's expiry date, when saved."""
        return next((c.expires for c in self.credentials if c.key == CLIENT_SECRET), None)


def missing_credentials(values: Mapping[str, object]) -> list[str]:
    """Keys of the OAuth fields that are not set (a certificate stands for the secret)."""
    missing = [k for k in (CLIENT_ID, TENANT_ID) if not values.get(k)]
    if not any(values.get(k) for k in CREDENTIAL_KEYS):
        missing.append(CLIENT_SECRET)
    return missing


def credentials_for(account: SenderAccount) -> AppCredentials | None:
    """The account's app credentials, or None when the codes are incomplete.

    A certificate that cannot be opened is left out here; :func:`credential_problems`
    names it, and stops sending until it is fixed.
    """
    client_id = account.get_str(CLIENT_ID)
    tenant = account.get_str(TENANT_ID)
    found: list[Credential] = []
    for key, passphrase_key in CERTIFICATE_SLOTS:
        text, passphrase = account.get_secret(key), account.get_secret(passphrase_key)
        if not text:
            continue
        from crm_core import certificates

        try:
            cert = certificates.load(text.reveal(), passphrase.reveal() if passphrase else None)
        except certificates.CertificateProblem:
            continue
        found.append(Credential(key, certificate=cert, expires=cert.expires))
    found.sort(key=lambda c: _issued(c), reverse=True)
    secret = account.get_secret(CLIENT_SECRET)
    if secret:
        found.append(
            Credential(CLIENT_SECRET, secret=secret, expires=account.get_date(SECRET_EXPIRES))
        )
    if not (found and client_id and tenant):
        return None
    return AppCredentials(
        authority=account.get_str(AUTHORITY, DEFAULT_AUTHORITY) or DEFAULT_AUTHORITY,
        tenant=tenant,
        client_id=client_id,
        credentials=tuple(found),
        ca_bundle=account.get_str(CA_BUNDLE) or None,
    )


def _issued(credential: Credential) -> datetime:
    assert credential.certificate is not None
    return credential.certificate.not_before


def credential_problems(values: Mapping[str, object]) -> list[Problem]:
    """Saved certificates that cannot be used: each stops sending until fixed.

    A missing or wrong passphrase is the passphrase's problem (saving the certificate
    first is fine; saving a wrong passphrase is refused); anything else wrong with a
    certificate is the certificate's (and its passphrase's: saving it is judged too).
    """
    problems: list[Problem] = []
    for key, passphrase_key in CERTIFICATE_SLOTS:
        text, passphrase = values.get(key), values.get(passphrase_key)
        if not isinstance(text, Secret) or not text:
            continue
        clear = passphrase.reveal() if isinstance(passphrase, Secret) and passphrase else None
        from crm_core import certificates

        try:
            certificates.load(text.reveal(), clear)
        except certificates.PassphraseNeeded as exc:
            problems.append(
                Problem(passphrase_key, f"{key}: {exc}", f"crm settings set {passphrase_key}")
            )
        except certificates.WrongPassphrase as exc:
            problems.append(
                Problem(
                    passphrase_key, f"{key}: {exc}", f"crm settings set {passphrase_key}", (key,)
                )
            )
        except certificates.CertificateProblem as exc:
            problems.append(
                Problem(key, str(exc), f"crm settings set {key} < app.pem", (passphrase_key,))
            )
    return problems


@dataclass(frozen=True)
class Expiry:
    """A credential's expiry, as the warnings and the expiry signal see it."""

    key: str
    what: str
    expires: date
    days_left: int

    @property
    def threshold(self) -> int | None:
        """The sharpest warning threshold crossed (60, 30, 7 days; 0 once expired)."""
        if self.days_left < 0:
            return 0
        crossed = [t for t in EXPIRY_WARNING_DAYS if self.days_left <= t]
        return min(crossed) if crossed else None

    def message(self) -> str:
        """The warning's text, with what to do."""
        if self.days_left < 0:
            when = f"expired on {self.expires.isoformat()}"
        elif self.days_left == 0:
            when = f"expires today ({self.expires.isoformat()})"
        else:
            plural = "s" if self.days_left != 1 else ""
            when = f"expires in {self.days_left} day{plural} ({self.expires.isoformat()})"
        if self.key == CLIENT_SECRET:
            todo = (
                "create a new secret in Entra → Certificates & secrets and save its Value as "
                f"{CLIENT_SECRET} and its expiry as {SECRET_EXPIRES}"
            )
        else:
            other = CERTIFICATE_2 if self.key == CERTIFICATE else CERTIFICATE
            todo = (
                "make a new certificate, upload its .cer in Entra → Certificates & secrets, "
                f"and save it beside this one: crm settings set {other} < new.pem"
            )
        return f"{self.what} {when}; {todo}"


def expiries(values: Mapping[str, object], today: date) -> list[Expiry]:
    """Every saved credential's expiry, the client secret's from its setting and a
    certificate's from the certificate itself."""
    found: list[Expiry] = []
    secret_expires = values.get(SECRET_EXPIRES)
    if isinstance(secret_expires, date) and values.get(CLIENT_SECRET):
        found.append(
            Expiry(
                CLIENT_SECRET, "the client secret", secret_expires, (secret_expires - today).days
            )
        )
    for key, passphrase_key in CERTIFICATE_SLOTS:
        text, passphrase = values.get(key), values.get(passphrase_key)
        if not isinstance(text, Secret) or not text:
            continue
        clear = passphrase.reveal() if isinstance(passphrase, Secret) and passphrase else None
        from crm_core import certificates

        try:
            cert = certificates.load(text.reveal(), clear)
        except certificates.CertificateProblem:
            continue
        found.append(
            Expiry(
                key,
                f"the certificate {key} (thumbprint {cert.sha1})",
                cert.expires,
                (cert.expires - today).days,
            )
        )
    return found


def expiry_notices(values: Mapping[str, object], today: date) -> list[SettingNotice]:
    """Warnings from 60 days before a credential expires, and after it has."""
    return [
        SettingNotice(SECRET_EXPIRES if e.key == CLIENT_SECRET else e.key, "warning", e.message())
        for e in expiries(values, today)
        if e.threshold is not None
    ]


_TEMPORARY_CODES = frozenset({90006, 90024, 90033, 90055})


REFUSED_CREDENTIAL_CODES = frozenset({7000215, 7000222, 700027, 700024, 50027, 7000218})
"""Entra's answers that refuse the credential itself: another saved one may work."""


def explain_token_error(
    result: Mapping[str, Any], creds: AppCredentials, credential: Credential | None = None
) -> TokenError:
    """Turn msal's error dict into advice, branching on ``error_codes`` only.

    ``credential`` is the one Entra ID refused (a certificate's refusals name it).
    """
    codes = tuple(int(c) for c in result.get("error_codes") or () if str(c).isdigit())
    error = str(result.get("error", ""))
    corr = str(result.get("correlation_id", ""))

    def make(message: str, fix: str, outcome: Outcome = Outcome.CONFIGURATION) -> TokenError:
        return TokenError(message, fix, codes, error, outcome, corr)

    code_set = set(codes)
    if credential is not None and credential.certificate is not None:
        explained = _certificate_refusal(code_set, str(result.get("error_description", "")))
        if explained is not None:
            return make(*_for_certificate(explained, credential, creds))
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


def _certificate_refusal(codes: set[int], description: str) -> str | None:
    """Which of Entra's certificate refusals this is: unknown key, expired key, time."""
    if 700027 in codes:
        return "expired" if "key used is expired" in description.lower() else "unknown"
    if 700024 in codes:
        return "time"
    if 50027 in codes:
        return "malformed"
    return None


def _for_certificate(kind: str, credential: Credential, creds: AppCredentials) -> tuple[str, str]:
    assert credential.certificate is not None
    cert = credential.certificate
    upload = (
        f"In Entra → App registrations → the app {creds.client_id} → Certificates & secrets "
        "→ Certificates → Upload certificate, upload the certificate's public part (app.cer: "
        f"`openssl x509 -in app.pem -outform der -out app.cer`); its thumbprint there must "
        f"read {cert.sha1}."
    )
    if kind == "unknown":
        return (
            f"Entra ID does not know {credential.describe()} (AADSTS700027): it is not "
            "uploaded to the app registration, or the signature does not match the "
            "uploaded certificate.",
            upload,
        )
    if kind == "expired":
        return (
            f"Entra ID refused {credential.describe()}: the certificate has expired "
            "(AADSTS700027).",
            "Make a new certificate, upload its .cer in Entra → Certificates & secrets, and "
            f"save it with `crm settings set {credential.key} < new.pem`.",
        )
    if kind == "time":
        return (
            "Entra ID refused the signed request as outside its valid time (AADSTS700024): "
            "this machine's clock is probably wrong.",
            "Set the clock right (NTP: `timedatectl set-ntp true`); the request is signed "
            "with this machine's time.",
        )
    return (
        f"Entra ID refused the request signed with {credential.describe()} (AADSTS50027).",
        upload,
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
