"""Self-tests of the local SMTP server, driven by plain ``smtplib`` over real sockets.

Why: the SMTP transport's tests trust this server to behave like a real one; these
tests pin down what a client observes for TLS, AUTH and each injected fault.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

from .smtp import Fault, SmtpServer, find_message_id, start_smtp_process
from .tls import TestCA, make_test_ca

SENDER = "sender@example.com"
USERS = {SENDER: "s3cret"}
TOKEN = "good-token"


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Every test must stop what it started."""
    before = set(threading.enumerate())
    yield
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leftover, f"threads left behind: {leftover}"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return make_test_ca(tmp_path / "ca")


def make_message(n: int = 1, to: str = "rcpt@example.org", sender: str = SENDER) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"test {n}"
    msg["Message-ID"] = f"<msg-{n}@crm.test>"
    msg.set_content(f"body {n}\n")
    return msg


def connect(server: SmtpServer) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, timeout=5)


def xoauth2(user: str, token: str) -> Callable[..., str]:
    """smtplib authobject for XOAUTH2, correct for both SASL forms (see research notes §5)."""
    xo = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return lambda challenge=None: "" if challenge else xo


# -- TLS -------------------------------------------------------------------------------


def test_starttls_verified_with_test_ca_and_auth_only_after_starttls(ca: TestCA) -> None:
    with SmtpServer(
        security="starttls", ssl_context=ca.server_context(), users=USERS, hostname="mx.test"
    ) as server:
        with connect(server) as client:
            code, banner = client.ehlo()
            assert code == 250
            assert banner.startswith(b"mx.test")
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            # MAIL before STARTTLS is refused
            assert client.mail(SENDER)[0] == 530
            client.starttls(context=ca.client_context())
            client.ehlo()
            assert not client.has_extn("starttls")
            assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            client.login(SENDER, USERS[SENDER])
            client.send_message(make_message())
        (received,) = server.received
        assert received.tls
        assert received.auth_user == SENDER
        assert received.message_id == "<msg-1@crm.test>"
        assert received.message["Subject"] == "test 1"
        assert received.connection_id == 1
        assert server.starttls_count == 1
        assert server.ehlo_count == 2
        assert server.connections == 1
        assert server.auth_successes == server.auth_attempts == 1
        assert server.errors == []


def test_starttls_with_untrusted_ca_fails_verification(ca: TestCA, tmp_path: Path) -> None:
    other = ssl.create_default_context(cafile=str(make_test_ca(tmp_path / "other").ca_pem))
    with SmtpServer(security="starttls", ssl_context=ca.server_context()) as server:
        with connect(server) as client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=other)
        assert server.starttls_count == 0
        assert server.received == []


def test_starttls_hostname_must_match(ca: TestCA) -> None:
    with SmtpServer(security="starttls", ssl_context=ca.server_context("mx.other.test")) as server:
        client = connect(server)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(context=ca.client_context())
        finally:
            client.close()


def test_implicit_tls(ca: TestCA) -> None:
    with SmtpServer(security="ssl", ssl_context=ca.server_context(), users=USERS) as server:
        with smtplib.SMTP_SSL(
            server.host, server.port, timeout=5, context=ca.client_context()
        ) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            assert client.has_extn("auth")  # TLS from the first byte
            client.login(SENDER, USERS[SENDER])
            client.send_message(make_message())
        (received,) = server.received
        assert received.tls
        assert received.auth_user == SENDER
        # A plain-text client waits for a banner that never comes: the server expects
        # a TLS ClientHello first.
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            smtplib.SMTP(server.host, server.port, timeout=0.3)


def test_implicit_tls_untrusted_ca_fails(ca: TestCA) -> None:
    with SmtpServer(security="ssl", ssl_context=ca.server_context()) as server:
        untrusted = ssl.create_default_context()
        trustme.CA().configure_trust(untrusted)
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(server.host, server.port, timeout=5, context=untrusted)


# -- AUTH ------------------------------------------------------------------------------


@pytest.fixture
def tls_server(ca: TestCA) -> Iterator[SmtpServer]:
    with SmtpServer(
        security="starttls",
        ssl_context=ca.server_context(),
        users=USERS,
        auth_required=True,
        auth_mechanisms=("PLAIN", "LOGIN", "XOAUTH2"),
        token_validator=lambda user, token: user == SENDER and token == TOKEN,
    ) as server:
        yield server


def tls_client(server: SmtpServer, ca: TestCA) -> smtplib.SMTP:
    client = connect(server)
    client.starttls(context=ca.client_context())
    client.ehlo()
    return client


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response", [True, False])
@pytest.mark.parametrize("good", [True, False])
def test_auth_plain_and_login(
    tls_server: SmtpServer, ca: TestCA, mechanism: str, initial_response: bool, good: bool
) -> None:
    with tls_client(tls_server, ca) as client:
        client.user = SENDER
        client.password = USERS[SENDER] if good else "wrong"
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        if good:
            code, _ = client.auth(mechanism, authobject, initial_response_ok=initial_response)
            assert code == 235
            client.send_message(make_message())
            assert tls_server.received[0].auth_user == SENDER
        else:
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                client.auth(mechanism, authobject, initial_response_ok=initial_response)
            assert info.value.smtp_code == 535
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.send_message(make_message())
            assert refused.value.smtp_code == 530
    assert tls_server.auth_attempts == 1
    assert tls_server.auth_successes == int(good)


@pytest.mark.parametrize("initial_response", [True, False])
def test_xoauth2_good_and_bad_token(
    tls_server: SmtpServer, ca: TestCA, initial_response: bool
) -> None:
    with tls_client(tls_server, ca) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth("XOAUTH2", xoauth2(SENDER, "bad"), initial_response_ok=initial_response)
        assert info.value.smtp_code == 535
        assert info.value.smtp_error == b"5.7.3 Authentication unsuccessful"
        code, reply = client.auth(
            "XOAUTH2", xoauth2(SENDER, TOKEN), initial_response_ok=initial_response
        )
        assert (code, reply) == (235, b"2.7.0 Authentication successful")
        client.send_message(make_message())
    assert tls_server.received[0].auth_user == SENDER
    assert (tls_server.auth_attempts, tls_server.auth_successes) == (2, 1)


def test_xoauth2_without_validator_refuses(ca: TestCA) -> None:
    with (
        SmtpServer(
            security="starttls", ssl_context=ca.server_context(), auth_mechanisms=["XOAUTH2"]
        ) as server,
        tls_client(server, ca) as client,
    ):
        assert client.esmtp_features["auth"].strip() == "XOAUTH2"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("XOAUTH2", xoauth2(SENDER, TOKEN))


def test_no_auth_mechanisms_offers_no_auth(ca: TestCA) -> None:
    with (
        SmtpServer(
            security="starttls", ssl_context=ca.server_context(), users=USERS, auth_mechanisms=()
        ) as server,
        tls_client(server, ca) as client,
    ):
        assert not client.has_extn("auth")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login(SENDER, USERS[SENDER])
        client.send_message(make_message())  # auth not required: anonymous mail is fine
    assert server.received[0].auth_user is None


def test_auth_without_tls_when_not_required() -> None:
    with SmtpServer(users=USERS, auth_required=True, auth_require_tls=False) as server:
        with connect(server) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.send_message(make_message())
            assert refused.value.smtp_code == 530
            client.login(SENDER, USERS[SENDER])
            client.send_message(make_message())
        assert server.received[0].tls is False


def test_auth_requires_tls_by_default() -> None:
    with SmtpServer(users=USERS) as server, connect(server) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0u\0p").decode())
        assert code == 538


# -- faults ----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def test_rcpt_temporary_once(server: SmtpServer) -> None:
    fault = server.inject("rcpt_temporary", times=1)
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            client.send_message(make_message())
        ((code, _),) = info.value.recipients.values()
        assert code == 451
        assert server.rsets == 1  # smtplib resets the transaction after refusals
        client.send_message(make_message(2))
    assert fault.fired == 1
    assert server.active_faults() == []
    assert server.message_ids() == ["<msg-2@crm.test>"]


def test_rcpt_permanent_for_one_recipient(server: SmtpServer) -> None:
    server.inject("rcpt_permanent", address="Gone@Example.org")
    with connect(server) as client:
        refused = client.send_message(
            make_message(), to_addrs=["ok@example.org", "gone@example.org"]
        )
    assert refused == {"gone@example.org": (550, b"5.1.1 User unknown; recipient address rejected")}
    assert server.received[0].rcpt_tos == ["ok@example.org"]


def test_mail_from_reject(server: SmtpServer) -> None:
    server.inject("mail_from_reject", address=SENDER)
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.send_message(make_message())
        assert info.value.smtp_code == 550
        assert info.value.smtp_error.startswith(b"5.7.60 SMTP; Client does not have permissions")
        client.send_message(make_message(2, sender="other@example.com"))
    assert [r.mail_from for r in server.received] == ["other@example.com"]


@pytest.mark.parametrize(("name", "code"), [("data_temporary", 451), ("data_permanent", 554)])
def test_data_faults(server: SmtpServer, name: str, code: int) -> None:
    server.inject(name, times=1)  # type: ignore[arg-type]
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.send_message(make_message())
        assert info.value.smtp_code == code
        client.send_message(make_message(2))  # same connection is still usable
    assert server.message_ids() == ["<msg-2@crm.test>"]


def test_a_refusal_after_the_dot_keeps_the_transaction_open_like_postfix(
    server: SmtpServer,
) -> None:
    server.inject("data_permanent", times=1)
    with connect(server) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("a@example.org")[0] == 250
        assert client.data(make_message().as_bytes())[0] == 554
        assert client.mail(SENDER) == (503, b"5.5.1 Error: nested MAIL command")
        assert client.rset()[0] == 250
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("b@example.org")[0] == 250
        code, reply = client.data(make_message(2).as_bytes())
    (got,) = server.received
    assert (code, got.rcpt_tos) == (250, ["b@example.org"])
    assert reply == f"2.0.0 Ok: queued as {got.queue_id}".encode()
    assert server.rsets == 1


def test_bad_sequence_replies_carry_postfixs_enhanced_code(server: SmtpServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert client.rcpt("a@example.org") == (503, b"5.5.1 Error: need MAIL command")
        client.mail(SENDER)
        assert client.docmd("DATA") == (503, b"5.5.1 Error: need RCPT command")


def test_recipient_limit_answers_452_4_5_3_like_postfix() -> None:
    with SmtpServer(recipient_limit=2) as server, connect(server) as client:
        client.ehlo()
        client.mail(SENDER)
        replies = [client.rcpt(f"r{i}@example.org") for i in range(3)]
        code, _ = client.data(make_message().as_bytes())
        assert [c for c, _ in replies] == [250, 250, 452]
        assert replies[2][1] == b"4.5.3 Error: too many recipients"
        assert (code, server.rcpt_commands, server.data_commands) == (250, 3, 1)
        assert server.received[0].rcpt_tos == ["r0@example.org", "r1@example.org"]


def test_drop_at_rcpt(server: SmtpServer) -> None:
    server.inject("drop_at_rcpt", address="b@example.org", times=1)
    client = connect(server)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail(SENDER, ["a@example.org", "b@example.org"], b"Subject: x\r\n\r\nx")
    finally:
        client.close()
    assert server.received == [] and server.data_commands == 0


def test_drop_after_data_is_ambiguous(server: SmtpServer) -> None:
    server.inject("drop_after_data", times=1)
    client = connect(server)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.send_message(make_message())
    finally:
        client.close()
    # The server has the message, the client never got the 250.
    assert server.message_ids() == ["<msg-1@crm.test>"]
    with connect(server) as client:
        client.send_message(make_message(2))
    assert [r.connection_id for r in server.received] == [1, 2]


def test_drop_before_data(server: SmtpServer) -> None:
    server.inject("drop_before_data", times=1)
    client = connect(server)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.send_message(make_message())
    finally:
        client.close()
    assert server.received == []


def test_drop_after_data_over_tls(ca: TestCA) -> None:
    with SmtpServer(security="starttls", ssl_context=ca.server_context()) as server:
        server.inject("drop_after_data")
        client = connect(server)
        try:
            client.starttls(context=ca.client_context())
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.send_message(make_message())
        finally:
            client.close()
        assert len(server.received) == 1


@pytest.mark.parametrize(
    "response",
    [
        None,
        "535 5.7.3 Authentication unsuccessful [BN0PR04CA0001.namprd04.prod.outlook.com]",
    ],
)
def test_auth_response_fault(tls_server: SmtpServer, ca: TestCA, response: str | None) -> None:
    tls_server.inject("auth_response", times=1, response=response)
    with tls_client(tls_server, ca) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth("XOAUTH2", xoauth2(SENDER, TOKEN))
        assert info.value.smtp_code == 535
        expected = (response or Fault("auth_response").reply or "")[4:]
        assert info.value.smtp_error == expected.encode()
        client.auth("XOAUTH2", xoauth2(SENDER, TOKEN))  # only once
    assert tls_server.auth_successes == 1


def test_close_idle_after_n_messages(server: SmtpServer) -> None:
    server.inject("close_idle", after_messages=2, times=1)
    client = connect(server)
    try:
        client.send_message(make_message(1))
        client.send_message(make_message(2))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()
    with connect(server) as client:
        for n in range(3, 6):
            client.send_message(make_message(n))
        assert client.noop()[0] == 250
    assert server.connections == 2
    assert len(server.message_ids()) == 5


def test_close_idle_with_421(server: SmtpServer) -> None:
    server.inject("close_idle", response="421 4.4.2 mx.test Error: timeout exceeded")
    client = connect(server)
    try:
        client.send_message(make_message())
        assert client.noop()[0] == 421
    finally:
        client.close()


def test_faults_change_at_run_time_skip_and_clear(server: SmtpServer) -> None:
    with connect(server) as client:
        server.inject("data_temporary", skip=1)
        client.send_message(make_message(1))
        with pytest.raises(smtplib.SMTPDataError):
            client.send_message(make_message(2))
        server.clear_faults("data_temporary")
        client.send_message(make_message(3))
    assert server.message_ids() == ["<msg-1@crm.test>", "<msg-3@crm.test>"]


def test_unknown_fault_is_rejected(server: SmtpServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.inject("nope")  # type: ignore[arg-type]


def test_refuse_after_stop_and_restart_on_same_port() -> None:
    server = SmtpServer().start()
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", SmtpServer.free_port()), timeout=2)
    with server:
        assert server.port == port
        with connect(server) as client:
            client.send_message(make_message())
    assert len(server.received) == 1


def test_stop_closes_open_connections() -> None:
    server = SmtpServer().start()
    client = connect(server)
    try:
        client.ehlo()
        server.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()


# -- recording ---------------------------------------------------------------------------


def test_counters_connection_ids_and_wait_for(server: SmtpServer) -> None:
    for _ in range(2):
        with connect(server) as client:
            client.send_message(make_message(1))
            client.rset()
            client.send_message(make_message(2))
    received = server.wait_for(4, timeout=1)
    assert [r.connection_id for r in received] == [1, 1, 2, 2]
    assert server.connections == 2
    assert server.rsets == 2
    assert server.message_ids() == ["<msg-1@crm.test>", "<msg-2@crm.test>"] * 2
    with pytest.raises(TimeoutError):
        server.wait_for(5, timeout=0)  # not there yet: no waiting needed to know
    server.clear_records()
    assert (server.received, server.connections) == ([], 0)


def test_data_is_recorded_byte_exact_after_dot_unstuffing(server: SmtpServer) -> None:
    raw = b"Message-ID: <dots@crm.test>\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\n"
    with connect(server) as client:
        client.sendmail(SENDER, ["rcpt@example.org"], raw)
    (received,) = server.received
    assert received.data == raw
    assert received.message.get_content().splitlines() == [".leading dot", "..two"]


def test_find_message_id_handles_folding_and_missing() -> None:
    assert find_message_id(b"Subject: x\r\nMessage-Id:\r\n <a@b>\r\n\r\nbody") == "<a@b>"
    assert find_message_id(b"Subject: x\r\n\r\nMessage-ID: <not@header>\r\n") is None


# -- SMTPUTF8 --------------------------------------------------------------------------


def test_smtputf8_on(server: SmtpServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        client.send_message(make_message(to="jürgen@exämple.org"))
    (received,) = server.received
    assert received.smtp_utf8
    assert received.rcpt_tos == ["jürgen@exämple.org"]


def test_smtputf8_off() -> None:
    with SmtpServer(smtputf8=False) as server, connect(server) as client:
        client.ehlo()
        assert not client.has_extn("smtputf8")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.send_message(make_message(to="jürgen@exämple.org"))
        # A client that sends UTF-8 anyway is refused by the server.
        assert client.docmd("MAIL", "FROM:<a@example.com> SMTPUTF8")[0] == 501


# -- process mode ----------------------------------------------------------------------


def test_process_mode_records_message_ids(tmp_path: Path) -> None:
    with start_smtp_process(tmp_path, auth_user="bench", auth_password="pw") as proc:
        with smtplib.SMTP(proc.host, proc.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPSenderRefused):
                client.send_message(make_message(0))  # auth is required
            client.login("bench", "pw")
            for n in range(50):
                client.send_message(make_message(n))
            sent = [f"<msg-{n}@crm.test>" for n in range(50)]
            # Each one is reported as it is accepted, while the server runs.
            assert proc.wait_for(50, timeout=5) == sent
        assert proc.stop() == 0
    assert proc.message_ids() == sent  # and recorded in the file
    assert proc.accepted() == sent


def test_process_mode_starttls(tmp_path: Path, ca: TestCA) -> None:
    with (
        start_smtp_process(tmp_path, security="starttls", ca=ca) as proc,
        smtplib.SMTP(proc.host, proc.port, timeout=5) as client,
    ):
        client.starttls(context=ca.client_context())
        client.send_message(make_message())
        assert proc.wait_for(1, timeout=5) == ["<msg-1@crm.test>"]
    assert proc.message_ids() == ["<msg-1@crm.test>"]
