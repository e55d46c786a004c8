"""A local HTTPS stand-in for Exchange Web Services (``/EWS/Exchange.asmx``).

Why: the ``exchange_mail`` transport uses exchangelib, whose behaviour on errors,
throttling and dropped connections decides whether a CRM mail is sent once, twice
or never. Tests drive the real exchangelib against this server over TLS, so the
SOAP requests, the HTTP status codes and the fault/response-message shapes are
the ones exchangelib really sends and parses.

Authentication, as modelled (Exchange Online documents little of this; choices are
marked [choice]):

* ``Authorization: Bearer <token>``, looked up in the shared ``TokenRegistry``.
  Missing, unknown, revoked or expired token -> HTTP 401 with a
  ``WWW-Authenticate: Bearer ...`` header and an ``x-ms-diagnostics`` header.
  Audience other than ``accepted_audiences`` -> 401 (2000003).
  Token without any ``roles`` claim (admin consent missing) -> 401 with
  ``2000008;reason="The token contains no permissions, or permissions can not be
  understood."`` (the header EXO sends, seen in otris/ews-cpp#148).
  Token with roles, but none of ``ews_roles`` (e.g. only Exchange's Mail.Send or
  Calendars.ReadWrite.All) -> HTTP 403 with an empty body, the same status as EWS
  blocked for the tenant: a client can tell the two apart only by the token's roles
  [choice, after users' reports of 403 for app tokens without full_access_as_app].
  Token tenant differs from the mailbox's tenant -> ``ErrorNonExistentMailbox``.
* App-only (Bearer) requests must carry ``ExchangeImpersonation/ConnectingSID``
  (``PrimarySmtpAddress`` or ``SmtpAddress``); without it the fault is
  ``ErrorInvalidExchangeImpersonationHeaderData`` "ExchangeImpersonation SOAP header
  must be present for this type of OAuth token." (the code EXO uses for the "must not
  exist" twin of this message, OfficeDev/ews-managed-api#212) [choice for the code].
  The address must be a mailbox's PRIMARY address: an alias or an unknown address ->
  fault ``ErrorNonExistentMailbox``. ``deny_impersonation_for`` -> fault
  ``ErrorImpersonateUserDenied``.
* On-prem: a mailbox with a ``password`` accepts HTTP Basic as the primary address,
  ``DOMAIN\\logon`` or ``logon``. Without impersonation the request acts on the
  authenticated user's mailbox; with it, the user must be in ``impersonators``.
  NTLM (and Negotiate carrying NTLM) works too after ``write_ntlm_user_file()``, via
  pyspnego's acceptor; like IIS, a completed handshake authenticates the connection.

Faults (all settable at run time, thread-safe): ``server_busy``, ``http_503``,
``ews_disabled``, ``drop_after_request``, ``fail_after_processing`` (the mail goes, the
answer is a 500/502/503/504 error page, as from IIS or a proxy in front of it),
``delay``; per-message errors for invalid recipients, ``max_message_bytes`` and
``invalid_smtp_addresses``.

Filing [R: Exchange submits asynchronously]: a sent mail waits in the Outbox, then
moves to Sent Items. ``sent_items_lag`` is when the Sent Items copy shows in FindItem;
until then the mail is in the Outbox, from ``outbox_lag`` on (0: at once). Both are
measured on the stand-in's clock and default to 0 (filed at once, never seen in the
Outbox). Every answer carries a ``request-id`` header, as Exchange's do.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from pathlib import Path

from lxml import etree  # type: ignore[import-untyped]

from .clock import SYSTEM_CLOCK, Clock
from .entra import TokenInfo, TokenRegistry
from .http_base import Headers, HttpsStandIn, Response
from .tls import TestCA

__all__ = [
    "EWS_PATH",
    "DeliveredMessage",
    "EwsRequestRecord",
    "EwsServer",
    "StoredAttachment",
    "StoredItem",
]

EWS_PATH = "/EWS/Exchange.asmx"

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
M_NS = "http://schemas.microsoft.com/exchange/services/2006/messages"
T_NS = "http://schemas.microsoft.com/exchange/services/2006/types"
E_NS = "http://schemas.microsoft.com/exchange/services/2006/errors"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
XSD_NS = "http://www.w3.org/2001/XMLSchema"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)

#: Folders every mailbox has: distinguished id -> (display name, folder class, parent).
_STANDARD_FOLDERS: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("root", "", None, None),
    ("msgfolderroot", "Top of Information Store", "IPF.Note", "root"),
    ("inbox", "Inbox", "IPF.Note", "msgfolderroot"),
    ("outbox", "Outbox", "IPF.Note", "msgfolderroot"),
    ("sentitems", "Sent Items", "IPF.Note", "msgfolderroot"),
    ("drafts", "Drafts", "IPF.Note", "msgfolderroot"),
    ("deleteditems", "Deleted Items", "IPF.Note", "msgfolderroot"),
    ("junkemail", "Junk Email", "IPF.Note", "msgfolderroot"),
)

_LABEL = r"[^\W_](?:[\w-]*[^\W_])?"
_SMTP_RE = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@" + _LABEL + r"(?:\." + _LABEL + r")+$")

_EXO_CLIENT_ID = "00000002-0000-0ff1-ce00-000000000000"


def _t(name: str) -> str:
    return f"{{{T_NS}}}{name}"


def _m(name: str) -> str:
    return f"{{{M_NS}}}{name}"


def _new_id(prefix: str) -> str:
    return base64.b64encode(prefix.encode() + b"\0" + secrets.token_bytes(24)).decode()


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_smtp_address(address: str) -> bool:
    """Roughly what Exchange accepts as a resolvable one-off SMTP recipient."""
    return bool(_SMTP_RE.match(address))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StoredAttachment:
    """A file attachment as received (content decoded from base64)."""

    name: str
    content: bytes
    content_type: str = "application/octet-stream"
    is_inline: bool = False
    content_id: str | None = None
    attachment_id: str = field(default_factory=lambda: _new_id("att"))


@dataclass(frozen=True)
class DeliveredMessage:
    """One message handed to transport: this is what the recipients received."""

    mailbox: str
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


@dataclass
class StoredItem:
    """A message stored in a mailbox folder (Sent Items copy, draft, inbox copy)."""

    item_id: str
    change_key: str
    folder_id: str
    internet_message_id: str
    subject: str
    body: str | None
    body_type: str
    to: list[tuple[str | None, str]]
    cc: list[tuple[str | None, str]]
    bcc: list[tuple[str | None, str]]
    sender: str
    attachments: list[StoredAttachment]
    created: datetime
    sent: datetime | None
    size: int
    is_draft: bool
    headers: list[tuple[str, str]] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    visible_from: float = 0.0  # the stand-in's clock: FindItem shows it from then ...
    visible_until: float = math.inf  # ... until then (an Outbox copy that moved on)


@dataclass
class _Folder:
    folder_id: str
    change_key: str
    distinguished: str | None
    display_name: str
    folder_class: str | None
    parent_id: str | None
    mailbox: str
    items: list[StoredItem] = field(default_factory=list)


@dataclass
class _Mailbox:
    primary: str
    aliases: list[str]
    password: str | None
    logon_name: str
    tenant_id: str | None
    display_name: str
    folders: dict[str, _Folder] = field(default_factory=dict)  # distinguished id -> folder


@dataclass(frozen=True)
class EwsRequestRecord:
    """One POST seen at the EWS endpoint."""

    operation: str | None
    impersonated: str | None  # address from ConnectingSID, verbatim
    auth_kind: str | None  # "Bearer", "Basic", "NTLM" or None
    anchor_mailbox: str | None  # X-AnchorMailbox header
    user: str | None  # authenticated mailbox (Basic) or client_id (Bearer)
    status: int
    response_codes: tuple[str, ...]
    messages: int  # <t:Message> elements in a CreateItem
    user_agent: str | None
    dropped: bool
    received: float  # the stand-in's clock when the request arrived
    time: float  # ... and when it was answered (an injected delay lies between)
    request_id: str = ""  # the ``request-id`` header of the answer


class _Fault(Exception):
    """Raised inside request processing to answer with a SOAP fault (HTTP 500)."""

    def __init__(self, code: str, message: str, values: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.values = values or {}


@dataclass
class _Faults:
    busy: int = 0
    back_off_ms: int = 0
    http_503: int = 0
    retry_after: int | None = None
    drop: int = 0
    drop_only_sends: bool = False
    delay: float = 0.0
    after_status: int = 0
    after: int = 0
    after_close: bool = False
    after_retry_after: int | None = None
    sent_items_lag: float = 0.0
    outbox_lag: float = 0.0


@dataclass
class _Trace:
    """What ``handle`` learned about a request, for the request log."""

    op: str | None = None
    impersonated: str | None = None
    auth_kind: str | None = None
    user: str | None = None
    codes: tuple[str, ...] = ()
    messages: int = 0


@dataclass
class _Context:
    """Who is asking and for which mailbox."""

    auth_kind: str
    token: TokenInfo | None
    user: _Mailbox | None
    target: _Mailbox


# --------------------------------------------------------------------------- server


class EwsServer(HttpsStandIn):
    """HTTPS stand-in for an Exchange (Online or on-prem) EWS endpoint.

    Serves exactly ``/EWS/Exchange.asmx`` (case-sensitive, like the product guide says
    the URL must be); other paths get an IIS-style 404. Implements the operations
    exchangelib 5.6 uses to send and find mail: ``GetFolder``, ``CreateItem``,
    ``FindItem``, ``GetItem``, ``GetAttachment``, ``SendItem``.
    """

    def __init__(
        self,
        ca: TestCA,
        registry: TokenRegistry,
        *,
        max_message_bytes: int = 35 * 1024 * 1024,
        accepted_audiences: Sequence[str] = (
            "https://outlook.office365.com",
            "https://outlook.office.com",
            _EXO_CLIENT_ID,
        ),
        ews_roles: Sequence[str] = ("full_access_as_app", "EWS.AccessAsApp"),
        windows_domain: str = "CONTOSO",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(ca, clock=clock)
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.accepted_audiences = tuple(a.rstrip("/") for a in accepted_audiences)
        self.ews_roles = tuple(ews_roles)
        self.windows_domain = windows_domain
        self._mailboxes: dict[str, _Mailbox] = {}
        self._folders: dict[str, _Folder] = {}
        self._items: dict[str, StoredItem] = {}
        self._delivered: list[DeliveredMessage] = []
        self._requests: list[EwsRequestRecord] = []
        self._ops: Counter[str] = Counter()
        self._messages_per_request: list[int] = []
        self._faults = _Faults()
        self._ews_disabled = False
        self._deny_impersonation: set[str] = set()
        self._impersonators: set[str] = set()
        self._invalid_smtp: set[str] = set()
        self.ntlm_enabled = False

    # directory -------------------------------------------------------------------

    def add_mailbox(
        self,
        address: str,
        aliases: Iterable[str] = (),
        *,
        password: str | None = None,
        logon_name: str | None = None,
        tenant_id: str | None = None,
        display_name: str | None = None,
    ) -> None:
        """Create a mailbox with the standard folders.

        ``password`` enables HTTP Basic for this user (on-prem); ``tenant_id`` restricts
        app-only access to tokens from that tenant.
        """
        primary = address.lower()
        mailbox = _Mailbox(
            primary=primary,
            aliases=[a.lower() for a in aliases],
            password=password,
            logon_name=(logon_name or primary.split("@")[0]).lower(),
            tenant_id=tenant_id.lower() if tenant_id else None,
            display_name=display_name or primary.split("@")[0].title(),
        )
        with self._lock:
            ids: dict[str, str] = {}
            for dist, name, cls, parent in _STANDARD_FOLDERS:
                folder = _Folder(
                    folder_id=_new_id(f"fld:{dist}"),
                    change_key=_new_id("ck")[:16],
                    distinguished=dist,
                    display_name=name,
                    folder_class=cls,
                    parent_id=ids.get(parent) if parent else None,
                    mailbox=primary,
                )
                ids[dist] = folder.folder_id
                mailbox.folders[dist] = folder
                self._folders[folder.folder_id] = folder
            self._mailboxes[primary] = mailbox

    def deny_impersonation_for(self, *addresses: str) -> None:
        """App-only/impersonating callers get ErrorImpersonateUserDenied for these."""
        with self._lock:
            self._deny_impersonation.update(a.lower() for a in addresses)

    def grant_impersonation(self, *users: str) -> None:
        """On-prem: let these Basic-authenticated users impersonate (ApplicationImpersonation)."""
        with self._lock:
            self._impersonators.update(u.lower() for u in users)

    def set_invalid_smtp_addresses(self, *addresses: str) -> None:
        """Recipients that get ErrorInvalidSmtpAddress (per message)."""
        with self._lock:
            self._invalid_smtp = {a.lower() for a in addresses}

    def _find_mailbox(self, address: str, *, primary_only: bool) -> _Mailbox | None:
        key = address.strip().lower()
        with self._lock:
            if key in self._mailboxes:
                return self._mailboxes[key]
            if not primary_only:
                for mailbox in self._mailboxes.values():
                    if key in mailbox.aliases:
                        return mailbox
        return None

    # faults ----------------------------------------------------------------------

    def server_busy(self, n: int = 1, back_off_ms: int = 1500) -> None:
        """Next ``n`` requests: SOAP fault ErrorServerBusy with BackOffMilliseconds."""
        with self._lock:
            self._faults.busy = n
            self._faults.back_off_ms = back_off_ms

    def http_503(self, n: int = 1, retry_after: int | None = None) -> None:
        """Next ``n`` requests: HTTP 503 (optionally with Retry-After seconds)."""
        with self._lock:
            self._faults.http_503 = n
            self._faults.retry_after = retry_after

    def drop_after_request(self, n: int = 1, *, only_sends: bool = False) -> None:
        """Next ``n`` requests are processed (mail delivered!) but never answered.

        ``only_sends``: count only CreateItem and SendItem, so the folder lookups of a
        fresh Account (or a reconcile's FindItem) in between are answered normally.
        """
        with self._lock:
            self._faults.drop = n
            self._faults.drop_only_sends = only_sends

    def fail_after_processing(
        self, status: int, n: int = 1, *, close: bool = False, retry_after: int | None = None
    ) -> None:
        """Next ``n`` CreateItem/SendItem requests are processed (mail delivered!) and then
        answered with HTTP ``status`` (500, 502, 503 or 504) and an IIS-style error page.

        ``close`` adds ``Connection: close`` (as proxies often do on errors);
        ``retry_after`` a ``Retry-After`` header.
        """
        if status not in _ERROR_PAGES:
            raise ValueError(f"not a server error: {status}")
        with self._lock:
            self._faults.after_status, self._faults.after = status, n
            self._faults.after_close = close
            self._faults.after_retry_after = retry_after

    def sent_items_lag(self, seconds: float) -> None:
        """A sent mail's Sent Items copy shows in FindItem only ``seconds`` later on the
        stand-in's clock; meanwhile it waits in the Outbox (see :meth:`outbox_lag`)."""
        with self._lock:
            self._faults.sent_items_lag = seconds

    def outbox_lag(self, seconds: float) -> None:
        """A sent mail shows in the Outbox only ``seconds`` after it was accepted (before,
        in no folder); with this lag at least the Sent Items lag, it skips the Outbox."""
        with self._lock:
            self._faults.outbox_lag = seconds

    def delay(self, seconds: float) -> None:
        """Every request sleeps ``seconds`` on the stand-in's clock before it is processed
        (0 to turn off); its log record shows the hold as ``time - received``."""
        with self._lock:
            self._faults.delay = seconds

    @property
    def ews_disabled(self) -> bool:
        with self._lock:
            return self._ews_disabled

    @ews_disabled.setter
    def ews_disabled(self, value: bool) -> None:
        """HTTP 403 for every request (EWS blocked for the tenant / app not allow-listed)."""
        with self._lock:
            self._ews_disabled = value

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = _Faults()
            self._ews_disabled = False

    # observations ----------------------------------------------------------------

    @property
    def delivered(self) -> list[DeliveredMessage]:
        """Every message sent (SendOnly/SendAndSaveCopy/SendItem), oldest first."""
        with self._lock:
            return list(self._delivered)

    @property
    def requests(self) -> list[EwsRequestRecord]:
        """Every request to the EWS path, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def ops(self) -> Counter[str]:
        """Requests per SOAP operation, e.g. ``ops["CreateItem"]``."""
        with self._lock:
            return Counter(self._ops)

    @property
    def messages_per_request(self) -> list[int]:
        """Number of ``<t:Message>`` in each CreateItem request."""
        with self._lock:
            return list(self._messages_per_request)

    def folder_items(self, address: str, folder: str = "sentitems") -> list[StoredItem]:
        """Items in a mailbox's distinguished folder (a copy of the list): those there now
        or still to show up (lags ignored), not an Outbox copy that has moved on."""
        mailbox = self._find_mailbox(address, primary_only=False)
        if mailbox is None:
            raise KeyError(address)
        now = self.clock.time()
        with self._lock:
            return [i for i in mailbox.folders[folder].items if i.visible_until > now]

    def sent_items(self, address: str) -> list[StoredItem]:
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
        if path.split("?", 1)[0] != EWS_PATH:
            return _iis_404()
        trace = _Trace()
        received = self.clock.time()
        request_id = str(uuid.uuid4())
        response = Response(500, b"", "text/plain")
        try:
            response = self._handle(method, headers, body, trace, connection_state)
            response.headers = {**response.headers, "request-id": request_id}
            return response
        finally:
            self._record(
                EwsRequestRecord(
                    operation=trace.op,
                    impersonated=trace.impersonated,
                    auth_kind=trace.auth_kind,
                    anchor_mailbox=headers.get("X-AnchorMailbox"),
                    user=trace.user,
                    status=0 if response.drop else response.status,
                    response_codes=trace.codes,
                    messages=trace.messages,
                    user_agent=headers.get("User-Agent"),
                    dropped=response.drop,
                    received=received,
                    time=self.clock.time(),
                    request_id=request_id,
                )
            )

    def _handle(
        self,
        method: str,
        headers: Headers,
        body: bytes,
        trace: _Trace,
        connection_state: dict[str, object],
    ) -> Response:
        with self._lock:
            faults = self._faults
            if self._ews_disabled:
                return _ews_blocked()
            if faults.http_503 > 0:
                faults.http_503 -= 1
                extra = {"Retry-After": str(faults.retry_after)} if faults.retry_after else {}
                html = b"<html><body><h1>Service Unavailable</h1></body></html>"
                return Response(503, html, "text/html", extra)
            delay = faults.delay
        self.clock.sleep(delay)
        auth = self._authenticate(headers, connection_state)
        if isinstance(auth, Response):
            return auth
        trace.auth_kind, token, basic_user = auth
        trace.user = token.client_id if token else (basic_user.primary if basic_user else None)
        if method != "POST":
            return Response(405, b"", "text/html", {"Allow": "POST"})
        try:
            root = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError as exc:
            trace.codes = ("ErrorSchemaValidation",)
            return _fault_response(
                _Fault("ErrorSchemaValidation", f"The request failed schema validation: {exc}")
            )
        header = root.find(f"{{{SOAP_NS}}}Header")
        soap_body = root.find(f"{{{SOAP_NS}}}Body")
        operation = soap_body[0] if soap_body is not None and len(soap_body) else None
        trace.op = etree.QName(operation).localname if operation is not None else None
        trace.impersonated = _connecting_sid(header)
        if trace.op == "CreateItem" and operation is not None:
            trace.messages = len(operation.findall(f"{_m('Items')}/{_t('Message')}"))
        with self._lock:
            if trace.op:
                self._ops[trace.op] += 1
            if trace.op == "CreateItem":
                self._messages_per_request.append(trace.messages)
            if faults.busy > 0:
                faults.busy -= 1
                trace.codes = ("ErrorServerBusy",)
                return _fault_response(
                    _Fault(
                        "ErrorServerBusy",
                        "The server cannot service this request right now. Try again later.",
                        {"BackOffMilliseconds": str(faults.back_off_ms)},
                    )
                )
        try:
            if operation is None or trace.op is None:
                raise _Fault("ErrorInvalidRequest", "The request is invalid.")
            ctx = self._context(trace.auth_kind, token, basic_user, trace.impersonated)
            payload, trace.codes = self._dispatch(trace.op, operation, ctx)
            response = _envelope(payload, 200)
        except _Fault as fault:
            trace.codes = (fault.code,)
            response = _fault_response(fault)
        sends = trace.op in ("CreateItem", "SendItem")
        with self._lock:
            if faults.drop > 0 and (sends or not faults.drop_only_sends):
                faults.drop -= 1
                return Response(drop=True)
            if faults.after > 0 and sends:
                faults.after -= 1
                trace.codes = ()
                return _error_page(
                    faults.after_status, faults.after_close, faults.after_retry_after
                )
        return response

    def _record(self, record: EwsRequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    # auth ------------------------------------------------------------------------

    def _www_authenticate(self, error: str | None = None) -> list[str]:
        bearer = (
            f'Bearer client_id="{_EXO_CLIENT_ID}", '
            'trusted_issuers="00000001-0000-0000-c000-000000000000@*", '
            'token_types="app_asserted_user_v1 service_asserted_app_v1", '
            'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize"'
        )
        if error:
            bearer += f', error="{error}"'
        values = [bearer]
        with self._lock:
            if any(m.password for m in self._mailboxes.values()):
                values.append(f'Basic realm="{self.host}"')
        if self.ntlm_enabled:
            values += ["Negotiate", "NTLM"]
        return values

    def _unauthorized(self, diagnostics: str | None, error: str | None) -> Response:
        # One header line can carry several challenges; requests joins repeats anyway.
        headers = {"WWW-Authenticate": ", ".join(self._www_authenticate(error))}
        if diagnostics:
            headers["x-ms-diagnostics"] = diagnostics
        return Response(401, b"", "text/html", headers)

    def _authenticate(
        self, headers: Headers, connection_state: dict[str, object]
    ) -> Response | tuple[str, TokenInfo | None, _Mailbox | None]:
        value = headers.get("Authorization", "")
        scheme, _, credential = value.partition(" ")
        scheme = scheme.lower()
        if scheme in ("ntlm", "negotiate") and self.ntlm_enabled:
            return self._ntlm_step(scheme, credential.strip(), connection_state)
        ntlm_user = connection_state.get("ntlm_user")
        if not value and isinstance(ntlm_user, _Mailbox):
            return "NTLM", None, ntlm_user  # IIS: NTLM authenticates the connection
        if scheme == "bearer":
            token = credential.strip()
            info = self.registry.validate(token)
            if info is None:
                known = self.registry.lookup(token)
                if known is not None:
                    diag = '2000001;reason="The token has expired.";error_category="invalid_token"'
                else:
                    diag = (
                        '2000001;reason="The token is invalid or has an invalid signature.";'
                        'error_category="invalid_token"'
                    )
                return self._unauthorized(diag, "invalid_token")
            if info.audience.rstrip("/") not in self.accepted_audiences:
                return self._unauthorized(
                    f"2000003;reason=\"The audience claim value is invalid '{info.audience}'.\";"
                    'error_category="invalid_resource"',
                    "invalid_token",
                )
            if not info.roles:
                return self._unauthorized(
                    '2000008;reason="The token contains no permissions, or permissions can not '
                    'be understood.";error_category="invalid_grant"',
                    "invalid_token",
                )
            if not set(info.roles) & set(self.ews_roles):
                return Response(403, b"", "text/html")
            return "Bearer", info, None
        if scheme == "basic":
            try:
                decoded = base64.b64decode(credential.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return self._unauthorized(None, None)
            username, _, password = decoded.partition(":")
            mailbox = self._basic_user(username)
            if (
                mailbox is None
                or mailbox.password is None
                or not secrets.compare_digest(mailbox.password.encode(), password.encode())
            ):
                return self._unauthorized(None, None)
            return "Basic", None, mailbox
        return self._unauthorized(None, None)

    def _ntlm_step(
        self, scheme: str, credential: str, connection_state: dict[str, object]
    ) -> Response | tuple[str, TokenInfo | None, _Mailbox | None]:
        """One leg of the NTLM handshake, bound to the TCP connection (pyspnego acceptor)."""
        import spnego  # only needed for NTLM; pyspnego comes with requests_ntlm

        label = "NTLM" if scheme == "ntlm" else "Negotiate"
        try:
            token = base64.b64decode(credential, validate=True)
        except binascii.Error:
            return self._unauthorized(None, None)
        if token[8:12] == b"\x01\x00\x00\x00":  # NEGOTIATE_MESSAGE starts a new handshake
            connection_state.pop("ntlm_user", None)
            connection_state["ntlm"] = spnego.server(protocol="ntlm")
        context = connection_state.get("ntlm")
        if context is None:
            return self._unauthorized(None, None)
        try:
            out = context.step(token)  # type: ignore[attr-defined]
        except spnego.exceptions.SpnegoError:
            connection_state.pop("ntlm", None)
            return self._unauthorized(None, None)
        if not context.complete:  # type: ignore[attr-defined]
            challenge = f"{label} {base64.b64encode(out or b'').decode()}"
            return Response(401, b"", "text/html", {"WWW-Authenticate": challenge})
        connection_state.pop("ntlm", None)
        mailbox = self._basic_user(str(context.client_principal))  # type: ignore[attr-defined]
        if mailbox is None or mailbox.password is None:
            return self._unauthorized(None, None)
        connection_state["ntlm_user"] = mailbox
        return "NTLM", None, mailbox

    def write_ntlm_user_file(self, path: Path) -> Path:
        """Write the NTLM credential store for every mailbox with a password; enable NTLM.

        Why a file: pyspnego's NTLM acceptor reads users only from the file named by the
        process-wide ``NTLM_USER_FILE`` environment variable, so the TEST must set it
        (``monkeypatch.setenv("NTLM_USER_FILE", str(path))``); the server never touches
        the environment. Both ``DOMAIN\\logon`` and the bare e-mail form (exchangelib
        sends ``\\user@domain`` for an e-mail username) are accepted.
        """
        with self._lock:
            lines = []
            for mailbox in self._mailboxes.values():
                if mailbox.password is None:
                    continue
                lines.append(f"{self.windows_domain}:{mailbox.logon_name}:{mailbox.password}")
                lines.append(f":{mailbox.primary}:{mailbox.password}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.ntlm_enabled = True
        return path

    def _basic_user(self, username: str) -> _Mailbox | None:
        name = username.strip().lower()
        if "\\" in name:
            domain, _, logon = name.partition("\\")
            if domain and domain != self.windows_domain.lower():
                return None
            name = logon
        with self._lock:
            for mailbox in self._mailboxes.values():
                if name in (mailbox.primary, mailbox.logon_name):
                    return mailbox
        return None

    def _context(
        self,
        auth_kind: str,
        token: TokenInfo | None,
        user: _Mailbox | None,
        impersonated: str | None,
    ) -> _Context:
        if token is not None:
            if impersonated is None:
                raise _Fault(
                    "ErrorInvalidExchangeImpersonationHeaderData",
                    "ExchangeImpersonation SOAP header must be present for this type of "
                    "OAuth token.",
                )
        elif impersonated is not None:
            assert user is not None
            with self._lock:
                allowed = user.primary in self._impersonators
            if not allowed:
                raise _Fault(
                    "ErrorImpersonateUserDenied",
                    "The account does not have permission to impersonate the requested user.",
                )
        if impersonated is None:
            assert user is not None
            return _Context(auth_kind, token, user, user)
        target = self._find_mailbox(impersonated, primary_only=True)
        if target is None or (
            token is not None and target.tenant_id and target.tenant_id != token.tenant_id
        ):
            raise _Fault(
                "ErrorNonExistentMailbox",
                "The SMTP address has no mailbox associated with it.",
                {"SmtpAddress": impersonated},
            )
        with self._lock:
            denied = target.primary in self._deny_impersonation
        if denied:
            raise _Fault(
                "ErrorImpersonateUserDenied",
                "The account does not have permission to impersonate the requested user.",
            )
        return _Context(auth_kind, token, user, target)

    # operations ------------------------------------------------------------------

    def _dispatch(
        self, op: str, request: etree._Element, ctx: _Context
    ) -> tuple[etree._Element, tuple[str, ...]]:
        handlers = {
            "GetFolder": self._get_folder,
            "CreateItem": self._create_item,
            "FindItem": self._find_item,
            "GetItem": self._get_item,
            "GetAttachment": self._get_attachment,
            "SendItem": self._send_item,
        }
        handler = handlers.get(op)
        if handler is None:
            raise _Fault(
                "ErrorInvalidRequest",
                f"The request is invalid. (The EWS stand-in does not implement {op}.)",
            )
        messages = handler(request, ctx)
        response = etree.Element(_m(f"{op}Response"), nsmap={"m": M_NS, "t": T_NS})
        container = etree.SubElement(response, _m("ResponseMessages"))
        codes: list[str] = []
        for message in messages:
            container.append(message)
            codes.append(message.findtext(_m("ResponseCode")) or "")
        return response, tuple(codes)

    def _resolve_folder(self, elem: etree._Element, ctx: _Context) -> _Folder:
        """A FolderId / DistinguishedFolderId element -> folder of the target mailbox."""
        tag = etree.QName(elem).localname
        if tag == "DistinguishedFolderId":
            owner = ctx.target
            address = elem.findtext(f"{_t('Mailbox')}/{_t('EmailAddress')}")
            if address:
                found = self._find_mailbox(address, primary_only=False)
                if found is None:
                    raise _MessageError(
                        "ErrorNonExistentMailbox",
                        "The SMTP address has no mailbox associated with it.",
                    )
                owner = found
            if owner is not ctx.target:
                raise _MessageError(
                    "ErrorAccessDenied", "Access is denied. Check credentials and try again."
                )
            folder = owner.folders.get(elem.get("Id", ""))
            if folder is None:
                raise _MessageError(
                    "ErrorFolderNotFound", "The specified folder could not be found in the store."
                )
            return folder
        with self._lock:
            found_folder = self._folders.get(elem.get("Id", ""))
        if found_folder is None:
            raise _MessageError(
                "ErrorFolderNotFound", "The specified folder could not be found in the store."
            )
        if found_folder.mailbox != ctx.target.primary:
            raise _MessageError(
                "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        return found_folder

    def _get_folder(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        out = []
        ids = request.find(_m("FolderIds"))
        for elem in ids if ids is not None else []:
            message = _response_message("GetFolder")
            try:
                folder = self._resolve_folder(elem, ctx)
            except _MessageError as err:
                out.append(err.element("GetFolder", container="Folders"))
                continue
            folders = etree.SubElement(message, _m("Folders"))
            folders.append(self._folder_element(folder))
            out.append(message)
        return out

    def _folder_element(self, folder: _Folder) -> etree._Element:
        with self._lock:
            total = len(folder.items)
            children = sum(1 for f in self._folders.values() if f.parent_id == folder.folder_id)
        elem = etree.Element(_t("Folder"))
        etree.SubElement(elem, _t("FolderId"), Id=folder.folder_id, ChangeKey=folder.change_key)
        if folder.parent_id:
            etree.SubElement(elem, _t("ParentFolderId"), Id=folder.parent_id, ChangeKey="AQAAAA==")
        if folder.folder_class:
            etree.SubElement(elem, _t("FolderClass")).text = folder.folder_class
        etree.SubElement(elem, _t("DisplayName")).text = folder.display_name
        etree.SubElement(elem, _t("TotalCount")).text = str(total)
        etree.SubElement(elem, _t("ChildFolderCount")).text = str(children)
        etree.SubElement(elem, _t("UnreadCount")).text = "0"
        return elem

    # CreateItem / SendItem -------------------------------------------------------

    def _create_item(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        disposition = request.get("MessageDisposition", "SaveOnly")
        saved_folder_elem = request.find(_m("SavedItemFolderId"))
        items = request.find(_m("Items"))
        out: list[etree._Element] = []
        for elem in items if items is not None else []:
            if etree.QName(elem).localname != "Message":
                out.append(
                    _MessageError(
                        "ErrorInvalidRequest",
                        "The EWS stand-in only implements CreateItem for messages.",
                    ).element("CreateItem", container="Items")
                )
                continue
            try:
                out.append(self._create_one(elem, disposition, saved_folder_elem, ctx))
            except _MessageError as err:
                out.append(err.element("CreateItem", container="Items"))
        return out

    def _create_one(
        self,
        elem: etree._Element,
        disposition: str,
        saved_folder_elem: etree._Element | None,
        ctx: _Context,
    ) -> etree._Element:
        item = self._parse_message(elem, ctx)
        send = disposition in ("SendOnly", "SendAndSaveCopy")
        if send:
            self._check_sendable(item)
        if item.size > self.max_message_bytes:
            raise _MessageError(
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size., Cannot save changes made "
                "to an item to store.",
            )
        message = _response_message("CreateItem")
        items = etree.SubElement(message, _m("Items"))
        if disposition == "SaveOnly":
            folder = (
                self._resolve_folder(saved_folder_elem[0], ctx)
                if saved_folder_elem is not None and len(saved_folder_elem)
                else ctx.target.folders["drafts"]
            )
            self._store(item, folder)
            msg = etree.SubElement(items, _t("Message"))
            etree.SubElement(msg, _t("ItemId"), Id=item.item_id, ChangeKey=item.change_key)
            return message
        saved: _Folder | None = None
        if disposition == "SendAndSaveCopy":
            saved = (
                self._resolve_folder(saved_folder_elem[0], ctx)
                if saved_folder_elem is not None and len(saved_folder_elem)
                else ctx.target.folders["sentitems"]
            )
        elif disposition != "SendOnly":
            raise _MessageError(
                "ErrorInvalidRequest", f"Unknown MessageDisposition {disposition!r}."
            )
        item.is_draft = False
        item.sent = datetime.now(UTC)
        self._file_sent(item, saved, ctx.target)
        self._deliver(item, ctx.target.primary)
        return message

    def _file_sent(self, item: StoredItem, folder: _Folder | None, mailbox: _Mailbox) -> None:
        """File a sent mail as Exchange does, after the lags: in the Outbox, then in
        ``folder`` (Sent Items; None when no copy is kept)."""
        now = self.clock.time()
        with self._lock:
            outbox_at = now + self._faults.outbox_lag
            filed_at = now + self._faults.sent_items_lag
        if outbox_at < filed_at:
            waiting = dataclasses.replace(
                item,
                item_id=_new_id("itm"),
                change_key=_new_id("ck")[:16],
                visible_from=outbox_at,
                visible_until=filed_at,
            )
            self._store(waiting, mailbox.folders["outbox"])
        if folder is not None:
            item.visible_from = filed_at
            self._store(item, folder)

    def _check_sendable(self, item: StoredItem) -> None:
        recipients = [a for _, a in item.to + item.cc + item.bcc]
        if not recipients:
            raise _MessageError(
                "ErrorInvalidRecipients",
                "At least one recipient isn't valid., A message can't be sent because it "
                "contains no recipients.",
            )
        for address in recipients:
            if not is_smtp_address(address):
                raise _MessageError(
                    "ErrorInvalidRecipients",
                    f"At least one recipient isn't valid., Recipient '{address}' isn't "
                    "resolved. All recipients must be resolved before a message can be submitted.",
                )
        with self._lock:
            bad = [a for a in recipients if a.lower() in self._invalid_smtp]
        if bad:
            raise _MessageError("ErrorInvalidSmtpAddress", "The SMTP address format is invalid.")

    def _store(self, item: StoredItem, folder: _Folder) -> None:
        with self._lock:
            item.folder_id = folder.folder_id
            folder.items.append(item)
            self._items[item.item_id] = item

    def _deliver(self, item: StoredItem, mailbox: str) -> None:
        now = datetime.now(UTC)
        text = item.body if item.body_type == "Text" else None
        html = item.body if item.body_type == "HTML" else None
        delivered = DeliveredMessage(
            mailbox=mailbox,
            internet_message_id=item.internet_message_id,
            subject=item.subject,
            to=tuple(a for _, a in item.to),
            cc=tuple(a for _, a in item.cc),
            bcc=tuple(a for _, a in item.bcc),
            text_body=text,
            html_body=html,
            attachments=tuple((a.name, a.content) for a in item.attachments),
            time=now,
            sender=item.sender,
            headers=tuple(item.headers),
            reply_to=tuple(item.reply_to),
        )
        with self._lock:
            self._delivered.append(delivered)
        # Local recipients also find it in their Inbox (without Bcc, as recipients see it).
        for _, address in item.to + item.cc + item.bcc:
            local = self._find_mailbox(address, primary_only=False)
            if local is None:
                continue
            copy = StoredItem(
                item_id=_new_id("itm"),
                change_key=_new_id("ck")[:16],
                folder_id="",
                internet_message_id=item.internet_message_id,
                subject=item.subject,
                body=item.body,
                body_type=item.body_type,
                to=list(item.to),
                cc=list(item.cc),
                bcc=[],
                sender=item.sender,
                attachments=list(item.attachments),
                created=now,
                sent=item.sent or now,
                size=item.size,
                is_draft=False,
                headers=list(item.headers),
                reply_to=list(item.reply_to),
            )
            self._store(copy, local.folders["inbox"])

    def _send_item(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        save = request.get("SaveItemToFolder", "true").lower() == "true"
        saved_folder_elem = request.find(_m("SavedItemFolderId"))
        ids = request.find(_m("ItemIds"))
        out: list[etree._Element] = []
        for elem in ids if ids is not None else []:
            try:
                item = self._own_item(elem, ctx)
                self._check_sendable(item)
                with self._lock:
                    source = self._folders[item.folder_id]
                    source.items.remove(item)
                    del self._items[item.item_id]
                item.is_draft = False
                item.sent = datetime.now(UTC)
                saved: _Folder | None = None
                if save:
                    saved = (
                        self._resolve_folder(saved_folder_elem[0], ctx)
                        if saved_folder_elem is not None and len(saved_folder_elem)
                        else ctx.target.folders["sentitems"]
                    )
                self._file_sent(item, saved, ctx.target)
                self._deliver(item, ctx.target.primary)
                out.append(_response_message("SendItem"))
            except _MessageError as err:
                out.append(err.element("SendItem"))
        return out

    def _own_item(self, elem: etree._Element, ctx: _Context) -> StoredItem:
        with self._lock:
            item = self._items.get(elem.get("Id", ""))
            folder = self._folders.get(item.folder_id) if item else None
        if item is None or folder is None:
            raise _MessageError(
                "ErrorItemNotFound", "The specified object was not found in the store."
            )
        if folder.mailbox != ctx.target.primary:
            raise _MessageError(
                "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        return item

    def _parse_message(self, elem: etree._Element, ctx: _Context) -> StoredItem:
        """Read a ``<t:Message>`` (and its MIME content, if any) into a StoredItem."""
        mime = _parse_mime(elem.findtext(_t("MimeContent")))

        def mailboxes(tag: str) -> list[tuple[str | None, str]]:
            container = elem.find(_t(tag))
            if container is None:
                return list(mime.recipients.get(tag, []))
            return [
                (mb.findtext(_t("Name")), str(mb.findtext(_t("EmailAddress")) or "").strip())
                for mb in container.findall(_t("Mailbox"))
            ]

        body_elem = elem.find(_t("Body"))
        if body_elem is not None:
            body: str | None = body_elem.text or ""
            body_type = body_elem.get("BodyType", "Text")
        else:
            body, body_type = mime.body
        attachments = list(mime.attachments)
        container = elem.find(_t("Attachments"))
        for att in container if container is not None else []:
            content = att.findtext(_t("Content"))
            attachments.append(
                StoredAttachment(
                    name=att.findtext(_t("Name")) or "",
                    content=base64.b64decode(content) if content else b"",
                    content_type=att.findtext(_t("ContentType")) or "application/octet-stream",
                    is_inline=(att.findtext(_t("IsInline")) or "false").lower() == "true",
                    content_id=att.findtext(_t("ContentId")),
                )
            )
        headers = list(mime.headers)
        for prop in elem.findall(_t("ExtendedProperty")):
            uri = prop.find(_t("ExtendedFieldURI"))
            if uri is not None and uri.get("DistinguishedPropertySetId") == "InternetHeaders":
                headers.append((uri.get("PropertyName", ""), prop.findtext(_t("Value")) or ""))
        from_address = elem.findtext(f"{_t('From')}/{_t('Mailbox')}/{_t('EmailAddress')}")
        sender = ctx.target.primary
        if from_address:
            owner = self._find_mailbox(from_address, primary_only=False)
            if owner is not ctx.target:
                raise _MessageError(
                    "ErrorSendAsDenied",
                    "The user account which was used to submit this request does not have the "
                    "right to send mail on behalf of the specified sending account.",
                )
            sender = from_address.lower()
        now = datetime.now(UTC)
        message_id = elem.findtext(_t("InternetMessageId")) or mime.message_id
        if not message_id:
            domain = ctx.target.primary.split("@")[-1]
            message_id = f"<{uuid.uuid4().hex}@{domain}>"
        reply_to = [a for _, a in mailboxes("ReplyTo")]
        return StoredItem(
            item_id=_new_id("itm"),
            change_key=_new_id("ck")[:16],
            folder_id="",
            internet_message_id=message_id,
            subject=elem.findtext(_t("Subject")) or mime.subject or "",
            body=body,
            body_type=body_type,
            to=mailboxes("ToRecipients"),
            cc=mailboxes("CcRecipients"),
            bcc=mailboxes("BccRecipients"),
            sender=sender,
            attachments=attachments,
            created=now,
            sent=None,
            size=len(etree.tostring(elem)),
            is_draft=True,
            headers=headers,
            reply_to=reply_to,
        )

    # FindItem / GetItem / GetAttachment ------------------------------------------

    def _find_item(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        shape = request.find(_m("ItemShape"))
        fields = _requested_fields(shape)
        restriction = request.find(_m("Restriction"))
        view = request.find(_m("IndexedPageItemView"))
        order = request.find(_m("SortOrder"))
        parents = request.find(_m("ParentFolderIds"))
        out: list[etree._Element] = []
        for folder_elem in parents if parents is not None else []:
            try:
                folder = self._resolve_folder(folder_elem, ctx)
                now = self.clock.time()
                with self._lock:
                    items = [i for i in folder.items if i.visible_from <= now < i.visible_until]
                if restriction is not None and len(restriction):
                    items = [i for i in items if _matches(restriction[0], i)]
                items = _sorted(items, order)
            except _MessageError as err:
                out.append(err.element("FindItem"))
                continue
            total = len(items)
            offset = int(view.get("Offset", "0")) if view is not None else 0
            limit = int(view.get("MaxEntriesReturned", str(total))) if view is not None else total
            if view is not None and view.get("BasePoint") == "End":
                start = max(total - offset - limit, 0)
                page = items[start : total - offset]
            else:
                page = items[offset : offset + limit]
            message = _response_message("FindItem")
            root_folder = etree.SubElement(
                message,
                _m("RootFolder"),
                IndexedPagingOffset=str(offset + len(page)),
                TotalItemsInView=str(total),
                IncludesLastItemInRange="true" if offset + len(page) >= total else "false",
            )
            items_elem = etree.SubElement(root_folder, _t("Items"))
            for item in page:
                items_elem.append(_item_element(item, fields, find=True))
            out.append(message)
        return out

    def _get_item(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        fields = _requested_fields(request.find(_m("ItemShape")))
        ids = request.find(_m("ItemIds"))
        out: list[etree._Element] = []
        for elem in ids if ids is not None else []:
            try:
                item = self._own_item(elem, ctx)
            except _MessageError as err:
                out.append(err.element("GetItem", container="Items"))
                continue
            message = _response_message("GetItem")
            etree.SubElement(message, _m("Items")).append(_item_element(item, fields, find=False))
            out.append(message)
        return out

    def _get_attachment(self, request: etree._Element, ctx: _Context) -> list[etree._Element]:
        ids = request.find(_m("AttachmentIds"))
        out: list[etree._Element] = []
        for elem in ids if ids is not None else []:
            wanted = elem.get("Id", "")
            with self._lock:
                found = [
                    (item, att)
                    for item in self._items.values()
                    for att in item.attachments
                    if att.attachment_id == wanted
                    and self._folders[item.folder_id].mailbox == ctx.target.primary
                ]
            if not found:
                out.append(
                    _MessageError(
                        "ErrorItemNotFound", "The specified object was not found in the store."
                    ).element("GetAttachment", container="Attachments")
                )
                continue
            item, att = found[0]
            message = _response_message("GetAttachment")
            atts = etree.SubElement(message, _m("Attachments"))
            atts.append(_attachment_element(item, att, with_content=True))
            out.append(message)
        return out


# --------------------------------------------------------------------------- helpers


class _MessageError(Exception):
    """A per-message error: HTTP 200, ResponseClass="Error"."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code
        self.text = text

    def element(self, op: str, container: str | None = None) -> etree._Element:
        message = etree.Element(_m(f"{op}ResponseMessage"), ResponseClass="Error")
        etree.SubElement(message, _m("MessageText")).text = self.text
        etree.SubElement(message, _m("ResponseCode")).text = self.code
        etree.SubElement(message, _m("DescriptiveLinkKey")).text = "0"
        if container:
            etree.SubElement(message, _m(container))
        return message


def _response_message(op: str) -> etree._Element:
    message = etree.Element(_m(f"{op}ResponseMessage"), ResponseClass="Success")
    etree.SubElement(message, _m("ResponseCode")).text = "NoError"
    return message


def _server_version_header() -> etree._Element:
    header = etree.Element(f"{{{SOAP_NS}}}Header")
    etree.SubElement(
        header,
        f"{{{T_NS}}}ServerVersionInfo",
        MajorVersion="15",
        MinorVersion="20",
        MajorBuildNumber="8835",
        MinorBuildNumber="21",
        Version="V2018_01_08",
        nsmap={"h": T_NS},
    )
    return header


def _envelope(payload: etree._Element, status: int) -> Response:
    envelope = etree.Element(f"{{{SOAP_NS}}}Envelope", nsmap={"s": SOAP_NS})
    envelope.append(_server_version_header())
    body = etree.SubElement(envelope, f"{{{SOAP_NS}}}Body", nsmap={"xsi": XSI_NS, "xsd": XSD_NS})
    body.append(payload)
    data = etree.tostring(envelope, xml_declaration=True, encoding="utf-8")
    return Response(status, data, "text/xml; charset=utf-8")


def _fault_response(fault: _Fault) -> Response:
    """HTTP 500 + SOAP fault, the way EWS reports request-level errors."""
    envelope = etree.Element(f"{{{SOAP_NS}}}Envelope", nsmap={"s": SOAP_NS})
    body = etree.SubElement(envelope, f"{{{SOAP_NS}}}Body")
    soap_fault = etree.SubElement(body, f"{{{SOAP_NS}}}Fault")
    code = etree.SubElement(soap_fault, "faultcode", nsmap={"a": T_NS})
    code.text = f"a:{fault.code}"
    string = etree.SubElement(soap_fault, "faultstring")
    string.set("{http://www.w3.org/XML/1998/namespace}lang", "en-US")
    string.text = fault.message
    detail = etree.SubElement(soap_fault, "detail")
    etree.SubElement(detail, f"{{{E_NS}}}ResponseCode", nsmap={"e": E_NS}).text = fault.code
    etree.SubElement(detail, f"{{{E_NS}}}Message", nsmap={"e": E_NS}).text = fault.message
    if fault.values:
        xml = etree.SubElement(detail, _t("MessageXml"), nsmap={"t": T_NS})
        for name, value in fault.values.items():
            etree.SubElement(xml, _t("Value"), Name=name).text = value
    data = etree.tostring(envelope, xml_declaration=True, encoding="utf-8")
    return Response(500, data, "text/xml; charset=utf-8")


def _iis_404() -> Response:
    body = (
        b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
        b'"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\r\n'
        b"<html><head><title>404 - File or directory not found.</title></head>"
        b"<body><h2>404 - File or directory not found.</h2><h3>The resource you are "
        b"looking for might have been removed, had its name changed, or is temporarily "
        b"unavailable.</h3></body></html>"
    )
    return Response(404, body, "text/html")


#: fail_after_processing's answers: IIS's own page for 500, ARR's (a proxy) for 502 and 504.
_ERROR_PAGES = {
    500: "500 - Internal server error.",
    502: "502 - Web server received an invalid response acting as a gateway or proxy server.",
    503: "503 - Service Unavailable.",
    504: "504 - Gateway Timeout.",
}


def _error_page(status: int, close: bool, retry_after: int | None) -> Response:
    """An HTML error page (not SOAP): what IIS or a proxy answers when the app failed."""
    title = _ERROR_PAGES[status]
    body = f"<html><head><title>{title}</title></head><body><h2>{title}</h2></body></html>"
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return Response(status, body.encode(), "text/html", headers, close=close)


def _ews_blocked() -> Response:
    """403 for a tenant where EWS is off (EWSEnabled=False / app not in EwsAllowedAppIDs).

    Microsoft does not document the body; this is a plausible IIS-style 403 with an
    explanatory diagnostics header.
    """
    body = (
        b"<html><head><title>403 - Forbidden: Access is denied.</title></head><body>"
        b"<h2>403 - Forbidden: Access is denied.</h2><h3>Exchange Web Services are "
        b"disabled for this organization or application.</h3></body></html>"
    )
    headers = {
        "x-ms-diagnostics": (
            '2000011;reason="EWS is disabled for this organization or the application is '
            'not in EwsAllowedAppIDs.";error_category="ews_disabled"'
        )
    }
    return Response(403, body, "text/html", headers)


def _connecting_sid(header: etree._Element | None) -> str | None:
    if header is None:
        return None
    sid = header.find(f"{_t('ExchangeImpersonation')}/{_t('ConnectingSID')}")
    if sid is None:
        return None
    for tag in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
        value = sid.findtext(_t(tag))
        if value:
            return str(value).strip()
    return ""


def _requested_fields(shape: etree._Element | None) -> set[str] | None:
    """FieldURIs asked for; ``None`` means every property we hold (AllProperties)."""
    if shape is None:
        return set()
    base = shape.findtext(_t("BaseShape")) or "IdOnly"
    extra = shape.find(_t("AdditionalProperties"))
    uris = (
        {f.get("FieldURI", "") for f in extra.findall(_t("FieldURI"))}
        if extra is not None
        else set()
    )
    if base in ("AllProperties", "Default"):
        return None
    return uris


def _field_value(item: StoredItem, uri: str) -> str | None:
    values: dict[str, str | None] = {
        "message:InternetMessageId": item.internet_message_id,
        "item:Subject": item.subject,
        "item:ItemClass": "IPM.Note",
        "message:From": item.sender,
        "message:Sender": item.sender,
        "item:DateTimeSent": _iso(item.sent) if item.sent else None,
        "item:DateTimeCreated": _iso(item.created),
        "item:DateTimeReceived": _iso(item.sent or item.created),
    }
    return values.get(uri)


def _matches(expr: etree._Element, item: StoredItem) -> bool:
    """Evaluate the subset of EWS restrictions exchangelib emits for simple filters."""
    name = etree.QName(expr).localname
    if name == "And":
        return all(_matches(e, item) for e in expr)
    if name == "Or":
        return any(_matches(e, item) for e in expr)
    if name == "Not":
        return not _matches(expr[0], item)
    uri_elem = expr.find(_t("FieldURI"))
    uri = uri_elem.get("FieldURI", "") if uri_elem is not None else ""
    value = _field_value(item, uri)
    if name == "Exists":
        return value is not None
    constant = expr.find(f".//{_t('Constant')}")
    wanted = constant.get("Value", "") if constant is not None else ""
    if name == "IsEqualTo":
        return value == wanted
    if name == "IsNotEqualTo":
        return value != wanted
    if name == "Contains":
        if value is None:
            return False
        if "Ignore" in expr.get("ContainmentComparison", ""):
            return wanted.lower() in value.lower()
        return wanted in value
    comparisons = {
        "IsGreaterThan": lambda a, b: a > b,
        "IsGreaterThanOrEqualTo": lambda a, b: a >= b,
        "IsLessThan": lambda a, b: a < b,
        "IsLessThanOrEqualTo": lambda a, b: a <= b,
    }
    if name in comparisons and value is not None:
        return bool(comparisons[name](value, wanted))
    raise _MessageError(
        "ErrorUnsupportedPathForQuery",
        f"The property {uri or name} is not supported in restrictions by the EWS stand-in.",
    )


def _sorted(items: list[StoredItem], order: etree._Element | None) -> list[StoredItem]:
    if order is None:
        return items
    for field_order in reversed(order.findall(_t("FieldOrder"))):
        uri_elem = field_order.find(_t("FieldURI"))
        uri = uri_elem.get("FieldURI", "") if uri_elem is not None else ""
        reverse = field_order.get("Order") == "Descending"
        items = sorted(items, key=lambda i: _field_value(i, uri) or "", reverse=reverse)
    return items


def _mailbox_element(parent: etree._Element, name: str | None, address: str) -> None:
    mb = etree.SubElement(parent, _t("Mailbox"))
    if name:
        etree.SubElement(mb, _t("Name")).text = name
    etree.SubElement(mb, _t("EmailAddress")).text = address
    etree.SubElement(mb, _t("RoutingType")).text = "SMTP"
    etree.SubElement(mb, _t("MailboxType")).text = "OneOff"


def _attachment_element(
    item: StoredItem, att: StoredAttachment, *, with_content: bool
) -> etree._Element:
    elem = etree.Element(_t("FileAttachment"))
    etree.SubElement(elem, _t("AttachmentId"), Id=att.attachment_id, RootItemId=item.item_id)
    etree.SubElement(elem, _t("Name")).text = att.name
    etree.SubElement(elem, _t("ContentType")).text = att.content_type
    if att.content_id:
        etree.SubElement(elem, _t("ContentId")).text = att.content_id
    etree.SubElement(elem, _t("Size")).text = str(len(att.content))
    etree.SubElement(elem, _t("IsInline")).text = "true" if att.is_inline else "false"
    if with_content:
        etree.SubElement(elem, _t("Content")).text = base64.b64encode(att.content).decode()
    return elem


def _item_element(item: StoredItem, fields: set[str] | None, *, find: bool) -> etree._Element:
    """A ``<t:Message>`` with the requested properties, in schema order."""

    def want(uri: str) -> bool:
        return fields is None or uri in fields

    elem = etree.Element(_t("Message"))
    etree.SubElement(elem, _t("ItemId"), Id=item.item_id, ChangeKey=item.change_key)
    if want("item:ParentFolderId"):
        etree.SubElement(elem, _t("ParentFolderId"), Id=item.folder_id, ChangeKey="AQAAAA==")
    if want("item:ItemClass"):
        etree.SubElement(elem, _t("ItemClass")).text = "IPM.Note"
    if want("item:Subject"):
        etree.SubElement(elem, _t("Subject")).text = item.subject
    if want("item:Body") and not find and item.body is not None:
        etree.SubElement(elem, _t("Body"), BodyType=item.body_type).text = item.body
    if want("item:Attachments") and not find and item.attachments:
        atts = etree.SubElement(elem, _t("Attachments"))
        for att in item.attachments:
            atts.append(_attachment_element(item, att, with_content=False))
    if want("item:DateTimeReceived"):
        etree.SubElement(elem, _t("DateTimeReceived")).text = _iso(item.sent or item.created)
    if want("item:Size"):
        etree.SubElement(elem, _t("Size")).text = str(item.size)
    if want("item:DateTimeSent") and item.sent:
        etree.SubElement(elem, _t("DateTimeSent")).text = _iso(item.sent)
    if want("item:DateTimeCreated"):
        etree.SubElement(elem, _t("DateTimeCreated")).text = _iso(item.created)
    if want("item:HasAttachments"):
        etree.SubElement(elem, _t("HasAttachments")).text = "true" if item.attachments else "false"
    if want("item:IsDraft"):
        etree.SubElement(elem, _t("IsDraft")).text = "true" if item.is_draft else "false"
    if want("message:Sender"):
        _mailbox_element(etree.SubElement(elem, _t("Sender")), None, item.sender)
    for uri, tag, values in (
        ("message:ToRecipients", "ToRecipients", item.to),
        ("message:CcRecipients", "CcRecipients", item.cc),
        ("message:BccRecipients", "BccRecipients", item.bcc),
    ):
        if want(uri) and values and not find:
            container = etree.SubElement(elem, _t(tag))
            for name, address in values:
                _mailbox_element(container, name, address)
    if want("message:IsRead"):
        etree.SubElement(elem, _t("IsRead")).text = "true"
    if want("message:From"):
        _mailbox_element(etree.SubElement(elem, _t("From")), None, item.sender)
    if want("message:InternetMessageId"):
        etree.SubElement(elem, _t("InternetMessageId")).text = item.internet_message_id
    return elem


@dataclass
class _Mime:
    """Fields read from an optional ``<t:MimeContent>`` (EWS props override them)."""

    recipients: dict[str, list[tuple[str | None, str]]] = field(default_factory=dict)
    subject: str | None = None
    message_id: str | None = None
    body: tuple[str | None, str] = (None, "Text")
    attachments: list[StoredAttachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)


def _parse_mime(content: str | None) -> _Mime:
    """Parse base64 RFC 5322 content the way Exchange would before storing it."""
    if not content:
        return _Mime()
    try:
        raw = base64.b64decode(content)
    except (binascii.Error, ValueError):
        raise _MessageError(
            "ErrorMimeContentConversionFailed", "MIME content conversion failed."
        ) from None
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)

    def addresses(header: str) -> list[tuple[str | None, str]]:
        return [(n or None, a) for n, a in getaddresses([str(v) for v in msg.get_all(header, [])])]

    mime = _Mime(
        recipients={
            "ToRecipients": addresses("To"),
            "CcRecipients": addresses("Cc"),
            "BccRecipients": addresses("Bcc"),
            "ReplyTo": addresses("Reply-To"),
        },
        subject=str(msg.get("Subject", "")),
        message_id=str(msg.get("Message-ID", "")).strip() or None,
        headers=[(k, str(v)) for k, v in msg.items() if k.lower().startswith("x-")],
    )
    for subtype, body_type in (("html", "HTML"), ("plain", "Text")):
        part = msg.get_body(preferencelist=(subtype,))
        if isinstance(part, EmailMessage):
            mime.body = (str(part.get_content()), body_type)
            break
    for part in msg.iter_attachments():
        if not isinstance(part, EmailMessage):
            continue
        payload = part.get_content()
        mime.attachments.append(
            StoredAttachment(
                name=part.get_filename() or "",
                content=payload if isinstance(payload, bytes) else str(payload).encode(),
                content_type=part.get_content_type(),
            )
        )
    return mime
