"""Plugins per product line: allow-list, blocked before import, start-up checks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from crm_core import ConfigError, PluginError, SettingField, TransportSpec, hookimpl
from crm_core.config import ProductLineConfig
from crm_core.fields import Scope
from crm_core.plugins import installed_plugins, make_plugin_manager
from tests.conftest import CliResult, CrmFactory

PROBE = """
import json, sys
from crm_core.app import Crm
crm = Crm.open(sys.argv[1])
line = sys.argv[2]
transports = sorted(crm.transports(line))
fields = sorted(name for name, plugin in crm.plugin_manager(line).list_name_plugin()
                if plugin is not None)  # blocked names are listed with None
print(json.dumps({"transports": transports, "plugins": fields,
                  "modules": sorted(m for m in ("exchangelib", "msal", "exchange_mail",
                                                "smtp_mail", "maildir_mail") if m in sys.modules)}))
"""


def probe(tmp_path: Path, config: str, line: str) -> dict[str, list[str]]:
    """Build one product line's plugin manager in a fresh interpreter; report imports."""
    path = tmp_path / "crm.toml"
    path.write_text(config, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), line],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    result: dict[str, list[str]] = json.loads(out)
    return result


ONLY_BOPLATS = """
[product_lines.boplats]
plugins = ["smtp_mail"]
default_transport = "smtp"
"""

BOTH = """
[product_lines.boplats]
plugins = ["smtp_mail"]
default_transport = "smtp"
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "exchange"
"""


def test_blocked_plugin_is_never_imported(tmp_path: Path) -> None:
    seen = probe(tmp_path, ONLY_BOPLATS, "boplats")
    assert seen["transports"] == ["smtp"]
    assert "exchange_mail" not in seen["plugins"]
    assert not {"exchangelib", "msal", "exchange_mail", "maildir_mail"} & set(seen["modules"])
    assert "smtp_mail" in seen["modules"]


def test_enabled_plugin_is_loaded_for_its_product_line(tmp_path: Path) -> None:
    seen = probe(tmp_path, BOTH, "commercial")
    assert seen["transports"] == ["exchange", "smtp"]
    assert "exchange_mail" in seen["modules"]


def test_make_plugin_manager_blocks_every_unlisted_plugin() -> None:
    pm = make_plugin_manager(ProductLineConfig("boplats", ("maildir_mail",), "maildir"))
    for name in installed_plugins():
        assert pm.is_blocked(name) is (name != "maildir_mail")
    assert pm.has_plugin("maildir_mail")


def test_unlisted_extra_plugin_is_not_registered() -> None:
    class Extra:
        @hookimpl
        def register_transports(self) -> list[TransportSpec]:
            return [TransportSpec("extra", "Extra")]

    line = ProductLineConfig("sales", ("maildir_mail",), "maildir")
    pm = make_plugin_manager(line, extra=[("extra_mail", Extra())])
    assert not pm.has_plugin("extra_mail")


def test_a_hook_name_typo_stops_start_up() -> None:
    class Typo:
        @hookimpl
        def send_mails(self) -> None:  # not a hook
            return None

    line = ProductLineConfig("sales", ("typo",), "maildir")
    with pytest.raises(PluginError, match="send_mails"):
        make_plugin_manager(line, extra=[("typo", Typo())])


def test_default_transport_not_offered_stops_start_up(make_crm: CrmFactory) -> None:
    config = "[product_lines.boplats]\nplugins=['smtp_mail']\ndefault_transport='exchange'\n"
    with pytest.raises(ConfigError) as info:
        make_crm(config)
    message = str(info.value)
    assert "product_lines.boplats.default_transport" in message
    assert "'exchange'" in message and "offer: smtp" in message


def test_two_plugins_offering_one_transport_stop_start_up(make_crm: CrmFactory) -> None:
    class Clash:
        @hookimpl
        def register_transports(self) -> list[TransportSpec]:
            return [TransportSpec("maildir", "Another maildir")]

    config = (
        "[product_lines.sales]\nplugins=['maildir_mail','clash']\ndefault_transport='maildir'\n"
    )
    with pytest.raises(PluginError, match="offered by both"):
        make_crm(config, extra_plugins=(("clash", Clash()),))


def test_conflicting_setting_declarations_stop_start_up(make_crm: CrmFactory) -> None:
    class Clash:
        @hookimpl
        def register_settings(self) -> list[SettingField]:
            return [SettingField("maildir.path", Scope.USER, "Other")]

    config = (
        "[product_lines.sales]\nplugins=['maildir_mail','clash']\ndefault_transport='maildir'\n"
    )
    with pytest.raises(PluginError, match="declared by both"):
        make_crm(config, extra_plugins=(("clash", Clash()),))


def test_wrong_return_type_is_a_plugin_error(make_crm: CrmFactory) -> None:
    class Sloppy:
        @hookimpl
        def register_transports(self) -> object:
            return {"name": "dict-not-spec"}

    config = (
        "[product_lines.sales]\nplugins=['maildir_mail','sloppy']\ndefault_transport='maildir'\n"
    )
    with pytest.raises(PluginError, match="list of TransportSpec"):
        make_crm(config, extra_plugins=(("sloppy", Sloppy()),))


def test_user_on_a_transport_the_line_does_not_enable_stops_start_up(
    make_crm: CrmFactory, run_crm: Callable[..., CliResult]
) -> None:
    wide = (
        "[product_lines.sales]\nplugins=['smtp_mail','maildir_mail']\ndefault_transport='maildir'\n"
    )
    crm = make_crm(wide)
    from crm_core import directory

    with crm.transaction() as session:
        user = directory.add_user(session, "ella@example.se", "Ella", "sales")
        crm.set_user_setting(session, user, "mail.transport", "smtp")
    narrow = "[product_lines.sales]\nplugins=['maildir_mail']\ndefault_transport='maildir'\n"
    make_crm(narrow, init=False)  # rewrites crm.toml
    result = run_crm("outbox", "list", env=make_crm.env)
    assert result.code == 2
    assert "ella@example.se" in result.stderr
    assert "mail.transport 'smtp' is not enabled for product line 'sales'" in result.stderr
    assert "crm.toml" in result.stderr
    fix = "crm users set ella@example.se mail.transport maildir"
    assert f"(fix: {fix}, or enable it in " in result.stderr
    typed = run_crm(*fix.split()[1:], env=make_crm.env)  # the hint works as typed
    assert typed.code == 0, typed.output
    assert run_crm("outbox", "list", env=make_crm.env).code == 0


def test_choosing_a_transport_the_line_does_not_offer_is_refused(make_crm: CrmFactory) -> None:
    crm = make_crm(
        "[product_lines.boplats]\nplugins=['maildir_mail']\ndefault_transport='maildir'\n"
    )
    from crm_core import SettingValueError, directory

    with crm.transaction() as session:
        user = directory.add_user(session, "bo@example.se", "Bo", "boplats")
    with (
        pytest.raises(SettingValueError, match="not enabled for product line 'boplats'"),
        crm.transaction() as session,
    ):
        crm.set_user_setting(session, user, "mail.transport", "exchange")
