"""The plugin seam: the core calls the owner of an account's transport, and only it.

A third-party transport written the way a newcomer writes it (no ``if
account.transport != ...`` guard anywhere, and even ``tryfirst`` on its send) must
never see another transport's accounts, while an observer plugin that offers no
transport may still wrap every call, because the core keeps pluggy's own calling.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path

import pytest

from crm_core import (
    ConnectionReport,
    ConnectionStep,
    Crm,
    Outcome,
    OutgoingMessage,
    PluginError,
    Problem,
    ReconcileResult,
    RouteInfo,
    SenderAccount,
    SendResult,
    StepStatus,
    TransportSpec,
    directory,
    hookimpl,
)
from crm_core.mail import enqueue
from crm_core.mail.worker import Worker
from crm_core.models import utcnow
from tests.conftest import CrmFactory

CONFIG = """
[product_lines.sales]
plugins = ["pigeon_mail", "maildir_mail", "observer"]
default_transport = "maildir"
"""


class Pigeon:
    """A guard-less third-party transport that records every account it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    @hookimpl
    def register_transports(self) -> list[TransportSpec]:
        return [TransportSpec("pigeon", "Send by carrier pigeon")]

    @hookimpl
    def sending_problems(self, account: SenderAccount) -> list[Problem]:
        self.seen.append(("sending_problems", account.email, account.transport))
        return []

    @hookimpl(tryfirst=True)
    def send_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage]
    ) -> list[SendResult]:
        self.seen.append(("send_mail", account.email, account.transport))
        return [SendResult(m.message_id, Outcome.SENT, "flew") for m in messages]

    @hookimpl(tryfirst=True)
    def test_connection(self, account: SenderAccount) -> ConnectionReport:
        self.seen.append(("test_connection", account.email, account.transport))
        return ConnectionReport("pigeon", "Coo", (ConnectionStep("loft", StepStatus.OK),))

    @hookimpl(tryfirst=True)
    def reconcile_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage]
    ) -> list[ReconcileResult]:
        self.seen.append(("reconcile_mail", account.email, account.transport))
        return [ReconcileResult(m.message_id, True) for m in messages]

    @hookimpl(tryfirst=True)
    def describe_route(self, account: SenderAccount) -> RouteInfo:
        self.seen.append(("describe_route", account.email, account.transport))
        return RouteInfo("pigeon", "the loft", account.email)


class Observer:
    """Offers no transport; wraps every send, as a tracing plugin would."""

    def __init__(self) -> None:
        self.wrapped: list[tuple[str, int]] = []

    @hookimpl(wrapper=True)
    def send_mail(
        self, account: SenderAccount
    ) -> Generator[None, list[SendResult], list[SendResult]]:
        results = yield
        self.wrapped.append((account.transport, len(results)))
        return results


@pytest.fixture
def world(make_crm: CrmFactory, tmp_path: Path) -> tuple[Crm, Pigeon, Observer]:
    pigeon, observer = Pigeon(), Observer()
    crm = make_crm(CONFIG, extra_plugins=(("pigeon_mail", pigeon), ("observer", observer)))
    with crm.transaction() as session:
        crm.set_system_setting(session, "maildir.path", str(tmp_path / "Maildir"))
        directory.add_user(session, "anna@example.se", "Anna Berg", "sales")
        bird = directory.add_user(session, "bo@example.se", "Bo Ek", "sales")
        crm.set_user_setting(session, bird, "mail.transport", "pigeon")
    return crm, pigeon, observer


def send(crm: Crm, sender: str) -> None:
    request = enqueue.MailRequest(sender, ["per@example.com"], "Hej", "Hej Per")
    with crm.transaction() as session:
        enqueue.enqueue(crm, session, request)


def account(crm: Crm, email: str) -> SenderAccount:
    with crm.transaction() as session:
        return crm.sender_account(session, directory.find_user(session, email))


def test_a_guardless_plugin_never_receives_another_transports_mail(
    world: tuple[Crm, Pigeon, Observer],
) -> None:
    crm, pigeon, observer = world
    send(crm, "anna@example.se")
    send(crm, "bo@example.se")
    stats = Worker(crm).run_once()
    assert stats.sent == 2

    anna = account(crm, "anna@example.se")
    crm.test_connection(anna)
    crm.describe_route(anna)
    crm.reconcile_mail(anna, [], utcnow())
    assert crm.sender_problems(anna) == []

    # Only pigeon accounts: Bo's, and the installation's own (no user) when the
    # system setting was saved.
    assert {transport for _, _, transport in pigeon.seen} == {"pigeon"}, pigeon.seen
    assert {email for _, email, _ in pigeon.seen} == {"bo@example.se", ""}
    assert ("send_mail", "bo@example.se", "pigeon") in pigeon.seen
    # The observer's wrapper ran around both transports' sends.
    assert sorted(observer.wrapped) == [("maildir", 1), ("pigeon", 1)]


def test_a_plugin_without_a_transport_may_not_answer_for_one(make_crm: CrmFactory) -> None:
    class Hijacker:
        @hookimpl
        def send_mail(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
            return [SendResult(m.message_id, Outcome.SENT) for m in messages]

    config = '[product_lines.sales]\nplugins = ["maildir_mail", "hijacker"]\n'
    config += 'default_transport = "maildir"\n'
    with pytest.raises(PluginError, match="'hijacker' implements send_mail but offers no"):
        make_crm(config, extra_plugins=(("hijacker", Hijacker()),))
