"""A signal receiver that raises is logged; the other receivers and the worker go on.

Why: signals are sent after the commit, so the change has happened. Blinker let the
first exception end the loop: the receivers after it never heard of the change (nor of
the rest of that commit's signals), and the exception ended ``Worker.run()``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from crm_core import directory, signals
from crm_core.mail.worker import Worker
from tests.test_outbox_helpers import add_people, queue_mail, scripted_crm


def _raising(_sender: object, **_extra: Any) -> None:
    raise RuntimeError("a receiver's own bug")


def test_every_receiver_hears_every_signal_of_a_commit(
    make_crm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    crm = make_crm()
    heard: list[str] = []

    def recording(_sender: object, **extra: Any) -> None:
        heard.append(extra["email"])

    signals.person_created.connect(_raising, sender=crm)
    signals.person_created.connect(recording, sender=crm)
    try:
        with caplog.at_level(logging.ERROR, "crm_core.signals"), crm.transaction() as s:
            directory.add_person(s, "per@example.com", "Per Persson", None)
            directory.add_person(s, "eva@example.com", "Eva Ek", None)
    finally:
        signals.person_created.disconnect(_raising, sender=crm)
        signals.person_created.disconnect(recording, sender=crm)
    assert heard == ["per@example.com", "eva@example.com"]
    logged = [r for r in caplog.records if r.name == "crm_core.signals"]
    assert len(logged) == 2 and all(r.exc_info for r in logged)
    assert "signal 'person-created' raised" in logged[0].getMessage()
    assert "test_signal_receivers._raising" in logged[0].getMessage()


def test_a_raising_receiver_does_not_stop_the_worker(make_crm: Any) -> None:
    """A running worker sends the mail queued after the receiver raised, too."""
    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    heard: list[int] = []
    first_heard, second_heard = threading.Event(), threading.Event()
    ended: list[BaseException] = []

    def recording(_sender: object, **extra: Any) -> None:
        heard.append(extra["outbox_id"])
        (second_heard if len(heard) > 1 else first_heard).set()

    def work(stop: threading.Event) -> None:
        try:
            Worker(crm).run(stop)
        except BaseException as exc:  # what the old code did: the loop ended
            ended.append(exc)
            first_heard.set()
            second_heard.set()

    signals.mail_sent.connect(_raising, sender=crm)
    signals.mail_sent.connect(recording, sender=crm)
    stop = threading.Event()
    worker = threading.Thread(target=work, args=(stop,))
    try:
        first = queue_mail(crm, subject="first")
        worker.start()
        assert first_heard.wait(60)  # a safety net: the worker sends within one poll
        second = queue_mail(crm, subject="second")
        assert second_heard.wait(60)
    finally:
        stop.set()
        worker.join(60)
        signals.mail_sent.disconnect(_raising, sender=crm)
        signals.mail_sent.disconnect(recording, sender=crm)
    assert ended == []
    assert heard == [first, second]
