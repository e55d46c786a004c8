"""Swedish and English: every string of the web app is translated, and the choice
follows the browser until the switch is used, then the switch."""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.pofile import read_po

from crm_core.web.i18n import load_catalogs
from tests.web_fixtures import USER, Installation, post, sign_in
from tests.web_fixtures import installation as installation

WEB = Path(__file__).resolve().parent.parent / "crm_core" / "web"
# _("…") and _('…') in templates and Python; an f-string is never passed to _().
CALL = re.compile(r"""(?<![\w.])_\(\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*[,)]""")


def web_strings() -> set[str]:
    """Every literal string the web app hands to ``_``."""
    found: set[str] = set()
    for path in [*WEB.rglob("*.html"), *WEB.rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for double, single in CALL.findall(text):
            found.add((double or single).replace('\\"', '"').replace("\\'", "'"))
    return found


def test_every_string_of_the_web_app_has_a_swedish_translation() -> None:
    strings = web_strings()
    assert len(strings) > 30  # the scan sees the app
    swedish = load_catalogs()["sv"]
    missing = sorted(s for s in strings if s not in swedish)
    assert missing == [], f"untranslated: {missing}"


def test_a_text_has_one_swedish_translation_across_the_screens_catalogs() -> None:
    """The catalogs are merged at start-up, so a text two screens translate differently
    would take whichever file is read last: one word must serve both."""
    found: dict[str, set[str]] = {}
    for path in sorted((WEB / "translations" / "sv").glob("*.po")):
        with path.open("rb") as handle:
            for message in read_po(handle, locale="sv"):
                if message.id and isinstance(message.id, str) and message.string:
                    found.setdefault(message.id, set()).add(str(message.string))
    assert len(found) > 30
    assert {text: words for text, words in found.items() if len(words) > 1} == {}


def test_the_language_follows_the_browser_then_the_switch(installation: Installation) -> None:
    client = installation.app.test_client()
    swedish = client.get("/sign-in", headers={"Accept-Language": "sv-SE,sv;q=0.9,en;q=0.5"})
    assert "Logga in" in swedish.get_data(as_text=True)
    english = client.get("/sign-in", headers={"Accept-Language": "de-DE"})
    assert "Sign in" in english.get_data(as_text=True)
    sign_in(client, USER)
    post(client, "/language", {"lang": "sv", "back": "/persons/"}, page="/persons/")
    remembered = client.get("/persons/", headers={"Accept-Language": "en-GB"})
    assert "Personer" in remembered.get_data(as_text=True)
