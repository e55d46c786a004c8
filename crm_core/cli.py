"""The ``crm`` command.

Exit status: 0 success; 1 the operation ran and failed (e.g. Test connection red);
2 the input or configuration was refused (nothing was written). Errors go to stderr in
words that say what to fix; no traceback is shown for expected errors, and no secret
can appear because secrets are only ever held as masked :class:`Secret` objects.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from crm_core import directory
from crm_core.app import Crm
from crm_core.config import PRODUCT_LINES
from crm_core.errors import (
    ConfigError,
    CrmError,
    NotFoundError,
    PluginError,
    SecretKeyError,
    ValidationError,
)
from crm_core.fields import Scope
from crm_core.mail.operations import person_history
from crm_core.mail.transport import ConnectionReport, StepStatus
from crm_core.models import AccountPause, Role
from crm_core.settings import SaveOutcome, SettingView

EXIT_FAILED = 1
EXIT_REFUSED = 2


class Context:
    """What every command gets: the config path and a lazily opened Crm."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._crm: Crm | None = None

    def crm(self, check_users: bool = True) -> Crm:
        """Open the Crm (once), check plugins and, where asked, users' transports."""
        if self._crm is None:
            self._crm = Crm.open(self.config_path)
        if check_users and self._crm.database_ready():
            with self._crm.transaction() as session:
                problems = self._crm.check_users(session)
            if problems:
                raise ConfigError(
                    "start-up stopped: "
                    + "; ".join(problems)
                    + " (fix with `crm users set EMAIL mail.transport ...` or the config file)"
                )
        return self._crm

    def close(self) -> None:
        """Release the database and transport clients."""
        if self._crm is not None:
            self._crm.close()


pass_ctx = click.make_pass_decorator(Context)


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    """Print ``message`` to stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn crm_core errors into a clear message and an exit status."""
    try:
        yield
    except (ValidationError, ConfigError, NotFoundError, PluginError, SecretKeyError) as exc:
        fail(str(exc), EXIT_REFUSED)
    except CrmError as exc:
        fail(str(exc), EXIT_FAILED)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group()
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
    if verbose:
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
    state = Context(config_path)
    ctx.obj = state
    ctx.call_on_close(state.close)


@main.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create or upgrade the database (safe to run again)."""
    with handled():
        crm = ctx.crm(check_users=False)
        before, after = crm.init_database()
        crm.secret_box()  # creates the key file on first use, with mode 0600
    if before == after:
        click.echo(f"Database is up to date (schema {after}).")
    elif before is None:
        click.echo(f"Database created (schema {after}).")
    else:
        click.echo(f"Database upgraded from schema {before} to {after}.")


@main.command()
@pass_ctx
def check(ctx: Context) -> None:
    """Check configuration, plugins and every user's transport."""
    with handled():
        crm = ctx.crm(check_users=True)
        if not crm.database_ready():
            fail("the database is not initialised or not up to date; run `crm init`")
    click.echo(f"Configuration {crm.config.source} is valid; database ready.")


# --- settings -----------------------------------------------------------------------


@main.group()
def settings() -> None:
    """System settings (Settings → General settings → System settings)."""


def _read_value(key: str, value: str | None, secret: bool) -> str:
    if value is not None:
        return value
    if not secret:
        fail(f"give a value for {key} (only secrets may be read from standard input)")
    if sys.stdin.isatty():
        entered: str = click.prompt(f"{key}", hide_input=True, default="", show_default=False)
        return entered
    return sys.stdin.readline().rstrip("\r\n")


def _report_save(outcome: SaveOutcome, secret: bool) -> None:
    if outcome.kept_secret:
        click.echo(f"{outcome.key}: empty value, the saved secret was kept.")
    elif not outcome.changed:
        click.echo(f"{outcome.key}: unchanged.")
    elif secret:
        click.echo(f"{outcome.key}: saved (it will not be shown again).")
    else:
        click.echo(f"{outcome.key}: saved.")


@settings.command("set")
@click.argument("key")
@click.argument("value", required=False)
@pass_ctx
def settings_set(ctx: Context, key: str, value: str | None) -> None:
    """Save a system setting. A secret's VALUE may be left out and typed (not echoed)."""
    with handled():
        crm = ctx.crm()
        spec = crm.settings_store().field(key, Scope.SYSTEM)
        raw = _read_value(key, value, spec.secret)
        with crm.transaction() as session:
            outcome = crm.set_system_setting(session, key, raw)
            notices = [n for n in crm.check_settings(session, Scope.SYSTEM, None) if n.key == key]
    _report_save(outcome, spec.secret)
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {notice.message}", err=True)


@settings.command("unset")
@click.argument("key")
@pass_ctx
def settings_unset(ctx: Context, key: str) -> None:
    """Remove a system setting (a secret is deleted)."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            removed = crm.settings_store().unset_system(session, key)
    click.echo(f"{key}: removed." if removed else f"{key}: was not set.")


def _print_views(views: list[SettingView]) -> None:
    for view in views:
        if view.type == "secret":
            shown = view.state
            if view.updated_at:
                shown += f" {view.updated_at:%Y-%m-%d %H:%M} UTC, fingerprint {view.fingerprint}"
        else:
            shown = view.value if view.value is not None else "(not set)"
            if view.state == "default":
                shown += " (default)"
        need = f"  [required for {view.required_for}]" if view.required_for else ""
        click.echo(f"  {view.key:<34} {shown}{need}")


@settings.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def settings_show(ctx: Context, as_json: bool) -> None:
    """Show every system setting; secrets show only whether they are saved."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            views = crm.settings_store().describe_system(session)
            notices = crm.check_settings(session, Scope.SYSTEM, None)
    if as_json:
        emit_json(
            {
                "settings": [v.as_dict() for v in views],
                "notices": [n.__dict__ for n in notices],
            }
        )
        return
    click.echo("System settings:")
    _print_views(views)
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {notice.key}: {notice.message}")


# --- users --------------------------------------------------------------------------


@main.group()
def users() -> None:
    """CRM users: the people who send mail."""


@users.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Full name, shown as the sender's name.")
@click.option(
    "--product-line", required=True, type=click.Choice(PRODUCT_LINES), help="Product line."
)
@click.option("--admin", is_flag=True, help="Give the user the admin role.")
@pass_ctx
def users_add(ctx: Context, email: str, name: str, product_line: str, admin: bool) -> None:
    """Add a user; EMAIL is the address their mail is sent from."""
    with handled():
        crm = ctx.crm(check_users=False)
        crm.config.product_line(product_line)
        with crm.transaction() as session:
            user = directory.add_user(session, email, name, product_line, admin)
            transport = crm.user_transport({}, user)
    click.echo(f"User {user.email} added to {product_line} (sends via {transport}).")


@users.command("set")
@click.argument("email")
@click.argument("key")
@click.argument("value", required=False)
@pass_ctx
def users_set(ctx: Context, email: str, key: str, value: str | None) -> None:
    """Save one of a user's settings (the user dialog's E-mail tab)."""
    with handled():
        crm = ctx.crm(check_users=False)
        spec = crm.settings_store().field(key, Scope.USER)
        raw = _read_value(key, value, spec.secret)
        with crm.transaction() as session:
            user = directory.find_user(session, email)
            outcome = crm.set_user_setting(session, user, key, raw)
            notices = [n for n in crm.check_settings(session, Scope.USER, user) if n.key == key]
    _report_save(outcome, spec.secret)
    for notice in notices:
        click.echo(f"{notice.level.capitalize()}: {notice.message}", err=True)


@users.command("unset")
@click.argument("email")
@click.argument("key")
@pass_ctx
def users_unset(ctx: Context, email: str, key: str) -> None:
    """Remove one of a user's settings."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            user = directory.find_user(session, email)
            removed = crm.settings_store().unset_user(session, user, key)
    click.echo(f"{key}: removed." if removed else f"{key}: was not set.")


@users.command("show")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def users_show(ctx: Context, email: str, as_json: bool) -> None:
    """Show a user, their transport and settings (secrets masked)."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            user = directory.find_user(session, email)
            views = crm.settings_store().describe_user(session, user)
            account = crm.sender_account(session, user)
            problems = crm.sender_problems(account)
            notices = crm.check_settings(session, Scope.USER, user)
            pause = session.get(AccountPause, user.id)
            paused = (
                f"{pause.reason} (since {pause.paused_at:%Y-%m-%d %H:%M} UTC)" if pause else None
            )
    info = {
        "email": user.email,
        "name": user.name,
        "product_line": user.product_line,
        "role": user.role,
        "transport": account.transport,
        "ready_to_send": not problems and not paused,
        "paused": paused,
        "problems": [str(p) for p in problems],
        "settings": [v.as_dict() for v in views],
        "notices": [n.__dict__ for n in notices],
    }
    if as_json:
        emit_json(info)
        return
    click.echo(f"{user.name} <{user.email}>  product line {user.product_line}, role {user.role}")
    click.echo(f"Sends via: {account.transport}")
    _print_views(views)
    for problem in problems:
        click.echo(f"Cannot send yet: {problem}")
    if paused:
        click.echo(f"Sending is paused: {paused}")
        click.echo(f"  fix the settings, or resume with `crm outbox resume {user.email}`")
    for notice in notices:
        if notice.level != "error":
            click.echo(f"{notice.level.capitalize()}: {notice.key}: {notice.message}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def users_list(ctx: Context, as_json: bool) -> None:
    """List users."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            rows = [
                (u, crm.user_transport(crm.settings_store().user_values(session, u.id), u))
                for u in directory.list_users(session)
            ]
    if as_json:
        emit_json(
            [
                {
                    "email": u.email,
                    "name": u.name,
                    "product_line": u.product_line,
                    "role": u.role,
                    "transport": t,
                }
                for u, t in rows
            ]
        )
        return
    for user, transport in rows:
        admin = " (admin)" if user.role == Role.ADMIN.value else ""
        click.echo(f"{user.email:<36} {user.name:<24} {user.product_line:<11} {transport}{admin}")


# --- persons ------------------------------------------------------------------------


@main.group()
def persons() -> None:
    """Persons in the CRM register (contacts, stakeholders)."""


@persons.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Full name.")
@click.option("--mobile", default=None, help="Mobile number.")
@pass_ctx
def persons_add(ctx: Context, email: str, name: str, mobile: str | None) -> None:
    """Add a person to the register."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            person = directory.add_person(session, email, name, mobile)
    click.echo(f"Person {person.name} <{person.email}> added (id {person.id}).")


@persons.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def persons_list(ctx: Context, as_json: bool) -> None:
    """List persons."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            rows = list(directory.list_persons(session))
    if as_json:
        emit_json(
            [{"id": p.id, "email": p.email, "name": p.name, "mobile": p.mobile} for p in rows]
        )
        return
    for person in rows:
        click.echo(f"{person.email:<36} {person.name:<24} {person.mobile or ''}")


@persons.command("show")
@click.argument("email")
@pass_ctx
def persons_show(ctx: Context, email: str) -> None:
    """Show a person and their history (mail sent to them)."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            person = directory.find_person(session, email)
            history = person_history(session, person)
    click.echo(f"{person.name} <{person.email}> {person.mobile or ''}")
    for when, kind, summary in history:
        click.echo(f"  {when:%Y-%m-%d %H:%M} {kind}: {summary}")


# --- plugins and connection ---------------------------------------------------------


@main.command("plugins")
@click.option("--product-line", type=click.Choice(PRODUCT_LINES), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def plugins_cmd(ctx: Context, product_line: str | None, as_json: bool) -> None:
    """Which plugins are enabled in each product line, and their transports."""
    with handled():
        crm = ctx.crm(check_users=False)
        names = [product_line] if product_line else list(crm.config.product_lines)
        data: list[dict[str, Any]] = []
        for name in names:
            line = crm.config.product_line(name)
            data.append(
                {
                    "product_line": name,
                    "label": line.label,
                    "plugins": list(line.plugins),
                    "default_transport": line.default_transport,
                    "transports": {
                        t.name: {"label": t.label, "plugin": t.plugin}
                        for t in crm.transports(name).values()
                    },
                }
            )
    if as_json:
        emit_json(data)
        return
    click.echo(f"Configuration: {crm.config.source}")
    for entry in data:
        click.echo(f"{entry['product_line']} — {entry['label']}")
        click.echo(f"  plugins: {', '.join(entry['plugins']) or '(none)'}")
        for tname, tinfo in entry["transports"].items():
            default = " (default)" if tname == entry["default_transport"] else ""
            click.echo(f"  transport {tname}: {tinfo['label']} [{tinfo['plugin']}]{default}")


_MARKS = {
    StepStatus.OK: "[ok]  ",
    StepStatus.WARNING: "[warn]",
    StepStatus.FAILED: "[FAIL]",
    StepStatus.SKIPPED: "[skip]",
}


def print_report(report: ConnectionReport, echo: Callable[[str], None] = click.echo) -> None:
    """Print a Test connection ladder, one line per step, fix under a red step."""
    echo(report.summary)
    for step in report.steps:
        echo(f"  {_MARKS[step.status]} {step.name}: {step.detail}")
        if step.fix and step.status in (StepStatus.FAILED, StepStatus.WARNING):
            echo(f"         fix: {step.fix}")


@main.command("test-connection")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def test_connection_cmd(ctx: Context, email: str, as_json: bool) -> None:
    """Test connection for a user (green or red, step by step); sends no mail."""
    with handled():
        crm = ctx.crm(check_users=False)
        with crm.transaction() as session:
            user = directory.find_user(session, email)
            account = crm.sender_account(session, user)
        report = crm.test_connection(account)
    if as_json:
        emit_json(
            {
                "ok": report.ok,
                "transport": report.transport,
                "summary": report.summary,
                "steps": [
                    {"name": s.name, "status": s.status.value, "detail": s.detail, "fix": s.fix}
                    for s in report.steps
                ],
            }
        )
    else:
        print_report(report)
    if not report.ok:
        sys.exit(EXIT_FAILED)


@main.command()
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
    from pathlib import Path

    from crm_core.demo import DEMO_PERSON, DEMO_USER, run_demo

    with handled():
        result = run_demo(Path(folder))
    base = result.folder
    click.echo(f"Demo installation in {base}/ (config {result.config}, database {base}/crm.db)")
    click.echo("  product lines: commercial, sales, rentals, boplats (see `crm plugins`)")
    click.echo(f"  user:   {DEMO_USER[1]} <{DEMO_USER[0]}> ({DEMO_USER[2]}, sends via maildir)")
    click.echo(f"  person: {DEMO_PERSON[1]} <{DEMO_PERSON[0]}>")
    click.echo(f"Sent outbox #{result.outbox_id} {result.message_id}: {result.state}")
    if result.landed is None:
        fail("the mail did not land in the Maildir; see `crm outbox show`", EXIT_FAILED)
    click.echo(f"It landed in {result.landed}")
    click.echo("Look around:")
    for command in (
        "outbox list",
        f"outbox show {result.outbox_id}",
        f"persons show {DEMO_PERSON[0]}",
        f"users show {DEMO_USER[0]}",
    ):
        click.echo(f"  .venv/bin/crm --config {result.config} {command}")


@main.group("secrets")
def secrets_group() -> None:
    """The key that encrypts stored secrets."""


@secrets_group.command("rotate")
@pass_ctx
def secrets_rotate(ctx: Context) -> None:
    """Re-encrypt every stored secret with a new key.

    With a key file: a new key is generated, written first in the file, every secret
    re-encrypted, then the old key removed. With CRM_SECRET_KEY="new,old": secrets are
    re-encrypted with "new"; remove "old" from the variable afterwards.
    """
    from crm_core.secret_box import KEY_ENV, SecretBox, load_keys, replace_key_file
    from crm_core.settings import rotate_secrets

    with handled():
        crm = ctx.crm(check_users=False)
        key_file = crm.config.key_file
        from_env = bool(crm.environ.get(KEY_ENV, "").strip())
        keys = load_keys(key_file, crm.environ)
        if not from_env:
            assert key_file is not None
            keys = replace_key_file(key_file, keys, add_new=True)
        with crm.transaction() as session:
            count = rotate_secrets(session, SecretBox(keys))
        if not from_env:
            assert key_file is not None
            replace_key_file(key_file, keys[:1], add_new=False)
    where = f"{KEY_ENV} (now remove the old keys from it)" if from_env else str(key_file)
    click.echo(f"Re-encrypted {count} secret(s) with the new key in {where}.")


def _register_mail_commands() -> None:
    """Add ``send`` and ``outbox`` (they live with the outbox, in crm_core.mail)."""
    from crm_core.mail import commands

    commands.register(main)


_register_mail_commands()
