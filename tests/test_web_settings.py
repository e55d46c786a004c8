"""System settings on the web: only administrators, every field from the plugins'
declarations, secrets never shown, a form saved whole or not at all.

Direct HTTP requests (Flask's test client) prove the server's checks; Debian's Chromium
proves the screen works for a person with a keyboard.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any

from playwright.sync_api import expect

from crm_core import audit
from crm_core.cli.values import read_file_content
from crm_core.fields import Scope
from crm_core.web.i18n import load_catalogs
from exchange_mail.settings import EXAMPLE_URL
from tests.exchange_fixtures import CLIENT, SECRET, TENANT
from tests.test_exchange_certificates import make_certificate
from tests.web_fixtures import (
    ADMIN,
    USER,
    Installation,
    browser_sign_in,
    client_for,
    post,
    screenshot,
)
from tests.web_fixtures import browser as browser
from tests.web_fixtures import installation as installation
from tests.web_fixtures import live_app as live_app
from tests.web_fixtures import page as page

NEAR_MISS = "https://mail.contoso.se/ews/exchange.asmx"
FIXED = "https://mail.contoso.se/EWS/Exchange.asmx"
OAUTH = {"exchange.url": FIXED, "exchange.client_id": CLIENT, "exchange.tenant_id": TENANT}
WITHHELD = (
    "Client secret (exchange.client_secret) must be entered again: "
    "Tenant ID (exchange.tenant_id) changed since it was saved."
)


def stored(installation: Installation) -> dict[str, Any]:
    """The system settings as the core reads them (secrets as masked Secret objects)."""
    crm = installation.crm
    with crm.transaction() as session:
        return dict(crm.settings_store().system_values(session))


def audit_targets(installation: Installation) -> list[str]:
    with installation.crm.transaction() as session:
        return [f"{e.action}: {e.target} {e.detail}" for e in audit.recent(session)]


def secret_state(html: str, key: str) -> str:
    """The words beside a secret field (saved, or to be entered again), tags removed."""
    found = re.search(rf'<span class="secret-state" id="{key}-state">(.*?)</span>', html, re.S)
    assert found is not None, f"no state beside {key}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", found.group(1))).strip()


def test_a_user_may_neither_see_nor_change_the_system_settings(
    installation: Installation,
) -> None:
    client = client_for(installation, USER)
    assert client.get("/settings/").status_code == 403
    answer = post(client, "/settings/", {"exchange.url": FIXED}, page="/persons/")
    assert answer.status_code == 403
    assert "exchange.url" not in stored(installation)
    nav = client.get("/persons/").get_data(as_text=True)
    assert 'href="/settings/"' not in nav


def test_every_system_field_is_rendered_from_its_declaration(
    installation: Installation,
) -> None:
    page_text = client_for(installation, ADMIN).get("/settings/").get_data(as_text=True)
    system = [f for f in installation.crm.settings_fields().values() if f.scope is Scope.SYSTEM]
    for spec in system:
        assert f'name="{spec.key}"' in page_text, spec.key
    for heading in ("Exchange", "Exchange OAuth authentication", "SMTP", "General"):
        assert f"<legend>{heading}</legend>" in page_text
    assert "must end with exactly /EWS/Exchange.asmx" in page_text  # the URL's help
    assert 'type="password" id="exchange-client_secret"' in page_text


def test_a_saved_secret_is_never_shown_and_an_empty_field_keeps_it(
    installation: Installation,
) -> None:
    client = client_for(installation, ADMIN)
    form = {"exchange.url": FIXED, "exchange.client_id": CLIENT, "exchange.tenant_id": TENANT}
    answer = post(client, "/settings/", {**form, "exchange.client_secret": SECRET})
    assert answer.status_code == 302
    shown = client.get("/settings/").get_data(as_text=True)
    assert SECRET not in shown
    assert "Saved" in shown and "fingerprint" in shown and "Leave empty to keep it." in shown
    assert "System settings saved (4 changed)." in shown
    fingerprint = installation.crm.secret_box().fingerprint(SECRET)
    assert fingerprint in shown

    again = post(client, "/settings/", {**form, "exchange.client_secret": ""})
    assert again.status_code == 302
    assert "Nothing was changed." in client.get("/settings/").get_data(as_text=True)
    assert stored(installation)["exchange.client_secret"].reveal() == SECRET
    entries = audit_targets(installation)
    assert "setting changed: exchange.client_secret " in entries
    assert not any(SECRET in e or CLIENT in e for e in entries)  # keys, never values


def test_a_refused_field_saves_nothing_and_keeps_what_was_typed(
    installation: Installation,
) -> None:
    client = client_for(installation, ADMIN)
    answer = post(
        client,
        "/settings/",
        {
            "exchange.url": NEAR_MISS,
            "exchange.client_id": CLIENT,
            "exchange.client_secret": SECRET,
            "smtp.host": "smtp.contoso.se",
        },
    )
    assert answer.status_code == 400
    text = answer.get_data(as_text=True)
    assert f"did you mean {FIXED} ?" in text and "letter case matters" in text
    assert 'id="exchange-url-error"' in text  # next to the field
    assert f'value="{NEAR_MISS}"' in text and f'value="{CLIENT}"' in text
    assert 'value="smtp.contoso.se"' in text
    assert SECRET not in text
    assert "Nothing was saved." in text
    saved = stored(installation)
    assert not {"exchange.client_id", "exchange.client_secret", "smtp.host"} & set(saved)
    assert audit_targets(installation) == []


def test_removing_what_sending_needs_is_refused(installation: Installation) -> None:
    """The users send via Maildir (the test configuration's default), which needs its
    folder: emptying the field is judged as a save is, and refused."""
    client = client_for(installation, ADMIN)
    answer = post(client, "/settings/", {"maildir.path": ""})
    assert answer.status_code == 400
    assert "Maildir folder is not set" in answer.get_data(as_text=True)
    assert "maildir.path" in stored(installation)


def test_fields_that_depend_on_each_other_are_saved_together(
    installation: Installation,
) -> None:
    """A remote server with encryption switched on in the same form: saved whatever
    the order in which the fields are judged (the server alone, with no encryption,
    would send the password in plain text, and is refused)."""
    client = client_for(installation, ADMIN)
    local = {"smtp.host": "localhost", "smtp.security": "none"}
    assert post(client, "/settings/", local).status_code == 302
    alone = post(client, "/settings/", {"smtp.host": "smtp.contoso.se"})
    assert alone.status_code == 400
    assert "would send the password unencrypted" in alone.get_data(as_text=True)
    both = {"smtp.host": "smtp.contoso.se", "smtp.security": "starttls"}
    assert post(client, "/settings/", both).status_code == 302
    saved = stored(installation)
    assert (saved["smtp.host"], saved["smtp.security"]) == ("smtp.contoso.se", "starttls")


def test_after_a_save_the_advice_and_what_stops_sending_are_shown(
    installation: Installation,
) -> None:
    client = client_for(installation, ADMIN)
    assert post(client, "/settings/", {"exchange.url": EXAMPLE_URL}).status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    assert "What stops sending" in text
    assert "neither the OAuth codes (Client ID, Tenant ID, Client secret)" in text
    assert 'href="#exchange-client_id"' in text


def test_a_note_is_told_apart_from_a_warning(installation: Installation) -> None:
    """``auto`` on Exchange Online says what it chose (a note: nothing to do); ``ews``
    there is warned of (Microsoft blocks it). Each says its level in words."""
    client = client_for(installation, ADMIN)
    assert post(client, "/settings/", {"exchange.url": EXAMPLE_URL}).status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    note = re.search(r'<li class="notice-note">.*?</li>', text, re.S)
    assert note is not None and '<strong class="level level-note">Note:</strong>' in note[0]
    assert "Exchange Online: sending through Microsoft Graph" in note[0]
    assert '<p class="field-advice notice-note"><strong class="level level-note">Note:' in text
    assert "Warning:" not in text
    swedish = client.get("/settings/", headers={"Accept-Language": "sv"}).get_data(as_text=True)
    assert "Anmärkning:" in swedish

    assert post(client, "/settings/", {"exchange.api": "ews"}).status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    warning = re.search(r'<li class="notice-warning">.*?</li>', text, re.S)
    assert warning is not None and "Warning:</strong>" in warning[0]
    assert "Exchange Online blocks EWS from 1 October 2026" in warning[0]
    assert "Note:" not in text


def test_a_secret_whose_destination_changed_must_be_entered_again(
    installation: Installation,
) -> None:
    client = client_for(installation, ADMIN)
    assert (
        post(client, "/settings/", {**OAUTH, "exchange.client_secret": SECRET}).status_code == 302
    )
    assert secret_state(client.get("/settings/").text, "exchange-client_secret").startswith("Saved")

    moved = post(client, "/settings/", {"exchange.tenant_id": "contoso.onmicrosoft.com"})
    assert moved.status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    assert WITHHELD in text  # the save's answer
    state = secret_state(text, "exchange-client_secret")
    assert state.startswith("Enter it again: Tenant ID (exchange.tenant_id) changed since it")
    assert "is only sent where it was saved for" in state
    assert '<div class="field reenter">' in text
    assert "Client secret must be entered again" in text  # and what stops sending says why
    swedish = client.get("/settings/", headers={"Accept-Language": "sv"}).get_data(as_text=True)
    assert secret_state(swedish, "exchange-client_secret").startswith("Ange den igen: ")

    assert post(client, "/settings/", {"exchange.client_secret": SECRET}).status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    assert secret_state(text, "exchange-client_secret").startswith("Saved")
    assert "Enter it again" not in text and "Client secret must be entered again" not in text
    assert SECRET not in text


def test_a_secret_entered_with_a_new_destination_is_bound_to_it(
    installation: Installation,
) -> None:
    """The authority is declared after the secret, yet a form that changes both saves
    the secret for the new authority: secrets are saved last."""
    client = client_for(installation, ADMIN)
    assert (
        post(client, "/settings/", {**OAUTH, "exchange.client_secret": SECRET}).status_code == 302
    )
    both = {
        "exchange.authority": "https://login.microsoftonline.us",
        "exchange.client_secret": SECRET,
    }
    assert post(client, "/settings/", both).status_code == 302
    text = client.get("/settings/").get_data(as_text=True)
    assert "Client secret (exchange.client_secret) must be" not in text
    assert "Enter it again" not in text
    assert secret_state(text, "exchange-client_secret").startswith("Saved")


def test_a_certificate_is_pasted_or_chosen_as_a_file_and_never_shown(
    installation: Installation,
) -> None:
    made = make_certificate()
    client = client_for(installation, ADMIN)
    text = client.get("/settings/").get_data(as_text=True)
    assert '<textarea id="exchange-certificate" name="exchange.certificate"' in text
    assert 'type="file" id="exchange-certificate-file" name="exchange.certificate:file"' in text
    assert 'enctype="multipart/form-data"' in text

    pasted = made.pem().replace("\n", "\r\n")  # as a browser sends a textarea
    assert post(client, "/settings/", {"exchange.certificate": pasted}).status_code == 302
    assert stored(installation)["exchange.certificate"].reveal() == made.pem()
    text = client.get("/settings/").get_data(as_text=True)
    assert secret_state(text, "exchange-certificate").startswith("Saved")
    assert made.key_pem().splitlines()[1] not in text
    assert '<textarea id="exchange-certificate" name="exchange.certificate"' in text

    pfx = made.pfx("pfx pass")  # binary: base64-encoded as `crm settings set` does
    upload = {
        "exchange.certificate_2:file": (BytesIO(pfx), "app.pfx"),
        "exchange.certificate_2_passphrase": "pfx pass",
    }
    answer = post(client, "/settings/", upload)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    assert stored(installation)["exchange.certificate_2"].reveal() == read_file_content(pfx)
    text = client.get("/settings/").get_data(as_text=True)
    assert secret_state(text, "exchange-certificate_2").startswith("Saved")
    assert "pfx pass" not in text

    kept = post(client, "/settings/", {"exchange.certificate": "", "exchange.client_id": CLIENT})
    assert kept.status_code == 302  # an empty box keeps the saved certificate
    assert stored(installation)["exchange.certificate"].reveal() == made.pem()


def test_a_bad_certificate_is_refused_next_to_its_field(installation: Installation) -> None:
    made = make_certificate()
    client = client_for(installation, ADMIN)
    answer = post(
        client, "/settings/", {"exchange.certificate": made.cert_pem, "exchange.client_id": CLIENT}
    )
    assert answer.status_code == 400
    text = answer.get_data(as_text=True)
    error = re.search(
        r'<p class="error" id="exchange-certificate-error"[^>]*>(.*?)</p>', text, re.S
    )
    assert error is not None and "no private key" in error[1]
    assert f'value="{CLIENT}"' in text  # the form is kept
    assert '"exchange.certificate" rows="6"' not in text or made.cert_pem not in text
    assert made.cert_pem.splitlines()[1] not in text  # a secret's box comes back empty
    assert "Nothing was saved." in text
    assert not {"exchange.certificate", "exchange.client_id"} & set(stored(installation))

    garbage = {"exchange.certificate:file": (BytesIO(b"\x00\x01 not a pfx"), "app.pfx")}
    refused = post(client, "/settings/", garbage)
    assert refused.status_code == 400
    assert "nor a PFX file" in refused.get_data(as_text=True)


def test_the_screen_speaks_swedish_with_the_guides_words(installation: Installation) -> None:
    client = client_for(installation, ADMIN)
    text = client.get("/settings/", headers={"Accept-Language": "sv"}).get_data(as_text=True)
    for words in ("Systeminställningar", "URL till Exchange", "Exchange oauth authentication"):
        assert words in text


def test_every_field_of_the_bundled_plugins_speaks_swedish(installation: Installation) -> None:
    swedish = load_catalogs()["sv"]
    crm = installation.crm
    texts = {f.label for f in crm.settings_fields().values()}
    texts |= {f.help for f in crm.settings_fields().values() if f.key != "mail.transport"}
    texts |= {t.label for line in crm.config.product_lines for t in crm.transports(line).values()}
    assert sorted(t for t in texts if t and t not in swedish) == []


def fill_exchange(page: Any, url: str) -> None:
    """Type the guide's Exchange settings (URL, the OAuth codes, the secret) and save."""
    page.get_by_label("Exchange URL").fill(url)
    page.get_by_label("Client ID").fill(CLIENT)
    page.get_by_label("Tenant ID").fill(TENANT)
    page.get_by_label("Client secret", exact=True).fill(SECRET)
    page.get_by_role("button", name="Save").click()


def test_system_settings_in_a_browser(page: Any, installation: Installation) -> None:
    browser_sign_in(page, ADMIN)
    page.get_by_role("link", name="System settings").click()
    expect(page.get_by_role("heading", name="System settings")).to_be_visible()
    fill_exchange(page, NEAR_MISS)

    refusal = page.locator("#exchange-url-error")
    expect(refusal).to_contain_text(f"did you mean {FIXED} ?")
    expect(page.get_by_label("Client ID")).to_have_value(CLIENT)
    expect(page.get_by_label("Tenant ID")).to_have_value(TENANT)
    expect(page.get_by_label("Client secret", exact=True)).to_have_value("")
    assert "exchange.client_id" not in stored(installation)

    page.get_by_label("Exchange URL").fill(FIXED)
    page.get_by_label("Client secret", exact=True).fill(SECRET)
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("System settings saved (4 changed).")).to_be_visible()
    page.reload()
    state = page.locator("#exchange-client_secret-state")
    expect(state).to_contain_text("Saved")
    expect(state).to_contain_text(installation.crm.secret_box().fingerprint(SECRET))
    expect(page.get_by_label("Client secret", exact=True)).to_have_value("")
    assert SECRET not in page.content()
    screenshot(page, "system-settings")


def test_a_withheld_secret_and_certificates_in_a_browser(
    page: Any, installation: Installation
) -> None:
    made = make_certificate()
    pfx = made.pfx("pfx pass")  # salted: made once
    browser_sign_in(page, ADMIN)
    page.goto("/settings/")
    fill_exchange(page, FIXED)
    expect(page.get_by_text("System settings saved (4 changed).")).to_be_visible()

    page.get_by_label("Tenant ID").fill("contoso.onmicrosoft.com")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status").filter(has_text=WITHHELD)).to_be_visible()
    state = page.locator("#exchange-client_secret-state")
    expect(state).to_contain_text("Enter it again: Tenant ID (exchange.tenant_id) changed since")
    page.locator("#exchange-client_secret-state").scroll_into_view_if_needed()
    screenshot(page, "system-settings-reenter")

    certificate = page.get_by_label("Certificate", exact=True)
    certificate.fill(made.cert_pem)  # the certificate without its key
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#exchange-certificate-error")).to_contain_text("no private key")
    expect(certificate).to_have_value("")
    expect(page.get_by_label("Tenant ID")).to_have_value("contoso.onmicrosoft.com")
    assert "exchange.certificate" not in stored(installation)

    certificate.fill(made.pem())
    page.get_by_label("Second certificate: or choose the file (PEM or PFX)").set_input_files(
        {"name": "app.pfx", "mimeType": "application/x-pkcs12", "buffer": pfx}
    )
    page.get_by_label("Second certificate passphrase").fill("pfx pass")
    page.get_by_label("Client secret", exact=True).fill(SECRET)
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("System settings saved (4 changed).")).to_be_visible()
    expect(state).to_contain_text("Saved")
    expect(state).not_to_contain_text("Enter it again")
    expect(page.locator("#exchange-certificate-state")).to_contain_text("Saved")
    expect(page.locator("#exchange-certificate_2-state")).to_contain_text("Saved")
    expect(certificate).to_have_value("")
    saved = stored(installation)
    assert saved["exchange.certificate"].reveal() == made.pem()
    assert saved["exchange.certificate_2"].reveal() == read_file_content(pfx)
    assert made.key_pem().splitlines()[1] not in page.content()
