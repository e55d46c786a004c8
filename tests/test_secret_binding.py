"""A stored secret goes only where it was saved for; an Exchange token only to Microsoft.

Each test points a setting that decides where a secret goes at a capture server (a
real stand-in on loopback, as an attacker's server would be) and shows that the
capture server receives no secret and no token, and that every screen says the
secret must be entered again.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from crm_core import SettingField, hookimpl
from crm_core.fields import FieldType, Scope
from crm_core.mail.transport import Outcome
from crm_core.settings import REENTER
from tests.conftest import CliResult, CrmFactory
from tests.exchange_fixtures import (
    SECRET,
    ExchangeWorld,
    add_standard_directory,
    make_message,
    steps,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import world as world
from tests.servers.entra import EntraServer
from tests.servers.ews import EwsServer
from tests.servers.tls import TestCA
from tests.smtp_fixtures import (
    PASSWORD,
    USER,
    Servers,
    SmtpCrm,
    make_smtp_crm,
    point_at,
    tls_server,
)
from tests.smtp_fixtures import running as running


def test_client_secret_is_not_sent_to_a_changed_authority(world: ExchangeWorld) -> None:
    capture = EntraServer(world.ca, world.registry)
    add_standard_directory(capture, EwsServer(world.ca, world.registry))  # knows the app
    with capture:
        world.set_system("exchange.authority", capture.base_url)
        report = world.test_connection()
        status, detail, _ = steps(report)["settings"]
        assert status == "failed"
        assert "must be entered again" in detail and "exchange.authority" in detail
        assert capture.token_requests == 0
        assert not any(r.has_client_secret for r in capture.log)
        world.reenter_secrets()  # the administrator types it in for the new authority
        assert world.test_connection().ok
        assert capture.token_requests == 1


def test_client_secret_is_not_sent_with_a_changed_ca_bundle(
    world: ExchangeWorld, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.servers.tls import make_test_ca

    other = make_test_ca(tmp_path_factory.mktemp("other-ca"))
    world.set_system("tls.ca_bundle", str(other.ca_pem))
    before = world.entra.token_requests
    account = world.account()
    assert dict(account.reenter) == {"exchange.client_secret": ("tls.ca_bundle",)}
    assert account.get("exchange.client_secret") is None
    assert not world.test_connection().ok
    assert world.entra.token_requests == before


def smtp_user(make_crm: CrmFactory, running: Servers, ca: TestCA) -> tuple[SmtpCrm, int]:
    """A user whose SMTP password is saved for one server; the port of a capture server."""
    setup = make_smtp_crm(make_crm())
    point_at(setup, tls_server(running, ca), ca)
    capture = tls_server(running, ca)
    return setup, capture.port


def test_smtp_password_is_not_sent_to_a_users_changed_server(
    make_crm: CrmFactory, running: Servers, ca: TestCA, run_crm: Callable[..., CliResult]
) -> None:
    setup, capture_port = smtp_user(make_crm, running, ca)
    good, capture = running.started
    assert setup.send_one().outcome is Outcome.SENT
    setup.set_user(smtp_port=str(capture_port))  # the user's own override
    result = setup.send_one()
    assert result.outcome is Outcome.CONFIGURATION and "entered again" in result.detail
    assert not setup.test_connection().ok
    assert capture.connections == 0 and capture.auth_attempts == 0
    shown = run_crm("users", "show", setup.email, env=make_crm.env)
    assert "smtp.password" in shown.stdout and "re-enter" in shown.stdout
    assert "smtp.port changed since it was saved" in shown.stdout
    views = json.loads(run_crm("users", "show", setup.email, "--json", env=make_crm.env).stdout)
    (view,) = [v for v in views["settings"] if v["key"] == "smtp.password"]
    assert (view["state"], view["reenter_because"]) == (REENTER, ["smtp.port"])
    setup.set_user(smtp_password=PASSWORD)  # entered again for the new server
    assert setup.send_one().outcome is Outcome.SENT
    assert capture.auth_attempts == 1 and good.auth_attempts == 1


def test_settings_show_and_save_say_which_secret_waits(
    world: ExchangeWorld, make_crm: CrmFactory, run_crm: Callable[..., CliResult]
) -> None:
    changed = run_crm("settings", "set", "exchange.tenant_id", "contoso.se", env=make_crm.env)
    assert changed.code == 0
    assert "exchange.client_secret must be entered again" in changed.stderr
    shown = run_crm("settings", "show", env=make_crm.env)
    assert "exchange.client_secret" in shown.stdout
    assert "re-enter" in shown.stdout and "exchange.tenant_id changed" in shown.stdout
    check = run_crm("check", env=make_crm.env)
    assert check.code == 1 and "Client secret must be entered again" in check.stdout


def test_a_third_party_secret_is_bound_by_its_declaration(make_crm: CrmFactory) -> None:
    class Vault:
        @hookimpl
        def register_settings(self) -> list[SettingField]:
            return [
                SettingField("vault.url", Scope.SYSTEM, "Vault URL"),
                SettingField(
                    "vault.token", Scope.SYSTEM, "Token", FieldType.SECRET, bound_to=("vault.url",)
                ),
            ]

    config = '[product_lines.sales]\nplugins = ["maildir_mail", "vault"]\n'
    config += 'default_transport = "maildir"\n'
    crm = make_crm(config, extra_plugins=(("vault", Vault()),))
    with crm.transaction() as session:
        crm.set_system_setting(session, "vault.url", "https://vault.example.com")
        crm.set_system_setting(session, "vault.token", "t0ken-value")
        assert "vault.token" in crm.settings_store().resolve(session).system
        outcome = crm.set_system_setting(session, "vault.url", "https://evil.example.net")
        assert outcome.reenter == ("vault.token",)
        found = crm.settings_store().resolve(session)
        assert "vault.token" not in found.system
        assert found.reenter == {"vault.token": ("vault.url",)}
        (view,) = [
            v for v in crm.settings_store().describe_system(session) if v.key == "vault.token"
        ]
        assert view.state == REENTER and "vault.url" in view.reenter_words


# --- secrets on the command line ---------------------------------------------------------


def test_secret_as_an_argument_is_refused(
    make_crm: CrmFactory, run_crm: Callable[..., CliResult]
) -> None:
    make_smtp_crm(make_crm())
    env = make_crm.env
    given = run_crm("settings", "set", "exchange.client_secret", SECRET, env=env)
    assert given.code == 2
    assert "--value-from-env" in given.stderr and "standard input" in given.stderr
    assert SECRET not in given.output
    shown = json.loads(run_crm("settings", "show", "--json", env=env).stdout)
    (view,) = [v for v in shown["settings"] if v["key"] == "exchange.client_secret"]
    assert view["state"] == "not set"
    user = run_crm("users", "set", USER, "smtp.password", PASSWORD, env=env)
    assert user.code == 2 and PASSWORD not in user.output
    missing = run_crm(
        "settings", "set", "exchange.client_secret", "--value-from-env", "NOPE", env=env
    )
    assert missing.code == 2 and "NOPE" in missing.stderr
    scripted = run_crm(
        "settings",
        "set",
        "exchange.client_secret",
        "--value-from-env",
        "CLIENT_SECRET",
        env={**env, "CLIENT_SECRET": SECRET},
    )
    assert scripted.code == 0 and "saved" in scripted.stdout
    piped = run_crm("users", "set", USER, "smtp.password", input=PASSWORD + "\n", env=env)
    assert piped.code == 0 and PASSWORD not in piped.output


def test_exchange_token_goes_to_no_server_the_administrator_did_not_list(
    world: ExchangeWorld,
) -> None:
    """Moving the EWS URL to a host not in ``exchange.oauth_hosts`` is refused on save,
    with how to list it; nothing reaches the host until an administrator does. (The
    capture server is the same kind of stand-in, reached by another host name.)"""
    from crm_core.errors import SettingValueError

    capture = EwsServer(world.ca, world.registry)
    with capture:
        moved = capture.base_url.replace("127.0.0.1", "localhost") + "/EWS/Exchange.asmx"
        with pytest.raises(SettingValueError) as refused:
            world.set_system("exchange.url", moved)
        assert "localhost is neither Exchange Online nor Microsoft Graph" in str(refused.value)
        assert "crm settings set exchange.oauth_hosts localhost" in str(refused.value)
        assert world.test_connection().ok  # the old URL is kept: nothing half-saved
        assert capture.requests == []
        world.set_system("exchange.oauth_hosts", "127.0.0.1, localhost")  # trusted now
        world.set_system("exchange.url", moved)
        world.reenter_secrets()  # the secret is bound to the URL
        world.test_connection()  # (the capture server knows no mailbox: not green)
        assert {r.auth_kind for r in capture.requests} == {"Bearer"}  # the token went


def test_a_send_never_hands_the_token_to_an_unlisted_host(world: ExchangeWorld) -> None:
    """Should an unlisted host be in effect anyway (the list shortened after the URL was
    saved), Test connection is red and a send is refused before any request."""
    capture = EwsServer(world.ca, world.registry)
    with capture:
        world.set_system("exchange.oauth_hosts", "127.0.0.1, localhost")
        moved = capture.base_url.replace("127.0.0.1", "localhost") + "/EWS/Exchange.asmx"
        world.set_system("exchange.url", moved)
        world.reenter_secrets()
        world.set_system("exchange.oauth_hosts", "127.0.0.1")
        status, detail, fix = steps(world.test_connection())["settings"]
        assert status == "failed" and "localhost is neither" in detail
        assert "crm settings set exchange.oauth_hosts localhost" in fix
        assert world.send_one(make_message()).outcome is Outcome.CONFIGURATION
        assert capture.requests == []  # no request at all, so no token


def test_graph_token_goes_only_to_microsoft_or_a_listed_host(world: ExchangeWorld) -> None:
    from crm_core.errors import SettingValueError

    with with_graph(world) as graph:
        moved = graph.base_url.replace("127.0.0.1", "localhost")
        with pytest.raises(SettingValueError, match=r"exchange\.oauth_hosts"):
            world.set_system("exchange.graph_url", moved)
        before = len(graph.requests)
        world.set_system("exchange.oauth_hosts", "127.0.0.1, localhost")
        world.set_system("exchange.graph_url", moved)
        world.set_system("exchange.oauth_hosts", "127.0.0.1")  # shortened again
        assert world.send_one(make_message()).outcome is Outcome.CONFIGURATION
        assert len(graph.requests) == before  # nothing reached the unlisted host


@pytest.mark.parametrize("typed", ["https://proxy.se", "proxy.se/ews", "proxy.se:443"])
def test_exchange_oauth_hosts_are_host_names_only(world: ExchangeWorld, typed: str) -> None:
    from crm_core.errors import SettingValueError

    with pytest.raises(SettingValueError, match="is not a host name"):
        world.set_system("exchange.oauth_hosts", typed)
