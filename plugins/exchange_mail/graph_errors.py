"""What a Microsoft Graph answer means for the outbox, and what the user should do.

Graph answers every request (and every item of a ``$batch``) with an HTTP status and,
on failure, a JSON ``error.code``; :func:`classify_answer` maps the two to a
:class:`Classified`, as :mod:`exchange_mail.ews_errors` does for exchangelib's
exceptions. The message text, which Microsoft rewords, is only shown, except for a
400 that says "4MB". A request that got
no answer at all (token, TLS, network) is mapped by :func:`classify`.

=====================================================  ==============  ==================
Graph says                                             outcome         note
=====================================================  ==============  ==================
2xx                                                    sent
(no answer for an item of a $batch)                    ambiguous       reconcile
ErrorInvalidUser, 404 Request_ResourceNotFound         configuration   the guide's
                                                                       "Credentials"
401 (after one token eviction and retry)               configuration   "Credentials"
ErrorSendAsDenied                                      configuration
403                                                    configuration   "Credentials"
ErrorInvalidRecipients                                 permanent       "Error validating
                                                                       e-mail"
ErrorMessageSizeExceeded, 413, 400 over 4 MB           permanent
429, 5xx                                               temporary       Retry-After
any other 400                                          permanent
anything else                                          temporary
=====================================================  ==============  ==================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from crm_core.plugin_api import Outcome
from exchange_mail.errors import MAIL_SEND_FIX, Classified, transport_failure
from exchange_mail.settings import USERNAME, ExchangeSettings


@dataclass(frozen=True)
class Answer:
    """Graph's answer to one request or batch item: all that classification reads."""

    status: int
    code: str
    message: str
    retry_after: float | None

    @classmethod
    def parse(cls, status: int, body: Any, headers: Any) -> Answer:
        """An answer from its parts (a $batch item carries them as plain JSON)."""
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return cls(
            status,
            str(error.get("code", "")) if isinstance(error, dict) else "",
            str(error.get("message", "")) if isinstance(error, dict) else "",
            _retry_after(headers or {}),
        )

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        """The answer to a plain request; a body that is not JSON counts as empty."""
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        return cls.parse(response.status_code, body, response.headers)


MISSING = Answer(0, "missing-in-batch", "", None)
"""The stand-in for a $batch item Graph's answer left out: it may have run."""


def _retry_after(headers: Any) -> float | None:
    """The server's Retry-After in seconds, when it gave a usable one."""
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def classify_answer(answer: Answer, settings: ExchangeSettings) -> Classified:
    """Graph's status and ``error.code`` (never its message text) → outcome, cause, fix."""
    status, code = answer.status, answer.code
    shown = f"HTTP {status} {code}".strip()
    if 200 <= status < 300:
        return Classified(Outcome.SENT, "", "sent via Microsoft Graph")
    if status == 0:
        return Classified(
            Outcome.AMBIGUOUS,
            code,
            "Microsoft Graph's answer to the batch did not cover this message; it may have gone.",
            "The outbox looks for the message in Sent Items before sending it again.",
        )
    if code == "ErrorInvalidUser" or (status == 404 and code == "Request_ResourceNotFound"):
        return Classified(
            Outcome.CONFIGURATION,
            code,
            f"Microsoft Graph cannot find the user {settings.mailbox}: the address is an alias, "
            "in another domain or tenant, or not the user's sign-in name (UPN).",
            f"Set {USERNAME} to the user's full primary address, the one they sign in with "
            "(for example @vitecsoftware.com, not the alias @vitec.se).",
            credentials=True,
        )
    if status == 401:
        consent = code == "NoPermissionsInAccessToken"
        return Classified(
            Outcome.CONFIGURATION,
            code or "HTTP 401",
            "Microsoft Graph refused the app's token (HTTP 401"
            + (
                ": it carries no application permissions, so admin consent has not been granted)."
                if consent
                else ")."
            ),
            MAIL_SEND_FIX + ".",
            credentials=True,
        )
    if code == "ErrorSendAsDenied":
        return Classified(
            Outcome.CONFIGURATION,
            code,
            f"The mailbox {settings.mailbox} may not send as the user's e-mail address "
            "(ErrorSendAsDenied).",
            f"The user's e-mail (tab Basic) must be an address of the mailbox {USERNAME}.",
        )
    if status == 403:
        return Classified(
            Outcome.CONFIGURATION,
            code or "HTTP 403",
            f"Microsoft Graph denies the app access to {settings.mailbox} ({shown}): the "
            "Mail.Send application permission is missing, admin consent was not granted, or "
            "the mailbox is outside the app's RBAC scope.",
            MAIL_SEND_FIX + ".",
            credentials=True,
        )
    if code == "ErrorInvalidRecipients":
        return Classified(
            Outcome.PERMANENT,
            code,
            f"Error validating e-mail: Exchange refused a recipient address ({code}: "
            f"{answer.message[:200]}).",
            "Check that the recipients' addresses are correct — an extra space or an invalid "
            "character, for example — and send the mail again.",
        )
    if (
        code == "ErrorMessageSizeExceeded"
        or status == 413
        or (
            status == 400
            and code in ("BadRequest", "RequestEntityTooLarge")
            and "4MB" in answer.message
        )
    ):
        return Classified(
            Outcome.PERMANENT,
            code or f"HTTP {status}",
            "The message is larger than Microsoft Graph accepts.",
            "Send smaller attachments (or a link) in a new mail.",
        )
    if status == 429 or status >= 500:
        return Classified(
            Outcome.TEMPORARY,
            code or f"HTTP {status}",
            f"Microsoft Graph is busy or unavailable ({shown}); the mail will be sent later.",
            retry_after=answer.retry_after or (30.0 if status == 429 else 60.0),
        )
    return Classified(
        Outcome.PERMANENT if status == 400 else Outcome.TEMPORARY,
        code or f"HTTP {status}",
        f"Microsoft Graph did not take the message ({shown}: {answer.message[:200]}).",
        retry_after=None if status == 400 else 60.0,
    )


def classify(exc: Exception, settings: ExchangeSettings) -> Classified:
    """A request that got no answer from Graph (token, TLS, network, lost connection)."""
    host = urlsplit(settings.graph_url).hostname or settings.graph_url
    return transport_failure(exc, host, "the network and exchange.graph_url")


TOO_LARGE = Classified(
    Outcome.PERMANENT,
    "too-large-for-graph",
    "The message is too large for Microsoft Graph sendMail (attachments over about 3 MB "
    "need an upload session).",
    "send smaller attachments or a link.",
)
"""A message whose sendMail body exceeds Graph's 4 MB cap: never sent, never retried."""


def lookup_refused(answer: Answer) -> str:
    """Why a Sent Items lookup got no list; a 403 is most likely the missing read permission."""
    hint = (
        " (reconciling needs the Mail.ReadBasic.All application permission)"
        if answer.status == 403
        else ""
    )
    return f"Could not look in Sent Items: HTTP {answer.status} {answer.code}{hint}"
