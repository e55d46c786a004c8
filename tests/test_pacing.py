"""Pacing per sender mailbox, shared through the database, and throttling answers.

Real parts: the outbox's claim on SQLite and PostgreSQL, the SMTP transport against the
aiosmtpd stand-in (Microsoft 365's ``432 4.3.2`` and quota replies injected), and three
``crm outbox work`` processes against the Graph stand-in, which counts requests in
flight per mailbox and answers 429 MailboxConcurrency above 4. Time moves by the
``now`` each claim is given (the database's clock plus an offset), never by sleeping.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from crm_core import directory
from crm_core.app import Crm
from crm_core.mail import operations, pacing, policy, queue
from crm_core.mail.enqueue import MailRequest, enqueue
from crm_core.mail.transport import Outcome, SendResult
from crm_core.mail.worker import Worker
from crm_core.models import MailboxPace, MailboxSend, OutboxAttempt, OutboxMessage
from tests.conftest import CliResult
from tests.exchange_fixtures import USER, exchange_world, with_graph
from tests.exchange_fixtures import ca as ca
from tests.servers.smtp import SmtpServer
from tests.servers.tls import TestCA
from tests.test_outbox_helpers import queue_mail
from tests.test_worker_smtp import SENDER, queue_many, rows_by_id, smtp_crm, start_worker
from tests.test_worker_smtp import smtp_server as smtp_server

SMALL = "bo@example.se"
THREAD_LIMIT = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0P]"
QUOTA = (
    "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
    "process message due to a permanent exception with message Cannot submit message."
)


def set_system(crm: Crm, key: str, value: str) -> None:
    with crm.transaction() as session:
        crm.set_system_setting(session, key, value)


def db_now(crm: Crm) -> datetime:
    with crm.transaction() as session:
        return policy.db_now(session)


def claim_and_send(crm: Crm, at: datetime, batch: int = 50) -> list[queue.Claim]:
    """One claim at ``at`` (the injected clock), each claimed mail recorded as sent, then
    the connections the batch held on its mailbox freed, as the worker does at its end."""
    with crm.transaction() as session:
        claims = queue.claim_batch(crm, session, "w", batch, at).claims
        sent = [SendResult(c.message.message_id, Outcome.SENT) for c in claims]
        queue.record_results(crm, session, claims, sent, at)
        held = {(c.token, c.account.user_id): c for c in claims if c.slots and c.pace}
        for claim in held.values():
            assert claim.pace is not None
            pacing.release(session, claim.pace.mailbox, claim.token, claim.account.user_id)
    return claims


def lift_mailbox_pauses(crm: Crm) -> None:
    """The server's pause is over (its time moved into the past)."""
    with crm.transaction() as session:
        for pace in session.scalars(select(MailboxPace)):
            pace.paused_until = policy.db_now(session) - timedelta(seconds=1)


def test_a_paced_mailbox_sends_no_more_than_its_rate(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    set_system(crm, "mail.rate_per_minute", "5")
    ids = queue_many(crm, 12)
    start = db_now(crm)
    taken = {}
    for second in (0, 30, 59, 60, 61, 119, 120, 180):
        taken[second] = len(claim_and_send(crm, start + timedelta(seconds=second)))
        if second == 30:  # the sender reads why the mail waits, and until when
            with crm.transaction() as session:
                view = operations.show_message(session, ids[-1], crm).view
            assert (view.state, view.attempts) == ("queued", 0)
            until = pacing.clock_text(start + timedelta(minutes=1))
            assert view.paced == f"paced: 5 a minute for {SENDER}; next at {until}"
    assert taken == {0: 5, 30: 0, 59: 0, 60: 5, 61: 0, 119: 0, 120: 2, 180: 0}


def test_a_big_sender_does_not_starve_a_small_one(make_crm: Any, smtp_server: SmtpServer) -> None:
    crm = smtp_crm(make_crm, smtp_server.port, batch=10)
    with crm.transaction() as session:
        directory.add_user(session, SMALL, "Bo", "commercial")
    queue_many(crm, 40)  # the big sender's mail is all older
    queue_mail(crm, sender=SMALL)
    claims = claim_and_send(crm, db_now(crm), batch=10)
    assert Counter(c.account.email for c in claims) == {SENDER: 9, SMALL: 1}
    Worker(crm).run_once()
    assert smtp_server.accepted_count == 31  # the rest is sent as before


def test_smtp_432_pauses_the_mailbox_without_spending_an_attempt(
    make_crm: Any, smtp_server: SmtpServer, run_crm: Callable[..., CliResult]
) -> None:
    # One connection: the mails after the refused one are held, not tried (with three,
    # the two on the other connections would be in flight already, and get their own).
    crm = smtp_crm(make_crm, smtp_server.port, connections=1)
    ids = queue_many(crm, 3)
    smtp_server.inject("data_temporary", times=1, response=THREAD_LIMIT)
    stats = Worker(crm).run_once()
    assert (stats.deferred, stats.retry, stats.paused_mailboxes) == (3, 0, 1)
    assert smtp_server.accepted_count == 0 and smtp_server.data_commands == 1
    rows = rows_by_id(crm)
    assert {(rows[i].state, rows[i].attempts) for i in ids} == {("queued", 0)}
    assert "432 4.3.2" in (rows[ids[0]].last_error or "")
    assert "paused until" in (rows[ids[0]].last_error or "")
    assert Worker(crm).run_once().claimed == 0  # every worker waits for the mailbox
    listed = run_crm("outbox", "pauses", env=make_crm.env)  # the operator sees why
    assert f"Mailbox smtp:127.0.0.1:{SENDER} waits: the server paused sending" in listed.stdout
    assert "432 4.3.2" in listed.stdout and "No account is paused." in listed.stdout
    lift_mailbox_pauses(crm)
    Worker(crm).run_once()
    rows = rows_by_id(crm)
    assert {rows[i].state for i in ids} == {"sent"}
    assert sorted(smtp_server.message_ids()) == sorted(rows[i].message_id for i in ids)


def test_the_daily_quota_pauses_the_mailbox_and_tells_the_sender(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    set_system(crm, "mail.recipients_per_day", "1000")
    queue_many(crm, 2)
    assert Worker(crm).run_once().sent == 2
    with crm.transaction() as session:
        first = session.scalar(select(func.min(MailboxSend.at)))
    assert first is not None
    smtp_server.inject("data_permanent", times=1, response=QUOTA)
    late = queue_mail(crm, subject="after the quota")
    stats = Worker(crm).run_once()
    assert (stats.deferred, stats.failed, stats.paused_mailboxes) == (1, 0, 1)
    rolls = first + timedelta(days=1)  # the rolling day of the first send ends
    with crm.transaction() as session:
        [pace] = session.scalars(select(MailboxPace))
        assert pace.paused_until == rolls
        detail = operations.show_message(session, late, crm)
    assert (detail.view.state, detail.view.attempts) == ("queued", 0)
    said = detail.view.last_error or ""
    assert "daily limit" in said and "554 5.2.0" in said
    assert f"paused until {pacing.clock_text(rolls)}" in said and "goes by itself" in said
    assert (detail.view.paced or "").startswith(f"the server paused sending from {SENDER}")
    assert Worker(crm).run_once().claimed == 0


GRAPH_CONFIG = """\
[product_lines.commercial]
plugins = ["exchange_mail"]
default_transport = "exchange"

[outbox]
lease_seconds = 300
batch_size = 5
poll_seconds = 0.05
"""


def test_three_workers_keep_a_graph_mailbox_within_four_requests(make_crm: Any, ca: TestCA) -> None:
    if not make_crm.database_url.startswith("postgresql"):
        pytest.skip("many worker processes on one mailbox: PostgreSQL")
    total = 40
    with exchange_world(make_crm(GRAPH_CONFIG), ca) as world, with_graph(world) as graph:
        world.set_system("mail.rate_per_minute", "0")  # only the requests in flight count
        graph.delay(0.2)  # each request holds its slot a while, so workers overlap
        crm = world.crm
        workers = [start_worker(make_crm.env, f"w{n}") for n in range(3)]
        try:
            with crm.transaction() as session:  # one commit: every worker sees it all
                for i in range(total):
                    enqueue(crm, session, MailRequest(USER, [f"k{i}@example.org"], f"{i}", "Hej"))
            arrived = threading.Event()
            for _ in range(600):  # until every mail arrived (the wait ends on arrival)
                if len(graph.delivered) >= total or arrived.wait(0.1):
                    break
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            outputs = [worker.communicate(timeout=60) for worker in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        assert graph.peak_mailbox_concurrency <= 4
        assert [r for r in graph.requests if r.status == 429] == []
        assert len(graph.delivered) == total
        with crm.transaction() as session:
            states = Counter(session.scalars(select(OutboxMessage.state)))
            outcomes = Counter(session.scalars(select(OutboxAttempt.outcome)))
            spent = set(session.scalars(select(OutboxMessage.attempts)))
        assert states == {"sent": total} and outcomes == {"sent": total} and spent == {1}
