"""SMTP tried as a new user would: the real ``crm`` command in a subprocess.

Configure with ``crm settings set`` / ``crm users set``, Test connection green, then a
wrong password red with the reason; and a mail sent end to end through the outbox
(``crm send`` + ``crm outbox work --once``) arriving at the SMTP server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from crm_core.app import Crm
from tests.conftest import CliResult, CrmFactory
from tests.servers.smtp import SmtpServer
from tests.servers.tls import TestCA
from tests.smtp_fixtures import (
    PASSWORD,
    RECIPIENT,
    USER,
    USER_NAME,
    make_smtp_crm,
    point_at,
    servers,
    tls_server,
)
from tests.smtp_fixtures import ca as ca

Run = Callable[..., CliResult]


@pytest.fixture
def smtp(ca: TestCA) -> Iterator[SmtpServer]:
    with servers() as running:
        yield tls_server(running, ca)


#: A product line without Exchange: the CLI starts faster (exchangelib is never
#: imported) and SMTP must stand on its own, including the Entra fields for XOAUTH2.
RENTALS_ONLY = """\
[product_lines.rentals]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"
"""


@dataclass
class Installation:
    """A fresh installation: the in-process Crm and the ``crm`` command on it."""

    crm: Crm
    run: Run

    def __call__(self, *args: str, input: str | None = None) -> CliResult:
        return self.run(*args, input=input)


@pytest.fixture
def crm(make_crm: CrmFactory, run_crm: Run) -> Installation:
    """``crm`` on a fresh installation (config written, database created)."""
    made = make_crm(RENTALS_ONLY)
    env = make_crm.env

    def run(*args: str, input: str | None = None) -> CliResult:
        return run_crm(*args, input=input, env=env)

    return Installation(made, run)


def ok(result: CliResult) -> CliResult:
    assert result.code == 0, result.output
    return result


def configure(crm: Installation, smtp: SmtpServer, ca: TestCA, password: str) -> None:
    ok(crm("users", "add", USER, "--name", USER_NAME, "--product-line", "rentals"))
    for key, value in (
        ("smtp.host", "127.0.0.1"),
        ("smtp.port", str(smtp.port)),
        ("tls.ca_bundle", str(ca.ca_pem)),
    ):
        ok(crm("settings", "set", key, value))
    ok(crm("users", "set", USER, "mail.transport", "smtp"))
    ok(crm("users", "set", USER, "smtp.username", USER))
    saved = ok(crm("users", "set", USER, "smtp.password", input=password + "\n"))
    assert password not in saved.output


def test_new_user_configures_smtp_and_tests_the_connection(
    crm: Installation, smtp: SmtpServer, ca: TestCA
) -> None:
    configure(crm, smtp, ca, PASSWORD)

    green = crm("test-connection", USER)

    assert green.code == 0, green.output
    assert f"Connected to the SMTP server 127.0.0.1:{smtp.port} as {USER}" in green.stdout
    for name in ("settings", "resolve", "connect", "tls", "auth", "sender"):
        assert f"[ok]   {name}:" in green.stdout
    assert smtp.received == []

    ok(crm("users", "set", USER, "smtp.password", input="Fel-lösenord\n"))
    red = crm("test-connection", USER)

    assert red.code == 1
    assert "[FAIL] auth: The server refused the username or password" in red.stdout
    assert "535" in red.stdout
    assert "fix: Check smtp.username" in red.stdout
    assert "[skip] sender" in red.stdout
    assert PASSWORD not in red.output and "Fel-lösenord" not in red.output


def test_a_mail_goes_through_the_outbox_to_the_server(
    crm: Installation, smtp: SmtpServer, ca: TestCA
) -> None:
    setup = make_smtp_crm(crm.crm)
    point_at(setup, smtp, ca)

    queued = ok(
        crm(
            "send",
            "--from",
            USER,
            "--to",
            RECIPIENT,
            "--subject",
            "Visning på fredag",
            "--body",
            "Hej! Välkommen på visning.",
            "--json",
        )
    )
    message_id = json.loads(queued.stdout)["message_id"]
    ok(crm("outbox", "work", "--once"))

    (got,) = smtp.received
    assert got.message_id == message_id
    assert got.mail_from == USER and got.rcpt_tos == [RECIPIENT]
    assert str(got.message["Subject"]) == "Visning på fredag"
    assert str(got.message["From"]) == f"{USER_NAME} <{USER}>"
    listed = ok(crm("outbox", "list"))
    assert " sent " in listed.stdout


def test_wrong_password_in_the_outbox_tells_the_reason(
    crm: Installation, smtp: SmtpServer, ca: TestCA
) -> None:
    setup = make_smtp_crm(crm.crm)
    point_at(setup, smtp, ca)
    setup.set_user(smtp_password="not the password")

    ok(crm("send", "--from", USER, "--to", RECIPIENT, "--subject", "Hej", "--body", "Hej"))
    ok(crm("outbox", "work", "--once"))

    assert smtp.received == []
    listed = ok(crm("outbox", "list"))
    assert "refused the username or password" in listed.stdout
    assert "not the password" not in listed.output
