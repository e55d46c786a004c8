"""The outbox services and the worker, on a real database, with a scripted transport.

Each test drives real Crm objects, real transactions and the real Worker; only the
transport is the in-test plugin from ``test_outbox_helpers`` (faults against a real
SMTP server are in ``test_worker_smtp.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, update

from crm_core import directory, signals
from crm_core.config import OutboxConfig
from crm_core.errors import MailValidationError, ValidationError
from crm_core.mail import enqueue, operations, pauses, policy, queue, reconciler
from crm_core.mail.message import Attachment, OutgoingMessage
from crm_core.mail.transport import Outcome, SenderAccount, SendResult
from crm_core.mail.worker import Worker, WorkerStats
from crm_core.models import (
    AccountPause,
    OutboxAttempt,
    OutboxMessage,
    OutboxState,
    Person,
    PersonActivity,
    User,
    utcnow,
)
from tests.test_outbox_helpers import (
    SCRIPTED_CONFIG,
    add_people,
    enqueued_ago,
    queue_mail,
    row,
    scripted_crm,
    states,
    time_passes,
)

TEMP = (Outcome.TEMPORARY, "451 4.3.0 try later", "451", None)
PERM = (Outcome.PERMANENT, "550 5.1.1 per@example.com: no such mailbox", "550 5.1.1", None)
SENT = (Outcome.SENT, "", "", None)


@pytest.fixture
def scripted(make_crm: Any) -> Any:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se", "bo@example.se")
    return crm, transport


def _request(**overrides: Any) -> enqueue.MailRequest:
    values: dict[str, Any] = {
        "sender_email": "anna@example.se",
        "to": ["per@example.com"],
        "subject": "Visning",
        "text": "Välkommen!",
    }
    values.update(overrides)
    return enqueue.MailRequest(**values)


def _count(crm: Any, model: Any) -> int:
    with crm.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# --- enqueue ------------------------------------------------------------------------


def test_enqueue_names_every_problem_and_queues_nothing(scripted: Any) -> None:
    crm, _ = scripted
    bad = _request(
        to=["per @example.com", "no-at-sign"],
        cc=["ok@example.com", "x@nodot"],
        subject="two\nlines",
        person_email="nobody@example.com",
        attachments=[Attachment("a.txt", "textplain", b"x")],
    )
    with pytest.raises(MailValidationError) as caught, crm.transaction() as session:
        enqueue.enqueue(crm, session, bad)
    text = str(caught.value)
    assert text.startswith("Error validating e-mail")
    for needle in (
        "'per @example.com'",
        "'no-at-sign'",
        "'x@nodot'",
        "subject",
        "person",
        "attachment 'a.txt'",
    ):
        assert needle in text, needle
    assert len(caught.value.problems) == 6
    assert _count(crm, OutboxMessage) == 0


def test_only_a_users_own_address_can_send(scripted: Any) -> None:
    crm, transport = scripted
    with pytest.raises(MailValidationError, match="not a CRM user"), crm.transaction() as s:
        enqueue.enqueue(crm, s, _request(sender_email="ceo@example.se"))
    queue_mail(crm, sender="Anna@Example.se")
    Worker(crm).run_once()
    ((email, _ids),) = transport.calls
    assert email == "anna@example.se"


def test_limits_are_checked_at_enqueue(make_crm: Any) -> None:
    from tests.test_outbox_helpers import SCRIPTED_CONFIG

    config = SCRIPTED_CONFIG + "\n[mail]\nmax_message_bytes = 10000\nmax_recipients = 2\n"
    crm, _ = scripted_crm(make_crm, config)
    add_people(crm, "anna@example.se")
    big = _request(
        to=["a@example.com", "b@example.com"],
        bcc=["c@example.com"],
        attachments=[Attachment("plan.pdf", "application/pdf", b"%" * 20000)],
    )
    with pytest.raises(MailValidationError) as caught, crm.transaction() as s:
        enqueue.enqueue(crm, s, big)
    assert {p.key for p in caught.value.problems} == {"size", "recipients"}


def test_sender_settings_and_transport_are_checked(make_crm: Any) -> None:
    crm = make_crm()  # the maildir default transport; maildir.path not set
    add_people(crm, "anna@example.se")
    with pytest.raises(MailValidationError, match=r"maildir\.path"), crm.transaction() as s:
        enqueue.enqueue(crm, s, _request())
    with crm.transaction() as s:
        found = enqueue.plan(crm, s, _request())
    assert not found.ok
    assert found.product_line == "commercial" and found.transport == "maildir"
    assert "default_transport" in found.transport_reason


def test_queue_is_part_of_the_callers_transaction(scripted: Any) -> None:
    crm, _ = scripted
    heard: list[dict[str, Any]] = []

    def on_queued(sender: object, **extra: Any) -> None:
        heard.append(extra)

    signals.mail_queued.connect(on_queued, sender=crm)
    try:
        with pytest.raises(RuntimeError), crm.transaction() as session:
            person = session.scalar(select(Person).where(Person.email == "per@example.com"))
            assert person is not None
            person.name = "Per Changed"
            enqueue.enqueue(crm, session, _request(person_email="per@example.com"))
            raise RuntimeError("the caller's own change failed")
        assert _count(crm, OutboxMessage) == 0
        assert _count(crm, PersonActivity) == 0
        assert heard == []
        with crm.transaction() as session:
            queued = enqueue.enqueue(crm, session, _request(person_email="per@example.com"))
            assert heard == []  # not before commit
        assert [h["outbox_id"] for h in heard] == [queued.outbox_id]
    finally:
        signals.mail_queued.disconnect(on_queued, sender=crm)
    with crm.transaction() as session:
        (activity,) = session.scalars(select(PersonActivity)).all()
        assert activity.kind == "mail" and activity.outbox_id == queued.outbox_id
        assert "Visning" in activity.summary and f"#{queued.outbox_id}" in activity.summary
    assert queued.message_id.startswith("<crm.") and queued.message_id.endswith("@example.se>")


# --- addresses as a newcomer types them -----------------------------------------------

ALLOW_PRIVATE = "crm settings set mail.allow_private_domains true"


def _sent_headers(crm: Any, transport: Any) -> list[Any]:
    """Run the worker once; the rendered MIME of every message the transport got."""
    seen: list[OutgoingMessage] = []
    transport.hook = lambda account, messages: seen.extend(messages)
    Worker(crm).run_once()
    return [m.to_email_message() for m in seen]


def _refused(crm: Any, request: enqueue.MailRequest) -> list[Any]:
    """The problems enqueue refuses ``request`` with (and the dry run's, the same)."""
    before = _count(crm, OutboxMessage)
    with pytest.raises(MailValidationError) as caught, crm.transaction() as s:
        enqueue.enqueue(crm, s, request)
    with crm.transaction() as s:
        assert [str(p) for p in enqueue.plan(crm, s, request).problems] == [
            str(p) for p in caught.value.problems
        ]
    assert _count(crm, OutboxMessage) == before
    return list(caught.value.problems)


def test_display_names_are_kept_through_to_the_sent_message(scripted: Any) -> None:
    crm, transport = scripted
    queue_mail(
        crm,
        to=['"Andersson, Bo" <bo@example.org>', "Cia <cia@example.org>"],
        cc=["Dan Dahl <dan@example.org>"],
        reply_to=["Säljteamet <salj@example.se>"],
    )
    (mime,) = _sent_headers(crm, transport)
    assert mime["To"] == '"Andersson, Bo" <bo@example.org>, Cia <cia@example.org>'
    assert mime["Cc"] == "Dan Dahl <dan@example.org>"
    assert mime["Reply-To"] == "Säljteamet <salj@example.se>"


def test_a_value_with_several_addresses_says_give_each_its_own_option(scripted: Any) -> None:
    crm, _ = scripted
    (to, bcc) = _refused(
        crm, _request(to=["bo@example.org, cia@example.org"], bcc=["a@example.org; b@x.se"])
    )
    assert to.key == "to 'bo@example.org, cia@example.org'"
    assert "2 addresses" in to.message
    assert to.fix == "give each address its own --to: --to bo@example.org --to cia@example.org"
    assert bcc.fix.startswith("give each address its own --bcc")


def test_a_private_domain_is_refused_with_the_setting_as_fix(scripted: Any) -> None:
    crm, _ = scripted
    (problem,) = _refused(crm, _request(to=["it@corp.local"]))
    assert problem.key == "to 'it@corp.local'"
    assert "'corp.local'" in problem.message and "private network" in problem.message
    assert problem.fix == ALLOW_PRIVATE
    assert f"(fix: {ALLOW_PRIVATE})" in str(MailValidationError([problem]))


def test_the_setting_accepts_private_domains(scripted: Any) -> None:
    crm, transport = scripted
    with crm.transaction() as s:
        crm.set_system_setting(s, "mail.allow_private_domains", "true")
    queue_mail(crm, to=["IT-support <it@corp.local>"], cc=["backup@nas"])
    (mime,) = _sent_headers(crm, transport)
    assert mime["To"] == "IT-support <it@corp.local>" and mime["Cc"] == "backup@nas"


def test_users_on_a_private_domain_need_the_setting_to_exist_and_to_send(scripted: Any) -> None:
    crm, transport = scripted
    with pytest.raises(ValidationError) as caught, crm.transaction() as s:
        directory.add_user(s, "eva@corp.local", "Eva", "commercial")
    assert ALLOW_PRIVATE in str(caught.value)
    with crm.transaction() as s:
        crm.set_system_setting(s, "mail.allow_private_domains", "true")
        directory.add_user(s, "eva@corp.local", "Eva", "commercial")
    queue_mail(crm, sender="eva@corp.local", to=["bo@corp.local"])
    (mime,) = _sent_headers(crm, transport)
    assert mime["From"] == "Eva <eva@corp.local>" and mime["To"] == "bo@corp.local"
    with crm.transaction() as s:
        crm.settings_store().unset_system(s, "mail.allow_private_domains")
    (from_problem, to_problem) = _refused(
        crm, _request(sender_email="eva@corp.local", to=["bo@corp.local"])
    )
    assert from_problem.key == "from 'eva@corp.local'" and from_problem.fix == ALLOW_PRIVATE
    assert to_problem.key == "to 'bo@corp.local'"


def test_the_persons_register_name_is_the_display_name(scripted: Any) -> None:
    crm, transport = scripted
    queue_mail(
        crm,
        to=["Pelle <PER@example.com>", "Bo <bo@example.org>"],
        cc=["cia@example.org"],
        person_email="Per P <per@example.com>",
    )
    (mime,) = _sent_headers(crm, transport)
    assert mime["To"] == "Per Persson <PER@example.com>, Bo <bo@example.org>"
    assert mime["Cc"] == "cia@example.org"


def test_the_sender_is_found_by_the_address_in_a_named_from(scripted: Any) -> None:
    crm, transport = scripted
    queue_mail(crm, sender="Someone Else <anna@example.se>")
    (mime,) = _sent_headers(crm, transport)
    assert mime["From"] == "Anna <anna@example.se>"  # the user's name from the register


@pytest.mark.parametrize(
    ("overrides", "key", "named"),
    [
        ({"subject": "Visning\x0bimorgon"}, "subject", "U+000B vertical tab"),
        ({"subject": "Visning\x9b"}, "subject", "U+009B C1 control"),
        ({"to": ["Per\x1fPersson <per@example.com>"]}, "to 'Per\\x1fPersson <per@example.com>'",
         "U+001F unit separator"),
        ({"cc": ["Bo\x0c <bo@example.org>"]}, "cc 'Bo\\x0c <bo@example.org>'", "U+000C form feed"),
        ({"reply_to": ["Salj\x7f <salj@example.se>"]}, "reply-to 'Salj\\x7f <salj@example.se>'",
         "U+007F delete"),
        ({"sender_email": "Anna\x1c <anna@example.se>"}, "from 'Anna\\x1c <anna@example.se>'",
         "U+001C file separator"),
        ({"attachments": [Attachment("plan\x85.pdf", "application/pdf", b"%PDF")]},
         "attachment 'plan\\x85.pdf'", "U+0085 next line"),
    ],
)  # fmt: skip
def test_a_control_character_in_a_header_is_refused_by_name(
    scripted: Any, overrides: dict[str, Any], key: str, named: str
) -> None:
    """Refused at enqueue, so the worker never holds a message that cannot be rendered."""
    crm, _ = scripted
    (problem,) = _refused(crm, _request(**overrides))
    assert (problem.key, problem.message) == (
        key,
        f"contains a control character ({named}); remove it",
    )


def test_a_control_character_in_a_register_name_is_refused_at_enqueue(scripted: Any) -> None:
    """Names saved before the register refused control characters are display names too."""
    crm, _ = scripted
    with crm.transaction() as s:
        s.execute(update(User).where(User.email == "anna@example.se").values(name="Anna\x1e"))
        s.execute(update(Person).values(name="Per\x0bPersson"))
    sender, person = _refused(crm, _request(person_email="per@example.com"))
    assert str(sender) == (
        "sender anna@example.se: name: contains a control character "
        "(U+001E record separator); remove it"
    )
    assert str(person) == (
        "person per@example.com: name: contains a control character "
        "(U+000B vertical tab); remove it"
    )


# --- states ---------------------------------------------------------------------------


def test_temporary_failure_retries_with_the_same_message_id(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Hello"] = [TEMP, SENT]
    outbox_id = queue_mail(crm)
    first = Worker(crm).run_once()
    assert (first.claimed, first.retry) == (1, 1)
    waiting = row(crm, outbox_id)
    assert waiting.state == "retry" and "will be retried" in (waiting.last_error or "")
    delay = (waiting.next_attempt_at - waiting.updated_at).total_seconds()
    assert 5 <= delay <= 10  # attempt 1: half to all of backoff_base_seconds
    assert Worker(crm).run_once().claimed == 0  # not due yet
    time_passes(crm)
    assert Worker(crm).run_once().sent == 1
    done = row(crm, outbox_id)
    assert done.state == "sent" and done.sent_at is not None and done.provider_ref == "ref"
    ids = [ids for _, ids in transport.calls]
    assert ids[0] == ids[1] == [done.message_id]
    assert [(a.number, a.outcome) for a in done.attempt_log] == [(1, "temporary"), (2, "sent")]
    assert all(a.transport == "scripted" and a.finished_at for a in done.attempt_log)


def test_permanent_failure_is_never_retried(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Hello"] = [PERM]
    outbox_id = queue_mail(crm)
    assert Worker(crm).run_once().failed == 1
    time_passes(crm)
    Worker(crm).run_once()
    failed = row(crm, outbox_id)
    assert failed.state == "failed" and len(transport.calls) == 1
    assert "no such mailbox" in (failed.last_error or "") and failed.last_code == "550 5.1.1"


def test_spent_budget_fails_with_the_last_reason(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Hello"] = [TEMP]
    outbox_id = queue_mail(crm)
    for _ in range(5):
        Worker(crm).run_once()
        time_passes(crm)
    failed = row(crm, outbox_id)
    assert failed.state == "failed" and len(transport.calls) == 3  # max_attempts = 3
    assert (failed.last_error or "").startswith("Gave up after 3 attempts")
    assert "451 4.3.0 try later" in (failed.last_error or "")


LIFETIME_CONFIG = SCRIPTED_CONFIG.replace("max_attempts = 3\n", "")
"""The scripted set-up with the default budget: a lifetime of 2 days, no attempt count."""
DEFERRED = (
    Outcome.TEMPORARY,
    "The recipient per@example.com was deferred: the server answered 451 4.3.0 try later. "
    "What to do: Nothing; it will be tried again later.",
    "451 4.3.0",
    None,
)


@pytest.fixture
def lifetime(make_crm: Any) -> Any:
    crm, transport = scripted_crm(make_crm, LIFETIME_CONFIG)
    add_people(crm, "anna@example.se")
    return crm, transport


def test_an_outage_longer_than_eight_attempts_is_waited_out(lifetime: Any) -> None:
    """Eight attempts with a back-off capped at an hour last 30 to 60 minutes: an SMTP
    server's or Entra ID's outage of that length must not fail every queued mail."""
    crm, transport = lifetime
    transport.script["Hello"] = [DEFERRED] * 12 + [SENT]
    outbox_id = queue_mail(crm)
    for _ in range(12):
        assert Worker(crm).run_once().retry == 1
        time_passes(crm)
    assert Worker(crm).run_once().sent == 1
    assert len(row(crm, outbox_id).attempt_log) == 13


def test_a_temporary_failure_after_the_lifetime_fails_saying_how_long(lifetime: Any) -> None:
    crm, transport = lifetime
    transport.script["Hello"] = [DEFERRED]
    outbox_id = queue_mail(crm)
    assert Worker(crm).run_once().retry == 1
    enqueued_ago(crm, outbox_id, timedelta(days=2, hours=1))
    time_passes(crm)
    assert Worker(crm).run_once().failed == 1
    failed = row(crm, outbox_id)
    assert failed.state == "failed" and failed.last_error == (
        "Gave up after trying for 2 days 1 hour (2 attempts; [outbox] give_up_after is "
        "2 days). The last attempt failed with: The recipient per@example.com was "
        "deferred: the server answered 451 4.3.0 try later."
    )


def test_a_retry_is_due_at_the_end_of_the_lifetime_at_the_latest(lifetime: Any) -> None:
    """The last try comes as the lifetime ends, not days after it (a server's long
    Retry-After included), so the mail fails on time with the server's answer."""
    crm, transport = lifetime
    transport.script["Hello"] = [(Outcome.TEMPORARY, "throttled", "429", 3 * 86400.0)]
    outbox_id = queue_mail(crm)
    Worker(crm).run_once()
    waiting = row(crm, outbox_id)
    assert waiting.state == "retry"
    assert waiting.next_attempt_at == waiting.created_at + timedelta(days=2)


@pytest.mark.parametrize(
    "detail",
    [
        DEFERRED[1],
        "ACME could not be reached; it will be tried again",
        "Entra ID is busy or unavailable; the request will be retried.",
        "The mailbox anna@example.se has reached Exchange's sending limit. What to do: The "
        "mail is retried later; the limit resets within a day.",
    ],
)
def test_a_failed_mails_reason_never_says_it_will_be_tried_again(detail: str) -> None:
    """Transports write their temporary failures for a mail that will be retried."""
    result = SendResult("<m@example.se>", Outcome.TEMPORARY, detail, "451")
    reason = queue.explain(result, OutboxState.FAILED, 30, timedelta(days=2), OutboxConfig())
    assert reason.startswith("Gave up after trying for 2 days (30 attempts;")
    assert "tried again" not in reason and "retried" not in reason
    assert detail.split(";")[0].split(" What to do")[0] in reason


def test_a_failed_mails_reason_keeps_the_servers_own_answer() -> None:
    result = SendResult(
        "<m@example.se>", Outcome.TEMPORARY, "Deferred.", "451", reply="451 4.7.1 Greylisted"
    )
    reason = queue.explain(result, OutboxState.FAILED, 9, timedelta(days=3), OutboxConfig())
    assert reason.endswith("The last attempt failed with: Deferred. The server's last answer: "
                           "451 4.7.1 Greylisted")  # fmt: skip


def test_server_retry_after_wins_when_longer(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Hello"] = [(Outcome.TEMPORARY, "throttled", "429", 900.0)]
    outbox_id = queue_mail(crm)
    Worker(crm).run_once()
    waiting = row(crm, outbox_id)
    assert (waiting.next_attempt_at - waiting.updated_at).total_seconds() == pytest.approx(900)


def test_ambiguous_becomes_unknown_and_is_not_resent(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Hello"] = [
        (Outcome.AMBIGUOUS, "connection lost after the final dot", "", None)
    ]
    outbox_id = queue_mail(crm)
    assert Worker(crm).run_once().unknown == 1
    time_passes(crm)
    assert Worker(crm).run_once().claimed == 0
    unknown = row(crm, outbox_id)
    assert unknown.state == "unknown" and "may or may not" in (unknown.last_error or "")
    with pytest.raises(ValidationError, match="resolve"), crm.transaction() as s:
        operations.retry(s, outbox_id)


def test_a_plugin_that_raises_makes_the_batch_unknown(scripted: Any) -> None:
    crm, transport = scripted
    transport.raise_error = ZeroDivisionError("bug in the plugin")
    ids = [queue_mail(crm, subject=f"m{i}") for i in range(3)]
    stats = Worker(crm).run_once()
    assert stats.unknown == 3
    for outbox_id in ids:
        found = row(crm, outbox_id)
        assert found.state == "unknown" and found.last_code == "plugin-error"
        assert "ZeroDivisionError" in (found.last_error or "")


def test_batch_is_grouped_by_sender_account(scripted: Any) -> None:
    crm, transport = scripted
    for i in range(3):
        queue_mail(crm, subject=f"a{i}", sender="anna@example.se")
        queue_mail(crm, subject=f"b{i}", sender="bo@example.se")
    Worker(crm, concurrency=2).run_once()
    assert sorted((email, len(ids)) for email, ids in transport.calls) == [
        ("anna@example.se", 3),
        ("bo@example.se", 3),
    ]
    assert set(states(crm).values()) == {"sent"}


# --- pauses -----------------------------------------------------------------------------


def test_configuration_error_pauses_the_account_not_the_budget(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Bad"] = [
        (Outcome.CONFIGURATION, "535 5.7.139 Authentication unsuccessful", "535", None)
    ]
    paused_id = queue_mail(crm, subject="Bad")
    later_id = queue_mail(crm, subject="Later")
    other_id = queue_mail(crm, subject="Other", sender="bo@example.se")
    stats = Worker(crm).run_once()
    assert stats.paused_accounts == 1 and stats.sent == 2  # Later went in the same batch
    waiting = row(crm, paused_id)
    assert waiting.state == "queued" and waiting.attempts == 0  # no try spent
    assert "paused" in (waiting.last_error or "")
    assert row(crm, other_id).state == "sent"
    queue_mail(crm, subject="While paused")
    before = len(transport.calls)
    assert Worker(crm).run_once().claimed == 0  # paused: stays queued, not claimed
    assert len(transport.calls) == before
    with crm.transaction() as s:
        listed = {v.subject: v for v in operations.list_messages(s)}
        detail = operations.show_message(s, paused_id)
    assert "Authentication unsuccessful" in (listed["While paused"].paused or "")
    assert "Authentication unsuccessful" in (detail.view.paused or "")
    assert listed["Later"].paused is None  # sent: no longer waiting
    transport.script["Bad"] = [SENT]
    with crm.transaction() as s:
        assert pauses.resume(s, "anna@example.se") is not None
    assert Worker(crm).run_once().sent == 2
    assert row(crm, later_id).state == "sent"


def test_a_settings_change_lifts_the_pause(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Bad"] = [(Outcome.CONFIGURATION, "wrong password", "535", None), SENT]
    outbox_id = queue_mail(crm, subject="Bad")
    Worker(crm).run_once()
    assert _count(crm, AccountPause) == 1
    with crm.transaction() as s:  # backdate the pause: settings are saved after it
        s.execute(update(AccountPause).values(paused_at=utcnow() - timedelta(minutes=5)))
    assert Worker(crm).run_once().claimed == 0
    with crm.transaction() as s:
        crm.set_system_setting(s, "maildir.path", "/tmp/unused-maildir")
    stats = Worker(crm).run_once()
    assert (stats.resumed_accounts, stats.sent) == (1, 1)
    assert row(crm, outbox_id).state == "sent"


AHEAD = datetime(2100, 1, 1, tzinfo=UTC)
BEHIND = datetime(2000, 1, 1, tzinfo=UTC)
"""What the clocks of application hosts that are far off say (the database's is right)."""
WRONG_PASSWORD = (Outcome.CONFIGURATION, "535 5.7.8 wrong password", "535", None)


def _save_a_setting_on(make_crm: Any, clock: datetime, value: str) -> None:
    """Another host on the same database, whose clock says ``clock``, saves a setting."""
    crm, _ = scripted_crm(make_crm, clock=lambda: clock)
    with crm.transaction() as s:
        crm.set_system_setting(s, "mail.allow_private_domains", value)


def test_a_change_saved_before_the_pause_does_not_lift_it_early(make_crm: Any) -> None:
    """A host whose clock is ahead must not make an older change look newer than the
    pause (the account would be tried again at once, and paused again)."""
    crm, transport = scripted_crm(make_crm, clock=lambda: BEHIND)
    add_people(crm, "anna@example.se")
    transport.script["Hello"] = [WRONG_PASSWORD, SENT]
    _save_a_setting_on(make_crm, AHEAD, "true")
    outbox_id = queue_mail(crm)
    paused = Worker(crm).run_once()
    assert (paused.paused_accounts, paused.resumed_accounts, paused.sent) == (1, 0, 0)
    assert Worker(crm).run_once().claimed == 0
    assert row(crm, outbox_id).state == "queued" and len(transport.calls) == 1
    _save_a_setting_on(make_crm, AHEAD, "false")
    lifted = Worker(crm).run_once()
    assert (lifted.resumed_accounts, lifted.sent) == (1, 1)
    assert row(crm, outbox_id).state == "sent" and len(transport.calls) == 2


def test_a_change_saved_after_the_pause_lifts_it_however_late_the_hosts_clock(
    make_crm: Any,
) -> None:
    """A host whose clock is behind must still lift the pause with a newer change
    (else the account would wait until an operator resumed it)."""
    crm, transport = scripted_crm(make_crm, clock=lambda: AHEAD)
    add_people(crm, "anna@example.se")
    transport.script["Hello"] = [WRONG_PASSWORD, SENT]
    outbox_id = queue_mail(crm)
    paused = Worker(crm).run_once()
    assert (paused.paused_accounts, paused.resumed_accounts, paused.sent) == (1, 0, 0)
    assert Worker(crm).run_once().claimed == 0
    _save_a_setting_on(make_crm, BEHIND, "true")
    lifted = Worker(crm).run_once()
    assert (lifted.resumed_accounts, lifted.sent) == (1, 1)
    assert row(crm, outbox_id).state == "sent" and len(transport.calls) == 2


def test_incomplete_settings_pause_before_any_attempt(make_crm: Any, tmp_path: Any) -> None:
    crm = make_crm()
    add_people(crm, "anna@example.se")
    with crm.transaction() as s:
        crm.set_system_setting(s, "maildir.path", str(tmp_path / "md"))
    outbox_id = queue_mail(crm)
    with crm.transaction() as s:
        crm.settings_store().unset_system(s, "maildir.path")
    stats = Worker(crm).run_once()
    assert (stats.paused_accounts, stats.claimed) == (1, 0)
    waiting = row(crm, outbox_id)
    assert waiting.state == "queued" and waiting.attempts == 0 and waiting.attempt_log == []
    with crm.transaction() as s:
        ((pause, email),) = pauses.pauses(s)
    assert email == "anna@example.se" and "maildir.path" in pause.reason


# --- leases and fencing -------------------------------------------------------------------


def _claim(crm: Any, worker: str, now: Any = None) -> list[queue.Claim]:
    with crm.transaction() as s:
        return queue.claim_batch(crm, s, worker, 50, now or utcnow()).claims


def _record(
    crm: Any, claims: Sequence[queue.Claim], outcome: Outcome, how: str = "together"
) -> queue.Recorded:
    """Record each claim's ``outcome`` as a worker may: ``together`` in one Session's
    transaction, ``plain`` in a transaction of a connection without a Session, or
    ``alone``: each in one statement on a connection in autocommit (PostgreSQL)."""
    from crm_core.mail.transport import SendResult

    results = [SendResult(c.message.message_id, outcome, "scripted") for c in claims]
    if how == "together":
        with crm.transaction() as s:
            return queue.record_results(crm, s, claims, results, utcnow())
    with crm.engine.connect() as connection:
        if how == "plain":
            return queue.record_plain(crm, connection, claims, results, utcnow())
        recorded = queue.Recorded()
        connection.execution_options(isolation_level="AUTOCOMMIT")
        for claim, result in zip(claims, results, strict=True):
            assert queue.records_alone(connection, result)
            recorded.merge(queue.record_alone(crm, connection, claim, result, utcnow()))
        return recorded


def test_more_for_a_batch_comes_after_its_last_mail_in_the_order_the_reaper_reads(
    scripted: Any,
) -> None:
    """After a crash the reaper takes a lease's unrecorded rows in (due time, id) order
    as the order they were handed out: mail taken for a batch as it sends must not come
    before mail the batch already holds, or the wrong rows would be counted in flight."""
    crm, _ = scripted
    ids = [queue_mail(crm, subject=f"m{i}") for i in range(4)]
    with crm.transaction() as s:
        batch = queue.claim_batch(crm, s, "w", 2, policy.db_now(s)).claims
    assert [c.outbox_id for c in batch] == ids[:2]
    first_due = batch[0].due_at
    assert first_due is not None
    with crm.transaction() as s:  # ids[2] is due before the batch's mail (queued again)
        s.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == ids[2])
            .values(next_attempt_at=first_due - timedelta(seconds=1))
        )
        more = queue.claim_more(crm, s, "w", batch[-1], 10, policy.db_now(s))
    assert [(c.outbox_id, c.token) for c in more] == [(ids[3], batch[0].token)]
    with crm.transaction() as s:
        held = s.scalars(
            select(OutboxMessage.id)
            .where(OutboxMessage.lease_token == batch[0].token)
            .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        ).all()
    assert held == [ids[0], ids[1], ids[3]]  # the order they are handed out in
    assert row(crm, ids[2]).state == "queued"  # for the next claim


RECORDING = pytest.mark.parametrize("how", ["together", "plain", "alone"])


def _can_record(crm: Any, how: str) -> None:
    """Results are written alone only on PostgreSQL."""
    if how == "alone" and crm.engine.dialect.name != "postgresql":
        pytest.skip("results are written alone (one statement each) on PostgreSQL only")


def _past_the_lease(crm: Any) -> timedelta:
    """How far past now a reaper must run to find a claim made now expired."""
    return timedelta(seconds=crm.config.outbox.lease_seconds + 1)


@RECORDING
def test_a_late_worker_cannot_overwrite_a_newer_claim(scripted: Any, how: str) -> None:
    crm, _ = scripted
    _can_record(crm, how)
    outbox_id = queue_mail(crm)
    old = _claim(crm, "worker-a")
    assert old and row(crm, outbox_id).state == "sending"
    with crm.transaction() as s:  # worker-a stalls past its lease; the reaper runs
        reaped = queue.reap_expired(s, utcnow() + _past_the_lease(crm))
    assert reaped == [outbox_id]
    unknown = row(crm, outbox_id)
    assert unknown.state == "unknown" and unknown.last_code == "lease-expired"
    with crm.transaction() as s:
        operations.resolve(s, outbox_id, sent=False)
    new = _claim(crm, "worker-b")
    assert new[0].token != old[0].token
    assert _record(crm, old, Outcome.SENT, how).stale == 1
    assert row(crm, outbox_id).state == "sending"  # worker-b's claim stands
    assert _record(crm, new, Outcome.PERMANENT, how).counts == {"failed": 1}
    final = row(crm, outbox_id)
    assert final.state == "failed"
    outcomes = [(a.worker, a.outcome) for a in final.attempt_log]
    assert outcomes == [("worker-a", "sent"), ("worker-b", "permanent")]
    assert "not applied" in (final.attempt_log[0].error or "")


@RECORDING
def test_a_late_result_still_lands_when_nobody_else_touched_the_row(
    scripted: Any, how: str
) -> None:
    crm, _ = scripted
    _can_record(crm, how)
    outbox_id = queue_mail(crm)
    claims = _claim(crm, "worker-a")
    with crm.transaction() as s:
        assert queue.reap_expired(s, utcnow() + _past_the_lease(crm)) == [outbox_id]
    heard: list[int] = []

    def hear(_sender: Any, **payload: Any) -> None:
        heard.append(payload["outbox_id"])

    signals.mail_sent.connect(hear, sender=crm)
    try:
        assert _record(crm, claims, Outcome.SENT, how).counts == {"sent": 1}
    finally:
        signals.mail_sent.disconnect(hear, sender=crm)
    assert heard == [outbox_id]  # once, after the write was committed
    landed = row(crm, outbox_id)
    assert landed.state == "sent" and landed.lease_token is None
    assert [(a.outcome, a.error) for a in landed.attempt_log] == [("sent", "scripted")]


def test_the_reaper_leaves_live_leases_alone(scripted: Any) -> None:
    crm, _ = scripted
    queue_mail(crm)
    _claim(crm, "worker-a")
    with crm.transaction() as s:
        assert queue.reap_expired(s, utcnow() + timedelta(seconds=30)) == []
    assert set(states(crm).values()) == {"sending"}


def test_a_slow_live_worker_keeps_its_lease(make_crm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_outbox_helpers import SCRIPTED_CONFIG

    crm, transport = scripted_crm(make_crm, SCRIPTED_CONFIG)
    # A one-second lease, below crm.toml's floor, so that renewals come every 1/3 s.
    crm.config = replace(crm.config, outbox=replace(crm.config.outbox, lease_seconds=1))
    add_people(crm, "anna@example.se")
    renewed = threading.Event()
    real_renew = Worker._renew

    def renew(self: Worker, token: str) -> None:
        real_renew(self, token)  # committed when it returns
        renewed.set()

    monkeypatch.setattr(Worker, "_renew", renew)
    seen: list[tuple[bool, Any, Any]] = []
    reaped: list[int] = []

    def lease(s: Any) -> Any:
        return s.scalar(select(OutboxMessage.lease_until).where(OutboxMessage.id == outbox_id))

    def slow(account: SenderAccount, messages: Sequence[OutgoingMessage]) -> None:
        # The send goes on until the worker has renewed its lease; then a reaper runs
        # with the clock just past the lease the claim took (``now`` is its argument,
        # so no second has to pass in real time).
        with crm.transaction() as s:
            first = lease(s)
        got = renewed.wait(30)  # fires only if the worker never renews
        with crm.transaction() as s:
            reaped.extend(queue.reap_expired(s, first + timedelta(milliseconds=1)))
            seen.append((got, first, lease(s)))

    transport.hook = slow
    outbox_id = queue_mail(crm)
    assert Worker(crm).run_once().sent == 1
    [(got, first, then)] = seen
    assert got, "the worker never renewed the lease of a send in progress"
    assert then > first
    assert reaped == [] and row(crm, outbox_id).state == "sent"


def test_a_stopping_worker_releases_what_it_did_not_start(scripted: Any) -> None:
    crm, transport = scripted
    outbox_id = queue_mail(crm)
    claims = _claim(crm, "worker-a")
    stop = threading.Event()
    stop.set()  # SIGTERM arrived after the claim, before the send started
    stats = WorkerStats()
    with ThreadPoolExecutor(1) as pool:
        Worker(crm, name="worker-a")._send_and_record(pool, claims, stop, stats)
    assert stats.released == 1 and transport.calls == []
    back = row(crm, outbox_id)
    assert back.state == "queued" and back.attempts == 0 and back.attempt_log == []
    assert back.lease_token is None


# --- operators ----------------------------------------------------------------------------


def test_cancel_retry_and_resolve_follow_the_state_rules(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Perm"] = [PERM, SENT]
    failed_id = queue_mail(crm, subject="Perm")
    Worker(crm).run_once()
    with crm.transaction() as s:
        with pytest.raises(ValidationError, match="already final"):
            operations.cancel(s, failed_id)
        with pytest.raises(ValidationError, match="only messages in state unknown"):
            operations.resolve(s, failed_id, sent=True)
        operations.retry(s, failed_id)
    assert row(crm, failed_id).attempts == 0  # a fresh budget
    assert Worker(crm).run_once().sent == 1
    queued_id = queue_mail(crm, subject="Cancel me")
    with crm.transaction() as s:
        operations.cancel(s, queued_id)
    assert Worker(crm).run_once().claimed == 0
    assert row(crm, queued_id).state == "cancelled"
    transport.script["Amb"] = [(Outcome.AMBIGUOUS, "timeout after DATA", "", None), SENT]
    a, b = queue_mail(crm, subject="Amb"), queue_mail(crm, subject="Amb")
    Worker(crm).run_once()
    with crm.transaction() as s:
        operations.resolve(s, a, sent=True)
        operations.resolve(s, b, sent=False)
    assert row(crm, a).state == "sent" and row(crm, b).state == "queued"
    Worker(crm).run_once()
    assert row(crm, b).state == "sent"


def test_reconcile_asks_the_transport(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Amb"] = [(Outcome.AMBIGUOUS, "connection dropped", "", None)]
    ids = [queue_mail(crm, subject="Amb") for _ in range(3)]
    Worker(crm).run_once()
    message_ids = [row(crm, i).message_id for i in ids]
    transport.reconcile_answers = {message_ids[0]: True, message_ids[1]: False}
    reports = {r.outbox_id: r for r in reconciler.reconcile(crm)}
    assert [reports[i].sent for i in ids] == [True, False, None]
    assert [row(crm, i).state for i in ids] == ["sent", "queued", "unknown"]


def test_reconcile_in_a_maildir_finds_what_was_written(make_crm: Any, tmp_path: Any) -> None:
    crm = make_crm()
    add_people(crm, "anna@example.se")
    with crm.transaction() as s:
        crm.set_system_setting(s, "maildir.path", str(tmp_path / "md"))
    written, lost = queue_mail(crm, subject="written"), queue_mail(crm, subject="lost")
    assert Worker(crm).run_once().sent == 2
    with crm.transaction() as s:  # pretend both ended ambiguous; only one was lost
        s.execute(update(OutboxMessage).values(state="unknown"))
        s.execute(
            update(OutboxMessage).where(OutboxMessage.id == lost).values(message_id="<gone@x.se>")
        )
    reports = reconciler.reconcile(crm)
    assert {r.outbox_id: r.sent for r in reports} == {written: True, lost: False}
    assert row(crm, written).state == "sent" and row(crm, lost).state == "queued"


def test_a_user_whose_product_line_was_removed_is_paused_not_a_crash(make_crm: Any) -> None:
    from tests.test_outbox_helpers import SCRIPTED_CONFIG, Scripted

    crm, _ = scripted_crm(make_crm)
    add_people(crm, "anna@example.se")
    with crm.transaction() as s:
        directory.add_user(s, "rut@example.se", "Rut", "rentals")
    stranded = queue_mail(crm, sender="rut@example.se")
    fine = queue_mail(crm)
    only_commercial = SCRIPTED_CONFIG.split("[product_lines.rentals]")[0] + (
        "[outbox]" + SCRIPTED_CONFIG.split("[outbox]")[1]
    )
    later = make_crm(only_commercial, extra_plugins=(("test_transport", Scripted()),))
    stats = Worker(later).run_once()
    assert (stats.sent, stats.paused_accounts) == (1, 1)
    assert row(later, fine).state == "sent" and row(later, stranded).state == "queued"
    with later.transaction() as s:
        ((pause, email),) = pauses.pauses(s)
        with pytest.raises(MailValidationError, match="rentals"):
            enqueue.enqueue(later, s, _request(sender_email="rut@example.se"))
    assert email == "rut@example.se" and "rentals" in pause.reason


def test_worker_signals_are_sent_after_commit(scripted: Any) -> None:
    crm, transport = scripted
    transport.script["Perm"] = [PERM]
    transport.script["Temp"] = [TEMP]
    heard: list[tuple[str, int]] = []

    def listener(name: str) -> Any:
        def receive(sender: object, **extra: Any) -> None:
            heard.append((name, extra["outbox_id"]))

        return receive

    receivers = {n: listener(n) for n in ("mail-sent", "mail-failed", "mail-retry-scheduled")}
    for name, receiver in receivers.items():
        signals.signal_named(name).connect(receiver, sender=crm)
    try:
        ok, perm, temp = (
            queue_mail(crm),
            queue_mail(crm, subject="Perm"),
            queue_mail(crm, subject="Temp"),
        )
        Worker(crm).run_once()
    finally:
        for name, receiver in receivers.items():
            signals.signal_named(name).disconnect(receiver, sender=crm)
    assert sorted(heard) == sorted(
        [("mail-sent", ok), ("mail-failed", perm), ("mail-retry-scheduled", temp)]
    )


def test_a_subject_longer_than_a_header_line_is_refused_with_the_limit(scripted: Any) -> None:
    """RFC 5322 allows 998 characters on a line; a subject that cannot be folded failed
    only when the worker sent it ("500 Line too long"). Refused at enqueue instead."""
    crm, _ = scripted
    longest = "x" * enqueue.MAX_SUBJECT_CHARS
    (problem,) = _refused(crm, _request(subject=longest + "x"))
    assert (problem.key, problem.message, problem.fix) == (
        "subject",
        "is 990 characters long; mail allows at most 989",
        "shorten the subject and put the rest in the body",
    )
    with crm.transaction() as s:
        assert enqueue.enqueue(crm, s, _request(subject=longest)).state == "queued"


@pytest.mark.parametrize(("field", "key"), [("text", "body"), ("html", "html")])
def test_a_nul_character_in_a_body_is_refused(scripted: Any, field: str, key: str) -> None:
    """PostgreSQL cannot store it and SMTP forbids it: refused, with where it is."""
    crm, _ = scripted
    (problem,) = _refused(crm, _request(**{field: "Hej\x00Per"}))
    assert (problem.key, problem.message) == (
        key,
        "contains a NUL character (U+0000) at position 3",
    )


def _claim_statements(crm: Any, batch: int) -> tuple[int, list[queue.Claim]]:
    """How many SQL statements one claim of ``batch`` due mails ran, and its claims."""
    ran: list[str] = []

    def count(*_args: Any) -> None:
        ran.append("statement")

    event.listen(crm.engine, "before_cursor_execute", count)
    try:
        with crm.transaction() as session:
            claimed = queue.claim_batch(crm, session, "w", batch, policy.db_now(session))
    finally:
        event.remove(crm.engine, "before_cursor_execute", count)
    return len(ran), claimed.claims


def test_a_claim_runs_as_many_statements_for_forty_mails_as_for_four(scripted: Any) -> None:
    """Why: a statement per claimed mail (the ORM's flush of each row and of each
    attempt) was most of a claim's cost; a claim's statements must not grow with it."""
    crm, _ = scripted
    for _ in range(44):
        queue_mail(crm)
    with crm.transaction() as session:
        enqueue.enqueue(
            crm, session, _request(attachments=[Attachment("plan.pdf", "application/pdf", b"%PDF")])
        )
    small, four = _claim_statements(crm, 4)
    large, forty = _claim_statements(crm, 41)
    assert (len(four), len(forty)) == (4, 41)
    assert large == small
    files = [c.message.attachments for c in forty if c.message.attachments]
    assert files == [(Attachment("plan.pdf", "application/pdf", b"%PDF"),)]
    with crm.transaction() as session:
        attempts = session.scalars(select(OutboxAttempt).order_by(OutboxAttempt.id)).all()
    assert [(a.outbox_id, a.number) for a in attempts] == [
        (c.outbox_id, 1) for c in [*four, *forty]
    ]
    assert [c.attempt_id for c in [*four, *forty]] == [a.id for a in attempts]


def _due_row_plans(crm: Any) -> list[str]:
    """How the database plans each query by which one claim reads its due rows.

    PostgreSQL is told not to sort where it can avoid it (``enable_sort`` off): a small
    test table is cheap to sort, so it would otherwise sort anyway; the question is
    whether any plan can give the order without sorting every due row.
    """
    seen: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        if statement.lstrip().startswith("SELECT outbox.id") and "ORDER BY" in statement:
            seen.append((statement, params))

    event.listen(crm.engine, "before_cursor_execute", note)
    try:
        _claim_statements(crm, 5)
    finally:
        event.remove(crm.engine, "before_cursor_execute", note)
    postgres = crm.engine.dialect.name == "postgresql"
    plans = []
    with crm.engine.connect() as connection:
        cursor = connection.connection.dbapi_connection.cursor()
        if postgres:
            cursor.execute("SET enable_sort = off")
        for statement, params in seen:
            cursor.execute(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + statement, params)
            plans.append("\n".join(str(row[-1]) for row in cursor.fetchall()))
        connection.rollback()
    return plans


def test_a_claim_reads_a_senders_due_rows_in_index_order_without_sorting_them(
    scripted: Any,
) -> None:
    """Why: mail queued together shares one ``next_attempt_at``, and ``state IN (…)``
    cannot be read in one order from an index; so each claim read and sorted every
    queued row of the sender (with 100,000 queued, 120 ms a claim on PostgreSQL), and a
    long mass mailing went slower the more it had queued."""
    crm, _ = scripted
    for _ in range(8):
        queue_mail(crm)
    plans = _due_row_plans(crm)
    assert plans, "the claim ran no query for due rows"
    for plan in plans:
        assert "ix_outbox_due_by_user" in plan, plan
        assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan
