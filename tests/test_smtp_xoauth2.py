"""SMTP with OAuth (XOAUTH2): msal really talks to the local Entra ID stand-in.

The SMTP test server accepts a bearer token only if the Entra stand-in issued it for
https://outlook.office365.com to an app holding SMTP.SendAsApp, as Exchange Online
checks it, so these tests fail if the transport sends the wrong token or user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from crm_core.errors import SettingValueError
from crm_core.mail.transport import Outcome, StepStatus
from tests.servers.entra import EntraServer, Secret, TokenRegistry
from tests.servers.smtp import SmtpServer
from tests.servers.tls import TestCA
from tests.smtp_fixtures import USER, Servers, SmtpCrm, make_message, servers
from tests.smtp_fixtures import ca as ca
from tests.smtp_fixtures import database_url as database_url
from tests.smtp_fixtures import setup as setup

TENANT = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"
CLIENT = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SECRET = "Kx7~crm.smtp-client-secret-value"
SECRET_ID = "11111111-2222-4333-8444-555555555555"
OUTLOOK = "https://outlook.office365.com"


@dataclass
class SeenTokens:
    """What the SMTP server was shown, checked against the Entra stand-in's registry."""

    registry: TokenRegistry
    tokens: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    def __call__(self, user: str, token: str) -> bool:
        self.tokens.append(token)
        self.users.append(user)
        info = self.registry.validate(token)
        return (
            info is not None
            and info.audience == OUTLOOK
            and info.client_id == CLIENT
            and "SMTP.SendAsApp" in info.roles
        )


@pytest.fixture
def registry() -> TokenRegistry:
    return TokenRegistry()


@pytest.fixture
def entra(ca: TestCA, registry: TokenRegistry) -> Iterator[EntraServer]:
    server = EntraServer(ca, registry)
    server.add_tenant(TENANT, domains=["contoso.onmicrosoft.com"])
    server.add_app(TENANT, CLIENT, secrets=[Secret(SECRET, SECRET_ID)], roles=("SMTP.SendAsApp",))
    with server:
        yield server


@pytest.fixture
def seen(registry: TokenRegistry) -> SeenTokens:
    return SeenTokens(registry)


@pytest.fixture
def smtp(ca: TestCA, seen: SeenTokens) -> Iterator[SmtpServer]:
    with servers() as running:
        yield oauth_server(running, ca, seen)


def oauth_server(running: Servers, ca: TestCA, seen: SeenTokens) -> SmtpServer:
    return running.start(
        security="starttls",
        ssl_context=ca.server_context(),
        auth_mechanisms=("XOAUTH2",),
        token_validator=seen,
        auth_required=True,
    )


def configure(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA, secret: str = SECRET
) -> None:
    setup.set_system(
        exchange_client_id=CLIENT,
        exchange_tenant_id=TENANT,
        exchange_authority=entra.base_url,
        tls_ca_bundle=str(ca.ca_pem),
        exchange_client_secret=secret,  # after what it is bound to
        smtp_oauth_hosts="127.0.0.1",  # the stand-in plays Microsoft 365
        smtp_host="127.0.0.1",
        smtp_port=str(smtp.port),
        smtp_timeout="5",
        smtp_auth="xoauth2",
    )


def test_batch_is_sent_with_a_token_from_entra(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA, seen: SeenTokens
) -> None:
    configure(setup, smtp, entra, ca)

    results = setup.send([make_message(n) for n in (1, 2, 3)])

    assert [r.outcome for r in results] == [Outcome.SENT] * 3, results[0].detail
    assert entra.token_requests == 1  # one token for the batch's three connections
    assert smtp.connections == 3
    assert smtp.auth_attempts == smtp.auth_successes == 3
    assert seen.users == [USER] * 3  # the SASL user defaults to the user's own address
    assert [g.auth_user for g in smtp.received] == [USER] * 3
    (token_post,) = [r for r in entra.log if r.method == "POST"]
    assert token_post.form["scope"] == f"{OUTLOOK}/.default"
    assert token_post.form["grant_type"] == "client_credentials"


def test_token_is_reused_until_it_nears_expiry(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA, seen: SeenTokens
) -> None:
    configure(setup, smtp, entra, ca)

    assert setup.send_one().outcome is Outcome.SENT
    assert setup.send_one().outcome is Outcome.SENT

    assert entra.token_requests == 1
    assert smtp.connections == 2
    assert len(set(seen.tokens)) == 1


def test_a_refused_cached_token_is_evicted_and_auth_retried_once(
    setup: SmtpCrm,
    smtp: SmtpServer,
    entra: EntraServer,
    ca: TestCA,
    seen: SeenTokens,
    registry: TokenRegistry,
) -> None:
    configure(setup, smtp, entra, ca)
    assert setup.send_one().outcome is Outcome.SENT
    registry.revoke_all()  # e.g. revoked by the tenant; msal still holds it

    result = setup.send_one()

    assert result.outcome is Outcome.SENT, result.detail
    assert entra.token_requests == 2
    assert smtp.auth_attempts == 3 and smtp.auth_successes == 2
    assert seen.tokens[1] == seen.tokens[0] != seen.tokens[2]


def test_app_without_smtp_permission_is_told_what_to_grant(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA
) -> None:
    entra.set_app(TENANT, CLIENT, roles=("full_access_as_app",))
    configure(setup, smtp, entra, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "535 5.7.3"
    assert "refused the OAuth token" in result.detail
    assert "SMTP.SendAsApp" in result.detail
    assert smtp.auth_attempts == 2  # one retry with a fresh token, no more
    assert entra.token_requests == 2


def test_wrong_client_secret_names_the_secret(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA
) -> None:
    configure(setup, smtp, entra, ca, secret=SECRET_ID)  # the Secret ID, a classic

    results = setup.send([make_message(1), make_message(2)])

    assert {r.outcome for r in results} == {Outcome.CONFIGURATION}
    assert results[0].code == "AADSTS7000215"
    assert "Secret ID" in results[0].detail
    assert smtp.auth_attempts == 0
    assert smtp.received == []


def test_entra_outage_is_temporary(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA
) -> None:
    configure(setup, smtp, entra, ca)
    entra.fail_next(5, status=503)

    result = setup.send_one()

    assert result.outcome is Outcome.TEMPORARY
    assert smtp.received == []


def test_smtp_username_overrides_the_sasl_user(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA, seen: SeenTokens
) -> None:
    configure(setup, smtp, entra, ca)
    setup.set_user(smtp_username="shared.mailbox@example.com")

    assert setup.send_one().outcome is Outcome.SENT
    assert seen.users == ["shared.mailbox@example.com"]


def test_xoauth2_cannot_be_chosen_before_the_entra_codes(setup: SmtpCrm) -> None:
    setup.set_system(exchange_client_id=CLIENT)

    with pytest.raises(SettingValueError) as refused:
        setup.set_system(smtp_auth="xoauth2")

    message = str(refused.value)
    assert "exchange.tenant_id" in message and "exchange.client_secret" in message
    assert "exchange.client_id," not in message


def test_connection_ladder_includes_the_token(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA
) -> None:
    configure(setup, smtp, entra, ca)

    report = setup.test_connection()

    assert report.ok, report
    names = [s.name for s in report.steps]
    assert names == ["settings", "resolve", "connect", "tls", "token", "auth", "sender"]
    assert "XOAUTH2" in report.steps[5].detail
    assert smtp.received == [] and smtp.rsets == 1


def test_connection_ladder_red_on_a_bad_secret(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA
) -> None:
    configure(setup, smtp, entra, ca, secret="not-the-secret")

    report = setup.test_connection()

    assert not report.ok
    token = next(s for s in report.steps if s.name == "token")
    assert token.status is StepStatus.FAILED
    assert "AADSTS7000215" in token.detail
    assert "exchange.client_secret" in token.fix
    assert [s.status for s in report.steps if s.name in ("auth", "sender")] == [
        StepStatus.SKIPPED,
        StepStatus.SKIPPED,
    ]


def test_the_token_goes_only_to_microsoft_or_a_listed_server(
    setup: SmtpCrm, smtp: SmtpServer, entra: EntraServer, ca: TestCA, seen: SeenTokens
) -> None:
    """The app-only token (with full_access_as_app it reads every mailbox) is handed
    over XOAUTH2 only to Microsoft's SMTP hosts or to one an administrator listed."""
    configure(setup, smtp, entra, ca)
    assert setup.send_one().outcome is Outcome.SENT
    setup.set_system(smtp_host="smtp.office365.com")  # Microsoft's: needs no listing
    with pytest.raises(SettingValueError, match=r"smtp\.oauth_hosts"):
        setup.set_user(smtp_host="localhost")  # a user's own server: refused
    setup.set_system(smtp_host="127.0.0.1")
    with setup.crm.transaction() as session:  # the administrator withdraws the listing
        setup.crm.settings_store().unset_system(session, "smtp.oauth_hosts")
    result = setup.send_one()
    assert result.outcome is Outcome.CONFIGURATION and "is neither" in result.detail
    report = setup.test_connection()
    assert not report.ok
    assert smtp.auth_attempts == 1 and len(seen.tokens) == 1  # only the first, listed send
    with pytest.raises(SettingValueError, match="app-only token for Exchange"):
        setup.set_system(smtp_auth="password")  # (any save works again after a fix)
        setup.set_system(smtp_auth="xoauth2")
