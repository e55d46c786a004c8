"""Microsoft Entra ID app-only tokens (msal client credentials), shared by transports.

One msal ConfidentialClientApplication per saved credential of an app registration
(authority, tenant, client id), kept in the Crm's :class:`Resources`; msal's own
cache serves the token until five minutes before it expires, so one token request
serves a whole token lifetime. msal is imported only when a token is first needed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import requests

from crm_core.entra import (
    AUTHORITY,
    REFUSED_CREDENTIAL_CODES,
    AppCredentials,
    Credential,
    explain_token_error,
    tenant_not_found,
)
from crm_core.errors import TokenError
from crm_core.mail.transport import Outcome, Resources
from crm_core.trust import TrustAdapter


class _TokenSession(requests.Session):
    """The HTTP client msal uses: our TLS trust and a timeout on every request."""

    def __init__(self, ca_bundle: str | None) -> None:
        super().__init__()
        self.mount("https://", TrustAdapter(ca_bundle))

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 30)
        return super().request(method, url, *args, **kwargs)


@dataclass(frozen=True)
class Attempt:
    """One credential tried for a token: ``token`` when Entra ID accepted it, else
    ``error``."""

    credential: Credential
    error: TokenError | None
    token: str = ""


class TokenClient:
    """The msal confidential clients of one app registration, one per saved
    credential (newest first), and the lock that serialises their use.

    When Entra ID refuses the newer credential as such (not uploaded, expired, wrong
    secret), the older one is used; the newer is asked again each time the older
    one's token is renewed, so a certificate uploaded later is picked up within a
    token lifetime, at the cost of one refused request per renewal.
    """

    def __init__(self, creds: AppCredentials) -> None:
        self.creds = creds
        self._apps: dict[int, Any] = {}
        self._refused: set[int] = set()
        self._lock = threading.Lock()
        self._session = _TokenSession(creds.ca_bundle)

    def _application(self, index: int) -> Any:
        app = self._apps.get(index)
        if app is None:
            import msal  # deferred: only transports that use OAuth pay for msal

            try:
                app = msal.ConfidentialClientApplication(
                    self.creds.client_id,
                    client_credential=self.creds.credentials[index].msal_credential(),
                    authority=self.creds.authority_url,
                    http_client=self._session,
                    instance_discovery=self.creds.well_known_host,
                    timeout=30,
                )
            except ValueError as exc:
                raise tenant_not_found(self.creds) from exc
            except requests.RequestException as exc:
                raise _network_error(self.creds, exc) from exc
            self._apps[index] = app
        return app

    def token(self, scope: str) -> str:
        """An access token for ``scope`` (from msal's cache while it is fresh)."""
        with self._lock:
            order = [i for i in range(len(self.creds.credentials)) if i not in self._refused]
            first_error: TokenError | None = None
            for index in order or range(len(self.creds.credentials)):
                try:
                    result = self._acquire(index, scope)
                except TokenError as exc:
                    if not _refuses_credential(exc):
                        raise
                    self._refused.add(index)
                    first_error = first_error or exc
                    continue
                if result.get("token_source") == "identity_provider":
                    self._refused = {i for i in self._refused if i > index}
                return str(result["access_token"])
        assert first_error is not None
        raise first_error

    def attempts(self, scope: str) -> list[Attempt]:
        """Try each credential, newest first, until one gets a token (Test connection:
        which one worked, and which were refused and why)."""
        found: list[Attempt] = []
        with self._lock:
            for index, credential in enumerate(self.creds.credentials):
                try:
                    result = self._acquire(index, scope)
                except TokenError as exc:
                    found.append(Attempt(credential, exc))
                    if not _refuses_credential(exc):
                        break
                    continue
                found.append(Attempt(credential, None, str(result["access_token"])))
                self._refused = set(range(index))  # what sends use next is what worked
                break
        return found

    def _acquire(self, index: int, scope: str) -> dict[str, Any]:
        app = self._application(index)
        try:
            result: dict[str, Any] = app.acquire_token_for_client(scopes=[scope])
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
            return result
        raise explain_token_error(result, self.creds, self.creds.credentials[index])

    def evict(self) -> None:
        """Forget cached tokens (after the resource refused one with 401)."""
        with self._lock:
            for app in self._apps.values():
                app.remove_tokens_for_client()

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _refuses_credential(exc: TokenError) -> bool:
    """True when Entra ID refused the credential itself (another may be accepted)."""
    return bool(set(exc.codes) & REFUSED_CREDENTIAL_CODES)


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
    app sends for shares one token; a new secret, certificate or CA bundle makes a new
    client and closes the old one instead of leaving it open under a key nobody asks for.
    """
    key = ("entra", creds.authority, creds.tenant, creds.client_id)
    saved = tuple(c.digest() for c in creds.credentials)
    return resources.current(key, (saved, creds.ca_bundle), lambda: TokenClient(creds))
