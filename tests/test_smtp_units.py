"""Pure functions of the SMTP transport: reply hints, classification, settings, rendering."""

from __future__ import annotations

import base64
import email
import email.policy
import ipaddress
import smtplib
import socket
import ssl
from email.message import EmailMessage

import pytest

from crm_core.errors import Problem, SettingValueError
from crm_core.fields import Scope
from crm_core.mail.message import Attachment
from crm_core.mail.render import _mime_render
from crm_core.mail.transport import Outcome, SenderAccount, SettingValue
from crm_core.models import utcnow
from crm_core.secret_box import Secret
from smtp_mail.classify import Phase, connection_failure, disconnected, reply_failure
from smtp_mail.client import mask
from smtp_mail.hints import enhanced_code, explain, reply_code
from smtp_mail.render import Unsendable, prepare
from smtp_mail.settings import (
    AuthMode,
    Security,
    SmtpSettings,
    check,
    is_loopback,
    sending_problems,
    smtp_fields,
)
from tests.conftest import CrmFactory
from tests.smtp_fixtures import database_url as database_url
from tests.smtp_fixtures import make_message, make_smtp_crm

SETTINGS = SmtpSettings(
    host="smtp.example.net",
    port=587,
    security=Security.STARTTLS,
    auth=AuthMode.PASSWORD,
    username="anna@example.com",
    password=Secret("pw"),
    timeout=30,
    ca_bundle=None,
    email="anna@example.com",
)

# --- hints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("5.7.139 Authentication unsuccessful", "5.7.139"),
        ("2.0.0 OK queued as 10.1.2.3", "2.0.0"),
        ("Authentication unsuccessful from 10.1.2.3", ""),
        ("4.7.0 Temporary authentication failure", "4.7.0"),
    ],
)
def test_enhanced_code(text: str, code: str) -> None:
    assert enhanced_code(text) == code


def test_reply_code_joins_basic_and_enhanced() -> None:
    assert reply_code(535, "5.7.3 Authentication unsuccessful") == "535 5.7.3"
    assert reply_code(550, "Mailbox unavailable") == "550"


@pytest.mark.parametrize(
    ("code", "text", "meaning"),
    [
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
            "the Tenant.",
            "disabled for the whole Microsoft 365 tenant",
        ),
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
            "the Mailbox.",
            "disabled for this mailbox",
        ),
        (
            535,
            "5.7.139 Authentication unsuccessful, user is locked by your organization's "
            "security defaults policy.",
            "security defaults",
        ),
        (
            535,
            "5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            "Basic authentication is disabled",
        ),
        (
            535,
            "5.7.139 Authentication unsuccessful, the user credentials were incorrect.",
            "wrong username or password",
        ),
        (
            535,
            "5.7.30 Basic authentication is not supported for Client Submission.",
            "no longer accepts basic authentication",
        ),
        (530, "5.7.57 Client not authenticated to send mail.", "not authenticated"),
        (550, "5.7.60 SMTP; Client does not have permissions to send as this sender", "Send As"),
        (535, "5.7.8 Username and Password not accepted.", "username or password"),
        (534, "5.7.9 Application-specific password required.", "app password"),
        (
            550,
            "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            "IP address",
        ),
        (550, "5.1.8 Access denied, bad outbound sender", "blocked this mailbox"),
        (530, "Must issue a STARTTLS command first", "encrypted connection"),
        (530, "5.7.0 Authentication required", "only after a login"),
    ],
)
def test_hints_name_the_real_cause(code: int, text: str, meaning: str) -> None:
    hint = explain(code, text)
    assert hint is not None
    assert meaning in hint.meaning
    assert hint.account_wide
    assert hint.fix


def test_basic_auth_hints_point_to_oauth() -> None:
    for text in (
        "5.7.30 Basic authentication is not supported for Client Submission.",
        "5.7.139 Authentication unsuccessful, basic authentication is disabled.",
    ):
        hint = explain(535, text)
        assert hint is not None and "smtp.auth xoauth2" in hint.fix
        for step in ("SMTP.SendAsApp", "New-ServicePrincipal", "Add-MailboxPermission"):
            assert step in hint.fix


def test_a_refused_token_gets_the_oauth_hint() -> None:
    password = explain(535, "5.7.3 Authentication unsuccessful")
    oauth = explain(535, "5.7.3 Authentication unsuccessful", oauth=True)
    assert password is not None and "smtp.password" in password.fix
    assert oauth is not None and "SMTP.SendAsApp" in oauth.fix


@pytest.mark.parametrize(
    "text", ["5.1.1 User unknown", "5.2.2 Mailbox full", "5.3.4 Message size exceeds limit"]
)
def test_message_level_hints_are_not_account_wide(text: str) -> None:
    hint = explain(550, text)
    assert hint is not None and not hint.account_wide


def test_unknown_replies_have_no_hint() -> None:
    assert explain(554, "5.6.0 Message rejected: invalid content") is None


# --- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "code", "text", "outcome"),
    [
        (Phase.AUTH, 535, "5.7.3 Authentication unsuccessful", Outcome.CONFIGURATION),
        (Phase.AUTH, 454, "4.7.0 Temporary authentication failure", Outcome.TEMPORARY),
        (Phase.MAIL, 451, "4.3.0 Try later", Outcome.TEMPORARY),
        (
            Phase.MAIL,
            550,
            "5.7.60 Client does not have permissions to send as this sender",
            Outcome.CONFIGURATION,
        ),
        (Phase.MAIL, 530, "5.7.57 Client not authenticated", Outcome.CONFIGURATION),
        (Phase.MAIL, 552, "5.3.4 Message size exceeds fixed limit", Outcome.PERMANENT),
        (Phase.MAIL, 501, "5.1.7 Bad sender address syntax", Outcome.CONFIGURATION),
        (Phase.RCPT, 550, "5.1.1 User unknown", Outcome.PERMANENT),
        (Phase.RCPT, 450, "4.2.0 Mailbox busy", Outcome.TEMPORARY),
        (Phase.RCPT, 550, "5.7.64 TenantAttribution; Relay Access Denied", Outcome.CONFIGURATION),
        (Phase.DATA, 554, "5.6.0 Message rejected", Outcome.PERMANENT),
        (Phase.DATA, 451, "4.3.0 Deferred", Outcome.TEMPORARY),
        (Phase.DATA, 552, "5.3.4 Message too big", Outcome.PERMANENT),
        (Phase.CONNECT, 421, "4.3.2 Service not available", Outcome.TEMPORARY),
        (Phase.CONNECT, 554, "5.7.1 Your IP is blocked", Outcome.CONFIGURATION),
    ],
)
def test_reply_classification(phase: Phase, code: int, text: str, outcome: Outcome) -> None:
    failure = reply_failure(phase, code, text.encode())
    assert failure.outcome is outcome
    assert str(code) in failure.detail and failure.code.startswith(str(code))


def test_disconnect_before_and_after_the_final_dot() -> None:
    assert disconnected(Phase.DATA, False, "h:25").outcome is Outcome.TEMPORARY
    assert disconnected(Phase.DATA, True, "h:25").outcome is Outcome.AMBIGUOUS


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] verify failed")
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("exc", "outcome", "code"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            Outcome.CONFIGURATION,
            "unknown-host",
        ),
        (
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            Outcome.TEMPORARY,
            "dns-temporary",
        ),
        (
            _verify_error("Hostname mismatch, certificate is not valid for 'x'."),
            Outcome.CONFIGURATION,
            "tls-certificate",
        ),
        (_verify_error("certificate has expired"), Outcome.CONFIGURATION, "tls-certificate"),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            Outcome.CONFIGURATION,
            "tls",
        ),
        (
            ConnectionRefusedError(111, "Connection refused"),
            Outcome.TEMPORARY,
            "connection-refused",
        ),
        (TimeoutError("timed out"), Outcome.TEMPORARY, "timeout"),
        (OSError(101, "Network is unreachable"), Outcome.TEMPORARY, "network"),
        (
            smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
            Outcome.TEMPORARY,
            "disconnected",
        ),
        (
            smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server."),
            Outcome.CONFIGURATION,
            "no-starttls",
        ),
        (
            smtplib.SMTPConnectError(421, b"4.3.2 Too many connections"),
            Outcome.TEMPORARY,
            "421 4.3.2",
        ),
        (UnicodeError("label too long"), Outcome.CONFIGURATION, "bad-host"),
    ],
)
def test_connection_failure_classification(exc: BaseException, outcome: Outcome, code: str) -> None:
    failure = connection_failure(exc, SETTINGS)
    assert (failure.outcome, failure.code) == (outcome, code)
    assert failure.fix


def test_certificate_fixes_differ_by_cause() -> None:
    mismatch = connection_failure(_verify_error("Hostname mismatch"), SETTINGS)
    expired = connection_failure(_verify_error("certificate has expired"), SETTINGS)
    untrusted = connection_failure(_verify_error("self-signed certificate in chain"), SETTINGS)
    assert "name on the server's certificate" in mismatch.fix
    assert "renew" in expired.fix
    assert "tls.ca_bundle" in untrusted.fix and "SSL_CERT_FILE" in untrusted.fix


# --- settings ---------------------------------------------------------------------------


def _validator(key: str) -> object:
    spec = next(f for f in smtp_fields() if f.key == key)
    assert spec.validator is not None
    return spec.validator


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("SMTP.Office365.com", "smtp.office365.com"),
        ("10.0.0.5", "10.0.0.5"),
        ("[::1]", "::1"),
        ("relay-01.corp.local", "relay-01.corp.local"),
    ],
)
def test_host_validator_accepts(raw: str, stored: str) -> None:
    validate = _validator("smtp.host")
    assert callable(validate) and validate(raw) == stored


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("smtp://smtp.office365.com", "looks like a URL"),
        ("smtp.office365.com:587", "contains a port"),
        ("smtp office365.com", "not a server name"),
    ],
)
def test_host_validator_refuses_with_advice(raw: str, words: str) -> None:
    validate = _validator("smtp.host")
    assert callable(validate)
    with pytest.raises(SettingValueError, match=words):
        validate(raw)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.5.5.5", "::1", "[::1]"])
def test_loopback(host: str) -> None:
    assert is_loopback(host)


def _resolves_to_loopback(name: str) -> bool:
    try:
        found = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in found)


def test_a_localhost_name_that_does_not_resolve_to_loopback_is_not_local() -> None:
    """``mail.localhost`` counted as this machine by its name alone; where the resolver
    does not map it to loopback (it goes to DNS, or a hosts file points elsewhere), a
    password would go unencrypted across the network. Now it is refused."""
    name = "crm-mail-test.localhost"
    if _resolves_to_loopback(name):
        pytest.skip(f"this machine's resolver maps {name} to loopback (nss-myhostname)")
    assert not is_loopback(name)
    system: dict[str, SettingValue] = {
        "smtp.host": name,
        "smtp.security": "none",
        "smtp.auth": "password",
    }
    (unsafe,) = [p for p in problems(system) if "unencrypted" in p.message]
    assert unsafe.key == "smtp.security" and name in unsafe.message


@pytest.mark.parametrize("host", ["smtp.example.net", "10.0.0.1", "localhost.example.net"])
def test_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def problems(
    system: dict[str, SettingValue], user: dict[str, SettingValue] | None = None
) -> list[Problem]:
    """What stops an SMTP account with these settings (the installation's own: no user)."""
    email = "a@example.com" if user is not None else ""
    return sending_problems(SenderAccount(0, email, "", "", "smtp", system, user or {}))


def test_plaintext_login_to_a_remote_host_is_an_error_on_each_key_that_makes_it() -> None:
    system: dict[str, SettingValue] = {
        "smtp.host": "relay.example.net",
        "smtp.security": "none",
        "smtp.auth": "password",
    }
    (unsafe,) = [p for p in problems(system) if "unencrypted" in p.message]
    assert {k for k in ("smtp.security", "smtp.auth", "smtp.host") if unsafe.concerns(k)} == {
        "smtp.security",
        "smtp.auth",
        "smtp.host",
    }
    assert unsafe.fix == "crm settings set smtp.security starttls"
    assert not [
        p for p in problems({**system, "smtp.host": "127.0.0.1"}) if p.key == "smtp.security"
    ]
    assert problems({**system, "smtp.auth": "none"}) == []
    # A user's own override is fixed where it was made.
    (mine,) = [p for p in problems({}, system) if "unencrypted" in p.message]
    assert mine.fix == "crm users set a@example.com smtp.security starttls"


def test_xoauth2_lists_the_missing_entra_codes() -> None:
    system: dict[str, SettingValue] = {
        "smtp.host": "smtp.office365.com",
        "smtp.auth": "xoauth2",
        "exchange.tenant_id": "contoso.onmicrosoft.com",
    }
    (problem,) = problems(system)
    assert problem.key == "smtp.auth"
    assert "exchange.client_id, exchange.client_secret" in problem.message
    assert problem.fix == (
        "crm settings set exchange.client_id; crm settings set exchange.client_secret"
    )


def test_port_that_does_not_fit_the_security_is_a_warning() -> None:
    (notice,) = check(Scope.SYSTEM, {"smtp.security": "ssl", "smtp.port": 587}, None, None)
    assert (notice.key, notice.level) == ("smtp.port", "warning")


def test_user_checks_only_for_users_of_smtp() -> None:
    system: dict[str, SettingValue] = {"smtp.host": "smtp.example.net", "smtp.security": "ssl"}
    user: dict[str, SettingValue] = {"mail.transport": "maildir", "smtp.port": 587}
    assert check(Scope.USER, system, user, "a@example.com") == []
    user["mail.transport"] = "smtp"
    assert [n.key for n in check(Scope.USER, system, user, "a@example.com")] == ["smtp.port"]
    assert [(p.key, p.fix) for p in problems(system, {})] == [
        ("smtp.username", "crm users set a@example.com smtp.username"),
        ("smtp.password", "crm users set a@example.com smtp.password"),
    ]
    oauth_user: dict[str, SettingValue] = {"smtp.auth": "xoauth2"}
    # The username defaults to the e-mail; the codes are missing, and the token would go
    # to a server that is neither Microsoft's nor listed in smtp.oauth_hosts.
    assert [p.key for p in problems(system, oauth_user)] == ["smtp.host", "smtp.auth"]


def test_user_checks_follow_the_product_lines_default_transport() -> None:
    system: dict[str, SettingValue] = {"smtp.security": "ssl", "smtp.port": 587}
    # No mail.transport of their own: the core says their line defaults to smtp.
    assert [n.key for n in check(Scope.USER, system, {}, "a@example.com", "smtp")] == ["smtp.port"]
    assert check(Scope.USER, system, {"smtp.username": "a"}, "a@example.com", "maildir") == []


# --- rendering ----------------------------------------------------------------------------


def test_eight_bit_text_is_quoted_printable_for_a_server_without_8bitmime() -> None:
    message = make_message(text="Hälsningar från Malmö\n", html="<p>Hälsningar</p>")
    envelope = prepare(message, {"size": "0"}, "h:25")
    assert envelope.data.isascii()
    assert b"quoted-printable" in envelope.data
    assert b"H=C3=A4lsningar" in envelope.data
    assert "BODY=8BITMIME" not in envelope.options


def test_size_is_declared_and_enforced() -> None:
    small = prepare(make_message(), {"size": "100000"}, "h:25")
    assert small.options[0] == f"SIZE={len(small.data)}"
    big = make_message(
        attachments=[Attachment("a.bin", "application/octet-stream", b"x" * 200_000)]
    )
    with pytest.raises(Unsendable) as refused:
        prepare(big, {"size": "100000"}, "h:25")
    assert refused.value.failure.outcome is Outcome.PERMANENT
    assert "accepts at most 0.1 MB" in refused.value.failure.detail


def test_envelope_uses_idna_and_keeps_bcc_out_of_the_headers() -> None:
    envelope = prepare(make_message(to=["info@bücher.de"], bcc=["arkiv@example.com"]), {}, "h:25")
    assert envelope.recipients == ("info@xn--bcher-kva.de", "arkiv@example.com")
    assert b"arkiv" not in envelope.data
    assert b"To: info@xn--bcher-kva.de" in envelope.data


# --- hooks without network ------------------------------------------------------------------


def test_describe_route_and_reconcile_without_network(make_crm: CrmFactory) -> None:
    setup = make_smtp_crm(make_crm())
    setup.set_system(smtp_host="smtp.office365.com")
    setup.set_user(smtp_username="anna@contoso.se", smtp_password="pw")
    account = setup.account()

    route = setup.crm.describe_route(account)
    (reconciled,) = setup.crm.reconcile_mail(account, [make_message()], utcnow())

    assert route is not None
    assert (route.transport, route.server, route.account) == (
        "smtp",
        "smtp.office365.com:587",
        "anna@contoso.se",
    )
    assert route.notes == ("security starttls", "auth password")
    assert reconciled.sent is None and "SMTP cannot look up" in reconciled.detail


def test_user_may_override_the_server(make_crm: CrmFactory) -> None:
    setup = make_smtp_crm(make_crm())
    setup.set_system(smtp_host="relay.corp.example", smtp_auth="none", smtp_security="none")
    setup.set_user(
        smtp_host="smtp.gmail.com",
        smtp_security="ssl",
        smtp_auth="password",
        smtp_username="anna@gmail.com",
        smtp_password="app-password",
    )

    route = setup.crm.describe_route(setup.account())

    assert route is not None
    assert (route.server, route.account) == ("smtp.gmail.com:465", "anna@gmail.com")


def test_an_echoed_sasl_line_is_masked() -> None:
    sasl = base64.b64encode(b"\0anna@example.com\0hemligt").decode()
    reply = f"501 5.5.4 Invalid argument {sasl} (hemligt)".encode()
    masked = mask(reply, [sasl.encode(), b"hemligt", b""])
    assert masked == b"501 5.5.4 Invalid argument ******** (********)"


def test_starttls_required_gets_the_encryption_hint() -> None:
    hint = explain(451, "5.7.3 STARTTLS is required to send mail")
    assert hint is not None and "smtp.security starttls" in hint.fix


# --- the fast rendering path agrees with the full one ------------------------------------


def _parsed(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _semantics(mime: EmailMessage) -> dict[str, object]:
    """What a recipient's mail program sees: decoded headers, parts and their text."""

    def addresses(name: str) -> list[tuple[str, str]]:
        header = mime.get(name)
        if header is None:
            return []
        return [(a.display_name, a.addr_spec) for a in header.addresses]

    parts = [
        (p.get_content_type(), p.get_content().replace("\r\n", "\n"))
        for p in mime.walk()
        if not p.is_multipart()
    ]
    return {
        "message-id": mime["Message-ID"],
        "date": mime["Date"].datetime,
        "subject": mime["Subject"],
        "from": addresses("From"),
        "to": addresses("To"),
        "cc": addresses("Cc"),
        "reply-to": addresses("Reply-To"),
        "bcc": mime.get("Bcc"),
        "type": mime.get_content_type(),
        "parts": parts,
    }


@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"subject": "Välkommen på visning – Storgatan 1", "text": "Hälsningar från Malmö\n"},
        {"subject": "A long subject " * 12, "html": "<p>Hello <b>there</b></p>"},
        {"sender_name": "Åsa Öberg, mäklare", "to_name": 'Per "P" Persson', "cc": ["c@example.se"]},
        {"to": ["info@bücher.de"], "bcc": ["hidden@example.se"], "html": "<p>Grüße</p>"},
        {"text": "From the top\n.\nno newline at the end", "html": "<p>Hej då</p>"},
    ],
)
def test_fast_rendering_says_what_the_full_rendering_says(
    kwargs: dict[str, object], eight_bit: bool
) -> None:
    message = make_message(**kwargs)  # type: ignore[arg-type]
    features = {"size": "0", **({"8bitmime": ""} if eight_bit else {})}
    envelope = prepare(message, features, "h:25")
    fast = _parsed(envelope.data)
    full = _parsed(_mime_render(message, eight_bit))
    assert _semantics(fast) == _semantics(full)
    head = envelope.data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"\n" not in head.replace(b"\r\n", b"")  # CRLF only
    assert fast["Bcc"] is None
    if not eight_bit:
        assert envelope.data.isascii() and "BODY=8BITMIME" not in envelope.options
