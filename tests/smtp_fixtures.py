"""Helpers and fixtures shared by the SMTP transport's tests: a configured Crm, servers,
messages.

The fixtures (``database_url``, ``ca``, ``running``, ``setup``) are imported by each test
module that uses them, with a redundant alias (``from tests.smtp_fixtures import ca as
ca``) so that ruff sees an explicit re-export rather than an unused or redefined name.
Defined in the test module's namespace, each keeps its scope there: ``ca`` is one CA per
test module, and ``database_url`` overrides the conftest's (SQLite only) only in the
modules that import it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crm_core import directory
from crm_core.app import Crm
from crm_core.mail.addresses import Address, parse_address
from crm_core.mail.message import Attachment, OutgoingMessage, make_message_id
from crm_core.mail.transport import (
    ConnectionReport,
    Outcome,
    RecipientStatus,
    SenderAccount,
    SendResult,
)
from tests.conftest import CrmFactory, SchemaTemplates
from tests.servers.smtp import SmtpServer
from tests.servers.tls import TestCA, make_test_ca

USER = "anna.berg@example.com"
USER_NAME = "Anna Berg"
PASSWORD = "Sommar-sol 2026 åäö!"  # non-ASCII on purpose: SASL strings are UTF-8
RECIPIENT = "kund@example.org"
PRODUCT_LINE = "rentals"  # smtp_mail + maildir_mail; no exchange_mail


@dataclass
class SmtpCrm:
    """A Crm with one user who sends via SMTP, and shortcuts to configure and send."""

    crm: Crm
    email: str = USER

    def set_system(self, **values: str) -> None:
        """Save system settings; keyword ``smtp_host`` means key ``smtp.host``."""
        with self.crm.transaction() as session:
            for key, value in values.items():
                self.crm.set_system_setting(session, _key(key), value)

    def set_user(self, **values: str) -> None:
        """Save the user's settings (same key spelling as :meth:`set_system`)."""
        with self.crm.transaction() as session:
            user = directory.find_user(session, self.email)
            for key, value in values.items():
                self.crm.set_user_setting(session, user, _key(key), value)

    def account(self) -> SenderAccount:
        """The user's sender account as the worker would build it."""
        with self.crm.transaction() as session:
            return self.crm.sender_account(session, directory.find_user(session, self.email))

    def send(
        self,
        messages: Sequence[OutgoingMessage],
        report: Callable[[Sequence[SendResult]], None] | None = None,
    ) -> list[SendResult]:
        """Send through the core's typed hook caller, as the worker does."""
        return self.crm.send_mail(self.account(), messages, report)

    def send_one(self, message: OutgoingMessage | None = None) -> SendResult:
        """Send one message (a default one when none is given)."""
        (result,) = self.send([message or make_message()])
        return result

    def test_connection(self) -> ConnectionReport:
        """Run Test connection for the user."""
        return self.crm.test_connection(self.account())


def _key(name: str) -> str:
    return name.replace("_", ".", 1)


def make_smtp_crm(crm: Crm, email: str = USER) -> SmtpCrm:
    """Add the user (transport smtp) to a fresh Crm."""
    with crm.transaction() as session:
        user = directory.add_user(session, email, USER_NAME, PRODUCT_LINE)
        crm.set_user_setting(session, user, "mail.transport", "smtp")
    return SmtpCrm(crm, email)


def point_at(
    setup: SmtpCrm,
    server: SmtpServer,
    ca: TestCA | None,
    *,
    auth: str = "password",
    host: str = "127.0.0.1",
    timeout: int = 5,
    port: int | None = None,
) -> None:
    """Configure the installation and the user for ``server`` (reached on ``port`` when
    given: a proxy in front of it; set before the password, which is bound to it)."""
    system = {
        "smtp_host": host,
        "smtp_port": str(port or server.port),
        "smtp_security": server.security,
        "smtp_timeout": str(timeout),
    }
    if ca is not None:
        system["tls_ca_bundle"] = str(ca.ca_pem)
    if auth != "password":
        system["smtp_auth"] = auth
    # Order matters: none+password to a loopback host is allowed, so any order works.
    setup.set_system(**system)
    if auth == "password":
        setup.set_user(smtp_username=setup.email, smtp_password=PASSWORD)


def make_message(
    n: int = 1,
    *,
    to: Sequence[str] = (RECIPIENT,),
    sender: str = USER,
    sender_name: str = USER_NAME,
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    attachments: Sequence[Attachment] = (),
    to_name: str = "",
) -> OutgoingMessage:
    """An outbox message as the worker would hand it to the transport."""
    from_address = parse_address(sender, sender_name)
    return OutgoingMessage(
        outbox_id=n,
        message_id=make_message_id(from_address.domain),
        sender=from_address,
        to=tuple(parse_address(a, to_name) for a in to),
        cc=tuple(parse_address(a) for a in cc),
        bcc=tuple(parse_address(a) for a in bcc),
        subject=subject if subject is not None else f"Offer {n}",
        text=text if text is not None else f"Hello, here is offer {n}.\n",
        html=html,
        attachments=tuple(attachments),
    )


def check_delivery(
    server: SmtpServer,
    messages: Sequence[OutgoingMessage],
    results: Sequence[SendResult],
    ambiguous: Collection[str] = (),
) -> None:
    """The invariant after a fault, counted at the server by Message-ID and recipient.

    Each recipient of each message arrived exactly once, or was refused or deferred
    with the server's words, or its message is unknown with evidence (the step and the
    server's last reply); nothing arrived that was not sent, and nothing twice unless
    its Message-ID is in ``ambiguous`` (an ambiguous fault was injected for it).
    """
    arrived = Counter((got.message_id, rcpt) for got in server.received for rcpt in got.rcpt_tos)
    assert {mid for mid, _ in arrived} <= {m.message_id for m in messages}, "stray mail"
    by_id = {r.message_id: r for r in results}
    for message in messages:
        result = by_id[message.message_id]
        for address in message.recipients:
            times = _arrivals(arrived, message.message_id, address)
            _check_recipient(result, address, times)
            if message.message_id not in ambiguous:
                assert times <= 1, f"{address.email} got {message.message_id} {times} times"


def _arrivals(arrived: Counter[tuple[str | None, str]], mid: str, address: Address) -> int:
    wire = {address.email, address.ascii_email or address.email}
    return sum(arrived[(mid, w)] for w in wire)


def _check_recipient(result: SendResult, address: Address, times: int) -> None:
    fate = next((f for f in result.recipients if f.address == address.email), None)
    who = f"{address.email} of {result.message_id}"
    if fate is not None:
        if fate.status is RecipientStatus.DELIVERED:
            assert times == 1 and fate.reply.startswith("250"), (who, times, fate)
        else:
            assert times == 0 and fate.reply, (who, times, fate)
    elif result.outcome is Outcome.SENT:
        assert times == 1, (who, times)
    elif result.outcome is Outcome.AMBIGUOUS:
        assert times <= 1 and result.detail and result.reply, (who, result)
    else:
        assert times == 0 and result.detail, (who, times, result)


@dataclass
class Servers:
    """Starts SMTP servers for one test and stops every one of them afterwards."""

    started: list[SmtpServer] = field(default_factory=list)

    def start(self, **kwargs: Any) -> SmtpServer:
        server = SmtpServer(**kwargs).start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """A :class:`Servers` whose servers are stopped on exit."""
    found = Servers()
    try:
        yield found
    finally:
        found.stop_all()


def users(password: str = PASSWORD, email: str = USER) -> dict[str, str]:
    """The server's account table for PLAIN/LOGIN."""
    return {email: password}


def tls_server(running: Servers, ca: TestCA, **kwargs: object) -> SmtpServer:
    """A STARTTLS server with the test CA's certificate that requires PLAIN/LOGIN
    (``kwargs`` override any of these options)."""
    options: dict[str, object] = {
        "security": "starttls",
        "ssl_context": ca.server_context(),
        "users": users(),
        "auth_required": True,
    }
    options.update(kwargs)
    return running.start(**options)


# --- fixtures (imported by the test modules, see the module docstring) -----------------


@pytest.fixture
def database_url(tmp_path: Path, schema_templates: SchemaTemplates) -> str:
    """SQLite only: the transport's behaviour does not depend on the database backend
    (the core's and the outbox's tests cover PostgreSQL; test_smtp_cli runs on both)."""
    path = tmp_path / "crm.db"
    shutil.copyfile(schema_templates.sqlite(), path)  # the newest schema, made once
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A test CA, one per test module."""
    return make_test_ca(tmp_path_factory.mktemp("smtp-ca"))


@pytest.fixture
def running() -> Iterator[Servers]:
    """Start SMTP servers with ``running.start(...)``; all are stopped after the test."""
    with servers() as found:
        yield found


@pytest.fixture
def setup(make_crm: CrmFactory) -> SmtpCrm:
    """A fresh Crm with the user who sends via SMTP."""
    return make_smtp_crm(make_crm())
