"""``crm demo``: the demo installation, running (``make run``)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from crm_core.demo import Account, Running
    from crm_core.mail.worker import BatchReport


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived: time to stop the demo."""


@click.command()
@click.option(
    "--dir",
    "folder",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the demo installation (config, database, key, caught mail).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="The web app's port on 127.0.0.1; a free one when it is taken (0: any free port).",
)
@click.option(
    "--smtp-port",
    type=click.IntRange(0, 65535),
    default=2525,
    show_default=True,
    help="The mail catcher's SMTP port on 127.0.0.1; a free one when it is taken.",
)
@click.option(
    "--new-passwords",
    is_flag=True,
    help="Make and print new sign-in passwords for the administrator and the demo user.",
)
def demo(folder: str, port: int, smtp_port: int, new_passwords: bool) -> None:
    """Run a demo installation: the web app, an outbox worker and a local mail catcher.

    Creates the installation in FOLDER the first time (four product lines, an
    administrator, a demo user who sends through the catcher, a test person) and reuses
    it afterwards. Ctrl-C (or SIGTERM) stops all three and exits 0.
    """
    from crm_core import demo as demos

    base = Path(folder)
    crm = demos.prepare(base)
    try:
        admin, user = demos.populate(crm, new_passwords)
        running: Running | None = None
        with _stop_on_signals():
            try:
                running = demos.start(crm, base, port, smtp_port, on_batch=_batch_line)
                running.start()
                _print_ready(base, running, admin, user)
                threading.Event().wait()  # until a signal raises _Stopped
            except _Stopped:
                click.echo("Stopping the web app, the outbox worker and the mail catcher…")
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the stop finish
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if running is not None:
                    running.stop()
        if running is not None:
            _print_stopped(running)
    finally:
        crm.close()


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Stopped` in the main thread, which waits."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_ready(base: Path, running: Running, admin: Account, user: Account) -> None:
    from crm_core.demo import DEMO_PERSON

    where = _from_here(base)
    click.echo(f"Demo installation in {where}/ (config {where}/crm.toml, database {where}/crm.db)")
    click.echo("  product lines: commercial, sales, rentals, boplats")
    click.echo(f"  test person:   {DEMO_PERSON[1]} <{DEMO_PERSON[0]}>")
    click.echo(
        f"Mail catcher: SMTP on 127.0.0.1:{running.catcher.port}, "
        f"keeping mail in {_from_here(running.catcher.folder)}/"
    )
    click.echo("Outbox worker: running (one)")
    click.echo(f"Web app: {running.url}")
    _print_sign_in("demo user", user, base)
    _print_sign_in("administrator", admin, base)
    click.echo(
        f"Open {DEMO_PERSON[1]}, click the envelope and send; read the letter in the "
        f"mail catcher: {running.url}catcher/"
    )
    click.echo("Ctrl-C stops the web app, the worker and the catcher.")
    sys.stdout.flush()


def _print_sign_in(role: str, account: Account, base: Path) -> None:
    if account.password is not None:
        click.echo(
            f"Sign in as the {role}: {account.email}  password: {account.password}  "
            "(shown this once)"
        )
        return
    crm, config = _crm_command(), f"{_from_here(base)}/crm.toml"
    click.echo(
        f"Sign in as the {role}: {account.email}  password: printed when it was created; "
        f"set a new one with `{crm} --config {config} users password {account.email}` "
        f"(or run `{crm} demo --new-passwords`)"
    )


def _batch_line(report: BatchReport) -> None:
    click.echo(f"Outbox worker: {report}")
    sys.stdout.flush()


def _print_stopped(running: Running) -> None:
    stats = running.stats
    if running.worker_error is not None:
        click.echo(f"The outbox worker had stopped with an error: {running.worker_error}", err=True)
    click.echo(
        f"Stopped. The worker sent {stats.sent} mail(s) and released {stats.released}; "
        f"the mail catcher's port {running.catcher.port} is closed."
    )


def _from_here(path: Path) -> str:
    """``path`` as the user standing in the current folder would type it.

    Not resolved: a virtual environment's python is a link that must stay as it is.
    """
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, Path.cwd())
    return relative if not relative.startswith("..") else absolute


def _crm_command() -> str:
    """How to run this same ``crm`` from the current folder."""
    program = Path(sys.argv[0])
    if program.name == "crm":
        on_path = shutil.which("crm")
        if on_path and os.path.samefile(on_path, program):
            return "crm"
        return _from_here(program)
    return f"{_from_here(Path(sys.executable))} -m crm_core"


COMMANDS = (demo,)
