"""The password, the OAuth token and the SASL strings never appear in logs or output.

Every log record (all loggers, DEBUG) of in-process sends and Test connection runs is
searched, and so are the stdout and stderr of the real ``crm`` command run with
logging at DEBUG; as are the results and reports shown to users.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from crm_core.mail.transport import ConnectionReport, SendResult
from tests.conftest import REPO, CrmFactory
from tests.servers.entra import EntraServer, Secret, TokenRegistry
from tests.servers.smtp import SmtpServer
from tests.servers.tls import TestCA
from tests.smtp_fixtures import (
    PASSWORD,
    RECIPIENT,
    USER,
    SmtpCrm,
    make_message,
    make_smtp_crm,
    point_at,
    servers,
    users,
)
from tests.smtp_fixtures import ca as ca
from tests.smtp_fixtures import database_url as database_url
from tests.test_smtp_xoauth2 import CLIENT, SECRET, SECRET_ID, TENANT, SeenTokens, configure

RENTALS_ONLY = """\
[product_lines.rentals]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"
"""

DEBUG_CRM = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr); "
    "from crm_core.cli import main; sys.argv[0] = 'crm'; main()"
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def password_secrets() -> list[str]:
    """The password and every encoding of it that goes over the wire."""
    return [PASSWORD, b64(f"\0{USER}\0{PASSWORD}"), b64(PASSWORD)]


def token_secrets(seen: SeenTokens) -> list[str]:
    """The client secret, each bearer token and its SASL string."""
    found = [SECRET]
    for user, token in zip(seen.users, seen.tokens, strict=True):
        found += [token, token[-40:], b64(f"user={user}\x01auth=Bearer {token}\x01\x01")]
    return found


def assert_absent(secrets: list[str], texts: list[str]) -> None:
    for secret in secrets:
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"a secret appeared in: {leaks[0][:300]!r}"


def record_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [formatter.format(r) for r in caplog.records]
    texts += [repr(r.args) for r in caplog.records]
    return texts


def shown(results: list[SendResult], reports: list[ConnectionReport]) -> list[str]:
    return [repr(r) for r in results] + [repr(r) for r in reports]


@dataclass
class World:
    setup: SmtpCrm
    password_server: SmtpServer
    oauth_server: SmtpServer
    entra: EntraServer
    seen: SeenTokens
    registry: TokenRegistry


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[World]:
    registry = TokenRegistry()
    seen = SeenTokens(registry)
    entra = EntraServer(ca, registry)
    entra.add_tenant(TENANT)
    entra.add_app(TENANT, CLIENT, secrets=[Secret(SECRET, SECRET_ID)], roles=("SMTP.SendAsApp",))
    with entra, servers() as running:
        context = ca.server_context()
        yield World(
            make_smtp_crm(make_crm(RENTALS_ONLY)),
            running.start(
                security="starttls", ssl_context=context, users=users(), auth_required=True
            ),
            running.start(
                security="starttls",
                ssl_context=context,
                auth_mechanisms=("XOAUTH2",),
                token_validator=seen,
                auth_required=True,
            ),
            entra,
            seen,
            registry,
        )


def test_no_secret_in_any_log_record_or_result(
    world: World, ca: TestCA, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    setup = world.setup
    point_at(setup, world.password_server, ca)
    results = setup.send([make_message(1), make_message(2)])
    reports = [setup.test_connection()]
    world.password_server.inject("auth_response", times=1)
    results += setup.send([make_message(3)])  # the failure path logs too

    configure(setup, world.oauth_server, world.entra, ca)
    results += setup.send([make_message(4)])
    reports.append(setup.test_connection())
    world.registry.revoke_all()  # refused token: evict, fetch, retry
    results += setup.send([make_message(5)])

    assert [r.outcome.value for r in results] == ["sent", "sent", "configuration", "sent", "sent"]
    assert len(set(world.seen.tokens)) == 2
    assert caplog.records, "nothing was logged: the test would prove nothing"
    out = capsys.readouterr()
    texts = record_texts(caplog) + shown(results, reports) + [out.out, out.err]
    assert_absent(password_secrets() + token_secrets(world.seen), texts)


def run_debug_crm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``crm`` command, with every logger at DEBUG on stderr."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", DEBUG_CRM, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_secret_in_the_cli_output_at_debug(
    world: World, ca: TestCA, make_crm: CrmFactory
) -> None:
    setup = world.setup
    outputs: list[str] = []

    def crm(*args: str) -> None:
        done = run_debug_crm(make_crm.env, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.extend([done.stdout, done.stderr])

    point_at(setup, world.password_server, ca)
    crm("test-connection", USER)
    crm("send", "--from", USER, "--to", RECIPIENT, "--subject", "Hej", "--body", "Hej")
    crm("outbox", "work", "--once")
    configure(setup, world.oauth_server, world.entra, ca)
    crm("test-connection", USER)
    crm("send", "--from", USER, "--to", RECIPIENT, "--subject", "Hej", "--body", "Hej")
    crm("outbox", "work", "--once")

    assert len(world.password_server.received) == len(world.oauth_server.received) == 1
    assert any("DEBUG" in o for o in outputs), "DEBUG logging was not on"
    assert_absent(password_secrets() + token_secrets(world.seen), outputs)
