"""Fault tests: the real worker and the real SMTP transport against a real SMTP server.

Faults are injected at named points by the aiosmtpd stand-in (``tests/servers/smtp.py``):
refused connection, 4xx on RCPT, 5xx on DATA, the connection dropped after the final
dot; and a worker *process* killed with SIGKILL mid-batch. After each, every queued
message must be sent, failed with its reason, or unknown — none lost, none stuck past
its lease; permanent errors never retried; a Message-ID reaches the server more than
once only where an ambiguous fault was injected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from crm_core import directory
from crm_core.app import Crm
from crm_core.mail import enqueue, operations, queue, reconciler
from crm_core.mail.message import Attachment
from crm_core.mail.worker import REAP_EVERY_MAX_SECONDS, Worker
from crm_core.models import OutboxMessage, OutboxState, utcnow
from tests.servers.smtp import SmtpServer
from tests.test_outbox_helpers import leases_expire, queue_mail, time_passes

REPO = Path(__file__).resolve().parent.parent

SMTP_CONFIG = """\
[product_lines.commercial]
plugins = ["smtp_mail"]
default_transport = "smtp"

[outbox]
lease_seconds = {lease}
max_attempts = 3
backoff_base_seconds = 1
backoff_max_seconds = 2
batch_size = {batch}
poll_seconds = 0.05
"""

SENDER = "anna@example.se"


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    with SmtpServer(security="none") as server:
        yield server


def smtp_crm(
    make_crm: Any, port: int, lease: int = 300, batch: int = 50, connections: int | None = None
) -> Crm:
    """A Crm whose one user sends through the SMTP plugin to 127.0.0.1:``port`` over up
    to ``connections`` connections at once (None: the default of 3 a batch, and no
    limit across workers)."""
    crm: Crm = make_crm(SMTP_CONFIG.format(lease=lease, batch=batch))
    with crm.transaction() as s:
        directory.add_user(s, SENDER, "Anna", "commercial")
        directory.add_person(s, "per@example.com", "Per", None)
        for key, value in (
            ("smtp.host", "127.0.0.1"),
            ("smtp.port", str(port)),
            ("smtp.security", "none"),
            ("smtp.auth", "none"),
            ("smtp.timeout", "30"),
        ):
            crm.set_system_setting(s, key, value)
        if connections is not None:
            crm.set_system_setting(s, "mail.max_connections", str(connections))
    return crm


def queue_many(crm: Crm, count: int) -> list[int]:
    """``count`` mails, each to its own recipient r<i>@example.com (faults can aim)."""
    return [queue_mail(crm, subject=f"m{i}", to=[f"r{i}@example.com"]) for i in range(count)]


def drain(crm: Crm, rounds: int = 10) -> None:
    """Run the worker until nothing waits for a retry (back-off skipped, not slept)."""
    for _ in range(rounds):
        Worker(crm).run_once()
        with crm.transaction() as s:
            waiting = s.scalar(
                select(OutboxMessage.id).where(
                    OutboxMessage.state.in_(("queued", "retry", "sending"))
                )
            )
        if waiting is None:
            return
        time_passes(crm)


def rows_by_id(crm: Crm) -> dict[int, OutboxMessage]:
    with crm.transaction() as s:
        found = {r.id: r for r in s.scalars(select(OutboxMessage))}
        for r in found.values():
            _ = list(r.attempt_log)
        return found


def check_invariants(
    crm: Crm,
    received: list[str],
    ambiguous: set[int] = frozenset(),  # type: ignore[assignment]
) -> dict[int, OutboxMessage]:
    """None lost, none stuck, permanent never retried, duplicates only where ambiguous."""
    rows = rows_by_id(crm)
    arrived = Counter(received)
    assert set(arrived) <= {r.message_id for r in rows.values()}, "unknown mail arrived"
    for row_id, r in rows.items():
        assert r.state in ("sent", "failed", "unknown"), (row_id, r.state)
        times = arrived[r.message_id]
        if r.state == "sent":
            assert times >= 1, f"#{row_id} marked sent but never arrived"
        if r.state == "failed":
            assert times == 0 and r.last_error, (row_id, r.last_error)
        if r.last_outcome == "permanent":
            assert len(r.attempt_log) == 1, f"#{row_id}: a permanent error was retried"
        if row_id not in ambiguous:
            assert times <= 1, f"#{row_id} arrived {times} times without an ambiguous fault"
    return rows


def test_dry_run_names_the_smtp_server(make_crm: Any, smtp_server: SmtpServer) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    request = enqueue.MailRequest(SENDER, ["per@example.com"], "Visning", "Hej")
    with crm.transaction() as s:
        found = enqueue.plan(crm, s, request)
    assert found.ok and (found.product_line, found.transport) == ("commercial", "smtp")
    assert found.server == f"127.0.0.1:{smtp_server.port}"
    assert "security none" in found.notes and "auth none" in found.notes
    assert smtp_server.connections == 0  # a dry run touches no server


def test_a_mail_every_recipient_got_keeps_no_ledger_yet_shows_each_recipients_fate(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    """Why: SMTP answers every RCPT, and a ledger of "all delivered" on every sent mail
    repeated the row's state, reply and time at a cost on each. Each recipient's fate
    is still shown, from the row."""
    crm = smtp_crm(make_crm, smtp_server.port)
    with crm.transaction() as s:
        request = enqueue.MailRequest(SENDER, ["per@example.com", "eva@example.com"], "Hej", "Hej")
        outbox_id = enqueue.enqueue(crm, s, request).outbox_id
    assert Worker(crm).run_once().sent == 1
    with crm.transaction() as s:
        row = s.get_one(OutboxMessage, outbox_id)
        assert row.state == "sent" and row.recipient_states is None
        assert row.server_reply and row.server_reply.startswith("250 ") and row.sent_at
        shown = operations.show_message(s, outbox_id).recipient_states
        fate = {"state": "delivered", "reply": row.server_reply, "at": row.sent_at.isoformat()}
    assert shown == {"per@example.com": fate, "eva@example.com": fate}


def test_refused_connection_is_retried_until_the_server_is_back(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    ids = queue_many(crm, 4)
    smtp_server.stop()  # the port now refuses connections
    stats = Worker(crm).run_once()
    assert stats.retry == 4 and smtp_server.accepted_count == 0
    first = rows_by_id(crm)[ids[0]]
    assert "connection refused" in (first.last_error or "") and first.attempts == 1
    smtp_server.start()
    drain(crm)
    rows = check_invariants(crm, smtp_server.message_ids())
    assert {rows[i].state for i in ids} == {"sent"}
    assert [a.outcome for a in rows[ids[0]].attempt_log] == ["temporary", "sent"]
    assert sorted(smtp_server.message_ids()) == sorted(rows[i].message_id for i in ids)


def test_4xx_on_rcpt_retries_and_a_spent_budget_fails(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    ids = queue_many(crm, 5)
    smtp_server.inject("rcpt_temporary", address="r1@example.com", times=1)
    smtp_server.inject("rcpt_temporary", address="r2@example.com")  # every time
    drain(crm)
    rows = check_invariants(crm, smtp_server.message_ids())
    assert rows[ids[1]].state == "sent" and len(rows[ids[1]].attempt_log) == 2
    spent = rows[ids[2]]
    assert spent.state == "failed" and len(spent.attempt_log) == 3
    assert (spent.last_error or "").startswith("Gave up after 3 attempts")
    assert "451" in (spent.last_error or "")
    assert {rows[i].state for i in (ids[0], ids[3], ids[4])} == {"sent"}


def test_a_worker_sends_over_three_connections_each_mail_once_every_row_recorded(
    make_crm: Any,
) -> None:
    # MAIL waits until three connections were opened: they were all open at once.
    with SmtpServer(security="none", hold_mail_until_connections=3) as server:
        crm = smtp_crm(make_crm, server.port)
        ids = queue_many(crm, 40)
        server.inject("data_permanent", address="r7@example.com", times=1)
        server.inject("rcpt_temporary", address="r9@example.com", times=1)
        stats = Worker(crm).run_once()
        assert (stats.sent, stats.failed, stats.retry) == (38, 1, 1)
        assert server.connections == server.peak_connections == 3
        drain(crm)
        rows = check_invariants(crm, server.message_ids())
    assert rows[ids[7]].state == "failed"
    assert {rows[i].state for i in ids if i != ids[7]} == {"sent"}
    assert sorted(Counter(server.message_ids()).values()) == [1] * 39


def test_a_mass_mailing_goes_over_one_session_not_one_per_batch(make_crm: Any) -> None:
    """Why: each batch opened its connections again (TCP, EHLO, STARTTLS, AUTH, QUIT),
    a few round trips each against a real server. While the sender is the only one
    with due mail, the batch takes its next mail over the open connection."""
    with SmtpServer(security="none") as server:
        crm = smtp_crm(make_crm, server.port, batch=5, connections=1)
        ids = queue_many(crm, 23)
        stats = Worker(crm).run_once()
        assert stats.sent == 23
        assert server.connections == 1
        rows = check_invariants(crm, server.message_ids())
    assert {rows[i].state for i in ids} == {"sent"}
    assert server.message_ids() == [rows[i].message_id for i in ids]  # in queue order
    assert sorted(Counter(server.message_ids()).values()) == [1] * 23


def test_a_batch_that_takes_more_keeps_no_content_of_the_mail_it_sent(make_crm: Any) -> None:
    """Ten batches' worth of a mass mailing with an attachment goes in one batch; the
    worker holds about one batch's content at a time, as when every batch ended, not
    everything the batch sent (measured with tracemalloc, every thread's allocations)."""
    pdf = Attachment("prospekt.pdf", "application/pdf", os.urandom(200_000))
    count = 40
    with SmtpServer(security="none", store=False) as server:
        crm = smtp_crm(make_crm, server.port, batch=4, connections=1)
        for i in range(count):
            queue_mail(crm, subject=f"m{i}", to=[f"r{i}@example.com"], attachments=[pdf])
        tracemalloc.start()
        try:
            stats = Worker(crm).run_once()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert stats.sent == count and server.connections == 1
    # Each mail is held twice while it is sent: the attachment, and its rendered MIME
    # (base64). Holding all of them peaked at 21 MB; one batch's worth at 6-7 MB.
    whole = count * len(pdf.data) * 2.37
    assert peak < whole / 2, (peak, whole)


def test_a_batch_takes_no_more_than_the_mailboxs_pace_allows(make_crm: Any) -> None:
    """What a batch takes as it sends counts against the mailbox's limits like a claim:
    with 7 a minute, 5 in the first claim and 2 more, then the mailbox waits."""
    with SmtpServer(security="none") as server:
        crm = smtp_crm(make_crm, server.port, batch=5, connections=1)
        with crm.transaction() as s:
            crm.set_system_setting(s, "mail.rate_per_minute", "7")
        ids = queue_many(crm, 20)
        assert Worker(crm).run_once().sent == 7
        assert server.connections == 1
        rows = rows_by_id(crm)
    assert [rows[i].state for i in ids] == ["sent"] * 7 + ["queued"] * 13


def test_a_batch_takes_no_more_once_another_sender_has_mail_due(make_crm: Any) -> None:
    """Taking more must not starve anyone: Bo's mail, queued while Anna's mass mailing
    is under way, goes at the next claim, as it did when every batch ended."""
    bo_mail: list[int] = []

    def queue_bo(message_id: str) -> None:
        if message_id == anna_third:  # before the server answers it
            bo_mail.append(queue_mail(crm, subject="Bo", sender="bo@example.se"))

    with SmtpServer(security="none", on_accept=queue_bo) as server:
        crm = smtp_crm(make_crm, server.port, batch=5, connections=1)
        with crm.transaction() as s:
            directory.add_user(s, "bo@example.se", "Bo", "commercial")
        ids = queue_many(crm, 30)
        anna_third = rows_by_id(crm)[ids[2]].message_id
        assert Worker(crm).run_once().sent == 31
        check_invariants(crm, server.message_ids())
        arrived = server.message_ids()
    bo_id = rows_by_id(crm)[bo_mail[0]].message_id
    # Anna's first batch (5) ends; the next claim shares between Anna and Bo.
    assert arrived.index(bo_id) < 10
    assert server.connections >= 2


def test_a_batch_that_opened_fewer_connections_than_it_may_takes_no_more(
    make_crm: Any,
) -> None:
    """A batch of one mail opens one connection; a mass mailing queued meanwhile goes
    from the next claim, over all three, not one by one over the first."""

    def mass_mailing(_message_id: str) -> None:
        if not more:
            more.extend(queue_many(crm, 12))

    more: list[int] = []
    with SmtpServer(security="none", on_accept=mass_mailing) as server:
        crm = smtp_crm(make_crm, server.port, batch=6, connections=3)
        queue_mail(crm, subject="first")
        assert Worker(crm).run_once().sent == 13
        check_invariants(crm, server.message_ids())
        assert server.peak_connections == 3


def test_a_stopping_worker_takes_no_more_and_gives_back_what_it_claimed_ahead(
    make_crm: Any,
) -> None:
    """On PostgreSQL the batch claims its next mail ahead, while the last is sent; a
    worker told to stop finishes what it was given and queues the rest again at once,
    no try spent, instead of leaving it to the lease."""
    stop = threading.Event()

    def stop_at_seventh(_message_id: str) -> None:
        accepted[0] += 1
        if accepted[0] == 7:
            stop.set()

    accepted = [0]
    with SmtpServer(security="none", on_accept=stop_at_seventh) as server:
        crm = smtp_crm(make_crm, server.port, batch=5, connections=1)
        ids = queue_many(crm, 20)
        stats = Worker(crm).run_once(stop)
        assert stats.sent == 10  # the first batch, and the five it took as the seventh went
        rows = rows_by_id(crm)
        arrived = server.message_ids()
    assert arrived == [rows[i].message_id for i in ids[:10]]  # each once, in order
    assert [rows[i].state for i in ids] == ["sent"] * 10 + ["queued"] * 10
    assert all(rows[i].attempts == 0 and not rows[i].attempt_log for i in ids[10:])


def test_a_batch_takes_no_more_once_the_worker_must_look_for_expired_leases(
    make_crm: Any,
) -> None:
    """The worker's other duties wait for the poll: taking more stops when the reaper is
    due (the worker's clock, moved here as the first mail is accepted)."""
    now = [0.0]

    def time_moves(_message_id: str) -> None:
        now[0] += REAP_EVERY_MAX_SECONDS + 1

    with SmtpServer(security="none", on_accept=time_moves) as server:
        crm = smtp_crm(make_crm, server.port, batch=5, connections=1)
        queue_many(crm, 12)
        worker = Worker(crm, clock=lambda: now[0])
        with ThreadPoolExecutor(1) as pool:
            first = worker.poll(pool, threading.Event())
        assert first.sent == 5  # one batch, no more
        assert worker.run_once().sent == 7
        check_invariants(crm, server.message_ids())


def test_a_batchs_results_read_the_database_clock_once(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    """Why: on PostgreSQL each reading of the database's clock is a round trip, and a
    batch's results are recorded in a transaction every mail or two (on one connection,
    each before the next mail's final dot). The first reading is carried forward by the
    monotonic clock; SQLite's clock is this machine's and is never asked of the database.
    """
    crm = smtp_crm(make_crm, smtp_server.port, connections=1)
    queue_many(crm, 6)
    readings: list[str] = []
    recordings: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            return  # the worker's own reap and claim, once a poll each
        if "now()" in statement.lower():
            readings.append(statement)
        if "UPDATE outbox_attempts" in statement:  # alone or in a transaction of several
            recordings.append(statement)

    event.listen(crm.engine, "before_cursor_execute", seen)
    try:
        stats = Worker(crm).run_once()
    finally:
        event.remove(crm.engine, "before_cursor_execute", seen)
    assert stats.sent == 6
    assert len(recordings) >= 2  # several statements recorded the batch's results
    on_postgres = crm.engine.dialect.name == "postgresql"
    assert len(readings) == (1 if on_postgres else 0)
    with crm.transaction() as s:
        rows = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        sent_at = [r.sent_at for r in rows if r.sent_at is not None]
        finished = [r.attempt_log[-1].finished_at for r in rows]
    assert len(sent_at) == 6
    assert sent_at == sorted(sent_at) and finished == sent_at  # one clock, going forward


@pytest.mark.parametrize("connections", [1, 2, 3])
def test_a_dead_workers_mail_in_flight_is_one_per_connection_the_rest_goes_again(
    make_crm: Any, smtp_server: SmtpServer, connections: int
) -> None:
    # Messages are dealt to the connections in order, one at a time each: of a dead
    # worker's unreported mail only the first `connections` can have gone.
    crm = smtp_crm(make_crm, smtp_server.port, batch=5, connections=connections)
    ids = queue_many(crm, 5)
    with crm.transaction() as s:
        claimed = queue.claim_batch(crm, s, "doomed", 5, utcnow()).claims
    assert len(claimed) == 5
    leases_expire(crm)
    with ThreadPoolExecutor(1) as pool:
        stats = Worker(crm).poll(pool, threading.Event())  # reaps, then sends the rest
    rows = rows_by_id(crm)
    assert stats.reaped == connections
    assert [rows[i].state for i in ids] == ["unknown"] * connections + ["sent"] * (5 - connections)


def test_5xx_on_data_fails_at_once_and_is_never_retried(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    ids = queue_many(crm, 4)
    smtp_server.inject("data_permanent", address="r2@example.com")
    drain(crm)
    rows = check_invariants(crm, smtp_server.message_ids())
    failed = rows[ids[2]]
    assert failed.state == "failed" and failed.last_outcome == "permanent"
    assert len(failed.attempt_log) == 1 and "554" in (failed.last_error or "")
    assert {rows[i].state for i in (ids[0], ids[1], ids[3])} == {"sent"}
    assert len(smtp_server.message_ids()) == 3


def test_a_refusal_at_end_of_data_does_not_pause_the_account(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    # The stand-in keeps the refused transaction open, as Postfix does: without RSET the
    # next MAIL gets "503 5.5.1 Error: nested MAIL command".
    crm = smtp_crm(make_crm, smtp_server.port, connections=1)  # the 2nd follows on it
    ids = queue_many(crm, 3)
    smtp_server.inject("data_temporary", address="r0@example.com", times=1)
    stats = Worker(crm).run_once()
    assert (stats.paused_accounts, stats.retry, stats.sent) == (0, 1, 2)
    assert smtp_server.connections == 1 and smtp_server.rsets == 1
    drain(crm)
    rows = check_invariants(crm, smtp_server.message_ids())
    assert {rows[i].state for i in ids} == {"sent"}
    assert [a.outcome for a in rows[ids[0]].attempt_log] == ["temporary", "sent"]


def test_a_drop_after_the_final_dot_is_unknown_and_not_resent(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    crm = smtp_crm(make_crm, smtp_server.port)
    ids = queue_many(crm, 4)
    smtp_server.inject("drop_after_data", address="r1@example.com", times=1)
    drain(crm)
    rows = check_invariants(crm, smtp_server.message_ids(), ambiguous={ids[1]})
    unknown = rows[ids[1]]
    assert unknown.state == "unknown" and unknown.last_outcome == "ambiguous"
    assert "may or may not" in (unknown.last_error or "")
    assert {rows[i].state for i in (ids[0], ids[2], ids[3])} == {"sent"}
    assert Counter(smtp_server.message_ids())[unknown.message_id] == 1  # it did arrive
    reports = reconciler.reconcile(crm)  # SMTP cannot look: the operator decides
    assert [(r.outbox_id, r.sent) for r in reports] == [(ids[1], None)]
    with crm.transaction() as s:
        operations.resolve(s, ids[1], sent=True)
    drain(crm)
    assert Counter(smtp_server.message_ids())[unknown.message_id] == 1


# --- a worker process killed mid-batch ----------------------------------------------------


class StallingRelay:
    """A TCP relay that holds the client's next command once ``after`` mails were accepted.

    Why: to kill a worker *mid-batch* deterministically, the worker must be blocked
    inside a send with part of its batch delivered. The relay counts the server's
    "250 … queued" replies and, from the ``after``-th on, stops passing the client's
    bytes on (the worker waits for a reply that never comes). ``release()`` cuts the
    held connections and lets new ones through untouched.
    """

    def __init__(self, target_port: int, after: int) -> None:
        self.target_port = target_port
        self.after = after
        self.accepted = 0
        self.stalled = threading.Event()
        self.held = threading.Event()
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, server]
            passthrough = self.released.is_set()
            threading.Thread(
                target=self._up, args=(client, server, passthrough), daemon=True
            ).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, passthrough: bool) -> None:
        while chunk := _recv(client):
            if self.stalled.is_set() and not passthrough:
                self.held.set()
                self.released.wait()
                break
            server.sendall(chunk)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        while chunk := _recv(server):
            self._heard(chunk)
            try:
                client.sendall(chunk)
            except OSError:
                break
        _close(client, server)

    def _heard(self, chunk: bytes) -> None:
        """The server's replies, before the client gets them: count what was accepted."""
        with self.lock:
            self.accepted += chunk.count(b" queued as ")
            if self.accepted >= self.after:
                self.stalled.set()

    def release(self) -> None:
        """Cut the held connections; pass new ones through."""
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()
        with self.lock:
            _close(*self.sockets)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def start_worker(env: dict[str, str], name: str, *extra: str) -> subprocess.Popen[str]:
    """A real ``python -m crm_core outbox work`` process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "crm_core", "outbox", "work", "--name", name, *extra],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until it handles SIGTERM: a stop sent earlier would kill it uncleanly.
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if "started" not in first:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker {name} did not start: {first!r} {err}")
    return proc


def count_states(crm: Crm) -> Counter[str]:
    with crm.transaction() as s:
        return Counter(s.scalars(select(OutboxMessage.state)))


def statements_running(crm: Crm) -> int:
    """PostgreSQL: how many statements other sessions run on this database now (a dead
    worker's last statement runs on until it ends). SQLite: none can outlive a process."""
    if crm.engine.dialect.name != "postgresql":
        return 0
    with crm.engine.connect() as connection:
        return int(
            connection.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'active' AND pid <> pg_backend_pid()"
            ).scalar_one()
        )


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Look again every few milliseconds until ``check`` holds; the timeout is failure."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        pause.wait(0.01)


class DatabaseLock:
    """A writing transaction that locks every outbox row (SQLite: the whole database)
    from another thread, so no worker can record a result until :meth:`release`."""

    def __init__(self, crm: Crm) -> None:
        self.crm = crm
        self.taken = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def take(self) -> None:
        """Lock now (once); returns when the lock is held."""
        if not self.thread.is_alive() and not self.taken.is_set():
            self.thread.start()
        assert self.taken.wait(30), "the database lock was never taken"

    def _hold(self) -> None:
        with self.crm.transaction() as session:
            session.execute(select(OutboxMessage.id).with_for_update()).all()
            self.taken.set()
            self.released.wait()

    def release(self) -> None:
        self.released.set()
        if self.thread.is_alive():
            self.thread.join(30)


class LockingRelay(StallingRelay):
    """A relay that has the database locked before the worker hears that the server
    accepted a mail: from the first "250 … queued" on, no result can be recorded."""

    def __init__(self, target_port: int, database: DatabaseLock) -> None:
        super().__init__(target_port, after=1_000_000)  # never stalls
        self.database = database
        self.locking = threading.Lock()

    def _heard(self, chunk: bytes) -> None:
        if b" queued as " in chunk:
            with self.locking:
                self.database.take()


def test_a_worker_killed_mid_batch_leaves_unknown_and_the_next_worker_goes_on(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    relay = StallingRelay(smtp_server.port, after=2)
    try:
        crm = smtp_crm(make_crm, relay.port, lease=300, batch=5, connections=1)
        ids = queue_many(crm, 12)
        first = start_worker(make_crm.env, "doomed")
        try:
            assert relay.held.wait(30), "the worker never blocked inside its first batch"
            # Two results were recorded as they came (the second beside the wire, while
            # the next message went out); three are held (one in flight).
            expected = Counter({"sent": 2, "sending": 3, "queued": 7})
            wait_until(lambda: count_states(crm) == expected)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        delivered_before = set(smtp_server.message_ids())
        assert len(delivered_before) == 2
        relay.release()
        leases_expire(crm)  # the dead worker's leases run out (not slept through)
        second = start_worker(make_crm.env, "successor")
        try:
            # Its first poll reaps the expired leases: the two delivered were recorded as
            # they went, the one in flight is unknown, and the two never handed over are
            # queued again; then it sends those two and the seven others (the timeout
            # means failure).
            smtp_server.wait_for(len(delivered_before) + 9, timeout=60)
        finally:
            second.send_signal(signal.SIGTERM)
            out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err
        assert "successor stopped" in out
        rows = check_invariants(crm, smtp_server.message_ids())
        unknown = sorted(i for i, r in rows.items() if r.state == "unknown")
        assert unknown == ids[2:3]  # only the message in flight: never resent by itself
        assert all(rows[i].last_code == "lease-expired" for i in unknown)
        assert {rows[i].state for i in ids[:2]} == {"sent"}  # recorded before the kill
        assert all(a.worker == "doomed" for i in ids[:2] for a in rows[i].attempt_log)
        assert {rows[i].state for i in ids[3:]} == {"sent"}
        assert all(a.worker == "successor" for i in ids[3:] for a in rows[i].attempt_log)
        # The operator resolves: what arrived is sent, the rest goes again.
        with crm.transaction() as s:
            for i in unknown:
                operations.resolve(s, i, sent=rows[i].message_id in delivered_before)
        Worker(crm).run_once()
        final = check_invariants(crm, smtp_server.message_ids())
        assert {r.state for r in final.values()} == {"sent"}
        assert sorted(Counter(smtp_server.message_ids()).values()) == [1] * 12
    finally:
        relay.close()


@pytest.mark.parametrize("connections", [1, 3])
def test_a_worker_killed_while_results_wait_for_the_database_leaves_only_what_went_unknown(
    make_crm: Any, smtp_server: SmtpServer, connections: int
) -> None:
    """Results are recorded beside the wire, and a kill at any moment leaves unknown
    only the mails the server may have accepted, never one of them queued again.

    The database is locked as the server accepts the first mail: no result can be
    recorded. Each connection still sends its next message up to the final dot (the
    server sees its DATA), but completes only the first ``connections`` (the in-flight
    window); then the worker is killed. The successor finds exactly the accepted ones
    unknown and sends each of the others once.

    PostgreSQL: a result written alone (one statement, its own transaction) that
    waited for the lock when the worker died still lands once the lock goes: it says
    what the server said (sent). The reaper, which cannot tell when it landed, then
    counts one more of the batch's rows as possibly gone (unknown, never resent by
    itself): less precise, never a duplicate.
    """
    crm = smtp_crm(make_crm, smtp_server.port, batch=8, connections=connections)
    database = DatabaseLock(crm)
    relay = LockingRelay(smtp_server.port, database)
    try:
        with crm.transaction() as s:
            crm.set_system_setting(s, "smtp.port", str(relay.port))  # through the relay
        ids = queue_many(crm, 8)
        doomed = start_worker(make_crm.env, "doomed")
        try:
            # The next message on each connection went out while no result was recorded
            # (recording in the sending thread, nothing would have gone after the first).
            smtp_server.wait_for_count("data_commands", 2 * connections, timeout=30)
            accepted = set(smtp_server.message_ids())
            assert len(accepted) == connections  # the rest wait for their dot
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
        database.release()
        wait_until(lambda: not statements_running(crm))  # a dead worker's may run on
        late = {r.message_id for r in rows_by_id(crm).values() if r.state == "sent"}
        assert late <= accepted
        assert not late or crm.engine.dialect.name == "postgresql"
        assert (
            count_states(crm) == Counter({"sending": 8 - len(late), "sent": len(late)}) - Counter()
        )
        assert set(smtp_server.message_ids()) == accepted  # a message without dot is dropped
        leases_expire(crm)
        Worker(crm).run_once()  # the successor reaps, then sends the rest
        rows = check_invariants(crm, smtp_server.message_ids())
        unknown = {rows[i].message_id for i in ids if rows[i].state == "unknown"}
        assert accepted - late <= unknown  # what may have gone: never sent again
        assert len(unknown) == connections  # the window of the unrecorded ones, no more
        assert len(unknown - accepted) <= len(late)
        assert Counter(r.state for r in rows.values()) == Counter(
            {"unknown": connections, "sent": 8 - connections}
        )
        never_went = len(unknown - accepted)  # unknown to be safe; the server never had it
        assert sorted(Counter(smtp_server.message_ids()).values()) == [1] * (8 - never_went)
    finally:
        database.release()
        relay.close()


class TerminatingRelay(StallingRelay):
    """A relay that has every session of the worker's database ended (as a restart or a
    failover would) just before the worker hears that the server accepted mail number
    ``nth``: the connection the batch records its results on is gone."""

    def __init__(self, target_port: int, nth: int, end_sessions: Callable[[], None]) -> None:
        super().__init__(target_port, after=1_000_000)  # never stalls
        self.nth = nth
        self.end_sessions = end_sessions
        self.ended = threading.Event()

    def _heard(self, chunk: bytes) -> None:
        super()._heard(chunk)  # counts what was accepted
        with self.lock:
            if self.accepted >= self.nth and not self.ended.is_set():
                self.end_sessions()
                self.ended.set()


def end_other_sessions(crm: Crm) -> None:
    """PostgreSQL: end every other session on the crm's database, and wait until gone."""
    ended = "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
    where = " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with crm.engine.connect() as connection:
        connection.exec_driver_sql(ended + where).all()


def test_the_database_lost_mid_batch_leaves_only_the_mail_in_flight_unknown(
    make_crm: Any, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A database restart while a batch is on the wire: the running worker goes on by
    itself, the mail the server accepted and nobody could record is unknown (never sent
    again), and the rest of the batch, never completed, goes once. A database error is
    not a transport's: no traceback, no "transport raised" in the log.
    """
    crm = smtp_crm(make_crm, smtp_server.port, batch=6, connections=1)
    if crm.engine.dialect.name != "postgresql":
        pytest.skip("ending a database's sessions from outside: PostgreSQL")
    relay = TerminatingRelay(smtp_server.port, 3, lambda: end_other_sessions(crm))
    stop = threading.Event()
    try:
        with crm.transaction() as s:
            crm.set_system_setting(s, "smtp.port", str(relay.port))
        ids = queue_many(crm, 6)
        worker = Worker(crm, name="survivor")
        running = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        running.start()
        assert relay.ended.wait(30), "the third mail was never accepted"
        later = queue_many(crm, 2)  # the worker goes on by itself
        wait_until(lambda: {rows_by_id(crm)[i].state for i in later} == {"sent"})
        stop.set()
        running.join(30)
        assert not running.is_alive()
    finally:
        stop.set()
        relay.close()
    accepted = smtp_server.message_ids()
    rows = rows_by_id(crm)
    assert [rows[i].state for i in ids] == ["sent", "sent", *["sending"] * 4]
    assert len(accepted) == 3 + 2  # the fourth never got its dot: the server dropped it
    leases_expire(crm)
    Worker(crm).run_once()  # the batch's lease ran out: reaped, the rest sent
    rows = check_invariants(crm, smtp_server.message_ids())
    assert [rows[i].state for i in ids] == ["sent", "sent", "unknown", "sent", "sent", "sent"]
    assert sorted(Counter(smtp_server.message_ids()).values()) == [1] * 8
    logged = caplog.text
    assert "database error, retrying" in logged
    assert "Traceback" not in logged and "raised while sending" not in logged
    assert "[SQL:" not in logged and "[parameters:" not in logged  # addresses, replies


def test_sigterm_finishes_what_the_worker_holds(make_crm: Any, smtp_server: SmtpServer) -> None:
    crm = smtp_crm(make_crm, smtp_server.port, lease=300, batch=5)
    queue_many(crm, 3)
    worker = start_worker(make_crm.env, "polite")
    try:
        # Stop it as soon as the server has all three: the worker may still hold the
        # last results unrecorded, and must record them before it exits.
        smtp_server.wait_for(3, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "polite stopped: " in out and "sent 3" in out
    assert count_states(crm) == Counter({OutboxState.SENT.value: 3})


def test_every_attempt_sends_the_bytes_rendered_at_enqueue(
    make_crm: Any, smtp_server: SmtpServer
) -> None:
    """Rendered once: the server gets exactly the stored bytes, after a failed try too."""
    crm = smtp_crm(make_crm, smtp_server.port)
    outbox_id = queue_mail(crm, subject="Välkommen", html="<p>Hälsningar från Malmö</p>")
    stored = rows_by_id(crm)[outbox_id].mime
    assert stored is not None and b"Subject: =?utf-8?" in stored
    smtp_server.stop()
    assert Worker(crm).run_once().retry == 1
    smtp_server.start()
    drain(crm)
    (got,) = smtp_server.received
    assert got.data == stored
    row = rows_by_id(crm)[outbox_id]
    assert row.state == "sent" and row.mime == stored and "BODY=8BITMIME" in got.mail_options
