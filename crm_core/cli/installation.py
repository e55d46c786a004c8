"""``crm init`` and ``crm check``: the installation as a whole."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from crm_core.cli.context import EXIT_FAILED, Context, json_option, pass_ctx
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
    Warns (exit unchanged) from 60 days before an app credential expires.
    """
    from crm_core.entra import expiry_notices

    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        unreadable = crm.settings_store().unreadable_secrets(session)
        users = _users(crm, session)
        system = crm.settings_store().system_values(session)
    warnings = expiry_notices(system, crm.clock().date())
    blocked = [u for u in users if u["problems"]]
    installation = [_unreadable(unreadable)] if unreadable else []
    if as_json:
        problems = [{"user": u["email"], **p} for u in blocked for p in u["problems"]]
        emit_json(
            {
                "ok": not blocked and not installation,
                "config": crm.config.source,
                "installation_problems": [p.as_dict() for p in installation],
                "users": users,
                "problems": problems,
                "warnings": [{"key": n.key, "message": n.message} for n in warnings],
            }
        )
    else:
        for problem in installation:
            click.echo(f"Installation error: {printable(problem.message)}")
            click.echo(f"  fix: {printable(problem.fix)}")
        _print_check(crm, users, blocked)
        for notice in warnings:
            click.echo(f"Warning: {notice.key}: {printable(notice.message)}")
    if blocked or installation:
        sys.exit(EXIT_FAILED)


def _unreadable(where: list[str]) -> Problem:
    """Secrets no key here decrypts: the whole installation's error, not a user's."""
    from crm_core.secret_box import KEY_ENV

    return Problem(
        "secret key",
        f"{len(where)} stored secret(s) cannot be decrypted with this installation's "
        f"secret key: {', '.join(where)}. The mail that needs them waits (no account is "
        "paused for it).",
        f"restore the key file (or {KEY_ENV}) they were encrypted with, or enter each again",
    )


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


COMMANDS = (init, check)
