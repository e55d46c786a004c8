"""Microsoft Entra ID app-only tokens (msal client credentials), shared by transports.

One msal ConfidentialClientApplication per app registration (authority, tenant,
client id), kept in the Crm's :class:`Resources`; msal's own cache serves the token
until five minutes before it expires, so one token request serves a whole token
lifetime. msal is imported only when a token is first needed.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import requests

from crm_core.entra import AUTHORITY, AppCredentials, explain_token_error, tenant_not_found
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
