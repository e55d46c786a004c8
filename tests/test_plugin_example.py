"""docs/plugins.md is the contract: its example plugin runs, its tables match the code.

The example plugin is taken from the document as written and driven through the real
outbox against a local HTTP server, so the guide cannot drift from what works.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from crm_core import directory, signals
from crm_core.app import Crm
from crm_core.errors import SettingValueError
from crm_core.mail import enqueue
from crm_core.mail.transport import ConnectionReport
from crm_core.mail.worker import Worker
from crm_core.models import AccountPause, OutboxMessage
from tests.conftest import CrmFactory

REPO = Path(__file__).resolve().parent.parent
DOCS = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")


def example_source() -> str:
    """The code block of section 4, the complete example plugin."""
    section = DOCS.split("## 4. A complete example plugin", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "docs/plugins.md lost its example plugin"
    return found.group(1)


def load_example(tmp_path: Path) -> ModuleType:
    path = tmp_path / "acme_mail.py"
    path.write_text(example_source(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("acme_mail_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Acme:
    """A local stand-in of the ACME API: records what it was given, answers as told."""

    status: int = 202
    posts: list[tuple[str, bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def acme() -> Iterator[Acme]:
    state = Acme()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.posts.append((self.headers.get("Authorization", ""), body))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == "Bearer k-123"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/send"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


CONFIG = """
[product_lines.rentals]
plugins = ["smtp_mail", "acme_mail"]
default_transport = "acme"
"""


def test_the_example_plugin_sends_through_the_outbox(
    make_crm: CrmFactory, tmp_path: Path, acme: Acme
) -> None:
    crm = make_crm(CONFIG, extra_plugins=(("acme_mail", load_example(tmp_path)),))
    with crm.transaction() as session:
        user = directory.add_user(session, "anna@example.se", "Anna", "rentals")
        crm.set_system_setting(session, "acme.url", acme.url)
        crm.set_user_setting(session, user, "acme.api_key", "k-123")
    assert _report(crm).summary == "Connected to ACME"
    _queue(crm)
    assert Worker(crm).run_once().sent == 1
    [(auth, body)] = acme.posts
    assert auth == "Bearer k-123" and b"Subject: Hej Per" in body
    with crm.transaction() as session:
        row = session.query(OutboxMessage).one()
        assert row.state == "sent" and row.message_id.encode() in body

    acme.status = 401  # a revoked key pauses the account and keeps the mail
    _queue(crm)
    assert Worker(crm).run_once().deferred == 1
    with crm.transaction() as session:
        assert session.get(AccountPause, user.id) is not None


def test_the_example_plugin_refuses_a_key_over_plain_http(
    make_crm: CrmFactory, tmp_path: Path
) -> None:
    crm = make_crm(CONFIG, extra_plugins=(("acme_mail", load_example(tmp_path)),))
    with crm.transaction() as session:
        user = directory.add_user(session, "anna@example.se", "Anna", "rentals")
        crm.set_user_setting(session, user, "acme.api_key", "k-123")
        crm.set_system_setting(session, "acme.url", "http://localhost:9/send")  # development
    with pytest.raises(SettingValueError) as refused, crm.transaction() as session:
        crm.set_system_setting(session, "acme.url", "http://api.acme.example/send")
    assert str(refused.value) == (
        "Invalid value for acme.url: the API key would travel unencrypted; use https "
        "(crm settings set acme.url)"
    )
    with crm.transaction() as session:
        account = crm.sender_account(session, user)
    remote = replace(account, system={**account.system, "acme.url": "http://acme.example/"})
    [problem] = crm.sender_problems(remote)
    assert crm.test_connection(remote).steps[0].detail == problem.message


def _queue(crm: Crm) -> None:
    request = enqueue.MailRequest("anna@example.se", ["per@example.com"], "Hej Per", "Hej!")
    with crm.transaction() as session:
        enqueue.enqueue(crm, session, request)


def _report(crm: Crm) -> ConnectionReport:
    with crm.transaction() as session:
        account = crm.sender_account(session, directory.find_user(session, "anna@example.se"))
    return crm.test_connection(account)


def test_the_example_imports_only_the_public_plugin_api() -> None:
    assert _core_imports(ast.parse(example_source())) == {"crm_core.plugin_api"}


def _core_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "crm_core"}


@pytest.mark.parametrize("plugin", ["exchange_mail", "smtp_mail", "maildir_mail"])
def test_bundled_plugins_import_only_the_public_plugin_api(plugin: str) -> None:
    private = {}
    for path in sorted((REPO / "plugins" / plugin).glob("*.py")):
        imports = _core_imports(ast.parse(path.read_text(encoding="utf-8")))
        if imports - {"crm_core.plugin_api"}:
            private[path.name] = sorted(imports - {"crm_core.plugin_api"})
    assert private == {}, f"{plugin} imports private core modules: {private}"


def test_plugin_api_is_sorted_and_complete() -> None:
    from crm_core import plugin_api

    # Sorted as ruff's RUF022 sorts it: constants, then classes, then functions.
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert plugin_api.__all__ == sorted(plugin_api.__all__, key=kind)
    for name in plugin_api.__all__:
        assert getattr(plugin_api, name) is not None
    for name in ("hookimpl", "SettingField", "SendResult", "Outcome", "Problem", "TokenError"):
        assert name in plugin_api.__all__


def test_the_signal_table_matches_the_payloads_the_core_sends() -> None:
    table = DOCS.split("## 3. Signals", 1)[1].split("```", 1)[0]
    documented = {
        m.group(1): tuple(re.findall(r"`(\w+)`", m.group(2)))
        for m in re.finditer(r"^\| `([\w-]+)` \| (.*) \|$", table, re.M)
    }
    assert documented == dict(signals.PAYLOADS)
    assert set(documented) == set(signals.all_signal_names())


def test_the_hook_table_names_every_hook_with_its_arguments() -> None:
    import inspect

    from crm_core import hookspecs

    table = DOCS.split("## 2. The hooks", 1)[1].split("### ", 1)[0]
    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", table, re.M)
    names = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "crm_core_spec"))
    assert sorted(name for name, _ in rows) == names
    for name, args in rows:
        spec = inspect.signature(getattr(hookspecs, name))
        assert args == ", ".join(spec.parameters), name
