"""Pure functions of the Exchange transport: validation, notices, classification.

No server is involved; these pin the rules and the texts, so a change to a message
or a mapping is a visible, deliberate change.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta

import pytest
import requests
import urllib3.exceptions
from exchangelib import errors as ews

from crm_core.entra import AppCredentials, Credential, expiries, expiry_notices, explain_token_error
from crm_core.errors import Problem, SettingValueError, TokenError
from crm_core.fields import Scope
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import Outcome, SenderAccount, SettingValue
from crm_core.secret_box import Secret
from exchange_mail.auth import _Redact
from exchange_mail.errors import SENT_ITEMS_LAG, failed_before_sending, lookup_verdict, token_roles
from exchange_mail.ews import MAX_MESSAGES_PER_REQUEST, _Ready, _requests
from exchange_mail.ews_errors import ServerError, classify
from exchange_mail.graph_errors import MISSING, Answer, classify_answer
from exchange_mail.settings import (
    EXAMPLE_URL as EXAMPLE,
)
from exchange_mail.settings import (
    Api,
    AuthMode,
    ExchangeSettings,
    blocking_problems,
    check,
    domain_mismatch,
    resolve,
    validate_ews_url,
)
from tests.exchange_fixtures import make_message

# --- the Exchange URL -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://outlook.office365.com/EWS/Exchange.asmx",
        "https://mail.organisation.se/EWS/Exchange.asmx",
        "https://mail.organisation.se:8443/EWS/Exchange.asmx",
        "https://mail.organisation.se/exchange/EWS/Exchange.asmx",
        "  https://MAIL.Organisation.se/EWS/Exchange.asmx  ",
    ],
)
def test_url_accepted(url: str) -> None:
    assert validate_ews_url(url) == url.strip().replace(
        "MAIL.Organisation.se", "mail.organisation.se"
    )


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [
        ("https://mail.org.se/ews/exchange.asmx", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/EWS/exchange.asmx", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/Ews/Exchange.ASMX", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/EWS/Exchange.asmx/", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/EWS", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/owa", "https://mail.org.se/EWS/Exchange.asmx"),
        ("https://mail.org.se/x/ews/exchange.asmx", "https://mail.org.se/x/EWS/Exchange.asmx"),
        ("https://mail.org.se:444/ews/exchange.asmx", "https://mail.org.se:444/EWS/Exchange.asmx"),
    ],
)
def test_near_miss_is_refused_with_the_corrected_url(url: str, suggestion: str) -> None:
    with pytest.raises(SettingValueError) as refused:
        validate_ews_url(url)
    message = str(refused.value)
    assert message.startswith("Invalid value for exchange.url: the URL must end with exactly")
    assert "/EWS/Exchange.asmx (letter case matters)" in message
    assert message.endswith(f"did you mean {suggestion} ?")


def test_http_is_refused_with_the_https_url() -> None:
    with pytest.raises(
        SettingValueError,
        match=r"must use https; did you mean https://mail\.org\.se/EWS/Exchange\.asmx",
    ):
        validate_ews_url("http://mail.org.se/EWS/Exchange.asmx")


@pytest.mark.parametrize(
    "text", ["outlook.office365.com", "not a url", "ftp://x.se/EWS/Exchange.asmx"]
)
def test_not_a_url(text: str) -> None:
    with pytest.raises(SettingValueError, match=re.escape(EXAMPLE)):
        validate_ews_url(text)


# --- notices ------------------------------------------------------------------------


TODAY = date(2026, 11, 28)


@pytest.mark.parametrize(
    ("expires", "expected", "threshold"),
    [
        (date(2027, 1, 28), None, None),  # 61 days
        (date(2027, 1, 27), "expires in 60 days (2027-01-27)", 60),
        (date(2026, 12, 29), "expires in 31 days (2026-12-29)", 60),
        (date(2026, 12, 28), "expires in 30 days (2026-12-28)", 30),
        (date(2026, 12, 5), "expires in 7 days (2026-12-05)", 7),
        (date(2026, 11, 29), "expires in 1 day (2026-11-29)", 7),
        (date(2026, 11, 28), "expires today (2026-11-28)", 7),
        (date(2026, 11, 27), "expired on 2026-11-27", 0),
    ],
)
def test_secret_expiry_warns_from_60_days_before(
    expires: date, expected: str | None, threshold: int | None
) -> None:
    values: dict[str, SettingValue] = {
        "exchange.client_secret": Secret("s3cret"),
        "exchange.client_secret_expires": expires,
    }
    (found,) = expiries(values, TODAY)
    assert found.threshold == threshold
    notices = expiry_notices(values, TODAY)
    assert [n.message for n in notices if expected and expected in n.message] == [
        n.message for n in notices
    ]
    assert bool(notices) is (expected is not None)


def test_system_notices() -> None:
    system: dict[str, SettingValue] = {
        "exchange.client_secret": Secret("3e1d9c2b-7a6f-4e5d-8c9b-0a1b2c3d4e5f"),
        "exchange.client_secret_expires": date(2026, 12, 10),
        "exchange.url": "https://outlook.office365.com/EWS/Exchange.asmx",
        "exchange.api": "ews",
    }
    notices = {n.key: n for n in check(Scope.SYSTEM, system, None, TODAY)}
    assert notices["exchange.client_secret"].level == "warning"
    assert "looks like a Secret ID" in notices["exchange.client_secret"].message
    assert "expires in 12 days" in notices["exchange.client_secret_expires"].message
    retirement = notices["exchange.url"].message
    assert "1 October 2026" in retirement and "1 April 2027" in retirement
    assert "exchange.api auto, or graph" in retirement
    assert "3e1d9c2b" not in " ".join(n.message for n in notices.values())


def test_no_retirement_notice_on_premises_or_with_graph() -> None:
    onprem = {"exchange.url": "https://mail.org.se/EWS/Exchange.asmx"}
    assert check(Scope.SYSTEM, onprem, None, TODAY) == []
    graph = {
        "exchange.url": "https://outlook.office365.com/EWS/Exchange.asmx",
        "exchange.api": "graph",
    }
    assert check(Scope.SYSTEM, graph, None, TODAY) == []


def test_user_notices_are_advice_and_problems_stop_sending() -> None:
    user: dict[str, SettingValue] = {
        "exchange.username": "anna@vitec.se",
        "exchange.domain": "vitecsoftware.com",
    }
    notices = check(Scope.USER, {}, user, TODAY, "exchange")
    assert [(n.key, n.level) for n in notices] == [("exchange.username", "warning")]
    assert "anna@vitec.se is in domain vitec.se, but exchange.domain is vitecsoftware.com" in (
        notices[0].message
    )

    def problems(system: dict[str, SettingValue]) -> dict[str, Problem]:
        account = SenderAccount(1, "anna@vitec.se", "Anna", "sales", "exchange", system, user)
        return {p.key: p for p in blocking_problems(account, resolve(account))}

    found = problems({})
    assert "exchange.url" in found  # EWS (the default) needs the URL
    assert "'Sync with Exchange' is not ticked" in found["exchange.sync"].message
    assert found["exchange.sync"].fix == "crm users set anna@vitec.se exchange.sync true"
    user["exchange.sync"] = True
    user["exchange.password"] = Secret("pw")
    assert problems({"exchange.url": "https://mail.org.se/EWS/Exchange.asmx"}) == {}
    assert list(problems({"exchange.api": "graph"})) == ["exchange.api"]  # no URL needed


def test_domain_mismatch_is_case_insensitive() -> None:
    assert domain_mismatch("Anna@Contoso.SE", "contoso.se") is None
    assert domain_mismatch("", "contoso.se") is None


# --- Entra error codes (never the description) ---------------------------------------


CREDS = AppCredentials(
    "https://login.microsoftonline.com",
    "contoso.se",
    "0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c",
    (Credential("exchange.client_secret", Secret("s3cret"), expires=date(2026, 3, 1)),),
)


@pytest.mark.parametrize(
    ("codes", "error", "start", "outcome"),
    [
        (
            [7000215],
            "invalid_client",
            "The client secret is not valid (AADSTS7000215)",
            Outcome.CONFIGURATION,
        ),
        (
            [7000222],
            "invalid_client",
            "The client secret has expired on 2026-03-01 (AADSTS7000222).",
            Outcome.CONFIGURATION,
        ),
        (
            [700016],
            "unauthorized_client",
            "Client ID 0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c is not an application in tenant "
            "contoso.se (AADSTS700016).",
            Outcome.CONFIGURATION,
        ),
        ([90002], "invalid_tenant", "Tenant contoso.se was not found", Outcome.CONFIGURATION),
        ([900023], "invalid_request", "Tenant contoso.se was not found", Outcome.CONFIGURATION),
        ([65001], "invalid_grant", "Admin consent has not been granted", Outcome.CONFIGURATION),
        ([90055], "temporarily_unavailable", "Entra ID is busy", Outcome.TEMPORARY),
        ([], "temporarily_unavailable", "Entra ID is busy", Outcome.TEMPORARY),
        (
            [1234567],
            "invalid_request",
            "Entra ID refused the token request (AADSTS1234567).",
            Outcome.CONFIGURATION,
        ),
    ],
)
def test_entra_codes(codes: list[int], error: str, start: str, outcome: Outcome) -> None:
    found = explain_token_error({"error": error, "error_codes": codes}, CREDS)
    assert found.message.startswith(start)
    assert found.outcome is outcome


def test_entra_mapping_ignores_the_description() -> None:
    result = {
        "error": "invalid_client",
        "error_codes": [7000222],
        "error_description": "AADSTS7000215: Invalid client secret provided.",
    }
    assert explain_token_error(result, CREDS).code == "AADSTS7000222"


def test_adfs_tenant_is_accepted() -> None:
    from crm_core.entra import entra_fields

    [tenant] = [f for f in entra_fields() if f.key == "exchange.tenant_id"]
    assert tenant.validator is not None and tenant.validator("ADFS") == "adfs"
    with pytest.raises(SettingValueError, match="cannot be used for app-only tokens"):
        tenant.validator("common")


def test_well_known_authority_hosts() -> None:
    assert CREDS.well_known_host  # msal may do instance discovery
    adfs = AppCredentials("https://adfs.organisation.se", "adfs", CREDS.client_id, ())
    assert not adfs.well_known_host  # msal must not (instance_discovery=False)


# --- classification of exchangelib's exceptions -----------------------------------------


def settings(
    url: str = "https://mail.org.se/EWS/Exchange.asmx", mode: AuthMode = AuthMode.OAUTH
) -> ExchangeSettings:
    return ExchangeSettings(
        url=url,
        api=Api.EWS,
        graph_url="https://graph.microsoft.com",
        mode=mode,
        mailbox="anna@org.se",
        domain="org.se",
        sync=True,
        app=CREDS if mode is AuthMode.OAUTH else None,
        password=None,
        onprem_auth="ntlm",
        server_version="",
        ca_bundle=None,
    )


def raised_from(outer: type[Exception], inner: BaseException, *args: object) -> Exception:
    """``outer`` raised while handling ``inner``, as exchangelib re-raises."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer(*args)  # noqa: B904 - exchangelib re-raises without "from"
    except Exception as exc:
        return exc


def test_server_busy_back_off() -> None:
    found = classify(ews.ErrorServerBusy("busy", back_off=2.5), settings())
    assert (found.outcome, found.code, found.retry_after) == (
        Outcome.THROTTLED,
        "ErrorServerBusy",
        2.5,
    )


def refused_connection() -> urllib3.exceptions.MaxRetryError:
    """urllib3's own error for a refused connection, as requests wraps it."""
    pool = urllib3.HTTPConnectionPool("mail.example.se")
    connection = urllib3.connection.HTTPConnection("mail.example.se")
    reason = urllib3.exceptions.NewConnectionError(connection, "refused")
    return urllib3.exceptions.MaxRetryError(pool, "/", reason)


def test_timeout_before_and_after_sending() -> None:
    refused = requests.exceptions.ConnectionError(refused_connection())
    before = raised_from(ews.ErrorTimeoutExpired, refused, "Reraised from ConnectionError")
    assert failed_before_sending(before)
    assert classify(before, settings()).outcome is Outcome.TEMPORARY

    lost = requests.exceptions.ConnectionError("Connection aborted.", ConnectionResetError())
    after = raised_from(ews.ErrorTimeoutExpired, lost, "Reraised from ConnectionError")
    assert classify(after, settings()).outcome is Outcome.AMBIGUOUS
    read_timeout = raised_from(ews.ErrorTimeoutExpired, requests.exceptions.ReadTimeout(), "x")
    assert classify(read_timeout, settings()).outcome is Outcome.AMBIGUOUS
    # exchangelib turns a timeout into ErrorServerBusy when its pool has room: still ambiguous.
    busy = raised_from(ews.ErrorServerBusy, after, "Reraised from ErrorTimeoutExpired")
    assert classify(busy, settings()).outcome is Outcome.AMBIGUOUS


@pytest.mark.parametrize(
    ("exc", "outcome", "code"),
    [
        (ews.UnauthorizedError("Invalid credentials"), Outcome.CONFIGURATION, "HTTP 401"),
        (ews.ErrorNonExistentMailbox("x"), Outcome.CONFIGURATION, "ErrorNonExistentMailbox"),
        (ews.ErrorImpersonateUserDenied("x"), Outcome.CONFIGURATION, "ErrorImpersonateUserDenied"),
        (ews.ErrorAccessDenied("x"), Outcome.CONFIGURATION, "ErrorAccessDenied"),
        (ews.ErrorSendAsDenied("x"), Outcome.CONFIGURATION, "ErrorSendAsDenied"),
        (ews.ErrorQuotaExceeded("x"), Outcome.CONFIGURATION, "ErrorQuotaExceeded"),
        (ews.ErrorInvalidRecipients("x"), Outcome.PERMANENT, "ErrorInvalidRecipients"),
        (ews.ErrorInvalidSmtpAddress("x"), Outcome.PERMANENT, "ErrorInvalidSmtpAddress"),
        (ews.ErrorMailRecipientNotFound("x"), Outcome.PERMANENT, "ErrorMailRecipientNotFound"),
        (ews.ErrorMessageSizeExceeded("x"), Outcome.PERMANENT, "ErrorMessageSizeExceeded"),
        (ews.ErrorSubmissionQuotaExceeded("x"), Outcome.THROTTLED, "ErrorSubmissionQuotaExceeded"),
        (ews.ErrorMailboxStoreUnavailable("x"), Outcome.TEMPORARY, "ErrorMailboxStoreUnavailable"),
        (
            ews.ErrorInternalServerTransientError("x"),
            Outcome.TEMPORARY,
            "ErrorInternalServerTransientError",
        ),
        (
            ews.ErrorInvalidSchemaVersionForMailboxVersion("x"),
            Outcome.CONFIGURATION,
            "ErrorInvalidSchemaVersionForMailboxVersion",
        ),
        (ews.ErrorItemSave("x"), Outcome.TEMPORARY, "ErrorItemSave"),
        (
            ews.MalformedResponseError("Unknown failure in response. Code: 404 headers: {}"),
            Outcome.CONFIGURATION,
            "HTTP 404",
        ),
        (
            ews.MalformedResponseError("Unknown failure in response. Code: 403 headers: {}"),
            Outcome.CONFIGURATION,
            "HTTP 403",
        ),
        (
            ews.MalformedResponseError("Unknown failure in response. Code: 502 headers: {}"),
            Outcome.AMBIGUOUS,
            "HTTP 502",
        ),
        (
            ews.MalformedResponseError("Unknown failure in response. Code: 400 headers: {}"),
            Outcome.TEMPORARY,
            "HTTP 400",
        ),
        (ServerError(500, None, "Internal Server Error"), Outcome.AMBIGUOUS, "HTTP 500"),
        (ServerError(502, None, "Bad Gateway"), Outcome.AMBIGUOUS, "HTTP 502"),
        (ServerError(504, None, "Gateway Timeout"), Outcome.AMBIGUOUS, "HTTP 504"),
        (ServerError(503, None, "Service Unavailable"), Outcome.AMBIGUOUS, "HTTP 503"),
        (ServerError(503, 30.0, "Service Unavailable"), Outcome.THROTTLED, "HTTP 503"),
        (ews.ErrorInternalServerError("x"), Outcome.AMBIGUOUS, "ErrorInternalServerError"),
        (RuntimeError("surprise"), Outcome.AMBIGUOUS, "RuntimeError"),
    ],
)
def test_classification_table(exc: Exception, outcome: Outcome, code: str) -> None:
    found = classify(exc, settings())
    assert (found.outcome, found.code) == (outcome, code)
    assert found.detail


def test_credentials_cases_are_marked_for_the_guides_text() -> None:
    for exc in (
        ews.UnauthorizedError("x"),
        ews.ErrorNonExistentMailbox("x"),
        ews.ErrorImpersonateUserDenied("x"),
    ):
        assert classify(exc, settings()).credentials
    assert not classify(ews.ErrorServerBusy("x"), settings()).credentials


def test_token_errors_pass_through() -> None:
    error = TokenError(
        "The client secret is not valid (AADSTS7000215).", "Copy the Value.", (7000215,)
    )
    found = classify(error, settings())
    assert (found.outcome, found.code, found.credentials) == (
        Outcome.CONFIGURATION,
        "AADSTS7000215",
        True,
    )


def test_403_texts_depend_on_where_exchange_runs() -> None:
    forbidden = ews.MalformedResponseError("Unknown failure in response. Code: 403 headers: {}")
    online = classify(forbidden, settings("https://outlook.office365.com/EWS/Exchange.asmx"))
    assert "Exchange Online refuses EWS" in online.detail and "EwsAllowedAppIDs" in online.fix
    onprem = classify(forbidden, settings(mode=AuthMode.PASSWORD))
    assert onprem.detail == "Exchange at mail.org.se refuses EWS access (HTTP 403)."


def test_tls_failure() -> None:
    tls = raised_from(
        ews.TransportError, requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"), "x"
    )
    found = classify(tls, settings())
    assert (found.outcome, found.code) == (Outcome.CONFIGURATION, "tls")
    assert "tls.ca_bundle" in found.fix


ONLINE = "https://outlook.office365.com/EWS/Exchange.asmx"
UNKNOWN_403 = "Unknown failure in response. Code: 403 headers: {}"
UNKNOWN_404 = "Unknown failure in response. Code: 404 headers: {}"
UNKNOWN_502 = "Unknown failure in response. Code: 502 headers: {}"
UNKNOWN_400 = "Unknown failure in response. Code: 400 headers: {}"
REFUSED = requests.exceptions.ConnectionError(refused_connection())


@pytest.mark.parametrize(
    ("exc", "where", "outcome", "code", "says", "retry_after"),
    [
        pytest.param(
            TokenError("Wrong secret.", "Copy the Value.", (7000215,)), "oauth",
            Outcome.CONFIGURATION, "AADSTS7000215", "Wrong secret.", None, id="token",
        ),
        pytest.param(
            raised_from(ews.ErrorTimeoutExpired, REFUSED, "x"), "oauth",
            Outcome.TEMPORARY, "connect", "Could not connect to mail.org.se", 60.0,
            id="timeout-before-sending",
        ),
        pytest.param(
            raised_from(ews.ErrorTimeoutExpired, requests.exceptions.ReadTimeout(), "x"), "oauth",
            Outcome.AMBIGUOUS, "ErrorTimeoutExpired", "was lost after the request", None,
            id="timeout-after-sending",
        ),
        pytest.param(
            ews.ErrorServerBusy("busy", back_off=2.5), "oauth",
            Outcome.THROTTLED, "ErrorServerBusy", "asked anna@", 2.5, id="busy",
        ),
        pytest.param(
            ews.UnauthorizedError("x"), "oauth",
            Outcome.CONFIGURATION, "HTTP 401", "the token was refused twice", None,
            id="401-oauth",
        ),
        pytest.param(
            ews.UnauthorizedError("x"), "password",
            Outcome.CONFIGURATION, "HTTP 401", "refused the username or password", None,
            id="401-password",
        ),
        pytest.param(
            ews.ErrorNonExistentMailbox("x"), "oauth",
            Outcome.CONFIGURATION, "ErrorNonExistentMailbox", "cannot find a mailbox", None,
            id="no-mailbox",
        ),
        pytest.param(
            ews.ErrorImpersonateUserDenied("x"), "oauth",
            Outcome.CONFIGURATION, "ErrorImpersonateUserDenied", "outside the app's per-mailbox",
            None, id="impersonation-oauth",
        ),
        pytest.param(
            ews.ErrorAccessDenied("x"), "password",
            Outcome.CONFIGURATION, "ErrorAccessDenied", "refused access to the mailbox", None,
            id="access-password",
        ),
        pytest.param(
            ews.ErrorSendAsDenied("x"), "oauth",
            Outcome.CONFIGURATION, "ErrorSendAsDenied", "may not send as", None, id="send-as",
        ),
        *(
            pytest.param(
                error("x"), "oauth",
                Outcome.PERMANENT, error.__name__, "Error validating e-mail", None,
                id=error.__name__,
            )
            for error in (
                ews.ErrorInvalidRecipients,
                ews.ErrorInvalidSmtpAddress,
                ews.ErrorMailRecipientNotFound,
            )
        ),
        pytest.param(
            ews.ErrorMessageSizeExceeded("x"), "oauth",
            Outcome.PERMANENT, "ErrorMessageSizeExceeded", "larger than Exchange accepts", None,
            id="size",
        ),
        pytest.param(
            ews.ErrorSubmissionQuotaExceeded("x"), "oauth",
            Outcome.THROTTLED, "ErrorSubmissionQuotaExceeded", "daily sending limit", None,
            id="sending-limit",
        ),
        pytest.param(
            ews.ErrorQuotaExceeded("x"), "oauth",
            Outcome.CONFIGURATION, "ErrorQuotaExceeded", "is full", None, id="mailbox-full",
        ),
        *(
            pytest.param(
                error("x") if error is not ews.CASError else error("x", None), "oauth",
                Outcome.TEMPORARY, error.__name__, "a passing problem", 60.0, id=error.__name__,
            )
            for error in (
                ews.ErrorTooManyObjectsOpened,
                ews.ErrorMailboxStoreUnavailable,
                ews.ErrorMailboxMoveInProgress,
                ews.ErrorConnectionFailed,
                ews.ErrorInternalServerTransientError,
                ews.ErrorExceededConnectionCount,
                ews.CASError,
            )
        ),
        *(
            pytest.param(
                error("x"), "oauth",
                Outcome.CONFIGURATION, error.__name__, "pinned EWS schema version", None,
                id=error.__name__,
            )
            for error in (
                ews.ErrorInvalidSchemaVersionForMailboxVersion,
                ews.ErrorInvalidServerVersion,
            )
        ),
        pytest.param(
            ews.RedirectError("https://elsewhere.org.se/owa"), "oauth",
            Outcome.CONFIGURATION, "redirect", "redirects to https://elsewhere.org.se/owa", None,
            id="redirect",
        ),
        pytest.param(
            raised_from(ews.TransportError, requests.exceptions.SSLError("VERIFY_FAILED"), "x"),
            "oauth", Outcome.CONFIGURATION, "tls", "could not be verified", None, id="tls",
        ),
        pytest.param(
            ews.MalformedResponseError(UNKNOWN_403), "online",
            Outcome.CONFIGURATION, "HTTP 403", "Exchange Online refuses EWS", None,
            id="403-online",
        ),
        pytest.param(
            ews.MalformedResponseError(UNKNOWN_403), "password",
            Outcome.CONFIGURATION, "HTTP 403", "refuses EWS access", None, id="403-onprem",
        ),
        pytest.param(
            ews.MalformedResponseError(UNKNOWN_404), "oauth",
            Outcome.CONFIGURATION, "HTTP 404", "There is no EWS service", None, id="404",
        ),
        pytest.param(
            ServerError(503, 45.0, "Service Unavailable"), "oauth",
            Outcome.THROTTLED, "HTTP 503", "asks to come back after 45 seconds", 45.0,
            id="503-retry-after",
        ),
        pytest.param(
            ServerError(504, None, "Gateway Timeout"), "oauth",
            Outcome.AMBIGUOUS, "HTTP 504", "may have been carried out", None,
            id="server-error",
        ),
        pytest.param(
            ews.ErrorInternalServerError("x"), "oauth",
            Outcome.AMBIGUOUS, "ErrorInternalServerError", "internal error (x)", None,
            id="internal-server-error",
        ),
        pytest.param(
            ews.MalformedResponseError(UNKNOWN_502), "oauth",
            Outcome.AMBIGUOUS, "HTTP 502", "may have been carried out", None,
            id="server-error-status",
        ),
        pytest.param(
            ews.MalformedResponseError(UNKNOWN_400), "oauth",
            Outcome.TEMPORARY, "HTTP 400", "answered HTTP 400", 60.0, id="other-status",
        ),
        pytest.param(
            ews.ErrorItemSave("x"), "oauth",
            Outcome.TEMPORARY, "ErrorItemSave", "did not take the message", 60.0,
            id="other-response-error",
        ),
        pytest.param(
            RuntimeError("surprise"), "oauth",
            Outcome.AMBIGUOUS, "RuntimeError", "ended with an unexpected error", None,
            id="anything-else",
        ),
    ],
)  # fmt: skip
def test_each_rung_of_classify(
    exc: BaseException,
    where: str,
    outcome: Outcome,
    code: str,
    says: str,
    retry_after: float | None,
) -> None:
    """One case per row of the EWS table: dropping or reordering a row fails here."""
    account = {
        "oauth": settings(),
        "password": settings(mode=AuthMode.PASSWORD),
        "online": settings(ONLINE),
    }[where]
    found = classify(exc, account)
    assert (found.outcome, found.code, found.retry_after) == (outcome, code, retry_after)
    assert says in found.detail


# --- classification of Microsoft Graph's answers -----------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome", "code", "says", "retry_after", "credentials"),
    [
        pytest.param(
            Answer(202, "", "", None),
            Outcome.SENT, "", "sent via Microsoft Graph", None, False, id="2xx",
        ),
        pytest.param(
            MISSING,
            Outcome.AMBIGUOUS, "missing-in-batch", "did not cover this message", None, False,
            id="missing-in-batch",
        ),
        pytest.param(
            Answer(404, "ErrorInvalidUser", "", None),
            Outcome.CONFIGURATION, "ErrorInvalidUser", "cannot find the user anna@org.se", None,
            True, id="invalid-user",
        ),
        pytest.param(
            Answer(401, "ErrorInvalidUser", "", None),
            Outcome.CONFIGURATION, "ErrorInvalidUser", "cannot find the user", None, True,
            id="invalid-user-before-401",
        ),
        pytest.param(
            Answer(404, "Request_ResourceNotFound", "", None),
            Outcome.CONFIGURATION, "Request_ResourceNotFound", "cannot find the user", None,
            True, id="404-not-found",
        ),
        pytest.param(
            Answer(401, "NoPermissionsInAccessToken", "", None),
            Outcome.CONFIGURATION, "NoPermissionsInAccessToken",
            "it carries no application permissions", None, True, id="401-no-consent",
        ),
        pytest.param(
            Answer(401, "", "", None),
            Outcome.CONFIGURATION, "HTTP 401", "the token was refused twice", None,
            True, id="401",
        ),
        pytest.param(
            Answer(403, "ErrorSendAsDenied", "", None),
            Outcome.CONFIGURATION, "ErrorSendAsDenied", "may not send as", None, False,
            id="send-as",
        ),
        pytest.param(
            Answer(403, "ErrorAccessDenied", "", None),
            Outcome.CONFIGURATION, "ErrorAccessDenied",
            "denies the app access to anna@org.se (HTTP 403 ErrorAccessDenied)", None, True,
            id="403",
        ),
        pytest.param(
            Answer(403, "ErrorInvalidRecipients", "", None),
            Outcome.CONFIGURATION, "ErrorInvalidRecipients", "denies the app access", None,
            True, id="403-before-invalid-recipients",
        ),
        pytest.param(
            Answer(400, "ErrorInvalidRecipients", "bad address", None),
            Outcome.PERMANENT, "ErrorInvalidRecipients", "(ErrorInvalidRecipients: bad address)",
            None, False, id="invalid-recipients",
        ),
        pytest.param(
            Answer(400, "ErrorMessageSizeExceeded", "", None),
            Outcome.PERMANENT, "ErrorMessageSizeExceeded", "larger than Microsoft Graph", None,
            False, id="size-code",
        ),
        pytest.param(
            Answer(413, "", "", None),
            Outcome.PERMANENT, "HTTP 413", "larger than Microsoft Graph", None, False,
            id="size-413",
        ),
        pytest.param(
            Answer(400, "RequestEntityTooLarge", "over the 4MB limit", None),
            Outcome.PERMANENT, "RequestEntityTooLarge", "larger than Microsoft Graph", None,
            False, id="size-400-4MB",
        ),
        pytest.param(
            Answer(429, "ApplicationThrottled", "", None),
            Outcome.THROTTLED, "ApplicationThrottled", "asked anna@", 30.0, False,
            id="429",
        ),
        pytest.param(
            Answer(429, "ApplicationThrottled", "", 7.0),
            Outcome.THROTTLED, "ApplicationThrottled", "asked anna@", 7.0, False,
            id="429-retry-after",
        ),
        pytest.param(
            Answer(503, "serviceNotAvailable", "", 12.0),
            Outcome.THROTTLED, "serviceNotAvailable",
            "to wait (HTTP 503 serviceNotAvailable", 12.0, False,
            id="503-retry-after",
        ),
        pytest.param(
            Answer(503, "", "", None),
            Outcome.AMBIGUOUS, "HTTP 503", "answered HTTP 503 (a server error)", None, False,
            id="503-without-retry-after",
        ),
        pytest.param(
            Answer(504, "GatewayTimeout", "", None),
            Outcome.AMBIGUOUS, "GatewayTimeout", "may have been carried out all the same",
            None, False, id="5xx",
        ),
        pytest.param(
            Answer(400, "BadRequest", "over the 4 MB limit", None),
            Outcome.PERMANENT, "BadRequest", "did not take the message", None, False,
            id="other-400",
        ),
        pytest.param(
            Answer(409, "Conflict", "", None),
            Outcome.TEMPORARY, "Conflict", "did not take the message", 60.0, False,
            id="anything-else",
        ),
    ],
)  # fmt: skip
def test_each_rung_of_classify_answer(
    answer: Answer,
    outcome: Outcome,
    code: str,
    says: str,
    retry_after: float | None,
    credentials: bool,
) -> None:
    """One case per row of the Graph table: dropping or reordering a row fails here."""
    found = classify_answer(answer, settings())
    assert (found.outcome, found.code, found.retry_after) == (outcome, code, retry_after)
    assert says in found.detail
    assert found.credentials is credentials


# --- the verdict of a lookup ------------------------------------------------------------

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("where", "handed_over", "sent", "says"),
    [
        pytest.param("Outbox", None, True, "found in anna@org.se's Outbox", id="outbox"),
        pytest.param(
            "Sent Items", None, True, "found in anna@org.se's Sent Items", id="sent-items"
        ),
        pytest.param(None, timedelta(0), None, "look again later", id="just-handed-over"),
        pytest.param(
            None, SENT_ITEMS_LAG - timedelta(seconds=1), None, "299 s after", id="in-window"
        ),
        pytest.param(None, SENT_ITEMS_LAG, False, "not in anna@org.se's", id="window-over"),
        # Never handed to Exchange: there is no copy on its way.
        pytest.param(None, None, False, "Outbox or Sent Items", id="never-handed-over"),
    ],
)
def test_lookup_verdict_counts_from_the_last_hand_over(
    where: str | None, handed_over: timedelta | None, sent: bool | None, says: str
) -> None:
    # Queued a day ago: the enqueue never counts.
    message = make_message(age=timedelta(days=1))
    at = None if handed_over is None else NOW - handed_over
    message = type(message)(**{**message.__dict__, "handed_over_at": at})
    verdict = lookup_verdict(message, where, "anna@org.se", NOW)
    assert verdict.sent is sent
    assert says in verdict.detail


def test_lookup_verdict_takes_a_naive_hand_over_as_utc() -> None:
    message = make_message()
    naive = (NOW - timedelta(minutes=1)).replace(tzinfo=None)
    message = type(message)(**{**message.__dict__, "handed_over_at": naive})
    assert lookup_verdict(message, None, "anna@org.se", NOW).sent is None


# --- odds and ends ----------------------------------------------------------------------


def test_token_roles() -> None:
    import base64
    import json

    def jwt(claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"e30.{body}.sig"

    assert token_roles(jwt({"roles": ["full_access_as_app"]})) == ("full_access_as_app",)
    assert token_roles(jwt({"aud": "x"})) == ()
    assert token_roles("opaque-token") is None


def test_requests_are_split_by_count_and_size() -> None:
    from crm_core.mail.message import Attachment

    def ready(*messages: OutgoingMessage) -> list[_Ready]:
        return [_Ready(m, None, m.size_estimate()) for m in messages]

    many = ready(*(make_message(n) for n in range(2 * MAX_MESSAGES_PER_REQUEST + 1)))
    assert [len(c) for c in _requests(many)] == [
        MAX_MESSAGES_PER_REQUEST,
        MAX_MESSAGES_PER_REQUEST,
        1,
    ]
    big = make_message(
        attachments=[Attachment("b.bin", "application/octet-stream", b"x" * 6_000_000)]
    )
    assert [len(c) for c in _requests(ready(big, big, make_message()))] == [1, 2]


@pytest.mark.parametrize(
    "text",
    [
        "Request headers: {'Authorization': 'Bearer eyJ0eXAi.payload.sig', 'X': 'y'}",
        "Adding token {'access_token': 'eyJ0eXAi.payload.sig', 'token_type': 'Bearer'} to request.",
        "headers {'Authorization': 'Basic Ym86cGFzc3dvcmQ='}",
        "body client_secret=Qx8~secret&scope=x",
    ],
)
def test_log_redaction(text: str) -> None:
    record = logging.LogRecord("exchangelib.util", logging.DEBUG, __file__, 1, "%s", (text,), None)
    assert _Redact().filter(record)
    shown = record.getMessage()
    for secret in ("eyJ0eXAi.payload.sig", "Ym86cGFzc3dvcmQ=", "Qx8~secret"):
        assert secret not in shown
    assert "********" in shown


def test_settings_commands_do_not_import_exchangelib() -> None:
    import subprocess
    import sys

    probe = "import sys, exchange_mail; print(sorted({'exchangelib', 'msal'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_in_flight_window_covers_one_request_of_either_api() -> None:
    from exchange_mail import graph
    from exchange_mail.ews import MAX_MESSAGES_PER_REQUEST
    from exchange_mail.plugin import IN_FLIGHT

    assert max(MAX_MESSAGES_PER_REQUEST, graph.MAX_BATCH) == IN_FLIGHT
