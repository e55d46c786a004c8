"""Self-tests of the EWS stand-in, driven by the real exchangelib (and msal) over HTTPS.

Why: these pin the exchangelib 5.6 behaviour the ``exchange_mail`` transport relies
on: which requests a send makes, which exception each server answer becomes, and
that a dropped connection after processing leaves the mail delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
from exchangelib import (
    BASIC,
    DELEGATE,
    IMPERSONATION,
    NTLM,
    OAUTH2,
    Account,
    Configuration,
    Credentials,
    FileAttachment,
    HTMLBody,
    Mailbox,
    Message,
    OAuth2Credentials,
    Version,
)
from exchangelib.errors import (
    ErrorImpersonateUserDenied,
    ErrorInvalidExchangeImpersonationHeaderData,
    ErrorInvalidRecipients,
    ErrorInvalidSmtpAddress,
    ErrorMessageSizeExceeded,
    ErrorNonExistentMailbox,
    ErrorServerBusy,
    ErrorTimeoutExpired,
    MalformedResponseError,
    UnauthorizedError,
)
from exchangelib.items import SEND_AND_SAVE_COPY
from exchangelib.protocol import FailFast, close_connections
from exchangelib.version import EXCHANGE_O365
from oauthlib.oauth2 import OAuth2Token

from .clock import FakeClock
from .entra import EntraServer, Secret, TokenRegistry
from .ews import EWS_PATH, EwsServer
from .tls import TestCA, make_test_ca

TENANT = "7c1f4a52-9d3e-4b8a-a0c6-2f5e8d9b1a34"
CLIENT = "0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c"
SECRET = "Qx8~stand.in-secret-value"
ANNA = "anna@contoso.se"
ANNA_ALIAS = "anna@contoso.com"
BO = "bo@contoso.se"


class TokenAcquisitionError(Exception):
    """msal returned an error dict instead of a token."""


class MsalOAuth2Credentials(OAuth2Credentials):  # type: ignore[misc]
    """exchangelib credentials whose only token source is msal (notes §3.2).

    ``client_secret=None`` keeps requests-oauthlib from ever fetching or refreshing
    a token itself; every (re)build of a session asks msal, whose cache answers.
    """

    SCOPES = ("https://outlook.office365.com/.default",)
    access_token: OAuth2Token | None  # set by the base class; typed here for mypy

    def __init__(self, msal_app: msal.ConfidentialClientApplication) -> None:
        super().__init__(
            client_id=msal_app.client_id, client_secret=None, tenant_id=msal_app.authority.tenant
        )
        self._msal_app = msal_app

    def _token_from_msal(self) -> OAuth2Token:
        result = self._msal_app.acquire_token_for_client(scopes=list(self.SCOPES))
        if "access_token" not in result:
            raise TokenAcquisitionError(result.get("error"), result.get("error_codes"))
        return OAuth2Token(
            {
                "access_token": result["access_token"],
                "token_type": "Bearer",
                "expires_at": time.time() + int(result["expires_in"]),
            }
        )

    def session_params(self) -> dict[str, Any]:
        if self.access_token is None:
            self.access_token = self._token_from_msal()
        return {"token": self.access_token}

    def refresh(self, session: Any) -> None:
        self.access_token = self._token_from_msal()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(Path(tmp_path_factory.mktemp("ews-ca")))


@pytest.fixture(autouse=True)
def trust_test_ca(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # exchangelib and msal use requests, which prefers REQUESTS_CA_BUNDLE over any
    # session verify=; the machine sets it, so point it at the test CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_pem))
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    yield
    close_connections()  # exchangelib caches one Protocol per (endpoint, credentials)


@pytest.fixture
def registry() -> TokenRegistry:
    return TokenRegistry()


@pytest.fixture
def entra(ca: TestCA, registry: TokenRegistry) -> Iterator[EntraServer]:
    server = EntraServer(ca, registry)
    server.add_tenant(TENANT, domains=["contoso.se"])
    server.add_app(TENANT, CLIENT, secrets=[Secret(SECRET)])
    with server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """The EWS stand-in's clock: injected delays are recorded, not slept."""
    return FakeClock()


@pytest.fixture
def ews(ca: TestCA, registry: TokenRegistry, clock: FakeClock) -> Iterator[EwsServer]:
    server = EwsServer(ca, registry, clock=clock)
    server.add_mailbox(ANNA, aliases=[ANNA_ALIAS], tenant_id=TENANT)
    server.add_mailbox(BO, password="B0-pa55word", logon_name="bo")
    with server:
        yield server


@pytest.fixture
def msal_app(entra: EntraServer) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        CLIENT,
        client_credential=SECRET,
        authority=f"{entra.base_url}/{TENANT}",
        instance_discovery=False,
    )


@pytest.fixture
def account(ews: EwsServer, msal_app: msal.ConfidentialClientApplication) -> Callable[..., Account]:
    def make(
        address: str = ANNA, path: str = EWS_PATH, access_type: str = IMPERSONATION
    ) -> Account:
        config = Configuration(
            service_endpoint=ews.base_url + path,
            credentials=MsalOAuth2Credentials(msal_app),
            version=Version(build=EXCHANGE_O365),
            auth_type=OAUTH2,
            retry_policy=FailFast(),
        )
        return Account(address, access_type=access_type, autodiscover=False, config=config)

    return make


def mail(account: Account, message_id: str = "<x@crm>", **kwargs: Any) -> Message:
    fields: dict[str, Any] = {
        "subject": "Visning fredag",
        "body": "Hej!",
        "to_recipients": ["kund@example.com"],
        "message_id": message_id,
    }
    fields.update(kwargs)
    return Message(account=account, **fields)


# --------------------------------------------------------------------------- sending


def test_send_and_save_delivers_and_stores_copy(
    ews: EwsServer, entra: EntraServer, account: Callable[..., Account]
) -> None:
    a = account()
    msg = mail(
        a,
        body=HTMLBody("<p>Hej!</p>"),
        cc_recipients=[Mailbox(name="Chef", email_address="chef@example.com")],
        bcc_recipients=["arkiv@example.com"],
    )
    msg.attach(FileAttachment(name="offert.pdf", content=b"%PDF-1.7 offer"))
    msg.send_and_save()

    [sent] = ews.delivered
    assert sent.mailbox == ANNA and sent.sender == ANNA
    assert sent.internet_message_id == "<x@crm>"
    assert sent.subject == "Visning fredag"
    assert (sent.to, sent.cc, sent.bcc) == (
        ("kund@example.com",),
        ("chef@example.com",),
        ("arkiv@example.com",),
    )
    assert sent.html_body == "<p>Hej!</p>" and sent.text_body is None
    assert sent.attachments == (("offert.pdf", b"%PDF-1.7 offer"),)
    [copy] = ews.sent_items(ANNA)
    assert copy.internet_message_id == "<x@crm>"

    # First send on an Account: GetFolder(root), GetFolder(sentitems), CreateItem.
    assert [r.operation for r in ews.requests] == ["GetFolder", "GetFolder", "CreateItem"]
    create = ews.requests[-1]
    assert (create.impersonated, create.auth_kind, create.anchor_mailbox) == (ANNA, "Bearer", ANNA)
    assert create.user == CLIENT
    assert ews.messages_per_request == [1]

    mail(a, message_id="<y@crm>").send_and_save()  # folders are cached on the Account
    assert ews.ops == {"GetFolder": 2, "CreateItem": 2}
    assert entra.token_requests == 1  # msal cache served the rest
    assert ews.connections_accepted == 1  # keep-alive


def test_send_only_and_save_then_send(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    mail(a, message_id="<only@crm>").send(save_copy=False)
    assert ews.ops == {"CreateItem": 1}
    assert ews.sent_items(ANNA) == []

    draft = mail(a, message_id="<draft@crm>", folder=a.drafts)
    draft.save()
    assert [i.internet_message_id for i in ews.folder_items(ANNA, "drafts")] == ["<draft@crm>"]
    draft.send()  # SendItem on the stored draft
    assert ews.folder_items(ANNA, "drafts") == []
    assert [i.internet_message_id for i in ews.sent_items(ANNA)] == ["<draft@crm>"]
    assert [d.internet_message_id for d in ews.delivered] == ["<only@crm>", "<draft@crm>"]
    assert ews.ops["SendItem"] == 1


def test_local_recipient_gets_inbox_copy(ews: EwsServer, account: Callable[..., Account]) -> None:
    mail(account(), to_recipients=[BO]).send(save_copy=False)
    [received] = ews.folder_items(BO, "inbox")
    assert received.internet_message_id == "<x@crm>"


def test_mime_content_is_parsed(ews: EwsServer, account: Callable[..., Account]) -> None:
    mime = EmailMessage()
    mime["From"] = ANNA
    mime["To"] = "kund@example.com"
    mime["Subject"] = "MIME"
    mime["Message-ID"] = "<mime@crm>"
    mime["X-Crm-Id"] = "42"
    mime.set_content("plain text")
    mime.add_attachment(b"data", maintype="application", subtype="octet-stream", filename="d.bin")
    Message(account=account(), mime_content=mime.as_bytes()).send(save_copy=False)
    [sent] = ews.delivered
    assert (sent.subject, sent.internet_message_id, sent.to) == (
        "MIME",
        "<mime@crm>",
        ("kund@example.com",),
    )
    assert sent.text_body is not None and sent.text_body.strip() == "plain text"
    assert sent.attachments == (("d.bin", b"data"),)
    assert ("X-Crm-Id", "42") in sent.headers


# --------------------------------------------------------------------------- finding


def test_find_sent_item_by_message_id(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    mail(a).send_and_save()
    mail(a, message_id="<other@crm>").send_and_save()

    [found] = list(a.sent.filter(message_id="<x@crm>"))
    assert found.message_id == "<x@crm>" and found.subject == "Visning fredag"
    assert [r.email_address for r in found.to_recipients] == ["kund@example.com"]
    assert ews.ops["FindItem"] == 1 and ews.ops["GetItem"] == 1  # full fields need GetItem

    only = list(a.sent.filter(message_id="<x@crm>").only("message_id"))
    assert [m.message_id for m in only] == ["<x@crm>"]
    # message_id is a TextField, which exchangelib calls "complex": even .only() needs GetItem.
    assert ews.ops["GetItem"] == 2

    assert a.sent.filter(message_id="<x@crm>").exists()
    assert not a.sent.filter(message_id="<missing@crm>").exists()
    assert a.sent.all().count() == 2
    assert ews.ops["GetItem"] == 2  # .exists() and .count() are FindItem (IdOnly) alone


def test_paging(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    for i in range(5):
        mail(a, message_id=f"<p{i}@crm>").send_and_save()
    found = list(a.sent.all().only("message_id").order_by("subject")[1:4])
    assert len(found) == 3
    ids = [m.message_id for m in a.sent.all().only("message_id")]
    assert sorted(ids) == [f"<p{i}@crm>" for i in range(5)]


def test_attachment_content_via_get_attachment(
    ews: EwsServer, account: Callable[..., Account]
) -> None:
    a = account()
    msg = mail(a)
    msg.attach(FileAttachment(name="a.txt", content=b"hello"))
    msg.send_and_save()
    [found] = list(a.sent.filter(message_id="<x@crm>"))
    assert found.attachments[0].content == b"hello"
    assert ews.ops["GetAttachment"] == 1


# --------------------------------------------------------------------------- impersonation


@pytest.mark.parametrize("address", [ANNA_ALIAS, "nobody@contoso.se"])
def test_alias_or_unknown_is_non_existent_mailbox(
    ews: EwsServer, account: Callable[..., Account], address: str
) -> None:
    with pytest.raises(ErrorNonExistentMailbox):
        mail(account(address)).send_and_save()
    assert ews.delivered == []
    assert ews.requests[-1].impersonated == address
    assert ews.requests[-1].anchor_mailbox == address
    assert ews.requests[-1].response_codes == ("ErrorNonExistentMailbox",)


def test_app_token_without_impersonation_header(account: Callable[..., Account]) -> None:
    # DELEGATE access with no identity on the credentials sends no ExchangeImpersonation.
    with pytest.raises(ErrorInvalidExchangeImpersonationHeaderData, match="must be present"):
        mail(account(access_type=DELEGATE)).send_and_save()


def test_impersonation_denied(ews: EwsServer, account: Callable[..., Account]) -> None:
    ews.deny_impersonation_for(ANNA)
    with pytest.raises(ErrorImpersonateUserDenied):
        mail(account()).send_and_save()


def test_token_from_another_tenant(
    ews: EwsServer, entra: EntraServer, account: Callable[..., Account]
) -> None:
    other_tenant, other_client = "5d2e8f1a-3b4c-4d5e-8f6a-7b8c9d0e1f2a", "other-app"
    entra.add_tenant(other_tenant, domains=["fabrikam.se"])
    entra.add_app(other_tenant, other_client, secrets=[Secret("other-secret")])
    other = msal.ConfidentialClientApplication(
        other_client,
        client_credential="other-secret",
        authority=f"{entra.base_url}/{other_tenant}",
        instance_discovery=False,
    )
    config = Configuration(
        service_endpoint=ews.base_url + EWS_PATH,
        credentials=MsalOAuth2Credentials(other),
        version=Version(build=EXCHANGE_O365),
        auth_type=OAUTH2,
        retry_policy=FailFast(),
    )
    a = Account(ANNA, access_type=IMPERSONATION, autodiscover=False, config=config)
    with pytest.raises(ErrorNonExistentMailbox):
        mail(a).send_and_save()


def test_token_without_ews_role_is_403(entra: EntraServer, account: Callable[..., Account]) -> None:
    entra.set_app(TENANT, CLIENT, roles=("Calendars.ReadWrite.All",))
    # As for EWS blocked for the tenant: exchangelib surfaces it as a malformed answer.
    with pytest.raises(MalformedResponseError, match="Code: 403"):
        mail(account()).send_and_save()


# --------------------------------------------------------------------------- auth


def test_revoked_token_is_401_until_msal_refetches(
    ews: EwsServer,
    entra: EntraServer,
    registry: TokenRegistry,
    msal_app: msal.ConfidentialClientApplication,
    account: Callable[..., Account],
) -> None:
    a = account()
    mail(a).send_and_save()
    registry.revoke_all()
    with pytest.raises(UnauthorizedError):
        mail(a, message_id="<2@crm>").send_and_save()
    # The 401 evicts nothing: exchangelib retired the session but at once built a new
    # one from msal's (still cached) token. Drop the token AND the pooled sessions,
    # else the next send fails once more with the stale token.
    msal_app.remove_tokens_for_client()
    a.protocol.close()
    mail(a, message_id="<3@crm>").send_and_save()
    assert entra.token_requests == 2
    assert [d.internet_message_id for d in ews.delivered] == ["<x@crm>", "<3@crm>"]


def test_token_without_roles_is_401(
    ews: EwsServer, entra: EntraServer, account: Callable[..., Account]
) -> None:
    entra.set_app(TENANT, CLIENT, roles=())
    with pytest.raises(UnauthorizedError):
        mail(account()).send_and_save()
    assert ews.requests[-1].status == 401


def test_raw_401_headers(ews: EwsServer, registry: TokenRegistry) -> None:
    reply = requests.post(
        ews.base_url + EWS_PATH, data=b"<x/>", headers={"Authorization": "Bearer forged"}
    )
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer client_id=")
    assert "invalid_token" in reply.headers["x-ms-diagnostics"]
    graph = registry.issue(TENANT, CLIENT, ("Mail.Send",), "https://graph.microsoft.com")
    reply = requests.post(
        ews.base_url + EWS_PATH, data=b"<x/>", headers={"Authorization": f"Bearer {graph.token}"}
    )
    assert reply.status_code == 401 and "audience" in reply.headers["x-ms-diagnostics"]


def test_basic_auth_on_prem(ews: EwsServer) -> None:
    def on_prem(username: str, password: str) -> Account:
        config = Configuration(
            service_endpoint=ews.base_url + EWS_PATH,
            credentials=Credentials(username, password),
            version=Version(build=EXCHANGE_O365),
            auth_type=BASIC,
            retry_policy=FailFast(),
        )
        return Account(BO, access_type=DELEGATE, autodiscover=False, config=config)

    mail(on_prem("CONTOSO\\bo", "B0-pa55word")).send_and_save()
    mail(on_prem(BO, "B0-pa55word"), message_id="<2@crm>").send_and_save()
    assert [d.mailbox for d in ews.delivered] == [BO, BO]
    assert {r.auth_kind for r in ews.requests} == {"Basic"}
    assert ews.requests[-1].impersonated is None
    close_connections()
    with pytest.raises(UnauthorizedError):
        mail(on_prem("CONTOSO\\bo", "wrong"), message_id="<3@crm>").send_and_save()


def test_basic_auth_impersonation_needs_grant(ews: EwsServer) -> None:
    config = Configuration(
        service_endpoint=ews.base_url + EWS_PATH,
        credentials=Credentials("CONTOSO\\bo", "B0-pa55word"),
        version=Version(build=EXCHANGE_O365),
        auth_type=BASIC,
        retry_policy=FailFast(),
    )
    a = Account(ANNA, access_type=IMPERSONATION, autodiscover=False, config=config)
    with pytest.raises(ErrorImpersonateUserDenied):
        mail(a).send_and_save()
    ews.grant_impersonation(BO)
    mail(a).send_and_save()
    assert [(d.mailbox, d.sender) for d in ews.delivered] == [(ANNA, ANNA)]
    assert ews.requests[-1].user == BO and ews.requests[-1].impersonated == ANNA


# --------------------------------------------------------------------------- errors


def test_per_message_errors(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    with pytest.raises(ErrorInvalidRecipients, match="isn't resolved"):
        mail(a, to_recipients=["kund @example.com"]).send(save_copy=False)
    ews.set_invalid_smtp_addresses("blocked@example.com")
    with pytest.raises(ErrorInvalidSmtpAddress):
        mail(a, to_recipients=["blocked@example.com"]).send(save_copy=False)
    ews.max_message_bytes = 10_000
    with pytest.raises(ErrorMessageSizeExceeded):
        mail(a, body="x" * 20_000).send(save_copy=False)
    assert ews.delivered == []


def test_bulk_create_mixed_batch(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    batch = [
        mail(a, message_id="<b1@crm>"),
        mail(a, message_id="<b2@crm>", to_recipients=["not an address"]),
        mail(a, message_id="<b3@crm>"),
    ]
    # One bad recipient makes bulk_create raise although the other two WERE sent.
    with pytest.raises(ErrorInvalidRecipients):
        a.bulk_create(folder=None, items=batch, message_disposition=SEND_AND_SAVE_COPY)
    assert [d.internet_message_id for d in ews.delivered] == ["<b1@crm>", "<b3@crm>"]
    assert ews.messages_per_request == [3]

    # ErrorMessageSizeExceeded is instead returned in the result list.
    ews.max_message_bytes = 10_000
    batch = [mail(a, message_id="<s1@crm>"), mail(a, message_id="<s2@crm>", body="x" * 20_000)]
    result = a.bulk_create(folder=None, items=batch, message_disposition=SEND_AND_SAVE_COPY)
    assert result[0] is True
    assert isinstance(result[1], ErrorMessageSizeExceeded)


def test_server_busy(ews: EwsServer, account: Callable[..., Account]) -> None:
    a = account()
    ews.server_busy(1, back_off_ms=1500)
    with pytest.raises(ErrorServerBusy) as exc:
        mail(a).send_and_save()
    assert exc.value.back_off == 1.5
    mail(a).send_and_save()
    assert len(ews.delivered) == 1


def test_http_503(ews: EwsServer, account: Callable[..., Account]) -> None:
    ews.http_503(1)
    with pytest.raises(ErrorServerBusy, match="HTTP 503"):
        mail(account()).send_and_save()


def test_ews_disabled_is_403(ews: EwsServer, account: Callable[..., Account]) -> None:
    ews.ews_disabled = True
    # exchangelib has no mapping for 403: it surfaces as MalformedResponseError.
    with pytest.raises(MalformedResponseError, match="Code: 403"):
        mail(account()).send_and_save()
    assert ews.ops == {}  # refused before the SOAP body is looked at


def test_wrong_path_case_is_404(ews: EwsServer, account: Callable[..., Account]) -> None:
    with pytest.raises(MalformedResponseError, match="Code: 404"):
        mail(account(path="/ews/exchange.asmx")).send_and_save()
    assert ews.requests == []


def test_drop_after_request_delivers_but_client_sees_error(
    ews: EwsServer, account: Callable[..., Account]
) -> None:
    a = account()
    mail(a, message_id="<warm@crm>").send_and_save()  # folders cached: next send is CreateItem only
    ews.drop_after_request(1)
    with pytest.raises(ErrorTimeoutExpired, match="Remote end closed connection"):
        mail(a, message_id="<ambiguous@crm>").send_and_save()
    assert [d.internet_message_id for d in ews.delivered] == ["<warm@crm>", "<ambiguous@crm>"]
    assert ews.requests[-1].dropped
    # The dedupe check the transport can make before re-sending:
    assert a.sent.filter(message_id="<ambiguous@crm>").exists()


@pytest.mark.parametrize(
    ("status", "close", "raised", "says"),
    [
        (500, False, MalformedResponseError, "Code: 500"),
        (502, False, MalformedResponseError, "Code: 502"),
        (504, False, MalformedResponseError, "Code: 504"),
        # A proxy that closes the connection with its error page: exchangelib no longer
        # sees the status and calls it a busy server.
        (502, True, ErrorServerBusy, "closed connection"),
    ],
)
def test_server_error_after_processing_delivers_the_mail(
    ews: EwsServer,
    account: Callable[..., Account],
    status: int,
    close: bool,
    raised: type[Exception],
    says: str,
) -> None:
    a = account()
    mail(a, message_id="<warm@crm>").send_and_save()
    ews.fail_after_processing(status, close=close)
    with pytest.raises(raised, match=says):
        mail(a, message_id="<accepted@crm>").send_and_save()
    assert [d.internet_message_id for d in ews.delivered] == ["<warm@crm>", "<accepted@crm>"]
    assert (ews.requests[-1].operation, ews.requests[-1].status) == ("CreateItem", status)
    assert a.sent.filter(message_id="<accepted@crm>").exists()
    mail(a, message_id="<next@crm>").send_and_save()  # one request only


def test_a_sent_mail_waits_in_the_outbox_then_moves_to_sent_items(
    ews: EwsServer, clock: FakeClock, account: Callable[..., Account]
) -> None:
    a = account()
    ews.outbox_lag(10)
    ews.sent_items_lag(60)
    mail(a, message_id="<filed@crm>").send_and_save()

    def where() -> tuple[bool, bool]:
        return (
            a.outbox.filter(message_id="<filed@crm>").exists(),
            a.sent.filter(message_id="<filed@crm>").exists(),
        )

    assert where() == (False, False)  # accepted, not filed anywhere yet
    clock.advance(10)
    assert where() == (True, False)
    clock.advance(50)
    assert where() == (False, True)
    assert [i.internet_message_id for i in ews.folder_items(ANNA, "outbox")] == []
    assert len(ews.delivered) == 1


def test_every_answer_has_a_request_id(ews: EwsServer, account: Callable[..., Account]) -> None:
    mail(account()).send_and_save()
    ids = [r.request_id for r in ews.requests]
    assert all(ids) and len(set(ids)) == len(ids)


def test_delay_holds_each_request_before_answering(
    ews: EwsServer, clock: FakeClock, account: Callable[..., Account]
) -> None:
    a = account()
    mail(a).send_and_save()
    warm = len(ews.requests)
    ews.delay(0.3)
    mail(a, message_id="<slow@crm>").send_and_save()  # folders cached: one CreateItem
    held = [r.time - r.received for r in ews.requests]
    assert held[:warm] == [0.0] * warm
    assert [r.operation for r in ews.requests[warm:]] == ["CreateItem"]
    assert held[warm:] == [pytest.approx(0.3)]
    assert clock.sleeps == [0.3]


def test_soap_fault_shape(ews: EwsServer, registry: TokenRegistry) -> None:
    token = registry.issue(TENANT, CLIENT, ("full_access_as_app",), "https://outlook.office365.com")
    envelope = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
        'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Header>'
        '<t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>'
        f"<t:SmtpAddress>{ANNA_ALIAS}</t:SmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"
        "</s:Header><s:Body><m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>"
        '</m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds>'
        "</m:GetFolder></s:Body></s:Envelope>"
    )
    reply = requests.post(
        ews.base_url + EWS_PATH,
        data=envelope.encode(),
        headers={"Authorization": f"Bearer {token.token}", "Content-Type": "text/xml"},
    )
    assert reply.status_code == 500
    assert b"<faultcode" in reply.content and b"a:ErrorNonExistentMailbox" in reply.content
    assert b'<t:Value Name="SmtpAddress">anna@contoso.com</t:Value>' in reply.content


@pytest.mark.parametrize("username", ["CONTOSO\\bo", BO])
def test_ntlm_on_prem(
    ews: EwsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, username: str
) -> None:
    # pyspnego's NTLM acceptor reads users from the file named by NTLM_USER_FILE.
    monkeypatch.setenv("NTLM_USER_FILE", str(ews.write_ntlm_user_file(tmp_path / "ntlm.users")))
    config = Configuration(
        service_endpoint=ews.base_url + EWS_PATH,
        credentials=Credentials(username, "B0-pa55word"),
        version=Version(build=EXCHANGE_O365),
        auth_type=NTLM,
        retry_policy=FailFast(),
    )
    a = Account(BO, access_type=DELEGATE, autodiscover=False, config=config)
    mail(a).send_and_save()
    mail(a, message_id="<2@crm>").send_and_save()
    assert [d.internet_message_id for d in ews.delivered] == ["<x@crm>", "<2@crm>"]
    assert {r.auth_kind for r in ews.requests if r.operation} == {"NTLM"}
    close_connections()
    bad = Configuration(
        service_endpoint=ews.base_url + EWS_PATH,
        credentials=Credentials(username, "wrong"),
        version=Version(build=EXCHANGE_O365),
        auth_type=NTLM,
        retry_policy=FailFast(),
    )
    with pytest.raises(UnauthorizedError):
        mail(Account(BO, access_type=DELEGATE, autodiscover=False, config=bad)).send_and_save()
