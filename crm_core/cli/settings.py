"""``crm settings``: the installation's settings (Settings → General settings → System)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from crm_core.cli.context import Context, cli_actor, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable, when
from crm_core.cli.values import FROM_ENV_HELP, read_value

if TYPE_CHECKING:
    from crm_core.fields import SettingNotice
    from crm_core.settings import SaveOutcome, SettingView


@click.group()
def settings() -> None:
    """System settings (Settings → General settings → System settings)."""


def report_save(outcome: SaveOutcome, secret: bool, notices: list[SettingNotice]) -> None:
    """Say what happened to a saved value, then any advice about it."""
    if outcome.kept_secret:
        click.echo(f"{outcome.key}: empty value, the saved secret was kept.")
    elif not outcome.changed:
        click.echo(f"{outcome.key}: unchanged.")
    elif secret:
        click.echo(f"{outcome.key}: saved (it will not be shown again).")
    else:
        click.echo(f"{outcome.key}: saved.")
    for key in outcome.reenter:
        click.echo(
            f"{key} must be entered again: {outcome.key} decides where it is sent, and a "
            "saved secret is only sent where it was saved for.",
            err=True,
        )
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {printable(notice.message)}", err=True)


@settings.command("set")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--value-from-env", "from_env", metavar="NAME", help=FROM_ENV_HELP)
@pass_ctx
def settings_set(ctx: Context, key: str, value: str | None, from_env: str | None) -> None:
    """Save a system setting. Leave VALUE out to be asked for it (a secret without echo).

    A secret is never given as VALUE: type it at the prompt, pipe it on standard
    input, or name an environment variable with --value-from-env.
    """
    from crm_core.fields import Scope

    crm = ctx.crm()
    spec = crm.settings_store().field(key, Scope.SYSTEM)
    raw = read_value(spec, value, from_env, crm.environ)
    with crm.transaction() as session:
        outcome = crm.set_system_setting(session, key, raw, actor=cli_actor())
        notices = [n for n in crm.check_settings(session, Scope.SYSTEM, None) if n.key == key]
    report_save(outcome, spec.secret, notices)


@settings.command("unset")
@click.argument("key")
@pass_ctx
def settings_unset(ctx: Context, key: str) -> None:
    """Remove a system setting (a secret is deleted)."""
    crm = ctx.crm()
    with crm.transaction() as session:
        removed = crm.settings_store().unset_system(session, key)
    click.echo(f"{key}: removed." if removed else f"{key}: was not set.")


def print_views(views: list[SettingView]) -> None:
    """One line per setting; a secret shows only whether and when it was saved."""
    for view in views:
        if view.type == "secret":
            shown = view.state
            if view.updated_at:
                shown += f" {when(view.updated_at)}, fingerprint {view.fingerprint}"
            if view.reenter_because:
                shown += f": {view.reenter_words}"
        else:
            shown = printable(view.value) if view.value is not None else "(not set)"
            if view.state == "default":
                shown += " (default)"
        need = f"  [required for {view.required_for}]" if view.required_for else ""
        click.echo(f"  {view.key:<34} {shown}{need}")


@settings.command("show")
@json_option
@pass_ctx
def settings_show(ctx: Context, as_json: bool) -> None:
    """Show every system setting, what stops sending, and advice; secrets stay hidden."""
    from crm_core.fields import Scope

    crm = ctx.crm()
    with crm.transaction(write=False) as session:
        views = crm.settings_store().describe_system(session)
        notices = crm.check_settings(session, Scope.SYSTEM, None)
        found = crm.settings_store().resolve(session)
        problems = crm.installation_problems(found.system, found.reenter)
    if as_json:
        emit_json(
            {
                "ok": True,
                "settings": [v.as_dict() for v in views],
                "sending_problems": [p.as_dict() for p in problems],
                "notices": [n.__dict__ for n in notices],
            }
        )
        return
    click.echo("System settings:")
    print_views(views)
    for problem in problems:
        click.echo(f"Cannot send: {printable(str(problem))}")
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {notice.key}: {printable(notice.message)}")


COMMANDS = (settings,)
