"""Users: the list, and each user's dialog ("Edit user") with the Basic and E-mail tabs,
and Test connection ("Testa anslutning").

Who may see what, checked on the server for every request: an administrator sees
every user and both tabs; anyone else only their own E-mail tab and its Test
connection (another user's page, any Basic tab and the list give 403). The E-mail tab
is rendered from the fields the plugins of the user's product line declare, grouped by
the transport they serve, so a third-party transport needs no HTML of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from crm_core import audit, directory
from crm_core.errors import Problem, ValidationError
from crm_core.fields import Scope, SettingField
from crm_core.mail.transport import (
    ConnectionReport,
    ConnectionStep,
    StepStatus,
    TransportSpec,
)
from crm_core.models import Role, User
from crm_core.settings import TRANSPORT_KEY, SaveOutcome, SettingView
from crm_core.web.auth import actor, admin_only, is_admin, signed_in
from crm_core.web.i18n import _
from crm_core.web.screens import NavItem
from crm_core.web.setting_forms import (
    Change,
    Group,
    Refused,
    Row,
    change_for,
    reentry_notes,
    rows,
    save_all,
    submitted,
    submitted_value,
    typed_values,
    unset_view,
)

if TYPE_CHECKING:
    from crm_core.app import Crm

bp = Blueprint("users", __name__, url_prefix="/users")
NAV = (
    NavItem("users.list_users", "Users", admin=True),
    NavItem("users.my_email", "My e-mail settings"),
)
BASIC_FIELDS = ("name", "email", "product_line", "role")


# --- who may see what --------------------------------------------------------------


def may_see_email_tab(user_id: int) -> None:
    """An administrator, or the user themselves; anyone else gets 403."""
    if not is_admin() and g.user.id != user_id:
        abort(403)


def load(session: Session, user_id: int) -> User:
    """The user, or 404."""
    user = session.get(User, user_id)
    if user is None:
        abort(404)
    return user


# --- the list ----------------------------------------------------------------------


@bp.get("/")
@admin_only
def list_users() -> str:
    """Every user with their product line, transport, role and whether they can send."""
    crm = g.crm
    found = []
    with crm.transaction() as session:
        for user in directory.list_users(session):
            account, problems = crm.sender_state(session, user)
            transport = account.transport if account else ""
            found.append((user, transport_label(user.product_line, transport), problems))
    return render_template("users/list.html", users=found)


def transport_label(product_line: str, transport: str) -> str:
    """The transport's label as its plugin declares it ("Send via Exchange")."""
    if product_line not in g.crm.config.product_lines:
        return transport
    spec = g.crm.transports(product_line).get(transport)
    return _(spec.label) if spec is not None else transport


@bp.get("/me/email")
@signed_in
def my_email() -> Response:
    """The header's "My e-mail settings": one's own E-mail tab."""
    return redirect(url_for("users.email_page", user_id=g.user.id))


# --- the Basic tab (administrators) ----------------------------------------------------


@bp.get("/<int:user_id>/")
@admin_only
def basic_page(user_id: int) -> str:
    """Name, e-mail (the sender), product line and role."""
    with g.crm.transaction() as session:
        user = load(session, user_id)
    return render_basic(user, {}, {})


def render_basic(user: User, typed: Mapping[str, str], errors: Mapping[str, str]) -> str:
    """The Basic tab, with what was typed and the refusals next to their fields."""
    values = {name: typed.get(name, str(getattr(user, name))) for name in BASIC_FIELDS}
    roles = ((Role.ADMIN.value, _("Administrator")), (Role.USER.value, _("User")))
    return render_template(
        "users/basic.html",
        user=user,
        values=values,
        errors=errors,
        lines=list(g.crm.config.product_lines),
        roles=roles,
        tab="basic",
    )


@bp.post("/<int:user_id>/")
@admin_only
def basic_save(user_id: int) -> Response | tuple[str, int]:
    """Save the Basic tab in one transaction; every refusal next to its field."""
    crm = g.crm
    typed = {name: request.form.get(name, "") for name in BASIC_FIELDS}
    try:
        with crm.transaction() as session:
            user = load(session, user_id)
            before = user.email
            changed = directory.update_user(
                session, user, **typed, product_lines=list(crm.config.product_lines)
            )
            transport_still_enabled(session, user)
            if changed:
                was = f"; e-mail was {before}" if "email" in changed else ""
                audit.record(session, actor(), "user changed", user.email, ", ".join(changed) + was)
    except ValidationError as exc:
        with crm.transaction() as session:
            user = load(session, user_id)
        return render_basic(user, typed, basic_errors(exc.problems)), 400
    flash(_("The user is saved.") if changed else _("Nothing was changed."))
    if user_id == g.user.id and typed["role"] != Role.ADMIN.value:
        return redirect(url_for("users.email_page", user_id=user_id))
    return redirect(url_for("users.basic_page", user_id=user_id))


def transport_still_enabled(session: Session, user: User) -> None:
    """A new product line must offer the transport the user chose (the core's rule):
    a user whose transport is not enabled would stop every worker's start-up."""
    account = g.crm.sender_account(session, user)
    wrong = [p for p in g.crm.sender_problems(account) if p.key == TRANSPORT_KEY]
    if wrong:
        hint = _("First choose a transport that product line offers, on the E-mail tab.")
        raise ValidationError(
            "Invalid user", [Problem("product_line", f"{wrong[0].message}. {hint}")]
        )


def basic_errors(problems: tuple[Problem, ...]) -> dict[str, str]:
    """Problems by field; a problem naming no field of the tab goes with the e-mail."""
    errors: dict[str, str] = {}
    for problem in problems:
        key = problem.key if problem.key in BASIC_FIELDS else "email"
        text = f"{problem.message} ({problem.fix})" if problem.fix else problem.message
        errors[key] = f"{errors[key]}; {text}" if key in errors else text
    return errors


# --- the E-mail tab ------------------------------------------------------------------


@bp.get("/<int:user_id>/email")
@signed_in
def email_page(user_id: int) -> str:
    """The transport choice, the server from the system settings, the user's fields."""
    may_see_email_tab(user_id)
    return render_email(user_id, {}, {}, None)


@bp.post("/<int:user_id>/email")
@signed_in
def email_save(user_id: int) -> Response | tuple[str, int]:
    """Save every changed field in one transaction; a refusal saves nothing."""
    may_see_email_tab(user_id)
    crm: Crm = g.crm
    try:
        with crm.transaction() as session:
            user = load(session, user_id)
            changes = email_changes(session, user)

            def apply(change: Change) -> SaveOutcome | None:
                if change.raw is None:
                    crm.unset_user_setting(session, user, change.key, actor=actor())
                    return None
                return crm.set_user_setting(session, user, change.key, change.raw, actor=actor())

            outcomes = save_all(session, changes, apply)
    except Refused as refused:
        with crm.transaction() as session:
            specs = email_fields(load(session, user_id))
        typed = typed_values(request.form, specs)
        chosen = submitted(request.form, TRANSPORT_KEY)
        if chosen is not None:
            typed[TRANSPORT_KEY] = chosen
        return render_email(user_id, typed, refused.errors, None), 400
    if changes:
        flash(_("E-mail settings saved ({count} changed).", count=len(changes)))
    else:
        flash(_("Nothing was changed."))
    for note in reentry_notes(outcomes, changes, crm.settings_fields()):
        flash(note)
    return redirect(url_for("users.email_page", user_id=user_id))


def email_changes(session: Session, user: User) -> list[Change]:
    """What the submitted E-mail tab changes: the transport, then each field."""
    crm = g.crm
    store = crm.settings_store()
    views = {v.key: v for v in store.describe_user(session, user)}
    changes: list[Change] = []
    chosen = submitted(request.form, TRANSPORT_KEY)
    current = crm.user_transport(store.user_values(session, user.id), user)
    if chosen and chosen != current:
        changes.append(Change(TRANSPORT_KEY, chosen))
    for spec in email_fields(user):
        view = views.get(spec.key) or unset_view(spec)  # an override not made yet
        found = change_for(spec, view, submitted_value(request.form, request.files, spec))
        if found is not None:
            changes.append(found)
    return changes


def email_fields(user: User) -> list[SettingField]:
    """The user-scope fields (and overridable system fields) of the user's plugins."""
    plugins = line_plugins(user)
    return [
        spec
        for spec in g.crm.settings_fields().values()
        if spec.key != TRANSPORT_KEY
        and spec.plugin in plugins
        and (spec.scope is Scope.USER or spec.user_override)
    ]


def line_plugins(user: User) -> set[str]:
    """The plugins of the user's product line (none when it left the configuration)."""
    line = g.crm.config.product_lines.get(user.product_line)
    return {"crm_core", *(line.plugins if line is not None else ())}


def offered(user: User) -> dict[str, TransportSpec]:
    """The transports enabled for the user's product line."""
    crm: Crm = g.crm
    if user.product_line not in crm.config.product_lines:
        return {}
    return crm.transports(user.product_line)


def render_email(
    user_id: int,
    typed: Mapping[str, str],
    errors: Mapping[str, str],
    report: ConnectionReport | None,
) -> str:
    """The E-mail tab: what stops sending, the transport choice, the fields, the ladder."""
    crm = g.crm
    store = crm.settings_store()
    with crm.transaction() as session:
        user = load(session, user_id)
        account, problems = crm.sender_state(session, user)
        views = {v.key: v for v in store.describe_user(session, user)}
        notices = crm.check_settings(session, Scope.USER, user) if account else []
        system = {v.key: v for v in store.describe_system(session)}
    transports = offered(user)
    specs = email_fields(user)
    all_rows = rows(specs, views, typed, errors, notices)
    groups = transport_groups(transports, all_rows)
    labels = {spec.key: spec.label for spec in crm.settings_fields().values()}
    labels[TRANSPORT_KEY] = "Send via"
    return render_template(
        "users/email.html",
        user=user,
        tab="email",
        transports=transports,
        servers=servers(transports, system),
        chosen=typed.get(TRANSPORT_KEY) or (account.transport if account else ""),
        groups=groups,
        problems=problems,
        notices=notices,
        errors=errors,
        labels=labels,
        here={spec.key for spec in specs} | {TRANSPORT_KEY},
        report=report,
    )


def transport_groups(
    transports: Mapping[str, TransportSpec], all_rows: tuple[Row, ...]
) -> list[Group]:
    """One group per transport, headed by its label ("Send via Exchange"): the user's
    fields of its plugin, and the system fields the user may override; then the rest."""
    placed: set[str] = set()
    groups: list[Group] = []
    for name, spec in transports.items():
        mine = [r for r in all_rows if r.spec.plugin == spec.plugin and r.spec.key not in placed]
        placed.update(r.spec.key for r in mine)
        own = tuple(r for r in mine if r.spec.scope is Scope.USER)
        overrides = tuple(r for r in mine if r.spec.scope is not Scope.USER)
        if own or overrides:
            groups.append(Group(_(spec.label), own, anchor=f"group-{name}", extra=overrides))
    rest = tuple(r for r in all_rows if r.spec.key not in placed)
    if rest:
        groups.append(Group(_("Other settings"), rest, anchor="group-other"))
    return groups


def servers(
    transports: Mapping[str, TransportSpec], system: Mapping[str, SettingView]
) -> dict[str, list[SettingView]]:
    """Each transport's system settings that it needs (the Exchange URL, the SMTP
    server): shown on the E-mail tab, not editable there."""
    fields = g.crm.settings_fields().values()
    return {
        name: [
            system[spec.key]
            for spec in fields
            if spec.scope is Scope.SYSTEM and spec.required_for == name and spec.key in system
        ]
        for name in transports
    }


# --- Test connection -------------------------------------------------------------------


@bp.post("/<int:user_id>/test-connection")
@signed_in
def test_connection(user_id: int) -> str:
    """Run the saved settings' ladder (nothing is sent): the ladder alone for app.js,
    else the whole E-mail tab with the ladder filled in."""
    may_see_email_tab(user_id)
    crm = g.crm
    with crm.transaction() as session:
        user = load(session, user_id)
        account, problems = crm.sender_state(session, user)
    report = crm.test_connection(account) if account is not None else unusable(problems)
    if request.headers.get("X-Fragment") == "1":
        return render_template("users/_ladder.html", report=report)
    return render_email(user_id, {}, {}, report)


def unusable(problems: list[Problem]) -> ConnectionReport:
    """The ladder of an account that cannot even be made (its product line is gone)."""
    steps = tuple(ConnectionStep("settings", StepStatus.FAILED, p.message, p.fix) for p in problems)
    return ConnectionReport("", problems[0].message if problems else "", steps)


@bp.app_template_global()
def summary_text(summary: str) -> str:
    """A report's summary in the guide's words where the catalog has them: the whole
    ("Connected to Exchange"), or its head before the cause ("TestConnection error
    Credentials: …"); the cause itself is the plugin's English."""
    whole = _(summary)
    if whole != summary:
        return whole
    head, colon, cause = summary.partition(": ")
    return f"{_(head)}{colon}{cause}" if colon else summary


@bp.app_template_global()
def step_word(status: StepStatus | str) -> str:
    """A step's state as a word (colour is never the only sign)."""
    words = {
        StepStatus.OK: _("OK"),
        StepStatus.WARNING: _("Warning"),
        StepStatus.FAILED: _("Failed"),
        StepStatus.SKIPPED: _("Skipped"),
    }
    return words[StepStatus(status)]
