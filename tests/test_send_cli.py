"""``crm send`` and ``crm outbox`` as a user runs them: real subprocesses, Maildir transport."""

from __future__ import annotations

import json
import mailbox
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from crm_core import directory, signals

# Only the Maildir plugin: each `crm` call then starts without importing exchangelib.
CONFIG = """\
[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""


@pytest.fixture
def cli(make_crm: Any, run_crm: Any, tmp_path: Path) -> Any:
    """``crm`` on a database with a user, a person and a Maildir."""
    crm = make_crm(CONFIG)
    with crm.transaction() as s:
        directory.add_user(s, "anna@example.se", "Anna Andersson", "commercial")
        directory.add_person(s, "per@example.com", "Per Persson", "0701")
        crm.set_system_setting(s, "maildir.path", str(tmp_path / "maildir"))

    def run(*args: str) -> Any:
        return run_crm(*args, env=make_crm.env)

    return run


SEND = ("send", "--from", "anna@example.se", "--subject", "Visning")


def test_invalid_input_exits_2_names_each_problem_and_queues_nothing(cli: Any) -> None:
    result = cli(
        *SEND[:3],
        "--to", "per @example.com",
        "--to", "per@example.com",
        "--cc", "bad",
        "--subject", "",
        "--body", "Hej",
        "--person", "nobody@example.com",
    )  # fmt: skip
    assert result.code == 2, result.output
    assert "Error validating e-mail" in result.stderr
    for needle in ("'per @example.com'", "contains a space", "cc 'bad'", "subject", "nobody"):
        assert needle in result.stderr, needle
    listed = json.loads(cli("outbox", "list", "--json").stdout)
    assert listed["messages"] == []


def test_send_queues_and_the_worker_delivers(cli: Any, tmp_path: Path) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Välkommen!</p>", encoding="utf-8")
    plan = tmp_path / "plan.pdf"
    plan.write_bytes(b"%PDF-1.4 test")
    sent = cli(
        *SEND,
        "--to", "per@example.com",
        "--bcc", "arkiv@example.se",
        "--body", "Välkommen på visning!",
        "--html-file", str(html),
        "--attach", str(plan),
        "--person", "per@example.com",
        "--json",
    )  # fmt: skip
    assert sent.code == 0, sent.output
    queued = json.loads(sent.stdout)
    assert queued["state"] == "queued" and queued["message_id"].startswith("<crm.")
    shown = json.loads(cli("outbox", "show", str(queued["outbox_id"]), "--json").stdout)
    assert shown["recipients"]["bcc"] == ["arkiv@example.se"]
    assert shown["attachments"] == [
        {"filename": "plan.pdf", "content_type": "application/pdf", "bytes": 13}
    ]
    work = cli("outbox", "work", "--once", "--json")
    assert work.code == 0, work.output
    assert json.loads(work.stdout)["sent"] == 1
    (message,) = mailbox.Maildir(tmp_path / "maildir", create=False)
    assert message["Message-ID"] == queued["message_id"]
    assert message["From"] == "Anna Andersson <anna@example.se>"
    assert "Bcc" not in message and "arkiv@example.se" in message["X-Envelope-To"]
    show = cli("outbox", "show", str(queued["outbox_id"]))
    assert "Outbox #1: sent" in show.stdout and "attempt 1:" in show.stdout
    history = cli("persons", "show", "per@example.com")
    assert "Visning" in history.stdout and f"#{queued['outbox_id']}) — sent" in history.stdout
    plain = cli(*SEND, "--to", "per@example.com", "--body", "Igen")
    assert plain.code == 0 and "Queued as outbox #2, Message-ID <crm." in plain.stdout


def test_dry_run_says_where_it_would_go_and_queues_nothing(cli: Any, tmp_path: Path) -> None:
    ok = cli(*SEND, "--to", "per@example.com", "--body", "Hej", "--dry-run")
    assert ok.code == 0, ok.output
    for needle in (
        "nothing was queued",
        "product line: commercial",
        "transport:    maildir",
        "default_transport",
        "account:      anna@example.se",
        str(tmp_path / "maildir"),
        "It would be queued",
    ):
        assert needle in ok.stdout, needle
    refused = cli(*SEND, "--to", "x@nodot", "--body", "Hej", "--dry-run", "--json")
    assert refused.code == 2
    plan = json.loads(refused.stdout)
    assert plan["ok"] is False and any("x@nodot" in p["key"] for p in plan["problems"])
    assert json.loads(cli("outbox", "list", "--json").stdout)["messages"] == []


def test_addresses_as_a_newcomer_types_them(cli: Any, tmp_path: Path) -> None:
    both = cli(*SEND, "--to", "per@example.com, bo@example.org", "--body", "Hej")
    assert both.code == 2 and "give each address its own --to" in both.stderr
    private = cli(*SEND, "--to", "it@corp.local", "--body", "Hej")
    fix = "crm settings set mail.allow_private_domains true"
    assert private.code == 2 and "'corp.local'" in private.stderr and fix in private.stderr
    allowed = cli(*fix.split()[1:])  # the fix works as typed
    assert allowed.code == 0, allowed.output
    sent = cli(
        *SEND,
        "--to", "IT-support <it@corp.local>",
        "--to", "Pelle <per@example.com>",
        "--person", "per@example.com",
        "--body", "Hej",
    )  # fmt: skip
    assert sent.code == 0, sent.output
    assert cli("outbox", "work", "--once").code == 0
    (message,) = mailbox.Maildir(tmp_path / "maildir", create=False)
    assert message["To"] == "IT-support <it@corp.local>, Per Persson <per@example.com>"


def test_a_control_character_is_refused_by_name_with_exit_2(cli: Any, tmp_path: Path) -> None:
    plan = tmp_path / "plan\x0b.pdf"
    plan.write_bytes(b"%PDF-1.4 test")
    cases = [
        (("--subject", "Visning\x0cimorgon"), "subject: contains a control character "
         "(U+000C form feed); remove it"),
        (("--to", "Per\x1fPersson <per@example.com>"), "to 'Per\\x1fPersson <per@example.com>': "
         "contains a control character (U+001F unit separator); remove it"),
        (("--attach", str(plan)), "attachment 'plan\\x0b.pdf': contains a control character "
         "(U+000B vertical tab); remove it"),
    ]  # fmt: skip
    for args, said in cases:
        refused = cli(*SEND, "--to", "per@example.com", "--body", "Hej", *args)
        assert refused.code == 2, refused.output
        assert "Error validating e-mail" in refused.stderr and said in refused.stderr
    assert json.loads(cli("outbox", "list", "--json").stdout)["messages"] == []


def _interrupt_after_commit(_sender: object, **_payload: Any) -> None:
    """A mail-queued receiver: blinker sends mail-queued after the commit."""
    raise KeyboardInterrupt


def test_ctrl_c_after_the_commit_says_the_outbox_id_and_exits_0(cli: Any) -> None:
    """A wrapper that retries a failed command must not queue the mail a second time."""
    signals.mail_queued.connect(_interrupt_after_commit)
    try:
        sent = cli(*SEND, "--to", "per@example.com", "--body", "Hej")
    finally:
        signals.mail_queued.disconnect(_interrupt_after_commit)
    assert sent.code == 0, sent.output
    assert sent.stdout.startswith("Queued as outbox #1, Message-ID <crm.")
    assert "Interrupted after the mail was queued" in sent.stderr
    listed = json.loads(cli("outbox", "list", "--json").stdout)["messages"]
    assert [m["id"] for m in listed] == [1]


def _interrupt_at_the_first_transaction(_session: Session, *_args: Any) -> None:
    raise KeyboardInterrupt


def _interrupt_while_writing_the_mail(*args: Any) -> None:
    """Engine's before_cursor_execute: the INSERT of the outbox row, however it is made."""
    statement = args[2]
    if statement.lstrip().upper().startswith("INSERT INTO OUTBOX "):
        raise KeyboardInterrupt


def _interrupt_before_committing_the_mail(session: Session) -> None:
    if any(name == "mail-queued" for name, _ in session.info.get(signals.PENDING_KEY, [])):
        raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("moment", "interrupt"),
    [
        ("after_begin", _interrupt_at_the_first_transaction),
        ("before_cursor_execute", _interrupt_while_writing_the_mail),
        ("before_commit", _interrupt_before_committing_the_mail),
    ],
)
def test_ctrl_c_before_the_commit_queues_nothing_and_exits_130(
    cli: Any, moment: str, interrupt: Any
) -> None:
    """Before the commit nothing is queued, so the exit is the interrupt's: 128 + SIGINT."""
    target = Engine if moment == "before_cursor_execute" else Session
    event.listen(target, moment, interrupt)
    try:
        sent = cli(*SEND, "--to", "per@example.com", "--body", "Hej")
    finally:
        event.remove(target, moment, interrupt)
    assert sent.code == 130, sent.output
    assert "Queued as" not in sent.stdout and "Error: interrupted" in sent.stderr
    assert json.loads(cli("outbox", "list", "--json").stdout)["messages"] == []


def test_body_is_required_once(cli: Any) -> None:
    neither = cli(*SEND, "--to", "per@example.com")
    assert neither.code == 2 and "--body" in neither.stderr


def test_a_paused_account_is_shown_and_resumed(cli: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli("settings", "set", "maildir.path", str(blocker / "maildir")).code == 0
    assert cli(*SEND, "--to", "per@example.com", "--body", "Hej").code == 0
    work = json.loads(cli("outbox", "work", "--once", "--json").stdout)
    assert (work["paused_accounts"], work["sent"]) == (1, 0)
    listed = cli("outbox", "list")
    assert "Paused account anna@example.se" in listed.stdout
    assert "waiting: the account is paused: cannot open" in listed.stdout
    assert "paused" in cli("outbox", "show", "1").stdout
    assert "anna@example.se (maildir) paused" in cli("outbox", "pauses").stdout
    again = cli(*SEND, "--to", "per@example.com", "--body", "Igen")
    assert "Warning: the sender's account is paused" in again.stdout
    resumed = cli("outbox", "resume", "anna@example.se")
    assert resumed.code == 0 and "resumed" in resumed.stdout
    assert cli("settings", "set", "maildir.path", str(tmp_path / "maildir")).code == 0
    work = json.loads(cli("outbox", "work", "--once", "--json").stdout)
    assert work["sent"] == 2
    assert "is not paused" in cli("outbox", "resume", "anna@example.se").stdout


def test_operator_commands_follow_the_state_rules(cli: Any) -> None:
    for _ in range(2):
        assert cli(*SEND, "--to", "per@example.com", "--body", "Hej").code == 0
    assert cli("outbox", "cancel", "1").code == 0
    refused = cli("outbox", "resolve", "2", "--sent")
    assert refused.code == 2 and "only messages in state unknown" in refused.stderr
    assert cli("outbox", "retry", "1").code == 0
    assert cli("outbox", "work", "--once").code == 0
    listed = json.loads(cli("outbox", "list", "--status", "sent", "--json").stdout)
    assert sorted(m["id"] for m in listed["messages"]) == [1, 2]
    assert cli("outbox", "cancel", "1").code == 2
    missing = cli("outbox", "show", "99")
    assert missing.code == 2 and "no outbox message #99" in missing.stderr
    assert "No messages in state unknown." in cli("outbox", "reconcile").stdout
