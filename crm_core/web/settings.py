"""System settings (Settings → General settings → System settings), for administrators.

Why nothing here names a field: every control is rendered from the fields the core and
the plugins declare (type, label, help, secret), grouped by plugin, so a third-party
transport gets its System settings without HTML of its own. Saving runs every changed
field through ``Crm.set_system_setting`` in one transaction: all are saved or none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from crm_core.fields import Scope, SettingField
from crm_core.settings import SaveOutcome
from crm_core.web.auth import actor, admin_only
from crm_core.web.i18n import _
from crm_core.web.screens import NavItem
from crm_core.web.setting_forms import (
    Change,
    Group,
    Refused,
    change_for,
    reentry_notes,
    rows,
    save_all,
    submitted_value,
    typed_values,
)

if TYPE_CHECKING:
    from crm_core.app import Crm

bp = Blueprint("settings", __name__, url_prefix="/settings")
NAV = (NavItem("settings.system_page", "System settings", admin=True),)

ORDER = ("exchange_mail", "entra", "smtp_mail", "crm_core")
"""The guide's plugins first (Exchange, its OAuth codes, SMTP), then the core's, then
any other plugin's, by name."""


def system_fields() -> list[SettingField]:
    """Every system-scope field, in declaration order."""
    return [f for f in g.crm.settings_fields().values() if f.scope is Scope.SYSTEM]


def group_titles() -> dict[str, str]:
    """Headings of the known plugins' groups; another plugin's group is titled by
    the transports it offers (else its name)."""
    return {
        "exchange_mail": _("Exchange"),
        "entra": _("Exchange OAuth authentication"),
        "smtp_mail": _("SMTP"),
        "crm_core": _("General"),
    }


def plugin_title(plugin: str) -> str:
    """A heading for a plugin the screen does not know: its transports' labels."""
    labels = {
        spec.label
        for line in g.crm.config.product_lines
        for spec in g.crm.transports(line).values()
        if spec.plugin == plugin
    }
    return ", ".join(_(label) for label in sorted(labels)) or plugin


def by_plugin(specs: Iterable[SettingField]) -> list[tuple[str, list[SettingField]]]:
    """The fields grouped by the plugin that declares them, in :data:`ORDER`."""
    groups: dict[str, list[SettingField]] = {}
    for spec in specs:
        groups.setdefault(spec.plugin or "crm_core", []).append(spec)
    known = [p for p in ORDER if p in groups]
    others = sorted(p for p in groups if p not in ORDER)
    return [(plugin, groups[plugin]) for plugin in known + others]


def render_page(typed: Mapping[str, str], errors: Mapping[str, str]) -> str:
    """The screen: what stops sending, advice, and every field in its group."""
    crm = g.crm
    store = crm.settings_store()
    with crm.transaction() as session:
        views = {v.key: v for v in store.describe_system(session)}
        notices = crm.check_settings(session, Scope.SYSTEM, None)
        found = store.resolve(session)  # secrets withheld since their destination moved
        problems = crm.installation_problems(found.system, found.reenter)
    titles = group_titles()
    groups = [
        Group(
            titles.get(plugin) or plugin_title(plugin),
            rows(specs, views, typed, errors, notices),
            anchor=f"group-{plugin}",
        )
        for plugin, specs in by_plugin(system_fields())
    ]
    labels = {spec.key: spec.label for spec in system_fields()}
    return render_template(
        "settings/system.html",
        groups=groups,
        errors=errors,
        labels=labels,
        problems=problems,
        notices=notices,
    )


@bp.get("/")
@admin_only
def system_page() -> str:
    """The System settings form."""
    return render_page({}, {})


@bp.post("/")
@admin_only
def system_save() -> Response | tuple[str, int]:
    """Save every changed field in one transaction; a refusal saves nothing. The
    answer says which saved secrets this save withheld until they are entered again."""
    crm: Crm = g.crm
    specs = system_fields()
    try:
        with crm.transaction() as session:
            views = {v.key: v for v in crm.settings_store().describe_system(session)}
            found = (change_for(s, views[s.key], form_value(s)) for s in specs)
            changes = [c for c in found if c is not None]

            def apply(change: Change) -> SaveOutcome | None:
                if change.raw is None:
                    crm.unset_system_setting(session, change.key, actor=actor())
                    return None
                return crm.set_system_setting(session, change.key, change.raw, actor=actor())

            outcomes = save_all(session, changes, apply)
    except Refused as refused:
        return render_page(typed_values(request.form, specs), refused.errors), 400
    if changes:
        flash(_("System settings saved ({count} changed).", count=len(changes)))
    else:
        flash(_("Nothing was changed."))
    for note in reentry_notes(outcomes, changes, crm.settings_fields()):
        flash(note)
    return redirect(url_for("settings.system_page"))


def form_value(spec: SettingField) -> str | None:
    """What this request's form sent for ``spec`` (a chosen file for a certificate)."""
    return submitted_value(request.form, request.files, spec)
