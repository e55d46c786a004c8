"""The local mail catcher: a real SMTP server on loopback that keeps what it receives,
and the screen that reads it (only in an app made with a catcher folder)."""

from __future__ import annotations

import errno
import os
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from crm_core.catcher import MailCatcher, list_caught, open_caught
from crm_core.demo import start_catcher
from tests.servers.smtp import port_is_free
from tests.web_fixtures import USER, Installation, app_for, sign_in
from tests.web_fixtures import installation as installation


def letter(subject: str, html: str | None = None, attach: bool = False) -> EmailMessage:
    """A mail as the SMTP transport writes one."""
    message = EmailMessage()
    message["From"] = "Anna Berg <anna@contoso.se>"
    message["To"] = "Per Persson <per@example.com>"
    message["Cc"] = "bo@contoso.se"
    message["Subject"] = subject
    message.set_content("Hej Per,\nvälkommen på visning.\n")
    if html is not None:
        message.add_alternative(html, subtype="html")
    if attach:
        message.add_attachment(
            b"%PDF-1.4 plan", maintype="application", subtype="pdf", filename="planritning.pdf"
        )
    return message


@pytest.fixture
def catcher(tmp_path: Path) -> Iterator[MailCatcher]:
    with MailCatcher(tmp_path / "caught") as running:
        yield running


def test_the_catcher_keeps_each_message_with_its_envelope_bcc_included(
    catcher: MailCatcher,
) -> None:
    with smtplib.SMTP("127.0.0.1", catcher.port, timeout=10) as client:
        refused = client.send_message(
            letter("Visning", html="<p>Hej</p>", attach=True),
            to_addrs=["per@example.com", "bo@contoso.se", "hemlig@contoso.se"],
        )
    assert refused == {}
    assert catcher.wait_for(1, timeout=10)
    [caught] = list_caught(catcher.folder)
    assert (caught.sender, caught.subject) == ("Anna Berg <anna@contoso.se>", "Visning")
    opened = open_caught(catcher.folder, caught.key)
    assert opened is not None
    assert opened.envelope_from == "<anna@contoso.se>"
    assert opened.envelope_to == "per@example.com, bo@contoso.se, hemlig@contoso.se"
    assert opened.text == "Hej Per,\nvälkommen på visning.\n"
    assert opened.html == "<p>Hej</p>\n"
    assert [(a.filename, a.content_type, a.size) for a in opened.attachments] == [
        ("planritning.pdf", "application/pdf", 13)
    ]
    assert ("Cc", "bo@contoso.se") in opened.headers


def test_stopping_frees_the_port_and_a_taken_port_is_reported_at_once(tmp_path: Path) -> None:
    catcher = MailCatcher(tmp_path / "caught").start()
    port = catcher.port
    assert not port_is_free(port)
    with pytest.raises(OSError) as taken:
        MailCatcher(tmp_path / "other", port).start()
    assert taken.value.errno == errno.EADDRINUSE
    elsewhere = start_catcher(tmp_path / "other", port)  # the demo falls back to a free port
    assert elsewhere.port not in (port, 0)
    elsewhere.stop()
    catcher.stop()
    assert port_is_free(port) and port_is_free(elsewhere.port)


def test_a_missing_folder_or_key_is_nothing_not_an_error(tmp_path: Path) -> None:
    assert list_caught(tmp_path / "nowhere") == []
    catcher = MailCatcher(tmp_path / "caught")
    catcher.keep("a@example.se", ["b@example.se"], bytes(letter("x")))
    assert open_caught(catcher.folder, "no-such-key") is None
    assert open_caught(catcher.folder, "../new") is None


# --- the screen ----------------------------------------------------------------------


def test_the_screen_lists_newest_first_and_shows_a_mail_safely_as_text(
    installation: Installation, tmp_path: Path
) -> None:
    folder = tmp_path / "caught"
    catcher = MailCatcher(folder)
    html = "<p>Hej</p><script>alert('x')</script>"
    older = catcher.keep("anna@contoso.se", ["per@example.com"], bytes(letter("Första")))
    newer = catcher.keep(
        "anna@contoso.se",
        ["per@example.com", "hemlig@contoso.se"],
        bytes(letter("Andra", html=html, attach=True)),
    )
    an_hour_ago = os.stat(folder / "new" / older).st_mtime - 3600
    os.utime(folder / "new" / older, (an_hour_ago, an_hour_ago))
    client = app_for(installation.crm, folder).test_client()
    sign_in(client, USER)  # any signed-in user: the catcher holds demo mail only

    page = client.get("/catcher/").get_data(as_text=True)
    assert "Mail catcher" in page
    assert page.index("Andra") < page.index("Första")
    assert f'href="/catcher/{newer}"' in page

    shown = client.get(f"/catcher/{newer}").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in shown
    assert "<script>alert" not in shown
    assert "hemlig@contoso.se" in shown  # the Bcc, from the envelope
    assert "planritning.pdf" in shown and "application/pdf" in shown
    assert "välkommen på visning." in shown

    fragment = client.get("/catcher/", headers={"X-Fragment": "1"}).get_data(as_text=True)
    assert "Andra" in fragment and "<html" not in fragment
    assert client.get("/catcher/no-such-key").status_code == 404
    swedish = client.get("/catcher/", headers={"Accept-Language": "sv"}).get_data(as_text=True)
    assert "Postfångare" in swedish and "Ämne" in swedish


def test_the_screen_needs_a_signed_in_user_and_a_catcher(
    installation: Installation, tmp_path: Path
) -> None:
    anonymous = app_for(installation.crm, tmp_path / "caught").test_client()
    answer = anonymous.get("/catcher/")
    assert answer.status_code == 302 and "/sign-in" in answer.location
    plain = installation.app.test_client()  # an app made without a catcher folder
    sign_in(plain, USER)
    assert plain.get("/catcher/").status_code == 404
    assert "Mail catcher" not in plain.get("/persons/").get_data(as_text=True)
