"""The SMTP transport against a real aiosmtpd server over sockets.

Each test asserts what the receiving server got (envelope, headers, parts) or what
the sender is told, and how the failure is classified for the outbox.
"""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from crm_core import directory
from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome
from tests.servers.smtp import free_port
from tests.servers.tls import TestCA, make_test_ca
from tests.smtp_fixtures import (
    PASSWORD,
    RECIPIENT,
    USER,
    Servers,
    SmtpCrm,
    make_message,
    point_at,
    tls_server,
    users,
)
from tests.smtp_fixtures import ca as ca
from tests.smtp_fixtures import database_url as database_url
from tests.smtp_fixtures import running as running
from tests.smtp_fixtures import setup as setup


def parts(message: EmailMessage) -> dict[str, EmailMessage]:
    """The leaf parts by content type (attachments by file name)."""
    found: dict[str, EmailMessage] = {}
    for part in message.walk():
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        found[part.get_filename() or part.get_content_type()] = part
    return found


def text_of(part: EmailMessage) -> str:
    """A text part's content with line ends as written (the wire uses CRLF)."""
    return str(part.get_content()).replace("\r\n", "\n")


# --- what the recipient's server receives ---------------------------------------------


def test_starttls_password_multipart_attachments_and_unicode(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, ca)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    message = make_message(
        to=["kund@example.org"],
        to_name="Jörg Müller",
        cc=["kollega@example.org"],
        bcc=["arkiv@example.com"],
        subject="Offert för lokalen på Östermalm – 3 rum",
        text="Hej Jörg,\nhär är offerten.\n",
        html="<p>Hej Jörg,</p><p>här är <b>offerten</b>.</p>",
        attachments=[Attachment("Offert Östermalm.pdf", "application/pdf", pdf)],
    )

    result = setup.send_one(message)

    assert result.outcome is Outcome.SENT, result.detail
    assert result.detail == ""
    (got,) = server.received
    assert got.tls and got.auth_user == USER
    assert got.mail_from == USER
    assert sorted(got.rcpt_tos) == ["arkiv@example.com", "kollega@example.org", RECIPIENT]
    raw_headers = got.data.split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii()  # RFC 2047 words, no raw UTF-8 without SMTPUTF8
    assert b"=?utf-8?" in raw_headers
    assert b"arkiv@" not in got.data  # Bcc only in the envelope
    msg = got.message
    assert msg["Message-ID"] == message.message_id
    assert msg["Date"] is not None
    assert str(msg["From"]) == "Anna Berg <anna.berg@example.com>"
    assert str(msg["To"]) == "Jörg Müller <kund@example.org>"
    assert str(msg["Subject"]) == "Offert för lokalen på Östermalm – 3 rum"
    assert msg.get_content_type() == "multipart/mixed"
    found = parts(msg)
    assert text_of(found["text/plain"]) == "Hej Jörg,\nhär är offerten.\n"
    assert "<b>offerten</b>" in text_of(found["text/html"])
    attachment = found["Offert Östermalm.pdf"]
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == pdf
    assert result.provider_ref == f"2.0.0 Ok: queued as {got.queue_id}"


def test_implicit_tls_and_auth_login_only(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = running.start(
        security="ssl",
        ssl_context=ca.server_context(),
        users=users(),
        auth_required=True,
        auth_mechanisms=("LOGIN",),
    )
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.SENT, result.detail
    (got,) = server.received
    assert got.tls and got.auth_user == USER
    assert server.starttls_count == 0


def test_plaintext_with_password_is_allowed_on_loopback(setup: SmtpCrm, running: Servers) -> None:
    server = running.start(
        security="none", users=users(), auth_required=True, auth_require_tls=False
    )
    point_at(setup, server, None)

    result = setup.send_one()

    assert result.outcome is Outcome.SENT, result.detail
    assert server.received[0].auth_user == USER
    assert not server.received[0].tls


def test_relay_without_auth(setup: SmtpCrm, running: Servers, ca: TestCA) -> None:
    server = tls_server(running, ca, users={}, auth_required=False)
    point_at(setup, server, ca, auth="none")

    result = setup.send_one()

    assert result.outcome is Outcome.SENT, result.detail
    assert server.auth_attempts == 0
    assert server.received[0].auth_user is None


def test_ssl_cert_file_lets_a_customer_trust_a_private_ca(
    setup: SmtpCrm, running: Servers, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, None)  # no tls.ca_bundle: the system store decides
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_pem))

    assert setup.send_one().outcome is Outcome.SENT


def test_international_address_uses_smtputf8_when_offered(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, smtputf8=True)
    point_at(setup, server, ca)

    result = setup.send_one(make_message(to=["jörg@exempel.se"], subject="Grüße"))

    assert result.outcome is Outcome.SENT, result.detail
    (got,) = server.received
    assert got.smtp_utf8
    assert got.rcpt_tos == ["jörg@exempel.se"]
    assert "SMTPUTF8" in got.mail_options
    assert str(got.message["To"]) == "jörg@exempel.se"
    assert str(got.message["Subject"]) == "Grüße"


def test_international_address_without_smtputf8_is_a_clear_permanent_error(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, smtputf8=False)
    point_at(setup, server, ca)

    results = setup.send([make_message(1, to=["jörg@exempel.se"]), make_message(2)])

    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.SENT]
    assert "does not support international e-mail addresses" in results[0].detail
    assert "jörg@exempel.se" in results[0].detail
    assert [g.rcpt_tos for g in server.received] == [[RECIPIENT]]


def test_idna_domain_is_written_as_ascii_without_smtputf8(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, smtputf8=False)
    point_at(setup, server, ca)

    result = setup.send_one(make_message(to=["info@bücher.de"], to_name="Bücher"))

    assert result.outcome is Outcome.SENT, result.detail
    (got,) = server.received
    assert got.rcpt_tos == ["info@xn--bcher-kva.de"]
    assert b"info@xn--bcher-kva.de" in got.data.split(b"\r\n\r\n", 1)[0]
    assert got.message["To"].addresses[0].display_name == "Bücher"


def test_eight_bit_body_is_declared_with_body_8bitmime(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    # aiosmtpd always offers 8BITMIME; the re-encoding for servers without it is
    # tested on render.prepare in test_smtp_units.
    server = tls_server(running, ca)
    point_at(setup, server, ca)

    setup.send_one(make_message(text="Hälsningar från Malmö\n"))

    (got,) = server.received
    assert "BODY=8BITMIME" in got.mail_options
    assert text_of(got.message) == "Hälsningar från Malmö\n"


# --- connection reuse ---------------------------------------------------------------------


def test_a_batch_of_100_uses_three_connections_and_one_auth_on_each(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, ca)
    batch = [make_message(n) for n in range(1, 101)]

    results = setup.send(batch)

    assert [r.outcome for r in results] == [Outcome.SENT] * 100
    assert server.connections == 3  # mail.max_connections' default, Microsoft 365's limit
    assert server.auth_attempts == server.auth_successes == 3
    assert server.starttls_count == 3
    assert server.ehlo_count == 2 * 3  # before and after STARTTLS
    assert sorted(server.message_ids()) == sorted(m.message_id for m in batch)


def test_batches_share_one_tls_context_and_a_renewed_ca_bundle_is_read_again(
    setup: SmtpCrm, running: Servers, ca: TestCA, tmp_path: Path
) -> None:
    # Why: a context loads the system trust store (about 20 ms of CPU on Debian), and
    # each connection of each batch made its own: more CPU than the batch's mails.
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.ca_pem.read_bytes())
    server = tls_server(running, ca)
    point_at(setup, server, None)
    setup.set_system(tls_ca_bundle=str(bundle))
    key = ("smtp_mail", "tls-context", str(bundle))

    first = setup.send([make_message(n) for n in range(1, 7)])
    context = setup.crm.resources.get(key)
    second = setup.send([make_message(n) for n in range(7, 13)])

    assert [r.outcome for r in first + second] == [Outcome.SENT] * 12
    assert server.starttls_count == 6  # two batches of three connections, each verified
    assert context is not None and setup.crm.resources.get(key) is context
    bundle.write_bytes(ca.ca_pem.read_bytes() + b"\n")  # renewed: read again, no restart
    assert setup.send_one(make_message(13)).outcome is Outcome.SENT
    assert setup.crm.resources.get(key) is not context
    bundle.unlink()  # gone: the sender is told what to fix, nothing is sent
    gone = setup.send_one(make_message(14))
    assert gone.outcome is Outcome.CONFIGURATION
    assert f"The CA bundle {bundle} cannot be read" in gone.detail
    assert len(server.message_ids()) == 13


def test_a_batch_of_100_on_one_connection_when_so_set(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, ca)
    setup.set_system(mail_max_connections="1")
    batch = [make_message(n) for n in range(1, 101)]

    results = setup.send(batch)

    assert [r.outcome for r in results] == [Outcome.SENT] * 100
    assert server.connections == 1
    assert server.auth_attempts == server.auth_successes == 1
    assert server.message_ids() == [m.message_id for m in batch]
    assert {g.connection_id for g in server.received} == {1}


def test_reconnects_once_when_the_server_closed_an_idle_connection(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("close_idle", after_messages=2, times=1)
    point_at(setup, server, ca)
    setup.set_system(mail_max_connections="1")  # one session, closed and reopened
    batch = [make_message(n) for n in range(1, 6)]

    results = setup.send(batch)

    assert [r.outcome for r in results] == [Outcome.SENT] * 5
    assert server.connections == 2
    assert server.auth_successes == 2
    assert [g.connection_id for g in server.received] == [1, 1, 2, 2, 2]
    assert server.message_ids() == [m.message_id for m in batch]


def test_a_server_that_says_421_when_closing_is_reconnected_too(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("close_idle", after_messages=1, times=1, response="421 4.4.2 Connection dropped")
    point_at(setup, server, ca)
    setup.set_system(mail_max_connections="1")  # one session, closed and reopened

    results = setup.send([make_message(1), make_message(2)])

    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    assert server.connections == 2


# --- failures, classified ---------------------------------------------------------------


def test_wrong_password_is_a_configuration_error(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, users=users(password="the right one"))
    point_at(setup, server, ca)

    results = setup.send([make_message(1), make_message(2)])

    assert {r.outcome for r in results} == {Outcome.CONFIGURATION}
    assert results[0].code == "535 5.7.8"
    assert "refused the username or password" in results[0].detail
    assert "smtp.password" in results[0].detail
    assert server.auth_attempts == 1  # the batch does not hammer the server
    assert server.received == []


def test_microsoft_smtp_auth_disabled_gets_a_specific_hint(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("auth_response")  # 535 5.7.139 ... disabled for the Tenant.
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "535 5.7.139"
    assert "SMTP AUTH is disabled for the whole Microsoft 365 tenant" in result.detail
    assert "xoauth2" in result.detail


def test_basic_auth_retired_5_7_30_points_to_oauth(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject(
        "auth_response",
        response="550 5.7.30 Basic authentication is not supported for Client Submission.",
    )
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "550 5.7.30"
    assert "no longer accepts basic authentication" in result.detail
    for step in ("smtp.auth xoauth2", "SMTP.SendAsApp", "New-ServicePrincipal"):
        assert step in result.detail


def test_server_without_auth_is_a_configuration_error(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, auth_mechanisms=(), auth_required=False)
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "no-auth"
    assert "does not offer a login" in result.detail
    assert "smtp.auth none" in result.detail
    assert server.received == []


def test_certificate_for_another_host_is_refused(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca, ssl_context=ca.server_context("mail.example.net"))
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "tls-certificate"
    assert "could not be verified" in result.detail
    assert "mismatch" in result.detail
    assert "name on the server's certificate" in result.detail
    assert server.received == [] and server.auth_attempts == 0


def test_certificate_from_an_unknown_ca_is_refused(
    setup: SmtpCrm, running: Servers, ca: TestCA, tmp_path: Path
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, make_test_ca(tmp_path / "other-ca"))

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert "tls.ca_bundle" in result.detail
    assert server.received == []


def test_unknown_host_is_a_configuration_error(setup: SmtpCrm) -> None:
    setup.set_system(smtp_host="no-such-host.invalid", smtp_timeout="2")
    setup.set_user(smtp_username=USER, smtp_password=PASSWORD)

    results = setup.send([make_message(1), make_message(2)])

    assert {r.outcome for r in results} == {Outcome.CONFIGURATION}
    assert results[0].code == "unknown-host"
    assert "no-such-host.invalid was not found" in results[0].detail


def test_nothing_listening_is_temporary(setup: SmtpCrm) -> None:
    setup.set_system(smtp_host="127.0.0.1", smtp_port=str(free_port()))
    setup.set_user(smtp_username=USER, smtp_password=PASSWORD)

    result = setup.send_one()

    assert result.outcome is Outcome.TEMPORARY
    assert result.code == "connection-refused"


def test_recipient_5xx_is_permanent_and_4xx_temporary(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("rcpt_permanent", address="gone@example.org")
    server.inject("rcpt_temporary", address="busy@example.org")
    point_at(setup, server, ca)

    gone, busy, fine = setup.send(
        [
            make_message(1, to=["gone@example.org"]),
            make_message(2, to=["busy@example.org"]),
            make_message(3),
        ]
    )

    assert gone.outcome is Outcome.PERMANENT
    assert gone.code == "550 5.1.1"
    assert "gone@example.org" in gone.detail
    assert "does not exist" in gone.detail
    assert busy.outcome is Outcome.TEMPORARY
    assert busy.code == "451 4.3.0"
    assert fine.outcome is Outcome.SENT
    assert [g.rcpt_tos for g in server.received] == [[RECIPIENT]]
    assert server.connections == 3  # those opened at the start: none had to be reopened


def test_some_recipients_refused_sends_to_the_rest_and_names_them(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("rcpt_permanent", address="gone@example.org")
    point_at(setup, server, ca)

    result = setup.send_one(make_message(to=[RECIPIENT, "gone@example.org"]))

    assert result.outcome is Outcome.SENT
    assert "not delivered to: gone@example.org (550 5.1.1" in result.detail
    assert result.code == "550 5.1.1"
    assert server.received[0].rcpt_tos == [RECIPIENT]


def test_data_5xx_is_permanent_and_4xx_temporary(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    # Aimed by recipient: over parallel connections the messages arrive in any order.
    server.inject("data_permanent", address="r1@example.org", times=1)
    server.inject("data_temporary", address="r2@example.org", times=1)
    point_at(setup, server, ca)

    rejected, deferred, fine = setup.send(
        [make_message(n, to=[f"r{n}@example.org"]) for n in (1, 2, 3)]
    )

    assert rejected.outcome is Outcome.PERMANENT
    assert rejected.code == "554 5.6.0"
    assert deferred.outcome is Outcome.TEMPORARY
    assert deferred.code == "451 4.3.0"
    assert fine.outcome is Outcome.SENT
    assert len(server.received) == 1


def test_send_as_denied_on_mail_from_is_configuration(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("mail_from_reject")  # 550 5.7.60 ... send as this sender
    point_at(setup, server, ca)

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "550 5.7.60"
    assert "Send As" in result.detail


def test_connection_dropped_before_data_is_temporary(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("drop_before_data", times=1)
    point_at(setup, server, ca)
    setup.set_system(mail_max_connections="1")  # one session: the next gets a new one

    dropped, after = setup.send([make_message(1), make_message(2)])

    assert dropped.outcome is Outcome.TEMPORARY
    assert dropped.code == "disconnected"
    assert after.outcome is Outcome.SENT  # the next message gets a new connection
    assert server.connections == 2
    assert len(server.received) == 1


def test_connection_lost_after_the_final_dot_is_ambiguous(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    server.inject("drop_after_data", address=RECIPIENT, times=1)  # the first's recipient
    point_at(setup, server, ca)
    first, second = make_message(1), make_message(2, to=["other@example.org"])

    lost, after = setup.send([first, second])

    assert lost.outcome is Outcome.AMBIGUOUS
    assert "may or may not have been delivered" in lost.detail
    assert after.outcome is Outcome.SENT
    # The server did take the first one: exactly why it must not be resent blindly.
    assert sorted(server.message_ids()) == sorted([first.message_id, second.message_id])


def test_plaintext_password_to_a_remote_host_is_refused_without_connecting(
    setup: SmtpCrm,
) -> None:
    # Saved in an order the save-time check cannot see: the user's own server override.
    setup.set_system(smtp_security="none", smtp_auth="none", smtp_host="127.0.0.1")
    setup.set_user(smtp_username=USER, smtp_password=PASSWORD)
    with setup.crm.transaction() as session:
        user = directory.find_user(session, USER)
        store = setup.crm.settings_store()
        store.set_user(session, user, "smtp.host", "relay.example.net")
        store.set_user(session, user, "smtp.auth", "password")

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert "unencrypted" in result.detail


def test_missing_password_is_a_configuration_error(setup: SmtpCrm) -> None:
    setup.set_system(smtp_host="smtp.example.net")

    result = setup.send_one()

    assert result.outcome is Outcome.CONFIGURATION
    assert "smtp.password" in result.detail
    assert "smtp.username" in result.detail


def test_rendered_bytes_parse_back_with_the_default_policy(
    setup: SmtpCrm, running: Servers, ca: TestCA
) -> None:
    server = tls_server(running, ca)
    point_at(setup, server, ca)

    setup.send_one(make_message(html="<p>x</p>"))

    data = server.received[0].data
    assert b"\r\n" in data and b"\n\n" not in data.replace(b"\r\n", b"")
    reparsed = email.message_from_bytes(data, policy=email.policy.default)
    assert reparsed.get_content_type() == "multipart/alternative"
