"""``crm init``, ``crm check`` and ``crm demo``: the installation as a whole."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from crm_core.cli.context import EXIT_FAILED, Context, fail, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable
from crm_core.errors import Problem

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from crm_core.app import Crm


@click.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create or upgrade the database and, for a new installation, the secret key.

    Safe to run again. The only command that creates anything: every other command
    refuses to run before it.
    """
    crm = ctx.crm(database=False)
    before, after = crm.init_database()
    made = crm.create_key()
    if before == after:
        click.echo(f"Database is up to date (schema {after}).")
    elif before is None:
        click.echo(f"Database created (schema {after}).")
    else:
        click.echo(f"Database upgraded from schema {before} to {after}.")
    if made is not None:
        click.echo(
            f"Secret key written to {made} (mode 0600). Back it up with the database: "
            "without it, saved passwords and secrets cannot be read."
        )


@click.command()
@json_option
@pass_ctx
def check(ctx: Context, as_json: bool) -> None:
    """Check the configuration, the database and every user: can each one send?

    Exit 1 when a user cannot send; each is named with every problem and its fix.
    """
    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        users = _users(crm, session)
    blocked = [u for u in users if u["problems"]]
    if as_json:
        problems = [{"user": u["email"], **p} for u in blocked for p in u["problems"]]
        emit_json(
            {
                "ok": not blocked,
                "config": crm.config.source,
                "users": users,
                "problems": problems,
            }
        )
    else:
        _print_check(crm, users, blocked)
    if blocked:
        sys.exit(EXIT_FAILED)


def _users(crm: Crm, session: Session) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from crm_core.models import AccountPause, User

    found = []
    for user in session.scalars(select(User).order_by(User.email)):
        _, problems = crm.sender_state(session, user)
        pause = session.get(AccountPause, user.id)
        if pause is not None:
            problems.append(
                Problem(
                    "paused",
                    f"sending is paused: {pause.reason}",
                    f"crm outbox resume {user.email}",
                )
            )
        found.append(
            {
                "email": user.email,
                "product_line": user.product_line,
                "transport": crm.user_transport(
                    crm.settings_store().user_values(session, user.id), user
                )
                if user.product_line in crm.config.product_lines
                else None,
                "ready": not problems,
                "problems": [p.as_dict() for p in problems],
            }
        )
    return found


def _print_check(crm: Crm, users: list[dict[str, Any]], blocked: list[dict[str, Any]]) -> None:
    click.echo(f"Configuration {crm.config.source} is valid; the database is ready.")
    if not users:
        click.echo(
            "No users yet: add one with `crm users add EMAIL --name NAME --product-line LINE`."
        )
        return
    click.echo(
        f"{len(users)} user(s): {len(users) - len(blocked)} can send, {len(blocked)} cannot."
    )
    for user in blocked:
        click.echo(f"{user['email']} cannot send ({user['transport'] or 'no transport'}):")
        for problem in user["problems"]:
            key = f"{problem['key']}: " if problem["key"] else ""
            click.echo(f"  - {printable(key + problem['message'])}")
            if problem["fix"]:
                click.echo(f"    fix: {printable(problem['fix'])}")


@click.command()
@click.option(
    "--dir",
    "folder",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the demo installation (config, database, key, Maildir).",
)
def demo(folder: str) -> None:
    """Create a demo installation and send a mail through the development transport."""
    from crm_core.demo import DEMO_PERSON, DEMO_USER, run_demo

    result = run_demo(Path(folder))
    base = _from_here(result.folder)
    config = _from_here(result.config)
    click.echo(f"Demo installation in {base}/ (config {config}, database {base}/crm.db)")
    click.echo("  product lines: commercial, sales, rentals, boplats (see `crm plugins`)")
    click.echo(f"  user:   {DEMO_USER[1]} <{DEMO_USER[0]}> ({DEMO_USER[2]}, sends via maildir)")
    click.echo(f"  person: {DEMO_PERSON[1]} <{DEMO_PERSON[0]}>")
    click.echo(f"Sent outbox #{result.outbox_id} {result.message_id}: {result.state}")
    if result.landed is None:
        fail("the mail did not land in the Maildir; see `crm outbox show`", EXIT_FAILED)
    click.echo(f"It landed in {_from_here(result.landed)}")
    click.echo("Look around (from this folder):")
    crm = _crm_command()
    for command in (
        "outbox list",
        f"outbox show {result.outbox_id}",
        f"persons show {DEMO_PERSON[0]}",
        f"users show {DEMO_USER[0]}",
    ):
        click.echo(f"  {crm} --config {config} {command}")


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


COMMANDS = (init, check, demo)
