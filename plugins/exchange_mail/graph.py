"""Sending through Microsoft Graph ``sendMail``: Exchange Online after EWS.

Why beside EWS: Microsoft blocks EWS in Exchange Online from October 2026 and shuts it
down in April 2027. Graph uses the same app registration and msal client (another
scope, ``https://graph.microsoft.com/.default``, so another cached token) and needs the
``Mail.Send`` application permission. ``exchange.api = auto`` (the default) selects it
for Exchange Online, ``graph`` always; the rest of the plugin (settings, outcomes, Test
connection) is shared.

Choices, and why:

* **Plain requests** with the shared TLS trust (:class:`crm_core.trust.TrustAdapter`):
  three endpoints do not justify the Graph SDK's 42 packages.
* **$batch of up to 20 sendMail** per request, each with its own status matched by
  ``id`` (Graph may answer in any order). A batch-level refusal (401, 429, 400) means no
  item ran; a batch-level server error, like a lost answer, makes that batch's messages
  ambiguous, and an item's own 5xx makes that message ambiguous. Nothing is ever resent
  here. A single message goes as a plain ``sendMail``.
* **As it happens.** Each request's results are reported as soon as its answer is
  read (a killed worker leaves at most one request ``unknown``), each with Graph's own
  answer kept as ``reply``: status, code, ``request-id`` and ``client-request-id``. A
  message that cannot be encoded (undecodable text) is permanent on its own.
* **Size.** A request body is capped at 4 MB, so a batch is also split by size. A
  message with an attachment of 3 MB or more, or whose sendMail body would exceed the
  cap, goes on its own through a draft (``POST /users/{id}/messages``, with the
  outbox's Message-ID as ``internetMessageId``, so reconciling finds it like any
  other), its attachments (under 3 MB: one POST each; from 3 MB to 150 MB: an upload
  session, ranges of at most 4 MB PUT to the pre-authenticated URL without a token),
  then ``POST .../send``. That needs Mail.ReadWrite, which the failure names. Until the
  send, nothing can have gone: a failure then is never ambiguous, and the draft is
  deleted (best effort).
* **RBAC for Applications.** An app whose mail permissions Exchange Online grants per
  mailbox (a management scope) gets a token without any ``Mail.*`` role; Exchange
  answers 403 ErrorAccessDenied for a mailbox outside the scope. Such a 403 is named
  from the token: the scope, with the PowerShell that widens it, not an Entra grant.
* **401 → evict and retry once**, as for EWS. **429**, and **503** with ``Retry-After``,
  are throttled: the outbox pauses the mailbox for the server's ``Retry-After``, and
  the rest of the batch waits with it.
* **Reconcile** filters the sender's Outbox and Sent Items by ``internetMessageId``
  (needs ``Mail.ReadBasic.All``, the one read permission the messages and docs name;
  Mail.Read or Mail.ReadWrite also do), under the lookup contract EWS shares
  (:func:`exchange_mail.errors.look_up`, which also says why a fresh "not found" is not
  yet "not sent").
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from crm_core.plugin_api import (
    GRAPH_SCOPE,
    Attachment,
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
from exchange_mail.errors import (
    Classified,
    LookupRefused,
    Results,
    look_up,
    not_attempted,
    result_for,
    token_roles,
    unusable_message,
)
from exchange_mail.graph_errors import (
    MISSING,
    Answer,
    access_denied,
    classify,
    classify_answer,
    draft_refused,
    lookup_refused,
    not_sent_yet,
    too_large,
    trace_of,
)
from exchange_mail.message_size import (
    UPLOAD_CHUNK_BYTES,
    UPLOAD_SESSION_MIN_BYTES,
    needs_upload,
    size_problems,
)
from exchange_mail.settings import (
    GRAPH_HOSTS,
    PLUGIN,
    ExchangeSettings,
    guard_token_host,
)

MAX_BATCH = 20
MAX_REQUEST_BYTES = 3_500_000  # Graph refuses bodies over 4 MB; keep a margin
TIMEOUT = (15, 120)  # connect, read (seconds)


def scope_for(graph_url: str) -> str:
    """The token scope for a Graph host (national clouds have their own audience).

    Any other host (a proxy, a test stand-in) is taken to front the global service.
    """
    host = (urlsplit(graph_url).hostname or "").lower()
    return f"https://{host}/.default" if host in GRAPH_HOSTS else GRAPH_SCOPE


class GraphSession:
    """One account's HTTP session to Graph, kept in the Crm's Resources.

    Its pool is as large as the worker's concurrency (``Resources.pool_size``): a
    Test connection from the web may run beside the worker's send for one account.
    """

    def __init__(self, ca_bundle: str | None, pool_size: int) -> None:
        self.http = requests.Session()
        self.http.mount("https://", TrustAdapter(ca_bundle, pool_maxsize=pool_size))

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()


class GraphClient:
    """Graph calls for one account: URLs, token, and the evict-and-retry-once rule."""

    def __init__(self, settings: ExchangeSettings, resources: Resources) -> None:
        assert settings.app is not None
        guard_token_host(settings)
        self.settings = settings
        self.tokens: TokenClient = token_client(resources, settings.app)
        self.scope = scope_for(settings.graph_url)
        key = (PLUGIN, "graph", settings.mailbox)  # per account: the mailbox sent as
        version = (settings.graph_url, settings.ca_bundle, resources.pool_size)
        self.http = resources.current(
            key, version, lambda: GraphSession(settings.ca_bundle, resources.pool_size)
        ).http
        self.root = f"{settings.graph_url.rstrip('/')}/v1.0"
        self.user = quote(settings.mailbox, safe="@")

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request; after a 401, evict the token and try once more (nothing ran)."""
        response = self._once(method, path, **dict(kwargs))
        if response.status_code == 401:
            self.tokens.evict()
            response = self._once(method, path, **dict(kwargs))
        return response

    def _once(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One attempt with a fresh (or cached) token and an id Microsoft support can trace."""
        headers = {
            **kwargs.pop("headers", {}),
            "Authorization": f"Bearer {self.tokens.token(self.scope)}",
            "client-request-id": str(uuid.uuid4()),
        }
        url = path if path.startswith("https://") else f"{self.root}{path}"
        return self.http.request(method, url, headers=headers, timeout=TIMEOUT, **kwargs)

    def roles(self) -> tuple[str, ...] | None:
        """The token's roles, to name a refusal's cause (None when there is no token)."""
        try:
            return token_roles(self.tokens.token(self.scope))
        except TokenError:
            return None

    def judge(self, answer: Answer) -> Classified:
        """What Graph's answer means for a send; a 403 named from the token's roles (an
        app without mail permissions in its token is scoped by RBAC for Applications)."""
        if answer.status != 403:
            return classify_answer(answer, self.settings)
        return access_denied(answer, self.settings, self.roles())


# --- the message ------------------------------------------------------------------


def _recipients(addresses: Sequence[Any]) -> list[dict[str, Any]]:
    """Graph's recipient objects, with a display name only when the address has one."""
    return [
        {"emailAddress": {"address": a.email, **({"name": a.name} if a.name else {})}}
        for a in addresses
    ]


def payload(account: SenderAccount, message: OutgoingMessage) -> dict[str, Any]:
    """The sendMail body: HTML or text, recipients, From, Message-ID, attachments."""
    body = (
        {"contentType": "HTML", "content": message.html}
        if message.html is not None
        else {"contentType": "Text", "content": message.text}
    )
    mail: dict[str, Any] = {
        "subject": message.subject,
        "body": body,
        "from": {"emailAddress": {"address": account.email, "name": account.name or account.email}},
        "internetMessageId": message.message_id,
    }
    for key, addresses in (
        ("toRecipients", message.to),
        ("ccRecipients", message.cc),
        ("bccRecipients", message.bcc),
        ("replyTo", message.reply_to),
    ):
        if addresses:
            mail[key] = _recipients(addresses)
    if message.attachments:
        mail["attachments"] = [
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": a.filename,
                "contentType": a.content_type,
                "contentBytes": base64.b64encode(a.data).decode("ascii"),
            }
            for a in message.attachments
        ]
    return {"message": mail, "saveToSentItems": True}


def _encode(account: SenderAccount, message: OutgoingMessage) -> bytes | Classified | None:
    """The sendMail body as sent, None when the message must go through a draft, or why
    it cannot go at all (alone: never its batch)."""
    if needs_upload(message) or message.size_estimate() > MAX_REQUEST_BYTES:
        return None
    try:
        body = json.dumps(payload(account, message), ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError) as exc:  # undecodable text: UnicodeError is a ValueError
        return unusable_message(str(exc))
    return None if len(body) > MAX_REQUEST_BYTES else body


def _way(
    account: SenderAccount, settings: ExchangeSettings, message: OutgoingMessage
) -> bytes | Classified | None:
    """:func:`_encode`, after Graph's size limits; text that cannot be encoded refused."""
    try:
        problems = size_problems(settings, message)
    except (ValueError, TypeError) as exc:  # undecodable text: UnicodeError is a ValueError
        return unusable_message(str(exc))
    return too_large(problems) if problems else _encode(account, message)


@dataclass(frozen=True)
class _Prepared:
    """A batch sorted: sendMail bodies, and the messages that go through a draft."""

    bodies: list[tuple[OutgoingMessage, bytes]]
    drafted: list[OutgoingMessage]


def _prepare(
    account: SenderAccount,
    settings: ExchangeSettings,
    messages: Sequence[OutgoingMessage],
    results: Results,
) -> _Prepared:
    """Each message's way; the ones that cannot go are refused (and reported) at once."""
    prepared = _Prepared([], [])
    refused: list[SendResult] = []
    for message in messages:
        body = _way(account, settings, message)
        if isinstance(body, Classified):
            refused.append(result_for(message, body))
        elif body is None:
            prepared.drafted.append(message)
        else:
            prepared.bodies.append((message, body))
    results.add(refused)
    return prepared


def _batches(
    bodies: list[tuple[OutgoingMessage, bytes]],
) -> Iterator[list[tuple[OutgoingMessage, bytes]]]:
    """Group the bodies into $batch requests: at most 20 items and under the 4 MB cap."""
    chunk: list[tuple[OutgoingMessage, bytes]] = []
    size = 0
    for item in bodies:
        if chunk and (len(chunk) >= MAX_BATCH or size + len(item[1]) > MAX_REQUEST_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1]) + 200
    if chunk:
        yield chunk


# --- sending ----------------------------------------------------------------------


def send(
    account: SenderAccount,
    settings: ExchangeSettings,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
) -> list[SendResult]:
    """Send a batch through Graph: each request's results reported as soon as Graph
    answers it; one SendResult per message; never a blind resend."""
    graph = GraphClient(settings, resources)
    results = Results(report)
    prepared = _prepare(account, settings, messages, results)
    units: list[tuple[list[OutgoingMessage], Callable[[], _Done]]] = [
        ([m for m, _ in chunk], partial(_send_request, graph, settings, chunk))
        for chunk in _batches(prepared.bodies)
    ]
    units += [([m], partial(_send_drafted, graph, account, m)) for m in prepared.drafted]
    for index, (_, run) in enumerate(units):
        done, stop = run()
        if stop is not None:  # the later requests never leave
            later = [m for batch, _ in units[index + 1 :] for m in batch]
            done += not_attempted(later, stop)
        results.add(done)
        if stop is not None:
            break
    return results.in_order(messages)


_Done = tuple[list[SendResult], Classified | None]
"""One unit's results, and the cause that stops the rest of the batch, if any."""


def _send_request(
    graph: GraphClient, settings: ExchangeSettings, chunk: list[tuple[OutgoingMessage, bytes]]
) -> _Done:
    """One request: a result per message, and the cause that stops the batch, if any.

    It stops when no answer came (token, network, lost answer) or the account or its
    mailbox must be paused (a configuration or throttling answer).
    """
    try:
        answers = _send_chunk(graph, chunk)
    except Exception as exc:  # requests or token failure for the whole request
        found = classify(exc, settings)
        return [result_for(message, found) for message, _ in chunk], found
    done: list[SendResult] = []
    stop: Classified | None = None
    for message, _ in chunk:
        answer = answers[message.message_id]
        found = graph.judge(answer)
        done.append(result_for(message, found, answer.reply))
        if found.outcome in (Outcome.CONFIGURATION, Outcome.THROTTLED):
            stop = found
    return done, stop


def _send_chunk(
    graph: GraphClient, chunk: list[tuple[OutgoingMessage, bytes]]
) -> dict[str, Answer]:
    """One request for a chunk: a plain sendMail for one message, else a $batch."""
    json_header = {"Content-Type": "application/json"}
    if len(chunk) == 1:
        message, body = chunk[0]
        response = graph.call(
            "POST", f"/users/{graph.user}/sendMail", data=body, headers=json_header
        )
        return {message.message_id: Answer.of(response)}
    return _send_batch(graph, chunk)


def _send_batch(
    graph: GraphClient, chunk: list[tuple[OutgoingMessage, bytes]]
) -> dict[str, Answer]:
    """A $batch of sendMail, one item per message, numbered so answers find their owner."""
    json_header = {"Content-Type": "application/json"}
    ids = {str(i): message for i, (message, _) in enumerate(chunk, start=1)}
    batch = {
        "requests": [
            {
                "id": item_id,
                "method": "POST",
                "url": f"/users/{graph.user}/sendMail",
                "headers": json_header,
                "body": json.loads(body),
            }
            for item_id, (_, body) in zip(ids, chunk, strict=True)
        ]
    }
    response = graph.call(
        "POST",
        "/$batch",
        data=json.dumps(batch, ensure_ascii=False).encode("utf-8"),
        headers=json_header,
    )
    if response.status_code != 200:  # one answer for every item (a 5xx may come after they ran)
        whole = Answer.of(response)
        return {m.message_id: whole for m in ids.values()}
    return _batch_answers(response, ids)


def _batch_answers(
    response: requests.Response, ids: dict[str, OutgoingMessage]
) -> dict[str, Answer]:
    """Each item's answer by its id (Graph answers in any order); a missing one may have run."""
    answers: dict[str, Answer] = {}
    for item in response.json().get("responses", []):
        owner = ids.get(str(item.get("id")))
        if owner is not None:
            trace = trace_of(response, str(item.get("id")))
            answers[owner.message_id] = Answer.parse(
                int(item.get("status", 0)), item.get("body"), item.get("headers"), trace
            )
    for owner in ids.values():  # an item the answer left out may have run
        answers.setdefault(owner.message_id, MISSING)
    return answers


# --- through a draft: attachments of 3 MB and more --------------------------------


class _NotSent(Exception):
    """A step before the draft's send failed: the mail did not go."""

    def __init__(self, found: Classified) -> None:
        super().__init__(found.text)
        self.found = found


def _send_drafted(graph: GraphClient, account: SenderAccount, message: OutgoingMessage) -> _Done:
    """Draft, attachments, send: one message's result, and the cause that stops the batch.

    Nothing can have gone before the send, so a failure there is at most temporary
    (never ambiguous), and the draft is deleted, best effort.
    """
    settings = graph.settings
    draft = ""
    try:
        draft = _create_draft(graph, account, message)
        for attachment in message.attachments:
            _attach(graph, draft, attachment)
    except _NotSent as refused:
        _delete_draft(graph, draft)
        found = refused.found
        stop = found if found.outcome is not Outcome.PERMANENT else None
        return [result_for(message, found)], stop
    try:
        response = graph.call("POST", f"/users/{graph.user}/messages/{draft}/send")
    except Exception as exc:
        found = classify(exc, settings)
        return [result_for(message, found)], found
    answer = Answer.of(response)
    found = graph.judge(answer)
    stop = found if found.outcome is Outcome.CONFIGURATION else None
    return [result_for(message, found, answer.reply)], stop


def _step(graph: GraphClient, method: str, path: str, **kwargs: Any) -> requests.Response:
    """One request before the send; any failure is :class:`_NotSent`."""
    try:
        response = graph.call(method, path, **kwargs)
    except Exception as exc:
        raise _NotSent(not_sent_yet(classify(exc, graph.settings))) from exc
    if response.status_code >= 300:
        raise _NotSent(not_sent_yet(classify_answer(Answer.of(response), graph.settings)))
    return response


def _create_draft(graph: GraphClient, account: SenderAccount, message: OutgoingMessage) -> str:
    """The draft, with the outbox's Message-ID and without attachments; its id."""
    try:
        mail = payload(account, message)["message"]
        mail.pop("attachments", None)
        body = json.dumps(mail, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError) as exc:
        raise _NotSent(unusable_message(str(exc))) from exc
    try:
        response = graph.call(
            "POST",
            f"/users/{graph.user}/messages",
            data=body,
            headers={"Content-Type": "application/json"},
        )
    except Exception as exc:
        raise _NotSent(not_sent_yet(classify(exc, graph.settings))) from exc
    if response.status_code == 403:
        raise _NotSent(draft_refused(Answer.of(response), graph.settings, graph.roles()))
    if response.status_code >= 300:
        raise _NotSent(not_sent_yet(classify_answer(Answer.of(response), graph.settings)))
    return str(response.json()["id"])


def _attach(graph: GraphClient, draft: str, attachment: Attachment) -> None:
    """One attachment: a POST under 3 MB, else an upload session."""
    base = f"/users/{graph.user}/messages/{draft}/attachments"
    json_header = {"Content-Type": "application/json"}
    if len(attachment.data) < UPLOAD_SESSION_MIN_BYTES:
        item = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": attachment.filename,
            "contentType": attachment.content_type,
            "contentBytes": base64.b64encode(attachment.data).decode("ascii"),
        }
        _step(graph, "POST", base, data=json.dumps(item).encode(), headers=json_header)
        return
    session = {
        "AttachmentItem": {
            "attachmentType": "file",
            "name": attachment.filename,
            "size": len(attachment.data),
            "contentType": attachment.content_type,
        }
    }
    created = _step(
        graph,
        "POST",
        f"{base}/createUploadSession",
        data=json.dumps(session).encode(),
        headers=json_header,
    )
    _upload(graph, str(created.json()["uploadUrl"]), attachment.data)


def _upload(graph: GraphClient, url: str, data: bytes) -> None:
    """PUT the bytes in order, at most 4 MB a range, with no token (the URL carries one)."""
    total = len(data)
    for start in range(0, total, UPLOAD_CHUNK_BYTES):
        chunk = data[start : start + UPLOAD_CHUNK_BYTES]
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{total}",
        }
        try:
            response = graph.http.put(url, data=chunk, headers=headers, timeout=TIMEOUT)
        except Exception as exc:
            raise _NotSent(not_sent_yet(classify(exc, graph.settings))) from exc
        if response.status_code >= 300:
            raise _NotSent(not_sent_yet(classify_answer(Answer.of(response), graph.settings)))


def _delete_draft(graph: GraphClient, draft: str) -> None:
    """Remove a draft that will not be sent; a failure leaves it in Drafts, harmless
    (reconciling looks only in the Outbox and Sent Items)."""
    if not draft:
        return
    try:
        graph.call("DELETE", f"/users/{graph.user}/messages/{draft}")
    except Exception:
        return


# --- Test connection: may the app send as the mailbox? -----------------------------

SCOPE_PROBE_SUBJECT = "crm Test connection: never sent (no recipients)"


def send_scope(graph: GraphClient) -> Answer:
    """Exchange's answer to a sendMail without recipients, which can never go: 400
    ErrorInvalidRecipients once Exchange has let the app at the mailbox, 403
    ErrorAccessDenied when the app may not send as it. The one way to see an RBAC for
    Applications scope from outside, since the token carries nothing of it."""
    probe = {
        "message": {"subject": SCOPE_PROBE_SUBJECT, "body": {"contentType": "Text", "content": ""}},
        "saveToSentItems": False,
    }
    response = graph.call(
        "POST",
        f"/users/{graph.user}/sendMail",
        data=json.dumps(probe).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    return Answer.of(response)


# --- reconciling ------------------------------------------------------------------


def reconcile(
    settings: ExchangeSettings,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    now: datetime,
) -> list[ReconcileResult]:
    """Look for each Message-ID in the sender's Outbox and Sent Items (see :func:`look_up`)."""
    graph = GraphClient(settings, resources)

    def look(folder: str, ids: Sequence[str]) -> set[str]:
        return {message_id for message_id in ids if in_folder(graph, folder, message_id)}

    def why_not(exc: Exception) -> str:
        return str(exc) if isinstance(exc, LookupRefused) else classify(exc, settings).text

    return look_up(messages, settings.mailbox, now, look, why_not)


def in_folder(graph: GraphClient, folder: str, message_id: str) -> bool:
    """Whether a message with this internetMessageId is in the well-known ``folder``."""
    escaped = message_id.replace("'", "''")
    params = {"$filter": f"internetMessageId eq '{escaped}'", "$select": "id,internetMessageId"}
    response = graph.call(
        "GET", f"/users/{graph.user}/mailFolders/{folder}/messages", params=params
    )
    if response.status_code != 200:
        answer = Answer.of(response)
        raise LookupRefused(lookup_refused(answer), answer.status, answer.code)
    return bool(response.json().get("value"))
