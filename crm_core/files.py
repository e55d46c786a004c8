"""Files and folders the installation makes, and files an operator hands it.

Why one module: the database, its ``-wal`` and ``-shm`` files and the secret key hold
everything there is to steal, so what crm-mail creates is the owner's alone (folders
0700, files 0600) whatever the umask of the shell that ran ``crm init``.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600


def private_folder(path: Path) -> None:
    """Create ``path`` and its missing parents, each one 0700 whatever the umask.

    A folder that exists already keeps its mode: it may be shared on purpose (the
    folder of ``crm.toml``), and it is the operator's, not ours.
    """
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_FOLDER)
        except FileExistsError:
            continue  # another process made it meanwhile: its mode is its maker's
        os.chmod(folder, PRIVATE_FOLDER)  # the umask may have taken bits away


def private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True when it was made.

    Why before SQLite opens a database: SQLite creates the file 0644 less the umask,
    and makes its ``-wal`` and ``-shm`` files with the database file's own mode, so
    a database made 0600 keeps all three the owner's alone.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True
