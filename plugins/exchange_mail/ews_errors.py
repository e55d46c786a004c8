"""What an EWS failure means for the outbox, and what the user should do.

exchangelib raises one exception per failure; the outbox needs an :class:`Outcome`
(temporary, permanent, configuration, ambiguous) and the user needs a cause and a fix.
:func:`classify` is the one place that maps one to the other (Graph's answers are
mapped in :mod:`exchange_mail.graph_errors`; the shared pieces are in
:mod:`exchange_mail.errors`):

========================================================  ==============  =================
exchangelib / server says                                 outcome         note
========================================================  ==============  =================
ErrorServerBusy (fault, BackOffMilliseconds), HTTP 503     temporary       retry_after = back-off
ErrorTooManyObjectsOpened, ErrorMailboxStoreUnavailable,   temporary
  ErrorMailboxMoveInProgress, ErrorConnectionFailed…
ErrorSubmissionQuotaExceeded                               temporary       one hour back-off
connection refused / DNS / connect timeout                 temporary       nothing was sent
ErrorInvalidRecipients, ErrorInvalidSmtpAddress,           permanent       per message; the
  ErrorMailRecipientNotFound                                                guide's "Error
                                                                            validating e-mail"
ErrorMessageSizeExceeded                                   permanent       per message
HTTP 401 (after one token eviction and retry),             configuration   the guide's
  ErrorNonExistentMailbox, ErrorImpersonateUserDenied,                     "TestConnection
  ErrorAccessDenied, Entra token errors                                    error Credentials"
HTTP 403 on Exchange Online (EWS blocked for the tenant)   configuration
HTTP 404, redirect, TLS verification, ErrorSendAsDenied,   configuration
  ErrorQuotaExceeded, schema version errors
timeout / connection lost after the request was sent       ambiguous       reconcile, never resend
anything else                                              temporary       (per message) or
                                                                            ambiguous (whole
                                                                            request)
========================================================  ==============  =================
"""

from __future__ import annotations

import re

import requests

from crm_core.plugin_api import CLIENT_ID, Outcome, TokenError
from exchange_mail.errors import (
    ADMIN_CONSENT_FIX,
    Classified,
    chain,
    connect_failure,
    failed_before_sending,
    lost_answer,
    tls_failure,
    token_failure,
)
from exchange_mail.settings import (
    API,
    DOMAIN,
    PASSWORD,
    SERVER_VERSION,
    URL,
    USERNAME,
    AuthMode,
    ExchangeSettings,
)

_HTTP_STATUS = re.compile(r"Unknown failure in response\. Code: (\d{3})")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status exchangelib reports for an unexpected answer (403, 404, 502 …)."""
    match = _HTTP_STATUS.match(str(exc))
    return int(match.group(1)) if match else None


def _server_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def classify(exc: BaseException, settings: ExchangeSettings) -> Classified:
    """Map an exception from a send, a lookup or a test to outcome, cause and fix."""
    from exchangelib import errors as ews  # here: the Graph path never loads exchangelib

    if isinstance(exc, TokenError):
        return token_failure(exc)
    for link in chain(exc):
        if isinstance(link, ews.ErrorTimeoutExpired):
            if failed_before_sending(link):
                return connect_failure(settings.host, f"the network and {URL}")
            return lost_answer(settings.host, "ErrorTimeoutExpired")
    if isinstance(exc, ews.ErrorServerBusy):
        back_off = exc.back_off if isinstance(exc.back_off, int | float) else None
        return Classified(
            Outcome.TEMPORARY,
            "ErrorServerBusy",
            f"Exchange at {settings.host} is busy or unavailable ({_server_text(exc)}); "
            "the mail will be sent later.",
            retry_after=max(float(back_off), 1.0) if back_off else 30.0,
        )
    if isinstance(exc, ews.UnauthorizedError):
        return _unauthorized(settings)
    if isinstance(exc, ews.ErrorNonExistentMailbox):
        return Classified(
            Outcome.CONFIGURATION,
            "ErrorNonExistentMailbox",
            f"Exchange cannot find a mailbox for {settings.mailbox} in the domain: the "
            "address is an alias, in another domain, or the tenant's codes belong to "
            "another organisation.",
            f"Set {USERNAME} to the user's full primary e-mail address (for example "
            f"@vitecsoftware.com, not the alias @vitec.se), and check that {DOMAIN} is the "
            "domain the OAuth codes belong to.",
            credentials=True,
        )
    if isinstance(exc, ews.ErrorImpersonateUserDenied | ews.ErrorAccessDenied):
        code = type(exc).__name__
        if settings.mode is AuthMode.OAUTH:
            return Classified(
                Outcome.CONFIGURATION,
                code,
                f"Exchange does not let the app act as {settings.mailbox} ({code}): the "
                "full_access_as_app application permission is missing or admin consent "
                "was not granted.",
                ADMIN_CONSENT_FIX + ".",
                credentials=True,
            )
        return Classified(
            Outcome.CONFIGURATION,
            code,
            f"Exchange refused access to the mailbox {settings.mailbox} ({code}).",
            f"Check {USERNAME} and {PASSWORD}; the user must own the mailbox.",
            credentials=True,
        )
    if isinstance(exc, ews.ErrorSendAsDenied):
        return Classified(
            Outcome.CONFIGURATION,
            "ErrorSendAsDenied",
            f"The mailbox {settings.mailbox} may not send as the user's e-mail address "
            "(ErrorSendAsDenied).",
            "The user's e-mail (tab Basic) must be an address of the mailbox named in "
            f"{USERNAME}; correct one of them.",
        )
    if isinstance(
        exc,
        ews.ErrorInvalidRecipients | ews.ErrorInvalidSmtpAddress | ews.ErrorMailRecipientNotFound,
    ):
        code = type(exc).__name__
        return Classified(
            Outcome.PERMANENT,
            code,
            f"Error validating e-mail: Exchange refused a recipient address ({code}: "
            f"{_server_text(exc)}).",
            "Check that the recipients' addresses are correct — an extra space or an "
            "invalid character, for example — and send the mail again.",
        )
    if isinstance(exc, ews.ErrorMessageSizeExceeded):
        return Classified(
            Outcome.PERMANENT,
            "ErrorMessageSizeExceeded",
            "The message is larger than Exchange accepts (ErrorMessageSizeExceeded).",
            "Send smaller attachments (or a link) in a new mail.",
        )
    if isinstance(exc, ews.ErrorSubmissionQuotaExceeded):
        return Classified(
            Outcome.TEMPORARY,
            "ErrorSubmissionQuotaExceeded",
            f"The mailbox {settings.mailbox} has reached Exchange's sending limit.",
            "The mail is retried later; the limit resets within a day.",
            retry_after=3600.0,
        )
    if isinstance(exc, ews.ErrorQuotaExceeded):
        return Classified(
            Outcome.CONFIGURATION,
            "ErrorQuotaExceeded",
            f"The mailbox {settings.mailbox} is full, so no copy can be saved in Sent Items.",
            "Free space in the mailbox (or raise its quota), then resume sending.",
        )
    if isinstance(
        exc,
        ews.ErrorTooManyObjectsOpened
        | ews.ErrorMailboxStoreUnavailable
        | ews.ErrorMailboxMoveInProgress
        | ews.ErrorConnectionFailed
        | ews.ErrorInternalServerTransientError
        | ews.ErrorExceededConnectionCount
        | ews.CASError,
    ):
        return Classified(
            Outcome.TEMPORARY,
            type(exc).__name__,
            f"Exchange reported a passing problem ({type(exc).__name__}); the mail will be "
            "sent later.",
            retry_after=60.0,
        )
    if isinstance(
        exc, ews.ErrorInvalidSchemaVersionForMailboxVersion | ews.ErrorInvalidServerVersion
    ):
        return Classified(
            Outcome.CONFIGURATION,
            type(exc).__name__,
            f"Exchange does not accept the pinned EWS schema version ({type(exc).__name__}).",
            f"Set {SERVER_VERSION} to the server's version (2013, 2016, 2019 or online).",
        )
    if isinstance(exc, ews.RedirectError):
        return Classified(
            Outcome.CONFIGURATION,
            "redirect",
            f"{settings.url} redirects to {exc.url} instead of answering.",
            f"Set {URL} to the server's EWS URL (it must end with /EWS/Exchange.asmx).",
        )
    if any(isinstance(link, requests.exceptions.SSLError) for link in chain(exc)):
        return tls_failure(settings.host)
    status = http_status(exc)
    if status == 403:
        return ews_refused(settings)
    if status == 404:
        return Classified(
            Outcome.CONFIGURATION,
            "HTTP 404",
            f"There is no EWS service at {settings.url} (HTTP 404).",
            f"Check {URL}: it must be the server's address ending with exactly /EWS/Exchange.asmx.",
        )
    if status is not None:
        return Classified(
            Outcome.TEMPORARY,
            f"HTTP {status}",
            f"Exchange at {settings.host} answered HTTP {status}; the mail will be sent later.",
            retry_after=60.0,
        )
    if isinstance(exc, ews.ResponseMessageError):
        code = type(exc).__name__
        return Classified(
            Outcome.TEMPORARY,
            code,
            f"Exchange did not take the message ({code}: {_server_text(exc)}).",
            retry_after=60.0,
        )
    return Classified(
        Outcome.AMBIGUOUS,
        type(exc).__name__,
        f"The send to {settings.host} ended with an unexpected error ({type(exc).__name__}); "
        "it may or may not have been sent.",
        "The outbox looks for the message in Sent Items before sending it again.",
    )


def _unauthorized(settings: ExchangeSettings) -> Classified:
    if settings.mode is AuthMode.OAUTH:
        return Classified(
            Outcome.CONFIGURATION,
            "HTTP 401",
            "Exchange refused the app's token (HTTP 401): the app lacks the "
            "full_access_as_app application permission, admin consent was not granted, "
            f"or {CLIENT_ID} belongs to another organisation.",
            ADMIN_CONSENT_FIX + ", and check Client ID and Tenant ID.",
            credentials=True,
        )
    return Classified(
        Outcome.CONFIGURATION,
        "HTTP 401",
        f"Exchange refused the username or password of {settings.mailbox} (HTTP 401).",
        f"Check {USERNAME} and {PASSWORD} (the user's network login); for a server "
        "without NTLM set exchange.onprem_auth basic.",
        credentials=True,
    )


def ews_refused(settings: ExchangeSettings) -> Classified:
    """HTTP 403: Exchange refuses EWS itself, before looking at the mailbox.

    App-only OAuth means Exchange Online (or a hybrid server trusting Entra ID), where
    a 403 on EWS is the tenant's EWS block or allow-list; with a password it is the
    on-premises EWSEnabled switch.
    """
    if settings.exchange_online or settings.mode is AuthMode.OAUTH:
        client = settings.app.client_id if settings.app else "<Client ID>"
        return Classified(
            Outcome.CONFIGURATION,
            "HTTP 403",
            "Exchange Online refuses EWS for this app (HTTP 403 on every request): since "
            "October 2026 EWS is blocked unless the tenant allows it and lists the app, or "
            "the tenant has turned EWS off.",
            "The tenant administrator can run Set-OrganizationConfig -EwsEnabled $true "
            f"-EwsAllowedAppIDs @{{Add='{client}'}} (and Set-CASMailbox -EwsEnabled $true "
            "for the mailbox); changes take up to 24 hours, and EWS ends for good on "
            f"1 April 2027. Lasting fix: send through Microsoft Graph (crm settings set "
            f"{API} graph, with the Mail.Send application permission).",
        )
    return Classified(
        Outcome.CONFIGURATION,
        "HTTP 403",
        f"Exchange at {settings.host} refuses EWS access (HTTP 403).",
        "The Exchange administrator must allow EWS for the organisation and the mailbox "
        "(Set-OrganizationConfig / Set-CASMailbox -EwsEnabled $true).",
    )


def unusable_settings(exc: Exception) -> Classified:
    """exchangelib refused the settings while building the Account: no request left."""
    return Classified(
        Outcome.CONFIGURATION,
        type(exc).__name__,
        f"The Exchange settings cannot be used: {str(exc)[:200]}",
        f"Check {URL} and {USERNAME}.",
    )


def unusable_message(exc: Exception) -> Classified:
    """exchangelib refused one message before any request: sending it again cannot help."""
    return Classified(
        Outcome.PERMANENT,
        "invalid-message",
        f"Exchange cannot take this message as it is ({_without_value(exc)}).",
        "correct it (e.g. a subject of at most 255 characters) and send it again.",
    )


def _without_value(exc: Exception) -> str:
    """exchangelib's reason without the refused value (which may be long)."""
    return re.sub(r" value '.*' ", " value ", str(exc), flags=re.DOTALL)[:200]


NOT_COVERED = Classified(
    Outcome.AMBIGUOUS,
    "incomplete-answer",
    "Exchange's answer did not cover this message; it may have been sent.",
)
"""A message of a CreateItem request that the answer left out: it may have gone."""
