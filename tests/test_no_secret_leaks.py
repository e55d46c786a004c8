"""No secret value ever appears in CLI output, a log record or an exception's text.

The secrets are set through the real `crm` command; then every read path and a set of
failing paths are run at DEBUG log level, and everything they print is scanned.
Transport-specific paths (SMTP AUTH, Exchange tokens) have their own scans in
test_smtp_secrets.py and test_exchange_*.py.
"""

from __future__ import annotations

import logging
import traceback

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from crm_core import directory
from crm_core.cli import main
from crm_core.fields import Scope
from crm_core.keyring import KeyRing
from crm_core.settings import SettingsStore
from tests.conftest import CrmFactory

CLIENT_SECRET = "Kq8~vT.client-secret-VALUE-5c1f0e9a"
USER_PASSWORD = "hunter2-Lösenord-äö!"
CONFIG = """
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "exchange"
"""
SECRETS = (CLIENT_SECRET, USER_PASSWORD)


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret value leaked"
    # Also no fragment long enough to be useful (the first 8 characters).
    for secret in SECRETS:
        assert secret[:8] not in text


def test_cli_never_prints_a_secret(make_crm: CrmFactory) -> None:
    make_crm(CONFIG)
    runner = CliRunner(env={**make_crm.env, "PW": USER_PASSWORD})
    outputs = []

    def crm(*args: str, input: str | None = None) -> None:
        # In-process for speed; test_smtp_cli.py and others run the real subprocess.
        result = runner.invoke(main, ["-vv", *args], input=input)
        outputs.append(result.output + (result.stderr if result.stderr_bytes else ""))
        if result.exception and not isinstance(result.exception, SystemExit):
            outputs.append("".join(traceback.format_exception(result.exception)))

    crm("settings", "set", "exchange.url", "https://127.0.0.1:9/EWS/Exchange.asmx")
    crm("settings", "set", "exchange.client_id", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0")
    crm("settings", "set", "exchange.tenant_id", "contoso.onmicrosoft.com")
    crm("settings", "set", "exchange.authority", "https://127.0.0.1:9")
    crm("settings", "set", "exchange.client_secret", input=CLIENT_SECRET + "\n")
    crm("settings", "set", "exchange.client_secret", CLIENT_SECRET)  # refused: in `ps`
    crm("settings", "set", "exchange.client_secret", input=CLIENT_SECRET + "\n")  # unchanged
    crm("settings", "set", "exchange.client_secret", input="\n")  # kept
    crm("users", "add", "anna@contoso.se", "--name", "Anna", "--product-line", "commercial")
    crm("users", "set", "anna@contoso.se", "smtp.password", input=USER_PASSWORD + "\n")
    crm("users", "set", "anna@contoso.se", "exchange.password", USER_PASSWORD)  # refused
    crm("users", "set", "anna@contoso.se", "exchange.password", "--value-from-env", "PW")
    crm("users", "set", "anna@contoso.se", "exchange.username", "anna@contoso.se")
    crm("users", "set", "anna@contoso.se", "exchange.sync", "true")
    crm("settings", "show")
    crm("settings", "show", "--json")
    crm("users", "show", "anna@contoso.se")
    crm("users", "show", "anna@contoso.se", "--json")
    crm("users", "list", "--json")
    crm("plugins", "--json")
    crm("test-connection", "anna@contoso.se")  # red: nothing listens on port 9
    crm("test-connection", "anna@contoso.se", "--json")
    crm(
        "send",
        "--from",
        "anna@contoso.se",
        "--to",
        "per@example.com",
        "--subject",
        "Hej",
        "--body",
        "Hej",
        "--dry-run",
    )
    crm(
        "send",
        "--from",
        "anna@contoso.se",
        "--to",
        "per@example.com",
        "--subject",
        "Hej",
        "--body",
        "Hej",
    )
    crm("outbox", "work", "--once")
    crm("outbox", "list", "--json")
    crm("outbox", "show", "1")
    crm("secrets", "rotate")
    crm("settings", "show", "--json")
    joined = "\n".join(outputs)
    assert "saved" in joined and " INFO " in joined  # the scan saw real output and logs
    assert_clean(joined)


def test_logs_and_exceptions_never_carry_a_secret(
    make_crm: CrmFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    crm = make_crm(CONFIG)
    texts: list[str] = []
    with crm.transaction() as session:
        crm.set_system_setting(session, "exchange.client_secret", CLIENT_SECRET)
        user = directory.add_user(session, "anna@contoso.se", "Anna", "commercial")
        crm.set_user_setting(session, user, "smtp.password", USER_PASSWORD)
        account = crm.sender_account(session, user)
        texts += [repr(account), str(account.system), repr(account.user)]
        texts += [repr(crm.settings_store().system_values(session))]
        texts += [repr(v.as_dict()) for v in crm.settings_store().describe_system(session)]
        texts += [repr(n) for n in crm.check_settings(session, Scope.USER, user)]
    # A secret key that does not match: what is said of it must not quote the clear text.
    wrong = KeyRing(lambda: [Fernet.generate_key()])
    with crm.transaction() as session:
        store = SettingsStore(crm.settings_fields(), wrong)
        found = store.resolve(session, user.id)
        assert found.unreadable == {"exchange.client_secret", "smtp.password"}
        texts += [repr(found), *store.unreadable_secrets(session)]
    # A failing connection test and send, with every library logging at DEBUG.
    report = crm.test_connection(account)
    texts.append(repr(report))
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.args) for r in caplog.records]
    joined = "\n".join(texts)
    assert "Secret('********')" in joined
    assert_clean(joined)
