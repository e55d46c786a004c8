"""What every ``crm`` command shares: the Crm it opens, and how it says no.

Exit status:

- 0: done. Also ``crm send`` interrupted (Ctrl-C) after the mail was queued: the mail
  stays queued, once, and the outbox id is printed as usual, so that a wrapper that
  retries a failed command does not queue it twice.
- 1: the operation ran and found something wrong (Test connection red, ``crm check``
  found a user who cannot send).
- 2: the input or the configuration was refused (nothing was written), including a
  database that is missing, unreachable, of another schema, or a key that is missing.
- 3: an internal error, a bug in crm-mail or a plugin; ``-vv`` shows the traceback.
- 130: interrupted (Ctrl-C; 128 + SIGINT, as a shell reports it). What the command had
  committed stays; ``crm send`` exits 130 only when nothing was queued.

Why one handler at the root: every foreseeable condition becomes one line that says
what is wrong and what to do, never a traceback, whichever command met it. With
``--json`` the same failure is ``{"ok": false, "error": ..., "problems": [...]}`` on
standard output, with the same exit status.
"""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from crm_core.cli.output import emit_json, printable
from crm_core.errors import (
    ConfigError,
    CrmError,
    NotFoundError,
    PluginError,
    Problem,
    SecretKeyError,
    ValidationError,
)

if TYPE_CHECKING:
    from crm_core.app import Crm

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

REFUSED = (ValidationError, ConfigError, NotFoundError, PluginError, SecretKeyError)
"""Errors that mean: the input or the installation's set-up is not right (exit 2)."""

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("crm_core.cli")


class Context:
    """What every command gets: the config path, the output mode, and the Crm."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.json = False
        self.verbose = 0
        self._crm: Crm | None = None

    def crm(self, *, database: bool = True, check_users: bool = True) -> Crm:
        """Open the Crm (once); check the database and, where asked, users' transports.

        ``database=False`` is for the commands that create it (``init``) or do not
        need it (``plugins``); every other command refuses a missing, unreachable or
        foreign database before touching it, so nothing is created by accident.
        """
        if self._crm is None:
            from crm_core.app import Crm

            self._crm = Crm.open(self.config_path)
            log.info(
                "configuration %s; database %s",
                self._crm.config.source,
                self._crm.database_location(),
            )
        if database:
            self._crm.check_database()
            if check_users:
                self._check_users(self._crm)
        return self._crm

    @staticmethod
    def _check_users(crm: Crm) -> None:
        with crm.transaction(write=False) as session:
            problems = crm.check_users(session)
        if problems:
            raise ConfigError("start-up stopped: " + "; ".join(problems))

    def close(self) -> None:
        """Release the database and transport clients."""
        if self._crm is not None:
            self._crm.close()


pass_ctx = click.make_pass_decorator(Context)


def cli_actor() -> str:
    """Who acts through the ``crm`` command, for the audit log: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def json_option(command: F) -> F:
    """``--json``: one JSON document on standard output, for success and failure alike."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        state = ctx.find_object(Context)
        if state is not None:
            state.json = value
        return value

    option = click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=remember,
        help='Print one JSON document: the result, or {"ok": false, "problems": [...]}.',
    )
    return option(command)


def fail(message: str, code: int = EXIT_REFUSED, problems: Sequence[Problem] = ()) -> NoReturn:
    """Say what is wrong (stderr, or JSON on stdout with --json) and exit with ``code``."""
    state = _state()
    if state is not None and state.json:
        emit_json(
            {
                "ok": False,
                "error": message,
                "problems": [p.as_dict() for p in problems],
            }
        )
    else:
        click.echo(f"Error: {printable(message)}", err=True)
        for problem in problems:
            click.echo(f"  - {printable(str(problem))}", err=True)
    sys.exit(code)


def _state() -> Context | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Context) if ctx is not None else None


def handle(exc: Exception) -> NoReturn:
    """Turn an exception that reached the root into one line and an exit status."""
    if isinstance(exc, ValidationError):
        fail(exc.summary, EXIT_REFUSED, exc.problems)
    if isinstance(exc, REFUSED):
        fail(str(exc), EXIT_REFUSED)
    if isinstance(exc, CrmError):
        fail(str(exc), EXIT_FAILED)
    database = _database_error(exc)
    if database is not None:
        fail(database, EXIT_REFUSED)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}", EXIT_REFUSED)
    log.debug("internal error", exc_info=exc)
    fail(
        f"internal error, a bug in crm-mail or one of its plugins: {type(exc).__name__}: "
        f"{exc}. Run the command again with -vv to see where, and report it.",
        EXIT_INTERNAL,
    )


def _database_error(exc: Exception) -> str | None:
    """The words for a database that failed mid-command (it was fine at the start)."""
    if "sqlalchemy" not in sys.modules:
        return None
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError):
        return None
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    return f"the database refused the command: {reason}; nothing was changed"
