"""Sending through Microsoft Graph ``sendMail``: Exchange Online after EWS.

Why beside EWS: Microsoft blocks EWS in Exchange Online from October 2026 and shuts it
down in April 2027. Graph uses the same app registration and msal client (another
scope, ``https://graph.microsoft.com/.default``, so another cached token) and needs the
``Mail.Send`` application permission. ``exchange.api = graph`` selects it; the rest of
the plugin (settings, outcomes, Test connection) is shared.

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
* **Size.** A request body is capped at 4 MB, so a batch is also split by size, and a
  single message whose JSON exceeds the cap (attachments over about 3 MB) is refused
  as permanent: it needs an upload session (Mail.ReadWrite), not done here.
* **401 → evict and retry once**, as for EWS. **429**, and **503** with ``Retry-After``,
  are throttled: the outbox pauses the mailbox for the server's ``Retry-After``, and
  the rest of the batch waits with it.
* **Reconcile** filters the sender's Outbox and Sent Items by ``internetMessageId``
  (needs ``Mail.ReadBasic.All`` or ``Mail.Read``), under the lookup contract EWS shares
  (:func:`exchange_mail.errors.look_up`, which also says why a fresh "not found" is not
  yet "not sent").
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from crm_core.plugin_api import (
    GRAPH_SCOPE,
    Outcome,
    OutgoingMessage,
    ReconcileResult,
    Resources,
    SenderAccount,
    SendResult,
    TokenClient,
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
    unusable_message,
)
from exchange_mail.graph_errors import (
    MISSING,
    TOO_LARGE,
    Answer,
    classify,
    classify_answer,
    lookup_refused,
    trace_of,
)
from exchange_mail.settings import PLUGIN, ExchangeSettings

MAX_BATCH = 20
MAX_REQUEST_BYTES = 3_500_000  # Graph refuses bodies over 4 MB; keep a margin
TIMEOUT = (15, 120)  # connect, read (seconds)
_KNOWN_GRAPH_HOSTS = frozenset(
    {
        "graph.microsoft.com",
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
    }
)


def scope_for(graph_url: str) -> str:
    """The token scope for a Graph host (national clouds have their own audience).

    Any other host (a proxy, a test stand-in) is taken to front the global service.
    """
    host = (urlsplit(graph_url).hostname or "").lower()
    return f"https://{host}/.default" if host in _KNOWN_GRAPH_HOSTS else GRAPH_SCOPE


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


def _encode(account: SenderAccount, message: OutgoingMessage) -> bytes | Classified:
    """The sendMail body as sent, or why this message cannot go (alone: never its batch)."""
    try:
        body = json.dumps(payload(account, message), ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError) as exc:  # undecodable text: UnicodeError is a ValueError
        return unusable_message(str(exc))
    return TOO_LARGE if len(body) > MAX_REQUEST_BYTES else body


def _prepare(
    account: SenderAccount, messages: Sequence[OutgoingMessage], results: Results
) -> list[tuple[OutgoingMessage, bytes]]:
    """Each message's body; the ones that cannot go are refused (and reported) at once."""
    bodies: list[tuple[OutgoingMessage, bytes]] = []
    refused: list[SendResult] = []
    for message in messages:
        body = _encode(account, message)
        if isinstance(body, Classified):
            refused.append(result_for(message, body))
        else:
            bodies.append((message, body))
    results.add(refused)
    return bodies


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
    chunks = list(_batches(_prepare(account, messages, results)))
    for index, chunk in enumerate(chunks):
        done, stop = _send_request(graph, settings, chunk)
        if stop is not None:  # the later requests never leave
            later = [m for c in chunks[index + 1 :] for m, _ in c]
            done += not_attempted(later, stop)
        results.add(done)
        if stop is not None:
            break
    return results.in_order(messages)


def _send_request(
    graph: GraphClient, settings: ExchangeSettings, chunk: list[tuple[OutgoingMessage, bytes]]
) -> tuple[list[SendResult], Classified | None]:
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
        found = classify_answer(answer, settings)
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
        return {message_id for message_id in ids if _in_folder(graph, folder, message_id)}

    def why_not(exc: Exception) -> str:
        return str(exc) if isinstance(exc, LookupRefused) else classify(exc, settings).text

    return look_up(messages, settings.mailbox, now, look, why_not)


def _in_folder(graph: GraphClient, folder: str, message_id: str) -> bool:
    """Whether a message with this internetMessageId is in the well-known ``folder``."""
    escaped = message_id.replace("'", "''")
    params = {"$filter": f"internetMessageId eq '{escaped}'", "$select": "id,internetMessageId"}
    response = graph.call(
        "GET", f"/users/{graph.user}/mailFolders/{folder}/messages", params=params
    )
    if response.status_code != 200:
        raise LookupRefused(lookup_refused(Answer.of(response)))
    return bool(response.json().get("value"))
