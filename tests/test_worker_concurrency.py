"""Four worker processes on one database deliver each Message-ID exactly once.

Real parts only: ``python -m crm_core outbox work`` processes, the SMTP transport, the
SMTP stand-in in a process of its own (reporting every accepted Message-ID as it arrives),
and the test's database — PostgreSQL (thousands of messages, ``FOR UPDATE SKIP
LOCKED``) and SQLite (fewer; ``BEGIN IMMEDIATE`` makes the claim single-writer).
No fault is injected, so every Message-ID must arrive once: not zero, not twice.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from crm_core import directory
from crm_core.mail import enqueue
from crm_core.models import OutboxAttempt, OutboxMessage
from tests.servers.smtp import start_smtp_process
from tests.test_worker_smtp import count_states, start_worker

CONFIG = """\
[product_lines.commercial]
plugins = ["smtp_mail"]
default_transport = "smtp"

[outbox]
lease_seconds = 300
batch_size = 50
poll_seconds = 0.05
"""

WORKERS = 4
USERS = 8


def test_four_workers_deliver_each_message_exactly_once(
    make_crm: Any, tmp_path: Path, database_url: str
) -> None:
    total = 2000 if database_url.startswith("postgresql") else 400
    with start_smtp_process(tmp_path) as smtp:
        crm = make_crm(CONFIG)
        with crm.transaction() as s:
            for i in range(USERS):
                directory.add_user(s, f"user{i}@example.se", f"User {i}", "commercial")
            for key, value in (
                ("smtp.host", "127.0.0.1"),
                ("smtp.port", str(smtp.port)),
                ("smtp.security", "none"),
                ("smtp.auth", "none"),
            ):
                crm.set_system_setting(s, key, value)
        workers = [
            start_worker(make_crm.env, f"w{n}", "--concurrency", "2") for n in range(WORKERS)
        ]
        try:
            with crm.transaction() as s:  # one commit: every worker sees all of it at once
                for i in range(total):
                    request = enqueue.MailRequest(
                        sender_email=f"user{i % USERS}@example.se",
                        to=[f"rcpt{i}@example.com"],
                        subject=f"Message {i}",
                        text="Hej!",
                    )
                    enqueue.enqueue(crm, s, request)
            # The server reports each arrival; the timeout only fires on failure.
            smtp.wait_for(total, timeout=120)
        finally:
            outputs = _stop(workers)  # SIGTERM: each records what it holds, then exits
        for worker, (out, err) in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, err
            assert "stopped" in out
        arrived = Counter(smtp.accepted())
    assert count_states(crm) == Counter({"sent": total})
    with crm.transaction() as s:
        message_ids = set(s.scalars(select(OutboxMessage.message_id)))
        attempts = list(s.execute(select(OutboxAttempt.outbox_id, OutboxAttempt.worker)))
    assert set(arrived) == message_ids and len(message_ids) == total
    assert [mid for mid, n in arrived.items() if n != 1] == []
    assert len(attempts) == total  # one attempt per message: nothing claimed twice
    assert len({worker for _, worker in attempts}) >= 2  # the work really was shared


def _stop(workers: list[subprocess.Popen[str]]) -> list[tuple[str, str]]:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=30))
        except subprocess.TimeoutExpired:
            worker.kill()
            outputs.append(worker.communicate())
    return outputs
