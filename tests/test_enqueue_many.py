"""Bulk enqueue (``enqueue_many``, ``crm send --to-file``) and what one transaction reads once.

Real databases (SQLite and PostgreSQL through ``make_crm``) and the real worker with
the in-test transport of ``test_outbox_helpers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from crm_core import directory
from crm_core.errors import MailValidationError
from crm_core.mail import enqueue, pauses
from crm_core.mail.policy import db_now
from crm_core.mail.worker import Worker
from crm_core.models import OutboxMessage, PersonActivity, User
from tests.test_outbox_helpers import add_people, scripted_crm


@pytest.fixture
def scripted(make_crm: Any) -> Any:
    crm, transport = scripted_crm(make_crm)
    add_people(crm, "anna@example.se", "bo@example.se")
    return crm, transport


def _request(to: str, sender: str = "anna@example.se", **extra: Any) -> enqueue.MailRequest:
    return enqueue.MailRequest(sender, [to], "Nyheter", "Hej!", **extra)


def _rows(crm: Any) -> list[OutboxMessage]:
    with crm.transaction() as session:
        found = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        session.expunge_all()
        return list(found)


def test_enqueue_many_queues_one_row_per_mail_as_enqueue_would(scripted: Any) -> None:
    crm, transport = scripted
    requests = [
        _request("kund1@example.org"),
        _request("Kund Två <kund2@example.org>", sender="bo@example.se"),
        _request("per@example.com", person_email="per@example.com"),
    ]
    with crm.transaction() as session:
        queued = enqueue.enqueue_many(crm, session, requests)
    rows = _rows(crm)
    assert [r.id for r in rows] == [q.outbox_id for q in queued]
    assert [r.message_id for r in rows] == [q.message_id for q in queued]
    assert len({q.message_id for q in queued}) == 3
    assert [r.recipient_list("to") for r in rows] == [
        [("kund1@example.org", "")],
        [("kund2@example.org", "Kund Två")],
        [("per@example.com", "Per Persson")],
    ]
    assert [r.sender_email for r in rows] == ["anna@example.se", "bo@example.se", "anna@example.se"]
    assert {r.state for r in rows} == {"queued"}
    with crm.transaction() as session:
        (activity,) = session.scalars(select(PersonActivity)).all()
        assert activity.outbox_id == queued[2].outbox_id
    sent: list[str] = []
    transport.hook = lambda account, messages: sent.extend(m.message_id for m in messages)
    Worker(crm).run_once()
    assert sorted(sent) == sorted(q.message_id for q in queued)


def test_one_bad_mail_refuses_all_and_names_its_label(scripted: Any) -> None:
    crm, _ = scripted
    requests = [_request("kund1@example.org"), _request("kund 2@example.org")]
    with pytest.raises(MailValidationError) as caught, crm.transaction() as session:
        enqueue.enqueue_many(crm, session, requests, labels=["list line 1", "list line 2"])
    (problem,) = caught.value.problems
    assert problem.key.startswith("list line 2: to ")
    assert _rows(crm) == []


def test_a_change_in_the_same_transaction_is_seen_by_the_next_mail(scripted: Any) -> None:
    """What a transaction read about a sender is forgotten when it writes pauses, users
    or settings: the next mail is checked against what is there now."""
    crm, _ = scripted
    with crm.transaction() as session:
        first = enqueue.enqueue(crm, session, _request("kund1@example.org"))
        account = crm.sender_account(session, session.get(User, 1))
        pauses.pause_account(
            session, account, "the server refused the login", "535", db_now(session)
        )
        second = enqueue.enqueue(crm, session, _request("kund2@example.org"))
        assert (first.paused, second.paused) == (None, "the server refused the login")
        directory.add_user(session, "cia@example.se", "Cia", "commercial")
        found = enqueue.check_many(crm, session, [_request("k@example.org", "cia@example.se")])
        assert found == []


def _count(crm: Any) -> int:
    with crm.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)


# --- crm send --to-file ---------------------------------------------------------------

CONFIG = """\
[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""
SEND = ("send", "--from", "anna@example.se", "--subject", "Nyheter", "--body", "Hej!")


@pytest.fixture
def cli(make_crm: Any, run_crm: Any, tmp_path: Path) -> Any:
    crm = make_crm(CONFIG)
    with crm.transaction() as s:
        directory.add_user(s, "anna@example.se", "Anna Andersson", "commercial")
        crm.set_system_setting(s, "maildir.path", str(tmp_path / "maildir"))

    def run(*args: str) -> Any:
        return run_crm(*args, env=make_crm.env)

    run.crm = crm  # type: ignore[attr-defined]
    return run


def test_to_file_queues_one_mail_per_line(cli: Any, tmp_path: Path) -> None:
    listed = tmp_path / "kunder.txt"
    listed.write_text("# kunder\nkund1@example.org\n\nKund Två <kund2@example.org>\n", "utf-8")
    done = cli(*SEND, "--to-file", str(listed))
    assert done.code == 0, done.output
    assert done.stdout.startswith("Queued 2 mail(s), one per recipient, as outbox #1 to #2")
    rows = _rows(cli.crm)
    assert [r.recipient_list("to") for r in rows] == [
        [("kund1@example.org", "")],
        [("kund2@example.org", "Kund Två")],
    ]


def test_to_file_reads_a_csv_of_persons(cli: Any, tmp_path: Path) -> None:
    listed = tmp_path / "personer.csv"
    listed.write_text('name,email\n"Persson, Per",per@example.com\nBo,bo@example.org\n', "utf-8")
    done = cli(*SEND, "--to-file", str(listed), "--json")
    assert done.code == 0, done.output
    assert [r.recipient_list("to") for r in _rows(cli.crm)] == [
        [("per@example.com", "Persson, Per")],
        [("bo@example.org", "Bo")],
    ]


def test_a_bad_line_refuses_the_file_naming_the_line(cli: Any, tmp_path: Path) -> None:
    listed = tmp_path / "kunder.txt"
    listed.write_text("kund1@example.org\nkund2@@example.org\n", "utf-8")
    refused = cli(*SEND, "--to-file", str(listed))
    assert refused.code == 2
    assert "kunder.txt line 2: to 'kund2@@example.org'" in refused.stderr
    assert _rows(cli.crm) == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--to", "per@example.com"), "give --to"),
        (("--cc", "per@example.com"), "--cc, --bcc and --person do not apply"),
    ],
)
def test_to_file_is_refused_with_what_does_not_apply(
    cli: Any, tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    listed = tmp_path / "kunder.txt"
    listed.write_text("kund1@example.org\n", "utf-8")
    refused = cli(*SEND, "--to-file", str(listed), *args)
    assert refused.code == 2 and says in refused.stderr
    assert _rows(cli.crm) == []


def test_a_csv_without_an_email_column_is_refused(cli: Any, tmp_path: Path) -> None:
    listed = tmp_path / "personer.csv"
    listed.write_text("namn,adress\nPer,per@example.com\n", "utf-8")
    refused = cli(*SEND, "--to-file", str(listed))
    assert refused.code == 2 and "no 'email' column" in refused.stderr


def test_a_transaction_reads_each_sender_once(scripted: Any) -> None:
    """Ten mails in one transaction: one lookup of the sender's user row, not ten."""
    crm, _ = scripted
    seen: list[str] = []

    def note(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(crm.engine, "before_cursor_execute", note)
    try:
        with crm.transaction() as session:
            for i in range(10):
                enqueue.enqueue(crm, session, _request(f"kund{i}@example.org"))
    finally:
        event.remove(crm.engine, "before_cursor_execute", note)
    user_lookups = [s for s in seen if "FROM users" in s and "users.email" in s]
    assert len(user_lookups) == 1, user_lookups
    assert _count(crm) == 10
