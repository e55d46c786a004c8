"""Exchange Online through Microsoft Graph ``sendMail`` (``exchange.api = graph``).

The same plugin, the same app registration and msal client (another scope), against
the Graph stand-in over TLS: batches with per-item answers, throttling, lost answers
and the reconcile that follows, and the Test connection ladder's Graph rungs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from crm_core.mail.addresses import Address
from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome
from crm_core.models import utcnow
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    ALIAS,
    CLIENT,
    RECIPIENT,
    TENANT,
    USER,
    ExchangeWorld,
    Sleep,
    exchange_world,
    make_message,
    steps,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import sleeps as sleeps
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    with exchange_world(make_crm(), ca) as w, with_graph(w):
        yield w


def graph_of(world: ExchangeWorld) -> GraphServer:
    assert world.graph is not None
    return world.graph


# --- sending ----------------------------------------------------------------------


def test_one_mail_is_one_send_mail(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    pdf = b"%PDF-1.7 offer \x00\xff"
    message = make_message(
        subject="Visning på Götgatan",
        html="<p>Hej <b>Åsa</b>!</p>",
        cc=["chef@example.org"],
        bcc=["arkiv@example.org"],
        attachments=[Attachment("offert.pdf", "application/pdf", pdf)],
    )
    message = type(message)(**{**message.__dict__, "reply_to": (Address("svar@contoso.se"),)})
    result = world.send_one(message)

    assert result.outcome is Outcome.SENT, result
    [sent] = graph.delivered
    assert sent.internet_message_id == message.message_id
    assert (sent.mailbox, sent.sender, sent.client_id) == (USER, USER, CLIENT)
    assert (sent.subject, sent.html_body) == ("Visning på Götgatan", "<p>Hej <b>Åsa</b>!</p>")
    assert (sent.to, sent.cc, sent.bcc, sent.reply_to) == (
        (RECIPIENT,),
        ("chef@example.org",),
        ("arkiv@example.org",),
        ("svar@contoso.se",),
    )
    assert sent.attachments == (("offert.pdf", pdf),)
    assert [c.internet_message_id for c in graph.sent_items(USER)] == [message.message_id]
    assert graph.ops == {"sendMail": 1}
    assert world.ews.requests == []  # EWS is not used at all
    assert world.entra.token_requests == 1


def test_45_mails_go_in_three_batches_with_one_token(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    messages = [make_message(n) for n in range(45)]
    results = world.send(messages)
    assert [r.outcome for r in results] == [Outcome.SENT] * 45
    assert graph.ops == {"$batch": 3, "sendMail": 45}
    assert sorted(d.internet_message_id for d in graph.delivered) == sorted(
        m.message_id for m in messages
    )
    assert world.entra.token_requests == 1
    assert graph.peak_mailbox_concurrency <= 4


def test_mixed_batch_answers_per_message(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    graph.reject_recipients("okand@example.org")
    messages = [make_message(1), make_message(2, to=["okand@example.org"]), make_message(3)]
    results = world.send(messages)
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT, Outcome.SENT]
    assert results[1].code == "ErrorInvalidRecipients"
    assert results[1].detail.startswith("Error validating e-mail: Exchange refused a recipient")
    assert graph.ops["$batch"] == 1 and graph.send_requests == 3
    assert len(graph.delivered) == 2


def test_throttled_items_wait_for_retry_after(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    graph.throttle(2, retry_after=7)
    results = world.send([make_message(n) for n in range(5)])
    throttled = [r for r in results if r.outcome is Outcome.THROTTLED]
    assert len(throttled) == 2
    assert {(r.code, r.retry_after) for r in throttled} == {("ApplicationThrottled", 7.0)}
    assert len(graph.delivered) == 3


def test_503_with_retry_after_is_throttled(world: ExchangeWorld, sleeps: list[Sleep]) -> None:
    graph = graph_of(world)
    graph.http_503(1, retry_after=20)
    result = world.send_one()
    # Retry-After is passed on to the outbox, not waited out by the client: the one
    # sendMail got the 503, none followed it (urllib3's Retry would sleep 20 s and
    # send again), and nothing slept.
    assert (result.outcome, result.retry_after) == (Outcome.THROTTLED, 20.0)
    # (The gateway answers before routing, so the record has no operation: use the path.)
    answered = [(r.method, r.path.rsplit("/", 1)[-1], r.status) for r in graph.requests]
    assert answered == [("POST", "sendMail", 503)]
    assert sleeps == []
    assert graph.delivered == []


def test_lost_answer_is_ambiguous_and_reconcile_finds_the_mails(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    graph.drop_after_request(1)
    lost = [make_message(1), make_message(2)]
    results = world.send(lost)
    assert {r.outcome for r in results} == {Outcome.AMBIGUOUS}
    assert len(graph.delivered) == 2  # both went

    never = make_message(3, handed_over=timedelta(minutes=10))
    found = world.crm.reconcile_mail(world.account(), [*lost, never], utcnow())
    assert [r.sent for r in found] == [True, True, False]
    assert len(graph.delivered) == 2  # looking sends nothing


def test_reconcile_right_after_a_send_waits_for_the_sent_items_copy(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    graph.outbox_lag(30)  # filed nowhere yet: not even in the Outbox
    graph.sent_items_lag(30)
    graph.drop_after_request(1)
    message = make_message(age=timedelta(hours=1))
    assert world.send_one(message).outcome is Outcome.AMBIGUOUS
    handed_over = type(message)(**{**message.__dict__, "handed_over_at": utcnow()})
    [found] = world.crm.reconcile_mail(world.account(), [handed_over], utcnow())
    assert found.sent is None  # not "not sent": that would send it twice
    assert "look again later" in found.detail


def test_revoked_token_is_evicted_and_retried_once(world: ExchangeWorld) -> None:
    world.send_one()
    world.registry.revoke_all()
    assert world.send_one().outcome is Outcome.SENT
    assert world.entra.token_requests == 2


def test_alias_as_username_pauses_and_stops_the_batch(world: ExchangeWorld) -> None:
    world.set_user("exchange.username", ALIAS)
    results = world.send([make_message(n) for n in range(25)])  # two requests: 20 + 5
    assert {(r.outcome, r.code) for r in results} == {(Outcome.CONFIGURATION, "ErrorInvalidUser")}
    assert f"Microsoft Graph cannot find the user {ALIAS}" in results[0].detail
    assert graph_of(world).ops["$batch"] == 1  # the second request was not made


def test_mailbox_outside_the_apps_rbac_scope(world: ExchangeWorld) -> None:
    graph_of(world).deny_mailboxes(USER)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "ErrorAccessDenied")
    assert "outside the app's RBAC scope" in result.detail and "Mail.Send" in result.detail


def test_password_cannot_sign_in_to_graph(world: ExchangeWorld) -> None:
    for key in ("exchange.client_id", "exchange.tenant_id", "exchange.client_secret"):
        world.unset_system(key)
    world.set_user("exchange.password", "x")
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "exchange.api")
    assert "Microsoft Graph needs the OAuth codes" in result.detail


# --- Test connection --------------------------------------------------------------


def test_graph_ladder_green(world: ExchangeWorld) -> None:
    report = world.test_connection()
    assert report.summary == "Connected to Exchange"
    assert [(s.name, s.status.value) for s in report.steps] == [
        ("settings", "ok"),
        ("token", "ok"),
        ("permission", "ok"),
        ("mailbox", "ok"),
        ("lookup", "ok"),
        ("sync", "ok"),
    ]
    assert graph_of(world).ops == {"getUser": 1, "listMessages": 1}  # nothing sent
    assert "EWS retirement" not in steps(report)


def test_graph_without_mail_send(make_crm: CrmFactory, ca: TestCA) -> None:
    roles = ("full_access_as_app", "Mail.ReadBasic.All")  # EWS's role stays off Graph's token
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=roles):
        report = world.test_connection()
        assert report.summary == (
            "TestConnection error Credentials: the token lacks Mail.Send (it holds "
            "Mail.ReadBasic.All)"
        )
        assert steps(report)["mailbox"][0] == "skipped"
        assert (
            r := world.send_one()
        ).outcome is Outcome.CONFIGURATION and r.code == "ErrorAccessDenied"


def test_graph_without_admin_consent(make_crm: CrmFactory, ca: TestCA) -> None:
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=()):
        report = world.test_connection()
        assert steps(report)["permission"][0] == "warning"  # RBAC for Applications might grant
        status, detail, fix = steps(report)["mailbox"]  # Graph's answer decides
        assert (
            status == "failed" and report.summary == "TestConnection error Credentials: " + detail
        )
        assert "it carries no application permissions, so admin consent has not been granted" in (
            detail
        )
        assert "Mail.Send" in fix and "Grant admin consent" in fix


def test_graph_user_check_needs_user_read_all(make_crm: CrmFactory, ca: TestCA) -> None:
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=("Mail.Send",)):
        report = world.test_connection()
        assert report.ok and report.summary == "Connected to Exchange"
        status, detail, _ = steps(report)["mailbox"]
        assert status == "warning" and "no User.Read.All" in detail


def test_graph_alias_is_red(world: ExchangeWorld) -> None:
    world.set_user("exchange.username", ALIAS)
    report = world.test_connection()
    status, detail, fix = steps(report)["mailbox"]
    assert status == "failed"
    assert report.summary == "TestConnection error Credentials: " + detail
    assert "full primary address" in fix


def test_graph_mailbox_outside_the_apps_scope_is_red(world: ExchangeWorld) -> None:
    graph_of(world).deny_mailboxes(USER)  # RBAC for Applications: not in the app's scope
    report = world.test_connection()
    status, detail, fix = steps(report)["lookup"]
    assert status == "failed" and report.summary == "TestConnection error Credentials: " + detail
    assert detail.startswith(
        f"Microsoft Graph denies the app access to {USER} (HTTP 403 ErrorAccessDenied) although "
        "its token holds Mail.ReadBasic.All: the mailbox is outside the app's scope"
    )
    assert "Test-ServicePrincipalAuthorization" in fix
    assert world.send_one().code == "ErrorAccessDenied"  # what sending meets


def test_graph_user_address_not_of_the_mailbox_is_red(world: ExchangeWorld) -> None:
    graph_of(world).add_mailbox("info@contoso.se", tenant_id=TENANT)
    world.set_user("exchange.username", "info@contoso.se")  # not Anna's mailbox
    report = world.test_connection()
    status, detail, fix = steps(report)["mailbox"]
    assert status == "failed" and not report.ok
    assert detail == (
        f"the mailbox info@contoso.se may not send as {USER}: its addresses are "
        "info@contoso.se, so Exchange would refuse each mail (ErrorSendAsDenied)"
    )
    assert "Add-RecipientPermission" in fix
    assert world.send_one().code == "ErrorSendAsDenied"  # what sending meets


def test_graph_without_a_read_permission_is_a_yellow_step(make_crm: CrmFactory, ca: TestCA) -> None:
    roles = ("Mail.Send", "User.Read.All")
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=roles):
        report = world.test_connection()
        assert report.ok and report.summary == "Connected to Exchange"
        status, detail, fix = steps(report)["lookup"]
        assert status == "warning"
        assert detail.startswith(
            f"the app may not read mail in {USER} (no Mail.ReadBasic.All): sending works, but "
            "a mail whose answer is lost cannot be settled and stays unknown"
        )
        assert "Application permissions → Mail.ReadBasic.All" in fix
        assert world.send_one().outcome is Outcome.SENT


def test_graph_token_refused_twice_pauses_without_guessing_a_permission(
    world: ExchangeWorld,
) -> None:
    # A Graph of another cloud: it refuses every token of this one (Invalid audience).
    graph_of(world).accepted_audiences = ("https://graph.microsoft.us",)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "InvalidAuthenticationToken")
    assert "the token was refused twice" in result.detail
    assert "Invalid audience" in result.detail
    assert "exchange.authority" in result.detail and "Tenant ID" in result.detail
    assert "Mail.Send" not in result.detail and "consent" not in result.detail
    assert world.entra.token_requests == 2  # evicted and fetched again once
