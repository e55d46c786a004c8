"""Test connection ("Testa anslutning"): one test per error case the guide names.

Each test misconfigures one thing the way a customer does, runs the ladder against the
stand-ins with the real msal and exchangelib, and asserts the text the user reads: the
summary line (the guide's "TestConnection error Credentials" where the guide uses it,
then the precise cause) and the red step's fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crm_core.mail.transport import ConnectionReport, Outcome, StepStatus
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    ALIAS,
    CLIENT,
    EXPIRED_SECRET,
    ONPREM_USER,
    OTHER_CLIENT,
    SECRET_ID,
    TENANT,
    TENANT_DOMAIN,
    USER,
    ExchangeWorld,
    days_from_today,
    exchange_world,
    go_onprem,
    steps,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import world as world
from tests.servers.tls import TestCA

CREDENTIALS = "TestConnection error Credentials: "


def red(report: ConnectionReport, step: str) -> tuple[str, str]:
    """The failed step's (detail, fix), after checking the report is red there."""
    assert not report.ok
    status, detail, fix = steps(report)[step]
    assert status == "failed", steps(report)
    return detail, fix


# --- green ----------------------------------------------------------------------


def test_green_reads_connected_to_exchange(world: ExchangeWorld) -> None:
    report = world.test_connection()
    assert report.ok
    assert report.summary == "Connected to Exchange"
    assert [(s.name, s.status) for s in report.steps] == [
        ("settings", StepStatus.OK),
        ("token", StepStatus.OK),
        ("mailbox", StepStatus.OK),
        ("sync", StepStatus.OK),
    ]
    assert "impersonation" in steps(report)["mailbox"][1]
    # Nothing was sent: one GetFolder proves the mailbox and the impersonation right.
    assert world.ews.delivered == []
    assert world.ews.ops == {"GetFolder": 1}
    assert world.ews.requests[0].impersonated == USER


def test_tenant_given_as_its_domain(world: ExchangeWorld) -> None:
    world.set_system("exchange.tenant_id", "contoso.onmicrosoft.com")
    world.reenter_secrets()  # bound to the setting just changed
    assert world.test_connection().summary == "Connected to Exchange"


def test_each_test_asks_the_server_again(world: ExchangeWorld) -> None:
    assert world.test_connection().ok
    world.ews.deny_impersonation_for(USER)
    assert not world.test_connection().ok  # no cached Account answers for the server
    assert world.entra.token_requests == 1  # but the token is reused


# --- the guide's "TestConnection error Credentials" -------------------------------


def test_secret_id_pasted_instead_of_value(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_secret", SECRET_ID)
    report = world.test_connection()
    detail, fix = red(report, "token")
    assert report.summary == CREDENTIALS + detail
    assert detail.startswith("The client secret is not valid (AADSTS7000215)")
    assert "Secret ID may have been pasted instead of its Value" in detail
    assert "copy the secret's Value (not the Secret ID)" in fix
    assert steps(report)["client secret"][0] == "warning"  # GUID-shaped: a Secret ID
    assert steps(report)["mailbox"][0] == "skipped"
    assert world.ews.requests == []


def test_wrong_secret_value(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_secret", "a-mistyped-secret-value")
    report = world.test_connection()
    detail, _ = red(report, "token")
    assert detail.startswith("The client secret is not valid")
    assert report.summary.startswith(CREDENTIALS + "The client secret is not valid (AADSTS7000215)")
    assert "client secret" not in steps(report)  # not GUID-shaped: no Secret ID warning


def test_expired_secret_names_the_date(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_secret", EXPIRED_SECRET)
    world.set_system("exchange.client_secret_expires", "2026-03-01")
    report = world.test_connection()
    detail, fix = red(report, "token")
    assert detail == "The client secret has expired on 2026-03-01 (AADSTS7000222)."
    assert (
        report.summary
        == CREDENTIALS + "The client secret has expired on 2026-03-01 (AADSTS7000222)."
    )
    assert "Create a new client secret" in fix and "exchange.client_secret_expires" in fix
    expiry_status, expiry, _ = steps(report)["credential expiry"]
    assert expiry_status == "warning" and "expired on 2026-03-01" in expiry


def test_unknown_client_id(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_id", OTHER_CLIENT)
    world.reenter_secrets()  # bound to the setting just changed
    report = world.test_connection()
    detail, fix = red(report, "token")
    assert report.summary == CREDENTIALS + detail
    assert detail == (
        f"Client ID {OTHER_CLIENT} is not an application in tenant {TENANT} (AADSTS700016)."
    )
    assert "Check Client ID and Tenant ID" in fix


def test_unknown_tenant(world: ExchangeWorld) -> None:
    other = "11111111-2222-4333-8444-555555555555"
    world.set_system("exchange.tenant_id", other)
    world.reenter_secrets()  # bound to the setting just changed
    report = world.test_connection()
    detail, fix = red(report, "token")
    assert report.summary == CREDENTIALS + detail
    assert detail == f"Tenant {other} was not found at {world.entra.base_url} (AADSTS90002)."
    assert "Check the Tenant ID" in fix
    assert world.entra.discovery_requests == 0  # not a Microsoft host: no instance discovery


def test_unknown_tenant_domain(world: ExchangeWorld) -> None:
    world.set_system("exchange.tenant_id", "fabrikam.se")
    world.reenter_secrets()  # bound to the setting just changed
    detail, _ = red(world.test_connection(), "token")
    assert detail.startswith("Tenant fabrikam.se was not found")


def test_consent_missing(world: ExchangeWorld) -> None:
    world.entra.set_app(TENANT, CLIENT, consented=False)
    report = world.test_connection()
    detail, fix = red(report, "token")
    assert report.summary == CREDENTIALS + detail
    assert "Admin consent has not been granted" in detail and "(AADSTS65001)" in detail
    assert "Grant admin consent" in fix


def test_admin_consent_not_granted_for_the_permission(world: ExchangeWorld) -> None:
    world.entra.set_app(TENANT, CLIENT, roles=())  # permission added, consent not granted
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert steps(report)["token"][0] == "ok"  # Entra still issues a token, without roles
    assert report.summary == CREDENTIALS + detail
    assert "carries no application permissions, so admin consent has not been granted" in detail
    assert "full_access_as_app" in fix and "Grant admin consent" in fix
    assert world.entra.token_requests == 2  # one eviction and retry after the 401


def test_full_access_as_app_missing(world: ExchangeWorld) -> None:
    # Some Exchange permissions, not EWS's: Exchange answers 403, as for EWS blocked for
    # the tenant; the token's roles tell the two apart.
    world.entra.set_app(TENANT, CLIENT, roles=("Mail.Send", "Calendars.ReadWrite.All"))
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == CREDENTIALS + detail
    assert detail == (
        "Exchange refused EWS to the app (HTTP 403): its token holds Mail.Send, "
        "Calendars.ReadWrite.All but not full_access_as_app, the application permission "
        "app-only EWS needs (this is not the tenant's EWS block)."
    )
    assert "full_access_as_app" in fix and "Grant admin consent" in fix
    assert "EwsAllowedAppIDs" not in detail + fix


def test_alias_instead_of_primary_address(world: ExchangeWorld) -> None:
    world.set_user("exchange.username", ALIAS)
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == CREDENTIALS + detail
    assert detail.startswith(f"Exchange cannot find a mailbox for {ALIAS} in the domain")
    assert "alias" in detail
    assert "full primary e-mail address" in fix and "not the alias @vitec.se" in fix
    assert steps(report)["username and domain"][0] == "warning"  # contoso.com ≠ contoso.se


def test_impersonation_refused_for_one_mailbox_is_its_scope(world: ExchangeWorld) -> None:
    other = "bo.ek@contoso.se"
    world.ews.add_mailbox(other, tenant_id=TENANT)
    world.add_user(other)
    for key, value in world.user_settings().items():
        world.set_user(key, other if key == "exchange.username" else value, email=other)
    world.ews.deny_impersonation_for(USER)

    assert world.test_connection(other).summary == "Connected to Exchange"  # same app
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == CREDENTIALS + detail
    assert detail.startswith(
        f"Exchange lets the app use EWS but not act as {USER} (ErrorImpersonateUserDenied): "
        "the mailbox is outside the app's per-mailbox scope (RBAC for Applications, or an "
        "application access policy)"
    )
    assert "no permission is missing" in detail
    assert f"Test-ServicePrincipalAuthorization -Identity <app> -Resource {USER}" in fix
    assert "Get-ApplicationAccessPolicy" in fix and "Grant admin consent" not in fix


# --- other red results ------------------------------------------------------------


def test_ews_blocked_for_the_tenant(world: ExchangeWorld) -> None:
    world.ews.ews_disabled = True
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == "Not connected to Exchange: " + detail
    assert "refuses EWS for this app (HTTP 403 on every request)" in detail
    assert "since October 2026" in detail and f"Client ID {CLIENT}" in detail
    assert "replaces as a whole, so the existing IDs must be included" in fix
    assert "Get-OrganizationConfig | Select-Object -ExpandProperty EwsAllowedAppIDs" in fix
    assert f'-EwsAllowedAppIDs "<the existing IDs>","{CLIENT}"' in fix
    assert "1 April 2027" in fix and "crm settings set exchange.api graph" in fix
    assert "Mail.Send, Mail.ReadBasic.All" in fix


def test_sync_with_exchange_not_ticked(world: ExchangeWorld) -> None:
    world.set_user("mail.transport", "maildir")
    world.set_user("exchange.sync", "false")
    world.set_user("mail.transport", "exchange")
    report = world.test_connection()
    detail, fix = red(report, "sync")
    assert report.summary == "Cannot send via Exchange: " + detail
    assert detail.startswith("'Sync with Exchange' is not ticked; it must be ticked")
    assert fix == "crm users set anna@contoso.se exchange.sync true"
    assert steps(report)["mailbox"][0] == "ok"  # the connection itself works


def test_incomplete_settings(world: ExchangeWorld) -> None:
    world.unset_system("exchange.url")
    world.unset_user("exchange.username")
    report = world.test_connection()
    detail, fix = red(report, "settings")
    assert "the Exchange URL is not set" in detail and "Username is not set" in detail
    assert "crm settings set exchange.url https://outlook.office365.com/EWS/Exchange.asmx" in fix
    assert report.summary == "Not connected to Exchange: " + detail
    assert steps(report)["token"][0] == "skipped" and steps(report)["mailbox"][0] == "skipped"


def test_incomplete_oauth_codes(world: ExchangeWorld) -> None:
    world.unset_system("exchange.client_secret")
    detail, fix = red(world.test_connection(), "settings")
    assert "the OAuth codes are incomplete: exchange.client_secret not saved" in detail
    assert "crm settings set exchange.client_secret" in fix


def test_secret_expiring_soon_is_a_warning_only(world: ExchangeWorld) -> None:
    world.set_system("exchange.client_secret_expires", days_from_today(12))
    report = world.test_connection()
    assert report.ok and report.summary == "Connected to Exchange"
    status, detail, _ = steps(report)["credential expiry"]
    assert status == "warning"
    assert detail.startswith(f"the client secret expires in 12 days ({days_from_today(12)})")


def test_wrong_path_on_the_server(world: ExchangeWorld) -> None:
    world.set_system("exchange.url", world.ews.base_url + "/mail/EWS/Exchange.asmx")
    detail, fix = red(world.test_connection(), "mailbox")
    assert (
        detail
        == f"There is no EWS service at {world.ews.base_url}/mail/EWS/Exchange.asmx (HTTP 404)."
    )
    assert "exchange.url" in fix


def test_server_not_reachable(world: ExchangeWorld) -> None:
    world.ews.stop()
    detail, _ = red(world.test_connection(), "mailbox")
    assert detail == "Could not connect to 127.0.0.1; nothing was sent."


def test_untrusted_certificate(world: ExchangeWorld) -> None:
    world.unset_system("tls.ca_bundle")
    world.reenter_secrets()  # bound to the setting just changed
    detail, fix = red(world.test_connection(), "token")
    assert detail == f"The TLS certificate of {world.entra.base_url} could not be verified."
    assert "tls.ca_bundle" in fix


# --- on-premises Exchange Server with the user's password --------------------------


@pytest.fixture
def onprem(world: ExchangeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExchangeWorld:
    """Exchange Server without OAuth: Bo signs in with his own password."""
    monkeypatch.setenv("NTLM_USER_FILE", str(go_onprem(world, tmp_path / "ntlm")))
    world.email = ONPREM_USER
    return world


def test_onprem_green(onprem: ExchangeWorld) -> None:
    report = onprem.test_connection()
    assert report.summary == "Connected to Exchange"
    assert steps(report)["token"][0] == "skipped"
    assert "password (NTLM)" in steps(report)["token"][1]
    assert steps(report)["mailbox"][1] == f"signed in to mailbox {ONPREM_USER}"


def test_onprem_wrong_password(onprem: ExchangeWorld) -> None:
    onprem.set_user("exchange.password", "not-my-password")
    report = onprem.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == CREDENTIALS + detail
    assert detail == f"Exchange refused the username or password of {ONPREM_USER} (HTTP 401)."
    assert "exchange.password" in fix


def test_onprem_untrusted_certificate(onprem: ExchangeWorld) -> None:
    onprem.unset_system("tls.ca_bundle")
    onprem.reenter_secrets()  # bound to the setting just changed
    detail, fix = red(onprem.test_connection(), "mailbox")
    assert detail == "The TLS certificate of 127.0.0.1 could not be verified."
    assert "tls.ca_bundle" in fix


def test_onprem_ews_disabled(onprem: ExchangeWorld) -> None:
    onprem.ews.ews_disabled = True
    detail, fix = red(onprem.test_connection(), "mailbox")
    assert detail == "Exchange at 127.0.0.1 refuses EWS access (HTTP 403)."
    assert "Set-CASMailbox -EwsEnabled $true" in fix


def test_line_default_transport_is_held_to_the_sync_rule(make_crm: CrmFactory, ca: TestCA) -> None:
    from tests.conftest import DEFAULT_TEST_CONFIG

    config = DEFAULT_TEST_CONFIG.replace(
        'default_transport = "maildir"', 'default_transport = "exchange"', 1
    )
    with exchange_world(make_crm(config), ca, configure=False) as world:
        world.add_user(USER)
        for key, value in world.system_settings().items():
            world.set_system(key, value)
        world.set_user("exchange.username", USER)
        world.set_user("exchange.domain", TENANT_DOMAIN)  # mail.transport never chosen
        problems = world.crm.sender_problems(world.account())
        assert [(p.key, p.message.split(";")[0]) for p in problems] == [
            ("exchange.sync", "'Sync with Exchange' is not ticked")
        ]


def test_token_refused_twice_names_what_to_check(world: ExchangeWorld) -> None:
    world.ews.accepted_audiences = ("https://outlook.office365.us",)  # another cloud's EWS
    report = world.test_connection()
    detail, fix = red(report, "mailbox")
    assert report.summary == CREDENTIALS + detail
    assert "the token was refused twice" in detail
    assert "Tenant ID" in fix and "exchange.authority" in fix
    assert "full_access_as_app" not in detail + fix and "consent" not in detail + fix
    assert world.entra.token_requests == 2
    [sent] = [world.send_one()]
    assert sent.outcome is Outcome.CONFIGURATION and "refused twice" in sent.detail
