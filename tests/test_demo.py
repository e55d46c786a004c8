"""`make run` runs `crm demo`: it must work on a fresh folder and again on the same one."""

from __future__ import annotations

import mailbox
import re
from pathlib import Path


def test_demo_sends_a_mail_that_lands_in_the_maildir(run_crm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = run_crm("demo", "--dir", "demo")
    assert first.code == 0, first.output
    second = run_crm("demo", "--dir", "demo")
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
    assert mail["To"] == "Per Persson <per.persson@example.com>" or "per.persson" in mail["To"]
    assert mail.get_content_type() == "multipart/alternative"
    history = run_crm("--config", "demo/crm.toml", "persons", "show", "per.persson@example.com")
    assert history.code == 0 and history.stdout.count("— sent") == 2
