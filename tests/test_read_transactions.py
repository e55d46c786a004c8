"""Reading transactions take no write lock, so a reader never makes a writer wait.

Why: on SQLite every transaction began with ``BEGIN IMMEDIATE``, so ``crm outbox
list`` or ``crm send --dry-run`` held the one write lock for as long as they read,
and the worker's claims and results waited behind them (or failed after the busy
timeout). Each test holds one transaction open in one Crm and works in another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from crm_core import directory
from crm_core.models import Person

CONFIG = """\
[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""


@pytest.fixture
def crm(make_crm: Any, tmp_path: Path) -> Any:
    """A Crm with a user who can send through a Maildir, and one person."""
    made = make_crm(CONFIG)
    with made.transaction() as s:
        directory.add_user(s, "anna@example.se", "Anna Andersson", "commercial")
        directory.add_person(s, "per@example.com", "Per Persson", "0701")
        made.set_system_setting(s, "maildir.path", str(tmp_path / "maildir"))
    return made


def _persons(session: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(Person)))


def test_a_long_read_does_not_block_a_writer(crm: Any, make_crm: Any) -> None:
    """A writer in another Crm commits while a reading transaction stays open."""
    writer = make_crm(CONFIG, init=False)
    with crm.transaction(write=False) as reading:
        assert _persons(reading) == 1  # the read has begun: it holds its snapshot
        with writer.transaction() as session:
            directory.add_person(session, "eva@example.com", "Eva Ek", None)
    with crm.transaction(write=False) as session:
        assert _persons(session) == 2


def test_a_write_in_a_reading_transaction_fails_at_once(crm: Any) -> None:
    """A read path that writes by mistake is refused on every backend, never
    half-done or failing only under load."""
    with pytest.raises(DBAPIError, match=r"read-?only"), crm.transaction(write=False) as s:
        directory.add_person(s, "eva@example.com", "Eva Ek", None)
        s.flush()
    with crm.transaction(write=False) as session:
        assert _persons(session) == 1


READ_COMMANDS = (
    ("outbox", "list"),
    ("outbox", "pauses"),
    ("persons", "list"),
    ("persons", "show", "per@example.com"),
    ("users", "list"),
    ("users", "show", "anna@example.se"),
    ("settings", "show"),
    ("check",),
    (
        "send", "--dry-run", "--from", "anna@example.se", "--to", "per@example.com",
        "--subject", "Visning", "--body", "Hej",
    ),
)  # fmt: skip


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_read_commands_run_while_a_writer_holds_the_database(
    crm: Any, make_crm: Any, run_crm: Any, command: tuple[str, ...]
) -> None:
    """The worker's write transaction is open (its claim not yet committed): the read
    commands answer at once instead of waiting for the lock (30 s, then an error)."""
    with crm.transaction() as writing:
        directory.add_person(writing, "eva@example.com", "Eva Ek", None)
        writing.flush()
        result = run_crm(*command, env=make_crm.env)
    assert result.code == 0, result.output
    assert "locked" not in result.output
