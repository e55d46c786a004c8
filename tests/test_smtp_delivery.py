"""Delivery guarantees against a Postfix-like server (issue 10, the SMTP half).

The aiosmtpd stand-in behaves like the Postfix the outbox was run against: a refusal
after the final dot leaves the transaction open until RSET (``503 5.5.1 Error: nested
MAIL command`` otherwise), a recipient limit answers ``452 4.5.3 Error: too many
recipients``, and accepted mail is answered ``250 2.0.0 Ok: queued as <id>``. After
every fault, :func:`check_delivery` counts at the server, by Message-ID and
recipient, that nothing was lost or delivered twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from crm_core.mail.addresses import Address
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import Outcome, RecipientResult, RecipientStatus, SendResult
from crm_core.models import utcnow
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


def plain_server(setup: SmtpCrm, running: Servers, **options: object) -> SmtpServer:
    """A loopback server without TLS that requires the user's password login."""
    server = running.start(
        security="none", users=users(), auth_required=True, auth_require_tls=False, **options
    )
    point_at(setup, server, None)
    return server


# --- 1. after a refused transaction, the session is reset ------------------------------


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [("data_permanent", Outcome.PERMANENT), ("data_temporary", Outcome.TEMPORARY)],
)
def test_a_refusal_at_end_of_data_resets_the_session_for_the_next_message(
    setup: SmtpCrm, running: Servers, fault: str, outcome: Outcome
) -> None:
    server = plain_server(setup, running)
    setup.set_system(mail_max_connections="1")  # one session: the 2nd follows the refusal
    server.inject(fault, times=1)  # type: ignore[arg-type]
    messages = [make_message(1), make_message(2)]

    refused, sent = results = setup.send(messages)

    assert refused.outcome is outcome
    assert sent.outcome is Outcome.SENT, sent.detail  # not 503, not a paused account
    assert server.connections == 1 and server.rsets == 1
    assert server.message_ids() == [messages[1].message_id]
    check_delivery(server, messages, results)


# --- 2. each recipient has its own fate --------------------------------------------------

DELIVERED, DEFERRED, REFUSED = (
    RecipientStatus.DELIVERED,
    RecipientStatus.DEFERRED,
    RecipientStatus.REFUSED,
)
BUSY = "451 4.3.0 Temporary server error. Please try again later"
GONE = "550 5.1.1 User unknown; recipient address rejected"


def fates(result: SendResult) -> list[tuple[str, RecipientStatus]]:
    return [(r.address, r.status) for r in result.recipients]


def still_owed(message: OutgoingMessage, result: SendResult) -> OutgoingMessage | None:
    """The next attempt, as the core makes it: for the deferred recipients alone."""
    waiting = {r.address for r in result.recipients if r.status is DEFERRED}
    envelope = tuple(a for a in message.recipients if a.email in waiting)
    return replace(message, envelope=envelope) if envelope else None


def test_each_recipient_has_its_own_fate_in_the_servers_words(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(setup, running)
    server.inject("rcpt_temporary", address="busy@example.org")
    server.inject("rcpt_permanent", address="gone@example.org")
    message = make_message(to=[RECIPIENT], cc=["busy@example.org"], bcc=["gone@example.org"])

    result = setup.send_one(message)

    (got,) = server.received
    assert result.outcome is Outcome.SENT
    assert result.recipients == (
        RecipientResult(RECIPIENT, DELIVERED, f"250 2.0.0 Ok: queued as {got.queue_id}"),
        RecipientResult("busy@example.org", DEFERRED, BUSY),
        RecipientResult("gone@example.org", REFUSED, GONE),
    )
    assert f"not delivered to: gone@example.org ({GONE})" in result.detail
    assert "deferred for: busy@example.org" in result.detail
    check_delivery(server, [message], [result])


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "step-by-step"])
def test_too_many_recipients_defers_the_rest_for_a_later_attempt_of_their_own(
    setup: SmtpCrm, running: Servers, pipelining: bool
) -> None:
    server = plain_server(setup, running, recipient_limit=2, pipelining=pipelining)
    to, cc, bcc = (
        ["a@example.org", "b@example.org"],
        ["c@example.org", "d@example.org"],
        ["e@x.org"],
    )
    message: OutgoingMessage | None = make_message(to=to, cc=cc, bcc=bcc)

    results: list[SendResult] = []
    while message is not None:  # the core's later attempts, for the deferred alone
        results.append(setup.send_one(message))
        check_delivery(server, [message], results[-1:])
        message = still_owed(message, results[-1])

    first = results[0]
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert fates(first) == [
        ("a@example.org", DELIVERED),
        ("b@example.org", DELIVERED),
        ("c@example.org", DEFERRED),
        ("d@example.org", DEFERRED),
        ("e@x.org", DEFERRED),
    ]
    assert {r.reply for r in first.recipients[2:]} == {"452 4.5.3 Error: too many recipients"}
    assert fates(results[2]) == [("e@x.org", DELIVERED)]
    if pipelining:  # every RCPT went in the one write; each 452 read and heeded
        assert server.rcpt_commands == 5 + 3 + 1
    else:
        assert server.rcpt_commands == 3 + 3 + 1  # no RCPT after a 452 4.5.3
    arrived = Counter((g.message_id, r) for g in server.received for r in g.rcpt_tos)
    assert set(arrived.values()) == {1} and len(arrived) == 5
    assert len({g.message_id for g in server.received}) == 1  # the same Message-ID
    for got in server.received:  # every attempt shows every To and Cc, never the Bcc
        assert [a.addr_spec for a in got.message["To"].addresses] == to
        assert [a.addr_spec for a in got.message["Cc"].addresses] == cc
        assert b"e@x.org" not in got.data


@pytest.mark.parametrize(
    ("replies", "outcome", "statuses"),
    [
        (
            {"busy@example.org": BUSY, "gone@example.org": GONE},
            Outcome.TEMPORARY,
            [DEFERRED, REFUSED],
        ),
        (
            {"gone@example.org": GONE, "left@example.org": GONE},
            Outcome.PERMANENT,
            [REFUSED, REFUSED],
        ),
        (
            {"a@example.org": "550 5.7.64 TenantAttribution; Relay Access Denied"},
            Outcome.CONFIGURATION,
            [DEFERRED],  # about the account: the recipient waits until it is fixed
        ),
    ],
    ids=["deferred-and-refused", "all-refused", "refused-for-the-account"],
)
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "step-by-step"])
def test_when_no_recipient_is_accepted_no_data_is_sent_and_the_outcome_follows_them(
    setup: SmtpCrm,
    running: Servers,
    replies: dict[str, str],
    outcome: Outcome,
    statuses: list[RecipientStatus],
    pipelining: bool,
) -> None:
    server = plain_server(setup, running, pipelining=pipelining)
    for address, reply in replies.items():
        server.inject("rcpt_permanent", address=address, response=reply)
    message = make_message(to=list(replies))

    result = setup.send_one(message)

    assert result.outcome is outcome, result.detail
    assert fates(result) == list(zip(replies, statuses, strict=True))
    assert [r.reply for r in result.recipients] == list(replies.values())
    # Pipelined, DATA went with the RCPTs and was refused (503): no body followed, and
    # that reply speaks for nobody.
    assert server.data_commands == (1 if pipelining else 0)
    assert "503" not in result.detail and "need RCPT" not in result.detail
    assert server.received == []
    check_delivery(server, [message], [result])


def test_a_refusal_after_the_dot_is_temporary_while_a_recipient_waits(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(setup, running)
    server.inject("rcpt_temporary", address="busy@example.org")
    server.inject("data_permanent", times=1)
    message = make_message(to=[RECIPIENT, "busy@example.org"])

    result = setup.send_one(message)

    rejected = "554 5.6.0 Message rejected: invalid content"
    assert result.outcome is Outcome.TEMPORARY, result.detail
    assert result.recipients == (
        RecipientResult(RECIPIENT, REFUSED, rejected),
        RecipientResult("busy@example.org", DEFERRED, BUSY),
    )
    assert result.reply == rejected and result.code == "554 5.6.0"
    check_delivery(server, [message], [result])


# --- 3. each result is recorded as it happens ----------------------------------------------


def test_each_result_is_reported_as_its_final_reply_arrives(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(setup, running)
    setup.set_system(mail_max_connections="1")  # one session: reports in its order
    server.inject("data_permanent", address="r2@example.org", times=1)  # refusals too
    messages = [make_message(n, to=[f"r{n}@example.org"]) for n in (1, 2, 3)]
    ids = [m.message_id for m in messages]
    reported: list[SendResult] = []
    seen: list[tuple[str, list[str], int]] = []  # what the server had at each report

    def report(results: Sequence[SendResult]) -> None:
        reported.extend(results)
        seen.extend((r.message_id, server.message_ids(), server.data_commands) for r in results)

    results = setup.send(messages, report=report)

    # The next message's DATA and body may go while a result is reported (recorded
    # beside the wire), but it is never completed before: the server never has more.
    assert [(mid, had) for mid, had, _ in seen] == [
        (ids[0], ids[:1]),
        (ids[1], ids[:1]),  # its refusal was reported before the next mail was completed
        (ids[2], [ids[0], ids[2]]),
    ]
    assert all(data <= n + 2 for n, (_, _, data) in enumerate(seen))
    assert reported == results
    check_delivery(server, messages, results)


# --- 4. the server's reply is kept ------------------------------------------------------------


def test_the_servers_reply_is_kept_for_every_sent_message(setup: SmtpCrm, running: Servers) -> None:
    server = plain_server(setup, running)
    messages = [make_message(n) for n in (1, 2, 3)]

    results = setup.send(messages)

    # By Message-ID: over parallel connections the server may take them in any order.
    queued = {got.message_id: f"250 2.0.0 Ok: queued as {got.queue_id}" for got in server.received}
    assert {r.message_id: r.reply for r in results} == queued
    assert len(set(queued.values())) == 3
    check_delivery(server, messages, results)


# --- 5. an unknown comes with its evidence ---------------------------------------------------


def test_a_reply_lost_after_the_dot_is_unknown_with_the_step_and_the_servers_last_words(
    setup: SmtpCrm, running: Servers
) -> None:
    server = plain_server(setup, running)
    server.inject("rcpt_temporary", address="busy@example.org", times=1)
    server.inject("drop_after_data", address=RECIPIENT, times=1)
    messages = [
        make_message(1, to=[RECIPIENT, "busy@example.org"]),
        make_message(2, to=["other@example.org"]),
    ]

    lost, sent = results = setup.send(messages)

    assert lost.outcome is Outcome.AMBIGUOUS and sent.outcome is Outcome.SENT
    assert lost.reply == "354 End data with <CR><LF>.<CR><LF>"
    assert "after the final dot of DATA" in lost.detail
    assert "The server's last reply was: 354 End data" in lost.detail
    assert "Connection unexpectedly closed" in lost.detail
    assert fates(lost) == [("busy@example.org", DEFERRED)]  # known; kund@ is unknown
    check_delivery(server, messages, results, ambiguous={messages[0].message_id})

    (settled,) = setup.crm.reconcile_mail(setup.account(), messages[:1], utcnow())

    assert settled.sent is None
    assert "keeps no Sent folder" in settled.detail
    assert messages[0].message_id in settled.detail  # what to look for in the server's log
    assert "look in the mailbox's Sent folder" not in settled.detail


def test_a_connection_lost_while_naming_recipients_is_temporary_with_its_evidence(
    setup: SmtpCrm, running: Servers
) -> None:
    # The message before it was sent: its final dot must not make this one "unknown".
    server = plain_server(setup, running)
    server.inject("drop_at_rcpt", address="b@example.org", times=1)
    messages = [
        make_message(1),
        make_message(2, to=["a@example.org", "b@example.org"]),
        make_message(3),
    ]

    first, cut, third = results = setup.send(messages)

    assert cut.outcome is Outcome.TEMPORARY and cut.code == "disconnected", cut.detail
    assert "while naming the recipients (RCPT TO)" in cut.detail
    assert cut.reply == "250 2.1.5 Recipient OK"  # the server's answer for a@
    assert fates(cut) == [("a@example.org", DEFERRED), ("b@example.org", DEFERRED)]
    lost = "no reply: the connection was lost while naming the recipients (RCPT TO)"
    assert {r.reply for r in cut.recipients} == {lost}
    assert (first.outcome, third.outcome) == (Outcome.SENT, Outcome.SENT)
    check_delivery(server, messages, results)


# --- 6. one bad message never poisons its batch ---------------------------------------------


def _bad(**changes: object) -> Callable[[OutgoingMessage], OutgoingMessage]:
    """Build the bad message directly: enqueue would refuse it before any transport."""
    return lambda message: replace(message, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        pytest.param(_bad(subject="Offer\vnext"), "bad-header", id="vertical-tab-in-subject"),
        pytest.param(
            _bad(subject="Offer\nBcc: all@example.org"), "bad-header", id="line-feed-in-subject"
        ),
        pytest.param(
            _bad(to=(Address(RECIPIENT, "Per\vPersson"),)), "bad-header", id="vertical-tab-in-name"
        ),
        pytest.param(_bad(text="Hej \udcff\n"), "unencodable", id="text-no-charset-encodes"),
    ],
)
def test_a_message_that_cannot_be_rendered_fails_alone_and_the_batch_goes_on(
    setup: SmtpCrm,
    running: Servers,
    spoil: Callable[[OutgoingMessage], OutgoingMessage],
    code: str,
) -> None:
    server = plain_server(setup, running)
    messages = [make_message(1), spoil(make_message(2)), make_message(3)]
    reported: list[SendResult] = []

    results = setup.send(messages, report=reported.extend)

    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.PERMANENT, Outcome.SENT]
    assert results[1].code == code and "send the message again" in results[1].detail
    assert sorted(reported, key=str) == sorted(results, key=str)  # each once; none unknown
    assert sorted(server.message_ids()) == sorted([messages[0].message_id, messages[2].message_id])
    assert server.connections == 3  # those opened at the start: none had to be reopened
    check_delivery(server, messages, results)


# --- 7. a reply about the order of commands is never the account's fault ---------------


@pytest.mark.parametrize(
    ("fault", "reply"),
    [
        ("mail_from_reject", "503 5.5.1 Error: nested MAIL command"),
        ("rcpt_permanent", "503 5.5.1 Error: need MAIL command"),
        ("data_permanent", "503 5.5.1 Error: need RCPT command"),
    ],
)
def test_bad_sequence_after_our_command_is_temporary_and_resets_the_session(
    setup: SmtpCrm, running: Servers, fault: str, reply: str
) -> None:
    server = plain_server(setup, running)
    setup.set_system(mail_max_connections="1")  # one session: the 2nd follows the 503
    server.inject(fault, times=1, response=reply)  # type: ignore[arg-type]
    messages = [make_message(1), make_message(2)]

    out_of_step, sent = results = setup.send(messages)

    assert out_of_step.outcome is Outcome.TEMPORARY, out_of_step.detail
    assert out_of_step.code == "503 5.5.1"
    assert "not the message or the account" in out_of_step.detail
    assert sent.outcome is Outcome.SENT, sent.detail
    assert server.connections == 1 and server.rsets == 1
    check_delivery(server, messages, results)
