"""What an Exchange failure means for the outbox: the pieces both APIs share.

The outbox needs an :class:`Outcome` (temporary, permanent, configuration, ambiguous)
and the user needs a cause and a fix: a :class:`Classified`. Each API maps its own
failures to one: :mod:`exchange_mail.ews_errors` (exchangelib's exceptions) and
:mod:`exchange_mail.graph_errors` (Graph's answers). What both need lives here: the type,
the failures below the API (token, TLS, network, lost answer), the results built from
a classification, and the one lookup contract of a reconcile (:func:`look_up`: the
Outbox and Sent Items, then the "too soon to tell" window).

Texts never include a secret: exchangelib's messages carry URLs and server texts only,
and token errors come from :mod:`crm_core.entra`, which never holds the secret in text.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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
TOKEN_REFUSED_FIX = (
    "The token is not the problem of one permission (Exchange would say which): check "
    "that Tenant ID is the directory of the mailbox's organisation and exchange.authority "
    "the sign-in host of the server's cloud (a token of another tenant or cloud is "
    "refused: https://login.microsoftonline.us for outlook.office365.us and "
    "webmail.apps.mil, https://login.chinacloudapi.cn for partner.outlook.cn), that the "
    "server's URL is the right one, and that this machine's clock is right; then resume "
    "the account (crm outbox resume <e-mail>)"
)
"""What to check after two 401 answers in a row: a fresh token was refused as well."""
MAIL_SEND_FIX = (
    "In Entra → App registrations → API permissions, add Microsoft Graph → Application "
    "permissions → Mail.Send, then click 'Grant admin consent'; if the tenant scopes the "
    "app with RBAC for Applications, include this mailbox"
)


def token_roles(token: str) -> tuple[str, ...] | None:
    """The ``roles`` claim of a JWT access token, decoded without verifying: it is our own
    token, read only to name what the app holds."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    roles = claims.get("roles", []) if isinstance(claims, dict) else None
    return tuple(str(r) for r in roles) if isinstance(roles, list) else None


def scope_fix(mailbox: str) -> str:
    """How the Exchange administrator takes a mailbox into the app's per-mailbox scope."""
    return (
        f"The Exchange administrator adds {mailbox} to the app's scope: with RBAC for "
        "Applications, the management scope of the app's role assignment "
        "(Get-ManagementRoleAssignment -RoleAssignee <app> shows its CustomResourceScope; "
        "widen that scope's filter or add the mailbox to its group); with an application "
        "access policy, the group the policy names (Get-ApplicationAccessPolicy). Check "
        f"with Test-ServicePrincipalAuthorization -Identity <app> -Resource {mailbox}."
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
    quota: bool = False

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
    quota: bool = False

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
            self.quota,
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


def result_for(message: OutgoingMessage, found: Classified, reply: str = "") -> SendResult:
    """The SendResult that carries a classification, and the server's own answer."""
    return SendResult(
        message.message_id, found.outcome, found.text, code=found.code,
        retry_after=found.retry_after, reply=reply, quota=found.quota,
    )  # fmt: skip


def unusable_message(reason: str) -> Classified:
    """One message the API cannot take as it is (refused before any request): sending it
    again cannot help, and it never holds up the rest of its batch."""
    shown = reason.encode("utf-8", "backslashreplace").decode("utf-8")[:200]
    return Classified(
        Outcome.PERMANENT,
        "invalid-message",
        f"Exchange cannot take this message as it is ({shown}).",
        "correct it (e.g. a subject of at most 255 characters, text without undecodable "
        "characters) and send it again.",
    )


class Results:
    """One batch's results as they become known, each passed to ``report`` at once.

    Why: the core records reported results there and then, so a worker killed
    mid-batch leaves only the request in flight ``unknown``.
    """

    def __init__(self, report: Callable[[Sequence[SendResult]], None]) -> None:
        self._report = report
        self._known: dict[str, SendResult] = {}

    def add(self, results: Sequence[SendResult]) -> None:
        """Keep these results and report them (nothing is reported for none)."""
        if results:
            self._known.update((r.message_id, r) for r in results)
            self._report(list(results))

    def in_order(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Every message's result, in the batch's order (what send_mail returns)."""
        return [self._known[m.message_id] for m in messages]


def not_attempted(
    messages: Sequence[OutgoingMessage],
    cause: Classified,
    why: str = "Not attempted: the answer to an earlier request of this batch was lost.",
) -> list[SendResult]:
    """Messages that never left, because an earlier request (of this batch, or one made to
    prepare it) failed.

    They were not sent: the same outcome as the cause, except where the cause is
    ambiguous, which they are not: then they are simply temporary, said ``why``.
    """
    if cause.outcome is Outcome.AMBIGUOUS:
        cause = Classified(Outcome.TEMPORARY, cause.code, why)
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
"""How long Exchange may take to file a submitted mail (in the Outbox, then in Sent
Items), counted from the start of the attempt that handed it over."""

FOLDERS = (("outbox", "Outbox"), ("sentitems", "Sent Items"))
"""Where a mail Exchange took can be found, as (well-known name, label), in the order
looked: a mail only moves from the Outbox to Sent Items, so looking in the Outbox first
cannot miss one that moves between the two looks."""

Look = Callable[[str, Sequence[str]], Iterable[str]]
"""One API's lookup: which of these Message-IDs are in this well-known folder."""


class LookupRefused(Exception):
    """The server answered a lookup without a list; the text says why, for the operator.

    ``status`` and ``code`` are the answer's (HTTP status, the server's error code).
    """

    def __init__(self, text: str, status: int = 0, code: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code


def look_up(
    messages: Sequence[OutgoingMessage],
    mailbox: str,
    now: datetime,
    look: Look,
    why_not: Callable[[Exception], str],
) -> list[ReconcileResult]:
    """The one lookup contract of both APIs: look for the Message-IDs in the Outbox and
    in Sent Items, then judge each with :func:`lookup_verdict`.

    A lookup that fails tells nothing: every message is "cannot tell", with the reason
    ``why_not`` gives.
    """
    found: dict[str, str] = {}
    try:
        for folder, label in FOLDERS:
            wanted = [m.message_id for m in messages if m.message_id not in found]
            if wanted:
                found.update((mid, label) for mid in look(folder, wanted) if mid in wanted)
    except Exception as exc:  # the server or the network; nothing is concluded
        reason = f"Could not look in the Outbox and Sent Items: {why_not(exc)}"
        return [ReconcileResult(m.message_id, None, reason) for m in messages]
    return [lookup_verdict(m, found.get(m.message_id), mailbox, now) for m in messages]


def lookup_verdict(
    message: OutgoingMessage, where: str | None, mailbox: str, now: datetime
) -> ReconcileResult:
    """What finding (or not finding) a Message-ID in the Outbox or Sent Items means.

    Found: sent (from the Outbox Exchange sends it on its own). Not found: not sent,
    unless the attempt that handed it over started less than :data:`SENT_ITEMS_LAG`
    before ``now`` (both on the database's clock); then "cannot tell yet", and the
    outbox asks again later instead of sending a second copy. The enqueue time does not
    count: a mail queued long ago may have been handed over a second ago. A message
    never handed over (no ``handed_over_at``) has no copy on its way, so not found means
    not sent.
    """
    if where is not None:
        return ReconcileResult(message.message_id, True, f"found in {mailbox}'s {where}")
    since = _since_hand_over(message, now)
    if since is not None and since < SENT_ITEMS_LAG:
        return ReconcileResult(
            message.message_id,
            None,
            f"not in {mailbox}'s Outbox or Sent Items yet, {int(since.total_seconds())} s "
            "after it was handed over; Exchange files a mail with a delay, so look again later",
        )
    return ReconcileResult(message.message_id, False, f"not in {mailbox}'s Outbox or Sent Items")


def _since_hand_over(message: OutgoingMessage, now: datetime) -> timedelta | None:
    """Time from the last hand-over to ``now``; None when the message was never handed over.

    A naive timestamp is taken as UTC (the outbox stores UTC).
    """
    handed = message.handed_over_at
    if handed is None:
        return None
    if handed.tzinfo is None:
        handed = handed.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now - handed
