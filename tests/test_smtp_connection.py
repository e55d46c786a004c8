"""Test connection for SMTP: each rung green or red with a reason and a fix, nothing sent."""

from __future__ import annotations

import pytest

from crm_core.mail.transport import ConnectionReport, ConnectionStep, StepStatus
from tests.servers.smtp import free_port
from tests.servers.tls import TestCA, make_test_ca
from tests.smtp_fixtures import (
    PASSWORD,
    USER,
    Servers,
    SmtpCrm,
    point_at,
    tls_server,
    users,
)
from tests.smtp_fixtures import ca as ca
from tests.smtp_fixtures import database_url as database_url
from tests.smtp_fixtures import running as running
from tests.smtp_fixtures import setup as setup


def statuses(report: ConnectionReport) -> dict[str, StepStatus]:
    return {s.name: s.status for s in report.steps}


def step(report: ConnectionReport, name: str) -> ConnectionStep:
    return next(s for s in report.steps if s.name == name)


def test_green_ladder_sends_nothing(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, ca)

    report = setup.test_connection()

    assert report.ok
    assert report.summary == f"Connected to the SMTP server 127.0.0.1:{server.port} as {USER}"
    assert statuses(report) == {
        "settings": StepStatus.OK,
        "resolve": StepStatus.OK,
        "connect": StepStatus.OK,
        "tls": StepStatus.OK,
        "auth": StepStatus.OK,
        "sender": StepStatus.OK,
    }
    assert "certificate valid for 127.0.0.1" in step(report, "tls").detail
    assert "crm-mail test CA" in step(report, "tls").detail
    assert USER in step(report, "sender").detail
    assert server.received == []
    assert server.rsets == 1
    assert server.auth_successes == 1


def test_wrong_password_is_red_with_the_reason(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, users=users(password="something else"))
    point_at(setup, server, ca)

    report = setup.test_connection()

    assert not report.ok
    assert report.summary == "SMTP connection failed at step 'auth'"
    auth = step(report, "auth")
    assert auth.status is StepStatus.FAILED
    assert "refused the username or password" in auth.detail
    assert "535" in auth.detail
    assert "smtp.password" in auth.fix
    assert step(report, "sender").status is StepStatus.SKIPPED


def test_microsoft_mailbox_without_smtp_auth(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = tls_server(running, ca)
    server.inject(
        "auth_response",
        response="535 5.7.139 Authentication unsuccessful, "
        "SmtpClientAuthentication is disabled for the Mailbox.",
    )
    point_at(setup, server, ca)

    auth = step(setup.test_connection(), "auth")

    assert auth.status is StepStatus.FAILED
    assert "SMTP AUTH is disabled for this mailbox (5.7.139)" in auth.detail
    assert "Authenticated SMTP" in auth.fix


def test_not_allowed_to_send_as_is_caught_by_mail_from(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("mail_from_reject", address=USER)
    point_at(setup, server, ca)

    report = setup.test_connection()

    sender = step(report, "sender")
    assert statuses(report)["auth"] is StepStatus.OK
    assert sender.status is StepStatus.FAILED
    assert "5.7.60" in sender.detail
    assert "Send As" in sender.fix
    assert server.received == []


def test_certificate_for_another_name(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = tls_server(running, ca, ssl_context=ca.server_context("smtp.example.net"))
    point_at(setup, server, ca)

    report = setup.test_connection()

    tls = step(report, "tls")
    assert statuses(report)["connect"] is StepStatus.OK
    assert tls.status is StepStatus.FAILED
    assert "127.0.0.1" in tls.detail and "mismatch" in tls.detail
    assert "name on the server's certificate" in tls.fix
    assert statuses(report)["auth"] is StepStatus.SKIPPED


def test_implicit_tls_certificate_failure_is_on_the_tls_rung(
    setup: SmtpCrm, running: Servers, ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = running.start(security="ssl", ssl_context=ca.server_context(), users=users())
    point_at(setup, server, make_test_ca(tmp_path_factory.mktemp("stranger")))

    report = setup.test_connection()

    assert statuses(report)["connect"] is StepStatus.OK
    assert step(report, "tls").status is StepStatus.FAILED
    assert "tls.ca_bundle" in step(report, "tls").fix


def test_starttls_against_an_implicit_tls_port_times_out_with_a_hint(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = running.start(security="ssl", ssl_context=ca.server_context(), users=users())
    point_at(setup, server, ca, timeout=1)
    setup.set_system(smtp_security="starttls")
    setup.set_user(smtp_password=PASSWORD)  # bound to the encryption: entered again

    connect = step(setup.test_connection(), "connect")

    assert connect.status is StepStatus.FAILED
    assert "did not answer within 1 seconds" in connect.detail
    assert "smtp.security ssl" in connect.fix


def test_server_offers_no_auth(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = tls_server(running, ca, auth_mechanisms=(), auth_required=False)
    point_at(setup, server, ca)

    auth = step(setup.test_connection(), "auth")

    assert auth.status is StepStatus.FAILED
    assert "does not offer a login" in auth.detail


def test_unknown_host_is_red_at_resolve(setup: SmtpCrm) -> None:
    setup.set_system(smtp_host="smtp.no-such-domain.invalid")
    setup.set_user(smtp_username=USER, smtp_password=PASSWORD)

    report = setup.test_connection()

    resolve = step(report, "resolve")
    assert resolve.status is StepStatus.FAILED
    assert "smtp.no-such-domain.invalid was not found" in resolve.detail
    assert "smtp.host" in resolve.fix
    assert statuses(report)["connect"] is StepStatus.SKIPPED


def test_closed_port_is_red_at_connect(setup: SmtpCrm) -> None:
    setup.set_system(smtp_host="127.0.0.1", smtp_port=str(free_port()))
    setup.set_user(smtp_username=USER, smtp_password=PASSWORD)

    connect = step(setup.test_connection(), "connect")

    assert connect.status is StepStatus.FAILED
    assert "connection refused" in connect.detail
    assert "smtp.port" in connect.fix


def test_incomplete_settings_stop_before_the_network(setup: SmtpCrm) -> None:
    report = setup.test_connection()

    assert not report.ok
    failed = [s for s in report.steps if s.status is StepStatus.FAILED]
    assert {s.name for s in failed} == {"settings"}
    assert [s.detail.split(":")[0] for s in failed] == [
        "smtp.host",
        "smtp.username",
        "smtp.password",
    ]


def test_plaintext_relay_on_loopback_skips_tls_and_auth(setup: SmtpCrm, running: Servers) -> None:
    server = running.start(security="none")
    point_at(setup, server, None, auth="none")

    report = setup.test_connection()

    assert report.ok
    assert statuses(report)["tls"] is StepStatus.SKIPPED
    assert statuses(report)["auth"] is StepStatus.SKIPPED
    assert server.rsets == 1
