"""``exchange.api = auto`` (the default): Graph for Exchange Online, EWS for Exchange Server.

Auto reads the host of the guide's EWS URL; the Graph endpoint is its own setting
(``exchange.graph_url``, empty: the Graph host of the URL's cloud), so the tests point
it at the Graph stand-in as a customer with a proxy in front of Graph would, and keep
the guide's URL exactly as the guide writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from crm_core.mail import enqueue
from crm_core.mail.enqueue import MailRequest
from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome, SenderAccount
from exchange_mail.settings import EXAMPLE_URL, Api, resolve
from tests.conftest import DEFAULT_TEST_CONFIG, CliResult, CrmFactory
from tests.exchange_fixtures import (
    RECIPIENT,
    USER,
    ExchangeWorld,
    exchange_world,
    make_message,
    steps,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA

MB = 1024 * 1024


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    """The guide's set-up, unchanged: the EWS URL of Exchange Online, no exchange.api."""
    with exchange_world(make_crm(), ca) as w, with_graph(w):
        w.unset_system("exchange.api")
        w.set_system("exchange.url", EXAMPLE_URL)
        yield w


def graph_of(world: ExchangeWorld) -> GraphServer:
    assert world.graph is not None
    return world.graph


def test_auto_sends_the_guides_set_up_through_graph(world: ExchangeWorld) -> None:
    message = make_message()
    result = world.send_one(message)
    assert result.outcome is Outcome.SENT, result
    assert [d.internet_message_id for d in graph_of(world).delivered] == [message.message_id]
    assert world.ews.requests == []  # EWS, and so outlook.office365.com, never asked


def test_test_connection_says_graph_and_names_the_graph_permissions(world: ExchangeWorld) -> None:
    report = world.test_connection()
    assert report.summary == "Connected to Exchange"
    status, detail, _ = steps(report)["settings"]
    assert status == "ok"
    assert detail.startswith("Exchange Online: sending through Microsoft Graph")
    assert "full_access_as_app" in detail  # the guide's EWS permission, beside Graph's
    for permission in ("Mail.Send", "Mail.ReadBasic.All", "Mail.ReadWrite"):
        assert permission in detail
    assert "EWS retirement" not in steps(report)


def test_auto_keeps_ews_for_an_on_premises_server(world: ExchangeWorld) -> None:
    world.set_system("exchange.url", world.url)  # the EWS stand-in: not Exchange Online
    assert world.send_one().outcome is Outcome.SENT
    assert len(world.ews.delivered) == 1 and graph_of(world).delivered == []


@pytest.mark.parametrize(
    ("host", "graph_url"),
    [
        ("outlook.office365.com", "https://graph.microsoft.com"),
        ("outlook.office365.us", "https://graph.microsoft.us"),
        ("webmail.apps.mil", "https://dod-graph.microsoft.us"),
        ("partner.outlook.cn", "https://microsoftgraph.chinacloudapi.cn"),
        ("mail.contoso.se", "https://graph.microsoft.com"),
    ],
)
def test_auto_takes_the_graph_host_of_the_urls_cloud(host: str, graph_url: str) -> None:
    system = {"exchange.url": f"https://{host}/EWS/Exchange.asmx"}
    settings = resolve(SenderAccount(1, USER, "Anna", "sales", "exchange", system, {}))
    assert settings.api is (Api.EWS if host == "mail.contoso.se" else Api.GRAPH)
    assert settings.graph_url == graph_url
    explicit = {**system, "exchange.api": "ews"}
    assert resolve(SenderAccount(1, USER, "A", "s", "exchange", explicit, {})).api is Api.EWS


def test_dry_run_shows_the_graph_endpoint_not_the_ews_url(
    world: ExchangeWorld, run_crm: Callable[..., CliResult], make_crm: CrmFactory
) -> None:
    world.unset_system("exchange.graph_url")  # the guide's cloud: Graph's own host
    args = ("send", "--from", USER, "--to", RECIPIENT, "--subject", "Hej", "--body", "x")
    shown = run_crm(*args, "--dry-run", "--json", env=make_crm.env)
    assert shown.code == 0, shown.output
    plan = json.loads(shown.stdout)
    assert plan["server"] == "https://graph.microsoft.com/v1.0"
    assert plan["notes"][0] == (
        "api graph: Exchange Online: sending through Microsoft Graph (exchange.api auto)"
    )
    assert "EWS URL https://outlook.office365.com/EWS/Exchange.asmx not used" in plan["notes"]


BIG_LIMITS = DEFAULT_TEST_CONFIG + "\n[mail]\nmax_message_bytes = 500_000_000\n"


def test_enqueue_says_before_queueing_that_a_mail_is_too_large_for_the_path(
    make_crm: CrmFactory, ca: TestCA
) -> None:
    with exchange_world(make_crm(BIG_LIMITS), ca) as world, with_graph(world):
        world.unset_system("exchange.api")
        world.set_system("exchange.url", EXAMPLE_URL)

        def problems(size: int) -> list[str]:
            film = Attachment("film.mp4", "video/mp4", bytes(size))
            request = MailRequest(USER, [RECIPIENT], "Film", "Se bifogad film.", attachments=[film])
            with world.crm.transaction() as session:
                return [str(p) for p in enqueue.plan(world.crm, session, request).problems]

        assert problems(40 * MB) == []  # an upload session takes it
        [over] = problems(151 * MB)
        assert over.startswith("attachment 'film.mp4': is 151.0 MB; Microsoft Graph takes files")
        world.set_system("exchange.api", "ews")
        [ews] = problems(120 * MB)  # one CreateItem, base64: about 160 MB
        assert "EWS (exchange.api ews) takes at most 150.0 MB" in ews
