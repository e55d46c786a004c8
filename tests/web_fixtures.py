"""Shared pieces of the web tests: an installation with people, a signed-in client,
the app served for real (waitress on loopback) and Debian's Chromium driven by
Playwright.

Import the fixtures a test module needs from here. The browser is Debian's
``/usr/bin/chromium`` (``make test`` and ``.ci/run`` install it when missing); no
browser is ever downloaded.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from crm_core import directory
from crm_core.app import Crm
from crm_core.models import Person
from crm_core.passwords import set_password
from crm_core.web import create_app
from tests.conftest import CrmFactory

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
ADMIN = ("admin@contoso.se", "Ada Admin", "admin-password-1")
USER = ("anna@contoso.se", "Anna Berg", "anna-password-1")
OTHER = ("bo@contoso.se", "Bo Ek", "bo-password-12")
PERSON = ("per@example.com", "Per Persson", "+46 70 123 45 67")


@dataclass
class Installation:
    """A Crm with an administrator, two users and a person, and its web app."""

    crm: Crm
    app: Flask
    factory: CrmFactory


def add_people(crm: Crm, product_line: str = "commercial") -> None:
    """The people every web test knows: ADMIN, USER and OTHER, who can sign in, and
    PERSON in the register."""
    with crm.transaction() as session:
        for (email, name, password), admin in ((ADMIN, True), (USER, False), (OTHER, False)):
            user = directory.add_user(session, email, name, product_line, admin=admin)
            set_password(session, user, password)
        directory.add_person(session, *PERSON)


def app_for(crm: Crm, catcher: Path | None = None) -> Flask:
    """The web app on ``crm``, in Flask's testing mode."""
    app = create_app(crm, catcher=catcher)
    app.config["TESTING"] = True
    return app


def site_of(crm: Crm, factory: CrmFactory, product_line: str = "commercial") -> Installation:
    """``crm`` with the people (on ``product_line``) and its web app."""
    add_people(crm, product_line)
    return Installation(crm, app_for(crm), factory)


@pytest.fixture
def installation(make_crm: CrmFactory, tmp_path: Path) -> Installation:
    """The default test configuration, with people who can sign in."""
    crm = make_crm()
    with crm.transaction() as session:
        crm.set_system_setting(session, "maildir.path", str(tmp_path / "Maildir"))
    return site_of(crm, make_crm)


UNREACHABLE_EXCHANGE = (
    ("exchange.oauth_hosts", "127.0.0.1"),  # not Microsoft's: listed, as a proxy would be
    ("exchange.url", "https://127.0.0.1:9/EWS/Exchange.asmx"),
    ("exchange.client_id", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"),
    ("exchange.tenant_id", "contoso.onmicrosoft.com"),
)
"""Exchange's system settings, pointing at a port where nothing listens (a host the
app-only token may go to only because it is listed in ``exchange.oauth_hosts``)."""


def save_settings(
    crm: Crm,
    system: Iterable[tuple[str, str]] = (),
    users: Mapping[str, Iterable[tuple[str, str]]] | None = None,
    actor: str | None = None,
) -> None:
    """Save system settings, then each user's (by e-mail), through the core as the
    screens and the CLI save them."""
    with crm.transaction() as session:
        for key, value in system:
            crm.set_system_setting(session, key, value, actor=actor)
    for email, values in (users or {}).items():
        with crm.transaction() as session:
            user = directory.find_user(session, email)
            for key, value in values:
                crm.set_user_setting(session, user, key, value, actor=actor)


def person_id(crm: Crm) -> int:
    """The test person's id."""
    with crm.transaction() as db:
        found = db.scalar(select(Person.id).where(Person.email == PERSON[0]))
    assert found is not None
    return int(found)


_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(client: FlaskClient, path: str = "/sign-in") -> str:
    """A CSRF token as a page gives it to the browser."""
    found = _TOKEN.search(client.get(path).get_data(as_text=True))
    assert found is not None, f"no CSRF token on {path}"
    return found.group(1)


def sign_in(client: FlaskClient, who: tuple[str, str, str]) -> None:
    """Sign ``who`` in through the form, as a browser would."""
    answer = client.post(
        "/sign-in", data={"email": who[0], "password": who[2], "csrf_token": csrf(client)}
    )
    assert answer.status_code == 302, answer.get_data(as_text=True)


def client_for(site: Installation, who: tuple[str, str, str]) -> FlaskClient:
    """A fresh client (its own cookies) with ``who`` signed in."""
    client = site.app.test_client()
    sign_in(client, who)
    return client


def post(client: FlaskClient, path: str, data: dict[str, Any], page: str | None = None) -> Any:
    """POST a form with the token from ``page`` (the page that shows the form)."""
    return client.post(path, data={**data, "csrf_token": csrf(client, page or path)})


@pytest.fixture
def live_app(installation: Installation) -> Iterator[str]:
    """The app served by waitress on a free loopback port; its base URL."""
    from waitress.server import create_server

    server = create_server(installation.app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, name="web", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium, driven by Playwright; skipped, saying why, without it.

    One per test module: each module imports this fixture, which makes it a fixture of
    that module, and a second Playwright started while another module's still runs
    refuses to start ("Sync API inside the asyncio loop").
    """
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS), headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, live_app: str) -> Iterator[Any]:
    """A fresh browser page (its own cookies), with the app's base URL as ``page.base``."""
    context = browser.new_context(base_url=live_app, locale="en-GB")
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    yield tab
    context.close()


def browser_sign_in(tab: Any, who: tuple[str, str, str]) -> None:
    """Sign in through the page, by keyboard."""
    tab.goto("/sign-in")
    tab.get_by_label("E-mail").fill(who[0])
    tab.get_by_label("Password").fill(who[2])
    tab.get_by_label("Password").press("Enter")
    tab.wait_for_url("**/persons/**")


def screenshot(tab: Any, name: str) -> Path:
    """Save the page as an artefact (artifacts/screenshots/NAME.png)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path
