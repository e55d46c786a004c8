"""What ``crm init`` and ``crm demo`` create is the owner's alone, whatever the umask.

Why: the database holds the register and the encrypted secrets, the key file the key
to them; SQLite made the database (and so its ``-wal`` and ``-shm`` files) 0644 less
the umask, and the folders came out 0755 or, under a umask of 0, 0777. Each command
runs in a subprocess with umask 0, so nothing here depends on the test runner's.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

CONFIG = """\
[database]
url = "sqlite:///{db}"

[secrets]
key_file = "{key}"

[product_lines.commercial]
plugins = ["maildir_mail"]
default_transport = "maildir"
"""

HOLD_A_WRITE = """\
import os, stat, sys
from crm_core import directory
from crm_core.app import Crm
crm = Crm.open(sys.argv[1])
with crm.transaction() as session:
    directory.add_person(session, "per@example.com", "Per Persson", None)
    session.flush()
    for suffix in ("-wal", "-shm"):
        print(suffix, oct(stat.S_IMODE(os.stat(sys.argv[2] + suffix).st_mode)))
crm.close()
"""


def _crm(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    return subprocess.run(
        [sys.executable, "-m", "crm_core", *args],
        cwd=folder,
        env=env,
        umask=0,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _python(folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=env,
        umask=0,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_database_the_key_and_their_folders_private(tmp_path: Path) -> None:
    """Folders that did not exist are made 0700; the database and key files 0600."""
    db, key = tmp_path / "data" / "crm.db", tmp_path / "keys" / "crm-secret.key"
    config = tmp_path / "crm.toml"
    config.write_text(CONFIG.format(db=db, key=key), encoding="utf-8")
    done = _crm(tmp_path, "--config", str(config), "init")
    assert done.returncode == 0, done.stderr
    modes = {p.name: oct(_mode(p)) for p in (db.parent, key.parent, db, key)}
    assert modes == {"data": "0o700", "keys": "0o700", "crm.db": "0o600", "crm-secret.key": "0o600"}


def test_the_wal_and_shm_files_are_private_too(tmp_path: Path) -> None:
    """SQLite makes ``-wal`` and ``-shm`` while a write is open, with the database's mode."""
    db = tmp_path / "crm.db"
    config = tmp_path / "crm.toml"
    config.write_text(CONFIG.format(db=db, key=tmp_path / "crm.key"), encoding="utf-8")
    assert _crm(tmp_path, "--config", str(config), "init").returncode == 0
    held = subprocess.run(
        [sys.executable, "-c", HOLD_A_WRITE, str(config), str(db)],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CRM_")},
        umask=0,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert held.returncode == 0, held.stderr
    assert held.stdout.split() == ["-wal", "0o600", "-shm", "0o600"]


DEMO_PREPARE = """
from pathlib import Path
from crm_core import demo
demo.prepare(Path("demo")).close()
"""


def test_the_demo_folder_is_private(tmp_path: Path) -> None:
    """``crm demo`` puts a database and a key in its folder: it is made 0700.

    Its first step (:func:`crm_core.demo.prepare`) runs alone, with umask 0: the whole
    command goes on serving the web app until Ctrl-C.
    """
    done = _python(tmp_path, DEMO_PREPARE)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "demo"
    assert oct(_mode(folder)) == "0o700"
    assert oct(_mode(folder / "crm.db")) == "0o600"
