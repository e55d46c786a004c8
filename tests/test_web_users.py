"""Users on the web: the list and the Basic tab for administrators, each user's own
E-mail tab, and Test connection, green and red, with and without JavaScript.

Direct HTTP requests (Flask's test client) prove who may see what and that no page
shows a stored secret; Debian's Chromium drives the guide's set-up against the local
Entra ID and EWS stand-ins.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from playwright.sync_api import expect

from crm_core import audit, directory
from crm_core.models import User
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    ALIAS,
    ONPREM_PASSWORD,
    TENANT_DOMAIN,
    ExchangeWorld,
    exchange_world,
)
from tests.exchange_fixtures import ca as ca
from tests.servers.tls import TestCA
from tests.test_plugin_example import CONFIG as ACME_CONFIG
from tests.test_plugin_example import Acme, load_example
from tests.test_plugin_example import acme as acme
from tests.web_fixtures import (
    ADMIN,
    OTHER,
    USER,
    Installation,
    browser_sign_in,
    client_for,
    csrf,
    post,
    screenshot,
    site_of,
)
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page

SMTP_PASSWORD = "smtp-Pa55word-never-shown"
TRANSPORT = "mail.transport"


def user_id(installation: Installation, who: tuple[str, str, str]) -> int:
    with installation.crm.transaction() as session:
        return directory.find_user(session, who[0]).id


def user_values(installation: Installation, who: tuple[str, str, str]) -> dict[str, Any]:
    crm = installation.crm
    with crm.transaction() as session:
        return dict(crm.settings_store().user_values(session, user_id(installation, who)))


def audit_lines(installation: Installation) -> list[str]:
    with installation.crm.transaction() as session:
        return [f"{e.actor} {e.action}: {e.target} {e.detail}" for e in audit.recent(session)]


# --- who may see what ------------------------------------------------------------------


def test_a_user_sees_and_changes_only_their_own_email_tab(installation: Installation) -> None:
    client = client_for(installation, USER)
    mine, other = user_id(installation, USER), user_id(installation, OTHER)
    assert client.get(f"/users/{mine}/email").status_code == 200
    assert client.get("/users/me/email").location.endswith(f"/users/{mine}/email")
    own_page = f"/users/{mine}/email"
    for path in ("/users/", f"/users/{mine}/", f"/users/{other}/", f"/users/{other}/email"):
        assert client.get(path).status_code == 403, path
    refused = {
        f"/users/{other}/email": {"exchange.domain": TENANT_DOMAIN},
        f"/users/{mine}/": {"name": "Anna", "email": USER[0], "role": "admin"},
        f"/users/{other}/": {"name": "Bo", "email": OTHER[0], "role": "admin"},
        f"/users/{other}/test-connection": {},
        "/users/999/email": {"exchange.domain": TENANT_DOMAIN},
    }
    for path, data in refused.items():
        assert post(client, path, data, page=own_page).status_code == 403, path
    assert user_values(installation, OTHER) == {}
    with installation.crm.transaction() as session:
        assert directory.find_user(session, USER[0]).role == "user"
    assert audit_lines(installation) == []
    assert client_for(installation, ADMIN).get("/users/999/email").status_code == 404


def test_the_list_and_the_header_are_for_whom_they_concern(installation: Installation) -> None:
    listing = client_for(installation, ADMIN).get("/users/").get_data(as_text=True)
    for who in (ADMIN, USER, OTHER):
        assert who[0] in listing and who[1] in listing
    assert "Write to a Maildir folder (development)" in listing  # the default transport
    header = client_for(installation, USER).get("/persons/").get_data(as_text=True)
    assert 'href="/users/me/email"' in header and 'href="/users/"' not in header


# --- the E-mail tab --------------------------------------------------------------------


def test_the_email_tab_is_rendered_from_the_plugins(installation: Installation) -> None:
    crm = installation.crm
    with crm.transaction() as session:
        crm.set_system_setting(session, "exchange.url", "https://mail.contoso.se/EWS/Exchange.asmx")
    mine = user_id(installation, USER)
    text = client_for(installation, USER).get(f"/users/{mine}/email").get_data(as_text=True)
    for label in ("Send via Exchange", "Send via SMTP", "Domain", "Username", "Sync with Exchange"):
        assert label in text
    assert 'value="https://mail.contoso.se/EWS/Exchange.asmx" placeholder' in text
    assert 'readonly aria-describedby="server-exchange-url-help"' in text  # shown, not editable
    assert 'type="password" id="exchange-password"' in text
    assert 'href="/users/' + str(mine) + '/"' not in text  # no Basic tab for a user


def test_one_refused_field_saves_nothing_and_keeps_what_was_typed(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    path = f"/users/{user_id(installation, USER)}/email"
    answer = post(
        client,
        path,
        {
            "mail.transport": "smtp",
            "exchange.domain": TENANT_DOMAIN,
            "exchange.username": "anna",  # not a full address
            "exchange.password": ONPREM_PASSWORD,
            "smtp.password": SMTP_PASSWORD,
        },
    )
    assert answer.status_code == 400
    text = answer.get_data(as_text=True)
    assert 'id="exchange-username-error"' in text and "is not a full e-mail address" in text
    assert f'value="{TENANT_DOMAIN}"' in text and 'value="anna"' in text
    assert 'id="mail-transport-smtp" name="mail.transport" value="smtp" checked' in text
    assert ONPREM_PASSWORD not in text and SMTP_PASSWORD not in text
    assert user_values(installation, USER) == {}
    assert audit_lines(installation) == []


def test_saving_the_email_tab_audits_keys_and_never_shows_a_secret(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    mine = user_id(installation, USER)
    form = {"smtp.username": USER[0], "smtp.password": SMTP_PASSWORD, "exchange.sync": "false"}
    assert post(client, f"/users/{mine}/email", form).status_code == 302
    assert user_values(installation, USER)["smtp.password"].reveal() == SMTP_PASSWORD
    assert "exchange.sync" not in user_values(installation, USER)  # untouched: not saved
    lines = audit_lines(installation)
    assert sorted(lines) == [
        f"{USER[0]} setting changed: {USER[0]}: smtp.password ",
        f"{USER[0]} setting changed: {USER[0]}: smtp.username ",
    ]
    admin = client_for(installation, ADMIN)
    pages = [
        client.get(f"/users/{mine}/email"),
        admin.get(f"/users/{mine}/email"),
        admin.get("/settings/"),
        admin.get("/users/"),
        post(client, f"/users/{mine}/test-connection", {}, page=f"/users/{mine}/email"),
        client.post(
            f"/users/{mine}/test-connection",
            data={"csrf_token": _token(client, mine)},
            headers={"X-Fragment": "1"},
        ),
    ]
    for answer in pages:
        assert answer.status_code == 200
        assert SMTP_PASSWORD not in answer.get_data(as_text=True)
    assert "Saved" in pages[0].get_data(as_text=True)


def test_a_password_whose_server_changed_must_be_entered_again(
    installation: Installation,
) -> None:
    """The SMTP password is bound to the server it was saved for: the user's own
    server override withholds it until it is typed again, and the tab says so."""
    client = client_for(installation, USER)
    mine = user_id(installation, USER)
    form = {"smtp.username": USER[0], "smtp.password": SMTP_PASSWORD}
    assert post(client, f"/users/{mine}/email", form).status_code == 302
    moved = post(client, f"/users/{mine}/email", {"smtp.host": "smtp.contoso.se"})
    assert moved.status_code == 302
    text = client.get(f"/users/{mine}/email").get_data(as_text=True)
    assert (
        "SMTP password (smtp.password) must be entered again: "
        "SMTP server (smtp.host) changed since it was saved."
    ) in text
    state = re.search(r'id="smtp-password-state">(.*?)</span>', text, re.S)
    assert state is not None
    words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", state[1])).strip()
    assert words.startswith("Enter it again: SMTP server (smtp.host) changed since it was saved")
    swedish = client.get(f"/users/{mine}/email", headers={"Accept-Language": "sv"})
    assert "Ange den igen:" in swedish.get_data(as_text=True)

    assert post(client, f"/users/{mine}/email", {"smtp.password": SMTP_PASSWORD}).status_code == 302
    text = client.get(f"/users/{mine}/email").get_data(as_text=True)
    assert "Enter it again" not in text and SMTP_PASSWORD not in text
    assert user_values(installation, USER)["smtp.password"].reveal() == SMTP_PASSWORD


def _token(client: FlaskClient, mine: int) -> str:
    return csrf(client, f"/users/{mine}/email")


def test_test_connection_is_a_whole_page_without_javascript_and_a_fragment_with_it(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    mine = user_id(installation, USER)
    token = _token(client, mine)
    whole = client.post(f"/users/{mine}/test-connection", data={"csrf_token": token})
    fragment = client.post(
        f"/users/{mine}/test-connection", data={"csrf_token": token}, headers={"X-Fragment": "1"}
    )
    assert whole.status_code == fragment.status_code == 200
    assert "<html" in whole.get_data(as_text=True) and 'id="ladder"' in whole.get_data(True)
    piece = fragment.get_data(as_text=True)
    assert "<html" not in piece and 'class="ladder ladder-ok"' in piece
    assert '<strong class="word">OK</strong>' in piece and "mail is written to" in piece
    swedish = client.post(
        f"/users/{mine}/test-connection",
        data={"csrf_token": token},
        headers={"X-Fragment": "1", "Accept-Language": "sv"},
    )
    assert "mapp" in swedish.get_data(as_text=True)  # the step's name, translated


# --- the Basic tab ---------------------------------------------------------------------


def test_an_administrator_edits_the_basic_tab(installation: Installation) -> None:
    admin = client_for(installation, ADMIN)
    bo = user_id(installation, OTHER)
    form = {"name": "Bo Eklund", "email": "bo.eklund@contoso.se", "product_line": "sales"}
    saved = post(admin, f"/users/{bo}/", {**form, "role": "user"})
    assert saved.status_code == 302
    with installation.crm.transaction() as session:
        user = session.get(User, bo)
        assert user is not None
        assert (user.name, user.email, user.product_line) == (
            "Bo Eklund",
            "bo.eklund@contoso.se",
            "sales",
        )
    assert any("user changed: bo.eklund@contoso.se" in line for line in audit_lines(installation))

    taken = post(admin, f"/users/{bo}/", {**form, "email": USER[0].upper(), "role": "user"})
    assert taken.status_code == 400
    text = taken.get_data(as_text=True)
    assert 'id="email-error"' in text and f"another user already has the e-mail {USER[0]}" in text
    assert 'value="Bo Eklund"' in text

    bad = post(
        admin, f"/users/{bo}/", {"name": "", "email": "bo@", "product_line": "x", "role": "x"}
    )
    assert bad.status_code == 400
    for field in ("name", "email", "product_line", "role"):
        assert f'id="{field}-error"' in bad.get_data(as_text=True), field


def test_the_basic_tab_keeps_what_sending_needs(installation: Installation) -> None:
    """The last administrator stays one, and a user keeps a transport their product
    line offers (rentals offers no Exchange)."""
    crm = installation.crm
    admin = client_for(installation, ADMIN)
    me = user_id(installation, ADMIN)
    myself = {"name": ADMIN[1], "email": ADMIN[0], "product_line": "commercial"}
    alone = post(admin, f"/users/{me}/", {**myself, "role": "user"})
    assert alone.status_code == 400 and "the only administrator" in alone.get_data(as_text=True)

    anna = user_id(installation, USER)
    with crm.transaction() as session:
        crm.set_user_setting(session, directory.find_user(session, USER[0]), TRANSPORT, "exchange")
    to_rentals = {"name": USER[1], "email": USER[0], "product_line": "rentals", "role": "user"}
    refused = post(admin, f"/users/{anna}/", to_rentals)
    assert refused.status_code == 400
    text = refused.get_data(as_text=True)
    assert 'id="product_line-error"' in text
    assert "is not enabled for product line &#39;rentals&#39;" in text
    with crm.transaction() as session:
        assert directory.find_user(session, USER[0]).product_line == "commercial"
    with crm.transaction() as session:
        crm.set_user_setting(session, directory.find_user(session, USER[0]), TRANSPORT, "smtp")
    assert post(admin, f"/users/{anna}/", to_rentals).status_code == 302  # rentals has SMTP


def test_the_users_list_and_the_basic_tab_in_a_browser(
    page: Any, installation: Installation
) -> None:
    browser_sign_in(page, ADMIN)
    page.get_by_role("navigation").get_by_role("link", name="Users", exact=True).click()
    row = page.get_by_role("row").filter(has_text=OTHER[0])
    expect(row).to_contain_text("Yes")  # ready to send (Maildir, in the tests)
    screenshot(page, "users-list")
    row.get_by_role("link", name=OTHER[1]).click()
    expect(page.get_by_role("heading", name=f"Edit user: {OTHER[1]}")).to_be_visible()
    expect(page.get_by_role("link", name="Basic")).to_have_attribute("aria-current", "page")
    page.get_by_label("Name").fill("Bo Eklund")
    page.get_by_label("Name").press("Enter")  # by keyboard
    expect(page.get_by_text("The user is saved.")).to_be_visible()
    expect(page.get_by_label("Name")).to_have_value("Bo Eklund")
    screenshot(page, "user-basic-tab")
    with installation.crm.transaction() as session:
        assert directory.find_user(session, OTHER[0]).name == "Bo Eklund"


# --- a third-party plugin --------------------------------------------------------------


@pytest.fixture
def acme_installation(make_crm: CrmFactory, tmp_path: Path) -> Installation:
    """The docs' example plugin (docs/plugins.md section 4) on a product line of its own."""
    crm = make_crm(ACME_CONFIG, extra_plugins=(("acme_mail", load_example(tmp_path)),))
    return site_of(crm, make_crm, "rentals")


def test_a_third_party_plugin_gets_its_screens_without_html(
    acme_installation: Installation, acme: Acme
) -> None:
    admin = client_for(acme_installation, ADMIN)
    system = admin.get("/settings/").get_data(as_text=True)
    assert "<legend>Send via ACME</legend>" in system and 'name="acme.url"' in system
    assert "e.g. https://api.acme.example/send" in system
    assert post(admin, "/settings/", {"acme.url": acme.url}).status_code == 302

    client = client_for(acme_installation, USER)
    mine = user_id(acme_installation, USER)
    tab = client.get(f"/users/{mine}/email").get_data(as_text=True)
    assert 'id="mail-transport-acme" name="mail.transport" value="acme" checked' in tab
    assert 'type="password" id="acme-api_key"' in tab and "From ACME → Settings → API keys." in tab
    assert f'value="{acme.url}" placeholder' in tab  # the API URL, read-only
    assert "API key is not set" in tab  # what stops sending
    assert post(client, f"/users/{mine}/email", {"acme.api_key": "k-123"}).status_code == 302
    ladder = client.post(
        f"/users/{mine}/test-connection",
        data={"csrf_token": _token(client, mine)},
        headers={"X-Fragment": "1"},
    ).get_data(as_text=True)
    assert "Connected to ACME" in ladder and "k-123" not in ladder
    assert "k-123" not in client.get(f"/users/{mine}/email").get_data(as_text=True)
    assert acme.posts == []  # Test connection sends nothing


# --- in a browser, against the Exchange stand-ins --------------------------------------


@pytest.fixture
def world(installation: Installation, ca: TestCA) -> Iterator[ExchangeWorld]:
    """The stand-ins, with the System settings typed in by the administrator (the
    core's services stand in for the screen tested in test_web_settings.py)."""
    with exchange_world(installation.crm, ca, configure=False) as w:
        for key, value in w.system_settings().items():
            w.set_system(key, value)
        yield w


def test_the_guides_email_tab_and_test_connection_in_a_browser(
    page: Any, world: ExchangeWorld
) -> None:
    browser_sign_in(page, USER)
    page.get_by_role("link", name="My e-mail settings").click()
    expect(page.get_by_role("heading", name="E-mail settings")).to_be_visible()
    expect(page.get_by_label("Exchange URL")).to_have_value(world.url)
    page.get_by_label("Send via Exchange").check()
    page.get_by_label("Domain").fill(TENANT_DOMAIN)
    page.get_by_label("Username", exact=True).fill(USER[0])
    page.get_by_label("Sync with Exchange").check()
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("E-mail settings saved (4 changed).")).to_be_visible()
    expect(page.get_by_text("Nothing stops sending.")).to_be_visible()
    screenshot(page, "user-email-tab")

    page.get_by_role("button", name="Test connection").click()
    ladder = page.locator("#ladder")
    expect(ladder).to_contain_text("Connected to Exchange")
    expect(ladder.locator(".step-ok .word").first).to_have_text("OK")
    expect(ladder).to_contain_text("mailbox anna@contoso.se found")
    screenshot(page, "test-connection-green")

    page.get_by_label("Username", exact=True).fill(ALIAS)  # the guide's alias mistake
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("E-mail settings saved (1 changed).")).to_be_visible()
    page.get_by_role("button", name="Test connection").click()
    expect(ladder).to_contain_text(
        f"TestConnection error Credentials: Exchange cannot find a mailbox for {ALIAS}"
    )
    failed = ladder.locator("li.step-failed")
    expect(failed.locator(".word")).to_have_text("Failed")
    expect(failed).to_contain_text("full primary e-mail address")  # the fix
    screenshot(page, "test-connection-red")


def test_test_connection_without_javascript_in_a_browser(
    browser: Any, live_app: str, world: ExchangeWorld
) -> None:
    for key, value in world.user_settings().items():
        world.set_user(key, value)
    world.set_system("exchange.client_secret", "not-the-secret-value")
    context = browser.new_context(base_url=live_app, locale="en-GB", java_script_enabled=False)
    try:
        tab = context.new_page()
        tab.set_default_timeout(10_000)
        browser_sign_in(tab, USER)
        tab.goto("/users/me/email")
        tab.get_by_role("button", name="Test connection").click()
        tab.wait_for_url("**/test-connection#ladder")
        ladder = tab.locator("#ladder")
        expect(ladder).to_contain_text("TestConnection error Credentials")
        expect(ladder.locator("li.step-failed .word").first).to_have_text("Failed")
        expect(ladder).to_contain_text("The client secret is not valid")
    finally:
        context.close()
