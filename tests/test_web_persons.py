"""Persons: the register, the person overview with its history, and the envelope that
queues a mail through the outbox, by direct HTTP and in Debian's Chromium."""

from __future__ import annotations

import mailbox
import re
from io import BytesIO
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from playwright.sync_api import expect
from sqlalchemy import func, select

from crm_core import directory
from crm_core.app import Crm
from crm_core.mail.addresses import split_list
from crm_core.mail.worker import Worker
from crm_core.models import AuditEntry, OutboxMessage, PersonActivity
from tests.web_fixtures import (
    PERSON,
    UNREACHABLE_EXCHANGE,
    USER,
    Installation,
    browser_sign_in,
    client_for,
    csrf,
    person_id,
    save_settings,
    screenshot,
)
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page


def counts(crm: Crm) -> tuple[int, int, int]:
    """Outbox rows, history lines and "mail queued" audit entries: what a send writes."""
    with crm.transaction() as db:
        return (
            int(db.scalar(select(func.count()).select_from(OutboxMessage)) or 0),
            int(db.scalar(select(func.count()).select_from(PersonActivity)) or 0),
            int(
                db.scalar(
                    select(func.count())
                    .select_from(AuditEntry)
                    .where(AuditEntry.action == "mail queued")
                )
                or 0
            ),
        )


def field_block(html: str, name: str) -> str:
    """The markup of one form field's box (label, control, help, errors)."""
    found = re.search(rf'<div class="field[^"]*">\s*<label for="{name}">.*?</div>', html, re.S)
    assert found is not None, f"no field {name}"
    return found.group(0)


def send(client: FlaskClient, pid: int, data: dict[str, Any], lang: str = "en") -> Any:
    """Submit the envelope's compose form for person ``pid``, as its page gives it."""
    token = csrf(client, f"/persons/{pid}/mail")
    form = {**data, "csrf_token": token}
    return client.post(f"/persons/{pid}/mail", data=form, headers={"Accept-Language": lang})


def test_a_box_of_addresses_is_split_at_commas_semicolons_and_lines_not_in_quotes() -> None:
    typed = 'Per Persson <per@example.com>, x@nodot\n"Persson, Per" <p@x.se>;a@b.se\r\n'
    assert split_list(typed) == [
        "Per Persson <per@example.com>",
        "x@nodot",
        '"Persson, Per" <p@x.se>',
        "a@b.se",
    ]
    assert split_list("  \n") == []


def test_the_person_overview_shows_name_e_mail_mobile_and_the_envelope(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    pid = person_id(installation.crm)
    for found in ("PERSSON", "per@EXAMPLE", "  per  "):
        assert f'href="/persons/{pid}"' in client.get(f"/persons/?q={found}").text, found
    for not_found in ("nobody", "%", "p_r"):  # a wildcard is a plain character
        assert "No persons found." in client.get(f"/persons/?q={not_found}").text, not_found
    overview = client.get(f"/persons/{pid}").get_data(as_text=True)
    for shown in ("Person overview", PERSON[0], PERSON[1], PERSON[2], "Nothing yet."):
        assert shown in overview
    assert f'href="/persons/{pid}/mail"' in overview
    assert client.get("/persons/99999").status_code == 404
    assert client.get("/persons/99999999999999999999999").status_code == 404
    assert client.get("/persons/99999/mail").status_code == 404


def test_the_register_comes_in_pages_and_the_search_is_kept(installation: Installation) -> None:
    with installation.crm.transaction() as db:
        for n in range(60):
            directory.add_person(db, f"lisa{n:02d}@example.com", f"Lisa {n:02d}")
    client = client_for(installation, USER)
    first = client.get("/persons/?q=lisa").text
    assert "50 of 60 persons" in first and ">Lisa 00<" in first and ">Lisa 50<" not in first
    assert ">Per Persson<" not in first
    assert 'href="/persons/?page=2&amp;q=lisa"' in first
    second = client.get("/persons/?page=2&q=lisa").text
    assert "10 of 60 persons" in second and ">Lisa 59<" in second and ">Lisa 49<" not in second
    assert "50 of 61 persons" in client.get("/persons/").text


def test_the_envelope_is_addressed_to_the_person_from_the_signed_in_user(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    form = client.get(f"/persons/{person_id(installation.crm)}/mail").get_data(as_text=True)
    assert ">Per Persson &lt;per@example.com&gt;</textarea>" in field_block(form, "to")
    assert "From: Anna Berg &lt;anna@contoso.se&gt;" in form
    assert not re.search(r'name="(from|sender|sender_email)"', form)  # never a field


def test_sending_queues_the_mail_on_the_persons_history_with_an_audit_entry(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    pid = person_id(installation.crm)
    data = {
        "to": "Per Persson <per@example.com>,\r\n bo@contoso.se",
        "cc": 'admin@contoso.se; "Ek, Bo" <bo.ek@example.com>',
        "subject": "Hej Per",
        "text": "Ett brev.",
        "attachments": [(BytesIO(b"first"), "notes.txt"), (BytesIO(b"%PDF-1"), "offer.pdf")],
    }
    answer = send(client, pid, data)
    assert answer.status_code == 303, answer.get_data(as_text=True)
    with installation.crm.transaction() as db:
        row = db.scalars(select(OutboxMessage)).one()
        assert answer.location == f"/persons/{pid}?queued={row.id}"
        assert (row.sender_email, row.person_id, row.state) == (USER[0], pid, "queued")
        assert row.recipients["to"] == [["per@example.com", "Per Persson"], ["bo@contoso.se", ""]]
        assert row.recipients["cc"] == [["admin@contoso.se", ""], ["bo.ek@example.com", "Ek, Bo"]]
        files = [(a.filename, a.content_type, a.data) for a in row.attachments]
        assert files == [
            ("notes.txt", "text/plain", b"first"),
            ("offer.pdf", "application/pdf", b"%PDF-1"),
        ]
        entry = db.scalars(select(AuditEntry)).one()
        assert (entry.actor, entry.action, entry.target) == (
            USER[0],
            "mail queued",
            f"outbox #{row.id}",
        )
        outbox_id = row.id
    page_after = client.get(answer.location).get_data(as_text=True)
    assert f"The mail is in the outbox as #{outbox_id}; its state is now: queued." in page_after
    assert f'href="/outbox/{outbox_id}"' in page_after
    again = {"to": PERSON[0], "subject": "Second letter", "text": "Igen."}
    assert send(client, pid, again).status_code == 303
    history = client.get(f"/persons/{pid}", headers={"X-Fragment": "1"}).get_data(as_text=True)
    assert "<html" not in history  # the live part only, for app.js
    assert history.index("Second letter") < history.index("Hej Per")  # newest first
    assert history.count('class="state state-queued"') == 2


def test_a_refused_mail_names_each_bad_value_next_to_its_field_and_queues_nothing(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    pid = person_id(installation.crm)
    data = {
        "to": "Per Persson <per@example.com>, x@nodot",
        "cc": "bo ek@contoso.se",
        "subject": "",
        "text": "Typed text stays",
        "attachments": [(BytesIO(b"x"), "kept-not.txt")],
    }
    answer = send(client, pid, data)
    html = answer.get_data(as_text=True)
    assert answer.status_code == 400
    assert "Error validating e-mail" in html
    to, cc, subject = (field_block(html, name) for name in ("to", "cc", "subject"))
    assert "&#39;x@nodot&#39;: the domain &#39;nodot&#39; has no dot" in to
    assert "Per Persson &lt;per@example.com&gt;, x@nodot</textarea>" in to  # kept
    assert 'aria-invalid="true" aria-describedby="to-error"' in to
    assert "&#39;bo ek@contoso.se&#39;: it contains a space" in cc and "x@nodot" not in cc
    assert "a subject is required" in subject and "nodot" not in subject
    assert ">Typed text stays</textarea>" in html
    assert "Choose the attachments again" in html
    assert counts(installation.crm) == (0, 0, 0)


def test_the_refusal_speaks_swedish(installation: Installation) -> None:
    client = client_for(installation, USER)
    pid = person_id(installation.crm)
    answer = send(client, pid, {"to": "", "subject": "", "text": ""}, lang="sv")
    html = answer.get_data(as_text=True)
    assert answer.status_code == 400
    assert "Fel vid validering av e-post" in html
    assert "minst en mottagare i Till krävs" in field_block(html, "to")
    assert "ett ämne krävs" in field_block(html, "subject")


def test_what_stops_the_senders_account_is_said_above_the_form(
    installation: Installation,
) -> None:
    crm = installation.crm
    exchange = (*UNREACHABLE_EXCHANGE, ("exchange.client_secret", "a-client-secret-value"))
    mine = (
        ("exchange.username", USER[0]),
        ("exchange.password", "a-password"),
        ("exchange.sync", "true"),
        ("mail.transport", "exchange"),
    )  # exchange.domain is missing
    save_settings(crm, exchange, {USER[0]: mine})
    client = client_for(installation, USER)
    pid = person_id(crm)
    data = {"to": PERSON[0], "subject": "Hej", "text": "x"}
    answer = send(client, pid, data)
    html = answer.get_data(as_text=True)
    assert answer.status_code == 400
    above = html[html.index('id="form-error"') : html.index(f'action="/persons/{pid}/mail"')]
    assert f"sender {USER[0]}: exchange.domain: Domain is not set" in above
    assert "Domain is not set" not in field_block(html, "to")
    assert counts(crm) == (0, 0, 0)


def test_the_envelope_in_a_real_browser(
    page: Any, installation: Installation, tmp_path: Path
) -> None:
    browser_sign_in(page, USER)
    page.get_by_label("Search by name or e-mail").fill("persson")
    page.get_by_label("Search by name or e-mail").press("Enter")
    expect(page.get_by_role("table")).to_contain_text(PERSON[0])
    screenshot(page, "persons-list")
    page.get_by_role("link", name=PERSON[1], exact=True).click()
    expect(page.get_by_role("heading", name="Person overview: Per Persson")).to_be_visible()
    expect(page.get_by_text(PERSON[2])).to_be_visible()
    screenshot(page, "person-overview")
    page.get_by_role("link", name="Write e-mail").click()
    expect(page.get_by_label("To", exact=True)).to_have_value("Per Persson <per@example.com>")
    page.get_by_label("Subject").fill("Test from the envelope")
    page.get_by_label("Text", exact=True).fill("Hej Per!")
    page.get_by_label("Attachments").set_input_files(
        [{"name": "hello.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    screenshot(page, "compose")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("status")).to_contain_text("its state is now: queued")
    history = page.locator("#history")
    expect(history).to_contain_text("Test from the envelope")
    expect(history.locator(".state")).to_have_text("queued")

    stats = Worker(installation.crm).run_once()
    assert stats.sent == 1
    page.get_by_role("link", name=re.compile(r"^Follow outbox #\d+$")).click()
    expect(page.locator("#mail-state")).to_have_text("sent")
    page.get_by_role("navigation").get_by_role("link", name="Outbox", exact=True).click()
    row = page.get_by_role("row").filter(has_text="Test from the envelope")
    expect(row.locator(".state")).to_have_text("sent")
    screenshot(page, "outbox")
    delivered = list(mailbox.Maildir(tmp_path / "Maildir", create=False))
    assert [m["Subject"] for m in delivered] == ["Test from the envelope"]
    assert delivered[0]["From"] == "Anna Berg <anna@contoso.se>"


def test_a_bad_address_in_a_real_browser_is_shown_next_to_the_field(
    page: Any, installation: Installation
) -> None:
    browser_sign_in(page, USER)
    page.goto(f"/persons/{person_id(installation.crm)}/mail")
    to = page.get_by_label("To", exact=True)
    to.fill("Per Persson <per@example.com>, x@nodot")
    page.get_by_label("Subject").fill("Kept subject")
    page.get_by_label("Text", exact=True).fill("Kept text")
    page.get_by_label("Subject").press("Enter")  # by keyboard
    expect(page.get_by_role("alert")).to_contain_text("Error validating e-mail")
    to_box = page.locator(".field").filter(has=page.locator("#to"))
    expect(to_box.locator(".error")).to_contain_text("'x@nodot': the domain 'nodot' has no dot")
    expect(to).to_have_attribute("aria-invalid", "true")
    expect(to).to_have_value("Per Persson <per@example.com>, x@nodot")
    expect(page.get_by_label("Subject")).to_have_value("Kept subject")
    expect(page.get_by_label("Text", exact=True)).to_have_value("Kept text")
    screenshot(page, "compose-error")
    assert counts(installation.crm) == (0, 0, 0)
