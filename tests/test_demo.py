"""`make run` runs `crm demo`: it must work on a fresh folder and again on the same one.

A real subprocess, as the README's command runs it; the commands it suggests are then
typed, as printed, from the same folder.
"""

from __future__ import annotations

import mailbox
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CliResult


def test_demo_sends_a_mail_that_lands_in_the_maildir(
    run_process: Callable[..., CliResult], tmp_path: Path
) -> None:
    first = run_process("demo", "--dir", "demo")
    assert first.code == 0, first.output
    second = run_process("demo", "--dir", "demo")
    assert second.code == 0, second.output
    ids = re.findall(r"Sent outbox #\d+ (<[^>]+>): sent", first.stdout + second.stdout)
    assert len(ids) == 2 and ids[0] != ids[1]
    landed = re.search(r"It landed in (\S+)", second.stdout)
    assert landed and (tmp_path / landed.group(1)).is_file()
    box = mailbox.Maildir(tmp_path / "demo" / "maildir", create=False)
    messages = {m["Message-ID"]: m for m in box}
    assert set(ids) <= set(messages)
    mail = messages[ids[0]]
    assert mail["From"] == "Anna Andersson <anna.andersson@example.se>"
    assert mail["To"] == "Per Persson <per.persson@example.com>"  # the register name (--person)
    assert mail.get_content_type() == "multipart/alternative"

    hints = second.stdout.split("Look around (from this folder):\n")[1].splitlines()
    assert len(hints) == 4
    for hint in hints:
        typed = subprocess.run(
            shlex.split(hint), cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert typed.returncode == 0, (hint, typed.stderr)
        if " persons show " in hint:
            assert typed.stdout.count("— sent") == 2
