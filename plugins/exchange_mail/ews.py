"""Sending through Exchange Web Services with exchangelib, pinned and fail-fast.

Choices, and why:

* **Pinned configuration.** ``autodiscover=False``, an explicit ``service_endpoint``
  (``exchange.url``), an explicit ``auth_type`` and ``version``: no request is spent
  on discovery or version guessing. The version is ``exchange.server_version``, or
  ``Version(build=EXCHANGE_O365)`` with OAuth and ``EXCHANGE_2016`` with a password
  (2016 and 2019 speak the same schema; 2013 servers must set the setting).
* **FailFast.** exchangelib's ``FaultTolerance`` sleeps (up to ~85 minutes with
  defaults, and treats a 401 like throttling). We fail fast and give the outbox a
  classified outcome with the server's requested back-off instead.
* **One Account per sender**, cached in the Crm's :class:`Resources` under a key that
  includes a fingerprint of the settings, so changed settings take effect in a
  running worker. Each has its own credentials object, hence its own exchangelib
  ``Protocol`` (one HTTP session), and is removed from exchangelib's global protocol
  cache when closed.
* **Our own Protocol subclass** builds the HTTP sessions: the msal bearer auth (see
  :mod:`exchange_mail.auth`) and :class:`crm_core.trust.TrustAdapter` for TLS trust,
  which honours ``tls.ca_bundle`` without touching ``BaseProtocol.HTTP_ADAPTER_CLS`` or
  any other global exchangelib state shared with other accounts.
* **Batches with per-message results.** exchangelib's ``bulk_create`` raises on a
  mixed answer (e.g. one ErrorInvalidRecipients among successes), which hides the
  messages that did go. :class:`_CreateItemEach` returns every per-message error as
  a value, so each message's fate is known; a request-level refusal (a SOAP fault)
  means the server processed none of the request's messages, while a lost answer or a
  server error makes only that request's messages ambiguous. Nothing is ever resent
  here. Each request's results are reported as soon as its answer is read, so a
  worker killed mid-batch leaves at most that one request ``unknown``.
* **One bad message fails alone.** Each message is rendered to XML before any request;
  one exchangelib refuses or cannot write (undecodable text) is permanent on its own.
* **Exchange's words are kept**: ``NoError`` (or the error code) and the answer's
  ``request-id``, which Microsoft support asks for, in each result's ``reply``.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from exchangelib import (
    BASIC,
    DELEGATE,
    IMPERSONATION,
    NTLM,
    OAUTH2,
    Account,
    Body,
    Configuration,
    Credentials,
    FailFast,
    FileAttachment,
    HTMLBody,
    Mailbox,
    Message,
    Version,
)
from exchangelib import UTC as EWS_UTC
from exchangelib.errors import ResponseMessageError, UnauthorizedError
from exchangelib.items import SEND_AND_SAVE_COPY, SEND_TO_NONE
from exchangelib.protocol import Protocol
from exchangelib.services import CreateItem
from exchangelib.util import is_xml, xml_to_str
from exchangelib.version import (
    EXCHANGE_2013,
    EXCHANGE_2013_SP1,
    EXCHANGE_2016,
    EXCHANGE_2019,
    EXCHANGE_O365,
)

from crm_core.plugin_api import (
    EXCHANGE_SCOPE,
    Outcome,
    OutgoingMessage,
    ReconcileResult,
    Resources,
    SenderAccount,
    SendResult,
    TokenClient,
    TokenError,
    TrustAdapter,
    token_client,
)
from exchange_mail.auth import MsalBearerAuth, MsalOAuth2Credentials, install_redaction
from exchange_mail.errors import (
    Classified,
    Results,
    look_up,
    not_attempted,
    result_for,
    token_roles,
)
from exchange_mail.ews_errors import (
    NOT_COVERED,
    ServerError,
    classify,
    sharpen,
    unusable_message,
    unusable_settings,
)
from exchange_mail.settings import (
    CA_BUNDLE,
    EWS_CACHE,
    ONPREM_AUTH,
    PASSWORD,
    SERVER_VERSION,
    URL,
    USERNAME,
    AuthMode,
    ExchangeSettings,
    guard_token_host,
)

T = TypeVar("T")

MAX_MESSAGES_PER_REQUEST = 50
MAX_BYTES_PER_REQUEST = 10 * 1024 * 1024
RECONCILE_IDS_PER_QUERY = 25

_BUILDS = {
    "online": EXCHANGE_O365,
    "2013": EXCHANGE_2013,
    "2013_sp1": EXCHANGE_2013_SP1,
    "2016": EXCHANGE_2016,
    "2019": EXCHANGE_2019,
}
_CACHE_KEYS = (
    URL,
    USERNAME,
    PASSWORD,
    ONPREM_AUTH,
    SERVER_VERSION,
    CA_BUNDLE,
    "exchange.client_id",
    "exchange.tenant_id",
    "exchange.client_secret",
    "exchange.authority",
)


class _EwsProtocol(Protocol):  # type: ignore[misc]
    """An exchangelib Protocol whose sessions use our TLS trust and msal's tokens."""

    ca_bundle: str | None = None

    def create_session(self) -> Any:
        """A session with msal's bearer auth (OAuth) and our TLS trust on the endpoint."""
        credentials = self.credentials
        if isinstance(credentials, MsalOAuth2Credentials):
            # A plain session: no requests-oauthlib, so nothing can fetch or refresh a
            # token behind msal's back.
            session = self.raw_session(self.service_endpoint)
            session.auth = MsalBearerAuth(credentials.tokens)
            session.credentials_sig = credentials.sig()
            session.session_id = random.randint(10000, 99999)  # exchangelib's log id
            session.usage_count = 0
        else:
            session = super().create_session()
        session.mount(
            self.service_endpoint,
            TrustAdapter(
                self.ca_bundle,
                pool_block=True,
                pool_connections=self.CONNECTIONS_PER_SESSION,
                pool_maxsize=self.CONNECTIONS_PER_SESSION,
                max_retries=0,
            ),
        )
        return session


class _FailFastByStatus(FailFast):  # type: ignore[misc]
    """FailFast that reads a server error by its HTTP status before exchangelib guesses,
    and keeps each answer's ``request-id`` for the result.

    Why: exchangelib calls a 503, an ASP.NET error page, or any error answer with
    ``Connection: close``, a busy server ("OK to retry"), yet a 500, 502 or 504 can come
    after Exchange took the mail. :class:`ServerError` keeps the status and Retry-After,
    so :mod:`exchange_mail.ews_errors` can tell. The request-id is per thread, as a
    cached mailbox may serve a send and a reconcile at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen = threading.local()

    def raise_response_errors(self, response: Any) -> None:
        """Remember the request-id; raise ServerError for a 5xx that is not SOAP."""
        self._seen.request_id = response.headers.get("request-id", "")
        if _server_error(response):
            retry_after = _retry_after(response.headers.get("Retry-After"))
            raise ServerError(response.status_code, retry_after, response.reason or "")
        super().raise_response_errors(response)

    @property
    def request_id(self) -> str:
        """The ``request-id`` of the last answer this thread got."""
        return str(getattr(self._seen, "request_id", ""))

    def forget(self) -> None:
        """Before a request: no answer seen yet."""
        self._seen.request_id = ""


def _server_error(response: Any) -> bool:
    """A 5xx that exchangelib would not read as EWS's own answer.

    Left to exchangelib: a SOAP fault (HTTP 500 with XML), the 500 that names a wrong
    schema version (a setting to fix), and a front end's refusal with X-CasErrorCode.
    """
    status = response.status_code
    if status < 500 or response.headers.get("X-CasErrorCode"):
        return False
    content = response.content or b""
    return not (
        status == 500
        and (
            is_xml(content)
            or b"The specified server version is invalid" in content
            or b"ErrorInvalidSchemaVersionForMailboxVersion" in content
        )
    )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, when it is a positive number."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class _CreateItemEach(CreateItem):  # type: ignore[misc]
    """CreateItem that returns every per-message error as a value instead of raising.

    Request-level failures (SOAP faults, HTTP errors, lost connections) still raise,
    so the caller can tell "this message failed" from "this request failed".
    """

    ERRORS_TO_CATCH_IN_RESPONSE = ResponseMessageError


class _PasswordCredentials(Credentials):  # type: ignore[misc]
    """A user's own login; identity-hashed so no two Crm objects share a Protocol."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


class EwsMailbox:
    """One sender's exchangelib Account with its pinned configuration and Protocol."""

    def __init__(self, settings: ExchangeSettings, tokens: TokenClient | None) -> None:
        install_redaction()
        if tokens is not None:
            guard_token_host(settings)
        self.settings = settings
        self.tokens = tokens
        credentials: Any
        if tokens is not None:
            credentials = MsalOAuth2Credentials(tokens, settings.mailbox)
            auth_type, access = OAUTH2, IMPERSONATION
        else:
            text = settings.password.reveal() if settings.password else ""
            auth_type = BASIC if settings.onprem_auth == "basic" else NTLM
            # requests encodes a str Basic password as Latin-1; RFC 7617 and browsers use
            # UTF-8, so a password with å, ä, ö or € works the same as in OWA.
            password = text.encode("utf-8") if auth_type == BASIC else text
            credentials = _PasswordCredentials(settings.mailbox, password)
            access = DELEGATE
        self.policy = _FailFastByStatus()
        build = _BUILDS.get(settings.server_version) or (
            EXCHANGE_O365 if tokens is not None else EXCHANGE_2016
        )
        self.config = Configuration(
            credentials=credentials,
            service_endpoint=settings.url,
            auth_type=auth_type,
            version=Version(build=build),
            retry_policy=self.policy,
            max_connections=1,
        )
        self.protocol = _EwsProtocol(config=self.config)
        self.protocol.ca_bundle = settings.ca_bundle
        self.account = Account(
            primary_smtp_address=settings.mailbox,
            access_type=access,
            autodiscover=False,
            config=self.config,
            default_timezone=EWS_UTC,
            locale="en_US",
        )
        self.account.protocol = self.protocol

    def call(self, action: Callable[[], T]) -> T:
        """Run ``action``; after a 401 with OAuth, evict the token and retry once.

        Safe to repeat: a 401 means the server did nothing with the request.
        """
        if self.tokens is not None:
            self.tokens.token(EXCHANGE_SCOPE)  # a token error surfaces here, not in exchangelib
        try:
            return action()
        except UnauthorizedError:
            if self.tokens is None:
                raise
            self.tokens.evict()
            return action()

    def classify(self, exc: BaseException) -> Classified:
        """What a failure means, with a 401 or 403 named from the token's roles."""
        found = classify(exc, self.settings)
        if self.tokens is None or found.code not in ("HTTP 401", "HTTP 403"):
            return found
        try:
            roles = token_roles(self.tokens.token(EXCHANGE_SCOPE))
        except TokenError:
            roles = None
        return sharpen(found, roles)

    def close(self) -> None:
        """Close the HTTP session and drop the Protocol from exchangelib's global cache."""
        self.protocol.close()
        with contextlib.suppress(KeyError):
            del _EwsProtocol[self.config]


def mailbox_for(
    account: SenderAccount, settings: ExchangeSettings, resources: Resources
) -> EwsMailbox:
    """The sender's cached EwsMailbox; a new one (the old closed) when settings changed."""
    version = account.fingerprint(*_CACHE_KEYS)
    key = (*EWS_CACHE, account.user_id)
    return resources.current(key, version, lambda: new_mailbox(settings, resources))


def new_mailbox(settings: ExchangeSettings, resources: Resources) -> EwsMailbox:
    """An uncached EwsMailbox (Test connection uses one so it really asks the server)."""
    tokens = (
        token_client(resources, settings.app)
        if settings.mode is AuthMode.OAUTH and settings.app
        else None
    )
    return EwsMailbox(settings, tokens)


# --- sending ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Ready:
    """A message checked and rendered for CreateItem, with its size for grouping."""

    message: OutgoingMessage
    item: Any
    size: int


def _to_ews(mailbox: EwsMailbox, account: SenderAccount, message: OutgoingMessage) -> Any:
    """The exchangelib Message, checked here so a bad one fails alone, not its request."""

    def boxes(addresses: Sequence[Any]) -> list[Any] | None:
        return [Mailbox(name=a.name or None, email_address=a.email) for a in addresses] or None

    item = Message(
        account=mailbox.account,
        subject=message.subject,
        body=HTMLBody(message.html) if message.html is not None else Body(message.text),
        author=Mailbox(name=account.name or None, email_address=account.email),
        to_recipients=boxes(message.to),
        cc_recipients=boxes(message.cc),
        bcc_recipients=boxes(message.bcc),
        reply_to=boxes(message.reply_to),
        message_id=message.message_id,
    )
    for attachment in message.attachments:
        item.attach(
            FileAttachment(
                name=attachment.filename,
                content=attachment.data,
                content_type=attachment.content_type,
            )
        )
    item.clean(version=mailbox.account.version)  # what exchangelib would refuse mid-batch
    # ... and what it could not write (undecodable text), which would fail the request.
    xml_to_str(item.to_xml(version=mailbox.account.version), encoding="utf-8")
    return item


def _prepare(
    mailbox: EwsMailbox,
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    results: Results,
) -> list[_Ready]:
    """Render each message; one that cannot be rendered is refused (and reported) alone."""
    ready: list[_Ready] = []
    refused: list[SendResult] = []
    for message in messages:
        try:
            item = _to_ews(mailbox, account, message)
            ready.append(_Ready(message, item, message.size_estimate()))
        except (ValueError, TypeError) as exc:  # UnicodeError is a ValueError
            refused.append(result_for(message, unusable_message(exc)))
    results.add(refused)
    return ready


def _requests(ready: Sequence[_Ready]) -> Iterator[list[_Ready]]:
    """Group a batch into CreateItem requests, by count and by size."""
    chunk: list[_Ready] = []
    size = 0
    for one in ready:
        if chunk and (
            len(chunk) >= MAX_MESSAGES_PER_REQUEST or size + one.size > MAX_BYTES_PER_REQUEST
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(one)
        size += one.size
    if chunk:
        yield chunk


NOT_YET = "Not sent: Exchange failed while the mailbox's folders were looked up."


def send(
    account: SenderAccount,
    settings: ExchangeSettings,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
) -> list[SendResult]:
    """Send a batch for one sender: each request's results reported as soon as Exchange
    answers it; one SendResult per message; never a blind resend."""
    results = Results(report)
    try:
        mailbox = mailbox_for(account, settings, resources)
    except (ValueError, TypeError) as exc:  # exchangelib checks the settings here; no I/O
        results.add([result_for(m, unusable_settings(exc)) for m in messages])
        return results.in_order(messages)
    chunks = list(_requests(_prepare(mailbox, account, messages, results)))
    try:  # the folder lookups come first, so their failure is never taken for a send's
        folder = mailbox.call(lambda: mailbox.account.sent)
    except Exception as exc:
        ready = [one.message for chunk in chunks for one in chunk]
        results.add(not_attempted(ready, mailbox.classify(exc), NOT_YET))
        return results.in_order(messages)
    for index, chunk in enumerate(chunks):
        done, stop = _send_request(mailbox, settings, folder, chunk)
        if stop is not None:  # the request failed as a whole: the later ones never leave
            later = [one.message for c in chunks[index + 1 :] for one in c]
            done += not_attempted(later, stop)
        results.add(done)
        if stop is not None:
            break
    return results.in_order(messages)


def _send_request(
    mailbox: EwsMailbox, settings: ExchangeSettings, folder: Any, chunk: list[_Ready]
) -> tuple[list[SendResult], Classified | None]:
    """One CreateItem: a result per message, and the cause if the request failed as a whole."""
    mailbox.policy.forget()  # a failure before any answer (a token) has no request-id
    try:
        answers = mailbox.call(partial(_create, mailbox, folder, [one.item for one in chunk]))
    except Exception as exc:
        found = mailbox.classify(exc)
        reply = _with_id(found.code, mailbox.policy.request_id)
        return [result_for(one.message, found, reply) for one in chunk], found
    request_id = mailbox.policy.request_id
    done = [
        _result(one.message, answer, settings, request_id)
        for one, answer in zip(chunk, answers, strict=False)
    ]
    # The server answered for fewer messages than it was sent: the rest may have gone.
    done += [result_for(one.message, NOT_COVERED) for one in chunk[len(answers) :]]
    return done, _throttled(done)


def _throttled(done: Sequence[SendResult]) -> Classified | None:
    """A message the server throttled stops the batch: the rest wait with the mailbox."""
    for result in done:
        if result.outcome is Outcome.THROTTLED:
            return Classified(
                Outcome.THROTTLED,
                result.code,
                result.detail,
                retry_after=result.retry_after,
                quota=result.quota,
            )
    return None


def _result(
    message: OutgoingMessage, answer: Any, settings: ExchangeSettings, request_id: str
) -> SendResult:
    """One message's result from its part of a CreateItem answer, with Exchange's words."""
    if isinstance(answer, Exception):
        said = f"{type(answer).__name__}: {' '.join(str(answer).split())[:120]}"
        return result_for(message, classify(answer, settings), _with_id(said, request_id))
    item = getattr(answer, "id", None)
    words = f"NoError; item {item}" if item else "NoError"
    return SendResult(
        message.message_id, Outcome.SENT, "sent via EWS", reply=_with_id(words, request_id)
    )


def _with_id(words: str, request_id: str) -> str:
    """Exchange's words with the request-id its answer carried (what Microsoft asks for);
    empty when no answer came."""
    if not request_id:
        return ""
    return f"{words}; request-id {request_id}"


def _create(mailbox: EwsMailbox, folder: Any, items: list[Any]) -> list[Any]:
    """One CreateItem (send, and save a copy in ``folder``): a result or an exception per item."""
    mailbox.policy.forget()  # a lost answer is not credited with an earlier request-id
    service = _CreateItemEach(account=mailbox.account)
    return list(
        service.call(
            items=items,
            folder=folder,
            message_disposition=SEND_AND_SAVE_COPY,
            send_meeting_invitations=SEND_TO_NONE,
        )
    )


# --- reconciling ------------------------------------------------------------------


def reconcile(
    account: SenderAccount,
    settings: ExchangeSettings,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    now: datetime,
) -> list[ReconcileResult]:
    """Look for each Message-ID in the sender's Outbox and Sent Items (see :func:`look_up`)."""

    def look(folder: str, ids: Sequence[str]) -> set[str]:
        mailbox = mailbox_for(account, settings, resources)
        return mailbox.call(partial(_find, mailbox, folder, ids))

    return look_up(messages, settings.mailbox, now, look, lambda exc: classify(exc, settings).text)


def _find(mailbox: EwsMailbox, folder: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are in the well-known ``folder`` (FindItem, a few ids per query)."""
    where = mailbox.account.outbox if folder == "outbox" else mailbox.account.sent
    found: set[str] = set()
    for start in range(0, len(ids), RECONCILE_IDS_PER_QUERY):
        query = where.filter(message_id__in=list(ids[start : start + RECONCILE_IDS_PER_QUERY]))
        found.update(str(item.message_id) for item in query.only("message_id"))
    return found
