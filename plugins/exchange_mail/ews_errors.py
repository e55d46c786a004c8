"""What an EWS failure means for the outbox, and what the user should do.

exchangelib raises one exception per failure; the outbox needs an :class:`Outcome`
(temporary, permanent, configuration, ambiguous) and the user needs a cause and a fix.
:func:`classify` is the one place that maps one to the other (Graph's answers are
mapped in :mod:`exchange_mail.graph_errors`; the shared pieces are in
:mod:`exchange_mail.errors`):

========================================================  ==============  =================
exchangelib / server says                                 outcome         note
========================================================  ==============  =================
ErrorServerBusy (fault, BackOffMilliseconds),              throttled       the mailbox waits the
  HTTP 503 with Retry-After                                                back-off / Retry-After
ErrorTooManyObjectsOpened, ErrorMailboxStoreUnavailable,   temporary
  ErrorMailboxMoveInProgress, ErrorConnectionFailed…
ErrorSubmissionQuotaExceeded                               throttled       quota: until the
                                                                            day's window rolls
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
HTTP 500, 502, 504 (any 5xx but a 503 with Retry-After),   ambiguous       may come after
  ErrorInternalServerError                                                 Exchange took it
anything else                                              temporary       (per message) or
                                                                            ambiguous (whole
                                                                            request)
========================================================  ==============  =================

A server error is read by its HTTP status (:class:`ServerError`, raised by the
transport's retry policy before exchangelib guesses): exchangelib calls a 503, an
ASP.NET error page or any error answer with ``Connection: close`` a busy server, "OK to
retry", yet a 500, 502 or 504 can come after Exchange took the mail.

The rows of :data:`_RUNGS` follow this table's logic in the order they are tried.
exchangelib is imported at the top, for the table: only the EWS path (ews.py and the
EWS rung of Test connection) imports this module, so the Graph path never loads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import Any, ClassVar

import requests
from exchangelib import errors as ews

from crm_core.plugin_api import CLIENT_ID, Outcome, TokenError
from exchange_mail.errors import (
    ADMIN_CONSENT_FIX,
    TOKEN_REFUSED_FIX,
    Classified,
    Says,
    chain,
    connect_failure,
    failed_before_sending,
    lost_answer,
    scope_fix,
    tls_failure,
    token_failure,
)
from exchange_mail.errors import unusable_message as refused_message
from exchange_mail.settings import (
    API,
    DOMAIN,
    GRAPH_PERMISSIONS,
    PASSWORD,
    SERVER_VERSION,
    URL,
    USERNAME,
    Api,
    AuthMode,
    ExchangeSettings,
)

_HTTP_STATUS = re.compile(r"Unknown failure in response\. Code: (\d{3})")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status exchangelib reports for an unexpected answer (403, 404, 502 …)."""
    match = _HTTP_STATUS.match(str(exc))
    return int(match.group(1)) if match else None


class ServerError(ews.TransportError):  # type: ignore[misc]
    """An HTTP 5xx that is not a SOAP answer, with the status and Retry-After it came with."""

    def __init__(self, status: int, retry_after: float | None, said: str) -> None:
        super().__init__(f"HTTP {status}: {said}" if said else f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


def _server_text(exc: BaseException) -> str:
    """The server's own words, on one line and short enough for a SendResult."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True)
class _Facts:
    """One failure as the rows' tests and texts see it; each fact is read on demand.

    ``exc`` is typed Any: a row's ``catches`` guarantees the type its texts rely on
    (``back_off`` of ErrorServerBusy, ``url`` of RedirectError).
    """

    exc: Any
    settings: ExchangeSettings

    ADMIN_CONSENT_FIX: ClassVar[str] = ADMIN_CONSENT_FIX
    TOKEN_REFUSED_FIX: ClassVar[str] = TOKEN_REFUSED_FIX

    @property
    def scope(self) -> str:
        """How to take the mailbox into the app's scope."""
        return scope_fix(self.settings.mailbox)

    CLIENT_ID: ClassVar[str] = CLIENT_ID
    DOMAIN: ClassVar[str] = DOMAIN
    PASSWORD: ClassVar[str] = PASSWORD
    SERVER_VERSION: ClassVar[str] = SERVER_VERSION
    URL: ClassVar[str] = URL
    USERNAME: ClassVar[str] = USERNAME

    @property
    def name(self) -> str:
        """exchangelib's class name, which is the EWS response code."""
        return type(self.exc).__name__

    @property
    def said(self) -> str:
        """What the server said, shortened."""
        return _server_text(self.exc)

    @property
    def status(self) -> int | None:
        """The HTTP status of an unexpected answer, if that is what this is."""
        if isinstance(self.exc, ServerError):
            return self.exc.status
        return http_status(self.exc)

    @property
    def mailbox(self) -> str:
        """The mailbox signed in to or impersonated."""
        return self.settings.mailbox

    @property
    def host(self) -> str:
        """The Exchange server's host name."""
        return self.settings.host

    @property
    def url(self) -> str:
        """The EWS URL as configured."""
        return self.settings.url

    @property
    def redirect(self) -> str:
        """Where a RedirectError points."""
        return str(self.exc.url)

    @property
    def oauth(self) -> bool:
        """App-only OAuth (impersonation) rather than the user's own password."""
        return self.settings.mode is AuthMode.OAUTH


def _always(facts: _Facts) -> bool:
    """The default test of a row: its exception types say it all."""
    return True


@dataclass(frozen=True)
class _Rung:
    """One row: the exceptions it takes, a further test if needed, and what they mean."""

    catches: type[BaseException] | UnionType
    says: Callable[[_Facts], Classified]
    when: Callable[[_Facts], bool] = _always


def _timed_out(facts: _Facts) -> bool:
    """A timeout anywhere in the chain (exchangelib re-raises it as other errors)."""
    return any(isinstance(link, ews.ErrorTimeoutExpired) for link in chain(facts.exc))


def _timeout(facts: _Facts) -> Classified:
    """A timeout before the request left is a failed connection; after, a lost answer."""
    link = next(x for x in chain(facts.exc) if isinstance(x, ews.ErrorTimeoutExpired))
    if failed_before_sending(link):
        return connect_failure(facts.host, f"the network and {URL}")
    return lost_answer(facts.host, "ErrorTimeoutExpired")


def _busy(facts: _Facts) -> Classified:
    """Exchange asked us to back off: wait as long as it says (at least a second)."""
    back_off = facts.exc.back_off if isinstance(facts.exc.back_off, int | float) else None
    return Classified(
        Outcome.THROTTLED,
        "ErrorServerBusy",
        f"Exchange at {facts.host} asked {facts.mailbox} to wait ({facts.said}).",
        retry_after=max(float(back_off), 1.0) if back_off else 30.0,
    )


def _unavailable(facts: _Facts) -> bool:
    """A 503 with Retry-After: the service says it did nothing and when to come back."""
    return facts.status == 503 and getattr(facts.exc, "retry_after", None) is not None


def _come_back(facts: _Facts) -> Classified:
    """A 503 with Retry-After: temporary, after the time the server asked for."""
    return Classified(
        Outcome.THROTTLED,
        "HTTP 503",
        f"Exchange at {facts.host} is unavailable (HTTP 503) and asks to come back after "
        f"{facts.exc.retry_after:g} seconds.",
        retry_after=max(float(facts.exc.retry_after), 1.0),
    )


def _server_failed(facts: _Facts) -> bool:
    """Any other 5xx: it may have come after Exchange carried the request out."""
    return facts.status is not None and facts.status >= 500


_AFTER_SERVER_ERROR = Says(
    Outcome.AMBIGUOUS,
    "HTTP {status}",
    "Exchange at {host} answered HTTP {status} (a server error): the request may have been "
    "carried out all the same.",
    "A mail in it is looked for in the Outbox and Sent Items before it is sent again.",
)


def _untrusted(facts: _Facts) -> bool:
    """The TLS handshake failed somewhere below exchangelib."""
    return any(isinstance(link, requests.exceptions.SSLError) for link in chain(facts.exc))


_RECIPIENT_REFUSED = (
    ews.ErrorInvalidRecipients | ews.ErrorInvalidSmtpAddress | ews.ErrorMailRecipientNotFound
)
_PASSING_PROBLEM = (
    ews.ErrorTooManyObjectsOpened
    | ews.ErrorMailboxStoreUnavailable
    | ews.ErrorMailboxMoveInProgress
    | ews.ErrorConnectionFailed
    | ews.ErrorInternalServerTransientError
    | ews.ErrorExceededConnectionCount
    | ews.CASError
)
_WRONG_SCHEMA = ews.ErrorInvalidSchemaVersionForMailboxVersion | ews.ErrorInvalidServerVersion

# The first row that takes the exception decides, so order matters:
# * a timeout anywhere in the chain decides before ErrorServerBusy (exchangelib turns
#   a timeout into ErrorServerBusy when its pool has room: still a lost answer);
# * a row with ``when=oauth`` comes before its twin for a password (same types);
# * every Error* class is a subclass of ResponseMessageError, so the named ones, the
#   TLS and HTTP-status rows (which read the chain and the text) all come before
#   ResponseMessageError, the last row; HTTP 403 and 404 come before any other status.
_RUNGS: tuple[_Rung, ...] = (
    _Rung(TokenError, lambda facts: token_failure(facts.exc)),
    _Rung(BaseException, when=_timed_out, says=_timeout),
    _Rung(ews.ErrorServerBusy, _busy),
    _Rung(ServerError, when=_unavailable, says=_come_back),
    _Rung(ServerError, when=_server_failed, says=_AFTER_SERVER_ERROR),
    _Rung(
        ews.ErrorInternalServerError,
        Says(
            Outcome.AMBIGUOUS,
            "ErrorInternalServerError",
            "Exchange reported an internal error ({said}): the request may have been carried "
            "out all the same.",
            "A mail in it is looked for in the Outbox and Sent Items before it is sent again.",
        ),
    ),
    _Rung(
        ews.UnauthorizedError,
        when=lambda facts: facts.oauth,
        says=Says(
            Outcome.CONFIGURATION,
            "HTTP 401",
            "Exchange refused the app's token (HTTP 401), and then a fresh one from Entra ID "
            "as well: the token was refused twice.",
            "{TOKEN_REFUSED_FIX}.",
            credentials=True,
        ),
    ),
    _Rung(
        ews.UnauthorizedError,
        Says(
            Outcome.CONFIGURATION,
            "HTTP 401",
            "Exchange refused the username or password of {mailbox} (HTTP 401).",
            "Check {USERNAME} and {PASSWORD} (the user's network login); for a server without "
            "NTLM set exchange.onprem_auth basic.",
            credentials=True,
        ),
    ),
    _Rung(
        ews.ErrorNonExistentMailbox,
        Says(
            Outcome.CONFIGURATION,
            "ErrorNonExistentMailbox",
            "Exchange cannot find a mailbox for {mailbox} in the domain: the address is an "
            "alias, in another domain, or the tenant's codes belong to another organisation.",
            "Set {USERNAME} to the user's full primary e-mail address (for example "
            "@vitecsoftware.com, not the alias @vitec.se), and check that {DOMAIN} is the "
            "domain the OAuth codes belong to.",
            credentials=True,
        ),
    ),
    _Rung(
        ews.ErrorImpersonateUserDenied,
        when=lambda facts: facts.oauth,
        says=Says(
            Outcome.CONFIGURATION,
            "ErrorImpersonateUserDenied",
            "Exchange lets the app use EWS but not act as {mailbox} "
            "(ErrorImpersonateUserDenied): the mailbox is outside the app's per-mailbox "
            "scope (RBAC for Applications, or an application access policy); no permission "
            "is missing, since the app reached the mailbox check.",
            "{scope}",
            credentials=True,
        ),
    ),
    _Rung(
        ews.ErrorAccessDenied,
        when=lambda facts: facts.oauth,
        says=Says(
            Outcome.CONFIGURATION,
            "{name}",
            "Exchange does not let the app act as {mailbox} ({name}): the full_access_as_app "
            "application permission is missing or admin consent was not granted.",
            "{ADMIN_CONSENT_FIX}.",
            credentials=True,
        ),
    ),
    _Rung(
        ews.ErrorImpersonateUserDenied | ews.ErrorAccessDenied,
        Says(
            Outcome.CONFIGURATION,
            "{name}",
            "Exchange refused access to the mailbox {mailbox} ({name}).",
            "Check {USERNAME} and {PASSWORD}; the user must own the mailbox.",
            credentials=True,
        ),
    ),
    _Rung(
        ews.ErrorSendAsDenied,
        Says(
            Outcome.CONFIGURATION,
            "ErrorSendAsDenied",
            "The mailbox {mailbox} may not send as the user's e-mail address (ErrorSendAsDenied).",
            "The user's e-mail (tab Basic) must be an address of the mailbox named in "
            "{USERNAME}; correct one of them.",
        ),
    ),
    _Rung(
        _RECIPIENT_REFUSED,
        Says(
            Outcome.PERMANENT,
            "{name}",
            "Error validating e-mail: Exchange refused a recipient address ({name}: {said}).",
            "Check that the recipients' addresses are correct — an extra space or an invalid "
            "character, for example — and send the mail again.",
        ),
    ),
    _Rung(
        ews.ErrorMessageSizeExceeded,
        Says(
            Outcome.PERMANENT,
            "ErrorMessageSizeExceeded",
            "The message is larger than Exchange accepts (ErrorMessageSizeExceeded).",
            "Send smaller attachments (or a link) in a new mail.",
        ),
    ),
    _Rung(
        ews.ErrorSubmissionQuotaExceeded,
        Says(
            Outcome.THROTTLED,
            "ErrorSubmissionQuotaExceeded",
            "Exchange sends no more mail from {mailbox} for now: the mailbox has reached its "
            "daily sending limit (Exchange Online: 10,000 recipients in 24 hours).",
            "Nothing; the mail goes out by itself once the limit's 24-hour window rolls. For "
            "mailings to many people use a bulk-mail service rather than a person's mailbox.",
            quota=True,
        ),
    ),
    _Rung(
        ews.ErrorQuotaExceeded,
        Says(
            Outcome.CONFIGURATION,
            "ErrorQuotaExceeded",
            "The mailbox {mailbox} is full, so no copy can be saved in Sent Items.",
            "Free space in the mailbox (or raise its quota), then resume sending.",
        ),
    ),
    _Rung(
        _PASSING_PROBLEM,
        Says(
            Outcome.TEMPORARY,
            "{name}",
            "Exchange reported a passing problem ({name}); the mail will be sent later.",
            retry_after=60.0,
        ),
    ),
    _Rung(
        _WRONG_SCHEMA,
        Says(
            Outcome.CONFIGURATION,
            "{name}",
            "Exchange does not accept the pinned EWS schema version ({name}).",
            "Set {SERVER_VERSION} to the server's version (2013, 2016, 2019 or online).",
        ),
    ),
    _Rung(
        ews.RedirectError,
        Says(
            Outcome.CONFIGURATION,
            "redirect",
            "{url} redirects to {redirect} instead of answering.",
            "Set {URL} to the server's EWS URL (it must end with /EWS/Exchange.asmx).",
        ),
    ),
    _Rung(BaseException, when=_untrusted, says=lambda facts: tls_failure(facts.host)),
    _Rung(
        BaseException,
        when=lambda facts: facts.status == 403,
        says=lambda facts: ews_refused(facts.settings),
    ),
    _Rung(
        BaseException,
        when=lambda facts: facts.status == 404,
        says=Says(
            Outcome.CONFIGURATION,
            "HTTP 404",
            "There is no EWS service at {url} (HTTP 404).",
            "Check {URL}: it must be the server's address ending with exactly /EWS/Exchange.asmx.",
        ),
    ),
    _Rung(BaseException, when=_server_failed, says=_AFTER_SERVER_ERROR),
    _Rung(
        BaseException,
        when=lambda facts: facts.status is not None,
        says=Says(
            Outcome.TEMPORARY,
            "HTTP {status}",
            "Exchange at {host} answered HTTP {status}; the mail will be sent later.",
            retry_after=60.0,
        ),
    ),
    _Rung(
        ews.ResponseMessageError,
        Says(
            Outcome.TEMPORARY,
            "{name}",
            "Exchange did not take the message ({name}: {said}).",
            retry_after=60.0,
        ),
    ),
)

_UNEXPECTED = Says(
    Outcome.AMBIGUOUS,
    "{name}",
    "The send to {host} ended with an unexpected error ({name}); it may or may not have been sent.",
    "The outbox looks for the message in Sent Items before sending it again.",
)
"""No row took it: the request may have been processed, so it is reconciled, not resent."""


def classify(exc: BaseException, settings: ExchangeSettings) -> Classified:
    """Map an exception from a send, a lookup or a test to outcome, cause and fix.

    The first row of :data:`_RUNGS` that takes it decides; no row: :data:`_UNEXPECTED`.
    """
    facts = _Facts(exc, settings)
    for rung in _RUNGS:
        if isinstance(exc, rung.catches) and rung.when(facts):
            return rung.says(facts)
    return _UNEXPECTED(facts)


def ews_refused(settings: ExchangeSettings) -> Classified:
    """HTTP 403: Exchange refuses EWS itself, before looking at the mailbox.

    App-only OAuth means Exchange Online (or a hybrid server trusting Entra ID), where
    a 403 on EWS is the tenant's EWS block or allow-list; with a password it is the
    on-premises EWSEnabled switch.
    """
    if settings.exchange_online or settings.mode is AuthMode.OAUTH:
        client = settings.app.client_id if settings.app else "<Client ID>"
        choice = Api.AUTO.value if settings.exchange_online else Api.GRAPH.value
        return Classified(
            Outcome.CONFIGURATION,
            "HTTP 403",
            "Exchange Online refuses EWS for this app (HTTP 403 on every request): since "
            "October 2026 EWS is blocked unless the tenant allows it and lists the app's "
            f"Client ID {client} in EwsAllowedAppIDs, or the tenant has turned EWS off.",
            "The tenant administrator adds the Client ID to the allow list, which "
            "Set-OrganizationConfig replaces as a whole, so the existing IDs must be "
            "included: read them with Get-OrganizationConfig | Select-Object -ExpandProperty "
            "EwsAllowedAppIDs, then run Set-OrganizationConfig -EwsEnabled $true "
            f'-EwsAllowedAppIDs "<the existing IDs>","{client}" (and check that '
            "Get-CASMailbox <mailbox> shows EwsEnabled not False); changes take up to 24 "
            "hours, and EWS ends for good on 1 April 2027. Lasting fix: send through "
            f"Microsoft Graph (crm settings set {API} {choice}; {GRAPH_PERMISSIONS}).",
        )
    return Classified(
        Outcome.CONFIGURATION,
        "HTTP 403",
        f"Exchange at {settings.host} refuses EWS access (HTTP 403).",
        "The Exchange administrator must allow EWS for the organisation and the mailbox "
        "(Set-OrganizationConfig / Set-CASMailbox -EwsEnabled $true).",
    )


EWS_ROLES = ("full_access_as_app", "EWS.AccessAsApp")
"""The application permissions app-only EWS needs (either)."""


def sharpen(found: Classified, roles: tuple[str, ...] | None) -> Classified:
    """Name the cause from the token's roles where EWS's answer cannot (401 and 403).

    A 403 means EWS blocked for the tenant *or* a token without an EWS permission;
    a 401 after a retry means a refused token *or* no permissions at all. The roles
    (``None``: unknown, e.g. a password) tell which.
    """
    if roles is None or found.code not in ("HTTP 401", "HTTP 403"):
        return found
    if not roles:
        detail = (
            f"Exchange refused the app's token ({found.code}): it carries no application "
            "permissions, so admin consent has not been granted."
        )
    elif not set(roles) & set(EWS_ROLES):
        detail = (
            f"Exchange refused EWS to the app ({found.code}): its token holds "
            f"{', '.join(roles)} but not full_access_as_app, the application permission "
            "app-only EWS needs (this is not the tenant's EWS block)."
        )
    else:
        return found
    return Classified(found.outcome, found.code, detail, ADMIN_CONSENT_FIX + ".", credentials=True)


def unusable_settings(exc: Exception) -> Classified:
    """exchangelib refused the settings while building the Account: no request left."""
    return Classified(
        Outcome.CONFIGURATION,
        type(exc).__name__,
        f"The Exchange settings cannot be used: {str(exc)[:200]}",
        f"Check {URL} and {USERNAME}.",
    )


def unusable_message(exc: Exception) -> Classified:
    """exchangelib refused (or could not render) one message before any request."""
    return refused_message(_without_value(exc))


def _without_value(exc: Exception) -> str:
    """exchangelib's reason without the refused value (which may be long)."""
    return re.sub(r" value '.*' ", " value ", str(exc), flags=re.DOTALL)[:200]


NOT_COVERED = Classified(
    Outcome.AMBIGUOUS,
    "incomplete-answer",
    "Exchange's answer did not cover this message; it may have been sent.",
)
"""A message of a CreateItem request that the answer left out: it may have gone."""
