"""Microsoft Graph with RBAC for Applications alone (issue 13): no Entra mail grant.

The app's mail permissions are Exchange Online role assignments ("Application
Mail.Send" with a management scope), so Entra's token carries no ``Mail.*`` role and
Exchange decides per mailbox. Test connection must not judge such a token red by its
roles; it asks Exchange about the mailbox instead. Sending must work for a mailbox in
the scope, and a mailbox outside it must pause the account with the PowerShell that
takes it in. Against the Entra and Graph stand-ins over TLS, through the real outbox.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from crm_core.mail import enqueue, pauses
from crm_core.mail.enqueue import MailRequest
from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome
from crm_core.mail.worker import Worker
from crm_core.models import OutboxMessage
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    CLIENT,
    RECIPIENT,
    TENANT,
    USER,
    ExchangeWorld,
    exchange_world,
    make_message,
    steps,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA

READ = "Mail.ReadBasic.All"
OTHER = "bo.ek@contoso.se"
CREDENTIALS = "TestConnection error Credentials: "


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    """The guide's app (full_access_as_app only, no Graph grant in Entra), scoped in
    Exchange Online to Anna's mailbox for sending and reading."""
    with (
        exchange_world(make_crm(), ca) as w,
        with_graph(w, roles=("full_access_as_app",)) as graph,
    ):
        graph.add_mailbox(OTHER, tenant_id=TENANT)
        graph.assign_app_role(CLIENT, "Mail.Send", [USER])
        graph.assign_app_role(CLIENT, READ, [USER])
        yield w


def graph_of(world: ExchangeWorld) -> GraphServer:
    assert world.graph is not None
    return world.graph


def queue_one(world: ExchangeWorld) -> str:
    """One mail from Anna in the outbox; its Message-ID."""
    with world.crm.transaction() as session:
        request = MailRequest(USER, [RECIPIENT], "Offer", "Hello\n")
        return enqueue.enqueue(world.crm, session, request).message_id


def state_of(world: ExchangeWorld, message_id: str) -> str:
    with world.crm.transaction() as session:
        row = session.scalar(select(OutboxMessage).where(OutboxMessage.message_id == message_id))
        assert row is not None
        return row.state


# --- Test connection --------------------------------------------------------------


def test_rbac_only_token_is_yellow_and_the_lookup_finds_the_mailbox_in_scope(
    world: ExchangeWorld,
) -> None:
    report = world.test_connection()
    assert report.summary == "Connected to Exchange"
    ladder = steps(report)
    status, detail, fix = ladder["permission"]
    assert status == "warning"
    assert detail == (
        "the token carries no Microsoft Graph mail permissions: this is expected with RBAC "
        "for Applications, where Exchange Online grants Mail.Send per mailbox and the token "
        f"shows nothing of it; the lookup step asks Exchange about {USER}"
    )
    assert f"Test-ServicePrincipalAuthorization -Identity {CLIENT} -Resource {USER}" in fix
    assert ladder["mailbox"][0] == "warning"  # no User.Read.All: the user check is skipped
    status, detail, _ = ladder["lookup"]
    assert status == "ok"
    assert detail.startswith(f"Exchange Online lets the app send as {USER} and look in its Sent")
    assert graph_of(world).delivered == []  # the probe has no recipients: nothing went


def test_mailbox_outside_the_rbac_scope_is_red_with_the_powershell_that_takes_it_in(
    world: ExchangeWorld,
) -> None:
    graph_of(world).assign_app_role(CLIENT, "Mail.Send", [OTHER])  # Bo, not Anna
    graph_of(world).assign_app_role(CLIENT, READ, [OTHER])
    report = world.test_connection()
    status, detail, fix = steps(report)["lookup"]
    assert status == "failed" and report.summary == CREDENTIALS + detail
    assert detail == (
        f"Exchange Online refuses the app access to {USER} (HTTP 403 ErrorAccessDenied): the "
        "token carries no mail permissions, so RBAC for Applications decides, and the mailbox "
        'is outside the management scope of the app\'s "Application Mail.Send" role '
        "assignment (or the app has none), so every mail would be refused"
    )
    assert f"Test-ServicePrincipalAuthorization -Identity {CLIENT} -Resource {USER}" in fix
    assert f'Add-DistributionGroupMember -Identity "<group>" -Member {USER}' in fix
    assert "Set-ManagementScope" in fix and f"PrimarySmtpAddress -eq '{USER}'" in fix
    assert f'New-ManagementRoleAssignment -App {CLIENT} -Role "Application Mail.Send"' in fix
    assert world.send_one().code == "ErrorAccessDenied"  # what sending meets


def test_in_the_send_scope_without_a_read_role_is_yellow(world: ExchangeWorld) -> None:
    graph_of(world).assign_app_role(CLIENT, READ, ())  # reading: no mailbox in its scope
    report = world.test_connection()
    assert report.summary == "Connected to Exchange"
    status, detail, fix = steps(report)["lookup"]
    assert status == "warning"
    assert detail.startswith(
        f"Exchange Online lets the app send as {USER} (the mailbox is inside the scope of "
        '"Application Mail.Send"), but not read its mail'
    )
    assert f'New-ManagementRoleAssignment -App {CLIENT} -Role "Application {READ}"' in fix
    assert world.send_one().outcome is Outcome.SENT


def test_an_app_with_neither_a_grant_nor_a_role_assignment_is_red(world: ExchangeWorld) -> None:
    graph_of(world).remove_app_roles(CLIENT)
    report = world.test_connection()
    assert steps(report)["permission"][0] == "warning"
    status, detail, fix = steps(report)["mailbox"]
    assert status == "failed" and report.summary == CREDENTIALS + detail
    assert "HTTP 401: it carries no application permissions" in detail
    assert "no RBAC for Applications role assignment" in detail
    assert '-Role "Application Mail.Send"' in fix and "Grant admin consent" in fix


def test_roles_without_mail_send_stay_red(make_crm: CrmFactory, ca: TestCA) -> None:
    roles = (READ, "User.Read.All")  # an Entra grant, but not the one that sends
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=roles) as graph:
        graph.assign_app_role(CLIENT, "Mail.Send", [OTHER])
        report = world.test_connection()
        status, detail, _ = steps(report)["permission"]
        assert status == "failed"
        assert detail == f"the token lacks Mail.Send (it holds {READ}, User.Read.All)"
        assert report.summary == CREDENTIALS + detail
        assert steps(report)["mailbox"][0] == "skipped"


# --- sending through the outbox ------------------------------------------------------


def test_an_rbac_only_app_sends_through_the_worker(world: ExchangeWorld) -> None:
    message_id = queue_one(world)
    stats = Worker(world.crm, name="test-worker").run_once()
    assert stats.sent == 1 and state_of(world, message_id) == "sent"
    [delivered] = graph_of(world).delivered
    assert delivered.internet_message_id == message_id


def test_out_of_scope_pauses_the_account_with_the_fix_then_sends_after_resume(
    world: ExchangeWorld,
) -> None:
    graph = graph_of(world)
    graph.assign_app_role(CLIENT, "Mail.Send", [OTHER])
    message_id = queue_one(world)
    stats = Worker(world.crm, name="test-worker").run_once()
    assert stats.paused_accounts == 1 and graph.delivered == []
    assert state_of(world, message_id) == "queued"  # waits for the account, no attempt spent
    with world.crm.transaction() as session:
        [(pause, email)] = pauses.pauses(session)
        assert (email, pause.code) == (USER, "ErrorAccessDenied")
        assert pause.reason.startswith(
            f"Exchange Online refuses the app access to {USER} (HTTP 403 ErrorAccessDenied): "
            "the app's token carries no Microsoft Graph mail permissions, so RBAC for "
            "Applications decides, and the mailbox is outside the management scope"
        )
        assert f"Test-ServicePrincipalAuthorization -Identity {CLIENT} -Resource {USER}" in (
            pause.reason
        )
        assert "crm outbox resume" in pause.reason

    graph.assign_app_role(CLIENT, "Mail.Send", [OTHER, USER])  # the administrator's fix
    with world.crm.transaction() as session:
        pauses.resume(session, USER)
    Worker(world.crm, name="test-worker").run_once()
    assert state_of(world, message_id) == "sent"
    assert [d.internet_message_id for d in graph.delivered] == [message_id]


def test_a_large_attachment_needs_an_application_mail_readwrite_assignment(
    world: ExchangeWorld,
) -> None:
    data = bytes(range(256)) * (5 * 4096)  # 5 MB: a draft and an upload session
    big = make_message(attachments=[Attachment("plan.pdf", "application/pdf", data)])
    refused = world.send_one(big)
    assert (refused.outcome, refused.code) == (Outcome.CONFIGURATION, "ErrorAccessDenied")
    assert 'no "Application Mail.ReadWrite" role assignment of the app takes the mailbox in' in (
        refused.detail
    )
    assert f'New-ManagementRoleAssignment -App {CLIENT} -Role "Application Mail.ReadWrite"' in (
        refused.detail
    )
    graph_of(world).assign_app_role(CLIENT, "Mail.ReadWrite", [USER])
    assert world.send_one(big).outcome is Outcome.SENT
    [delivered] = graph_of(world).delivered
    assert delivered.attachments == (("plan.pdf", data),)
