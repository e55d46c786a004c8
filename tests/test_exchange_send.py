"""Sending through the real exchangelib and msal, over HTTPS, to the local stand-ins.

Nothing of exchangelib or msal is patched: the plugin talks to the Entra ID stand-in
for tokens and to the EWS stand-in for SOAP, over TLS trusted through the
``tls.ca_bundle`` setting, and each test reads what the servers saw.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from crm_core.mail.addresses import Address
from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome
from crm_core.models import utcnow
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    ALIAS,
    CLIENT,
    ONPREM_USER,
    RECIPIENT,
    USER,
    USER_NAME,
    ExchangeWorld,
    Sleep,
    exchange_world,
    go_onprem,
    make_message,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import sleeps as sleeps
from tests.exchange_fixtures import world as world
from tests.servers.tls import TestCA

# --- the happy path -------------------------------------------------------------


def test_one_mail_is_sent_with_a_copy_in_sent_items(world: ExchangeWorld) -> None:
    message = make_message()
    result = world.send_one(message)

    assert result.outcome is Outcome.SENT, result
    [sent] = world.ews.delivered
    assert sent.internet_message_id == message.message_id  # the outbox's Message-ID
    assert (sent.to, sent.sender, sent.mailbox) == ((RECIPIENT,), USER, USER)
    [copy] = world.ews.sent_items(USER)
    assert copy.internet_message_id == message.message_id
    # Pinned: no autodiscover, no version guessing; two GetFolder once per Account.
    assert [r.operation for r in world.ews.requests] == ["GetFolder", "GetFolder", "CreateItem"]
    create = world.ews.requests[-1]
    assert (create.auth_kind, create.impersonated, create.anchor_mailbox) == ("Bearer", USER, USER)
    assert world.entra.token_requests == 1
    assert world.entra.discovery_requests == 0  # not a Microsoft host: no instance discovery


def test_html_attachments_unicode_cc_bcc_reply_to(world: ExchangeWorld) -> None:
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 40
    message = make_message(
        subject="Visning på Götgatan – fredag 🏠",
        text="Hej Åsa!\n",
        html="<p>Hej <b>Åsa</b>! Välkommen på visning.</p>",
        cc=["chef@example.org"],
        bcc=["arkiv@example.org"],
        attachments=[
            Attachment("offert å.pdf", "application/pdf", pdf),
            Attachment("karta.txt", "text/plain", "Götgatan 1\n".encode()),
        ],
    )
    message = type(message)(**{**message.__dict__, "reply_to": (Address("svar@contoso.se"),)})

    assert world.send_one(message).outcome is Outcome.SENT
    [sent] = world.ews.delivered
    assert sent.subject == "Visning på Götgatan – fredag 🏠"
    assert sent.html_body == "<p>Hej <b>Åsa</b>! Välkommen på visning.</p>"
    assert (sent.cc, sent.bcc, sent.reply_to) == (
        ("chef@example.org",),
        ("arkiv@example.org",),
        ("svar@contoso.se",),
    )
    assert sent.attachments == (("offert å.pdf", pdf), ("karta.txt", "Götgatan 1\n".encode()))
    [copy] = world.ews.sent_items(USER)
    assert copy.bcc == [(None, "arkiv@example.org")]  # the copy keeps the Bcc; recipients don't


def test_plain_text_mail_keeps_a_text_body(world: ExchangeWorld) -> None:
    assert world.send_one(make_message(text="Rad ett\nRad två\n")).outcome is Outcome.SENT
    [sent] = world.ews.delivered
    assert sent.text_body == "Rad ett\nRad två\n" and sent.html_body is None


def test_sender_name_is_the_crm_users_name(world: ExchangeWorld) -> None:
    world.send_one()
    [copy] = world.ews.sent_items(USER)
    assert copy.sender == USER
    assert world.account().name == USER_NAME


# --- tokens and batches ---------------------------------------------------------


def test_200_mails_make_one_token_request(world: ExchangeWorld) -> None:
    messages = [make_message(n) for n in range(1, 201)]
    results = world.send(messages)

    assert [r.outcome for r in results] == [Outcome.SENT] * 200
    assert {d.internet_message_id for d in world.ews.delivered} == {m.message_id for m in messages}
    assert world.entra.token_requests == 1
    assert world.ews.messages_per_request == [50, 50, 50, 50]
    assert world.ews.ops == {"GetFolder": 2, "CreateItem": 4}
    assert world.ews.connections_accepted == 1  # one keep-alive connection
    # A second batch reuses the cached Account and token.
    assert all(r.outcome is Outcome.SENT for r in world.send([make_message(201)]))
    assert world.entra.token_requests == 1
    assert world.ews.ops == {"GetFolder": 2, "CreateItem": 5}


def test_mixed_batch_reports_each_message_and_resends_nothing(world: ExchangeWorld) -> None:
    good1, good2 = make_message(1), make_message(3)
    bad = make_message(2)
    bad = type(bad)(**{**bad.__dict__, "to": (Address("kund@example"),)})  # no dot: unresolvable
    world.ews.set_invalid_smtp_addresses("fel@example.org")
    bad_smtp = make_message(4, to=["fel@example.org"])

    results = world.send([good1, bad, good2, bad_smtp])

    assert [r.outcome for r in results] == [
        Outcome.SENT,
        Outcome.PERMANENT,
        Outcome.SENT,
        Outcome.PERMANENT,
    ]
    assert results[1].code == "ErrorInvalidRecipients"
    assert results[1].detail.startswith("Error validating e-mail: Exchange refused a recipient")
    assert "an extra space or an invalid character" in results[1].detail
    assert results[3].code == "ErrorInvalidSmtpAddress"
    assert world.ews.messages_per_request == [4]  # one request, per-message answers
    assert [d.internet_message_id for d in world.ews.delivered] == [
        good1.message_id,
        good2.message_id,
    ]


def test_message_too_large_is_permanent_for_that_message_only(
    make_crm: CrmFactory, ca: TestCA
) -> None:
    with exchange_world(make_crm(), ca) as world:
        world.ews.max_message_bytes = 200_000
        big = make_message(
            1, attachments=[Attachment("big.bin", "application/octet-stream", b"x" * 300_000)]
        )
        small = make_message(2)
        results = world.send([big, small])
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.SENT]
    assert results[0].code == "ErrorMessageSizeExceeded"
    assert "larger than Exchange accepts" in results[0].detail


def test_message_exchangelib_refuses_is_permanent_not_ambiguous(world: ExchangeWorld) -> None:
    too_long = make_message(1, subject="Visning " * 40)  # EWS subjects hold 255 characters
    fine = make_message(2)
    results = world.send([too_long, fine])
    assert [(r.outcome, r.code) for r in results] == [
        (Outcome.PERMANENT, "invalid-message"),
        (Outcome.SENT, ""),
    ]
    assert "('subject' value exceeds length 255)" in results[0].detail
    assert [d.internet_message_id for d in world.ews.delivered] == [fine.message_id]


# --- temporary failures: back-off from the server, no sleeping here --------------


def test_server_busy_is_throttled_with_the_servers_back_off(
    world: ExchangeWorld, sleeps: list[Sleep]
) -> None:
    world.send_one()  # warm: folders cached, so the fault hits the CreateItem
    seen = len(world.ews.requests)
    world.ews.server_busy(1, back_off_ms=4500)
    result = world.send_one()
    # The server's back-off is passed on to the outbox ...
    assert (result.outcome, result.code, result.retry_after) == (
        Outcome.THROTTLED,
        "ErrorServerBusy",
        4.5,
    )
    # ... not waited out here: one CreateItem, no retry after it, nothing slept
    # (exchangelib's FaultTolerance would sleep 4.5 s and send the CreateItem again).
    assert [(r.operation, r.status) for r in world.ews.requests[seen:]] == [("CreateItem", 500)]
    assert world.ews.requests[-1].response_codes == ("ErrorServerBusy",)
    assert sleeps == []
    assert len(world.ews.delivered) == 1
    assert world.send_one().outcome is Outcome.SENT  # the next attempt goes


def test_http_503_is_throttled_for_its_retry_after(
    world: ExchangeWorld, sleeps: list[Sleep]
) -> None:
    world.ews.http_503(1, retry_after=120)
    result = world.send_one()
    assert (result.outcome, result.retry_after) == (Outcome.THROTTLED, 120.0)
    # The first request got the 503 and nothing was sent after it: no retry, no sleep.
    assert [r.status for r in world.ews.requests] == [503]
    assert sleeps == []
    assert world.ews.delivered == []


def test_later_requests_of_a_batch_wait_after_a_busy_server(world: ExchangeWorld) -> None:
    world.send_one()
    messages = [make_message(n) for n in range(60)]  # two requests: 50 + 10
    world.ews.server_busy(1)
    results = world.send(messages)
    assert {r.outcome for r in results} == {Outcome.THROTTLED}
    assert len(world.ews.delivered) == 1  # the warm-up mail only
    assert world.ews.messages_per_request == [1, 50]  # the second request was never made


# --- ambiguous: the answer is lost after the request was processed ---------------


def test_dropped_answer_is_ambiguous_and_reconcile_finds_the_mail(world: ExchangeWorld) -> None:
    world.send_one()
    lost = make_message(2, handed_over=timedelta(0))
    # Handed over ten minutes ago, although queued just now: the window is over.
    never = make_message(3, handed_over=timedelta(minutes=10))
    # Queued long ago, handed over just now: the window is on.
    just_handed_over = make_message(4, age=timedelta(hours=1), handed_over=timedelta(0))
    world.ews.drop_after_request(1)
    [result] = world.send([lost])

    assert result.outcome is Outcome.AMBIGUOUS
    assert "may or may not" in result.detail
    assert lost.message_id in {d.internet_message_id for d in world.ews.delivered}

    found = world.crm.reconcile_mail(world.account(), [lost, never, just_handed_over], utcnow())
    assert [(r.message_id, r.sent) for r in found] == [
        (lost.message_id, True),
        (never.message_id, False),
        # Exchange files the Sent Items copy asynchronously: too early to say "not sent".
        (just_handed_over.message_id, None),
    ]
    assert found[0].detail == f"found in {USER}'s Sent Items"
    assert "look again later" in found[2].detail
    assert sum(1 for d in world.ews.delivered if d.internet_message_id == lost.message_id) == 1


def test_connection_refused_is_temporary_not_ambiguous(world: ExchangeWorld) -> None:
    world.ews.stop()  # nothing listens on the port any more
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, "connect")
    assert "nothing was sent" in result.detail


# --- tokens rejected by EWS: evict and retry once --------------------------------


def test_revoked_token_is_evicted_and_the_send_retried_once(world: ExchangeWorld) -> None:
    world.send_one()
    world.registry.revoke_all()  # EWS now answers 401 to the cached token
    result = world.send_one()
    assert result.outcome is Outcome.SENT
    assert world.entra.token_requests == 2
    assert [r.status for r in world.ews.requests[-2:]] == [401, 200]


def test_expired_token_is_renewed_through_msal(world: ExchangeWorld) -> None:
    world.send_one()
    world.registry.expire_all()
    assert world.send_one().outcome is Outcome.SENT
    assert world.entra.token_requests == 2


def test_missing_admin_consent_pauses_the_account_after_one_retry(world: ExchangeWorld) -> None:
    from tests.exchange_fixtures import TENANT

    world.entra.set_app(TENANT, CLIENT, roles=())  # token issued, but without roles
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "HTTP 401")
    assert "full_access_as_app" in result.detail and "admin consent" in result.detail
    assert world.entra.token_requests == 2  # the first token, then one retry
    assert world.ews.delivered == []


# --- configuration: the account is paused ----------------------------------------


def test_alias_as_username_is_a_configuration_error(world: ExchangeWorld) -> None:
    world.set_user("exchange.username", ALIAS)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "ErrorNonExistentMailbox")
    assert "full primary e-mail address" in result.detail


def test_impersonation_denied_is_a_configuration_error(world: ExchangeWorld) -> None:
    world.ews.deny_impersonation_for(USER)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "ErrorImpersonateUserDenied")
    assert "outside the app's per-mailbox scope" in result.detail
    assert "full_access_as_app" not in result.detail  # not a missing permission


def test_wrong_secret_fails_before_any_ews_request(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_secret", "not-the-value")
    results = world.send([make_message(1), make_message(2)])
    assert {(r.outcome, r.code) for r in results} == {(Outcome.CONFIGURATION, "AADSTS7000215")}
    assert world.ews.requests == []


def test_ews_blocked_for_the_tenant(world: ExchangeWorld) -> None:
    world.ews.ews_disabled = True
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "HTTP 403")
    assert "EwsAllowedAppIDs" in result.detail and "Microsoft Graph" in result.detail


def test_sync_not_ticked_stops_sending(world: ExchangeWorld) -> None:
    world.set_user("mail.transport", "maildir")  # untick only while another transport is chosen
    world.set_user("exchange.sync", "false")
    world.set_user("mail.transport", "exchange")
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "exchange.sync")
    assert "'Sync with Exchange' is not ticked" in result.detail
    assert world.ews.requests == [] and world.entra.token_requests == 0


def test_unticking_sync_while_sending_via_exchange_is_refused(world: ExchangeWorld) -> None:
    from crm_core.errors import SettingValueError

    with pytest.raises(SettingValueError, match="'Sync with Exchange' is not ticked"):
        world.set_user("exchange.sync", "false")


# --- TLS trust ------------------------------------------------------------------


def test_without_the_ca_bundle_the_certificate_is_refused(world: ExchangeWorld) -> None:
    world.unset_system("tls.ca_bundle")  # REQUESTS_CA_BUNDLE is the machine's store
    world.reenter_secrets()  # the client secret is bound to the CA bundle
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "tls")
    assert "could not be verified" in result.detail
    assert world.entra.token_requests == 0


def test_requests_ca_bundle_is_honoured(
    world: ExchangeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.unset_system("tls.ca_bundle")
    world.reenter_secrets()  # the client secret is bound to the CA bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(world.ca.ca_pem))
    assert world.send_one().outcome is Outcome.SENT


# --- on-premises: the user's own password ----------------------------------------


@pytest.fixture
def onprem(world: ExchangeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExchangeWorld:
    """Exchange Server without OAuth: Bo signs in with his own password."""
    monkeypatch.setenv("NTLM_USER_FILE", str(go_onprem(world, tmp_path / "ntlm")))
    world.email = ONPREM_USER
    return world


def test_onprem_ntlm(onprem: ExchangeWorld) -> None:
    result = onprem.send_one(make_message(sender=ONPREM_USER))
    assert result.outcome is Outcome.SENT, result
    assert {r.auth_kind for r in onprem.ews.requests if r.status == 200} == {"NTLM"}
    assert {r.impersonated for r in onprem.ews.requests} == {None}
    assert [i.sender for i in onprem.ews.sent_items(ONPREM_USER)] == [ONPREM_USER]
    assert onprem.entra.token_requests == 0


def test_onprem_basic(onprem: ExchangeWorld) -> None:
    onprem.set_system("exchange.onprem_auth", "basic")
    assert onprem.send_one(make_message(sender=ONPREM_USER)).outcome is Outcome.SENT
    assert {r.auth_kind for r in onprem.ews.requests if r.status == 200} == {"Basic"}


def test_onprem_wrong_password(onprem: ExchangeWorld) -> None:
    onprem.set_user("exchange.password", "wrong-password")
    result = onprem.send_one(make_message(sender=ONPREM_USER))
    assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "HTTP 401")
    assert "username or password" in result.detail


# --- Entra ID trouble is the token's, not the mail's ------------------------------


def test_entra_outage_is_temporary(world: ExchangeWorld) -> None:
    world.entra.fail_next(1, status=503)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, "MsalServiceError")
    assert "Entra ID answered with a server error" in result.detail
    assert world.ews.requests == []


def test_entra_throttling_is_temporary(world: ExchangeWorld) -> None:
    world.entra.throttle_next(1, retry_after=1)
    result = world.send_one()
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, "AADSTS90055")


def test_describe_route_names_server_mailbox_and_sign_in(world: ExchangeWorld) -> None:
    route = world.crm.describe_route(world.account())
    assert route is not None
    assert (route.transport, route.server, route.account) == ("exchange", world.url, USER)
    assert f"app-only OAuth, client {CLIENT}, impersonation" in route.notes
    assert world.ews.requests == [] and world.entra.token_requests == 0  # no network
