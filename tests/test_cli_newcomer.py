"""The ``crm`` command as a newcomer meets it: before ``init``, wrong set-ups, hints, JSON.

Each test is one point a first-time user stumbled over: a traceback where a sentence
was due, a file created by a command that should have refused, a hint that failed
when typed, a JSON failure in another shape than the success.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from crm_core.migrations import REVISIONS
from tests.conftest import CliResult

Run = Callable[..., CliResult]

NEEDS_DATABASE = [
    ("users", "list"),
    ("users", "show", "anna@contoso.se"),
    ("users", "add", "anna@contoso.se", "--name", "Anna", "--product-line", "sales"),
    ("settings", "show"),
    ("settings", "set", "exchange.domain", "contoso.se"),
    ("persons", "list"),
    ("check",),
    ("outbox", "list"),
    ("outbox", "work", "--once"),
    ("test-connection", "anna@contoso.se"),
    ("secrets", "rotate"),
    ("send", "--from", "anna@contoso.se", "--to", "per@example.com", "--subject", "Hej",
     "--body", "Hej"),
]  # fmt: skip


def one_error_line(result: CliResult) -> str:
    """The single line a refused command prints (and no traceback anywhere)."""
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args", NEEDS_DATABASE, ids=" ".join)
def test_before_init_every_command_says_run_init_and_creates_nothing(
    run_crm: Run, tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = run_crm(*args)
    assert result.code == 2
    line = one_error_line(result)
    assert line == f"Error: no database at {tmp_path / 'crm.db'}: run `crm init`"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no crm.db, no key file


def test_before_init_json_says_it_in_the_failure_shape(run_crm: Run, tmp_path: Path) -> None:
    result = run_crm("users", "list", "--json")
    assert result.code == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "error": f"no database at {tmp_path / 'crm.db'}: run `crm init`",
        "problems": [],
    }


def test_only_init_creates_the_database_and_the_key(run_crm: Run, tmp_path: Path) -> None:
    made = run_crm("init")
    assert made.code == 0, made.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crm-secret.key", "crm.db"]
    assert "Back it up" in made.stdout
    again = run_crm("init")
    assert again.stdout.strip() == f"Database is up to date (schema {REVISIONS[-1]})."
    assert run_crm("users", "list").code == 0


def test_a_lost_key_file_is_not_replaced_when_secrets_depend_on_it(
    run_crm: Run, tmp_path: Path
) -> None:
    assert run_crm("init").code == 0
    assert run_crm("settings", "set", "exchange.client_secret", input="s3cret\n").code == 0
    (tmp_path / "crm-secret.key").unlink()
    shown = run_crm("settings", "show")
    assert shown.code == 2
    assert "no key file at" in one_error_line(shown) and "restore" in shown.stderr
    init = run_crm("init")
    assert init.code == 2
    assert "holds encrypted secrets: restore the key file" in one_error_line(init)
    assert not (tmp_path / "crm-secret.key").exists()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad CRM_SECRET_KEY", "CRM_SECRET_KEY or the key file does not hold valid keys"),
        ("non-ASCII CRM_SECRET_KEY", "CRM_SECRET_KEY holds something that is not a key"),
        ("key file is a folder", "is a folder; it must be the file `crm init` made"),
        ("database URL unreachable", "crm:***@127.0.0.1:1/crm: connection failed"),
        ("database URL not a URL", "the database URL is not valid"),
        ("database URL of an unknown kind", "names a database this installation cannot use"),
        ("file is not a database", "is not a crm-mail database (file is not a database)"),
        ("crm.toml not UTF-8", "is not UTF-8 text (byte 0xff at position 0); save it as UTF-8"),
        ("database from a newer crm-mail", "has schema 9999, which is newer than this crm-mail"),
    ],
)
def test_no_traceback_for_a_foreseeable_condition(
    run_crm: Run, tmp_path: Path, case: str, expected: str
) -> None:
    assert run_crm("init").code == 0
    env: dict[str, str] = {}
    if case == "bad CRM_SECRET_KEY":
        env["CRM_SECRET_KEY"] = "not-a-key"
    elif case == "non-ASCII CRM_SECRET_KEY":
        env["CRM_SECRET_KEY"] = "nyckel-åäö"
    elif case == "key file is a folder":
        (tmp_path / "crm-secret.key").unlink()
        (tmp_path / "crm-secret.key").mkdir()
    elif case == "database URL unreachable":
        env["CRM_DATABASE_URL"] = "postgresql://crm:hemligt@127.0.0.1:1/crm"
    elif case == "database URL not a URL":
        env["CRM_DATABASE_URL"] = "this is no url"
    elif case == "database URL of an unknown kind":
        env["CRM_DATABASE_URL"] = "nosuchdb://host/crm"
    elif case == "file is not a database":
        _write(tmp_path / "crm.db", b"these are not the bytes of a database\n" * 200)
    elif case == "crm.toml not UTF-8":
        _write(tmp_path / "crm.toml", b"\xff\xfe[product_lines.sales]\n")
    elif case == "database from a newer crm-mail":
        with sqlite3.connect(tmp_path / "crm.db") as db:
            db.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run_crm("users", "list", env=env)
    assert result.code == 2
    line = one_error_line(result)
    assert expected in line
    assert "hemligt" not in result.output  # a password in the URL is never shown


def test_init_refuses_a_database_from_a_newer_crm_mail(run_crm: Run, tmp_path: Path) -> None:
    assert run_crm("init").code == 0
    with sqlite3.connect(tmp_path / "crm.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run_crm("init")
    assert result.code == 2
    assert "upgrade crm-mail before using it. Nothing was changed" in one_error_line(result)


def test_an_internal_error_is_one_line_and_exit_3(
    run_crm: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crm_core import directory

    assert run_crm("init").code == 0

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(directory, "list_users", broken)
    result = run_crm("users", "list")
    assert result.code == 3
    line = one_error_line(result)
    assert "internal error" in line and "RuntimeError: a bug" in line and "-vv" in line
    verbose = run_crm("-vv", "users", "list")
    assert verbose.code == 3 and "Traceback" in verbose.stderr  # the log shows where


EXCHANGE_USER = "anna@contoso.se"


LINES = """\
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.sales]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""


def _init(run_crm: Run, tmp_path: Path) -> None:
    (tmp_path / "crm.toml").write_text(LINES, encoding="utf-8")
    assert run_crm("init").code == 0


def _exchange_user(run_crm: Run, tmp_path: Path) -> None:
    _init(run_crm, tmp_path)
    added = run_crm(
        "users", "add", EXCHANGE_USER, "--name", "Anna Berg", "--product-line", "commercial"
    )
    assert added.code == 0, added.output
    assert run_crm("users", "set", EXCHANGE_USER, "mail.transport", "exchange").code == 0


def test_check_names_each_user_who_cannot_send(run_crm: Run, tmp_path: Path) -> None:
    _exchange_user(run_crm, tmp_path)
    run_crm("users", "add", "bo@contoso.se", "--name", "Bo", "--product-line", "sales")
    run_crm("settings", "set", "maildir.path", str(tmp_path / "Maildir"))
    result = run_crm("check")
    assert result.code == 1
    assert "2 user(s): 1 can send, 1 cannot." in result.stdout
    assert f"{EXCHANGE_USER} cannot send (exchange):" in result.stdout
    assert "  - exchange.sync: 'Sync with Exchange' is not ticked" in result.stdout
    assert f"    fix: crm users set {EXCHANGE_USER} exchange.sync true" in result.stdout
    assert "bo@contoso.se cannot" not in result.stdout

    as_json = json.loads(run_crm("check", "--json").stdout)
    assert as_json["ok"] is False
    assert {p["user"] for p in as_json["problems"]} == {EXCHANGE_USER}
    assert {u["email"]: u["ready"] for u in as_json["users"]} == {
        EXCHANGE_USER: False,
        "bo@contoso.se": True,
    }


def test_every_hint_runs_when_typed(run_crm: Run, tmp_path: Path) -> None:
    _exchange_user(run_crm, tmp_path)
    problems = json.loads(run_crm("check", "--json").stdout)["problems"]
    fixes = {p["key"]: p["fix"] for p in problems}
    assert fixes["exchange.sync"] == f"crm users set {EXCHANGE_USER} exchange.sync true"
    assert fixes["exchange.domain"] == f"crm users set {EXCHANGE_USER} exchange.domain"
    answers = {  # what the user types when a command asks for the value
        "exchange.domain": "contoso.se",
        "exchange.username": EXCHANGE_USER,
        "exchange.client_id": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
        "exchange.tenant_id": "contoso.onmicrosoft.com",
        "exchange.client_secret": "s3cret",
    }
    for fix in fixes.values():
        for command in fix.split("; "):
            words = shlex.split(command)
            assert words[0] == "crm", command
            # A command without a value asks for it; one with a value reads nothing.
            typed = run_crm(*words[1:], input=answers.get(words[-1], "") + "\n")
            assert typed.code == 0, (command, typed.output)
    left = json.loads(run_crm("check", "--json").stdout)["problems"]
    assert left == [], left


def test_json_failure_has_one_shape(run_crm: Run, tmp_path: Path) -> None:
    _exchange_user(run_crm, tmp_path)
    missing = run_crm("users", "show", "nobody@contoso.se", "--json")
    assert missing.code == 2
    assert json.loads(missing.stdout) == {
        "ok": False,
        "error": "no user with e-mail 'nobody@contoso.se'; see `crm users list`",
        "problems": [],
    }
    refused = run_crm(
        "send", "--from", EXCHANGE_USER, "--to", "x@nodot", "--subject", "Hej", "--body", "Hej",
        "--json",
    )  # fmt: skip
    assert refused.code == 2 and refused.stderr == ""
    shape = json.loads(refused.stdout)
    assert shape["ok"] is False and shape["error"] == "Error validating e-mail"
    assert all(set(p) == {"key", "message", "fix"} for p in shape["problems"])
    assert any("x@nodot" in p["key"] for p in shape["problems"])
    red = run_crm("test-connection", EXCHANGE_USER, "--json")
    assert red.code == 1
    report = json.loads(red.stdout)
    assert report["ok"] is False and report["problems"][0]["key"] == "settings"


def test_product_lines_come_from_the_configuration(run_crm: Run, tmp_path: Path) -> None:
    (tmp_path / "crm.toml").write_text(
        '[product_lines.rentals]\nplugins = ["maildir_mail"]\ndefault_transport = "maildir"\n'
        '[product_lines.boplats]\nplugins = ["maildir_mail"]\ndefault_transport = "maildir"\n',
        encoding="utf-8",
    )
    assert run_crm("init").code == 0
    result = run_crm("users", "add", "a@b.se", "--name", "A", "--product-line", "sales")
    assert result.code == 2
    assert "it has: rentals, boplats" in result.stderr
    assert "commercial" not in result.stderr


def test_send_help_documents_every_option(run_crm: Run) -> None:
    from crm_core.cli.send import send

    help_text = run_crm("send", "--help").stdout
    for param in send.params:
        assert getattr(param, "help", None), f"--{param.name} has no help"
        assert param.opts[0] in help_text


def _queue(run_crm: Run, subject: str, person: str | None = None) -> None:
    extra = ("--person", person) if person else ()
    queued = run_crm(
        "send", "--from", "anna@contoso.se", "--to", "per@example.com", "--subject", subject,
        "--body", "Hej", *extra,
    )  # fmt: skip
    assert queued.code == 0, queued.output


def _maildir_user(run_crm: Run, tmp_path: Path) -> None:
    _init(run_crm, tmp_path)
    run_crm("settings", "set", "maildir.path", str(tmp_path / "Maildir"))
    run_crm("users", "add", "anna@contoso.se", "--name", "Anna", "--product-line", "sales")
    run_crm("persons", "add", "per@example.com", "--name", "Per Persson")


def test_outbox_list_has_a_header_columns_and_says_when_it_cut(
    run_crm: Run, tmp_path: Path
) -> None:
    _maildir_user(run_crm, tmp_path)
    for n in range(3):
        _queue(run_crm, f"Visning {n}\u202e")  # a control character is refused at enqueue
    listed = run_crm("outbox", "list", "--limit", "2")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "QUEUED", "FROM", "TO", "SUBJECT", "TRIES", "NOTE"]
    assert lines[1].index("queued") == lines[0].index("STATE")  # aligned
    assert lines[1].startswith("#3 ") and lines[2].startswith("#2 ")
    assert lines[-1] == "2 of 3; use --limit to see more"
    assert "\u202e" not in listed.stdout and "Visning 2\\u202e" in listed.stdout
    as_json = json.loads(run_crm("outbox", "list", "--limit", "2", "--json").stdout)
    assert as_json["total"] == 3 and len(as_json["messages"]) == 2
    shown = run_crm("outbox", "show", "1").stdout
    assert "\u202e" not in shown
    queued_at = next(line for line in shown.splitlines() if "Queued:" in line)
    assert "+00:00;" in queued_at and "T" in queued_at.split()[1]  # ISO 8601 with the zone


def test_person_history_is_newest_first_with_a_limit(run_crm: Run, tmp_path: Path) -> None:
    _maildir_user(run_crm, tmp_path)
    for n in range(3):
        _queue(run_crm, f"Visning {n}", person="per@example.com")
    shown = run_crm("persons", "show", "per@example.com", "--limit", "2")
    lines = shown.stdout.splitlines()
    assert "Visning 2" in lines[1] and "Visning 1" in lines[2]
    assert lines[-1] == "2 of 3; use --limit to see more"
    as_json = json.loads(run_crm("persons", "show", "per@example.com", "--json").stdout)
    assert as_json["total"] == 3
    assert [e["state"] for e in as_json["history"]] == ["queued"] * 3
    assert as_json["history"][0]["at"].endswith("+00:00")


# --- in a real process: start-up cost and standard input --------------------------------


def _imports(args: list[str], cwd: Path) -> set[str]:
    """The top-level packages ``crm ARGS`` imports, from Python's own -X importtime."""
    return {name.split(".")[0] for name in _modules(args, cwd)}


def _modules(args: list[str], cwd: Path) -> set[str]:
    """Every module ``crm ARGS`` imports, from Python's own -X importtime."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "crm_core", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}


def test_help_and_version_import_no_database_layer(tmp_path: Path) -> None:
    for args in (["--help"], ["--version"], ["send", "--help"]):
        loaded = _imports(args, tmp_path)
        assert "click" in loaded
        assert not loaded & {"sqlalchemy", "alembic"}, args
    assert "alembic" in _imports(["init"], tmp_path)
    loaded = _imports(["users", "list"], tmp_path)
    assert "sqlalchemy" in loaded and "alembic" not in loaded
    # Transports' network stacks load when they send or test, not for every command.
    assert not loaded & {"requests", "msal", "exchangelib", "smtplib"}, loaded


def test_a_worker_without_a_saved_certificate_does_not_load_the_certificate_reader(
    tmp_path: Path,
) -> None:
    """cryptography's x509 was a fifth of a worker's start-up beyond SQLAlchemy, loaded
    through the Entra ID settings the worker reads at start whatever it sends with."""
    assert "alembic" in _imports(["init"], tmp_path)
    loaded = _modules(["outbox", "work", "--once"], tmp_path)
    assert "crm_core.entra" in loaded  # read at start: the test covers the path it took
    assert not loaded & {"crm_core.certificates", "cryptography.x509"}, sorted(loaded)


def test_a_secret_is_read_from_standard_input(run_process: Run, tmp_path: Path) -> None:
    env = {"CRM_SECRET_KEY": Fernet.generate_key().decode()}
    assert run_process("init", env=env).code == 0
    saved = run_process("settings", "set", "exchange.client_secret", input="s3cret\n", env=env)
    assert saved.stdout.strip() == "exchange.client_secret: saved (it will not be shown again)."
    shown = run_process("settings", "show", "--json", env=env).stdout
    assert "s3cret" not in shown


# --- crm outbox work shows what it does --------------------------------------------------


def test_the_worker_prints_a_line_per_batch_and_with_v_each_attempt(
    run_crm: Run, tmp_path: Path
) -> None:
    _maildir_user(run_crm, tmp_path)
    for n in range(3):
        _queue(run_crm, f"Visning {n}")
    worked = run_crm("outbox", "work", "--once")
    assert worked.code == 0, worked.output
    batches = [line for line in worked.stderr.splitlines() if " batch for " in line]
    assert len(batches) == 1
    assert (
        batches[0].endswith(" s")
        and "anna@contoso.se via maildir: 3 message(s), sent 3" in (batches[0])
    )
    assert " attempt 1: sent" not in worked.output
    _queue(run_crm, "Visning 4")
    verbose = run_crm("-v", "outbox", "work", "--once")
    assert verbose.code == 0
    assert "#4 <" in verbose.stderr and "> attempt 1: sent" in verbose.stderr
    assert verbose.stderr.count(" batch for ") == 1


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is when a person watches."""

    def isatty(self) -> bool:
        return True


def test_in_a_terminal_a_live_line_shows_sent_failed_remaining_and_rate() -> None:
    from crm_core.cli.progress import Progress
    from crm_core.mail.worker import BatchReport

    ticks = iter([0.0, 2.0, 4.0, 5.0])
    left = iter([7, 6, 5])
    screen = Terminal()
    progress = Progress(screen, lambda: next(left), clock=lambda: next(ticks))
    progress.batch(BatchReport("anna@contoso.se", "smtp", {"sent": 3}, 0.4))
    progress.line("12:00:01 batch for bo@contoso.se via smtp: 2 message(s)")
    progress.batch(BatchReport("bo@contoso.se", "smtp", {"sent": 1, "failed": 1}, 0.2))
    progress.close()
    assert screen.getvalue() == (
        "\r\x1b[Ksent 3 · failed 0 · remaining 7 · 1.5 mail/s"
        "\r\x1b[K12:00:01 batch for bo@contoso.se via smtp: 2 message(s)\n"
        "\r\x1b[Ksent 3 · failed 0 · remaining 6 · 0.8 mail/s"
        "\r\x1b[Ksent 4 · failed 1 · remaining 5 · 0.8 mail/s"
        "\n"
    )
    plain = io.StringIO()  # not a terminal: lines only, no live line
    quiet = Progress(plain, lambda: 0)
    quiet.batch(BatchReport("anna@contoso.se", "smtp", {"sent": 3}, 0.4))
    quiet.line("a batch line")
    quiet.close()
    assert plain.getvalue() == "a batch line\n"


def test_the_schema_revisions_the_code_knows_are_alembics_history() -> None:
    from alembic.script import ScriptDirectory

    from crm_core import db
    from crm_core.migrations import REVISIONS

    engine = db.make_engine("sqlite://")
    script = ScriptDirectory.from_config(db._alembic_config(engine))
    history = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert tuple(history) == REVISIONS
    assert script.get_current_head() == db.head_revision()
