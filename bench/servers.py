"""The servers under test, each in its own process: SMTP (aiosmtpd) and EWS + Entra.

Why processes: a stand-in in the benchmark's interpreter would share the GIL with the
code it measures. The SMTP server is the project's process-mode stand-in
(``python -m tests.servers.smtp``); the EWS and Entra stand-ins run in
:mod:`bench.ews_process`.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bench.core import REPO
from tests.servers.smtp import SmtpProcess, start_smtp_process


@contextlib.contextmanager
def smtp_server(work_dir: Path) -> Iterator[SmtpProcess]:
    """A fresh SMTP server process (plain text on loopback, no AUTH), stopped on exit."""
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="smtp-", dir=work_dir))
    server = start_smtp_process(folder)
    try:
        yield server
    finally:
        server.stop()


def exactly_once(expected: list[str], received: list[str]) -> dict[str, int]:
    """Compare the Message-IDs queued with those the server recorded.

    ``missing``: queued but never arrived; ``duplicates``: arrived more than once;
    ``unexpected``: arrived but never queued in this trial.
    """
    counts = Counter(received)
    wanted = set(expected)
    return {
        "expected": len(wanted),
        "received": len(received),
        "missing": sum(1 for m in wanted if m not in counts),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "unexpected": sum(1 for m in counts if m not in wanted),
    }


def wait_for_ids(server: SmtpProcess, count: int, timeout: float = 30.0) -> list[str]:
    """The IDs the server reported once it has ``count`` (or all it has at the timeout)."""
    with contextlib.suppress(TimeoutError):
        return server.wait_for(count, timeout)
    return server.accepted()


class EwsProcess:
    """``python -m bench.ews_process`` with its READY data and its control channel."""

    def __init__(self, work_dir: Path, ready_timeout: float = 60.0) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="ews-", dir=work_dir))
        self._log = (folder / "ews.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.ews_process", "--dir", str(folder)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        line = self._read_line(ready_timeout)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"EWS stand-in did not start: {line!r} (see {folder})")
        self.info: dict[str, Any] = json.loads(line[len("READY ") :])

    def _read_line(self, timeout: float) -> str:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError("no answer from the EWS stand-in")
        return stdout.readline().strip()

    def stats(self) -> dict[str, Any]:
        """The stand-ins' counters now."""
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        result: dict[str, Any] = json.loads(self._read_line(30.0))
        return result

    def stop(self) -> None:
        """Ask the process to quit; kill it if it does not."""
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            deadline = time.monotonic() + 10
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def __enter__(self) -> EwsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
