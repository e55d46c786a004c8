"""Files and folders the installation makes, and files an operator hands it.

Why one module: the database, its ``-wal`` and ``-shm`` files and the secret key hold
everything there is to steal, so what crm-mail creates is the owner's alone (folders
0700, files 0600) whatever the umask of the shell that ran ``crm init``. And a file an
operator names (``crm send --attach``) is read only if it is a regular file no larger
than the limit: ``/dev/zero`` grew without end and a FIFO waited forever for a writer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from crm_core.errors import InputFileError

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


def regular_file_problem(path: Path, mode: int) -> str | None:
    """Why ``path`` with this ``st_mode`` cannot be read as a file to send, or None."""
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"{path} is {kind}; give a regular file (save the content to a file first)"


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Opened without blocking (a FIFO's open would wait for a writer), then checked with
    ``fstat`` on what was opened, so a file swapped after the command line was read is
    caught too; the size is checked before reading, and reading stops one byte past
    the limit, so a file that grows while read is refused, not read on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        problem = regular_file_problem(path, info.st_mode)
        if problem is not None:
            raise InputFileError(f"{what}: {problem}")
        if info.st_size > limit:
            raise InputFileError(_too_large(path, what, limit))
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputFileError(_too_large(path, what, limit))
    return data


def _read_at_most(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    left = count
    while left > 0:
        chunk = os.read(fd, min(left, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _too_large(path: Path, what: str, limit: int) -> str:
    return (
        f"{what} {path} is larger than the limit of {limit} bytes "
        "([mail] max_message_bytes in crm.toml)"
    )
