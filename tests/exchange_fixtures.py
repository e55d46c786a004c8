"""Helpers shared by the Exchange transport's tests: stand-ins, a configured Crm, mail.

The fixtures (``database_url``, ``ca``, ``world``, ``sleeps``) are imported by each test module that
uses them, with a redundant alias (``from tests.exchange_fixtures import ca as ca``) so
that ruff sees an explicit re-export rather than an unused or redefined name. Defined in
the test module's namespace, each keeps its scope there: ``ca`` is one CA per test
module, and ``database_url`` overrides the conftest's (SQLite only) only in the modules
that import it. Modules that need another world wire :func:`exchange_world` into a
fixture of their own.

The world is what a customer has: an Entra ID tenant with the app registration (Client
ID, a secret with its Value and Secret ID), an Exchange server with mailboxes (Anna's
primary address and an alias), and a CRM whose administrator typed the guide's settings.
Trust in the stand-ins' certificates comes only from the ``tls.ca_bundle`` setting (as
for a private CA); ``REQUESTS_CA_BUNDLE`` keeps the machine's value.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from exchangelib.protocol import close_connections

from crm_core import directory
from crm_core.app import Crm
from crm_core.mail.addresses import parse_address
from crm_core.mail.message import Attachment, OutgoingMessage, make_message_id
from crm_core.mail.transport import ConnectionReport, SenderAccount, SendResult
from tests.conftest import CrmFactory, SchemaTemplates
from tests.servers.clock import SYSTEM_CLOCK, Clock
from tests.servers.entra import EntraServer, Secret, TokenRegistry
from tests.servers.ews import EWS_PATH, EwsServer
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA, make_test_ca

TENANT = "7c1f4a52-9d3e-4b8a-a0c6-2f5e8d9b1a34"
TENANT_DOMAIN = "contoso.se"
CLIENT = "0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c"
OTHER_CLIENT = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SECRET = "Qx8~stand.in-secret-VALUE.42"
SECRET_ID = "3e1d9c2b-7a6f-4e5d-8c9b-0a1b2c3d4e5f"
EXPIRED_SECRET = "Old~expired-secret-value.17"
EXPIRED_ON = datetime(2026, 3, 1, tzinfo=UTC)

USER = "anna@contoso.se"
USER_NAME = "Anna Berg"
ALIAS = "anna@contoso.com"
ONPREM_USER = "bo@contoso.se"
ONPREM_PASSWORD = "B0-pa55word!åäö"
RECIPIENT = "kund@example.org"
PRODUCT_LINE = "commercial"

SECRETS = (SECRET, EXPIRED_SECRET, ONPREM_PASSWORD)
"""Every secret value a test types in; none may ever appear in output or logs."""


@dataclass
class ExchangeWorld:
    """The stand-in servers plus a Crm configured as the guide says."""

    crm: Crm
    ca: TestCA
    registry: TokenRegistry
    entra: EntraServer
    ews: EwsServer
    email: str = USER
    graph: GraphServer | None = None

    # --- settings ---------------------------------------------------------------

    def set_system(self, key: str, value: str) -> None:
        """Save one system setting (``crm settings set``)."""
        with self.crm.transaction() as session:
            self.crm.set_system_setting(session, key, value)

    def unset_system(self, key: str) -> None:
        """Remove one system setting."""
        with self.crm.transaction() as session:
            self.crm.settings_store().unset_system(session, key)

    def reenter_secrets(self) -> None:
        """Type the secrets in again, as every screen asks after a change of where they
        go (authority, tenant, app, CA bundle, Exchange URL)."""
        if self.email == ONPREM_USER:  # Exchange Server with the user's password
            self.set_user("exchange.password", ONPREM_PASSWORD)
        else:
            self.set_system("exchange.client_secret", SECRET)

    def set_user(self, key: str, value: str, email: str | None = None) -> None:
        """Save one of the user's settings (``crm users set``)."""
        with self.crm.transaction() as session:
            user = directory.find_user(session, email or self.email)
            self.crm.set_user_setting(session, user, key, value)

    def unset_user(self, key: str, email: str | None = None) -> None:
        """Remove one of the user's settings."""
        with self.crm.transaction() as session:
            user = directory.find_user(session, email or self.email)
            self.crm.settings_store().unset_user(session, user, key)

    @property
    def url(self) -> str:
        """The EWS stand-in's URL, as the administrator types it."""
        return self.ews.base_url + EWS_PATH

    def system_settings(self) -> dict[str, str]:
        """The guide's System settings for the stand-ins; the client secret last, since
        it is bound to the authority, tenant, app and CA bundle it is saved for."""
        return {
            # The stand-ins are not Microsoft's hosts: the administrator lists them, as
            # one lists a proxy of their own, or no token is sent there.
            "exchange.oauth_hosts": stand_in_hosts(self.ews.base_url),
            "exchange.url": self.url,
            "exchange.client_id": CLIENT,
            "exchange.tenant_id": TENANT,
            "exchange.authority": self.entra.base_url,
            "tls.ca_bundle": str(self.ca.ca_pem),
            "exchange.client_secret": SECRET,
        }

    def user_settings(self) -> dict[str, str]:
        """The E-mail tab as the guide fills it in."""
        return {
            "mail.transport": "exchange",
            "exchange.domain": TENANT_DOMAIN,
            "exchange.username": self.email,
            "exchange.sync": "true",
        }

    def configure(self) -> None:
        """Type every setting in, system first."""
        for key, value in self.system_settings().items():
            self.set_system(key, value)
        for key, value in self.user_settings().items():
            self.set_user(key, value)

    # --- using it ---------------------------------------------------------------

    def account(self, email: str | None = None) -> SenderAccount:
        """The user's sender account as the worker builds it."""
        with self.crm.transaction() as session:
            user = directory.find_user(session, email or self.email)
            return self.crm.sender_account(session, user)

    def send(
        self, messages: Sequence[OutgoingMessage], email: str | None = None
    ) -> list[SendResult]:
        """Send through the core's typed hook caller, as the worker does."""
        return self.crm.send_mail(self.account(email), messages)

    def send_one(self, message: OutgoingMessage | None = None) -> SendResult:
        """Send one message (a default one when none is given)."""
        (result,) = self.send([message or make_message(sender=self.email)])
        return result

    def test_connection(self, email: str | None = None) -> ConnectionReport:
        """Run Test connection for the user."""
        return self.crm.test_connection(self.account(email))

    def add_user(self, email: str, name: str = "Bo Ek") -> None:
        """Another CRM user in the same product line."""
        with self.crm.transaction() as session:
            directory.add_user(session, email, name, PRODUCT_LINE)


def add_standard_directory(entra: EntraServer, ews: EwsServer) -> None:
    """The tenant, the app with a live and an expired secret, and the mailboxes."""
    entra.add_tenant(TENANT, domains=[TENANT_DOMAIN, "contoso.onmicrosoft.com"])
    entra.add_app(
        TENANT,
        CLIENT,
        secrets=[
            Secret(SECRET, SECRET_ID),
            Secret(EXPIRED_SECRET, expires=EXPIRED_ON),
        ],
    )
    ews.add_mailbox(USER, aliases=[ALIAS], tenant_id=TENANT, display_name=USER_NAME)
    ews.add_mailbox(ONPREM_USER, password=ONPREM_PASSWORD, logon_name="bo")


@contextlib.contextmanager
def exchange_world(
    crm: Crm, ca: TestCA, *, configure: bool = True, clock: Clock = SYSTEM_CLOCK
) -> Iterator[ExchangeWorld]:
    """Start the stand-ins; add the user and type in the guide's settings (``configure``).

    ``clock`` is the EWS stand-in's (filing lags, delays); tokens keep real time.
    """
    registry = TokenRegistry()
    entra = EntraServer(ca, registry)
    ews = EwsServer(ca, registry, clock=clock)
    add_standard_directory(entra, ews)
    with entra, ews:
        world = ExchangeWorld(crm, ca, registry, entra, ews)
        if configure:
            world.add_user(USER, USER_NAME)
            world.configure()
        try:
            yield world
        finally:
            crm.resources.close()
            close_connections()  # exchangelib caches Protocols process-wide


def go_onprem(world: ExchangeWorld, ntlm_user_file: Path) -> Path:
    """Exchange Server without OAuth: remove the OAuth codes; Bo signs in with his password.

    Returns the NTLM credential file the EWS stand-in reads; the test must point the
    process-wide ``NTLM_USER_FILE`` at it (``monkeypatch.setenv``).
    """
    for key in ("exchange.client_id", "exchange.tenant_id", "exchange.client_secret"):
        world.unset_system(key)
    world.add_user(ONPREM_USER)
    for key, value in {
        "exchange.username": ONPREM_USER,
        "exchange.domain": TENANT_DOMAIN,
        "exchange.password": ONPREM_PASSWORD,
        "exchange.sync": "true",
        "mail.transport": "exchange",
    }.items():
        world.set_user(key, value, email=ONPREM_USER)
    return world.ews.write_ntlm_user_file(ntlm_user_file)


GRAPH_ROLES = ("full_access_as_app", "Mail.Send", "Mail.ReadBasic.All", "User.Read.All")


def stand_in_hosts(*urls: str) -> str:
    """The hosts of the stand-ins' URLs, as ``exchange.oauth_hosts`` lists them."""
    return ", ".join(dict.fromkeys(urlsplit(url).hostname or "" for url in urls))


@contextlib.contextmanager
def with_graph(
    world: ExchangeWorld, roles: Sequence[str] = GRAPH_ROLES, clock: Clock = SYSTEM_CLOCK
) -> Iterator[GraphServer]:
    """Add the Graph stand-in (Anna's mailbox, same tenant) and switch to exchange.api graph."""
    world.entra.set_app(TENANT, CLIENT, roles=roles)
    graph = GraphServer(world.ca, world.registry, clock=clock)
    graph.add_mailbox(USER, aliases=[ALIAS], tenant_id=TENANT, display_name=USER_NAME)
    with graph:
        world.graph = graph
        world.set_system("exchange.api", "graph")
        world.set_system("exchange.graph_url", graph.base_url)
        yield graph


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
    age: timedelta = timedelta(0),
    handed_over: timedelta | None = None,
) -> OutgoingMessage:
    """An outbox message as the worker hands it to the transport (queued ``age`` ago),
    or as the reconciler sees it (last handed to the transport ``handed_over`` ago)."""
    from_address = parse_address(sender, sender_name)
    now = datetime.now(UTC)
    return OutgoingMessage(
        outbox_id=n,
        message_id=make_message_id(from_address.domain),
        sender=from_address,
        to=tuple(parse_address(a) for a in to),
        cc=tuple(parse_address(a) for a in cc),
        bcc=tuple(parse_address(a) for a in bcc),
        subject=subject if subject is not None else f"Offer {n}",
        text=text if text is not None else f"Hello, here is offer {n}.\n",
        html=html,
        attachments=tuple(attachments),
        created_at=now - age,
        handed_over_at=None if handed_over is None else now - handed_over,
    )


def steps(report: ConnectionReport) -> dict[str, Any]:
    """The ladder as {step name: (status, detail, fix)}, for assertions."""
    return {s.name: (s.status.value, s.detail, s.fix) for s in report.steps}


def days_from_today(days: int) -> str:
    """An ISO date ``days`` from today (for the secret expiry setting)."""
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


# --- fixtures (imported by the test modules, see the module docstring) -----------------


@pytest.fixture
def database_url(tmp_path: Path, schema_templates: SchemaTemplates) -> str:
    """SQLite only: the transport does not depend on the database backend (the outbox
    end-to-end test runs on both)."""
    path = tmp_path / "crm.db"
    shutil.copyfile(schema_templates.sqlite(), path)  # the newest schema, made once
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A test CA, one per test module."""
    return make_test_ca(Path(tmp_path_factory.mktemp("exchange-ca")))


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    """The stand-ins and a Crm configured as the guide says."""
    with exchange_world(make_crm(), ca) as w:
        yield w


@dataclass(frozen=True)
class Sleep:
    """One ``time.sleep`` call: how long, on which thread, from where."""

    seconds: float
    thread: str
    caller: str


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[Sleep]:
    """Every ``time.sleep`` made during the test, on any thread (it still sleeps).

    Why: "the transport passes the server's back-off on and does not wait it out" is a
    statement about sleeping, so the test asserts that nothing slept, instead of timing
    the send. exchangelib (``FaultTolerance``) and urllib3 (``Retry``) both sleep through
    ``time.sleep``. Stand-ins sleep only for an injected ``delay()``.
    """
    calls: list[Sleep] = []
    real_sleep = time.sleep

    def spy(seconds: float) -> None:
        frame = traceback.extract_stack(limit=2)[0]
        caller = f"{frame.filename}:{frame.lineno}"
        calls.append(Sleep(seconds, threading.current_thread().name, caller))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", spy)
    return calls
