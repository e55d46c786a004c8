"""An idle worker wakes when mail is queued, not after ``poll_seconds``.

``poll_seconds`` is an hour here, so a worker that only polled would never send the
second mail within the test's (generous) wait; PostgreSQL wakes it with NOTIFY,
SQLite with ``PRAGMA data_version``. No wall-clock assertion: the test waits on
events, with timeouts only as a guard against hanging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import SenderAccount
from crm_core.mail.worker import Worker
from tests.test_outbox_helpers import SCRIPTED_CONFIG, add_people, queue_mail, scripted_crm

HOUR_POLL = SCRIPTED_CONFIG.replace("poll_seconds = 0.05", "poll_seconds = 3600")
GUARD = 60.0


def test_an_idle_worker_wakes_when_mail_is_queued(make_crm: Any) -> None:
    crm, transport = scripted_crm(make_crm, HOUR_POLL)
    add_people(crm, "anna@example.se")
    subjects: list[str] = []
    arrived = {"first": threading.Event(), "second": threading.Event()}

    def seen(_account: SenderAccount, messages: Sequence[OutgoingMessage]) -> None:
        for message in messages:
            subjects.append(message.subject)
            arrived[message.subject].set()

    transport.hook = seen
    idle = threading.Event()
    calls_after_first = [0]

    def clock() -> float:
        """The worker asks its clock after every poll (reconcile_when_due): twice after
        the poll that sent the first mail (a reconcile is due at start), once after
        the next one, which found nothing: then the worker is about to wait."""
        if arrived["first"].is_set():
            calls_after_first[0] += 1
            if calls_after_first[0] >= 3:
                idle.set()
        return time.monotonic()

    queue_mail(crm, "first")
    stop = threading.Event()
    worker = Worker(crm, clock=clock)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert arrived["first"].wait(GUARD)
        assert idle.wait(GUARD), "the worker never went idle"
        queue_mail(crm, "second")
        assert arrived["second"].wait(GUARD), "the idle worker was not woken"
    finally:
        stop.set()
        thread.join(GUARD)
    assert not thread.is_alive()
    assert subjects == ["first", "second"]
