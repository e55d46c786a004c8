"""``crm users``: the people who send mail, and their E-mail tab."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from crm_core.cli.context import Context, cli_actor, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable, table, when
from crm_core.cli.settings import print_views, report_save
from crm_core.cli.values import FROM_ENV_HELP, read_value
from crm_core.errors import Problem, ValidationError

if TYPE_CHECKING:
    from crm_core.app import Crm


@click.group()
def users() -> None:
    """CRM users: the people who send mail."""


def known_line(crm: Crm, product_line: str) -> None:
    """Refuse a product line the configuration does not have, naming those it has."""
    if product_line not in crm.config.product_lines:
        lines = ", ".join(crm.config.product_lines)
        raise ValidationError(
            "Unknown product line",
            [
                Problem(
                    "--product-line",
                    f"{product_line!r} is not in {crm.config.source}; it has: {lines}",
                )
            ],
        )


@users.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Full name, shown as the sender's name.")
@click.option(
    "--product-line",
    required=True,
    help="One of the product lines in the configuration (`crm plugins` lists them).",
)
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@pass_ctx
def users_add(ctx: Context, email: str, name: str, product_line: str, admin: bool) -> None:
    """Add a user; EMAIL is the address their mail is sent from."""
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    known_line(crm, product_line)
    with crm.transaction() as session:
        user = directory.add_user(session, email, name, product_line, admin)
        transport = crm.user_transport({}, user)
    click.echo(f"User {user.email} added to {product_line} (sends via {transport}).")
    click.echo(f"Next: `crm check` says what {user.email} still needs before sending.")


@users.command("set")
@click.argument("email")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--value-from-env", "from_env", metavar="NAME", help=FROM_ENV_HELP)
@pass_ctx
def users_set(ctx: Context, email: str, key: str, value: str | None, from_env: str | None) -> None:
    """Save one of a user's settings. Leave VALUE out to be asked for it.

    A secret is never given as VALUE: type it at the prompt, pipe it on standard
    input, or name an environment variable with --value-from-env.
    """
    from crm_core import directory
    from crm_core.fields import Scope

    crm = ctx.crm(check_users=False)
    spec = crm.settings_store().field(key, Scope.USER)
    raw = read_value(spec, value, from_env, crm.environ)
    with crm.transaction() as session:
        user = directory.find_user(session, email)
        outcome = crm.set_user_setting(session, user, key, raw, actor=cli_actor())
        notices = [n for n in crm.check_settings(session, Scope.USER, user) if n.key == key]
    report_save(outcome, spec.secret, notices)


@users.command("password")
@click.argument("email")
@pass_ctx
def users_password(ctx: Context, email: str) -> None:
    """Set a user's web sign-in password, typed twice without echo (or one piped line).

    The password is never an argument: it would show in the process list and the
    shell's history.
    """
    from crm_core import audit, directory
    from crm_core.passwords import set_password

    crm = ctx.crm(check_users=False)
    password = read_password()
    with crm.transaction() as session:
        user = directory.find_user(session, email)
        set_password(session, user, password)
        audit.record(session, cli_actor(), "password set", user.email)
    click.echo(f"{user.email} can now sign in to the web app with the new password.")


def read_password() -> str:
    """The new password: asked twice without echo at a terminal, else one stdin line."""
    if sys.stdin.isatty():
        entered: str = click.prompt(
            "New password", hide_input=True, confirmation_prompt=True, err=True
        )
        return entered
    return sys.stdin.readline().rstrip("\r\n")


@users.command("unset")
@click.argument("email")
@click.argument("key")
@pass_ctx
def users_unset(ctx: Context, email: str, key: str) -> None:
    """Remove one of a user's settings."""
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    with crm.transaction() as session:
        user = directory.find_user(session, email)
        removed = crm.settings_store().unset_user(session, user, key)
    click.echo(f"{key}: removed." if removed else f"{key}: was not set.")


@users.command("show")
@click.argument("email")
@json_option
@pass_ctx
def users_show(ctx: Context, email: str, as_json: bool) -> None:
    """Show a user, their transport, what stops them sending, and settings."""
    from crm_core import directory
    from crm_core.fields import Scope
    from crm_core.models import AccountPause

    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        user = directory.find_user(session, email)
        views = crm.settings_store().describe_user(session, user)
        account = crm.sender_account(session, user)
        problems = crm.sender_problems(account)
        notices = crm.check_settings(session, Scope.USER, user)
        pause = session.get(AccountPause, user.id)
    paused = {"reason": pause.reason, "since": pause.paused_at} if pause else None
    info: dict[str, Any] = {
        "ok": True,
        "email": user.email,
        "name": user.name,
        "product_line": user.product_line,
        "role": user.role,
        "transport": account.transport,
        "ready_to_send": not problems and not paused,
        "paused": paused,
        "sending_problems": [p.as_dict() for p in problems],
        "settings": [v.as_dict() for v in views],
        "notices": [n.__dict__ for n in notices],
    }
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"{printable(user.name)} <{user.email}>  product line {user.product_line}, role {user.role}"
    )
    click.echo(f"Sends via: {account.transport}")
    print_views(views)
    for problem in problems:
        click.echo(f"Cannot send yet: {problem.key}: {printable(problem.message)}")
        if problem.fix:
            click.echo(f"  fix: {printable(problem.fix)}")
    if pause is not None:
        click.echo(f"Sending is paused: {printable(pause.reason)} (since {when(pause.paused_at)})")
        click.echo(f"  fix the settings, or resume with `crm outbox resume {user.email}`")
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {notice.key}: {printable(notice.message)}")


@users.command("list")
@json_option
@pass_ctx
def users_list(ctx: Context, as_json: bool) -> None:
    """List users with their product line and transport."""
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    store = crm.settings_store()
    with crm.transaction(write=False) as session:
        rows = [
            (u, crm.user_transport(store.user_values(session, u.id), u))
            for u in directory.list_users(session)
        ]
    if as_json:
        found = [
            {
                "email": u.email,
                "name": u.name,
                "product_line": u.product_line,
                "role": u.role,
                "transport": t,
            }
            for u, t in rows
        ]
        emit_json({"ok": True, "users": found, "total": len(found)})
        return
    if not rows:
        click.echo("No users yet: `crm users add EMAIL --name NAME --product-line LINE`.")
        return
    lines = table(
        ("E-MAIL", "NAME", "PRODUCT LINE", "TRANSPORT", "ROLE"),
        [(u.email, u.name, u.product_line, t, u.role) for u, t in rows],
    )
    for line in lines:
        click.echo(line)


COMMANDS = (users,)
