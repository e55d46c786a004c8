"""`make run` runs `crm demo`: the web app, a worker and the mail catcher, until Ctrl-C.

A real subprocess, as the README's command runs it. The test waits on the lines it
prints (never on the clock), signs in with the printed password, sends a mail with
the `crm send` command, reads it on the catcher page, and stops it with SIGINT: exit 0,
no traceback, both ports free again. A second run reuses the installation and says
how to set a password instead of printing one; the command it suggests works as typed.
"""

from __future__ import annotations

import http.cookiejar
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from crm_core import demo as demos
from tests.servers.smtp import port_is_free

WAIT = 60.0  # seconds: only a bound on a hang, never a pause


class Demo:
    """`crm demo` running in a subprocess; its stdout read line by line."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
        self.cwd = cwd
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "crm_core", "demo"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line from now on that matches ``pattern``."""
        while True:
            line = self.lines.get(timeout=WAIT)
            assert line is not None, "crm demo ended:\n" + "\n".join(self.seen) + self.stderr()
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def stop(self, sig: signal.Signals = signal.SIGINT) -> tuple[int, str]:
        """SIGINT (as Ctrl-C sends it) or ``sig``; the exit status and stderr."""
        self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=WAIT)
        return self.process.returncode, err


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.communicate()


def browser_like(base: str) -> urllib.request.OpenerDirector:
    """An HTTP client that keeps cookies, as a browser does."""
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


def open_page(
    opener: urllib.request.OpenerDirector, url: str, form: dict[str, str] | None = None
) -> str:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with opener.open(url, data=data, timeout=WAIT) as answer:
        assert answer.status == 200
        return str(answer.read().decode("utf-8"))


def sign_in(opener: urllib.request.OpenerDirector, base: str, email: str, password: str) -> None:
    page = open_page(opener, base + "sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    after = open_page(
        opener,
        base + "sign-in",
        {"email": email, "password": password, "csrf_token": token.group(1)},
    )
    assert "Sign out" in after


def test_make_run_serves_the_app_sends_through_the_catcher_and_stops_on_ctrl_c(
    demo: Demo, tmp_path: Path
) -> None:
    catcher = demo.wait_for(r"^Mail catcher: SMTP on 127\.0\.0\.1:(\d+), keeping mail in demo/")
    url = demo.wait_for(r"^Web app: (http://127\.0\.0\.1:(\d+)/)$")
    user = demo.wait_for(r"^Sign in as the demo user: (\S+)  password: (\S+)  \(shown this once\)")
    demo.wait_for(r"^Sign in as the administrator: admin@example\.se  password: \S+  \(shown")
    demo.wait_for(r"^Ctrl-C stops the web app, the worker and the catcher\.$")
    base = url.group(1)

    client = browser_like(base)
    assert "Sign in" in open_page(client, base)  # the home page asks for a sign-in
    sign_in(client, base, user.group(1), user.group(2))
    sent = subprocess.run(
        [
            *(sys.executable, "-m", "crm_core", "--config", "demo/crm.toml", "send"),
            *("--from", user.group(1), "--to", "per.persson@example.com"),
            *("--person", "per.persson@example.com", "--subject", "Visning Storgatan 1"),
            *("--body", "Hej Per, välkommen på visning."),
        ],
        cwd=tmp_path,
        env=demo.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    demo.wait_for(r"^Outbox worker: batch for anna\.andersson@\S+ via smtp: 1 message.*sent 1")
    assert "Visning Storgatan 1" in open_page(client, base + "catcher/")

    code, err = demo.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert port_is_free(int(catcher.group(1))) and port_is_free(int(url.group(2)))


def test_a_second_run_reuses_the_installation_and_the_printed_hint_works(
    tmp_path: Path,
) -> None:
    first = Demo(tmp_path)
    first.wait_for(r"^Ctrl-C stops")
    assert first.stop(signal.SIGTERM)[0] == 0  # as a service manager stops it
    second = Demo(tmp_path)
    try:
        hint = second.wait_for(
            r"^Sign in as the demo user: \S+  password: printed when it was created; "
            r"set a new one with `([^`]+)`"
        )
        second.wait_for(r"^Ctrl-C stops")
    finally:
        code, err = second.stop()
    assert code == 0, err
    typed = subprocess.run(
        shlex.split(hint.group(1)),
        cwd=tmp_path,
        env=second.env,
        input="a-new-demo-password\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert typed.returncode == 0, typed.stderr
    assert "can now sign in" in typed.stdout


def test_stopping_during_start_up_frees_both_ports(tmp_path: Path) -> None:
    """A Ctrl-C that comes after the ports are bound but before the threads run."""
    crm = demos.prepare(tmp_path / "demo")
    try:
        demos.populate(crm)
        running = demos.start(crm, tmp_path / "demo", web_port=0, smtp_port=0)
        ports = (running.catcher.port, int(running.server.effective_port))
        assert not any(port_is_free(port) for port in ports)
        running.stop()
    finally:
        crm.close()
    assert all(port_is_free(port) for port in ports)
