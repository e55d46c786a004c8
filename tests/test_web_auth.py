"""Signing in and out, CSRF, rate limiting and roles, by direct HTTP requests."""

from __future__ import annotations

from typing import Any

from crm_core.signin import MAX_FAILURES
from tests.web_fixtures import (
    ADMIN,
    USER,
    Installation,
    browser_sign_in,
    csrf,
    post,
    screenshot,
    sign_in,
)
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page


def test_a_page_needs_a_signed_in_user(installation: Installation) -> None:
    client = installation.app.test_client()
    answer = client.get("/persons/")
    assert answer.status_code == 302 and "/sign-in?next=/persons/" in answer.location


def test_sign_in_and_out(installation: Installation) -> None:
    client = installation.app.test_client()
    sign_in(client, USER)
    assert "Per Persson" in client.get("/persons/").get_data(as_text=True)
    cookie = client.get_cookie("session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"
    post(client, "/sign-out", {}, page="/persons/")
    assert client.get("/persons/").status_code == 302


def test_a_wrong_password_says_no_more_than_that(installation: Installation) -> None:
    client = installation.app.test_client()
    for email in (USER[0], "nobody@contoso.se"):
        answer = client.post(
            "/sign-in", data={"email": email, "password": "wrong", "csrf_token": csrf(client)}
        )
        assert answer.status_code == 401
        assert "The e-mail or the password is wrong." in answer.get_data(as_text=True)


def test_a_request_without_a_csrf_token_is_refused(installation: Installation) -> None:
    client = installation.app.test_client()
    answer = client.post("/sign-in", data={"email": USER[0], "password": USER[2]})
    assert answer.status_code == 400
    assert client.get("/persons/").status_code == 302  # not signed in


def test_sign_in_is_rate_limited_per_account_and_per_address(
    installation: Installation,
) -> None:
    client = installation.app.test_client()

    def attempt(password: str, address: str) -> int:
        answer = client.post(
            "/sign-in",
            data={"email": USER[0], "password": password, "csrf_token": csrf(client)},
            environ_base={"REMOTE_ADDR": address},
        )
        return int(answer.status_code)

    codes = [attempt("wrong", f"10.0.0.{n}") for n in range(MAX_FAILURES)]
    assert codes == [401] * MAX_FAILURES
    assert attempt(USER[2], "10.0.0.99") == 429  # the account is locked, even right
    other: Any = installation.app.test_client()
    for n in range(MAX_FAILURES):
        other.post(
            "/sign-in",
            data={"email": f"x{n}@contoso.se", "password": "x", "csrf_token": csrf(other)},
            environ_base={"REMOTE_ADDR": "10.9.9.9"},
        )
    locked = other.post(
        "/sign-in",
        data={"email": ADMIN[0], "password": ADMIN[2], "csrf_token": csrf(other)},
        environ_base={"REMOTE_ADDR": "10.9.9.9"},
    )
    assert locked.status_code == 429  # the address is locked for every account


def test_a_user_changes_their_own_password(installation: Installation) -> None:
    client = installation.app.test_client()
    sign_in(client, USER)
    data = {"current": USER[2], "new": "a-new-password-2", "repeat": "a-new-password-2"}
    assert post(client, "/account/password", data).status_code == 302
    fresh = installation.app.test_client()
    sign_in(fresh, (USER[0], USER[1], "a-new-password-2"))
    short = post(
        client,
        "/account/password",
        {**data, "current": "a-new-password-2", "new": "short", "repeat": "short"},
    )
    assert short.status_code == 400 and "at least 10 characters" in short.get_data(as_text=True)


def test_sign_in_by_keyboard_in_a_real_browser(page: Any) -> None:
    browser_sign_in(page, USER)
    assert page.get_by_role("heading", name="Persons").is_visible()
    screenshot(page, "persons")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/sign-in")
    assert page.get_by_text("You are signed out.").is_visible()
