"""Self-tests of the Graph stand-in, driven by the real requests and msal over HTTPS.

Why: the Graph transport decides from these answers whether a mail was sent, must be
retried or must never be retried. These tests pin the wire behaviour a client author
relies on: 202 with no body, the error codes, throttling with Retry-After, $batch
per-item results, and the reconcile query after an unanswered send.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msal
import pytest
import requests

from .clock import FakeClock
from .entra import EntraServer, Secret, TokenRegistry
from .graph import GraphServer
from .tls import TestCA, make_test_ca

TENANT = "7c1f4a52-9d3e-4b8a-a0c6-2f5e8d9b1a34"
OTHER_TENANT = "5b2e9f10-1c3d-4e5f-8a9b-0c1d2e3f4a5b"
CLIENT = "0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c"  # Mail.Send + Mail.Read
READER = "1a2b3c4d-0000-4000-8000-000000000001"  # Mail.Read only
NO_CONSENT = "1a2b3c4d-0000-4000-8000-000000000002"  # no roles at all
DIRECTORY = "1a2b3c4d-0000-4000-8000-000000000003"  # Mail.Send + User.Read.All
SECRET = "Qx8~stand.in-secret-value"
GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]
ANNA = "anna@contoso.se"
ANNA_ALIAS = "anna@contoso.com"
BO = "bo@contoso.se"
EVE = "eve@fabrikam.se"  # a mailbox in another tenant

TokenFor = Callable[..., str]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(Path(tmp_path_factory.mktemp("graph-ca")))


@pytest.fixture(scope="module", autouse=True)
def trust_test_ca(ca: TestCA) -> Iterator[None]:
    # msal's requests session takes REQUESTS_CA_BUNDLE over its verify=; our own calls pass
    # verify= per request (which beats the environment) anyway.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_pem))
        patch.delenv("CURL_CA_BUNDLE", raising=False)
        yield


@pytest.fixture(scope="module")
def registry() -> TokenRegistry:
    return TokenRegistry()


def make_entra(ca: TestCA, registry: TokenRegistry) -> EntraServer:
    server = EntraServer(ca, registry)
    server.add_tenant(TENANT, domains=["contoso.se"])  # DEFAULT_RESOURCES include Graph
    secrets = [Secret(SECRET)]
    server.add_app(TENANT, CLIENT, secrets=secrets, roles=("Mail.Send", "Mail.Read"))
    server.add_app(TENANT, READER, secrets=secrets, roles=("Mail.Read",))
    server.add_app(TENANT, NO_CONSENT, secrets=secrets, roles=())
    server.add_app(TENANT, DIRECTORY, secrets=secrets, roles=("Mail.Send", "User.Read.All"))
    return server


@pytest.fixture(scope="module")
def entra(ca: TestCA, registry: TokenRegistry) -> Iterator[EntraServer]:
    # Module-wide (with msal's token cache) to keep the suite fast; each test gets a fresh
    # GraphServer. A test that must expire or revoke tokens makes its own registry.
    with make_entra(ca, registry) as server:
        yield server


@pytest.fixture
def graph(ca: TestCA, registry: TokenRegistry) -> Iterator[GraphServer]:
    with make_graph(ca, registry) as server:
        yield server


def make_graph(ca: TestCA, registry: TokenRegistry, **options: Any) -> GraphServer:
    server = GraphServer(ca, registry, **options)
    server.add_mailbox(ANNA, aliases=[ANNA_ALIAS], tenant_id=TENANT, display_name="Anna Berg")
    server.add_mailbox(BO, tenant_id=TENANT)
    server.add_mailbox(EVE, tenant_id=OTHER_TENANT)
    return server


def token_getter(entra: EntraServer, ca: TestCA) -> TokenFor:
    """Tokens from the real msal (one app object per client id, so its cache works)."""
    apps: dict[str, msal.ConfidentialClientApplication] = {}

    def get(client: str = CLIENT, scopes: list[str] = GRAPH_SCOPE) -> str:
        if client not in apps:
            apps[client] = msal.ConfidentialClientApplication(
                client,
                client_credential=SECRET,
                authority=f"{entra.base_url}/{TENANT}",
                instance_discovery=False,
                verify=str(ca.ca_pem),
            )
        result = apps[client].acquire_token_for_client(scopes=scopes)
        assert "access_token" in result, result
        return str(result["access_token"])

    return get


@pytest.fixture(scope="module")
def token_for(entra: EntraServer, ca: TestCA) -> TokenFor:
    return token_getter(entra, ca)


@pytest.fixture
def token(token_for: TokenFor) -> str:
    return token_for()


def call(
    graph: GraphServer,
    ca: TestCA,
    method: str,
    path: str,
    token: str | None,
    **kwargs: Any,
) -> requests.Response:
    """One request to ``{graph_url}{path}``, trusting only the test CA."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method,
        graph.graph_url + path,
        headers=headers,
        verify=str(ca.ca_pem),
        timeout=10,
        **kwargs,
    )


def message(**overrides: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "subject": "Visning fredag",
        "body": {"contentType": "Text", "content": "Hej!"},
        "toRecipients": [{"emailAddress": {"address": "kund@example.com", "name": "Kund"}}],
    }
    msg.update(overrides)
    return msg


def send(
    graph: GraphServer,
    ca: TestCA,
    token: str | None,
    msg: dict[str, Any] | None = None,
    user: str = ANNA,
    **payload: Any,
) -> requests.Response:
    body = {"message": msg if msg is not None else message(), **payload}
    return call(graph, ca, "POST", f"/users/{user}/sendMail", token, json=body)


def error(reply: requests.Response) -> tuple[int, str, str]:
    err = reply.json()["error"]
    assert {"date", "request-id", "client-request-id"} <= err["innerError"].keys()
    return reply.status_code, err["code"], err["message"]


def reconcile(
    graph: GraphServer,
    ca: TestCA,
    token: str,
    message_id: str,
    user: str = ANNA,
    folder: str = "sentitems",
) -> requests.Response:
    escaped = message_id.replace("'", "''")
    params = {
        "$filter": f"internetMessageId eq '{escaped}'",
        "$select": "id,internetMessageId",
    }
    return call(
        graph, ca, "GET", f"/users/{user}/mailFolders/{folder}/messages", token, params=params
    )


# --------------------------------------------------------------------------- sending


def test_send_html_with_attachment_saves_copy(
    graph: GraphServer, entra: EntraServer, ca: TestCA, token: str
) -> None:
    pdf = b"%PDF-1.7 offer \x00\xff"
    msg = message(
        body={"contentType": "HTML", "content": "<p>Hej!</p>"},
        ccRecipients=[{"emailAddress": {"address": "chef@example.com"}}],
        bccRecipients=[{"emailAddress": {"address": "arkiv@example.com"}}],
        replyTo=[{"emailAddress": {"address": "svar@contoso.se"}}],
        internetMessageId="<42.crm@contoso.se>",
        internetMessageHeaders=[{"name": "x-crm-message-id", "value": "42"}],
        attachments=[
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "offert.pdf",
                "contentType": "application/pdf",
                "contentBytes": base64.b64encode(pdf).decode(),
            }
        ],
    )
    reply = call(
        graph,
        ca,
        "POST",
        f"/users/{ANNA}/sendMail",
        token,
        json={"message": msg, "saveToSentItems": True},
        headers={"client-request-id": "c0ffee00-0000-4000-8000-000000000001"},
    )
    assert reply.status_code == 202
    assert reply.content == b""
    assert reply.headers["client-request-id"] == "c0ffee00-0000-4000-8000-000000000001"
    assert reply.headers["request-id"]

    [sent] = graph.delivered
    assert (sent.mailbox, sent.sender, sent.client_id) == (ANNA, ANNA, CLIENT)
    assert sent.internet_message_id == "<42.crm@contoso.se>"
    assert sent.subject == "Visning fredag"
    assert (sent.to, sent.cc, sent.bcc) == (
        ("kund@example.com",),
        ("chef@example.com",),
        ("arkiv@example.com",),
    )
    assert sent.reply_to == ("svar@contoso.se",)
    assert sent.html_body == "<p>Hej!</p>" and sent.text_body is None
    assert sent.attachments == (("offert.pdf", pdf),)
    assert sent.stored_attachments[0].content_type == "application/pdf"
    assert sent.headers == (("x-crm-message-id", "42"),)
    assert sent.saved_to_sent_items

    [copy] = graph.sent_items(ANNA)
    assert copy.internet_message_id == "<42.crm@contoso.se>"
    assert [a for _, a in copy.bcc] == ["arkiv@example.com"]  # the sender's copy keeps Bcc

    [record] = graph.requests
    assert (record.method, record.operation, record.user, record.status) == (
        "POST",
        "sendMail",
        ANNA,
        202,
    )
    assert record.client_id == CLIENT and record.error_code is None and not record.dropped
    assert graph.ops == {"sendMail": 1}
    assert graph.send_requests == 1
    fetched = entra.token_requests
    assert send(graph, ca, token).status_code == 202
    assert entra.token_requests == fetched  # one token, reused


@pytest.mark.parametrize("save", [False, "false"], ids=["bool", "string-as-in-docs"])
def test_save_to_sent_items_false(graph: GraphServer, ca: TestCA, token: str, save: object) -> None:
    assert send(graph, ca, token, saveToSentItems=save).status_code == 202
    assert graph.sent_items(ANNA) == []
    [sent] = graph.delivered
    assert not sent.saved_to_sent_items
    assert sent.internet_message_id.startswith("<")  # Exchange made one up


def test_user_id_and_case_insensitive_upn(graph: GraphServer, ca: TestCA, token: str) -> None:
    assert send(graph, ca, token, user=graph.user_id(ANNA)).status_code == 202
    assert send(graph, ca, token, user="Anna@Contoso.SE").status_code == 202
    assert [d.mailbox for d in graph.delivered] == [ANNA, ANNA]


def test_local_recipient_gets_inbox_copy(graph: GraphServer, ca: TestCA, token: str) -> None:
    msg = message(toRecipients=[{"emailAddress": {"address": BO}}])
    assert send(graph, ca, token, msg).status_code == 202
    [received] = graph.folder_items(BO, "inbox")
    assert received.subject == "Visning fredag" and received.bcc == []


def test_from_alias_allowed_other_mailbox_denied(
    graph: GraphServer, ca: TestCA, token: str
) -> None:
    alias = message(**{"from": {"emailAddress": {"address": ANNA_ALIAS}}})
    assert send(graph, ca, token, alias).status_code == 202
    assert graph.delivered[0].sender == ANNA_ALIAS

    other = message(**{"from": {"emailAddress": {"address": BO}}})
    status, code, _ = error(send(graph, ca, token, other))
    assert (status, code) == (403, "ErrorSendAsDenied")
    assert len(graph.delivered) == 1


def test_mime_send(graph: GraphServer, ca: TestCA, token: str) -> None:
    mime = EmailMessage()
    mime["From"] = ANNA
    mime["To"] = "kund@example.com"
    mime["Subject"] = "MIME"
    mime["Message-ID"] = "<mime@crm>"
    mime["X-Crm-Id"] = "7"
    mime.set_content("plain text")
    mime.add_attachment(b"data", maintype="application", subtype="octet-stream", filename="d.bin")
    reply = call(
        graph,
        ca,
        "POST",
        f"/users/{ANNA}/sendMail",
        token,
        data=base64.b64encode(mime.as_bytes()),
        headers={"Content-Type": "text/plain"},
    )
    assert reply.status_code == 202
    [sent] = graph.delivered
    assert (sent.subject, sent.internet_message_id, sent.to) == (
        "MIME",
        "<mime@crm>",
        ("kund@example.com",),
    )
    assert sent.text_body is not None and sent.text_body.strip() == "plain text"
    assert sent.attachments == (("d.bin", b"data"),)
    assert ("X-Crm-Id", "7") in sent.headers
    assert len(graph.sent_items(ANNA)) == 1  # MIME sends always save a copy

    bad = call(
        graph,
        ca,
        "POST",
        f"/users/{ANNA}/sendMail",
        token,
        data=b"not base64 at all!",
        headers={"Content-Type": "text/plain"},
    )
    assert error(bad)[:2] == (400, "ErrorMimeContentInvalidBase64String")


# --------------------------------------------------------------------------- reconcile


def test_reconcile_query_finds_the_sent_copy(graph: GraphServer, ca: TestCA, token: str) -> None:
    odd_id = "<o'neil.1@crm>"
    for message_id in ("<a@crm>", odd_id):
        assert send(graph, ca, token, message(internetMessageId=message_id)).status_code == 202

    reply = reconcile(graph, ca, token, odd_id)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert "mailFolders('sentitems')/messages(id,internetMessageId)" in body["@odata.context"]
    [found] = body["value"]
    assert set(found) == {"@odata.etag", "id", "internetMessageId"}
    assert found["internetMessageId"] == odd_id
    assert found["id"] == graph.sent_items(ANNA)[1].id

    assert reconcile(graph, ca, token, "<missing@crm>").json()["value"] == []
    # The same filter over all folders, with the default property set.
    everywhere = call(
        graph,
        ca,
        "GET",
        f"/users/{ANNA}/messages",
        token,
        params={"$filter": "internetMessageId eq '<a@crm>'"},
    ).json()["value"]
    assert [m["subject"] for m in everywhere] == ["Visning fredag"]
    assert everywhere[0]["body"] == {"contentType": "text", "content": "Hej!"}
    assert graph.ops == {"sendMail": 2, "listMessages": 3}


def test_paging_with_next_link(graph: GraphServer, ca: TestCA, token: str) -> None:
    for i in range(3):
        assert send(graph, ca, token, message(subject=f"s{i}")).status_code == 202
    path = f"/users/{ANNA}/mailFolders/sentitems/messages"
    first = call(graph, ca, "GET", path, token, params={"$top": "2", "$select": "subject"})
    page = first.json()
    assert [m["subject"] for m in page["value"]] == ["s2", "s1"]  # newest first
    second = requests.get(
        page["@odata.nextLink"],
        headers={"Authorization": f"Bearer {token}"},
        verify=str(ca.ca_pem),
        timeout=10,
    ).json()
    assert [m["subject"] for m in second["value"]] == ["s0"]
    assert "@odata.nextLink" not in second


def test_reconcile_needs_a_mail_read_role(
    graph: GraphServer, ca: TestCA, token_for: TokenFor
) -> None:
    status, code, message_text = error(reconcile(graph, ca, token_for(DIRECTORY), "<a@crm>"))
    assert (status, code) == (403, "ErrorAccessDenied")
    assert message_text == "Access is denied. Check credentials and try again."


def test_reconcile_errors(graph: GraphServer, ca: TestCA, token: str) -> None:
    path = f"/users/{ANNA}/mailFolders/sentitems/messages"
    bad_prop = call(graph, ca, "GET", path, token, params={"$filter": "foo eq 'x'"})
    assert error(bad_prop)[:2] == (400, "BadRequest")
    bad_select = call(graph, ca, "GET", path, token, params={"$select": "id,nope"})
    assert error(bad_select)[:2] == (400, "BadRequest")
    bad_folder = call(graph, ca, "GET", f"/users/{ANNA}/mailFolders/nope/messages", token)
    assert error(bad_folder)[:2] == (400, "ErrorInvalidIdMalformed")


def test_sent_items_lag_hides_the_copy_for_a_while(
    ca: TestCA, registry: TokenRegistry, token: str
) -> None:
    clock = FakeClock()
    with make_graph(ca, registry, clock=clock) as graph:
        graph.sent_items_lag(30)
        assert send(graph, ca, token, message(internetMessageId="<lag@crm>")).status_code == 202
        assert reconcile(graph, ca, token, "<lag@crm>").json()["value"] == []  # not yet!
        clock.advance(29.9)
        assert reconcile(graph, ca, token, "<lag@crm>").json()["value"] == []
        clock.advance(0.1)
        assert len(reconcile(graph, ca, token, "<lag@crm>").json()["value"]) == 1


def test_a_sent_mail_waits_in_the_outbox_then_moves_to_sent_items(
    ca: TestCA, registry: TokenRegistry, token: str
) -> None:
    clock = FakeClock()
    with make_graph(ca, registry, clock=clock) as graph:
        graph.outbox_lag(10)
        graph.sent_items_lag(60)
        assert send(graph, ca, token, message(internetMessageId="<wait@crm>")).status_code == 202

        def where() -> tuple[int, int]:
            return (
                len(reconcile(graph, ca, token, "<wait@crm>", folder="outbox").json()["value"]),
                len(reconcile(graph, ca, token, "<wait@crm>").json()["value"]),
            )

        assert where() == (0, 0)  # accepted, not filed anywhere yet
        clock.advance(10)
        assert where() == (1, 0)
        clock.advance(50)
        assert where() == (0, 1)
        assert graph.folder_items(ANNA, "outbox") == []


# --------------------------------------------------------------------------- users


def test_get_user_needs_user_read_all(
    graph: GraphServer, ca: TestCA, token: str, token_for: TokenFor
) -> None:
    params = {"$select": "id,userPrincipalName,mail,proxyAddresses"}
    denied = call(graph, ca, "GET", f"/users/{ANNA}", token, params=params)
    assert error(denied) == (
        403,
        "Authorization_RequestDenied",
        "Insufficient privileges to complete the operation.",
    )

    directory = token_for(DIRECTORY)
    user = call(graph, ca, "GET", f"/users/{ANNA}", directory, params=params).json()
    assert user["id"] == graph.user_id(ANNA)
    assert (user["userPrincipalName"], user["mail"]) == (ANNA, ANNA)
    assert user["proxyAddresses"] == [f"SMTP:{ANNA}", f"smtp:{ANNA_ALIAS}"]
    assert user["@odata.context"].endswith(
        "#users(id,userPrincipalName,mail,proxyAddresses)/$entity"
    )

    for missing in (ANNA_ALIAS, "nobody@contoso.se", EVE):
        reply = call(graph, ca, "GET", f"/users/{missing}", directory)
        assert error(reply)[:2] == (404, "Request_ResourceNotFound")


@pytest.mark.parametrize("user", [ANNA_ALIAS, "nobody@contoso.se", EVE])
def test_alias_unknown_or_foreign_user_is_invalid_user(
    graph: GraphServer, ca: TestCA, token: str, user: str
) -> None:
    assert error(send(graph, ca, token, user=user)) == (
        404,
        "ErrorInvalidUser",
        f"The requested user '{user}' is invalid.",
    )
    assert graph.delivered == []
    assert graph.send_requests == 1 and graph.requests[-1].user == user


def test_mail_address_that_is_not_the_upn(ca: TestCA, registry: TokenRegistry, token: str) -> None:
    with GraphServer(ca, registry) as graph:
        graph.add_mailbox("sales@contoso.se", user_principal_name="sales@contoso.onmicrosoft.com")
        assert error(send(graph, ca, token, user="sales@contoso.se"))[1] == "ErrorInvalidUser"
        reply = send(graph, ca, token, user="sales@contoso.onmicrosoft.com")
        assert reply.status_code == 202
        assert graph.delivered[0].sender == "sales@contoso.se"


# --------------------------------------------------------------------------- auth


def test_missing_or_bad_tokens_are_401(graph: GraphServer, ca: TestCA) -> None:
    cases = {
        None: "Access token is empty.",
        "opaque-token": "IDX14100: JWT is not well formed",
        "aaa.bbb.ccc": "Access token validation failure.",
    }
    for bad, text in cases.items():
        reply = send(graph, ca, bad)
        status, code, message_text = error(reply)
        assert (status, code) == (401, "InvalidAuthenticationToken")
        assert message_text.startswith(text)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
    assert graph.delivered == [] and graph.send_requests == 3


def test_expired_token_is_401(ca: TestCA) -> None:
    registry = TokenRegistry()  # expire_all must not touch the module's tokens
    with make_entra(ca, registry) as entra, make_graph(ca, registry) as graph:
        token = token_getter(entra, ca)()
        assert send(graph, ca, token).status_code == 202
        registry.expire_all()
        assert error(send(graph, ca, token)) == (
            401,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        )
        assert len(graph.delivered) == 1


def test_token_for_another_audience_is_401(
    graph: GraphServer, ca: TestCA, token_for: TokenFor
) -> None:
    outlook = token_for(CLIENT, ["https://outlook.office365.com/.default"])
    assert error(send(graph, ca, outlook)) == (
        401,
        "InvalidAuthenticationToken",
        "Access token validation failure. Invalid audience.",
    )


def test_token_without_roles_is_401(graph: GraphServer, ca: TestCA, token_for: TokenFor) -> None:
    status, code, _ = error(send(graph, ca, token_for(NO_CONSENT)))
    assert (status, code) == (401, "NoPermissionsInAccessToken")


def test_token_without_mail_send_is_403(
    graph: GraphServer, ca: TestCA, token_for: TokenFor
) -> None:
    assert error(send(graph, ca, token_for(READER))) == (
        403,
        "ErrorAccessDenied",
        "Access is denied. Check credentials and try again.",
    )
    assert graph.delivered == []


def test_mailbox_outside_rbac_scope_is_403(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.deny_mailboxes(ANNA)
    assert error(send(graph, ca, token))[:2] == (403, "ErrorAccessDenied")
    assert error(reconcile(graph, ca, token, "<a@crm>"))[:2] == (403, "ErrorAccessDenied")
    assert send(graph, ca, token, user=BO).status_code == 202
    graph.deny_mailboxes()
    assert send(graph, ca, token).status_code == 202


def test_rbac_for_applications_grants_per_mailbox_without_roles_in_the_token(
    graph: GraphServer, ca: TestCA, token_for: TokenFor
) -> None:
    # New-ManagementRoleAssignment -App NO_CONSENT -Role "Application Mail.Send"
    # -CustomResourceScope <Anna's mailbox>; the token stays without roles.
    graph.assign_app_role(NO_CONSENT, "Mail.Send", [ANNA_ALIAS])  # any of its addresses
    rbac = token_for(NO_CONSENT)
    assert send(graph, ca, rbac).status_code == 202
    assert error(send(graph, ca, rbac, user=BO)) == (
        403,
        "ErrorAccessDenied",
        "Access is denied. Check credentials and try again.",
    )
    assert error(reconcile(graph, ca, rbac, "<a@crm>"))[:2] == (403, "ErrorAccessDenied")
    graph.assign_app_role(NO_CONSENT, "Mail.ReadBasic.All", None)  # the whole organisation
    assert reconcile(graph, ca, rbac, "<a@crm>", user=BO).status_code == 200
    assert error(call(graph, ca, "GET", f"/users/{ANNA}", rbac))[:2] == (
        403,
        "Authorization_RequestDenied",  # the directory is not Exchange's to grant
    )
    graph.remove_app_roles(NO_CONSENT)
    assert error(send(graph, ca, rbac))[:2] == (401, "NoPermissionsInAccessToken")
    assert [d.sender for d in graph.delivered] == [ANNA]


def test_a_scoped_role_does_not_narrow_a_role_in_the_token(
    graph: GraphServer, ca: TestCA, token: str
) -> None:
    graph.assign_app_role(CLIENT, "Mail.Send", [BO])  # permissions are additive
    assert send(graph, ca, token).status_code == 202


# --------------------------------------------------------------------------- validation


def _recipients(n: int) -> list[dict[str, Any]]:
    return [{"emailAddress": {"address": f"r{i}@example.com"}} for i in range(n)]


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"toRecipients": [{"emailAddress": {"address": "not-an-address"}}]}, 400,
         "ErrorInvalidRecipients"),
        ({"toRecipients": []}, 400, "ErrorInvalidRecipients"),
        ({"toRecipients": _recipients(501)}, 400, "ErrorInvalidRecipients"),
        ({"body": {"contentType": "Markdown", "content": "x"}}, 400, "RequestBodyRead"),
        ({"internetMessageHeaders": [{"name": "In-Reply-To", "value": "<x@y>"}]}, 400,
         "InvalidInternetMessageHeader"),
        ({"internetMessageHeaders": [{"name": f"x-h{i}", "value": "v"} for i in range(6)]},
         400, "InvalidInternetMessageHeaderCollection"),
        ({"internetMessageHeaders": []}, 400, "InvalidInternetMessageHeaderCollection"),
        ({"colour": "red"}, 400, "RequestBodyRead"),
        ({"attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a",
                           "contentBytes": "!!not base64!!"}]}, 400, "RequestBodyRead"),
        ({"attachments": [{"name": "a", "contentBytes": "YQ=="}]}, 400, "RequestBodyRead"),
    ],
    ids=[
        "bad-address",
        "no-recipients",
        "501-recipients",
        "content-type",
        "non-x-header",
        "six-headers",
        "empty-headers",
        "unknown-property",
        "bad-base64",
        "attachment-without-type",
    ],
)  # fmt: skip
def test_message_validation(
    graph: GraphServer,
    ca: TestCA,
    token: str,
    overrides: dict[str, Any],
    status: int,
    code: str,
) -> None:
    assert error(send(graph, ca, token, message(**overrides)))[:2] == (status, code)
    assert graph.delivered == [] and graph.sent_items(ANNA) == []


def test_recipient_error_names_the_address(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.reject_recipients("gone@example.com")
    msg = message(toRecipients=[{"emailAddress": {"address": "gone@example.com"}}])
    _, code, text = error(send(graph, ca, token, msg))
    assert code == "ErrorInvalidRecipients"
    assert text.startswith("At least one recipient isn't valid., Recipient 'gone@example.com'")
    headers = [{"name": "X-Ok", "value": "1"}, {"name": "References", "value": "<x@y>"}]
    _, _, text = error(send(graph, ca, token, message(internetMessageHeaders=headers)))
    assert text == "The internet message header name 'References' should start with 'x-' or 'X-'."


def test_payload_errors(graph: GraphServer, ca: TestCA, token: str) -> None:
    path = f"/users/{ANNA}/sendMail"
    json_type = {"Content-Type": "application/json"}
    broken = call(graph, ca, "POST", path, token, data=b"{not json", headers=json_type)
    assert error(broken)[:2] == (400, "BadRequest")
    empty = call(graph, ca, "POST", path, token, data=b"", headers=json_type)
    assert error(empty)[2] == "Empty Payload. JSON content expected."
    extra = call(graph, ca, "POST", path, token, json={"message": message(), "urgent": True})
    assert error(extra)[:2] == (400, "RequestBodyRead")
    assert graph.delivered == []


def test_request_over_4mb(graph: GraphServer, ca: TestCA, token: str) -> None:
    big = base64.b64encode(b"\0" * (3 * 1024 * 1024 + 200_000)).decode()  # > 4 MiB as base64
    attachment = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "big.bin",
                  "contentBytes": big}  # fmt: skip
    assert error(send(graph, ca, token, message(attachments=[attachment]))) == (
        400,
        "BadRequest",
        "The maximum request length supported is 4MB.",
    )
    assert graph.delivered == [] and graph.send_requests == 1


def test_message_size_limit_and_413_variant(
    ca: TestCA, registry: TokenRegistry, token: str
) -> None:
    with GraphServer(
        ca,
        registry,
        max_message_bytes=2_000,
        max_request_bytes=10_000,
        request_too_large_status=413,
    ) as graph:
        graph.add_mailbox(ANNA)
        blob = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.bin",
                "contentBytes": base64.b64encode(b"x" * 3_000).decode()}  # fmt: skip
        assert error(send(graph, ca, token, message(attachments=[blob])))[:2] == (
            400,
            "ErrorMessageSizeExceeded",
        )
        blob["contentBytes"] = base64.b64encode(b"x" * 9_000).decode()
        assert error(send(graph, ca, token, message(attachments=[blob])))[:2] == (
            413,
            "RequestEntityTooLarge",
        )
        assert graph.delivered == []


# --------------------------------------------------------------------------- $batch


def _batch_send(item_id: str, user: str = ANNA, **overrides: Any) -> dict[str, Any]:
    return {
        "id": item_id,
        "method": "POST",
        "url": f"/users/{user}/sendMail",
        "headers": {"Content-Type": "application/json"},
        "body": {"message": message(**overrides)},
    }


def test_batch_mixed_results(graph: GraphServer, ca: TestCA, token: str) -> None:
    requests_ = [
        _batch_send("1", internetMessageId="<b1@crm>"),
        _batch_send("2", toRecipients=[{"emailAddress": {"address": "nope"}}]),
        _batch_send("3", user="nobody@contoso.se"),
        {"id": "4", "method": "GET", "url": f"users/{ANNA}?$select=id"},  # needs User.Read.All
        {
            "id": "5",
            "method": "GET",
            "url": f"/users/{ANNA}/mailFolders/sentitems/messages?$select=internetMessageId",
        },
    ]
    reply = call(graph, ca, "POST", "/$batch", token, json={"requests": requests_})
    assert reply.status_code == 200
    responses = reply.json()["responses"]
    assert [r["id"] for r in responses] == ["5", "4", "3", "2", "1"]  # match by id, not order
    by_id = {r["id"]: r for r in responses}
    assert by_id["1"]["status"] == 202 and "body" not in by_id["1"]
    assert by_id["2"]["status"] == 400
    assert by_id["2"]["body"]["error"]["code"] == "ErrorInvalidRecipients"
    assert by_id["3"]["status"] == 404
    assert by_id["3"]["body"]["error"]["code"] == "ErrorInvalidUser"
    assert by_id["4"]["status"] == 403
    assert by_id["4"]["body"]["error"]["code"] == "Authorization_RequestDenied"
    assert by_id["5"]["status"] == 200  # ran in parallel with the send: may or may not see it
    assert by_id["5"]["headers"]["Content-Type"].startswith("application/json")

    [sent] = graph.delivered
    assert (sent.internet_message_id, sent.batch_item_id) == ("<b1@crm>", "1")
    assert graph.ops == {"$batch": 1, "sendMail": 3, "getUser": 1, "listMessages": 1}
    assert graph.send_requests == 3
    outer = graph.requests[-1]
    assert (outer.operation, outer.status, outer.batch_id) == ("$batch", 200, None)
    inner = [r for r in graph.requests if r.batch_id is not None]
    assert sorted(r.item_id or "" for r in inner) == ["1", "2", "3", "4", "5"]
    assert {r.client_id for r in inner} == {CLIENT}


def test_batch_items_are_throttled_individually(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.throttle(2, retry_after=3)
    batch = {"requests": [_batch_send(str(i), internetMessageId=f"<t{i}@crm>") for i in range(5)]}
    responses = call(graph, ca, "POST", "/$batch", token, json=batch).json()["responses"]
    throttled = [r for r in responses if r["status"] == 429]
    assert len(throttled) == 2
    for r in throttled:
        assert r["headers"]["Retry-After"] == "3"
        err = r["body"]["error"]
        assert (err["code"], err["message"]) == (
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        )
    accepted = {r["id"] for r in responses if r["status"] == 202}
    assert len(accepted) == 3
    assert {d.batch_item_id for d in graph.delivered} == accepted


@pytest.mark.parametrize(
    ("requests_", "text"),
    [
        ([_batch_send(str(i)) for i in range(21)], "limit is 20"),
        ([_batch_send("a"), _batch_send("A")], "not unique"),
        (
            [{"id": "1", "method": "POST", "url": f"/users/{ANNA}/sendMail",
              "body": {"message": message()}}],
            "Write request id : 1 does not contain Content-Type header or body.",
        ),
        ([{"id": "1", "method": "GET"}], "Invalid batch payload format."),
    ],
    ids=["21-requests", "duplicate-ids", "no-content-type", "no-url"],
)  # fmt: skip
def test_batch_rejected_as_a_whole(
    graph: GraphServer, ca: TestCA, token: str, requests_: list[dict[str, Any]], text: str
) -> None:
    status, code, message_text = error(
        call(graph, ca, "POST", "/$batch", token, json={"requests": requests_})
    )
    assert (status, code) == (400, "BadRequest")
    assert text in message_text
    assert graph.delivered == [] and graph.send_requests == 0


def test_batch_depends_on_and_failed_dependency(graph: GraphServer, ca: TestCA, token: str) -> None:
    first = _batch_send("1", toRecipients=[{"emailAddress": {"address": "bad"}}])
    second = {**_batch_send("2"), "dependsOn": ["1"]}
    responses = call(
        graph, ca, "POST", "/$batch", token, json={"requests": [second, first]}
    ).json()["responses"]
    assert {r["id"]: r["status"] for r in responses} == {"1": 400, "2": 424}
    assert graph.delivered == []


def test_batch_needs_a_valid_outer_token(graph: GraphServer, ca: TestCA) -> None:
    reply = call(graph, ca, "POST", "/$batch", "aaa.bbb.ccc", json={"requests": [_batch_send("1")]})
    assert error(reply)[:2] == (401, "InvalidAuthenticationToken")


# --------------------------------------------------------------------------- faults


def test_throttle_then_success(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.throttle(2, retry_after=1)
    for _ in range(2):
        reply = send(graph, ca, token)
        assert reply.status_code == 429
        assert reply.headers["Retry-After"] == "1"
        assert error(reply)[1:] == (
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        )
    assert graph.delivered == []
    assert send(graph, ca, token).status_code == 202
    assert [r.status for r in graph.requests] == [429, 429, 202]
    assert [r.error_code for r in graph.requests][:2] == ["ApplicationThrottled"] * 2


def test_mailbox_concurrency_limit(ca: TestCA, registry: TokenRegistry, token: str) -> None:
    clock = FakeClock()
    statuses: list[int] = []
    answered = threading.Condition()

    def worker(graph: GraphServer) -> None:
        reply = send(graph, ca, token)
        with answered:
            statuses.append(reply.status_code)
            answered.notify_all()

    with make_graph(ca, registry, clock=clock) as graph:
        graph.delay(0.6)  # each admitted request sleeps in its slot, on the clock,
        clock.hold()  # which keeps the sleepers asleep until released
        threads = [threading.Thread(target=worker, args=(graph,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            # Four requests hold the mailbox's four slots; the other four are refused
            # while they do (the timeouts only fire when that never happens).
            assert clock.wait_for_sleepers(4) == 4
            with answered:
                answered.wait_for(lambda: len(statuses) == 4, timeout=10)
                assert statuses == [429] * 4
        finally:
            clock.release()
            for thread in threads:
                thread.join()
        assert sorted(statuses) == [202] * 4 + [429] * 4
        assert graph.peak_mailbox_concurrency == 4
        assert clock.sleeps == [0.6] * 4  # only the admitted ones were held
        assert len(graph.delivered) == 4


def test_http_503(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.http_503(1, retry_after=5)
    reply = send(graph, ca, token)
    assert error(reply)[:2] == (503, "serviceNotAvailable")
    assert reply.headers["Retry-After"] == "5"
    assert graph.delivered == []
    assert send(graph, ca, token).status_code == 202


def test_drop_after_request_delivers_and_reconcile_finds_it(
    graph: GraphServer, ca: TestCA, token: str
) -> None:
    graph.drop_after_request(1)
    with pytest.raises(requests.ConnectionError):
        send(graph, ca, token, message(internetMessageId="<ambiguous@crm>"))
    [sent] = graph.delivered  # the ambiguous case: delivered, never answered
    assert sent.internet_message_id == "<ambiguous@crm>"
    record = graph.requests[-1]
    assert record.dropped and record.status == 202
    # The dedupe check a client makes before re-sending (not itself dropped: only sends are).
    [found] = reconcile(graph, ca, token, "<ambiguous@crm>").json()["value"]
    assert found["internetMessageId"] == "<ambiguous@crm>"


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_error_after_processing_delivers_the_mail(
    graph: GraphServer, ca: TestCA, token: str, status: int
) -> None:
    graph.fail_after_processing(status)
    reply = send(graph, ca, token, message(internetMessageId="<accepted@crm>"))
    assert reply.status_code == status and reply.headers["request-id"]
    assert [d.internet_message_id for d in graph.delivered] == ["<accepted@crm>"]
    batch = {"requests": [_batch_send("1"), _batch_send("2")]}
    graph.fail_after_processing(status)
    assert call(graph, ca, "POST", "/$batch", token, json=batch).status_code == status
    assert len(graph.delivered) == 3  # both items went


def test_server_error_for_one_batch_item_after_processing(
    graph: GraphServer, ca: TestCA, token: str
) -> None:
    graph.fail_after_processing(504, in_batch=True)
    batch = {"requests": [_batch_send("1"), _batch_send("2")]}
    reply = call(graph, ca, "POST", "/$batch", token, json=batch)
    assert reply.status_code == 200
    statuses = sorted(item["status"] for item in reply.json()["responses"])
    assert statuses == [202, 504]
    assert sorted(d.batch_item_id or "" for d in graph.delivered) == ["1", "2"]  # both went


def test_drop_after_batch(graph: GraphServer, ca: TestCA, token: str) -> None:
    graph.drop_after_request(1)
    batch = {"requests": [_batch_send("1"), _batch_send("2")]}
    with pytest.raises(requests.ConnectionError):
        call(graph, ca, "POST", "/$batch", token, json=batch)
    assert sorted(d.batch_item_id or "" for d in graph.delivered) == ["1", "2"]


# --------------------------------------------------------------------------- routing


def test_routing_errors(graph: GraphServer, ca: TestCA, token: str) -> None:
    me = call(graph, ca, "POST", "/me/sendMail", token, json={"message": message()})
    assert error(me) == (
        400,
        "BadRequest",
        "/me request is only valid with delegated authentication flow.",
    )
    unknown = call(graph, ca, "GET", f"/users/{ANNA}/mailbox", token)
    assert error(unknown)[1:] == ("BadRequest", "Resource not found for the segment 'mailbox'.")
    wrong_method = call(graph, ca, "GET", f"/users/{ANNA}/sendMail", token)
    assert error(wrong_method)[:2] == (405, "Request_BadRequest")
    lower_case = call(
        graph, ca, "POST", f"/users/{ANNA}/sendmail", token, json={"message": message()}
    )
    assert lower_case.status_code == 202  # OData segments are case-insensitive
    beta = requests.post(
        f"{graph.base_url}/beta/users/{ANNA}/sendMail", verify=str(ca.ca_pem), timeout=10
    )
    assert error(beta)[:2] == (400, "BadRequest")
