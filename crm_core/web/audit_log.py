"""The audit log: who did what, and when, newest first (administrators only).

Why it shows entries as stored: the core writes an entry in the same transaction as
the change (a setting's key, never its value; a mail's outbox number), so the page
needs no filtering to be safe to show.
"""

from __future__ import annotations

from flask import Blueprint, g, render_template

from crm_core import audit
from crm_core.web.auth import admin_only
from crm_core.web.listing import PAGE_SIZE, page_of
from crm_core.web.screens import NavItem

bp = Blueprint("audit_log", __name__, url_prefix="/audit")
NAV = (NavItem("audit_log.list_entries", "Audit log", admin=True),)


@bp.get("/")
@admin_only
def list_entries() -> str:
    """One page of the log, newest first."""
    with g.crm.transaction() as db:
        page = page_of(audit.count(db))
        entries = list(audit.recent(db, PAGE_SIZE, page.offset))
    return render_template("audit_log/list.html", entries=entries, page=page)
