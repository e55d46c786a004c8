"""Persons: the register, each person's overview and history, and the envelope."""

from __future__ import annotations

from flask import Blueprint, g, render_template, request

from crm_core import directory
from crm_core.web.auth import signed_in

bp = Blueprint("persons", __name__, url_prefix="/persons")


@bp.get("/")
@signed_in
def list_persons() -> str:
    """Every person, with a search by name or e-mail."""
    query = request.args.get("q", "").strip().lower()
    with g.crm.transaction() as db:
        persons = [
            p
            for p in directory.list_persons(db)
            if not query or query in p.name.lower() or query in p.email
        ]
    return render_template("persons/list.html", persons=persons, q=query)
