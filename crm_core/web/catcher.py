"""The mail catcher's screen: read what the local catcher kept (development only).

Why a screen: ``make run`` shows the whole way a mail goes, from the envelope on a
person to the letter as it arrived, without a mail program. It exists only when the
app is created with a catcher folder (``crm demo``); any signed-in user may read it,
as it holds only demo mail. Bodies are shown as text, never rendered: an HTML body is
shown as its source.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, current_app, render_template, request

from crm_core.catcher import list_caught, open_caught
from crm_core.web.auth import signed_in
from crm_core.web.screens import NavItem

CONFIG_KEY = "CATCHER_FOLDER"
bp = Blueprint("catcher", __name__, url_prefix="/catcher")
NAV = (NavItem("catcher.inbox", "Mail catcher"),)


def _folder() -> Path:
    return Path(current_app.config[CONFIG_KEY])


@bp.get("/")
@signed_in
def inbox() -> str:
    """Every caught mail, newest first; the list alone for a refresh (X-Fragment)."""
    letters = list_caught(_folder())
    if request.headers.get("X-Fragment") == "1":
        return render_template("catcher/_rows.html", letters=letters)
    return render_template("catcher/inbox.html", letters=letters)


@bp.get("/<key>")
@signed_in
def letter(key: str) -> str:
    """One caught mail: its envelope, headers, bodies as text and attachments."""
    found = open_caught(_folder(), key)
    if found is None:
        abort(404)
    return render_template("catcher/letter.html", letter=found)
