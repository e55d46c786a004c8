"""What an Exchange failure means for the outbox: the pieces both APIs share.

The outbox needs an :class:`Outcome` (temporary, permanent, configuration, ambiguous)
and the user needs a cause and a fix: a :class:`Classified`. Each API maps its own
failures to one: :mod:`exchange_mail.ews_errors` (exchangelib's exceptions) and
:mod:`exchange_mail.graph_errors` (Graph's answers). What both need lives here: the type,
the failures below the API (token, TLS, network, lost answer), the results built from
a classification, and the verdict of a Sent Items lookup.

Texts never include a secret: exchangelib's messages carry URLs and server texts only,
and token errors come from :mod:`crm_core.entra`, which never holds the secret in text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import requests
import urllib3.exceptions

from crm_core.plugin_api import (
    Outcome,
    OutgoingMessage,
    ReconcileResult,
    SendResult,
    TokenError,
)
from exchange_mail.settings import (
    CA_BUNDLE,
)

ADMIN_CONSENT_FIX = (
    "In Entra → App registrations → API permissions, add Office 365 Exchange Online → "
    "Application permissions → full_access_as_app, then click 'Grant admin consent'"
)
MAIL_SEND_FIX = (
    "In Entra → App registrations → API permissions, add Microsoft Graph → Application "
    "permissions → Mail.Send, then click 'Grant admin consent'; if the tenant scopes the "
    "app with RBAC for Applications, include this mailbox"
)


@dataclass(frozen=True)
class Classified:
    """One failure, classified: the outbox outcome, the user's cause and fix.

    ``credentials`` marks the cases the guide calls "TestConnection error Credentials"
    (the codes, the domain or the mailbox name do not add up).
    """

    outcome: Outcome
    code: str
    detail: str
    fix: str = ""
    retry_after: float | None = None
    credentials: bool = False

    @property
    def text(self) -> str:
        """Cause and fix in one line, for a SendResult."""
        return f"{self.detail} Fix: {self.fix}" if self.fix else self.detail


@dataclass(frozen=True)
class Says:
    """A row of a classification table written as the user will read it.

    Why templates: the table then shows each case's outcome, code and texts at a
    glance. ``{name}`` placeholders name attributes of a *facts* object (the failure
    and the settings, seen by one API); an attribute is read only when a text names
    it, so a row never computes what it does not show.
    """

    outcome: Outcome
    code: str
    detail: str
    fix: str = ""
    retry_after: float | None = None
    credentials: bool = False

    def __call__(self, facts: object) -> Classified:
        """The classification with the placeholders filled in from ``facts``."""
        named = _Named(facts)
        return Classified(
            self.outcome,
            self.code.format_map(named),
            self.detail.format_map(named),
            self.fix.format_map(named),
            self.retry_after,
            self.credentials,
        )


class _Named:
    """``str.format_map``'s view of an object: ``{name}`` reads ``facts.name``."""

    def __init__(self, facts: object) -> None:
        self.facts = facts

    def __getitem__(self, name: str) -> object:
        """The attribute the placeholder names (a typo raises, and the row's test fails)."""
        return getattr(self.facts, name)


def token_failure(exc: TokenError) -> Classified:
    """Entra ID's refusal as :mod:`crm_core.entra` explained it."""
    return Classified(
        exc.outcome, exc.code, exc.message, exc.fix,
        credentials=exc.outcome is Outcome.CONFIGURATION,
    )  # fmt: skip


def tls_failure(host: str) -> Classified:
    """The server's certificate is not trusted: nothing was sent."""
    return Classified(
        Outcome.CONFIGURATION,
        "tls",
        f"The TLS certificate of {host} could not be verified.",
        f"If the server (or a proxy in the path) uses a private CA, save its CA file as "
        f"{CA_BUNDLE} (or set REQUESTS_CA_BUNDLE), and check that the host name matches the "
        "certificate.",
    )


def connect_failure(host: str, check: str) -> Classified:
    """No connection was made: nothing was sent, try later."""
    return Classified(
        Outcome.TEMPORARY,
        "connect",
        f"Could not connect to {host}; nothing was sent.",
        f"Check {check}; the mail will be sent later.",
        retry_after=60.0,
    )


def lost_answer(host: str, code: str) -> Classified:
    """The request left and no answer came: it may have been processed."""
    return Classified(
        Outcome.AMBIGUOUS,
        code,
        f"The connection to {host} was lost after the request was sent; the mail may or "
        "may not have gone.",
        "The outbox looks for the message in Sent Items before sending it again.",
    )


def transport_failure(exc: BaseException, host: str, check: str) -> Classified:
    """A failure below the API (token, TLS, network) for a plain HTTP client such as Graph's.

    Anything else that interrupted a request is treated as a lost answer: it may have
    gone, so it is reconciled, never resent blindly.
    """
    if isinstance(exc, TokenError):
        return token_failure(exc)
    if any(isinstance(link, requests.exceptions.SSLError) for link in chain(exc)):
        return tls_failure(host)
    if failed_before_sending(exc):
        return connect_failure(host, check)
    return lost_answer(host, type(exc).__name__)


def result_for(message: OutgoingMessage, found: Classified) -> SendResult:
    """The SendResult that carries a classification."""
    return SendResult(
        message.message_id, found.outcome, found.text, code=found.code,
        retry_after=found.retry_after,
    )  # fmt: skip


def not_attempted(messages: Sequence[OutgoingMessage], cause: Classified) -> list[SendResult]:
    """Messages of later requests of a batch, after an earlier request failed.

    They were not sent: the same outcome as the cause, except after a lost answer,
    where they are simply temporary (they never left).
    """
    if cause.outcome is Outcome.AMBIGUOUS:
        cause = Classified(
            Outcome.TEMPORARY,
            cause.code,
            "Not attempted: the answer to an earlier request of this batch was lost.",
        )
    return [result_for(m, cause) for m in messages]


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from: libraries re-raise, the cause hides."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failed_before_sending(exc: BaseException) -> bool:
    """True when the connection failed before any byte of the request left."""
    for link in chain(exc):
        if isinstance(
            link, requests.exceptions.ConnectTimeout | urllib3.exceptions.NewConnectionError
        ):
            return True
        if isinstance(link, requests.exceptions.ConnectionError):
            for arg in link.args:
                reason = getattr(arg, "reason", None)
                if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
                    return True
    return False


SENT_ITEMS_LAG = timedelta(minutes=5)
"""How long Exchange may take to file the Sent Items copy of a submitted message."""


def lookup_verdict(
    message: OutgoingMessage, found: bool, mailbox: str, now: datetime
) -> ReconcileResult:
    """What finding (or not finding) a Message-ID in Sent Items means.

    Found: sent. Not found: not sent, unless the message is younger than
    :data:`SENT_ITEMS_LAG` (Exchange files the copy asynchronously, so an early look can
    miss a mail that went); then "cannot tell yet", and the outbox asks again later
    instead of sending a second copy.
    """
    if found:
        return ReconcileResult(message.message_id, True, f"found in {mailbox}'s Sent Items")
    if now - message.created_at < SENT_ITEMS_LAG:
        return ReconcileResult(
            message.message_id,
            None,
            f"not in {mailbox}'s Sent Items yet; Exchange files the copy with a delay, "
            "so look again later",
        )
    return ReconcileResult(message.message_id, False, f"not in {mailbox}'s Sent Items")
