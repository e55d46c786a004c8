"""Delivery guarantees against the stand-ins (issue 10): once, or refused, or unknown.

Each fault test ends with the invariant: every mail went exactly once (the stand-ins
count deliveries per Message-ID), or was refused with a reason, or is unknown with
evidence; none is lost, stuck or sent twice unless the test injected an ambiguous
fault. The outbox tests go through the real outbox (enqueue, ``Worker.run_once``,
``reconcile``) on both database backends; time moves on the stand-ins' clock
(filing lags) and, for "long ago", by moving the outbox's own timestamps back, never
by sleeping.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from sqlalchemy import select

from crm_core.mail import enqueue, queue
from crm_core.mail.enqueue import MailRequest
from crm_core.mail.message import Attachment, OutgoingMessage
from crm_core.mail.reconciler import reconcile
from crm_core.mail.transport import Outcome, SendResult
from crm_core.mail.worker import Worker, WorkerStats
from crm_core.models import MailboxPace, OutboxAttempt, OutboxMessage, utcnow
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    RECIPIENT,
    USER,
    ExchangeWorld,
    exchange_world,
    make_message,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.servers.clock import FakeClock
from tests.servers.ews import EwsServer
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA

APIS = ("ews", "graph")
FILING = 600.0  # seconds Exchange takes to file the mail in the tests that say so


@dataclass
class Rig:
    """The stand-ins on a clock the test moves, and the Crm that sends through them."""

    world: ExchangeWorld
    clock: FakeClock
    api: str

    @property
    def server(self) -> EwsServer | GraphServer:
        """The stand-in the transport sends to."""
        return self.world.graph if self.world.graph is not None else self.world.ews

    def deliveries(self) -> Counter[str]:
        """Deliveries per Message-ID."""
        return Counter(d.internet_message_id for d in self.server.delivered)

    def send_requests(self) -> int:
        """Requests that carried mail: EWS CreateItem, Graph sendMail or $batch (outer)."""
        if isinstance(self.server, EwsServer):
            return self.server.ops["CreateItem"]
        return sum(
            1
            for r in self.server.requests
            if r.batch_id is None and r.operation in ("sendMail", "$batch")
        )

    def work(self) -> WorkerStats:
        """One drain of the outbox by a worker."""
        return Worker(self.world.crm, name="test-worker").run_once()


@contextlib.contextmanager
def rig_for(api: str, make_crm: CrmFactory, ca: TestCA) -> Iterator[Rig]:
    """The stand-ins for ``api`` ("ews" or "graph") on a fake clock, and a configured Crm."""
    clock = FakeClock()
    with exchange_world(make_crm(), ca, clock=clock) as world:
        if api == "graph":
            with with_graph(world, clock=clock):
                yield Rig(world, clock, api)
        else:
            yield Rig(world, clock, api)


@pytest.fixture(params=APIS)
def rig(request: pytest.FixtureRequest, make_crm: CrmFactory, ca: TestCA) -> Iterator[Rig]:
    with rig_for(request.param, make_crm, ca) as made:
        yield made


@pytest.fixture
def ews_rig(make_crm: CrmFactory, ca: TestCA) -> Iterator[Rig]:
    with rig_for("ews", make_crm, ca) as made:
        yield made


@pytest.fixture
def graph_rig(make_crm: CrmFactory, ca: TestCA) -> Iterator[Rig]:
    with rig_for("graph", make_crm, ca) as made:
        yield made


# --- the outbox, and moving its clock back ------------------------------------------


def queue_mail(rig: Rig, n: int) -> list[str]:
    """Queue ``n`` mails from the user; their Message-IDs."""
    ids = []
    with rig.world.crm.transaction() as session:
        for i in range(n):
            request = MailRequest(USER, [RECIPIENT], f"Offer {i}", f"Offer {i}\n")
            ids.append(enqueue.enqueue(rig.world.crm, session, request).message_id)
    return ids


def backdate(rig: Rig, *, queued: timedelta, handed_over: timedelta = timedelta(0)) -> None:
    """Move every mail's enqueue (and every attempt's start) that far into the past."""
    with rig.world.crm.transaction() as session:
        for row in session.scalars(select(OutboxMessage)):
            row.created_at -= queued
        for attempt in session.scalars(select(OutboxAttempt)):
            attempt.started_at -= handed_over


def states(rig: Rig) -> dict[str, str]:
    """Each mail's state in the outbox, by Message-ID."""
    with rig.world.crm.transaction() as session:
        return {r.message_id: r.state for r in session.scalars(select(OutboxMessage))}


def assert_each_sent_once(rig: Rig, ids: Sequence[str]) -> None:
    """The invariant after a fault that left nothing refused: every mail went once, and
    the outbox says so."""
    assert {m: rig.deliveries()[m] for m in ids} == dict.fromkeys(ids, 1)
    assert states(rig) == dict.fromkeys(ids, "sent")


# --- 1. "too soon to tell" is measured from the last hand-over ----------------------


def test_a_lost_answer_is_measured_from_the_hand_over_not_the_enqueue(rig: Rig) -> None:
    ids = queue_mail(rig, 3)
    backdate(rig, queued=timedelta(hours=1))  # queued while the workers were down
    rig.server.outbox_lag(FILING)  # Exchange files the mail only 10 minutes later
    rig.server.sent_items_lag(FILING)
    rig.server.drop_after_request(1, only_sends=True)
    assert rig.work().unknown == 3
    assert rig.deliveries() == dict.fromkeys(ids, 1)

    # Handed over seconds ago (by the database's clock) and filed nowhere yet: too
    # soon to tell, although each mail was queued an hour ago.
    early = reconcile(rig.world.crm)
    assert {(r.sent, r.applied) for r in early} == {(None, False)}, early
    assert all("look again later" in r.detail for r in early)
    rig.work()
    assert rig.deliveries() == dict.fromkeys(ids, 1)  # nothing sent again

    rig.clock.advance(FILING)  # filed now
    assert {(r.sent, r.applied) for r in reconcile(rig.world.crm)} == {(True, True)}
    rig.work()
    assert_each_sent_once(rig, ids)


def test_a_claim_whose_worker_died_is_sent_once_after_the_window(rig: Rig) -> None:
    [never] = queue_mail(rig, 1)
    with rig.world.crm.transaction() as session:
        claimed = queue.claim_batch(rig.world.crm, session, "crashed-worker", 10, utcnow())
        assert [c.message.message_id for c in claimed.claims] == [never]
    with rig.world.crm.transaction() as session:
        queue.reap_expired(session, utcnow() + timedelta(hours=1))
    assert states(rig) == {never: "unknown"}

    # Handed over (claimed) seconds ago: too soon to call it not sent.
    [early] = reconcile(rig.world.crm)
    assert (early.sent, early.applied) == (None, False)
    # Handed over an hour ago and found nowhere: not sent; queued again and sent once.
    # (A window counted from the enqueue, a moment ago, kept it unknown: stuck.)
    backdate(rig, queued=timedelta(0), handed_over=timedelta(hours=1))
    [late] = reconcile(rig.world.crm)
    assert (late.sent, late.applied) == (False, True), late
    rig.work()
    assert_each_sent_once(rig, [never])


# --- 2. a server error after the request left is ambiguous --------------------------


def after_the_server_error(rig: Rig, ids: Sequence[str]) -> None:
    """Each mail is unknown, never sent blindly, then found and marked sent: once each."""
    assert rig.deliveries() == dict.fromkeys(ids, 1)  # Exchange took them all the same
    rig.work()  # nothing is due: an unknown mail is never sent blindly
    assert {(r.sent, r.applied) for r in reconcile(rig.world.crm)} == {(True, True)}
    rig.work()
    assert_each_sent_once(rig, ids)


@pytest.mark.parametrize("status", [500, 502, 504])
@pytest.mark.parametrize("count", [1, 3], ids=["one-mail", "three-mails"])
def test_a_server_error_after_the_mail_went_is_unknown_then_reconciled(
    rig: Rig, status: int, count: int
) -> None:
    """EWS CreateItem; Graph sendMail (one mail) or $batch (three)."""
    ids = queue_mail(rig, count)
    rig.server.fail_after_processing(status)  # carried out, then answered with the error
    stats = rig.work()
    assert (stats.unknown, stats.retry, stats.sent) == (count, 0, 0), stats
    after_the_server_error(rig, ids)


def test_a_proxys_error_page_with_connection_close_is_not_a_busy_server(ews_rig: Rig) -> None:
    """exchangelib calls any error answer with Connection: close "busy, OK to retry"."""
    assert isinstance(ews_rig.server, EwsServer)
    ids = queue_mail(ews_rig, 2)
    ews_rig.server.fail_after_processing(502, close=True)
    stats = ews_rig.work()
    assert (stats.unknown, stats.retry) == (2, 0), stats
    after_the_server_error(ews_rig, ids)


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_server_error_for_one_batch_item_makes_that_mail_alone_unknown(
    graph_rig: Rig, status: int
) -> None:
    assert isinstance(graph_rig.server, GraphServer)
    ids = queue_mail(graph_rig, 3)
    graph_rig.server.fail_after_processing(status, in_batch=True)
    stats = graph_rig.work()
    assert (stats.sent, stats.unknown, stats.retry) == (2, 1, 0), stats
    after_the_server_error(graph_rig, ids)


def test_503_with_retry_after_pauses_the_mailbox_for_that_long(rig: Rig) -> None:
    """Nothing ran and the service said when to come back (90 s): the mailbox waits
    exactly that long, for every worker, and the mail spends no attempt."""
    ids = queue_mail(rig, 2)
    rig.server.http_503(1, retry_after=90)
    stats = rig.work()
    assert (stats.deferred, stats.retry, stats.unknown, stats.paused_mailboxes) == (2, 0, 0, 1)
    assert rig.deliveries() == Counter()
    with rig.world.crm.transaction() as session:
        [pace] = session.scalars(select(MailboxPace))
        rows = list(session.scalars(select(OutboxMessage)))
        assert pace.paused_until is not None
        assert pace.paused_until - rows[0].updated_at == timedelta(seconds=90)
        assert {(r.state, r.attempts) for r in rows} == {("queued", 0)}
        assert all("paused until" in (r.last_error or "") for r in rows)
    assert rig.work().claimed == 0  # still paused: nothing is tried, nothing is spent
    with rig.world.crm.transaction() as session:  # 90 seconds later
        for pace in session.scalars(select(MailboxPace)):
            pace.paused_until = utcnow() - timedelta(seconds=1)
    rig.work()
    assert_each_sent_once(rig, ids)


# --- 3. both APIs look in the Outbox as well as in Sent Items -------------------------


def test_reconcile_finds_a_mail_still_waiting_in_the_outbox(rig: Rig) -> None:
    ids = queue_mail(rig, 2)
    rig.server.sent_items_lag(3600)  # stuck in the Outbox for an hour
    rig.server.drop_after_request(1, only_sends=True)
    assert rig.work().unknown == 2
    backdate(rig, queued=timedelta(minutes=30), handed_over=timedelta(minutes=30))

    reports = reconcile(rig.world.crm)
    assert {(r.sent, r.applied) for r in reports} == {(True, True)}, reports
    assert {r.detail for r in reports} == {f"found in {USER}'s Outbox"}
    rig.work()
    assert_each_sent_once(rig, ids)


# --- 4. results are reported as they happen -----------------------------------------


@dataclass
class Heard:
    """What ``report`` heard, and how many mail-carrying requests had left by then.

    ``then`` runs after the first report: a fault for the requests still to come.
    """

    rig: Rig
    then: Callable[[], None] = lambda: None
    calls: list[tuple[int, list[SendResult]]] = field(default_factory=list)

    def __call__(self, results: Sequence[SendResult]) -> None:
        self.calls.append((self.rig.send_requests(), list(results)))
        if len(self.calls) == 1:
            self.then()


def test_each_request_is_reported_before_the_next_one_leaves(rig: Rig) -> None:
    per_request = 50 if rig.api == "ews" else 20
    messages = [make_message(n) for n in range(2 * per_request + 5)]  # three requests
    # The second request's answer is lost: a worker killed while waiting for it leaves
    # only that request's mails unknown, because the first request's were reported.
    heard = Heard(rig, then=lambda: rig.server.drop_after_request(1, only_sends=True))
    results = rig.world.crm.send_mail(rig.world.account(), messages, report=heard)

    assert [(n, len(batch)) for n, batch in heard.calls] == [
        (1, per_request),
        (2, per_request + 5),
    ]
    first, second = (batch for _, batch in heard.calls)
    assert {r.outcome for r in first} == {Outcome.SENT}
    assert [r.outcome for r in second] == [Outcome.AMBIGUOUS] * per_request + [
        Outcome.TEMPORARY
    ] * 5  # the third request was never made
    assert sorted(first + second, key=lambda r: r.message_id) == sorted(
        results, key=lambda r: r.message_id
    )
    assert rig.deliveries() == {m.message_id: 1 for m in messages[: 2 * per_request]}


# --- 5. one bad message never poisons its batch -------------------------------------


def unencodable() -> list[OutgoingMessage]:
    """Messages no API can encode: text decoded with surrogateescape (undecodable bytes)."""
    bad_subject = make_message(2, subject="Offert \udce5")
    bad_text = make_message(3, text="Hej \udcf6!\n")
    bad_file = make_message(
        4, attachments=[Attachment("offert-\udce4.pdf", "application/pdf", b"x")]
    )
    return [bad_subject, bad_text, bad_file]


def test_a_message_that_cannot_be_encoded_fails_alone(rig: Rig) -> None:
    good = [make_message(1), make_message(5), make_message(6)]
    bad = unencodable()
    messages = [good[0], *bad, *good[1:]]
    heard = Heard(rig)
    results = rig.world.crm.send_mail(rig.world.account(), messages, report=heard)
    by_id = {r.message_id: r for r in results}
    assert [by_id[m.message_id].outcome for m in good] == [Outcome.SENT] * 3
    for message in bad:
        refused = by_id[message.message_id]
        assert (refused.outcome, refused.code) == (Outcome.PERMANENT, "invalid-message"), refused
        assert "cannot take this message" in refused.detail
    assert rig.deliveries() == {m.message_id: 1 for m in good}
    assert not any(r.outcome is Outcome.AMBIGUOUS for r in results)
    # The refused ones are reported before any request leaves.
    assert heard.calls[0][0] == 0
    assert {r.message_id for r in heard.calls[0][1]} == {m.message_id for m in bad}


# --- 6. the server's answer is kept ---------------------------------------------------


REQUEST_ID = re.compile(r"request-id ([0-9a-f-]{36})")


def test_each_sent_message_keeps_the_servers_answer(rig: Rig) -> None:
    [one] = rig.world.send([make_message(1)])
    rid = REQUEST_ID.search(one.reply)
    assert rid is not None, one.reply
    assert rid.group(1) == rig.server.requests[-1].request_id
    if rig.api == "ews":
        assert one.reply.startswith("NoError"), one.reply
    else:
        assert one.reply.startswith("202 Accepted"), one.reply
        assert "client-request-id" in one.reply
    several = rig.world.send([make_message(n) for n in range(2, 5)])
    assert all(r.outcome is Outcome.SENT and REQUEST_ID.search(r.reply) for r in several)
    assert len({r.reply for r in several}) == (1 if rig.api == "ews" else 3)  # items named
    assert all(len(r.reply) < 200 for r in [one, *several])


def test_a_refusal_keeps_the_servers_words(rig: Rig) -> None:
    if isinstance(rig.server, EwsServer):
        rig.server.set_invalid_smtp_addresses("fel@example.org")
        code = "ErrorInvalidSmtpAddress"
    else:
        rig.server.reject_recipients("fel@example.org")
        code = "400 ErrorInvalidRecipients"
    [refused] = rig.world.send([make_message(1, to=["fel@example.org"])])
    assert refused.outcome is Outcome.PERMANENT
    assert refused.reply.startswith(code) and REQUEST_ID.search(refused.reply), refused.reply
