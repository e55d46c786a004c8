"""The outbox screens: states, recipients, attempts and replies as the worker leaves
them; an administrator's retry, cancel and resolve with their audit entries and the
core's refusals; the live fragment; paging; and the states changing in a real browser.

The outcomes come from the scripted transport of the outbox tests (a real pluggy
plugin on a real Crm), so each state is reached the way the worker reaches it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from crm_core import audit
from crm_core.mail.transport import Outcome, RecipientStatus
from crm_core.mail.worker import Worker
from crm_core.models import AuditEntry, OutboxMessage
from tests.conftest import CrmFactory
from tests.test_outbox_helpers import Scripted, queue_mail, scripted_crm, states
from tests.web_fixtures import (
    ADMIN,
    PERSON,
    USER,
    Installation,
    browser_sign_in,
    client_for,
    person_id,
    post,
    screenshot,
    site_of,
)
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page

REFUSED = "bo.ek@example.com"


@pytest.fixture
def scripted(make_crm: CrmFactory) -> tuple[Installation, Scripted]:
    """The web app on a Crm whose mail goes through the scripted transport."""
    crm, transport = scripted_crm(make_crm)
    return site_of(crm, make_crm), transport


@pytest.fixture
def fates(scripted: tuple[Installation, Scripted]) -> tuple[Installation, dict[str, int]]:
    """The site, and USER's four mails by subject once the worker has tried them."""
    site, transport = scripted
    return site, four_fates(site, transport)


def four_fates(site: Installation, transport: Scripted) -> dict[str, int]:
    """Mails from USER that end sent, waiting to retry, partly sent and unknown."""
    transport.script["Slow"] = [(Outcome.TEMPORARY, "421 4.7.0 Try again later", "421", None)]
    transport.script["Lost"] = [(Outcome.AMBIGUOUS, "the connection broke after DATA", "", None)]
    transport.per_recipient["Split"] = [{REFUSED: RecipientStatus.REFUSED}]
    ids = {
        subject: queue_mail(
            site.crm, subject, sender=USER[0], to=[PERSON[0], REFUSED], person_email=PERSON[0]
        )
        for subject in ("Fine", "Slow", "Split", "Lost")
    }
    Worker(site.crm).run_once()
    assert states(site.crm) == {
        ids["Fine"]: "sent",
        ids["Slow"]: "retry",
        ids["Split"]: "partial",
        ids["Lost"]: "unknown",
    }
    return ids


def text(answer: Any) -> str:
    """The page's text without tags, blanks squeezed (what a reader sees)."""
    html = re.sub(r"<[^>]+>", " ", answer.get_data(as_text=True))
    return re.sub(r"\s+", " ", html.replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">"))


def test_the_outbox_shows_each_state_attempt_reason_reply_and_next_try(
    fates: tuple[Installation, dict[str, int]],
) -> None:
    site, ids = fates
    client = client_for(site, USER)
    listed = client.get("/outbox/").get_data(as_text=True)
    for subject, label in (
        ("Fine", "sent"),
        ("Slow", "waiting to retry"),
        ("Split", "partly sent"),
        ("Lost", "unknown"),
    ):
        row = re.search(rf'<tr>\s*<td><a href="/outbox/{ids[subject]}">.*?</tr>', listed, re.S)
        assert row is not None and f">{label}</span>" in row.group(0), subject
    assert "Recipients: sent to 1 of 2; refused: bo.ek@example.com (550 5.1.1" in text(
        client.get("/outbox/")
    )
    slow = text(client.get(f"/outbox/{ids['Slow']}"))
    assert "State waiting to retry" in slow and "Next try 20" in slow
    assert re.search(r"Attempts No\. Started .* 1 20\S+ 20\S+ scripted temporary \[421\]", slow)
    assert "421 4.7.0 Try again later" in slow
    fine = text(client.get(f"/outbox/{ids['Fine']}"))
    assert "The server's reply 250 2.0.0 Ok: queued as 4XbScripted" in fine
    split = text(client.get(f"/outbox/{ids['Split']}"))
    assert f"{PERSON[0]} delivered 250 2.1.5 Ok" in split
    assert f"{REFUSED} refused 550 5.1.1 <{REFUSED}>: Recipient address rejected" in split
    history = text(client.get(f"/persons/{person_id(site.crm)}"))
    assert "partly sent Recipients: sent to 1 of 2; refused: bo.ek@example.com (550" in history
    assert "sent to 2 of 2" not in history  # a mail every recipient has needs no tally
    filtered = client.get("/outbox/?state=unknown").get_data(as_text=True)
    assert f'href="/outbox/{ids["Lost"]}"' in filtered
    assert f'href="/outbox/{ids["Fine"]}"' not in filtered


def test_an_administrator_retries_cancels_and_resolves_each_with_an_audit_entry(
    fates: tuple[Installation, dict[str, int]],
) -> None:
    site, ids = fates
    admin = client_for(site, ADMIN)
    lost, fine = ids["Lost"], ids["Fine"]

    def act(outbox_id: int, action: str, **form: str) -> Any:
        return post(admin, f"/outbox/{outbox_id}/{action}", form, page=f"/outbox/{outbox_id}")

    answer = act(lost, "resolve", decision="not-sent")
    assert answer.status_code == 303 and answer.location == f"/outbox/{lost}"
    assert "is not sent; it is queued again." in text(admin.get(answer.location))
    assert states(site.crm)[lost] == "queued"
    refused = act(lost, "resolve", decision="sent")  # no longer unknown
    assert refused.status_code == 409
    assert (
        "Refused: Cannot resolve outbox message #"
        f"{lost}: state queued: only messages in state unknown need a decision"
    ) in text(refused)
    assert act(lost, "cancel").status_code == 303
    assert states(site.crm)[lost] == "cancelled"
    assert act(lost, "retry").status_code == 303
    assert states(site.crm)[lost] == "queued"
    sent_again = act(fine, "retry")
    assert sent_again.status_code == 409 and "it is being sent or was sent" in text(sent_again)
    assert act(fine, "resolve", decision="maybe").status_code == 400
    assert act(99999, "cancel").status_code == 404
    with site.crm.transaction() as db:
        entries = [(e.actor, e.action, e.target, e.detail) for e in audit.recent(db)]
    target = f"outbox #{lost}"
    assert entries == [
        (ADMIN[0], "mail retried", target, ""),
        (ADMIN[0], "mail cancelled", target, ""),
        (ADMIN[0], "mail resolved", target, "not sent"),
    ]  # the refusals wrote nothing
    log = text(admin.get("/audit/"))
    assert f"{ADMIN[0]} mail retried {target}" in log


def test_the_live_part_is_a_fragment_of_the_same_address(
    fates: tuple[Installation, dict[str, int]],
) -> None:
    site, ids = fates
    client = client_for(site, USER)
    for path in ("/outbox/", f"/outbox/{ids['Fine']}"):
        whole = client.get(path)
        html = whole.get_data(as_text=True)
        assert re.search(rf'data-refresh="\d+" data-src="{re.escape(path)}"', html)
        part = client.get(path, headers={"X-Fragment": "1"})
        fragment = part.get_data(as_text=True)
        assert part.status_code == 200 and "<html" not in fragment and "<header" not in fragment
        assert ">sent</" in fragment
        for answer in (whole, part):
            assert answer.headers["Cache-Control"] == "no-store"
            assert "X-Fragment" in answer.headers["Vary"]


def test_the_outbox_and_the_audit_log_come_in_pages(installation: Installation) -> None:
    crm = installation.crm
    for n in range(53):
        queue_mail(crm, f"Mail {n}", sender=USER[0], to=[PERSON[0]])
    with crm.transaction() as db:
        for n in range(52):
            audit.record(db, "cli:test", "setting changed", f"key.{n}")
    client = client_for(installation, ADMIN)
    first = client.get("/outbox/").get_data(as_text=True)
    assert "50 of 53 mails" in first and ">Mail 52</a>" in first and ">Mail 2</a>" not in first
    assert 'href="/outbox/?page=2"' in first
    second = client.get("/outbox/?page=2").get_data(as_text=True)
    assert "3 of 53 mails" in second and ">Mail 0</a>" in second
    assert 'href="/outbox/?page=1"' in second and "Page 2 of 2" in second
    log = client.get("/audit/").get_data(as_text=True)
    assert "50 of 52 entries" in log and ">key.51<" in log and ">key.1<" not in log
    older = client.get("/audit/?page=2").get_data(as_text=True)
    assert ">key.0<" in older and ">key.51<" not in older
    for past_the_end in ("/audit/?page=99", "/audit/?page=99999999999999999999"):
        assert ">key.0<" in client.get(past_the_end).get_data(as_text=True)  # the last page
    assert ">key.51<" in client.get("/audit/?page=nonsense").get_data(as_text=True)
    assert client.get("/outbox/?page=-1").status_code == 200


def test_the_state_changes_live_in_a_real_browser(page: Any, installation: Installation) -> None:
    outbox_id = queue_mail(installation.crm, "Live", sender=USER[0], to=[PERSON[0]])
    browser_sign_in(page, USER)
    page.goto(f"/outbox/{outbox_id}")
    state = page.locator("#mail-state")
    expect(state).to_have_text("queued")
    page.goto("/outbox/")
    row = page.get_by_role("row").filter(has_text="Live")
    expect(row.locator(".state")).to_have_text("queued")
    assert Worker(installation.crm).run_once().sent == 1
    expect(row.locator(".state")).to_have_text("sent", timeout=15_000)  # no reload: app.js
    row.get_by_role("link", name="Live").click()
    expect(state).to_have_text("sent")
    expect(page.get_by_role("cell", name="delivered")).to_be_visible()
    screenshot(page, "outbox-detail")
    with installation.crm.transaction() as db:
        assert db.scalars(select(OutboxMessage.state)).one() == "sent"
        assert db.scalars(select(AuditEntry)).all() == []  # queued by the core, not the web


def test_an_administrator_cancels_by_keyboard_and_the_audit_log_says_so(
    page: Any, installation: Installation
) -> None:
    outbox_id = queue_mail(installation.crm, "Stop this", sender=USER[0], to=[PERSON[0]])
    browser_sign_in(page, ADMIN)
    page.get_by_role("navigation").get_by_role("link", name="Outbox", exact=True).click()
    page.get_by_role("row").filter(has_text="Stop this").get_by_role(
        "link", name="Stop this"
    ).click()
    page.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_text(f"Outbox #{outbox_id} is cancelled.")).to_be_visible()
    expect(page.locator("#mail-state")).to_have_text("cancelled")
    page.get_by_role("navigation").get_by_role("link", name="Audit log", exact=True).click()
    row = page.get_by_role("row").filter(has_text=f"outbox #{outbox_id}")
    expect(row).to_contain_text(ADMIN[0])
    expect(row).to_contain_text("mail cancelled")
    screenshot(page, "audit-log")
    assert states(installation.crm) == {outbox_id: "cancelled"}
