"""The demo in a real browser (Debian's Chromium): a mail goes from the outbox through
the worker and the SMTP transport to the mail catcher, and is read on the catcher's
page; the language switch turns the page Swedish and a reload keeps it.

The demo runs in this process as `crm demo` runs it (:func:`crm_core.demo.start`: the
catcher, one worker and the web app served by waitress), on free ports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from crm_core import demo
from crm_core.app import Crm
from crm_core.mail.enqueue import MailRequest, enqueue
from crm_core.mail.message import Attachment
from tests.web_fixtures import USER, browser_sign_in, screenshot
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page

SUBJECT = "Välkommen på visning – Storgatan 1"


@dataclass
class Site:
    """The running demo and the demo user's sign-in."""

    crm: Crm
    running: demo.Running
    user: tuple[str, str, str]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A demo installation in tmp_path, running as `crm demo` runs it."""
    folder = tmp_path / "demo"
    crm = demo.prepare(folder)
    try:
        _, user = demo.populate(crm)
        assert user.password is not None
        running = demo.start(crm, folder, web_port=0, smtp_port=0)
        try:
            running.start()
            yield Site(crm, running, (user.email, user.name, user.password))
        finally:
            running.stop()
    finally:
        crm.close()


@pytest.fixture
def tab(browser: Any, site: Site) -> Iterator[Any]:
    """A browser page on the demo's web app."""
    context = browser.new_context(
        base_url=site.running.url.rstrip("/"),
        locale="en-GB",
        viewport={"width": 1280, "height": 800},
    )
    opened = context.new_page()
    opened.set_default_timeout(10_000)
    yield opened
    context.close()


def queue_demo_mail(crm: Crm) -> None:
    """What the envelope's Send does: validate and queue, in one transaction."""
    request = MailRequest(
        sender_email=demo.DEMO_USER[0],
        to=[demo.DEMO_PERSON[0]],
        bcc=["arkiv@example.se"],
        subject=SUBJECT,
        text="Hej Per,\n\nvälkommen på visning av Storgatan 1 på lördag kl. 11.\n\nAnna",
        html="<p>Hej Per,</p><p>välkommen på visning av <b>Storgatan 1</b>.</p>",
        attachments=[Attachment("planritning.pdf", "application/pdf", b"%PDF-1.4 plan")],
        person_email=demo.DEMO_PERSON[0],
    )
    with crm.transaction() as session:
        enqueue(crm, session, request)


def test_a_queued_mail_reaches_the_catcher_page_through_the_worker(tab: Any, site: Site) -> None:
    queue_demo_mail(site.crm)
    assert site.running.catcher.wait_for(1, timeout=30)  # the worker sent it over SMTP
    browser_sign_in(tab, site.user)
    tab.get_by_role("link", name="Mail catcher").click()
    expect(tab.get_by_role("heading", name="Mail catcher")).to_be_visible()
    row = tab.get_by_role("row").filter(has_text=SUBJECT)
    expect(row).to_contain_text("Anna Andersson <anna.andersson@example.se>")
    expect(row).to_contain_text("Per Persson <per.persson@example.com>")
    screenshot(tab, "catcher-inbox")
    row.get_by_role("link", name=SUBJECT).click()
    expect(tab.get_by_role("heading", name=SUBJECT)).to_be_visible()
    expect(tab.locator("dl.envelope")).to_contain_text("arkiv@example.se")  # the Bcc
    expect(tab.locator("pre.body").first).to_contain_text("på lördag kl. 11.")
    expect(tab.get_by_role("cell", name="planritning.pdf")).to_be_visible()
    screenshot(tab, "catcher-letter")


def test_the_envelope_flow_from_person_to_catcher(tab: Any, site: Site) -> None:
    """The newcomer's path: open the test person, click the envelope, send, read it.

    The envelope opens the compose screen (/persons/<id>/mail: To, Cc, Subject, Text,
    Attachments and "Send").
    """
    browser_sign_in(tab, site.user)
    tab.get_by_role("link", name=demo.DEMO_PERSON[1]).first.click()
    tab.locator('a[href$="/mail"]').first.click()
    expect(tab.get_by_label("To", exact=True)).to_have_value(
        re.compile(re.escape(demo.DEMO_PERSON[0]))
    )
    tab.get_by_label("Subject", exact=True).fill("Visning i morgon")
    tab.get_by_label("Text", exact=True).fill("Hej Per, välkommen på visning i morgon.")
    tab.get_by_role("button", name="Send").click()
    assert site.running.catcher.wait_for(1, timeout=30)
    tab.goto("/catcher/")
    tab.get_by_role("link", name="Visning i morgon").click()
    expect(tab.locator("pre.body").first).to_contain_text("välkommen på visning i morgon")
    screenshot(tab, "envelope-to-catcher")


def test_the_language_switch_turns_the_page_swedish_and_a_reload_keeps_it(page: Any) -> None:
    browser_sign_in(page, USER)
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.get_by_label("Language").select_option(label="Svenska")
    page.get_by_role("button", name="Change").click()
    expect(page.locator("html")).to_have_attribute("lang", "sv")
    expect(page.get_by_role("button", name="Logga ut")).to_be_visible()
    page.reload()
    expect(page.get_by_role("button", name="Logga ut")).to_be_visible()
    expect(page.get_by_label("Språk")).to_have_value("sv")
    screenshot(page, "persons-sv")
