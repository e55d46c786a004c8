"""Signing in to EWS: app-only tokens from msal, or the user's own password.

Why msal is the only token source: exchangelib's stock ``OAuth2Credentials`` builds a
requests-oauthlib session that fetches tokens itself, drops the token on every session
retire (HTTP or TLS error, back-off) and, at expiry, tries a refresh grant that has no
refresh token. So our sessions carry no OAuth machinery at all: :class:`MsalBearerAuth`
adds ``Authorization: Bearer`` to each request from msal's cache (a dictionary lookup
while the token is fresh; one token request per token lifetime for the whole Crm).
:class:`MsalOAuth2Credentials` still subclasses ``OAuth2Credentials`` because
exchangelib sends the impersonation header for OAuth credentials, and its
``session_params``/``refresh`` are wired to msal in case exchangelib ever calls them.

Logging: exchangelib and requests-oauthlib log request headers at DEBUG, which would
put bearer tokens and Basic passwords in an application's logs. :func:`install_redaction`
adds a filter to those loggers that masks credentials before any handler sees them.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import requests
from exchangelib import OAuth2Credentials
from oauthlib.oauth2 import OAuth2Token

from crm_core.plugin_api import EXCHANGE_SCOPE, TokenClient

_REDACTED_LOGGERS = (
    "exchangelib.util",
    "exchangelib.protocol",
    "exchangelib.services.common",
    "requests_oauthlib.oauth2_session",
    "msal.application",
    "msal.token_cache",
    "urllib3.connectionpool",
)
_SECRET_PATTERNS = (
    re.compile(
        r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer|basic|ntlm|negotiate)\s+[^'\",\s}]+"
    ),
    re.compile(
        r"(?i)(['\"]?(?:access_token|refresh_token|client_secret|password)['\"]?\s*[:=]\s*['\"]?)[^'\",\s}&]+"
    ),
)


class MsalBearerAuth(requests.auth.AuthBase):
    """Adds the app-only bearer token to each EWS request, taken from msal's cache."""

    def __init__(self, tokens: TokenClient) -> None:
        self._tokens = tokens

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._tokens.token(EXCHANGE_SCOPE)}"
        return request


class MsalOAuth2Credentials(OAuth2Credentials):  # type: ignore[misc]
    """exchangelib OAuth credentials whose only token source is our msal client.

    ``client_secret`` is None so requests-oauthlib can never refresh on its own;
    equality and hashing are by identity (one object per sender, cached in the Crm's
    Resources), so exchangelib's protocol cache key does not change when exchangelib
    caches its oauthlib client on the object.
    """

    def __init__(self, tokens: TokenClient, mailbox: str) -> None:
        from exchangelib import Identity

        super().__init__(
            client_id=tokens.creds.client_id,
            client_secret=None,
            tenant_id=tokens.creds.tenant,
            identity=Identity(primary_smtp_address=mailbox),
        )
        self.tokens = tokens

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def _token(self) -> OAuth2Token:
        return OAuth2Token(
            {
                "access_token": self.tokens.token(EXCHANGE_SCOPE),
                "token_type": "Bearer",
                # Renewed through msal anyway; the margin matches msal's 5 minutes.
                "expires_at": time.time() + 300,
            }
        )

    def session_params(self) -> dict[str, Any]:
        """What exchangelib would build an OAuth session from: msal's token, no refresh."""
        with self.lock:
            self.access_token = self._token()
            return {"token": self.access_token}

    def refresh(self, session: Any) -> None:
        """A token expired: ask msal (which serves or renews it)."""
        with self.lock:
            self.access_token = self._token()

    def __repr__(self) -> str:
        return f"MsalOAuth2Credentials({self.client_id!r}, {self.identity.primary_smtp_address!r})"


class _Redact(logging.Filter):
    """Masks bearer tokens, Basic/NTLM credentials and secrets in library log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = message
        for pattern in _SECRET_PATTERNS:
            cleaned = pattern.sub(lambda m: f"{m.group(1)}********", cleaned)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction() -> None:
    """Add the masking filter to the loggers that print headers (once per process).

    Logging is process-wide by nature; adding a filter that only masks text changes
    no behaviour, so doing it when the first Exchange session is made is safe.
    """
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redact) for f in logger.filters):
            logger.addFilter(_Redact())
