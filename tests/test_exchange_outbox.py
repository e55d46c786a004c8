"""End to end through the outbox: ``crm send``, ``crm outbox work``, ``crm outbox reconcile``.

The mail is queued and sent by the real commands (the worker in a subprocess), so the
plugin runs exactly as in production; the stand-ins count what arrives. The lost-answer
case checks the promise that matters most: a mail whose fate is unknown is looked up in
Sent Items and is never sent twice.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from crm_core.mail import enqueue, queue
from crm_core.mail.enqueue import MailRequest
from crm_core.mail.worker import Worker
from crm_core.models import OutboxAttempt, OutboxMessage, OutboxState, utcnow
from tests.conftest import CliResult, CrmFactory
from tests.exchange_fixtures import RECIPIENT, SECRETS, USER, ExchangeWorld
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import world as world


@pytest.fixture
def crm(run_crm: Callable[..., CliResult], make_crm: CrmFactory) -> Callable[..., CliResult]:
    def run(*args: str) -> CliResult:
        return run_crm(*args, env=make_crm.env)

    return run


def test_crm_send_and_outbox_work(
    world: ExchangeWorld, crm: Callable[..., CliResult], tmp_path: Path
) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Välkommen på visning!</p>", encoding="utf-8")
    offer = tmp_path / "offert.pdf"
    offer.write_bytes(b"%PDF-1.7 offer")

    queued = crm(
        "send", "--from", USER, "--to", RECIPIENT, "--subject", "Visning på fredag",
        "--body", "Välkommen på visning!", "--html-file", str(html), "--attach", str(offer),
        "--json",
    )  # fmt: skip
    assert queued.code == 0, queued.output
    message_id = json.loads(queued.stdout)["message_id"]

    worked = crm("-vv", "outbox", "work", "--once", "--json")
    assert worked.code == 0, worked.output
    assert json.loads(worked.stdout)["sent"] == 1

    [sent] = world.ews.delivered
    assert sent.internet_message_id == message_id
    assert (sent.subject, sent.to, sent.sender) == ("Visning på fredag", (RECIPIENT,), USER)
    assert sent.html_body == "<p>Välkommen på visning!</p>"
    assert sent.attachments == (("offert.pdf", b"%PDF-1.7 offer"),)
    assert [i.internet_message_id for i in world.ews.sent_items(USER)] == [message_id]
    assert world.entra.token_requests == 1

    listed = json.loads(crm("outbox", "list", "--json").stdout)["messages"]
    assert [(m["message_id"], m["state"]) for m in listed] == [(message_id, "sent")]
    for secret in SECRETS:  # -vv logs at DEBUG to stderr: no secret, no token
        assert secret not in worked.output
    assert "Bearer ey" not in worked.output


def test_configuration_error_pauses_the_account_and_keeps_the_mail(
    world: ExchangeWorld, crm: Callable[..., CliResult]
) -> None:
    world.set_user("exchange.username", "anna@contoso.com")  # an alias
    [message_id] = queue_mail(world, 1)
    Worker(world.crm, name="test-worker").run_once(threading.Event())
    pauses = json.loads(crm("outbox", "pauses", "--json").stdout)["paused_accounts"]
    assert [p["email"] for p in pauses] == [USER]
    assert "Exchange cannot find a mailbox for anna@contoso.com" in pauses[0]["reason"]
    with world.crm.transaction() as session:
        row = session.scalars(select(OutboxMessage)).one()
        assert (row.message_id, row.state) == (message_id, "queued")  # waits for the fix
        assert row.last_code == "ErrorNonExistentMailbox"
    assert world.ews.delivered == []


def queue_mail(world: ExchangeWorld, n: int) -> list[str]:
    ids = []
    with world.crm.transaction() as session:
        for i in range(n):
            request = MailRequest(USER, [RECIPIENT], f"Offer {i}", f"Offer {i}\n")
            ids.append(enqueue.enqueue(world.crm, session, request).message_id)
    return ids


def test_lost_answer_becomes_unknown_and_reconcile_never_resends(
    world: ExchangeWorld, crm: Callable[..., CliResult]
) -> None:
    worker = Worker(world.crm, name="test-worker")
    queue_mail(world, 1)
    worker.run_once(threading.Event())  # warm: the Account's folders are cached
    world.ews.drop_after_request(1)  # the next CreateItem is processed, its answer lost
    lost = queue_mail(world, 2)
    stats = worker.run_once(threading.Event())
    assert stats.unknown == 2, stats
    assert {d.internet_message_id for d in world.ews.delivered} >= set(lost)

    # A third message was claimed by a worker that died before sending: reaped to unknown.
    [never] = queue_mail(world, 1)
    with world.crm.transaction() as session:
        claimed = queue.claim_batch(world.crm, session, "crashed-worker", 10, utcnow())
        assert [c.message.message_id for c in claimed.claims] == [never]
    with world.crm.transaction() as session:
        queue.reap_expired(session, utcnow() + timedelta(hours=1))
        # An hour passes: past the time Exchange may take to file a Sent Items copy,
        # counted from each mail's last hand-over (the start of its attempt).
        for attempt in session.scalars(select(OutboxAttempt)):
            attempt.started_at -= timedelta(hours=1)

    reconciled = crm("outbox", "reconcile", "--json")
    assert reconciled.code == 0, reconciled.output
    verdicts = {
        r["message_id"]: (r["sent"], r["applied"])
        for r in json.loads(reconciled.stdout)["messages"]
    }
    assert verdicts == {lost[0]: (True, True), lost[1]: (True, True), never: (False, True)}

    Worker(world.crm, name="test-worker").run_once(threading.Event())
    delivered = [d.internet_message_id for d in world.ews.delivered]
    for message_id in [*lost, never]:
        assert delivered.count(message_id) == 1  # each mail went exactly once
    with world.crm.transaction() as session:
        states = {
            r.message_id: r.state
            for r in session.query(OutboxMessage).filter(
                OutboxMessage.message_id.in_([*lost, never])
            )
        }
    assert set(states.values()) == {OutboxState.SENT.value}
