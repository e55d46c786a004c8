"""The ``crm`` command: one module per command group, one handler for every failure.

Why a package: each group (settings, users, persons, outbox, ...) is its own module,
and the modules import the database layer inside their commands, so ``crm --help``
and ``crm --version`` start without SQLAlchemy or Alembic, and only ``crm init``
loads Alembic. Exit status and the JSON shapes are described in
:mod:`crm_core.cli.context`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from crm_core.cli import (
    connection,
    demo,
    installation,
    keys,
    outbox,
    persons,
    plugins,
    send,
    serve,
    settings,
    users,
)
from crm_core.cli.context import EXIT_INTERRUPTED, Context, fail, handle

EPILOG = """\b
Exit status: 0 done; 1 the operation ran and found a problem (Test connection red,
a user who cannot send); 2 the input or the configuration was refused, nothing was
written; 3 an internal error (run again with -vv and report it); 130 interrupted
(crm send: nothing was queued; interrupted after queueing, it exits 0).
Start here: crm init, then crm check. Every command takes --help.
"""


class CrmGroup(click.Group):
    """The root group: every exception that reaches it becomes one line and an exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:  # not click's "Aborted!" and 1: that is "found a problem"
            fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
        except Exception as exc:  # the one place that turns any failure into words
            handle(exc)


@click.group(cls=CrmGroup, epilog=EPILOG)
@click.option(
    "--config",
    "config_path",
    envvar="CRM_CONFIG",
    type=click.Path(dir_okay=False),
    help="Configuration file (default: ./crm.toml, else the embedded default).",
)
@click.option("-v", "--verbose", count=True, help="Log to stderr: -v for INFO, -vv for DEBUG.")
@click.version_option(package_name="crm-mail")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """crm-mail: a CRM core whose mail transports (Exchange, SMTP) are plugins."""
    state = Context(config_path)
    state.verbose = verbose
    ctx.obj = state
    ctx.call_on_close(state.close)
    if verbose:
        ctx.call_on_close(_log_to_stderr(logging.DEBUG if verbose > 1 else logging.INFO))


def _log_to_stderr(level: int) -> Callable[[], None]:
    """Log to stderr for one command; the undo (the command may run in a host process)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(level, previous) if previous else level)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(previous)

    return undo


def _add_commands(group: click.Group) -> None:
    """Each module lists its commands in ``COMMANDS``; the root group adds them."""
    modules = (
        installation,
        settings,
        users,
        persons,
        plugins,
        connection,
        send,
        outbox,
        keys,
        serve,
        demo,
    )
    for module in modules:
        for command in module.COMMANDS:
            group.add_command(command)


_add_commands(main)

__all__ = ["main"]
