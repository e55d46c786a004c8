"""PIPELINING (RFC 2920) and parallel connections, over a link with latency.

The SMTP stand-in advertises PIPELINING as Postfix and Exchange Online do; the latency
proxy (tests/servers/latency.py) sits between the client and the server and counts the
client's *flights*: what the client sends before the server answers. A client that
waits for every reply makes one flight per command; a pipelining one makes one flight
for MAIL, every RCPT and DATA, and one for the body. The proxy's delay is small; every
assertion is on counts, never on time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import Outcome, RecipientStatus, SendResult
from tests.servers.latency import LatencyProxy
from tests.servers.smtp import SmtpServer
from tests.smtp_fixtures import (
    RECIPIENT,
    Servers,
    SmtpCrm,
    check_delivery,
    make_message,
    point_at,
    users,
)
from tests.smtp_fixtures import database_url as database_url
from tests.smtp_fixtures import running as running
from tests.smtp_fixtures import setup as setup

DELIVERED, REFUSED = RecipientStatus.DELIVERED, RecipientStatus.REFUSED
RTT = 0.002  # seconds; only so that replies really come later than the client's writes
#: EHLO, AUTH PLAIN and QUIT: the flights of a session around its messages.
SESSION_FLIGHTS = 3


def plain_server(running: Servers, **options: object) -> SmtpServer:
    """A loopback server without TLS that requires the user's password login."""
    return running.start(
        security="none", users=users(), auth_required=True, auth_require_tls=False, **options
    )


@pytest.fixture
def link(setup: SmtpCrm, running: Servers) -> Iterator[tuple[SmtpServer, LatencyProxy]]:
    """A server behind the latency proxy; the user sends to the proxy on one connection."""
    server = plain_server(running)
    with LatencyProxy(server.port, RTT) as proxy:
        point_at(setup, server, None, port=proxy.port)
        setup.set_system(mail_max_connections="1")
        yield server, proxy


def message_flights(proxy: LatencyProxy) -> int:
    """The flights of the one connection, less those of the session itself."""
    (flights,) = proxy.flights()
    return flights - SESSION_FLIGHTS


def fates(result: SendResult) -> list[tuple[str, RecipientStatus]]:
    return [(r.address, r.status) for r in result.recipients]


# --- one round trip for MAIL, RCPT… and DATA ---------------------------------------------


def test_mail_rcpt_and_data_go_in_one_write_and_the_body_in_the_next(
    setup: SmtpCrm, link: tuple[SmtpServer, LatencyProxy]
) -> None:
    server, proxy = link
    to = [RECIPIENT, "eva@example.org", "bo@example.org"]
    messages = [make_message(n, to=to) for n in (1, 2, 3)]

    results = setup.send(messages)

    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert message_flights(proxy) == 2 * 3  # step by step it would be (3 + 3) * 3
    assert server.rcpt_commands == 3 * 3 and server.data_commands == 3
    assert [g.rcpt_tos for g in server.received] == [to] * 3
    check_delivery(server, messages, results)


def test_without_pipelining_offered_each_command_waits_for_its_reply(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(running, pipelining=False)
    with LatencyProxy(server.port, RTT) as proxy:
        point_at(setup, server, None, port=proxy.port)
        setup.set_system(mail_max_connections="1")
        message = make_message(to=[RECIPIENT, "eva@example.org"])

        result = setup.send_one(message)

    assert result.outcome is Outcome.SENT
    assert message_flights(proxy) == 1 + 2 + 1 + 1  # MAIL, two RCPT, DATA, the body
    check_delivery(server, [message], [result])


def test_a_refused_recipient_among_accepted_ones_is_partial_in_the_same_round_trip(
    setup: SmtpCrm, link: tuple[SmtpServer, LatencyProxy]
) -> None:
    server, proxy = link
    server.inject("rcpt_permanent", address="gone@example.org")
    message = make_message(to=[RECIPIENT, "gone@example.org", "eva@example.org"])
    after = make_message(2)

    result, sent = setup.send([message, after])

    assert result.outcome is Outcome.SENT and sent.outcome is Outcome.SENT
    assert fates(result) == [
        (RECIPIENT, DELIVERED),
        ("gone@example.org", REFUSED),
        ("eva@example.org", DELIVERED),
    ]
    assert "not delivered to: gone@example.org (550 5.1.1" in result.detail
    # The 250 after the dot ended the transaction: no RSET before the next message.
    assert server.rsets == 0
    assert message_flights(proxy) == 2 + 2
    assert [g.rcpt_tos for g in server.received] == [[RECIPIENT, "eva@example.org"], [RECIPIENT]]
    check_delivery(server, [message, after], [result, sent])


def test_when_every_recipient_is_refused_datas_503_is_no_failure_and_no_body_goes(
    setup: SmtpCrm, link: tuple[SmtpServer, LatencyProxy]
) -> None:
    server, proxy = link
    server.inject("rcpt_permanent", address="gone@example.org")
    server.inject("rcpt_permanent", address="left@example.org")
    nobody = make_message(1, to=["gone@example.org", "left@example.org"])
    messages = [nobody, make_message(2)]

    refused, sent = results = setup.send(messages)

    assert refused.outcome is Outcome.PERMANENT
    assert fates(refused) == [("gone@example.org", REFUSED), ("left@example.org", REFUSED)]
    assert refused.code == "550 5.1.1"
    assert "503" not in refused.detail and "need RCPT" not in refused.detail
    assert sent.outcome is Outcome.SENT, sent.detail
    assert server.data_commands == 2  # the refused DATA of the first, and the second's
    assert server.rsets == 1  # before the next MAIL
    # The first: one flight and no body; RSET; the second: two flights.
    assert message_flights(proxy) == 1 + 1 + 2
    assert server.message_ids() == [messages[1].message_id]
    check_delivery(server, messages, results)


def test_a_refused_mail_from_makes_the_recipients_replies_meaningless_and_resets(
    setup: SmtpCrm, link: tuple[SmtpServer, LatencyProxy]
) -> None:
    server, proxy = link
    server.inject("mail_from_reject", times=1)  # 550 5.7.60 send as denied
    messages = [make_message(1, to=[RECIPIENT, "eva@example.org"]), make_message(2)]

    refused, sent = results = setup.send(messages)

    assert refused.outcome is Outcome.CONFIGURATION
    assert refused.code == "550 5.7.60"
    assert refused.recipients == ()  # their "503 need MAIL" replies say nothing of them
    assert "503" not in refused.detail
    assert server.rcpt_commands == 2 + 1  # they were sent in the same write
    assert sent.outcome is Outcome.SENT, sent.detail
    assert server.rsets == 1
    assert message_flights(proxy) == 1 + 1 + 2
    check_delivery(server, messages, results)


def test_a_refusal_after_the_dot_is_reset_before_the_next_pipelined_mail(
    setup: SmtpCrm, link: tuple[SmtpServer, LatencyProxy]
) -> None:
    server, proxy = link
    server.inject("data_temporary", times=1)  # Postfix keeps the transaction until RSET
    messages = [make_message(1), make_message(2)]

    deferred, sent = results = setup.send(messages)

    assert deferred.outcome is Outcome.TEMPORARY and deferred.code == "451 4.3.0"
    assert sent.outcome is Outcome.SENT, sent.detail  # not 503 nested MAIL
    assert server.rsets == 1
    assert message_flights(proxy) == 2 + 1 + 2
    check_delivery(server, messages, results)


# --- parallel connections --------------------------------------------------------------


@pytest.mark.parametrize("limit", [2, 3])
def test_a_batch_goes_over_as_many_connections_as_set_and_never_more(
    setup: SmtpCrm, running: Servers, limit: int
) -> None:
    # MAIL waits until `limit` connections were opened: so they were all open at once.
    server = plain_server(running, hold_mail_until_connections=limit)
    point_at(setup, server, None)
    setup.set_system(mail_max_connections=str(limit))
    messages = [make_message(n) for n in range(1, 31)]
    reported: list[SendResult] = []

    results = setup.send(messages, report=reported.extend)

    assert [r.outcome for r in results] == [Outcome.SENT] * 30
    assert [r.message_id for r in results] == [m.message_id for m in messages]
    assert server.connections == server.peak_connections == limit
    assert server.auth_successes == limit
    assert Counter(r.message_id for r in reported) == Counter(m.message_id for m in messages)
    assert len({g.connection_id for g in server.received}) == limit
    check_delivery(server, messages, results)


def test_connections_reopened_after_the_server_closed_them_stay_within_the_limit(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(running, hold_mail_until_connections=3)
    closes = server.inject("close_idle", after_messages=2, times=3)
    point_at(setup, server, None)
    messages = [make_message(n) for n in range(1, 31)]

    results = setup.send(messages)

    assert [r.outcome for r in results] == [Outcome.SENT] * 30
    assert closes.fired == 3
    assert 3 < server.connections <= 3 + closes.fired
    assert server.peak_connections == 3
    check_delivery(server, messages, results)


def test_a_server_that_allows_fewer_connections_gets_the_batch_over_those(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(running, connection_limit=1)
    point_at(setup, server, None)  # mail.max_connections: the default, 3
    messages = [make_message(n) for n in range(1, 11)]

    results = setup.send(messages)

    assert [r.outcome for r in results] == [Outcome.SENT] * 10
    assert server.refused_connections == 2  # the extra two, greeted with 421 4.3.2
    assert server.auth_successes == 1
    assert {g.connection_id for g in server.received} == {1}
    check_delivery(server, messages, results)


def test_a_connection_that_cannot_be_reopened_fails_one_message_and_leaves_the_rest(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(running, hold_mail_until_connections=3)
    server.inject("close_idle", address="r2@example.org", times=1)  # 421 after it
    server.inject("refuse_connection", skip=3)  # the three get through; no reopening
    point_at(setup, server, None)
    messages = [make_message(n, to=[f"r{n}@example.org"]) for n in range(1, 31)]

    results = setup.send(messages)

    outcomes = Counter(r.outcome for r in results)
    assert outcomes == Counter({Outcome.SENT: 29, Outcome.TEMPORARY: 1})
    (failed,) = [r for r in results if r.outcome is Outcome.TEMPORARY]
    assert failed.code == "421 4.3.2"  # nothing of it was handed over: sent again later
    assert server.refused_connections == 1
    check_delivery(server, messages, results)


def test_pipelined_and_parallel_through_the_latency_proxy_each_message_once(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(running, hold_mail_until_connections=3)
    server.inject("rcpt_permanent", address="gone@example.org")
    server.inject("data_temporary", address="later@example.org", times=2)
    with LatencyProxy(server.port, RTT) as proxy:
        point_at(setup, server, None, port=proxy.port)
        messages: Sequence[OutgoingMessage] = [
            make_message(n, to=[RECIPIENT, "gone@example.org"] if n % 4 == 0 else [RECIPIENT])
            for n in range(1, 21)
        ] + [make_message(n, to=["later@example.org"]) for n in (21, 22)]

        results = setup.send(messages)

    assert proxy.peak_connections == 3
    outcomes = Counter(r.outcome for r in results)
    assert outcomes == Counter({Outcome.SENT: 20, Outcome.TEMPORARY: 2})
    for partial in results[3:20:4]:  # messages 4, 8, … 20
        assert fates(partial) == [(RECIPIENT, DELIVERED), ("gone@example.org", REFUSED)]
    # Each message: one flight for MAIL, RCPT and DATA, one for the body; an RSET
    # after each refusal after the dot.
    assert sum(proxy.flights()) == 3 * SESSION_FLIGHTS + 2 * 22 + server.rsets
    assert server.rsets <= 2
    check_delivery(server, messages, results)


# --- results recorded beside the wire ------------------------------------------------------


class DatabaseGone(Exception):
    """What a report raises when the database cannot record a result."""


def test_a_result_that_cannot_be_recorded_completes_no_message_after_it(
    setup: SmtpCrm, running: Servers
) -> None:
    """The next message's envelope and body go while the result before it is recorded,
    but its final dot waits for that record: when recording fails, the message is never
    completed (the connection closes without the dot) and the failure reaches the caller.
    """
    server = plain_server(running)
    point_at(setup, server, None)
    setup.set_system(mail_max_connections="1")
    messages = [make_message(n) for n in (1, 2, 3)]

    def report(results: Sequence[SendResult]) -> None:
        # Recording in the connection's own thread, nothing more would have gone.
        server.wait_for_count("data_commands", 2)
        raise DatabaseGone("the database went away")

    with pytest.raises(DatabaseGone):
        setup.send(messages, report)
    assert server.data_commands == 2  # the second message's DATA, then its body, no dot
    assert [g.message_id for g in server.received] == [messages[0].message_id]
