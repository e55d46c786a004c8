"""XOAUTH2 tokens from the core's shared msal client (crm_core.tokens).

Why a thin wrapper: the SMTP client should not know msal or Entra's error codes; it
asks for a token, and a refusal arrives already explained (which of Client ID, Tenant
ID or Client secret is wrong) and classified for the outbox.
"""

from __future__ import annotations

from crm_core.plugin_api import (
    EXCHANGE_SCOPE,
    AppCredentials,
    Resources,
    SenderAccount,
    TokenClient,
    TokenError,
    credentials_for,
    token_client,
)
from smtp_mail.classify import Failure, Phase, SmtpFailure


class EntraTokens:
    """Tokens for scope https://outlook.office365.com/.default, cached by msal."""

    def __init__(self, resources: Resources, creds: AppCredentials) -> None:
        self.resources = resources
        self.creds = creds

    @classmethod
    def for_account(cls, account: SenderAccount, resources: Resources) -> EntraTokens | None:
        """The token source for an account, or None when the Entra codes are missing."""
        creds = credentials_for(account)
        return cls(resources, creds) if creds is not None else None

    def _client(self) -> TokenClient:
        return token_client(self.resources, self.creds)

    def token(self) -> str:
        """A bearer token (from msal's cache while fresh); SmtpFailure when refused."""
        try:
            return self._client().token(EXCHANGE_SCOPE)
        except TokenError as exc:
            failure = Failure(exc.outcome, exc.message, exc.fix, exc.code)
            raise SmtpFailure(failure, Phase.AUTH) from exc

    def evict(self) -> None:
        """Drop the cached token so that the next call asks Entra ID again."""
        self._client().evict()

    @property
    def authority(self) -> str:
        """Where tokens come from, for Test connection's report."""
        return self.creds.authority_url
