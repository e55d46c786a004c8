"""What the outbox promises per recipient, per result and against operators' races.

The transport is the in-test scripted plugin (tests/test_outbox_helpers.py) answering
per recipient as SMTP does; the real SMTP, EWS and Graph stand-ins have their own
fault tests. After each test, :func:`invariant` checks that every recipient of every
message is delivered exactly once, or refused with a reason, or waiting, or unknown
with evidence, and nothing was delivered twice.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from crm_core import signals
from crm_core.app import Crm
from crm_core.errors import ValidationError
from crm_core.mail import enqueue, operations, queue
from crm_core.mail.transport import Outcome, RecipientStatus, SendResult
from crm_core.mail.worker import Worker
from crm_core.models import OutboxMessage, utcnow
from tests.conftest import POSTGRES_ENV, CliResult, CrmFactory
from tests.test_outbox_helpers import (
    SCRIPTED_CONFIG,
    Scripted,
    add_people,
    leases_expire,
    scripted_crm,
    time_passes,
)

D, F, R = RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, RecipientStatus.REFUSED
TO = ["per@example.com", "eva@example.com"]
CC = ["bo@example.com", "li@example.com"]
BCC = ["ann@example.com"]
EVERYONE = [*TO, *CC, *BCC]


LINES_WITHOUT_THE_TEST_TRANSPORT = """
[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""


def queue_five(crm: Crm, subject: str, person: str | None = None) -> int:
    request = enqueue.MailRequest(
        "anna@example.se", TO, subject, "Hej!", cc=CC, bcc=BCC, person_email=person
    )
    with crm.transaction() as session:
        return enqueue.enqueue(crm, session, request).outbox_id


def invariant(crm: Crm, transport: Scripted, ambiguous: bool = False) -> None:
    """Each recipient: delivered exactly once, or refused with a reason, or still owed."""
    deliveries = Counter(transport.received)
    twice = {k: n for k, n in deliveries.items() if n > 1}
    assert ambiguous or not twice, f"delivered twice: {twice}"
    with crm.transaction() as session:
        for row in session.scalars(select(OutboxMessage)):
            fates = operations.recipient_states(row)
            for address, fate in fates.items():
                got = deliveries[(row.message_id, address)]
                if fate["state"] == "delivered":
                    assert got >= 1, (row.id, address, "recorded delivered, never arrived")
                elif fate["state"] == "refused":
                    assert got == 0 and fate["reply"], (row.id, address, fate)
                elif fate["state"] == "unknown":
                    assert row.last_error, (row.id, "unknown without evidence")
                else:
                    assert got == 0, (row.id, address, f"arrived but recorded {fate['state']}")


def test_deferred_recipients_get_a_later_attempt_for_them_alone(make_crm: CrmFactory) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    # Postfix's recipient limit: the first two are taken, the rest "452 too many".
    transport.per_recipient["Visning"] = [{a: F for a in EVERYONE[2:]}, {}]
    outbox_id = queue_five(crm, "Visning")
    Worker(crm).run_once()
    with crm.transaction() as session:
        row = operations.get_message(session, outbox_id)
        assert row.state == "retry"
        assert row.last_error is not None and row.last_error.startswith("sent to 2 of 5")
    time_passes(crm)
    Worker(crm).run_once()
    envelopes = [envelope for _, envelope in transport.envelopes]
    assert envelopes == [tuple(EVERYONE), tuple(EVERYONE[2:])]  # the second: them alone
    with crm.transaction() as session:
        detail = operations.show_message(session, outbox_id)
    assert detail.view.state == "sent"
    assert {f["state"] for f in detail.recipient_states.values()} == {"delivered"}
    assert detail.server_reply == "250 2.0.0 Ok: queued as 4XbScripted"
    assert len({m for m, _ in transport.received}) == 1  # one Message-ID throughout
    invariant(crm, transport)


def test_a_refused_recipient_makes_the_mail_partly_sent_everywhere_it_shows(
    make_crm: CrmFactory, run_crm: Callable[..., CliResult]
) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    transport.per_recipient["Visning"] = [{"bo@example.com": R}]
    heard: list[dict[str, Any]] = []

    def receiver(sender: object, **payload: Any) -> None:
        heard.append(payload)

    outbox_id = queue_five(crm, "Visning", person="per@example.com")
    with signals.mail_partly_sent.connected_to(receiver):
        stats = Worker(crm).run_once()
    assert stats.partial == 1 and stats.sent == 0
    expected = (
        "sent to 4 of 5; refused: bo@example.com "
        "(550 5.1.1 <bo@example.com>: Recipient address rejected)"
    )
    assert heard and expected in heard[0]["reason"]
    # The commands read what was recorded (the in-test transport is not installed).
    make_crm(LINES_WITHOUT_THE_TEST_TRANSPORT, init=False)
    shown = run_crm("outbox", "show", str(outbox_id), env=make_crm.env)
    assert f"Outbox #{outbox_id}: partial" in shown.stdout
    assert f"Recipients: {expected}" in shown.stdout
    assert "bo@example.com: refused: 550 5.1.1" in shown.stdout
    assert "Server:     250 2.0.0 Ok: queued as 4XbScripted" in shown.stdout
    listed = json.loads(run_crm("outbox", "list", "--json", env=make_crm.env).stdout)
    assert listed["messages"][0]["state"] == "partial"
    assert listed["messages"][0]["recipients_summary"] == expected
    history = run_crm("persons", "show", "per@example.com", env=make_crm.env).stdout
    assert f"— partial ({expected})" in history
    invariant(crm, transport)
    # An operator who fixed the address retries it: only the refused recipient is tried.
    crm, transport = _same_database(make_crm, transport)
    with crm.transaction() as session:
        operations.retry(session, outbox_id)
    Worker(crm).run_once()
    assert transport.envelopes[-1] == (transport.envelopes[-1][0], ("bo@example.com",))


def _same_database(make_crm: CrmFactory, transport: Scripted) -> tuple[Crm, Scripted]:
    """A Crm with the scripted transport again, on the test's database."""
    return make_crm(SCRIPTED_CONFIG, extra_plugins=(("test_transport", transport),)), transport


def test_a_mail_no_recipient_can_get_is_failed(make_crm: CrmFactory) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    transport.per_recipient["Visning"] = [{a: R for a in EVERYONE}]
    outbox_id = queue_five(crm, "Visning")
    Worker(crm).run_once()
    with crm.transaction() as session:
        assert operations.get_message(session, outbox_id).state == "failed"
    invariant(crm, transport)


def test_results_are_recorded_as_the_transport_reports_them(make_crm: CrmFactory) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    transport.report_each = True
    transport.fail_after = 2  # breaks down after two messages were answered
    ids = [queue_five(crm, f"Mail {n}") for n in range(3)]
    stats = Worker(crm).run_once()
    assert (stats.sent, stats.unknown) == (2, 1)
    with crm.transaction() as session:
        states = [operations.get_message(session, i).state for i in ids]
    assert states == ["sent", "sent", "unknown"]
    invariant(crm, transport)


# --- operators cannot race a worker (PostgreSQL: many sessions at once) ------------------


def _postgres_only(make_crm: CrmFactory) -> None:
    if not make_crm.database_url.startswith("postgresql"):
        pytest.skip("a race of two sessions needs PostgreSQL (SQLite has one writer)")
    assert os.environ.get(POSTGRES_ENV)


def _claim(crm: Crm) -> list[queue.Claim]:
    with crm.transaction() as session:
        return queue.claim_batch(crm, session, "worker-a", 10, utcnow()).claims


def test_retry_cannot_overwrite_a_claim_made_meanwhile(make_crm: CrmFactory) -> None:
    _postgres_only(make_crm)
    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    outbox_id = queue_five(crm, "Visning")
    with crm.transaction() as operator:
        operations.get_message(operator, outbox_id)  # the operator looks at it: queued
        [claim] = _claim(crm)  # meanwhile a worker claims it and commits
        with pytest.raises(ValidationError, match="being sent"):
            operations.retry(operator, outbox_id)
    with crm.transaction() as session:
        row = operations.get_message(session, outbox_id)
        assert (row.state, row.lease_token) == ("sending", claim.token)


def test_cancel_cannot_cancel_a_mail_a_worker_took_meanwhile(make_crm: CrmFactory) -> None:
    _postgres_only(make_crm)
    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    outbox_id = queue_five(crm, "Visning")
    with crm.transaction() as operator:
        operations.get_message(operator, outbox_id)
        _claim(crm)
        with pytest.raises(ValidationError, match="a worker is sending it right now"):
            operations.cancel(operator, outbox_id)
    with crm.transaction() as session:
        assert operations.get_message(session, outbox_id).state == "sending"


def test_resolve_cannot_requeue_a_mail_whose_result_landed_meanwhile(
    make_crm: CrmFactory,
) -> None:
    _postgres_only(make_crm)
    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    outbox_id = queue_five(crm, "Visning")
    [claim] = _claim(crm)
    with crm.transaction() as session:  # the lease ran out: unknown
        queue.reap_expired(session, claim.message.created_at.replace(year=3000))
    with crm.transaction() as operator:
        assert operations.get_message(operator, outbox_id).state == "unknown"
        with crm.transaction() as late:  # the original worker's answer lands after all
            sent = SendResult(claim.message.message_id, Outcome.SENT)
            queue.record_results(crm, late, [claim], [sent], utcnow())
        with pytest.raises(ValidationError, match="only messages in state unknown"):
            operations.resolve(operator, outbox_id, sent=False)
    with crm.transaction() as session:
        assert operations.get_message(session, outbox_id).state == "sent"


def test_unknown_mail_can_be_settled_in_bulk_after_a_preview(
    make_crm: CrmFactory, run_crm: Callable[..., CliResult]
) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    lost = (Outcome.AMBIGUOUS, "connection lost after the final dot; last reply: none", "", None)
    for n in range(3):
        transport.script[f"Lost {n}"] = [lost]
        queue_five(crm, f"Lost {n}")
    Worker(crm).run_once()
    make_crm(LINES_WITHOUT_THE_TEST_TRANSPORT, init=False)
    preview = run_crm("outbox", "resolve", "--unknown", "--dry-run", env=make_crm.env)
    assert preview.code == 0, preview.output
    assert preview.stdout.count("connection lost after the final dot") == 3
    assert preview.stdout.splitlines()[-1] == "3 unknown message(s) would be decided."
    assert (
        json.loads(run_crm("outbox", "list", "--json", env=make_crm.env).stdout)["messages"][0][
            "state"
        ]
        == "unknown"
    )  # the preview changed nothing
    later = run_crm(
        "outbox", "resolve", "--unknown", "--since", "2999-01-01", "--sent", env=make_crm.env
    )
    assert later.stdout.splitlines()[-1] == "0 unknown message(s) were marked sent."
    done = run_crm("outbox", "resolve", "--unknown", "--sent", env=make_crm.env)
    assert done.stdout.splitlines()[-1] == "3 unknown message(s) were marked sent."
    states = {
        m["state"]
        for m in json.loads(run_crm("outbox", "list", "--json", env=make_crm.env).stdout)[
            "messages"
        ]
    }
    assert states == {"sent"}
    refused = run_crm(
        "outbox", "resolve", "--unknown", "--since", "yesterday", "--sent", env=make_crm.env
    )
    assert refused.code == 2 and "is not a time" in refused.stderr


@pytest.mark.parametrize(("in_flight", "unknown"), [(0, 3), (1, 1)])
def test_a_dead_workers_unreported_mail_beyond_the_transports_window_goes_again(
    make_crm: CrmFactory, in_flight: int, unknown: int
) -> None:
    transport = Scripted(in_flight=in_flight)
    crm = make_crm(SCRIPTED_CONFIG, extra_plugins=(("test_transport", transport),))
    add_people(crm, "anna@example.se")
    ids = [queue_five(crm, f"Mail {n}") for n in range(4)]
    claims = _claim(crm)
    with crm.transaction() as session:  # the first result was reported, then the worker died
        sent = SendResult(claims[0].message.message_id, Outcome.SENT)
        queue.record_results(crm, session, claims[:1], [sent], utcnow())
    with crm.transaction() as session:
        reaped = queue.reap_expired(session, utcnow().replace(year=3000), crm.in_flight_windows())
    with crm.transaction() as session:
        states = [operations.get_message(session, i).state for i in ids]
        attempts = [operations.get_message(session, i).attempts for i in ids]
    assert len(reaped) == unknown
    assert states == ["sent", *["unknown"] * unknown, *["queued"] * (3 - unknown)]
    assert attempts == [1, *[1] * unknown, *[0] * (3 - unknown)]  # no try spent


def test_a_busy_worker_looks_for_expired_leases_at_start_then_now_and_then(
    make_crm: CrmFactory,
) -> None:
    # Why: a busy worker polls many times a second, while a dead worker's mail waits
    # for its lease (minutes) whatever the reaper does. The worker's clock decides.
    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    ticks = [0.0]
    worker = Worker(crm, clock=lambda: ticks[0])
    assert worker.reap_every == crm.config.outbox.lease_seconds / 10.0

    def a_dead_workers_mail() -> None:
        queue_five(crm, "Visning")
        _claim(crm)
        leases_expire(crm)

    a_dead_workers_mail()
    assert worker.run_once().reaped == 1  # at start
    a_dead_workers_mail()
    ticks[0] = worker.reap_every - 1.0
    assert worker.run_once().reaped == 0  # not yet: it waits for its lease
    ticks[0] = worker.reap_every
    assert worker.run_once().reaped == 1
    with crm.transaction() as session:
        states = [m.state for m in session.scalars(select(OutboxMessage))]
    assert states == ["unknown", "unknown"]


def test_a_running_worker_settles_unknown_mail_by_itself(make_crm: CrmFactory) -> None:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    transport.script["Lost"] = [(Outcome.AMBIGUOUS, "the answer was lost", "", None)]
    outbox_id = queue_five(crm, "Lost")
    Worker(crm).run_once()  # the answer is lost: unknown
    with crm.transaction() as session:
        message_id = operations.get_message(session, outbox_id).message_id
    transport.reconcile_answers[message_id] = True  # the transport can now see it went
    ticks = [0.0]  # the worker's clock, moved by hand
    worker = Worker(crm, clock=lambda: ticks[0])
    ticks[0] = 1.0
    stop = threading.Event()

    def stop_after_the_first_look(sender: object, **payload: object) -> None:
        stop.set()

    with signals.mail_sent.connected_to(stop_after_the_first_look):
        stats = worker.run(stop)  # due at start: the first loop settles it
    assert stats.reconciled == 1
    ticks[0] = 300.0
    assert worker.reconcile_when_due() == 0  # not due again until 300 s later
    with crm.transaction() as session:
        assert operations.get_message(session, outbox_id).state == "sent"
