"""Swedish and English for the web app: the catalog, the choice, and ``_``.

Why a catalog of .po files read at start-up (Babel's reader) instead of compiled .mo
files: nothing binary is committed, and each screen keeps its strings in a file of
its own (``translations/sv/<screen>.po``), so screens can grow side by side. English
is the source language; a Swedish string that is missing fails a test.

The language comes from the ``lang`` cookie (the switch in the page header), else the
browser's Accept-Language, else English.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from babel.messages.pofile import read_po
from flask import g, request

LANGUAGES = ("sv", "en")
COOKIE = "lang"
TRANSLATIONS = Path(__file__).parent / "translations"


def load_catalogs(folder: Path = TRANSLATIONS) -> Mapping[str, Mapping[str, str]]:
    """language -> {English text: translation}, from every .po file of that language."""
    catalogs: dict[str, Mapping[str, str]] = {}
    for language in LANGUAGES:
        texts: dict[str, str] = {}
        for path in sorted((folder / language).glob("*.po")):
            with path.open("rb") as handle:
                for message in read_po(handle, locale=language):
                    if message.id and isinstance(message.id, str) and message.string:
                        texts[message.id] = str(message.string)
        catalogs[language] = MappingProxyType(texts)
    return MappingProxyType(catalogs)


def choose_language() -> str:
    """The signed-in person's language for this request."""
    chosen = request.cookies.get(COOKIE, "")
    if chosen in LANGUAGES:
        return chosen
    return request.accept_languages.best_match(LANGUAGES, default="en") or "en"


def gettext(text: str, **values: object) -> str:
    """``text`` in the request's language, with ``{name}`` values filled in."""
    catalogs: Mapping[str, Mapping[str, str]] = g.catalogs
    translated = catalogs.get(g.lang, {}).get(text, text)
    return translated.format(**values) if values else translated


_ = gettext
