"""``crm send --attach`` and ``--body-file`` read regular files only, and no more than the limit.

Why: ``--attach /dev/zero`` grew the process to 2.7 GB, and a FIFO with no writer
made ``crm send`` wait forever. Each command here runs as a real process under a 1 GiB
address-space limit, so the old behaviour fails the test (a MemoryError, or the
subprocess timeout, a safety net only: the new code answers at once) instead of
taking the machine's memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crm_core import directory
from crm_core.errors import InputFileError
from crm_core.files import read_regular
from tests.conftest import CliResult, backends

CONFIG = """\
[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"

[mail]
max_message_bytes = 4096
"""

LIMITED = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
    "sys.argv = ['crm', *sys.argv[1:]]; "
    "runpy.run_module('crm_core', run_name='__main__')"
)
SQLITE = pytest.mark.parametrize("database_url", [backends()[0]], indirect=True)
SEND = ("send", "--from", "anna@example.se", "--to", "per@example.com", "--subject", "Hej")


@pytest.fixture
def crm_send(make_crm: Any, tmp_path: Path) -> Any:
    """``crm send`` as a separate process, on a database with one user."""
    crm = make_crm(CONFIG)
    with crm.transaction() as s:
        directory.add_user(s, "anna@example.se", "Anna Andersson", "commercial")
        crm.set_system_setting(s, "maildir.path", str(tmp_path / "maildir"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(make_crm.env)

    def run(*args: str) -> CliResult:
        done = subprocess.run(
            [sys.executable, "-c", LIMITED, *SEND, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,  # a safety net: the refusal comes at once
            check=False,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@SQLITE
def test_a_device_is_refused_at_once(crm_send: Any) -> None:
    result = crm_send("--body", "Hej", "--attach", "/dev/zero")
    assert result.code == 2, result.stderr
    assert "/dev/zero is a device; give a regular file" in result.stderr
    assert "Traceback" not in result.stderr


@SQLITE
def test_a_fifo_is_refused_without_waiting_for_a_writer(crm_send: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for option in ("--attach", "--body-file"):
        args = ("--body", "Hej", option, str(fifo)) if option == "--attach" else (option, str(fifo))
        result = crm_send(*args)
        assert result.code == 2, result.stderr
        assert f"{fifo} is a FIFO (named pipe); give a regular file" in result.stderr


@SQLITE
def test_a_folder_is_refused(crm_send: Any, tmp_path: Path) -> None:
    result = crm_send("--body", "Hej", "--attach", str(tmp_path))
    assert result.code == 2 and f"{tmp_path} is a folder" in result.stderr


@SQLITE
def test_a_file_over_the_limit_is_refused_before_it_is_read(crm_send: Any, tmp_path: Path) -> None:
    """The size comes from ``stat``: the message names the limit and where it is set."""
    big = tmp_path / "big.pdf"
    big.write_bytes(b"%" * 5000)
    result = crm_send("--body", "Hej", "--attach", str(big))
    assert result.code == 2
    assert (
        f"--attach {big} is larger than the limit of 4096 bytes "
        "([mail] max_message_bytes in crm.toml)"
    ) in result.stderr


@SQLITE
def test_a_regular_file_within_the_limit_is_queued(crm_send: Any, tmp_path: Path) -> None:
    body, plan = tmp_path / "body.txt", tmp_path / "plan.pdf"
    body.write_text("Hej Per", encoding="utf-8")
    plan.write_bytes(b"%PDF" * 100)
    result = crm_send("--body-file", str(body), "--attach", str(plan))
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("Queued as outbox #1")


def test_reading_stops_at_the_limit_when_stat_says_less() -> None:
    """A regular file whose size ``stat`` under-reports (``/proc`` says 0) is read only
    one byte past the limit, then refused."""
    maps = Path("/proc/self/maps")
    assert maps.stat().st_size == 0 and len(maps.read_bytes()) > 64
    with pytest.raises(InputFileError, match="larger than the limit of 64 bytes"):
        read_regular(maps, 64, "--attach")
