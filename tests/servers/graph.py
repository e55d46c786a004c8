"""A local HTTPS stand-in for the Microsoft Graph mail endpoints (``/v1.0``).

Why: Exchange Online blocks EWS from October 2026 and switches it off in April 2027, so
the ``exchange_mail`` plugin must also send through Graph ``sendMail``. Whether a CRM
mail then goes out once, twice or never depends on how the client reads Graph's
answers: a 202 without a body, 429 with Retry-After, per-item statuses inside
``$batch``, a connection cut after the send was accepted. Tests drive the real
``requests`` (with tokens that the real msal fetched from the Entra stand-in) against
this server over TLS. Clients use ``f"{server.base_url}/v1.0"`` (also ``graph_url``).

Endpoints and the app roles (``roles`` claim) each one needs:

* ``POST /users/{id|userPrincipalName}/sendMail``: ``Mail.Send``. JSON
  (``{"message": {...}, "saveToSentItems": true}``) or base64 MIME (``text/plain``).
  Success is ``202 Accepted`` with an empty body.
* ``GET /users/{id|upn}/mailFolders/{well-known name}/messages`` and
  ``GET /users/{id|upn}/messages``: ``Mail.Read``, ``Mail.ReadWrite``, ``Mail.ReadBasic``
  or ``Mail.ReadBasic.All``. ``$filter`` (``prop eq 'literal'``, joined by ``and``),
  ``$select``, ``$top``, ``$skip``; newest first; ``@odata.nextLink`` when more is left.
* ``GET /users/{id|upn}``: ``User.Read.All``, ``User.ReadBasic.All`` or ``Directory.*``;
  ``$select``. Without the role the answer is 403 ``Authorization_RequestDenied``.
* Large attachments [R: /graph/outlook-large-attachments]: ``POST /users/{u}/messages``
  (a draft, 201 with its ``id``), ``POST .../messages/{id}/attachments`` (a file under
  3 MB), ``POST .../messages/{id}/attachments/createUploadSession`` (``AttachmentItem``
  of 3 MB to 150 MB; 201 with an ``uploadUrl`` on this server, ``/upload/{token}``) and
  ``DELETE .../messages/{id}``: ``Mail.ReadWrite``. ``PUT {uploadUrl}`` takes the bytes
  in order, each range at most 4 MB with ``Content-Range: bytes a-b/size`` and *no*
  Authorization header (the URL is pre-authenticated); 200 with ``nextExpectedRanges``,
  and 201 with ``Location`` for the last range. ``POST .../messages/{id}/send``:
  ``Mail.Send``, 202; the draft is then delivered like a sendMail (its
  ``internetMessageId`` kept). ``upload_chunks`` records every PUT's size.
* ``POST /$batch``: at most 20 requests. Each gets its own status. The responses come
  back in *reverse* order by default (``reverse_batch_responses``), because Graph says
  they "might appear in a different order"; match them by ``id``.

Modelled behaviour. [R] means documented by Microsoft or reported in public issues.
[choice] means Microsoft documents nothing precise, so this is our pick. Clients must
branch on the HTTP status and ``error.code``, never on ``error.message``.

* Errors look like ``{"error": {"code", "message", "innerError": {"date", "request-id",
  "client-request-id"}}}``. Every answer has ``request-id``, and ``client-request-id``
  is echoed back. [R: /graph/errors]
* Auth (gateway) [R]. If the Authorization header is missing, the token is unknown or
  expired, or its audience is not Graph, the answer is 401 ``InvalidAuthenticationToken``
  ("Access token is empty.", "Access token has expired or is not yet valid.", "Access
  token validation failure. Invalid audience.") with ``WWW-Authenticate: Bearer``. A
  token without any ``roles`` (no admin consent) gets 401 ``NoPermissionsInAccessToken``
  (microsoft-graph-docs-contrib#6623), unless Exchange Online holds RBAC for
  Applications role assignments for the app (below): those apps get tokens without
  roles and are let through to Exchange [R: the Entra claim lists only Entra grants;
  maester365/maester#920; the 401 reports predate RBAC for Applications, so what an app
  with neither gets today is a choice]. For an unknown token that is not the expired
  case, the wording is a [choice].
* Mailbox resolution (Exchange) [R]. ``{id|upn}`` is the user's object id or its
  userPrincipalName, compared case-insensitively. A proxy address (alias) or a primary
  SMTP address that differs from the UPN is NOT a UPN. Those, unknown users, and users
  of another tenant than the token's all get 404 ``ErrorInvalidUser`` "The requested
  user '<x>' is invalid.". Client mocks and issue threads show 404 for this code, and
  InnoGE/laravel-msgraph-mail#16 reports it for a mail address that differs from the
  UPN. Exchange's REST code table maps ``ErrorInvalidUser`` to 400, so a client should
  treat 400 and 404 with this code alike. On the directory endpoint
  (``GET /users/{x}``), the same cases get 404 ``Request_ResourceNotFound``.
* Permissions [R]. A token without ``Mail.Send`` gets 403 ``ErrorAccessDenied`` "Access
  is denied. Check credentials and try again.", unless RBAC for Applications grants it
  for the mailbox. So does a mailbox an application access policy denies the app
  (``deny_mailboxes``). A ``from`` that is not the mailbox (or one of its aliases) gets
  403 ``ErrorSendAsDenied``.
* RBAC for Applications [R: learn.microsoft.com/exchange/permissions-exo/application-rbac;
  Test-ServicePrincipalAuthorization]. ``assign_app_role(client_id, "Mail.Send",
  scope)`` is ``New-ManagementRoleAssignment -App <client_id> -Role "Application
  Mail.Send" -CustomResourceScope <scope>``: the app may use the permission on the
  mailboxes of ``scope`` (every mailbox when ``scope`` is None), whatever its token
  says. The grant lives in Exchange, so the token carries nothing of it. A mailbox
  outside every scope of the permission gets the same 403 ``ErrorAccessDenied`` as a
  missing permission. Grants are additive: a ``Mail.Send`` in the token reaches every
  mailbox, whatever the scopes say.
* Message validation. If a to/cc/bcc address is not a plain SMTP address, or
  ``reject_recipients`` names it, the answer is 400 ``ErrorInvalidRecipients`` "At least
  one recipient isn't valid., Recipient '<a>' isn't resolved. ..." [R]. With no
  recipients the answer is the same code [R]. More than 500 recipients gets the same
  code [choice]: EXO may instead accept the mail and bounce it, so clients must split
  long lists themselves. ``body.contentType`` must be Text or HTML, case-insensitively;
  anything else gets 400 ``RequestBodyRead`` [R]. So do unknown message properties and
  an invalid base64 ``contentBytes`` [R, OData wording]. Each ``internetMessageHeaders``
  name must start with ``x-``/``X-``, else 400 ``InvalidInternetMessageHeader`` [R]. More
  than 5 headers gets 400 ``InvalidInternetMessageHeaderCollection`` [R], and so does an
  empty list (reported once) [choice: model it, since a client loses nothing by
  omitting the key]. ``internetMessageId`` is kept as given [R: "updatable only if
  isDraft", and a new message is a draft].
* Sizes. A request body over ``max_request_bytes`` (4 MiB) gets 400 ``BadRequest`` "The
  maximum request length supported is 4MB." [R: microsoft-graph-docs-contrib#3816].
  Pass ``request_too_large_status=413`` to test a 413 path instead. A message over
  ``max_message_bytes`` (35 MB by default; set it low in tests) gets 400
  ``ErrorMessageSizeExceeded`` [R]. Message size is the JSON (base64) size of
  ``message``, a stand-in for the MIME size.
* Throttling [R]. Per (app, mailbox) at most ``mailbox_concurrency`` (4) requests may
  run at once. The next one gets 429 ``ApplicationThrottled`` "Application is over its
  MailboxConcurrency limit." with ``Retry-After``. ``throttle(n)`` forces this for the
  next ``n`` mailbox requests (sendMail and message queries, in a batch too).
  ``http_503(n)`` is a gateway 503 ``serviceNotAvailable``.
* Ambiguity. ``drop_after_request(n)`` processes the request (a sendMail *delivers*),
  then closes the socket without answering. ``fail_after_processing(status)`` processes
  it and then answers 500, 502, 503 or 504 (for a whole request, or with
  ``in_batch=True`` for one item of a ``$batch``): Microsoft staff say such answers to
  sendMail "are not necessarily proofs the message wasn't delivered" [R: MS Q&A
  5629476; the error codes are a choice]. Exchange files a sent mail asynchronously
  [R]: it waits in the Outbox, then moves to Sent Items. ``sent_items_lag(seconds)``
  is when the Sent Items copy shows; until then the mail is in the Outbox, from
  ``outbox_lag(seconds)`` on (0: at once). A reconcile query that looks in Sent Items
  alone right after an unanswered send is falsely empty; one that looks before the
  Outbox copy shows finds nothing anywhere.
* ``$batch`` [R: /graph/json-batching]. ``requests`` is required. More than 20
  requests, duplicate ids (case-insensitive) and an unparsable payload get 400 for the
  whole batch; the wordings are [choice]. A write request without a body or
  Content-Type gets 400 "Write request id : <id> does not contain Content-Type header or
  body.". Inner URLs are relative to the version (``/users/...``). The outer token
  applies to all items, and an invalid outer token is a 401 for the whole batch
  [choice]. Without ``dependsOn``, up to 4 items run in parallel; each counts against
  the mailbox concurrency like a request of its own. With ``dependsOn``, items run in
  dependency order, and an item whose dependency failed gets 424.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from .clock import SYSTEM_CLOCK, Clock
from .entra import TokenInfo, TokenRegistry
from .ews import is_smtp_address
from .http_base import Headers, HttpsStandIn, Response
from .tls import TestCA

__all__ = [
    "GRAPH_AUDIENCE",
    "DeliveredMessage",
    "GraphRequestRecord",
    "GraphServer",
    "StoredAttachment",
    "StoredMessage",
]

GRAPH_AUDIENCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"  # Microsoft Graph's first-party app id

SEND_ROLE = "Mail.Send"
WRITE_MAIL_ROLES = frozenset({"Mail.ReadWrite"})
SEND_OPERATIONS = frozenset({"sendMail", "sendDraft", "$batch"})
MIN_UPLOAD_SESSION_BYTES = 3_000_000  # "3 MB"
MAX_UPLOAD_SESSION_BYTES = 150 * 1024 * 1024
MAX_UPLOAD_CHUNK_BYTES = 4 * 1024 * 1024
READ_MAIL_ROLES = frozenset({"Mail.Read", "Mail.ReadWrite", "Mail.ReadBasic", "Mail.ReadBasic.All"})
BASIC_MAIL_ROLES = frozenset({"Mail.ReadBasic", "Mail.ReadBasic.All"})
READ_USER_ROLES = frozenset(
    {
        "User.Read.All",
        "User.ReadBasic.All",
        "User.ReadWrite.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)

MAX_BATCH_REQUESTS = 20
BATCH_PARALLELISM = 4
MAX_RECIPIENTS = 500
MAX_CUSTOM_HEADERS = 5

#: Properties of microsoft.graph.message a client may send (anything else: RequestBodyRead).
_MESSAGE_PROPERTIES = frozenset(
    {
        "attachments",
        "bccRecipients",
        "body",
        "bodyPreview",
        "categories",
        "ccRecipients",
        "changeKey",
        "conversationId",
        "conversationIndex",
        "createdDateTime",
        "extensions",
        "flag",
        "from",
        "hasAttachments",
        "id",
        "importance",
        "inferenceClassification",
        "internetMessageHeaders",
        "internetMessageId",
        "isDeliveryReceiptRequested",
        "isDraft",
        "isRead",
        "isReadReceiptRequested",
        "lastModifiedDateTime",
        "multiValueExtendedProperties",
        "parentFolderId",
        "receivedDateTime",
        "replyTo",
        "sender",
        "sentDateTime",
        "singleValueExtendedProperties",
        "subject",
        "toRecipients",
        "uniqueBody",
        "webLink",
    }
)

#: Message properties returned without ``$select`` (internetMessageHeaders needs $select).
_DEFAULT_MESSAGE_FIELDS: tuple[str, ...] = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "body",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
)
_SELECTABLE_MESSAGE_FIELDS = frozenset({"id", "internetMessageHeaders", *_DEFAULT_MESSAGE_FIELDS})
_BASIC_HIDDEN_FIELDS = frozenset({"body", "bodyPreview", "internetMessageHeaders"})
_FILTERABLE_MESSAGE_FIELDS = {"internetmessageid": "internetMessageId", "subject": "subject"}

_DEFAULT_USER_FIELDS: tuple[str, ...] = (
    "businessPhones",
    "displayName",
    "givenName",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
    "id",
)
_SELECTABLE_USER_FIELDS = frozenset(
    {*_DEFAULT_USER_FIELDS, "proxyAddresses", "accountEnabled", "otherMails"}
)

#: Well-known folder names Graph accepts in ``mailFolders/{name}``.
_WELL_KNOWN_FOLDERS = ("inbox", "sentitems", "drafts", "deleteditems", "outbox", "junkemail")

#: fail_after_processing's answers: status -> (error.code, message). [choice] Graph's
#: codes for these are not documented; sendMail callers report these, among others.
_SERVER_ERRORS = {
    500: ("ErrorInternalServerError", "An internal server error occurred. The operation failed."),
    502: ("BadGateway", "The server received an invalid response from an upstream server."),
    503: ("ErrorServerBusy", "The server cannot service this request right now."),
    504: ("GatewayTimeout", "The upstream server did not answer in time."),
}

_JSON_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;"
    "charset=utf-8"
)
_ERROR_TYPE = "application/json"

_FILTER_TERM_RE = re.compile(r"\s*([A-Za-z]+)\s+eq\s+('(?:[^']|'')*'|true|false)\s*", re.I)
_FILTER_AND_RE = re.compile(r"and\b", re.I)
_TAG_RE = re.compile(r"<[^>]*>")

_MSG_ACCESS_DENIED = "Access is denied. Check credentials and try again."
_MSG_BAD_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and "
    "payload is of valid JSON format."
)
_MSG_THROTTLED = "Application is over its MailboxConcurrency limit."
_MSG_NOT_RESOLVED = (
    "At least one recipient isn't valid., Recipient '{}' isn't resolved. All recipients "
    "must be resolved before a message can be submitted."
)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _item_id() -> str:
    return "AAMkA" + base64.urlsafe_b64encode(secrets.token_bytes(102)).decode()


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StoredAttachment:
    """A file attachment as received (``contentBytes`` decoded)."""

    name: str
    content: bytes
    content_type: str = "application/octet-stream"
    is_inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class DeliveredMessage:
    """One message Graph accepted (202): what the recipients get.

    The field names match ``ews.DeliveredMessage``, so transport tests can share
    assertions.
    """

    mailbox: str  # the sending mailbox's primary SMTP address
    internet_message_id: str
    subject: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    text_body: str | None
    html_body: str | None
    attachments: tuple[tuple[str, bytes], ...]
    time: datetime
    sender: str
    headers: tuple[tuple[str, str], ...] = ()
    reply_to: tuple[str, ...] = ()
    client_id: str = ""
    saved_to_sent_items: bool = True
    importance: str = "normal"
    batch_item_id: str | None = None  # the inner ``id`` when the send came through $batch
    stored_attachments: tuple[StoredAttachment, ...] = ()


@dataclass
class StoredMessage:
    """A message in a mailbox folder (Sent Items copy, Inbox copy of a local recipient)."""

    id: str
    change_key: str
    folder: str
    internet_message_id: str
    conversation_id: str
    subject: str
    body: str
    body_type: str  # "text" or "html", as Graph returns it
    to: list[tuple[str | None, str]]
    cc: list[tuple[str | None, str]]
    bcc: list[tuple[str | None, str]]
    reply_to: list[tuple[str | None, str]]
    sender: str
    sender_name: str
    attachments: list[StoredAttachment]
    headers: list[tuple[str, str]]
    importance: str
    created: datetime
    visible_at: float  # epoch seconds: hidden from queries before (the lags)
    hidden_at: float = math.inf  # ... and from then on (an Outbox copy that moved on)


@dataclass(frozen=True)
class GraphRequestRecord:
    """One request seen by the stand-in; $batch items are recorded one by one too."""

    method: str
    path: str  # without the query string; for batch items, the item's url path
    query: str
    operation: str | None  # "sendMail", "listMessages", "getUser", "$batch", or None
    user: str | None  # the {id|userPrincipalName} segment, percent-decoded, verbatim
    client_id: str | None  # appid of the bearer token, once validated
    status: int  # what was answered, or what would have been if dropped
    error_code: str | None
    batch_id: str | None  # request-id of the enclosing $batch, for inner requests
    item_id: str | None  # the inner request's "id"
    dropped: bool
    time: float
    request_id: str = ""  # the ``request-id`` the answer carried


@dataclass
class _Mailbox:
    upn: str
    mail: str
    aliases: list[str]
    tenant_id: str | None
    user_id: str
    display_name: str
    folders: dict[str, list[StoredMessage]] = field(default_factory=dict)

    def addresses(self) -> set[str]:
        return {self.upn, self.mail, *self.aliases}


@dataclass
class _Faults:
    throttle: int = 0
    throttle_retry_after: int = 2
    http_503: int = 0
    retry_after_503: int | None = None
    drop: int = 0
    drop_only_sends: bool = True
    delay: float = 0.0
    sent_items_lag: float = 0.0
    outbox_lag: float = 0.0
    after_status: int = 0
    after: int = 0
    item_after_status: int = 0
    item_after: int = 0
    after_retry_after: int | None = None


@dataclass
class _Call:
    """What one (outer or inner) request is and what it got, for the request log."""

    request_id: str
    client_request_id: str
    token: TokenInfo | None = None
    operation: str | None = None
    user: str | None = None
    batch_id: str | None = None
    item_id: str | None = None
    answer: Response | None = None


@dataclass
class _Outgoing:
    """A parsed sendMail request, ready to deliver."""

    subject: str
    body: str
    body_type: str  # "text" | "html"
    to: list[tuple[str | None, str]]
    cc: list[tuple[str | None, str]]
    bcc: list[tuple[str | None, str]]
    reply_to: list[tuple[str | None, str]]
    attachments: list[StoredAttachment]
    headers: list[tuple[str, str]]
    internet_message_id: str | None
    sender: str
    importance: str
    save: bool
    size: int


@dataclass
class _Draft:
    """A message created with ``POST /users/{u}/messages``, not yet sent."""

    id: str
    mailbox: _Mailbox
    outgoing: _Outgoing


@dataclass
class _Upload:
    """An attachment upload session: its draft, the announced size, the bytes so far."""

    draft: _Draft
    name: str
    content_type: str
    size: int
    is_inline: bool
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _BatchItem:
    id: str
    method: str
    url: str
    headers: dict[str, str]
    body: Any
    depends_on: list[str]


class _GraphError(Exception):
    """Raised while processing a request to answer with Graph's error body."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------- server


class GraphServer(HttpsStandIn):
    """HTTPS stand-in for ``graph.microsoft.com`` (mail endpoints, v1.0, app-only)."""

    def __init__(
        self,
        ca: TestCA,
        registry: TokenRegistry,
        *,
        max_message_bytes: int = 35 * 1024 * 1024,
        max_request_bytes: int = 4 * 1024 * 1024,
        request_too_large_status: int = 400,
        mailbox_concurrency: int = 4,
        concurrency_retry_after: int = 1,
        accepted_audiences: Iterable[str] = (GRAPH_AUDIENCE, GRAPH_APP_ID),
        reverse_batch_responses: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(ca, clock=clock)
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.max_request_bytes = max_request_bytes
        self.request_too_large_status = request_too_large_status
        self.mailbox_concurrency = mailbox_concurrency
        self.concurrency_retry_after = concurrency_retry_after
        self.accepted_audiences = tuple(a.rstrip("/").lower() for a in accepted_audiences)
        self.reverse_batch_responses = reverse_batch_responses
        self._mailboxes: dict[str, _Mailbox] = {}
        self._delivered: list[DeliveredMessage] = []
        self._requests: list[GraphRequestRecord] = []
        self._ops: Counter[str] = Counter()
        self._send_requests = 0
        self._faults = _Faults()
        self._denied: set[str] = set()
        self._assignments: dict[str, dict[str, frozenset[str] | None]] = {}
        self._rejected_recipients: set[str] = set()
        self._active: dict[tuple[str, str], int] = {}
        self._peak_concurrency = 0
        self._drafts: dict[str, _Draft] = {}
        self._uploads: dict[str, _Upload] = {}
        self._upload_chunks: list[int] = []

    @property
    def graph_url(self) -> str:
        """``https://127.0.0.1:PORT/v1.0``: what a client uses as Graph root."""
        return f"{self.base_url}/v1.0"

    # directory -------------------------------------------------------------------

    def add_mailbox(
        self,
        address: str,
        aliases: Iterable[str] = (),
        *,
        tenant_id: str | None = None,
        display_name: str | None = None,
        user_principal_name: str | None = None,
        user_id: str | None = None,
    ) -> str:
        """Create a user with a mailbox; returns its object id.

        ``address`` is the primary SMTP address (``mail``) and, unless
        ``user_principal_name`` says otherwise, also the UPN. ``aliases`` are further
        proxy addresses: they receive mail but are not valid ``/users/{x}`` keys.
        ``tenant_id`` makes the user invisible to tokens of other tenants.
        """
        mail = address.strip().lower()
        mailbox = _Mailbox(
            upn=(user_principal_name or mail).strip().lower(),
            mail=mail,
            aliases=[a.strip().lower() for a in aliases],
            tenant_id=tenant_id.lower() if tenant_id else None,
            user_id=(user_id or str(uuid.uuid4())).lower(),
            display_name=display_name or mail.split("@")[0].title(),
            folders={name: [] for name in _WELL_KNOWN_FOLDERS},
        )
        with self._lock:
            self._mailboxes[mailbox.upn] = mailbox
        return mailbox.user_id

    def user_id(self, address: str) -> str:
        """The object id of the user owning ``address`` (UPN, mail or alias)."""
        mailbox = self._find_local(address)
        if mailbox is None:
            raise KeyError(address)
        return mailbox.user_id

    def deny_mailboxes(self, *addresses: str) -> None:
        """An application access policy: the app may not touch these mailboxes (403),
        whatever its token or role assignments grant.

        Replaces the previous set; call without arguments to allow all again.
        """
        with self._lock:
            self._denied = {a.strip().lower() for a in addresses}

    def assign_app_role(
        self, client_id: str, permission: str, scope: Iterable[str] | None = None
    ) -> None:
        """RBAC for Applications: ``New-ManagementRoleAssignment -App <client_id> -Role
        "Application <permission>" [-CustomResourceScope <scope>]``.

        ``scope`` lists the mailboxes (any of their addresses) the management scope
        takes in; None is the whole organisation. A second call for the same
        permission replaces the scope; ``scope=()`` takes every mailbox out of it.
        """
        mailboxes = None if scope is None else frozenset(a.strip().lower() for a in scope)
        with self._lock:
            self._assignments.setdefault(client_id.lower(), {})[permission] = mailboxes

    def remove_app_roles(self, client_id: str) -> None:
        """``Remove-ManagementRoleAssignment`` for every assignment of the app."""
        with self._lock:
            self._assignments.pop(client_id.lower(), None)

    def reject_recipients(self, *addresses: str) -> None:
        """Syntactically valid recipients Exchange will not resolve (400). Replaces the set."""
        with self._lock:
            self._rejected_recipients = {a.strip().lower() for a in addresses}

    # faults ----------------------------------------------------------------------

    def throttle(self, n: int = 1, retry_after: int = 2) -> None:
        """Next ``n`` mailbox requests: 429 ApplicationThrottled + ``Retry-After``."""
        with self._lock:
            self._faults.throttle = n
            self._faults.throttle_retry_after = retry_after

    def http_503(self, n: int = 1, retry_after: int | None = None) -> None:
        """Next ``n`` HTTP requests (``$batch`` included): 503 serviceNotAvailable."""
        with self._lock:
            self._faults.http_503 = n
            self._faults.retry_after_503 = retry_after

    def drop_after_request(self, n: int = 1, *, only_sends: bool = True) -> None:
        """Next ``n`` requests are processed (mail delivered!) but never answered.

        ``only_sends``: count only sendMail and ``$batch`` requests, so a mailbox check
        or reconcile query in between is answered normally.
        """
        with self._lock:
            self._faults.drop = n
            self._faults.drop_only_sends = only_sends

    def delay(self, seconds: float) -> None:
        """Every request sleeps ``seconds`` on the stand-in's clock (mailbox requests hold
        their concurrency slot meanwhile; a held ``FakeClock`` holds them until released)."""
        with self._lock:
            self._faults.delay = seconds

    def sent_items_lag(self, seconds: float) -> None:
        """Sent Items copies (and Inbox copies) appear in queries only ``seconds`` later on
        the stand-in's clock (with a ``FakeClock``: once the test advances it that far);
        meanwhile the mail waits in the sender's Outbox (see :meth:`outbox_lag`)."""
        with self._lock:
            self._faults.sent_items_lag = seconds

    def outbox_lag(self, seconds: float) -> None:
        """An accepted mail shows in the sender's Outbox only ``seconds`` after the 202
        (before that it is in no folder), and leaves it for Sent Items at the
        :meth:`sent_items_lag`; with this lag at least as long, it skips the Outbox."""
        with self._lock:
            self._faults.outbox_lag = seconds

    def fail_after_processing(
        self, status: int, n: int = 1, *, in_batch: bool = False, retry_after: int | None = None
    ) -> None:
        """Next ``n`` sendMail or ``$batch`` requests are processed (mail delivered!) and
        then answered with HTTP ``status`` (500, 502, 503 or 504) and Graph's error body.

        ``in_batch``: the next ``n`` sendMail *items of a $batch* instead; the batch
        itself is answered 200, with ``status`` for those items.
        """
        if status not in _SERVER_ERRORS:
            raise ValueError(f"not a server error: {status}")
        with self._lock:
            if in_batch:
                self._faults.item_after_status, self._faults.item_after = status, n
            else:
                self._faults.after_status, self._faults.after = status, n
            self._faults.after_retry_after = retry_after

    def clear_faults(self) -> None:
        """Drop every injected fault; mailboxes, deny and reject lists stay."""
        with self._lock:
            self._faults = _Faults()

    # observations ----------------------------------------------------------------

    @property
    def delivered(self) -> list[DeliveredMessage]:
        """Every accepted message, oldest first (a copy)."""
        with self._lock:
            return list(self._delivered)

    @property
    def requests(self) -> list[GraphRequestRecord]:
        """Every request, oldest first; $batch items are logged as they finish, before the batch."""
        with self._lock:
            return list(self._requests)

    @property
    def ops(self) -> Counter[str]:
        """Requests per operation (``sendMail``, ``listMessages``, ``getUser``, ``$batch``).

        Items inside a $batch count as their own operation, and the batch as ``$batch``.
        """
        with self._lock:
            return Counter(self._ops)

    @property
    def send_requests(self) -> int:
        """sendMail requests received (direct and in batches), whatever their outcome."""
        with self._lock:
            return self._send_requests

    @property
    def peak_mailbox_concurrency(self) -> int:
        """Most mailbox requests of one app that ever ran at once on one mailbox."""
        with self._lock:
            return self._peak_concurrency

    @property
    def upload_chunks(self) -> list[int]:
        """The size of every upload-session PUT received, in order (a copy)."""
        with self._lock:
            return list(self._upload_chunks)

    def drafts(self, address: str) -> list[str]:
        """Subjects of the mailbox's drafts not sent (nor deleted)."""
        wanted = address.strip().lower()
        with self._lock:
            return [
                d.outgoing.subject for d in self._drafts.values() if wanted in d.mailbox.addresses()
            ]

    def folder_items(self, address: str, folder: str = "sentitems") -> list[StoredMessage]:
        """Items in a mailbox's well-known folder, newest last (a copy): those there now or
        still to show up (lags ignored), not an Outbox copy that has moved on."""
        mailbox = self._find_local(address)
        if mailbox is None:
            raise KeyError(address)
        now = self.clock.time()
        with self._lock:
            return [i for i in mailbox.folders[folder.lower()] if i.hidden_at > now]

    def sent_items(self, address: str) -> list[StoredMessage]:
        return self.folder_items(address, "sentitems")

    # HTTP ------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        connection_state: dict[str, object],
    ) -> Response:
        request_id = str(uuid.uuid4())
        call = _Call(request_id, headers.get("client-request-id") or request_id)
        response = Response(500)
        try:
            response = self._handle(method, path, headers, body, call)
            return response
        finally:
            answer = call.answer or response
            self._record(method, path, call, answer, dropped=response.drop)

    def _handle(
        self, method: str, path: str, headers: Headers, body: bytes, call: _Call
    ) -> Response:
        with self._lock:
            faults = self._faults
            if faults.http_503 > 0:
                faults.http_503 -= 1
                retry = faults.retry_after_503
                extra = {"Retry-After": str(retry)} if retry is not None else {}
                return self._error(
                    503,
                    "serviceNotAvailable",
                    "The service is temporarily unavailable. Try the request again after a delay.",
                    call,
                    extra,
                )
        parts = urlsplit(path)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        if len(segments) == 2 and segments[0] == "upload":
            call.operation = "uploadChunk"
            return self._upload_chunk(method, segments[1], headers, body, call)
        if not segments or segments[0] != "v1.0":
            version = segments[0] if segments else ""
            return self._error(400, "BadRequest", f"Invalid version: {version}", call)
        rest = segments[1:]
        if rest and rest[0].lower() == "$batch":
            call.operation = "$batch"
            with self._lock:
                self._ops["$batch"] += 1
            if method != "POST":
                return self._method_not_allowed(call)
            if len(body) > self.max_request_bytes:
                return self._too_large(call)
            token = self._authenticate(headers, call)
            if isinstance(token, Response):
                return token
            call.token = token
            response = self._batch(headers, body, call)
        else:
            response = self._operation(method, rest, parts.query, headers, body, call)
        call.answer = response
        with self._lock:
            drop = faults.drop > 0 and (
                not faults.drop_only_sends or call.operation in SEND_OPERATIONS
            )
            if drop:
                faults.drop -= 1
            fail = faults.after_status if call.operation in SEND_OPERATIONS else 0
            if fail and faults.after > 0:
                faults.after -= 1
            else:
                fail = 0
        if drop:
            return Response(drop=True)
        if fail:
            call.answer = self._server_error(fail, call, faults.after_retry_after)
            return call.answer
        return response

    def _record(
        self, method: str, path: str, call: _Call, response: Response, *, dropped: bool
    ) -> None:
        parts = urlsplit(path)
        record = GraphRequestRecord(
            method=method,
            path=parts.path,
            query=unquote(parts.query),
            operation=call.operation,
            user=call.user,
            client_id=call.token.client_id if call.token else None,
            status=response.status,
            error_code=_error_code(response),
            batch_id=call.batch_id,
            item_id=call.item_id,
            dropped=dropped,
            time=self.clock.time(),
            request_id=call.request_id,
        )
        with self._lock:
            self._requests.append(record)

    # responses -------------------------------------------------------------------

    def _headers(self, call: _Call, cache: str = "private") -> dict[str, str]:
        diagnostic = {"ServerInfo": {"DataCenter": "Local", "Slice": "E", "Ring": "5"}}
        return {
            "Cache-Control": cache,
            "request-id": call.request_id,
            "client-request-id": call.client_request_id,
            "x-ms-ags-diagnostic": json.dumps(diagnostic, separators=(",", ":")),
            "Strict-Transport-Security": "max-age=31536000",
        }

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        call: _Call,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Graph's error body (OData error with innerError)."""
        payload = {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": _now().strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": call.request_id,
                    "client-request-id": call.client_request_id,
                },
            }
        }
        extra = self._headers(call, cache="no-cache")
        extra.update(headers or {})
        return Response(status, json.dumps(payload).encode(), _ERROR_TYPE, extra)

    def _from_exception(self, err: _GraphError, call: _Call) -> Response:
        return self._error(err.status, err.code, err.message, call, err.headers)

    def _json(self, status: int, payload: object, call: _Call) -> Response:
        return Response(status, json.dumps(payload).encode(), _JSON_TYPE, self._headers(call))

    def _method_not_allowed(self, call: _Call) -> Response:
        return self._error(
            405,
            "Request_BadRequest",
            "Specified HTTP method is not allowed for the request target.",
            call,
        )

    def _too_large(self, call: _Call) -> Response:
        status = self.request_too_large_status
        code = "BadRequest" if status == 400 else "RequestEntityTooLarge"
        return self._error(status, code, "The maximum request length supported is 4MB.", call)

    def _server_error(self, status: int, call: _Call, retry_after: int | None) -> Response:
        """A 5xx for a request that was processed all the same (fail_after_processing)."""
        code, message = _SERVER_ERRORS[status]
        extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return self._error(status, code, message, call, extra)

    def _throttled(self, call: _Call, retry_after: int) -> Response:
        return self._error(
            429, "ApplicationThrottled", _MSG_THROTTLED, call, {"Retry-After": str(retry_after)}
        )

    # auth ------------------------------------------------------------------------

    def _unauthorized(self, code: str, message: str, call: _Call) -> Response:
        challenge = (
            'Bearer realm="", '
            'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
            f'client_id="{GRAPH_APP_ID}"'
        )
        return self._error(401, code, message, call, {"WWW-Authenticate": challenge})

    def _authenticate(self, headers: Headers, call: _Call) -> TokenInfo | Response:
        scheme, _, credential = (headers.get("Authorization") or "").partition(" ")
        token = credential.strip()
        if scheme.lower() != "bearer" or not token:
            return self._unauthorized("InvalidAuthenticationToken", "Access token is empty.", call)
        if "." not in token:
            return self._unauthorized(
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed, there are no dots (.).\nThe token needs to be "
                "in JWS or JWE Compact Serialization Format.",
                call,
            )
        info = self.registry.validate(token)
        if info is None:
            expired = self.registry.lookup(token) is not None
            message = (
                "Access token has expired or is not yet valid."
                if expired
                else "Access token validation failure."
            )
            return self._unauthorized("InvalidAuthenticationToken", message, call)
        if info.audience.rstrip("/").lower() not in self.accepted_audiences:
            return self._unauthorized(
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
                call,
            )
        if not info.roles and not self._has_assignments(info.client_id):
            return self._unauthorized(
                "NoPermissionsInAccessToken",
                "The token contains no permissions, or permissions can not be understood.",
                call,
            )
        return info

    # routing ---------------------------------------------------------------------

    def _operation(
        self,
        method: str,
        segments: list[str],
        query: str,
        headers: Headers,
        body: bytes,
        call: _Call,
    ) -> Response:
        """Route one request below ``/v1.0`` (direct, or an item of a batch)."""
        routed = _route(segments, method)
        if isinstance(routed, _GraphError):
            return self._from_exception(routed, call)
        operation, allowed, folder = routed
        item = segments[3] if operation in _ITEM_OPERATIONS else None
        call.operation = operation
        call.user = segments[1] if operation != "me" else None
        allowed = allowed or method
        with self._lock:
            self._ops[operation] += 1
            if operation == "sendMail":
                self._send_requests += 1
        if len(body) > self.max_request_bytes:
            return self._too_large(call)
        if call.token is None:
            token = self._authenticate(headers, call)
            if isinstance(token, Response):
                return token
            call.token = token
        if operation == "me":
            return self._error(
                400,
                "BadRequest",
                "/me request is only valid with delegated authentication flow.",
                call,
            )
        if method != allowed:
            return self._method_not_allowed(call)
        params = {k.lower(): v for k, v in parse_qsl(query, keep_blank_values=True)}
        try:
            if operation == "sendMail":
                return self._send_mail(headers, body, call)
            if operation in _ITEM_OPERATIONS or operation == "createMessage":
                return self._draft_operation(operation, item, body, call)
            if operation == "listMessages":
                return self._list_messages(folder, params, call)
            return self._get_user(params, call)
        except _GraphError as err:
            return self._from_exception(err, call)

    # mailbox access --------------------------------------------------------------

    def _find_user(self, key: str, token: TokenInfo) -> _Mailbox | None:
        """``/users/{id|userPrincipalName}`` as Graph resolves it (no aliases)."""
        wanted = key.strip().lower()
        with self._lock:
            mailbox = self._mailboxes.get(wanted)
            if mailbox is None:
                mailbox = next((m for m in self._mailboxes.values() if m.user_id == wanted), None)
        if mailbox is None or (mailbox.tenant_id and mailbox.tenant_id != token.tenant_id):
            return None
        return mailbox

    def _find_local(self, address: str) -> _Mailbox | None:
        """The mailbox that receives mail for ``address`` (UPN, mail or alias)."""
        wanted = address.strip().lower()
        with self._lock:
            return next((m for m in self._mailboxes.values() if wanted in m.addresses()), None)

    def _has_assignments(self, client_id: str) -> bool:
        """Whether Exchange holds any RBAC for Applications role assignment for the app."""
        with self._lock:
            return bool(self._assignments.get(client_id.lower()))

    def _granted(self, token: TokenInfo, mailbox: _Mailbox) -> set[str]:
        """The permissions the app holds on this mailbox: the token's roles (tenant-wide),
        plus each RBAC role assignment whose scope takes the mailbox in."""
        with self._lock:
            assignments = dict(self._assignments.get(token.client_id.lower(), {}))
        addresses = mailbox.addresses()
        scoped = {
            permission
            for permission, scope in assignments.items()
            if scope is None or addresses & scope
        }
        return set(token.roles) | scoped

    def _mailbox_for(self, call: _Call, roles: Iterable[str]) -> _Mailbox:
        """Resolve the path's mailbox and check the app may use it for this operation."""
        token = call.token
        assert token is not None and call.user is not None
        mailbox = self._find_user(call.user, token)
        if mailbox is None:
            raise _GraphError(
                404, "ErrorInvalidUser", f"The requested user '{call.user}' is invalid."
            )
        if not self._granted(token, mailbox) & set(roles):
            raise _GraphError(403, "ErrorAccessDenied", _MSG_ACCESS_DENIED)
        with self._lock:
            denied = bool(mailbox.addresses() & self._denied)
        if denied:
            raise _GraphError(403, "ErrorAccessDenied", _MSG_ACCESS_DENIED)
        return mailbox

    def _admit(self, call: _Call, mailbox: _Mailbox) -> Response | None:
        """Take a MailboxConcurrency slot, or answer 429 (forced or over the limit)."""
        assert call.token is not None
        key = (call.token.client_id, mailbox.upn)
        with self._lock:
            if self._faults.throttle > 0:
                self._faults.throttle -= 1
                return self._throttled(call, self._faults.throttle_retry_after)
            active = self._active.get(key, 0)
            if self.mailbox_concurrency and active >= self.mailbox_concurrency:
                return self._throttled(call, self.concurrency_retry_after)
            self._active[key] = active + 1
            self._peak_concurrency = max(self._peak_concurrency, active + 1)
        return None

    def _release(self, call: _Call, mailbox: _Mailbox) -> None:
        assert call.token is not None
        key = (call.token.client_id, mailbox.upn)
        with self._lock:
            self._active[key] -= 1

    def _in_slot(self, call: _Call, mailbox: _Mailbox, work: Callable[[], Response]) -> Response:
        """Run ``work()`` inside a concurrency slot, after the injected delay."""
        refused = self._admit(call, mailbox)
        if refused is not None:
            return refused
        try:
            with self._lock:
                delay = self._faults.delay
            self.clock.sleep(delay)
            try:
                return work()
            except _GraphError as err:
                return self._from_exception(err, call)
        finally:
            self._release(call, mailbox)

    # sendMail --------------------------------------------------------------------

    def _send_mail(self, headers: Headers, body: bytes, call: _Call) -> Response:
        mailbox = self._mailbox_for(call, (SEND_ROLE,))

        def work() -> Response:
            content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type == "text/plain":
                outgoing = self._parse_mime(body, mailbox)
            else:
                if not body.strip():
                    raise _GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
                if content_type != "application/json":
                    raise _GraphError(400, "BadRequest", _MSG_BAD_JSON)
                try:
                    payload = json.loads(body)
                except ValueError:
                    raise _GraphError(400, "BadRequest", _MSG_BAD_JSON) from None
                outgoing = self._parse_json_send(payload, mailbox)
            self._check_recipients(outgoing)
            if outgoing.size > self.max_message_bytes:
                raise _GraphError(
                    400,
                    "ErrorMessageSizeExceeded",
                    "The message exceeds the maximum supported size., Cannot save changes made "
                    "to an item to store.",
                )
            self._deliver(mailbox, outgoing, call)
            return Response(202, b"", "text/plain", self._headers(call))

        return self._in_slot(call, mailbox, work)

    def _parse_json_send(self, payload: Any, mailbox: _Mailbox) -> _Outgoing:
        if not isinstance(payload, dict):
            raise _GraphError(400, "BadRequest", _MSG_BAD_JSON)
        for key in payload:
            if key not in ("message", "saveToSentItems") and not key.startswith("@"):
                raise _GraphError(
                    400,
                    "RequestBodyRead",
                    f"The parameter '{key}' in the request payload is not a valid parameter "
                    "for the operation 'sendMail'.",
                )
        save = _edm_boolean(payload.get("saveToSentItems", True))
        message = payload.get("message")
        if not isinstance(message, dict):
            # [choice] Graph's exact answer for a missing message parameter is undocumented.
            raise _GraphError(400, "ErrorInvalidParameter", "The 'message' parameter is required.")
        for key in message:
            if key not in _MESSAGE_PROPERTIES and not key.startswith("@"):
                raise _GraphError(
                    400,
                    "RequestBodyRead",
                    f"The property '{key}' does not exist on type 'microsoft.graph.message'. "
                    "Make sure to only use property names that are defined by the type or mark "
                    "the type as open type.",
                )
        body = message.get("body") or {}
        if not isinstance(body, dict):
            raise _GraphError(400, "RequestBodyRead", "The property 'body' is invalid.")
        body_type = _enum(body.get("contentType", "text"), ("text", "html"))
        content = body.get("content") or ""
        importance = _enum(message.get("importance", "normal"), ("low", "normal", "high"))
        subject = message.get("subject") or ""
        message_id = message.get("internetMessageId")
        if not isinstance(subject, str) or not isinstance(content, str):
            raise _GraphError(400, "RequestBodyRead", "A string value was expected.")
        if message_id is not None and not isinstance(message_id, str):
            raise _GraphError(400, "RequestBodyRead", "A string value was expected.")
        return _Outgoing(
            subject=subject,
            body=content,
            body_type=body_type,
            to=_recipients(message, "toRecipients"),
            cc=_recipients(message, "ccRecipients"),
            bcc=_recipients(message, "bccRecipients"),
            reply_to=_recipients(message, "replyTo"),
            attachments=_attachments(message.get("attachments")),
            headers=_custom_headers(message.get("internetMessageHeaders")),
            internet_message_id=message_id or None,
            sender=self._sender(message, mailbox),
            importance=importance,
            save=save,
            size=len(json.dumps(message)),
        )

    def _sender(self, message: dict[str, Any], mailbox: _Mailbox) -> str:
        """The ``from`` (or ``sender``) address: the mailbox itself or one of its aliases."""
        for key in ("from", "sender"):
            value = message.get(key)
            if value is None:
                continue
            [(_, address)] = _recipients({key: [value]}, key)
            if address.lower() not in mailbox.addresses():
                raise _GraphError(
                    403,
                    "ErrorSendAsDenied",
                    "The user account which was used to submit this request does not have the "
                    "right to send mail on behalf of the specified sending account., Cannot "
                    "submit message.",
                )
            return address.lower()
        return mailbox.mail

    def _parse_mime(self, body: bytes, mailbox: _Mailbox) -> _Outgoing:
        """sendMail with ``Content-Type: text/plain``: base64 of an RFC 5322 message."""
        try:
            raw = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw:
            raise _GraphError(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(msg, EmailMessage)

        def addresses(header: str) -> list[tuple[str | None, str]]:
            values = [str(v) for v in msg.get_all(header, [])]
            return [(n or None, a) for n, a in getaddresses(values)]

        text, body_type = "", "text"
        for subtype, kind in (("html", "html"), ("plain", "text")):
            part = msg.get_body(preferencelist=(subtype,))
            if isinstance(part, EmailMessage):
                text, body_type = str(part.get_content()), kind
                break
        attachments = []
        for part in msg.iter_attachments():
            if isinstance(part, EmailMessage):
                payload = part.get_content()
                attachments.append(
                    StoredAttachment(
                        name=part.get_filename() or "",
                        content=payload if isinstance(payload, bytes) else str(payload).encode(),
                        content_type=part.get_content_type(),
                    )
                )
        from_header = addresses("From")
        sender = from_header[0][1].lower() if from_header else mailbox.mail
        if sender not in mailbox.addresses():
            raise _GraphError(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the "
                "right to send mail on behalf of the specified sending account., Cannot "
                "submit message.",
            )
        return _Outgoing(
            subject=str(msg.get("Subject", "")),
            body=text,
            body_type=body_type,
            to=addresses("To"),
            cc=addresses("Cc"),
            bcc=addresses("Bcc"),
            reply_to=addresses("Reply-To"),
            attachments=attachments,
            headers=[(k, str(v)) for k, v in msg.items() if k.lower().startswith("x-")],
            internet_message_id=str(msg.get("Message-ID", "")).strip() or None,
            sender=sender,
            importance="normal",
            save=True,  # [R] "This method saves the message in the Sent Items folder."
            size=len(raw),
        )

    def _check_recipients(self, outgoing: _Outgoing) -> None:
        recipients = [a for _, a in outgoing.to + outgoing.cc + outgoing.bcc]
        if not recipients:
            raise _GraphError(
                400,
                "ErrorInvalidRecipients",
                "At least one recipient isn't valid., A message can't be sent because it "
                "contains no recipients.",
            )
        if len(recipients) > MAX_RECIPIENTS:
            raise _GraphError(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient isn't valid., The message has {len(recipients)} "
                f"recipients; at most {MAX_RECIPIENTS} are allowed.",
            )
        with self._lock:
            rejected = set(self._rejected_recipients)
        for address in recipients:
            if not is_smtp_address(address) or address.lower() in rejected:
                raise _GraphError(400, "ErrorInvalidRecipients", _MSG_NOT_RESOLVED.format(address))

    def _deliver(self, mailbox: _Mailbox, outgoing: _Outgoing, call: _Call) -> None:
        assert call.token is not None
        now = _now()
        message_id = outgoing.internet_message_id or (
            f"<{uuid.uuid4().hex.upper()}@{mailbox.mail.split('@')[-1]}.prod.outlook.com>"
        )
        html = outgoing.body if outgoing.body_type == "html" else None
        delivered = DeliveredMessage(
            mailbox=mailbox.mail,
            internet_message_id=message_id,
            subject=outgoing.subject,
            to=tuple(a for _, a in outgoing.to),
            cc=tuple(a for _, a in outgoing.cc),
            bcc=tuple(a for _, a in outgoing.bcc),
            text_body=None if html is not None else outgoing.body,
            html_body=html,
            attachments=tuple((a.name, a.content) for a in outgoing.attachments),
            time=now,
            sender=outgoing.sender,
            headers=tuple(outgoing.headers),
            reply_to=tuple(a for _, a in outgoing.reply_to),
            client_id=call.token.client_id,
            saved_to_sent_items=outgoing.save,
            importance=outgoing.importance,
            batch_item_id=call.item_id,
            stored_attachments=tuple(outgoing.attachments),
        )
        clock = self.clock.time()
        with self._lock:
            self._delivered.append(delivered)
            visible_at = clock + self._faults.sent_items_lag
            outbox_at = clock + self._faults.outbox_lag
        conversation = base64.b64encode(secrets.token_bytes(36)).decode()
        # (mailbox, folder, keep Bcc, shows from, gone from)
        targets: list[tuple[_Mailbox, str, bool, float, float]] = []
        if outbox_at < visible_at:  # waits in the Outbox until it moves to Sent Items
            targets.append((mailbox, "outbox", True, outbox_at, visible_at))
        if outgoing.save:
            targets.append((mailbox, "sentitems", True, visible_at, math.inf))
        for _, address in outgoing.to + outgoing.cc + outgoing.bcc:
            local = self._find_local(address)
            if local is not None:
                targets.append((local, "inbox", False, visible_at, math.inf))
        for owner, folder, keep_bcc, shows, gone in targets:
            item = StoredMessage(
                id=_item_id(),
                change_key="CQAAABYAAAA" + secrets.token_urlsafe(12),
                folder=folder,
                internet_message_id=message_id,
                conversation_id="AAQkA" + conversation,
                subject=outgoing.subject,
                body=outgoing.body,
                body_type=outgoing.body_type,
                to=list(outgoing.to),
                cc=list(outgoing.cc),
                bcc=list(outgoing.bcc) if keep_bcc else [],
                reply_to=list(outgoing.reply_to),
                sender=outgoing.sender,
                sender_name=mailbox.display_name,
                attachments=list(outgoing.attachments),
                headers=list(outgoing.headers),
                importance=outgoing.importance,
                created=now,
                visible_at=shows,
                hidden_at=gone,
            )
            with self._lock:
                owner.folders[folder].append(item)

    # drafts and upload sessions --------------------------------------------------

    def _draft_operation(
        self, operation: str, item: str | None, body: bytes, call: _Call
    ) -> Response:
        """Create, fill, send or delete a draft: the path for attachments over 3 MB [R:
        /graph/outlook-large-attachments]. Sending needs Mail.Send; the rest Mail.ReadWrite."""
        roles = (SEND_ROLE,) if operation == "sendDraft" else tuple(WRITE_MAIL_ROLES)
        mailbox = self._mailbox_for(call, roles)

        def work() -> Response:
            if operation == "createMessage":
                return self._create_draft(mailbox, body, call)
            with self._lock:
                draft = self._drafts.get(item or "")
            if draft is None or draft.mailbox is not mailbox:
                raise _GraphError(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store., The process failed to "
                    "get the correct properties.",
                )
            if operation == "deleteMessage":
                with self._lock:
                    self._drafts.pop(draft.id, None)
                return Response(204, b"", "text/plain", self._headers(call))
            if operation == "sendDraft":
                return self._send_draft(draft, call)
            payload = _json_object(body)
            if operation == "addAttachment":
                [attachment] = _attachments([payload])
                draft.outgoing.attachments.append(attachment)
                shown = {"id": _item_id(), "name": attachment.name, "size": len(attachment.content)}
                return self._json(201, shown, call)
            return self._create_upload_session(draft, payload, call)

        return self._in_slot(call, mailbox, work)

    def _create_draft(self, mailbox: _Mailbox, body: bytes, call: _Call) -> Response:
        outgoing = self._parse_json_send({"message": _json_object(body)}, mailbox)
        draft = _Draft(_item_id(), mailbox, outgoing)
        with self._lock:
            self._drafts[draft.id] = draft
        payload = {
            "id": draft.id,
            "isDraft": True,
            "subject": outgoing.subject,
            "internetMessageId": outgoing.internet_message_id,
        }
        return self._json(201, payload, call)

    def _create_upload_session(
        self, draft: _Draft, payload: dict[str, Any], call: _Call
    ) -> Response:
        item = payload.get("AttachmentItem")
        if not isinstance(item, dict) or str(item.get("attachmentType", "")).lower() != "file":
            raise _GraphError(400, "RequestBodyRead", "An AttachmentItem of type file is required.")
        size = item.get("size")
        if not isinstance(size, int) or size < MIN_UPLOAD_SESSION_BYTES:
            # [R] reported by SDK users: sessions are for 3 MB and more.
            raise _GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size should not be less than 3 MB.",
            )
        if size > MAX_UPLOAD_SESSION_BYTES:  # [choice] the code; the 150 MB limit is [R]
            raise _GraphError(
                400, "ErrorAttachmentSizeExceeded", "The attachment is larger than 150 MB."
            )
        token = secrets.token_urlsafe(24)
        upload = _Upload(
            draft,
            str(item.get("name") or ""),
            str(item.get("contentType") or "application/octet-stream"),
            size,
            bool(item.get("isInline", False)),
        )
        with self._lock:
            self._uploads[token] = upload
        answer = {
            "@odata.context": f"{self.graph_url}/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": f"{self.base_url}/upload/{token}",
            "expirationDateTime": _iso(_now()),
            "nextExpectedRanges": ["0-"],
        }
        return self._json(201, answer, call)

    def _upload_chunk(
        self, method: str, token: str, headers: Headers, body: bytes, call: _Call
    ) -> Response:
        """One PUT of a byte range to a pre-authenticated upload URL (no bearer token [R])."""
        with self._lock:
            upload = self._uploads.get(token)
            self._upload_chunks.append(len(body))
        if method != "PUT":
            return self._method_not_allowed(call)
        if upload is None:
            return self._error(404, "ErrorItemNotFound", "The upload session was not found.", call)
        if headers.get("Authorization"):  # [choice] the answer; "do not send it" is [R]
            return self._unauthorized(
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated; send no Authorization header.",
                call,
            )
        if len(body) > MAX_UPLOAD_CHUNK_BYTES:
            return self._too_large(call)
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("Content-Range") or "")
        start, end, total = (int(g) for g in match.groups()) if match else (-1, -1, -1)
        if (
            total != upload.size
            or start != len(upload.data)
            or end - start + 1 != len(body)
            or end >= total
        ):
            expected = {"nextExpectedRanges": [f"{len(upload.data)}-"]}
            return self._error(416, "InvalidRange", f"Expected {expected}.", call)  # [choice]
        upload.data.extend(body)
        if len(upload.data) < upload.size:
            answer = {
                "expirationDateTime": _iso(_now()),
                "nextExpectedRanges": [f"{len(upload.data)}-"],
            }
            return self._json(200, answer, call)
        attachment = StoredAttachment(
            upload.name, bytes(upload.data), upload.content_type, upload.is_inline
        )
        with self._lock:
            self._uploads.pop(token, None)
            upload.draft.outgoing.attachments.append(attachment)
        location = (
            f"{self.graph_url}/users/{upload.draft.mailbox.user_id}/messages/{upload.draft.id}"
        )
        extra = {**self._headers(call), "Location": f"{location}/attachments/{_item_id()}"}
        return Response(201, b"", "text/plain", extra)

    def _send_draft(self, draft: _Draft, call: _Call) -> Response:
        outgoing = draft.outgoing
        self._check_recipients(outgoing)
        size = outgoing.size + sum(len(a.content) * 4 // 3 for a in outgoing.attachments)
        if size > self.max_message_bytes:
            raise _GraphError(
                400,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size., Cannot save changes made "
                "to an item to store.",
            )
        with self._lock:
            self._drafts.pop(draft.id, None)
        self._deliver(draft.mailbox, outgoing, call)
        return Response(202, b"", "text/plain", self._headers(call))

    # queries ---------------------------------------------------------------------

    def _list_messages(self, folder: str | None, params: dict[str, str], call: _Call) -> Response:
        mailbox = self._mailbox_for(call, READ_MAIL_ROLES)
        assert call.token is not None
        granted = self._granted(call.token, mailbox)
        basic_only = not granted & (READ_MAIL_ROLES - BASIC_MAIL_ROLES)
        folder_key = folder.lower() if folder is not None else None
        if folder_key is not None and folder_key not in _WELL_KNOWN_FOLDERS:
            raise _GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        fields = _select(
            params.get("$select"), _SELECTABLE_MESSAGE_FIELDS, "microsoft.graph.message"
        )
        terms = _parse_filter(params["$filter"]) if params.get("$filter") else []
        top = _int_option(params, "$top", 10, 1, 1000)
        skip = _int_option(params, "$skip", 0, 0, 10**9)

        def work() -> Response:
            now = self.clock.time()
            with self._lock:
                names = [folder_key] if folder_key else list(_WELL_KNOWN_FOLDERS)
                items = [
                    item
                    for name in names
                    for item in mailbox.folders[name]
                    if item.visible_at <= now < item.hidden_at
                ]
            items = [i for i in items if all(_matches(i, p, v) for p, v in terms)]
            items.sort(key=lambda i: i.created, reverse=True)
            page = items[skip : skip + top]
            wanted = fields or list(_DEFAULT_MESSAGE_FIELDS)
            if basic_only:
                wanted = [f for f in wanted if f not in _BASIC_HIDDEN_FIELDS]
            user = quote(call.user or "", safe="@")
            where = f"mailFolders('{folder}')/messages" if folder else "messages"
            select = f"({','.join(fields)})" if fields else ""
            payload: dict[str, Any] = {
                "@odata.context": f"{self.graph_url}/$metadata#users('{user}')/{where}{select}",
                "value": [self._message_json(i, wanted) for i in page],
            }
            if skip + top < len(items):
                query = {k: v for k, v in params.items() if k in ("$filter", "$select")}
                query.update({"$top": str(top), "$skip": str(skip + top)})
                base = f"mailFolders/{folder}/messages" if folder else "messages"
                payload["@odata.nextLink"] = (
                    f"{self.graph_url}/users/{user}/{base}?{urlencode(query, quote_via=quote)}"
                )
            return self._json(200, payload, call)

        return self._in_slot(call, mailbox, work)

    def _message_json(self, item: StoredMessage, fields: Iterable[str]) -> dict[str, Any]:
        def people(values: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
            return [{"emailAddress": {"name": n or a, "address": a}} for n, a in values]

        sender = {"emailAddress": {"name": item.sender_name, "address": item.sender}}
        stamp = _iso(item.created)
        text = _TAG_RE.sub("", item.body) if item.body_type == "html" else item.body
        values: dict[str, Any] = {
            "createdDateTime": stamp,
            "lastModifiedDateTime": stamp,
            "changeKey": item.change_key,
            "categories": [],
            "receivedDateTime": stamp,
            "sentDateTime": stamp,
            "hasAttachments": any(not a.is_inline for a in item.attachments),
            "internetMessageId": item.internet_message_id,
            "subject": item.subject,
            "bodyPreview": " ".join(text.split())[:255],
            "importance": item.importance,
            "parentFolderId": f"AQMkA{item.folder}",
            "conversationId": item.conversation_id,
            "isDeliveryReceiptRequested": False,
            "isReadReceiptRequested": False,
            "isRead": item.folder != "inbox",
            "isDraft": False,
            "webLink": (
                f"https://outlook.office365.com/owa/?ItemID={quote(item.id, safe='')}"
                "&exvsurl=1&viewmodel=ReadMessageItem"
            ),
            "body": {"contentType": item.body_type, "content": item.body},
            "sender": sender,
            "from": sender,
            "toRecipients": people(item.to),
            "ccRecipients": people(item.cc),
            "bccRecipients": people(item.bcc),
            "replyTo": people(item.reply_to),
            "internetMessageHeaders": [{"name": n, "value": v} for n, v in item.headers],
        }
        out: dict[str, Any] = {"@odata.etag": f'W/"{item.change_key}"', "id": item.id}
        for name in fields:
            if name in values:
                out[name] = values[name]
        return out

    def _get_user(self, params: dict[str, str], call: _Call) -> Response:
        token = call.token
        assert token is not None and call.user is not None
        if not set(token.roles) & READ_USER_ROLES:
            raise _GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )
        fields = _select(
            params.get("$select"),
            _SELECTABLE_USER_FIELDS,
            "Microsoft.DirectoryServices.User",
            code="Request_BadRequest",
        )
        mailbox = self._find_user(call.user, token)
        if mailbox is None:
            raise _GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{call.user}' does not exist or one of its queried "
                "reference-property objects are not present.",
            )
        with self._lock:
            delay = self._faults.delay
        self.clock.sleep(delay)
        given, _, _ = mailbox.display_name.partition(" ")
        values: dict[str, Any] = {
            "businessPhones": [],
            "displayName": mailbox.display_name,
            "givenName": given,
            "jobTitle": None,
            "mail": mailbox.mail,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": None,
            "surname": None,
            "userPrincipalName": mailbox.upn,
            "id": mailbox.user_id,
            "proxyAddresses": [f"SMTP:{mailbox.mail}"] + [f"smtp:{a}" for a in mailbox.aliases],
            "accountEnabled": True,
            "otherMails": [],
        }
        select = f"({','.join(fields)})" if fields else ""
        payload: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#users{select}/$entity"
        }
        for name in fields or _DEFAULT_USER_FIELDS:
            payload[name] = values[name]
        return self._json(200, payload, call)

    # $batch ----------------------------------------------------------------------

    def _batch(self, headers: Headers, body: bytes, call: _Call) -> Response:
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if content_type != "application/json":
                raise ValueError(content_type)
            payload = json.loads(body)
        except ValueError:
            return self._error(400, "BadRequest", _MSG_BAD_JSON, call)
        try:
            items = _batch_items(payload)
            order = _batch_order(items)
        except _GraphError as err:
            return self._from_exception(err, call)
        results: dict[str, dict[str, Any]] = {}
        if any(item.depends_on for item in items):
            for item in order:
                failed = [d for d in item.depends_on if results[d.lower()]["status"] >= 400]
                results[item.id.lower()] = (
                    self._failed_dependency(item, call) if failed else self._batch_item(item, call)
                )
        else:
            with ThreadPoolExecutor(max_workers=BATCH_PARALLELISM) as pool:
                answers = list(pool.map(lambda item: self._batch_item(item, call), items))
            results = {item.id.lower(): answer for item, answer in zip(items, answers, strict=True)}
        responses = [results[item.id.lower()] for item in items]
        if self.reverse_batch_responses:
            responses.reverse()
        return Response(
            200,
            json.dumps({"responses": responses}).encode(),
            "application/json; charset=utf-8",
            self._headers(call, cache="no-cache"),
        )

    def _batch_item(self, item: _BatchItem, outer: _Call) -> dict[str, Any]:
        sub_id = str(uuid.uuid4())
        sub = _Call(
            request_id=sub_id,
            client_request_id=outer.client_request_id,
            token=outer.token,
            batch_id=outer.request_id,
            item_id=item.id,
        )
        parts = urlsplit(item.url)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        headers = Message()
        for name, value in item.headers.items():
            headers[name] = value
        if item.body is None:
            data = b""
        elif isinstance(item.body, str):
            data = item.body.encode()
        else:
            data = json.dumps(item.body).encode()
        response = self._operation(item.method.upper(), segments, parts.query, headers, data, sub)
        with self._lock:
            faults = self._faults
            fail = faults.item_after_status if sub.operation == "sendMail" else 0
            if fail and faults.item_after > 0:
                faults.item_after -= 1
            else:
                fail = 0
        if fail:  # processed, then answered with a server error all the same
            response = self._server_error(fail, sub, faults.after_retry_after)
        self._record(item.method.upper(), item.url, sub, response, dropped=False)
        return _inner_response(item.id, response)

    def _failed_dependency(self, item: _BatchItem, outer: _Call) -> dict[str, Any]:
        sub = _Call(
            request_id=str(uuid.uuid4()),
            client_request_id=outer.client_request_id,
            token=outer.token,
            batch_id=outer.request_id,
            item_id=item.id,
        )
        response = self._error(
            424,
            "FailedDependency",
            "The request failed because a request it depends on failed.",
            sub,
        )
        self._record(item.method.upper(), item.url, sub, response, dropped=False)
        return _inner_response(item.id, response)


# --------------------------------------------------------------------------- helpers


_ITEM_OPERATIONS = frozenset({"deleteMessage", "sendDraft", "addAttachment", "createUploadSession"})
"""Operations on one message of a mailbox (``/users/{u}/messages/{id}/...``)."""


def _route(segments: list[str], method: str) -> tuple[str, str | None, str | None] | _GraphError:
    """(operation, allowed method or None for any, folder) for a path below ``/v1.0``."""
    low = [s.lower() for s in segments]
    not_modelled = _GraphError(
        501, "notSupported", f"The Graph stand-in does not implement /{'/'.join(segments)}."
    )
    bad: str | None = None
    if not low:
        bad = ""
    elif low[0] == "me":
        return "me", None, None
    elif low[0] != "users":
        bad = segments[0]
    elif len(low) == 1:
        return not_modelled
    elif len(low) == 2:
        return "getUser", "GET", None
    elif low[2] == "sendmail":
        if len(low) == 3:
            return "sendMail", "POST", None
        bad = segments[3]
    elif low[2] == "messages":
        return _message_route(low, method) or not_modelled
    elif low[2] == "mailfolders":
        if len(low) == 5 and low[4] == "messages":
            return "listMessages", "GET", segments[3]
        if len(low) < 5 or low[4] in ("childfolders", "messages"):
            return not_modelled
        bad = segments[4]
    else:
        bad = segments[2]
    return _GraphError(400, "BadRequest", f"Resource not found for the segment '{bad}'.")


def _message_route(low: list[str], method: str) -> tuple[str, str | None, str | None] | None:
    """``/users/{u}/messages[/{id}[/send | /attachments[/createUploadSession]]]``."""
    tail = tuple(low[4:])
    if len(low) == 3:
        return (
            ("createMessage", "POST", None) if method == "POST" else ("listMessages", "GET", None)
        )
    if tail == () and method == "DELETE":
        return "deleteMessage", "DELETE", None
    named = {
        ("send",): "sendDraft",
        ("attachments",): "addAttachment",
        ("attachments", "createuploadsession"): "createUploadSession",
    }
    return (named[tail], "POST", None) if tail in named else None


def _json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object."""
    try:
        payload = json.loads(body) if body.strip() else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise _GraphError(400, "BadRequest", _MSG_BAD_JSON)
    return payload


def _error_code(response: Response) -> str | None:
    if response.status < 400 or not response.body:
        return None
    try:
        error = json.loads(response.body).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error.get("code")) if isinstance(error, dict) else None


def _edm_boolean(value: Any) -> bool:
    """OData Edm.Boolean: JSON booleans, and (as Graph's own doc sample sends) "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _GraphError(
        400,
        "RequestBodyRead",
        f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean'.",
    )


def _enum(value: Any, allowed: tuple[str, ...]) -> str:
    """A Graph enum member, case-insensitive (``HTML``, ``html``)."""
    if isinstance(value, str) and value.lower() in allowed:
        return value.lower()
    raise _GraphError(400, "RequestBodyRead", f"Requested value '{value}' was not found.")


def _recipients(message: Mapping[str, Any], key: str) -> list[tuple[str | None, str]]:
    value = message.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _GraphError(
            400,
            "RequestBodyRead",
            f"An unexpected 'StartObject' node was found for property named '{key}' when "
            "reading from the JSON reader. A 'StartArray' node was expected.",
        )
    out: list[tuple[str | None, str]] = []
    for entry in value:
        email = entry.get("emailAddress") if isinstance(entry, dict) else None
        if not isinstance(email, dict):
            raise _GraphError(
                400, "RequestBodyRead", f"Invalid recipient in property '{key}': emailAddress."
            )
        name, address = email.get("name"), email.get("address")
        out.append(
            (name if isinstance(name, str) else None, address if isinstance(address, str) else "")
        )
    return out


def _decode_binary(value: str) -> bytes:
    """Edm.Binary: standard base64 (what every SDK sends) or base64url (the OData form)."""
    compact = "".join(value.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        pass
    if re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", compact):
        try:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            pass
    shown = compact[:32] + ("..." if len(compact) > 32 else "")
    raise _GraphError(
        400,
        "RequestBodyRead",
        f"Cannot convert the literal '{shown}' to the expected type 'Edm.Binary'.",
    )


def _attachments(value: Any) -> list[StoredAttachment]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _GraphError(
            400, "RequestBodyRead", "A 'StartArray' node was expected for 'attachments'."
        )
    out = []
    for att in value:
        if not isinstance(att, dict) or not att.get("@odata.type"):
            # [choice] attachment is abstract: Graph needs the concrete @odata.type.
            raise _GraphError(400, "RequestBodyRead", "Cannot create an abstract class.")
        kind = str(att["@odata.type"]).lstrip("#").lower()
        if kind != "microsoft.graph.fileattachment":
            raise _GraphError(
                400,
                "BadRequest",
                f"The Graph stand-in implements only #microsoft.graph.fileAttachment, not {kind}.",
            )
        content = att.get("contentBytes")
        out.append(
            StoredAttachment(
                name=str(att.get("name") or ""),
                content=_decode_binary(content) if isinstance(content, str) else b"",
                content_type=str(att.get("contentType") or "application/octet-stream"),
                is_inline=bool(att.get("isInline", False)),
                content_id=att.get("contentId"),
            )
        )
    return out


def _custom_headers(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _GraphError(
            400, "RequestBodyRead", "A 'StartArray' node was expected for 'internetMessageHeaders'."
        )
    if not value:
        raise _GraphError(
            400,
            "InvalidInternetMessageHeaderCollection",
            "The internet message header collection must contain at least one header.",
        )
    if len(value) > MAX_CUSTOM_HEADERS:
        raise _GraphError(
            400,
            "InvalidInternetMessageHeaderCollection",
            "Maximum number of headers in one message should be less than or equal to 5.",
        )
    out = []
    for header in value:
        name = header.get("name") if isinstance(header, dict) else None
        header_value = header.get("value") if isinstance(header, dict) else None
        if not isinstance(name, str) or not name.lower().startswith("x-"):
            raise _GraphError(
                400,
                "InvalidInternetMessageHeader",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )
        out.append((name, str(header_value if header_value is not None else "")))
    return out


def _select(
    value: str | None, allowed: frozenset[str], type_name: str, code: str = "BadRequest"
) -> list[str]:
    """``$select`` names, as given (an unknown one is a 400)."""
    if not value:
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    lookup = {a.lower(): a for a in allowed}
    out = []
    for name in names:
        if name.lower() not in lookup:
            raise _GraphError(
                400, code, f"Could not find a property named '{name}' on type '{type_name}'."
            )
        out.append(lookup[name.lower()])
    return out


def _int_option(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        # [choice] wording; Graph answers 400 for an invalid $top/$skip.
        raise _GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option '{name}'.")
    return value


def _parse_filter(text: str) -> list[tuple[str, str | bool]]:
    """``prop eq 'literal' [and ...]``: the subset a reconcile query needs."""
    terms: list[tuple[str, str | bool]] = []
    pos = 0
    while True:
        match = _FILTER_TERM_RE.match(text, pos)
        if match is None:
            raise _GraphError(400, "BadRequest", f"Invalid filter clause: {text}")  # [choice]
        prop, literal = match.group(1), match.group(2)
        canonical = _FILTERABLE_MESSAGE_FIELDS.get(prop.lower())
        if canonical is None:
            raise _GraphError(
                400,
                "BadRequest",
                f"Could not find a property named '{prop}' on type 'microsoft.graph.message'.",
            )
        value: str | bool = (
            literal[1:-1].replace("''", "'")
            if literal.startswith("'")
            else literal.lower() == "true"
        )
        terms.append((canonical, value))
        pos = match.end()
        if pos == len(text):
            return terms
        conjunction = _FILTER_AND_RE.match(text, pos)
        if conjunction is None:
            raise _GraphError(400, "BadRequest", f"Invalid filter clause: {text}")
        pos = conjunction.end()


def _matches(item: StoredMessage, prop: str, value: str | bool) -> bool:
    """Exchange string restrictions compare case-insensitively."""
    actual = item.internet_message_id if prop == "internetMessageId" else item.subject
    return isinstance(value, str) and actual.lower() == value.lower()


def _batch_items(payload: Any) -> list[_BatchItem]:
    requests = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(requests, list) or not requests:
        raise _GraphError(400, "BadRequest", "Invalid batch payload format.")  # [choice]
    if len(requests) > MAX_BATCH_REQUESTS:
        raise _GraphError(  # [choice] wording; the limit of 20 is documented
            400,
            "BadRequest",
            f"The batch contains {len(requests)} requests; the limit is {MAX_BATCH_REQUESTS}.",
        )
    items: list[_BatchItem] = []
    seen: set[str] = set()
    for raw in requests:
        if not isinstance(raw, dict):
            raise _GraphError(400, "BadRequest", "Invalid batch payload format.")
        item_id, method, url = raw.get("id"), raw.get("method"), raw.get("url")
        if not all(isinstance(v, str) and v for v in (item_id, method, url)):
            raise _GraphError(400, "BadRequest", "Invalid batch payload format.")
        assert isinstance(item_id, str) and isinstance(method, str) and isinstance(url, str)
        if item_id.lower() in seen:
            raise _GraphError(  # [choice] wording; the 400 is documented
                400, "BadRequest", f"Batch request id '{item_id}' is not unique in the batch."
            )
        seen.add(item_id.lower())
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict):
            raise _GraphError(400, "BadRequest", "Invalid batch payload format.")
        headers = {str(k): str(v) for k, v in headers.items()}
        has_type = any(k.lower() == "content-type" for k in headers)
        if method.upper() in ("POST", "PUT", "PATCH") and (raw.get("body") is None or not has_type):
            raise _GraphError(
                400,
                "BadRequest",
                f"Write request id : {item_id} does not contain Content-Type header or body.",
            )
        depends = raw.get("dependsOn") or []
        if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            raise _GraphError(400, "BadRequest", "Invalid batch payload format.")
        items.append(_BatchItem(item_id, method, url, headers, raw.get("body"), list(depends)))
    return items


def _batch_order(items: list[_BatchItem]) -> list[_BatchItem]:
    """Items in an order that honours ``dependsOn`` (Kahn); unknown ids or cycles: 400."""
    by_id = {item.id.lower(): item for item in items}
    for item in items:
        for dep in item.depends_on:
            if dep.lower() not in by_id:
                raise _GraphError(  # [choice] wording
                    400, "BadRequest", f"Request '{item.id}' depends on unknown request '{dep}'."
                )
    done: set[str] = set()
    order: list[_BatchItem] = []
    while len(order) < len(items):
        ready = [
            item
            for item in items
            if item.id.lower() not in done and all(d.lower() in done for d in item.depends_on)
        ]
        if not ready:
            raise _GraphError(400, "BadRequest", "The dependsOn graph of the batch has a cycle.")
        for item in ready:
            done.add(item.id.lower())
            order.append(item)
    return order


def _inner_response(item_id: str, response: Response) -> dict[str, Any]:
    """One entry of ``responses``: id, status, a few headers, body (omitted when empty)."""
    headers = {"Cache-Control": response.headers.get("Cache-Control", "private")}
    if response.body:
        headers["Content-Type"] = response.content_type
    if "Retry-After" in response.headers:
        headers["Retry-After"] = response.headers["Retry-After"]
    entry: dict[str, Any] = {"id": item_id, "status": response.status, "headers": headers}
    if response.body:
        entry["body"] = json.loads(response.body)
    return entry
