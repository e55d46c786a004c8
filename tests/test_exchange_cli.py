"""A new customer sets up Exchange with the real ``crm`` command, step by step.

The administrator types the guide's System settings, the user's E-mail tab is filled
in, and Test connection goes green against the stand-ins; then the common mistakes
are made one at a time and each turns the result red with its cause. Every line the
commands print is kept and finally searched for the secrets that were typed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from exchange_mail.settings import EXAMPLE_URL
from tests.conftest import CliResult, CrmFactory
from tests.exchange_fixtures import (
    ALIAS,
    CLIENT,
    SECRET,
    SECRET_ID,
    SECRETS,
    TENANT,
    USER,
    ExchangeWorld,
    days_from_today,
    exchange_world,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.servers.tls import TestCA


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    crm = make_crm()
    crm.close()  # everything from here on goes through the crm command
    with exchange_world(crm, ca, configure=False) as w:
        yield w


class Shell:
    """Runs ``crm`` like a person at a terminal and keeps everything it printed."""

    def __init__(self, run: Callable[..., CliResult], env: dict[str, str]) -> None:
        self.run_crm, self.env = run, env
        self.transcript: list[str] = []

    def __call__(self, *args: str, input: str | None = None) -> CliResult:
        result = self.run_crm(*args, input=input, env=self.env)
        self.transcript.append(f"$ crm {' '.join(args)}\n{result.output}")
        return result


@pytest.fixture
def crm(run_crm: Callable[..., CliResult], make_crm: CrmFactory) -> Shell:
    return Shell(run_crm, make_crm.env)


def set_up_as_the_guide_says(crm: Shell, world: ExchangeWorld) -> None:
    assert crm("init").code == 0
    added = crm("users", "add", USER, "--name", "Anna Berg", "--product-line", "commercial")
    assert added.code == 0, added.output

    # The guide's example URL is Exchange Online's: saved, and sent through Graph (auto),
    # with the Graph permissions named next to the guide's EWS one.
    example = crm("settings", "set", "exchange.url", EXAMPLE_URL)
    assert example.code == 0
    assert (
        "Note: Exchange Online: sending through Microsoft Graph "
        "(https://graph.microsoft.com/v1.0), not EWS (exchange.api auto)"
    ) in example.stderr
    assert "Mail.Send, Mail.ReadBasic.All (reconciling)" in example.stderr
    assert "full_access_as_app" in example.stderr
    # Chosen explicitly, EWS on Exchange Online warns of its retirement dates.
    assert crm("settings", "set", "exchange.api", "ews").code == 0
    ews = crm("settings", "set", "exchange.url", EXAMPLE_URL)
    assert "Warning: Exchange Online blocks EWS from 1 October 2026" in ews.stderr
    assert "shuts EWS down for good on 1 April 2027" in ews.stderr
    assert crm("settings", "set", "exchange.api", "auto").code == 0
    # A near miss of the organisation's own URL is refused with the corrected URL.
    near = crm("settings", "set", "exchange.url", world.ews.base_url + "/ews/exchange.asmx")
    assert near.code == 2
    assert "letter case matters" in near.stderr
    assert f"did you mean {world.url} ?" in near.stderr

    for key, value in [
        ("exchange.url", world.url),
        ("exchange.client_id", CLIENT),
        ("exchange.tenant_id", TENANT),
        ("exchange.authority", world.entra.base_url),
        ("tls.ca_bundle", str(world.ca.ca_pem)),
    ]:
        result = crm("settings", "set", key, value)
        assert result.code == 0 and "saved" in result.stdout, result.output
    # The secret is typed (read from standard input), never given on the command line.
    typed = crm("settings", "set", "exchange.client_secret", input=SECRET + "\n")
    assert typed.code == 0
    assert typed.stdout.strip() == "exchange.client_secret: saved (it will not be shown again)."
    for key, value in [
        ("mail.transport", "exchange"),
        ("exchange.domain", "contoso.se"),
        ("exchange.username", USER),
        ("exchange.sync", "true"),
    ]:
        result = crm("users", "set", USER, key, value)
        assert result.code == 0, result.output
    # The stand-ins are not Microsoft's hosts: no token goes there until they are listed.
    host = urlsplit(world.url).hostname or ""
    refused = crm("test-connection", USER)
    assert refused.code == 1
    assert f"{host} is neither Exchange Online nor Microsoft Graph" in refused.stdout
    assert f"crm settings set exchange.oauth_hosts {host}" in refused.stdout
    assert "[skip] token" in refused.stdout  # no token was even fetched
    assert crm("settings", "set", "exchange.oauth_hosts", host).code == 0


def test_new_customer_goes_green_and_then_makes_each_mistake(
    crm: Shell, world: ExchangeWorld
) -> None:
    set_up_as_the_guide_says(crm, world)

    green = crm("test-connection", USER)
    assert green.code == 0, green.output
    assert green.stdout.splitlines()[0] == "Connected to Exchange"
    for line in ("[ok]   token: Entra ID issued", "[ok]   mailbox: mailbox anna@contoso.se found"):
        assert line in green.stdout

    # Unticking "Sync with Exchange" is refused while the user sends via Exchange.
    untick = crm("users", "set", USER, "exchange.sync", "false")
    assert untick.code == 2
    assert "'Sync with Exchange' is not ticked; it must be ticked to send via Exchange" in (
        untick.stderr
    )

    # The secret's expiry date: settings show warns from 30 days before; no secret shown.
    crm("settings", "set", "exchange.client_secret_expires", days_from_today(20))
    shown = crm("settings", "show")
    assert f"the client secret expires in 20 days ({days_from_today(20)})" in shown.stdout
    assert "exchange.client_secret             saved" in shown.stdout

    # The secret's Secret ID pasted instead of its Value: warned on save, red on test.
    pasted = crm("settings", "set", "exchange.client_secret", input=SECRET_ID + "\n")
    assert pasted.code == 0
    assert "Warning: the saved client secret looks like a Secret ID" in pasted.stderr
    red = crm("test-connection", USER)
    assert red.code == 1
    assert red.stdout.startswith(
        "TestConnection error Credentials: The client secret is not valid (AADSTS7000215)"
    )
    assert (
        "fix: In Entra → App registrations → Certificates & secrets, copy the secret's Value"
        in (red.stdout)
    )
    crm("settings", "set", "exchange.client_secret", input=SECRET + "\n")

    # An alias as username: flagged on save with the guide's advice, red on test.
    alias = crm("users", "set", USER, "exchange.username", ALIAS)
    assert alias.code == 0
    assert "is in domain contoso.com, but exchange.domain is contoso.se" in alias.stderr
    red = crm("test-connection", USER, "--json")
    report = json.loads(red.stdout)
    assert red.code == 1 and not report["ok"]
    assert report["summary"].startswith(
        f"TestConnection error Credentials: Exchange cannot find a mailbox for {ALIAS}"
    )
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("settings", "ok"),
        ("credential expiry", "warning"),
        ("username and domain", "warning"),
        ("token", "ok"),
        ("mailbox", "failed"),
        ("sync", "ok"),
    ]
    mailbox = report["steps"][4]
    assert "full primary e-mail address" in mailbox["fix"]

    everything = "\n".join(crm.transcript)
    for secret in SECRETS:
        assert secret not in everything
