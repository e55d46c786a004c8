"""What a Microsoft Graph answer means for the outbox, and what the user should do.

Graph answers every request (and every item of a ``$batch``) with an HTTP status and,
on failure, a JSON ``error.code``; :func:`classify_answer` maps the two to a
:class:`Classified`, as :mod:`exchange_mail.ews_errors` does for exchangelib's
exceptions. The message text, which Microsoft rewords, is only shown, except for a
400 that says "4MB". A server error is ambiguous: Microsoft's staff say 5xx answers
to sendMail "are not necessarily proofs the message wasn't delivered", so only a 429
and a 503 that says when to come back (Retry-After) are taken for "nothing ran". A
request that got
no answer at all (token, TLS, network) is mapped by :func:`classify`.

=====================================================  ==============  ==================
Graph says                                             outcome         note
=====================================================  ==============  ==================
2xx                                                    sent
(no answer for an item of a $batch)                    ambiguous       reconcile
ErrorInvalidUser, 404 Request_ResourceNotFound         configuration   the guide's
                                                                       "Credentials"
401 twice (a fresh token was refused too)              configuration   "Credentials"
ErrorSendAsDenied                                      configuration
403                                                    configuration   "Credentials"
ErrorInvalidRecipients                                 permanent       "Error validating
                                                                       e-mail"
ErrorMessageSizeExceeded, 413, 400 over 4 MB           permanent
429, 503 with Retry-After                              throttled       the mailbox waits
                                                                       Retry-After
any other 5xx (500, 502, 504, 503 without Retry-After) ambiguous       may come after
                                                                       the mail went
any other 400                                          permanent
anything else                                          temporary
=====================================================  ==============  ==================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests

from crm_core.plugin_api import Outcome, Problem
from exchange_mail.errors import (
    MAIL_SEND_FIX,
    TOKEN_REFUSED_FIX,
    Classified,
    Says,
    transport_failure,
)
from exchange_mail.settings import (
    MAIL_SEND,
    READ_PERMISSION,
    READ_WRITE_PERMISSION,
    USERNAME,
    ExchangeSettings,
)


@dataclass(frozen=True)
class Answer:
    """Graph's answer to one request or batch item: all that classification reads, and
    ``trace`` (Microsoft's ids for it) for the reply a mail administrator quotes."""

    status: int
    code: str
    message: str
    retry_after: float | None
    trace: str = ""

    @classmethod
    def parse(cls, status: int, body: Any, headers: Any, trace: str = "") -> Answer:
        """An answer from its parts (a $batch item carries them as plain JSON)."""
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return cls(
            status,
            str(error.get("code", "")) if isinstance(error, dict) else "",
            str(error.get("message", "")) if isinstance(error, dict) else "",
            _retry_after(headers or {}),
            trace,
        )

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        """The answer to a plain request; a body that is not JSON counts as empty."""
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        return cls.parse(response.status_code, body, response.headers, trace_of(response))

    @property
    def reply(self) -> str:
        """Status, code and Microsoft's ids, e.g. ``202 Accepted; request-id …``; empty
        for no answer at all."""
        if not self.status:
            return ""
        said = self.code or _phrase(self.status)
        return "; ".join(part for part in (f"{self.status} {said}".strip(), self.trace) if part)


def trace_of(response: requests.Response, item: str = "") -> str:
    """Microsoft's ids for an answer (and the $batch item it is for), as support asks."""
    ids = [f"$batch item {item}"] if item else []
    for name in ("request-id", "client-request-id"):
        if response.headers.get(name):
            ids.append(f"{name} {response.headers[name]}")
    return "; ".join(ids)


def _phrase(status: int) -> str:
    """HTTP's reason phrase (``Accepted``), or nothing for a status it does not know."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


MISSING = Answer(0, "missing-in-batch", "", None)
"""The stand-in for a $batch item Graph's answer left out: it may have run."""


def _retry_after(headers: Any) -> float | None:
    """The server's Retry-After in seconds, when it gave a usable one."""
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


@dataclass(frozen=True)
class _Facts:
    """One answer as the table's texts see it (the rows' tests read the Answer itself)."""

    answer: Answer
    settings: ExchangeSettings

    MAIL_SEND_FIX: ClassVar[str] = MAIL_SEND_FIX
    TOKEN_REFUSED_FIX: ClassVar[str] = TOKEN_REFUSED_FIX
    USERNAME: ClassVar[str] = USERNAME

    @property
    def status(self) -> int:
        """The HTTP status of the request or batch item."""
        return self.answer.status

    @property
    def code(self) -> str:
        """Graph's ``error.code`` (empty on success or a bare status)."""
        return self.answer.code

    @property
    def code_or_status(self) -> str:
        """The code for the SendResult: Graph's, or ``HTTP nnn`` when it gave none."""
        return self.answer.code or f"HTTP {self.answer.status}"

    @property
    def shown(self) -> str:
        """Status and code as the user reads them, e.g. ``HTTP 403 ErrorAccessDenied``."""
        return f"HTTP {self.answer.status} {self.answer.code}".strip()

    @property
    def message(self) -> str:
        """Graph's own message, shortened."""
        return self.answer.message[:200]

    @property
    def mailbox(self) -> str:
        """The mailbox sent as."""
        return self.settings.mailbox


@dataclass(frozen=True)
class _Row:
    """One row: which answers it takes, and what they mean."""

    when: Callable[[Answer], bool]
    says: Callable[[_Facts], Classified]


def _too_large(answer: Answer) -> bool:
    """Graph's ways of saying the request body is over its 4 MB cap."""
    return (
        answer.code == "ErrorMessageSizeExceeded"
        or answer.status == 413
        or (
            answer.status == 400
            and answer.code in ("BadRequest", "RequestEntityTooLarge")
            and "4MB" in answer.message
        )
    )


def _busy(facts: _Facts) -> Classified:
    """Throttled or down: the mailbox waits as long as Graph asks, else 30 s (a 429
    without Retry-After); nothing ran, so no attempt is counted."""
    return Classified(
        Outcome.THROTTLED,
        facts.code_or_status,
        f"Microsoft Graph asked {facts.mailbox} to wait ({facts.shown}: "
        f"{facts.message or 'busy'}).",
        retry_after=facts.answer.retry_after or 30.0,
    )


def _nothing_ran(answer: Answer) -> bool:
    """Throttled (429), or unavailable with a time to come back (503 with Retry-After)."""
    return answer.status == 429 or (answer.status == 503 and answer.retry_after is not None)


# The first row that takes the answer decides, so order matters (the ladder's order,
# kept): ErrorInvalidUser comes before 401 and 403, ErrorSendAsDenied before 403 (the
# code names the cause better than the status); the 401 without consent before any
# 401; a 401 or 403 before a recipient or size code; the size rows before 5xx and any
# other 400.
_ROWS: tuple[_Row, ...] = (
    _Row(
        when=lambda answer: 200 <= answer.status < 300,
        says=Says(Outcome.SENT, "", "sent via Microsoft Graph"),
    ),
    _Row(
        when=lambda answer: answer.status == 0,  # MISSING: no answer for a $batch item
        says=Says(
            Outcome.AMBIGUOUS,
            "{code}",
            "Microsoft Graph's answer to the batch did not cover this message; it may have gone.",
            "The outbox looks for the message in Sent Items before sending it again.",
        ),
    ),
    _Row(
        when=lambda answer: (
            answer.code == "ErrorInvalidUser"
            or (answer.status == 404 and answer.code == "Request_ResourceNotFound")
        ),
        says=Says(
            Outcome.CONFIGURATION,
            "{code}",
            "Microsoft Graph cannot find the user {mailbox}: the address is an alias, in "
            "another domain or tenant, or not the user's sign-in name (UPN).",
            "Set {USERNAME} to the user's full primary address, the one they sign in with "
            "(for example @vitecsoftware.com, not the alias @vitec.se).",
            credentials=True,
        ),
    ),
    _Row(
        when=lambda answer: answer.status == 401 and answer.code == "NoPermissionsInAccessToken",
        says=Says(
            Outcome.CONFIGURATION,
            "{code}",
            "Microsoft Graph refused the app's token (HTTP 401: it carries no application "
            "permissions, so admin consent has not been granted, and no RBAC for "
            "Applications role assignment in Exchange Online lets the app in either).",
            "{MAIL_SEND_FIX}; or, instead of the Entra grant, the Exchange administrator "
            "assigns it per mailbox: New-ManagementRoleAssignment -App <Client ID> -Role "
            '"Application Mail.Send" -CustomResourceScope <a management scope>.',
            credentials=True,
        ),
    ),
    _Row(
        when=lambda answer: answer.status == 401,
        says=Says(
            Outcome.CONFIGURATION,
            "{code_or_status}",
            "Microsoft Graph refused the app's token ({shown}: {message}), and then a fresh "
            "one from Entra ID as well: the token was refused twice.",
            "{TOKEN_REFUSED_FIX}.",
            credentials=True,
        ),
    ),
    _Row(
        when=lambda answer: answer.code == "ErrorSendAsDenied",
        says=Says(
            Outcome.CONFIGURATION,
            "{code}",
            "The mailbox {mailbox} may not send as the user's e-mail address (ErrorSendAsDenied).",
            "The user's e-mail (tab Basic) must be an address of the mailbox {USERNAME}.",
        ),
    ),
    _Row(
        when=lambda answer: answer.status == 403,
        says=Says(
            Outcome.CONFIGURATION,
            "{code_or_status}",
            "Microsoft Graph denies the app access to {mailbox} ({shown}): the Mail.Send "
            "application permission is missing, admin consent was not granted, or the "
            "mailbox is outside the app's RBAC scope.",
            "{MAIL_SEND_FIX}.",
            credentials=True,
        ),
    ),
    _Row(
        when=lambda answer: answer.code == "ErrorInvalidRecipients",
        says=Says(
            Outcome.PERMANENT,
            "{code}",
            "Error validating e-mail: Exchange refused a recipient address ({code}: {message}).",
            "Check that the recipients' addresses are correct — an extra space or an invalid "
            "character, for example — and send the mail again.",
        ),
    ),
    _Row(
        when=_too_large,
        says=Says(
            Outcome.PERMANENT,
            "{code_or_status}",
            "The message is larger than Microsoft Graph accepts.",
            "Send smaller attachments (or a link) in a new mail.",
        ),
    ),
    _Row(when=_nothing_ran, says=_busy),
    _Row(
        when=lambda answer: answer.status >= 500,
        says=Says(
            Outcome.AMBIGUOUS,
            "{code_or_status}",
            "Microsoft Graph answered {shown} (a server error): the request may have been "
            "carried out all the same.",
            "A mail in it is looked for in the Outbox and Sent Items before it is sent again.",
        ),
    ),
    _Row(
        when=lambda answer: answer.status == 400,
        says=Says(
            Outcome.PERMANENT,
            "{code_or_status}",
            "Microsoft Graph did not take the message ({shown}: {message}).",
        ),
    ),
)

_OTHERWISE = Says(
    Outcome.TEMPORARY,
    "{code_or_status}",
    "Microsoft Graph did not take the message ({shown}: {message}).",
    retry_after=60.0,
)
"""No row took it: an answer we do not know, so try again later."""


def classify_answer(answer: Answer, settings: ExchangeSettings) -> Classified:
    """Graph's status and ``error.code`` → outcome, cause, fix.

    The first row of :data:`_ROWS` that takes the answer decides; no row:
    :data:`_OTHERWISE`.
    """
    facts = _Facts(answer, settings)
    for row in _ROWS:
        if row.when(answer):
            return row.says(facts)
    return _OTHERWISE(facts)


def classify(exc: Exception, settings: ExchangeSettings) -> Classified:
    """A request that got no answer from Graph (token, TLS, network, lost connection)."""
    host = urlsplit(settings.graph_url).hostname or settings.graph_url
    return transport_failure(exc, host, "the network and exchange.graph_url")


def too_large(problems: Sequence[Problem]) -> Classified:
    """A message over Graph's limits (see :mod:`exchange_mail.message_size`): never sent, never
    retried. Enqueue refuses such a mail; this catches one queued before the limits."""
    return Classified(
        Outcome.PERMANENT,
        "too-large-for-graph",
        "The message is too large for Microsoft Graph: "
        + "; ".join(f"{p.key} {p.message}" for p in problems)
        + ".",
        "send smaller attachments or links to them.",
    )


def not_sent_yet(found: Classified) -> Classified:
    """A failure while the draft was prepared: nothing went, so never ambiguous."""
    if found.outcome is not Outcome.AMBIGUOUS:
        return found
    return Classified(
        Outcome.TEMPORARY,
        found.code,
        f"Not sent: preparing the draft failed ({found.detail}); nothing went.",
        "The mail is sent again later.",
        retry_after=60.0,
    )


def mail_roles(roles: Iterable[str]) -> set[str]:
    """The Microsoft Graph mail permissions (``Mail.*``) among a token's roles."""
    return {role for role in roles if role.startswith("Mail.")}


def rbac_only(roles: tuple[str, ...] | None) -> bool:
    """A readable token without any mail permission: only RBAC for Applications can let
    such an app at a mailbox, and that grant lives in Exchange Online, not in the token,
    so Exchange's answer for the mailbox decides."""
    return roles is not None and not mail_roles(roles)


def rbac_scope_fix(mailbox: str, client_id: str, permission: str = MAIL_SEND) -> str:
    """The Exchange Online PowerShell that finds the app's management scope and takes
    ``mailbox`` into it (or assigns the role when the app has none)."""
    return (
        f"The Exchange administrator takes {mailbox} into the app's management scope, in "
        f"Exchange Online PowerShell: Test-ServicePrincipalAuthorization -Identity "
        f"{client_id} -Resource {mailbox} lists the app's role assignments, each with its "
        f"scope (AllowedResourceScope) and InScope False for this mailbox; "
        f'Get-ManagementScope "<AllowedResourceScope>" | Format-List RecipientFilter shows '
        f"which mailboxes that scope takes; add {mailbox} to the group the filter names "
        f'(Add-DistributionGroupMember -Identity "<group>" -Member {mailbox}) or widen the '
        f'filter (Set-ManagementScope "<AllowedResourceScope>" -RecipientRestrictionFilter '
        f"\"<the filter> -or PrimarySmtpAddress -eq '{mailbox}'\"). If no row shows "
        f'"Application {permission}", assign it: New-ManagementRoleAssignment -App '
        f'{client_id} -Role "Application {permission}" -CustomResourceScope "<scope>". '
        f'Test-ServicePrincipalAuthorization must then show "Application {permission}" '
        "with InScope True"
    )


def access_denied(
    answer: Answer, settings: ExchangeSettings, roles: tuple[str, ...] | None
) -> Classified:
    """HTTP 403 ErrorAccessDenied on a send: with a token that holds no mail permission
    (RBAC for Applications), the mailbox is outside the app's management scope, and the
    fix is Exchange's, not Entra's; otherwise what any 403 means."""
    if not rbac_only(roles) or answer.code == "ErrorSendAsDenied":
        return classify_answer(answer, settings)
    assert settings.app is not None
    return Classified(
        Outcome.CONFIGURATION,
        answer.code or "HTTP 403",
        f"Exchange Online refuses the app access to {settings.mailbox} (HTTP 403 "
        f"{answer.code}): the app's token carries no Microsoft Graph mail permissions, so "
        "RBAC for Applications decides, and the mailbox is outside the management scope "
        f'of the app\'s "Application {MAIL_SEND}" role assignment (or the app has none).',
        f"{rbac_scope_fix(settings.mailbox, settings.app.client_id)}; then resume the "
        "account (crm outbox resume <e-mail>).",
        credentials=True,
    )


def draft_refused(
    answer: Answer, settings: ExchangeSettings, roles: tuple[str, ...] | None
) -> Classified:
    """HTTP 403 on creating the draft: Mail.ReadWrite missing, when the token shows it;
    otherwise what any 403 means (the mailbox outside the app's scope)."""
    if roles is None or READ_WRITE_PERMISSION in roles:
        return classify_answer(answer, settings)
    if rbac_only(roles):
        return _draft_refused_by_rbac(answer, settings)
    held = ", ".join(roles) or "no application permissions"
    return Classified(
        Outcome.CONFIGURATION,
        answer.code or "HTTP 403",
        f"Microsoft Graph refused to create a draft in {settings.mailbox} "
        f"(HTTP 403 {answer.code}): a mail with an attachment of 3 MB or more goes through a "
        f"draft and an upload session, which need the {READ_WRITE_PERMISSION} application "
        f"permission; the app's token holds {held}.",
        f"In Entra → App registrations → API permissions, add Microsoft Graph → Application "
        f"permissions → {READ_WRITE_PERMISSION}, then click 'Grant admin consent' (with RBAC "
        f"for Applications: New-ManagementRoleAssignment -App <Client ID> -Role "
        f'"Application {READ_WRITE_PERMISSION}" -CustomResourceScope <the app\'s scope>); '
        "then resume the account (crm outbox resume <e-mail>).",
        credentials=True,
    )


def _draft_refused_by_rbac(answer: Answer, settings: ExchangeSettings) -> Classified:
    """The draft refused to an app that RBAC for Applications alone lets at mailboxes:
    no "Application Mail.ReadWrite" role assignment takes this mailbox in."""
    assert settings.app is not None
    return Classified(
        Outcome.CONFIGURATION,
        answer.code or "HTTP 403",
        f"Exchange Online refused to create a draft in {settings.mailbox} (HTTP 403 "
        f"{answer.code}): a mail with an attachment of 3 MB or more goes through a draft "
        f"and an upload session, which need {READ_WRITE_PERMISSION}; the app's token "
        "carries no Microsoft Graph mail permissions, so RBAC for Applications decides, "
        f'and no "Application {READ_WRITE_PERMISSION}" role assignment of the app takes '
        "the mailbox in.",
        f"{rbac_scope_fix(settings.mailbox, settings.app.client_id, READ_WRITE_PERMISSION)}"
        "; then resume the account (crm outbox resume <e-mail>).",
        credentials=True,
    )


def lookup_refused(answer: Answer) -> str:
    """Why a folder lookup got no list; a 403 is most likely the missing read permission."""
    hint = (
        f" (reconciling needs the {READ_PERMISSION} application permission)"
        if answer.status == 403
        else ""
    )
    return f"HTTP {answer.status} {answer.code}{hint}".rstrip()
