"""Every hook, exercised through the Crm's typed callers with an in-test plugin.

The meta-tests at the bottom fail if a hook is added without a ``test_hook_<name>``
here or without its signature in docs/plugins.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crm_core import (
    ConnectionReport,
    ConnectionStep,
    Crm,
    MailboxLimits,
    Outcome,
    OutgoingMessage,
    PluginError,
    Problem,
    ReconcileResult,
    Resources,
    RouteInfo,
    SenderAccount,
    SendResult,
    SettingField,
    SettingNotice,
    SettingValueError,
    StepStatus,
    TransportSpec,
    ValidationError,
    directory,
    hookimpl,
    hookspecs,
)
from crm_core.fields import Scope
from crm_core.mail import pacing
from crm_core.mail.addresses import Address
from crm_core.mail.message import Attachment
from crm_core.models import utcnow
from crm_core.signals import user_settings_changed as user_settings_changed_signal
from tests.conftest import CrmFactory

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
[product_lines.sales]
plugins = ["probe_mail"]
default_transport = "probe"
"""


class ProbeMail:
    """A complete in-test transport that records how the core calls it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.veto = False

    @hookimpl
    def register_transports(self) -> list[TransportSpec]:
        return [TransportSpec("probe", "Send via probe")]

    @hookimpl
    def register_settings(self) -> list[SettingField]:
        return [
            SettingField("probe.server", Scope.SYSTEM, "Server", required_for="probe"),
            SettingField("probe.account", Scope.USER, "Account"),
        ]

    @hookimpl
    def check_settings(self, system: dict[str, object]) -> list[SettingNotice]:
        if system.get("probe.server") == "old.example":
            return [SettingNotice("probe.server", "warning", "old.example is retiring")]
        return []

    @hookimpl
    def sending_problems(self, account: SenderAccount) -> list[Problem]:
        self.calls.append(("sending_problems", account.email))
        if account.get_str("probe.account") == "bad":
            fix = f"crm users set {account.email} probe.account good"
            return [Problem("probe.account", "account 'bad' is not allowed", fix)]
        return []

    @hookimpl
    def user_settings_changed(
        self, account: SenderAccount, changed: Sequence[str], resources: Resources
    ) -> None:
        self.calls.append(("user_settings_changed", (account.email, tuple(changed))))
        if self.veto:
            raise ValidationError("vetoed by probe")

    @hookimpl
    def system_settings_changed(self, changed: Sequence[str], resources: Resources) -> None:
        self.calls.append(("system_settings_changed", tuple(changed)))
        resources.discard(("probe",))

    @hookimpl
    def send_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
    ) -> list[SendResult]:
        conn = resources.get_or_create(("probe", account.key), lambda: object())
        self.calls.append(("send_mail", (account.email, len(messages), id(conn))))
        return [SendResult(m.message_id, Outcome.SENT) for m in messages]

    @hookimpl
    def test_connection(
        self, account: SenderAccount, problems: Sequence[Problem]
    ) -> ConnectionReport:
        self.calls.append(("test_connection", tuple(problems)))
        server = account.get_str("probe.server")
        status = StepStatus.OK if server else StepStatus.FAILED
        return ConnectionReport(
            "probe", "Connected to probe", (ConnectionStep("server", status, server or "not set"),)
        )

    @hookimpl
    def reconcile_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage]
    ) -> list[ReconcileResult]:
        return [ReconcileResult(m.message_id, True, "found") for m in messages]

    @hookimpl
    def message_problems(self, message: OutgoingMessage) -> list[Problem]:
        big = [a.filename for a in message.attachments if len(a.data) > 10]
        return [Problem(f"attachment {name!r}", "is over the probe's 10 bytes") for name in big]

    @hookimpl
    def describe_route(self, account: SenderAccount) -> RouteInfo:
        return RouteInfo("probe", account.get_str("probe.server"), account.email)

    @hookimpl
    def mailbox_limits(self, account: SenderAccount) -> MailboxLimits:
        return MailboxLimits(f"probe:{account.email}", per_minute=7, connections=2)


@pytest.fixture
def probe() -> ProbeMail:
    return ProbeMail()


@pytest.fixture
def crm(make_crm: CrmFactory, probe: ProbeMail) -> Crm:
    return make_crm(CONFIG, extra_plugins=(("probe_mail", probe),))


def add_user(crm: Crm) -> SenderAccount:
    with crm.transaction() as session:
        user = directory.add_user(session, "anna@example.se", "Anna", "sales")
        crm.set_system_setting(session, "probe.server", "mx.example")
        return crm.sender_account(session, user)


def message(n: int = 1) -> OutgoingMessage:
    return OutgoingMessage(
        outbox_id=n,
        message_id=f"<m{n}@example.se>",
        sender=Address("anna@example.se"),
        to=(Address("per@example.com"),),
        subject="Hej",
        text="Hej Per",
    )


def test_hook_register_transports(crm: Crm) -> None:
    transports = crm.transports("sales")
    assert list(transports) == ["probe"]
    assert transports["probe"].plugin == "probe_mail"
    assert transports["probe"].label == "Send via probe"


def test_hook_register_settings(crm: Crm) -> None:
    fields = crm.settings_fields()
    assert fields["probe.server"].plugin == "probe_mail"
    assert fields["probe.account"].scope is Scope.USER
    assert "mail.transport" in fields  # the core's own


def test_hook_check_settings(crm: Crm) -> None:
    add_user(crm)
    with crm.transaction() as session:
        crm.set_system_setting(session, "probe.server", "old.example")
        notices = crm.check_settings(session, Scope.SYSTEM, None)
    assert [n.message for n in notices] == ["old.example is retiring"]
    with crm.transaction() as session:  # advice never refuses a save
        crm.set_system_setting(session, "probe.server", "old.example")


def test_hook_sending_problems(crm: Crm, probe: ProbeMail) -> None:
    account = add_user(crm)
    assert crm.sender_problems(account) == []
    with (
        pytest.raises(SettingValueError, match="'bad' is not allowed") as refused,
        crm.transaction() as session,
    ):
        user = directory.find_user(session, account.email)
        crm.set_user_setting(session, user, "probe.account", "bad")
    assert "crm users set anna@example.se probe.account good" in str(refused.value)
    # The same answer reaches Test connection, and a send never gets to the plugin.
    bad = replace(account, user={"probe.account": "bad"})
    crm.test_connection(bad)
    assert probe.calls[-1] == ("test_connection", tuple(crm.sender_problems(bad)))
    results = crm.send_mail(bad, [message(1)])
    assert [r.outcome for r in results] == [Outcome.CONFIGURATION]
    assert "'bad' is not allowed" in results[0].detail
    assert not [c for c in probe.calls if c[0] == "send_mail"]
    # The core's own rule comes first: a required field that is not set.
    unset = replace(account, system={})
    assert [str(p) for p in crm.sender_problems(unset)] == [
        "probe.server: Server is not set (fix: crm settings set probe.server)"
    ]


def test_hook_user_settings_changed(crm: Crm, probe: ProbeMail) -> None:
    add_user(crm)
    heard: list[dict[str, object]] = []

    def receiver(sender: object, **extra: object) -> None:
        heard.append(extra)

    with user_settings_changed_signal.connected_to(receiver):
        with crm.transaction() as session:
            user = directory.find_user(session, "anna@example.se")
            crm.set_user_setting(session, user, "probe.account", "anna")
            user_id = user.id
            assert heard == []  # signals wait for the commit
        assert heard and heard[0]["keys"] == ["probe.account"]
        probe.veto = True
        with pytest.raises(ValidationError, match="vetoed"), crm.transaction() as session:
            user = directory.find_user(session, "anna@example.se")
            crm.set_user_setting(session, user, "probe.account", "someone-else")
    assert len(heard) == 1  # the vetoed change was rolled back and never announced
    with crm.transaction() as session:
        values = crm.settings_store().user_values(session, user_id)
    assert values["probe.account"] == "anna"
    assert ("user_settings_changed", ("anna@example.se", ("probe.account",))) in probe.calls


def test_hook_system_settings_changed(crm: Crm, probe: ProbeMail) -> None:
    add_user(crm)
    assert ("system_settings_changed", ("probe.server",)) in probe.calls


def test_hook_send_mail(crm: Crm, probe: ProbeMail) -> None:
    account = add_user(crm)
    results = crm.send_mail(account, [message(1), message(2)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    crm.send_mail(account, [message(3)])
    sends = [c for c in probe.calls if c[0] == "send_mail"]
    assert sends[0][1][1] == 2
    assert sends[0][1][2] == sends[1][1][2]  # the per-Crm Resources kept the "connection"


def test_hook_send_mail_must_answer_for_every_message(make_crm: CrmFactory) -> None:
    class Forgetful(ProbeMail):
        @hookimpl
        def send_mail(  # type: ignore[override]  # answers with fewer arguments on purpose
            self, account: SenderAccount, messages: Sequence[OutgoingMessage]
        ) -> list[SendResult]:
            return [SendResult(messages[0].message_id, Outcome.SENT)]

    crm = make_crm(CONFIG, extra_plugins=(("probe_mail", Forgetful()),))
    account = add_user(crm)
    with pytest.raises(PluginError, match="exactly one for each"):
        crm.send_mail(account, [message(1), message(2)])


def test_hook_test_connection(crm: Crm) -> None:
    account = add_user(crm)
    report = crm.test_connection(account)
    assert report.ok and report.summary == "Connected to probe"


def test_hook_reconcile_mail(crm: Crm) -> None:
    account = add_user(crm)
    found = crm.reconcile_mail(account, [message(1)], utcnow())
    assert found == [ReconcileResult("<m1@example.se>", True, "found")]


def test_hook_message_problems(crm: Crm) -> None:
    account = add_user(crm)
    small = replace(message(1), attachments=(Attachment("a.txt", "text/plain", b"ok"),))
    large = replace(message(2), attachments=(Attachment("b.bin", "text/plain", b"x" * 11),))
    assert crm.message_problems(account, small) == []
    assert crm.message_problems(account, large) == [
        Problem("attachment 'b.bin'", "is over the probe's 10 bytes")
    ]


def test_hook_describe_route(crm: Crm) -> None:
    account = add_user(crm)
    assert crm.describe_route(account) == RouteInfo("probe", "mx.example", "anna@example.se")


def test_hook_mailbox_limits(crm: Crm) -> None:
    account = add_user(crm)
    assert crm.mailbox_limits(account) == MailboxLimits(
        "probe:anna@example.se", per_minute=7, connections=2
    )
    with crm.transaction() as session:
        crm.set_system_setting(session, "mail.rate_per_minute", "0")  # 0: no limit
        user = directory.find_user(session, "anna@example.se")
        crm.set_user_setting(session, user, "mail.max_connections", "5")  # the user's own
        pace = pacing.pace_for(crm, crm.sender_account(session, user))
    assert (pace.mailbox, pace.per_minute, pace.connections) == ("probe:anna@example.se", 0, 5)


def hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "crm_core_spec"))


def test_every_hook_has_a_test() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    missing = [n for n in hook_names() if f"def test_hook_{n}(" not in source]
    assert hook_names() and not missing, f"hooks without test_hook_<name>: {missing}"


def test_every_hook_is_documented_with_its_signature() -> None:
    import inspect

    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    for name in hook_names():
        spec = getattr(hookspecs, name)
        args = ", ".join(inspect.signature(spec).parameters)
        assert f"{name}({args})" in docs, f"docs/plugins.md lacks `{name}({args})`"
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40


def test_public_api_is_sorted_and_complete() -> None:
    import crm_core

    assert crm_core.__all__ == sorted(crm_core.__all__)
    for name in crm_core.__all__:
        assert getattr(crm_core, name) is not None, name
    # Nothing else public is defined in the package itself (names load on first use).
    defined = {n for n in vars(crm_core) if not n.startswith("_")}
    helpers = {"annotations", "importlib", "Any", "TYPE_CHECKING"}
    modules = {n for n in defined if type(getattr(crm_core, n)).__name__ == "module"}
    assert defined - modules - helpers <= set(crm_core.__all__)


def test_docs_name_every_signal() -> None:
    from crm_core.signals import all_signal_names

    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert all(re.search(rf"`{n}`", docs) for n in all_signal_names())
