"""Delivery guarantees against a Postfix-like server (issue 10, the SMTP half).

The aiosmtpd stand-in behaves like the Postfix the outbox was run against: a refusal
after the final dot leaves the transaction open until RSET (``503 5.5.1 Error: nested
MAIL command`` otherwise), a recipient limit answers ``452 4.5.3 Error: too many
recipients``, and accepted mail is answered ``250 2.0.0 Ok: queued as <id>``. After
every fault, :func:`check_delivery` counts at the server, by Message-ID and
recipient, that nothing was lost or delivered twice.
"""

from __future__ import annotations

import pytest

from crm_core.mail.transport import Outcome
from tests.servers.smtp import SmtpServer
from tests.smtp_fixtures import (
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
    server.inject(fault, times=1)  # type: ignore[arg-type]
    messages = [make_message(1), make_message(2)]

    refused, sent = results = setup.send(messages)

    assert refused.outcome is outcome
    assert sent.outcome is Outcome.SENT, sent.detail  # not 503, not a paused account
    assert server.connections == 1 and server.rsets == 1
    assert server.message_ids() == [messages[1].message_id]
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
    server.inject(fault, times=1, response=reply)  # type: ignore[arg-type]
    messages = [make_message(1), make_message(2)]

    out_of_step, sent = results = setup.send(messages)

    assert out_of_step.outcome is Outcome.TEMPORARY, out_of_step.detail
    assert out_of_step.code == "503 5.5.1"
    assert "not the message or the account" in out_of_step.detail
    assert sent.outcome is Outcome.SENT, sent.detail
    assert server.connections == 1 and server.rsets == 1
    check_delivery(server, messages, results)
