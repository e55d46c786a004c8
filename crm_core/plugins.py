"""Plugin managers, one per product line, built from an allow-list.

Why per product line and blocked before import: a product line that does not enable
Exchange must never import exchangelib or msal (smaller memory, fewer moving parts,
nothing to patch). pluggy's ``set_blocked`` makes ``load_setuptools_entrypoints``
skip a name *before* ``ep.load()``, so a blocked plugin's module is never imported.

Entry-point name = configuration name = registered name (``exchange_mail``,
``smtp_mail``, ``maildir_mail``), in the entry-point group ``crm_core``.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from crm_core import hookspecs
from crm_core.config import ProductLineConfig
from crm_core.errors import PluginError

ENTRY_POINT_GROUP = "crm_core"


def installed_plugins() -> tuple[str, ...]:
    """Names of every plugin installed in the ``crm_core`` entry-point group."""
    return tuple(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}))


def make_plugin_manager(
    line: ProductLineConfig, extra: Iterable[tuple[str, object]] = ()
) -> pluggy.PluginManager:
    """A fresh plugin manager that loads exactly the plugins ``line`` enables.

    ``extra`` registers in-process plugin objects (name, object), e.g. a plugin an
    application ships inside its own code; they are subject to the same allow-list.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    allowed = set(line.plugins)
    for name in installed_plugins():
        if name not in allowed:
            pm.set_blocked(name)
    for name, plugin in extra:
        if name in allowed:
            pm.register(plugin, name=name)
    for name in line.plugins:
        if pm.has_plugin(name):
            continue
        try:
            loaded = pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} does not match the crm_core hooks: {exc}") from exc
        except ImportError as exc:
            raise PluginError(
                f"plugin {name!r} (product line {line.name}) failed to import: {exc}"
            ) from exc
        if not loaded:
            raise PluginError(
                f"plugin {name!r} enabled for product line {line.name!r} is not installed; "
                f"installed: {', '.join(installed_plugins()) or '(none)'}"
            )
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist: {exc}") from exc
    return pm
