"""Which screens the web app has: one module (a Flask blueprint) per screen.

Why one list: the screens grow side by side, each in a module of its own with its
templates under ``templates/<screen>/`` and its Swedish strings in
``translations/sv/<screen>.po``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from flask import Flask, g, url_for

from crm_core.web.i18n import _


@dataclass(frozen=True)
class NavItem:
    """A link in the page header: a screen's start page, maybe for administrators only."""

    endpoint: str
    label: str
    admin: bool = False


def modules() -> tuple[ModuleType, ...]:
    """Every screen module (each has ``bp`` and may have ``NAV``)."""
    from crm_core.web import audit_log, outbox, persons, settings, users

    return (persons, outbox, users, settings, audit_log)


def development_modules(app: Flask) -> tuple[ModuleType, ...]:
    """Screens only some apps have: the mail catcher's, when it has a folder."""
    if not app.config.get("CATCHER_FOLDER"):
        return ()
    from crm_core.web import catcher

    return (catcher,)


def register(app: Flask) -> None:
    """Add every screen's blueprint to ``app``, and the header's links."""
    chosen = (*modules(), *development_modules(app))
    items = [item for module in chosen for item in getattr(module, "NAV", ())]
    for module in chosen:
        app.register_blueprint(module.bp)

    def nav_items() -> list[dict[str, str]]:
        admin = g.user is not None and g.user.role == "admin"
        return [
            {"url": url_for(item.endpoint), "label": _(item.label)}
            for item in items
            if admin or not item.admin
        ]

    app.jinja_env.globals["nav_items"] = nav_items
