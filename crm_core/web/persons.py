"""Persons: the register, each person's overview and history, and the envelope.

Why the envelope works as it does: the guide's test of e-mail is "open the person,
click the envelope, write and send". The mail goes through the outbox like every other
(crm_core.mail.enqueue, with the person named, so it lands on their history); From is
always the signed-in user, never a field of the form. A refusal ("Error validating
e-mail") names each bad value next to its field, keeps what was typed and queues
nothing: the mail and its audit entry are one transaction.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from sqlalchemy import ColumnElement, func, or_, select, true
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from crm_core import audit
from crm_core.errors import MailValidationError, Problem
from crm_core.mail import operations
from crm_core.mail.addresses import Address, split_list
from crm_core.mail.enqueue import MailRequest, enqueue
from crm_core.mail.message import Attachment
from crm_core.models import OutboxMessage, Person
from crm_core.web.auth import actor, signed_in
from crm_core.web.i18n import _
from crm_core.web.listing import ID, live, page_of, wants_fragment
from crm_core.web.outbox import visible

bp = Blueprint("persons", __name__, url_prefix="/persons")
HISTORY = 50


@dataclass
class Compose:
    """What the compose form shows: the typed values and the problems by field."""

    to: str = ""
    cc: str = ""
    subject: str = ""
    text: str = ""
    errors: dict[str, list[str]] = field(default_factory=dict)
    files: int = 0


@bp.get("/")
@signed_in
def list_persons() -> str:
    """The register by name, one page at a time, with a search by name or e-mail."""
    query = request.args.get("q", "").strip()
    where = _matching(query)
    with g.crm.transaction() as db:
        page = page_of(int(db.scalar(select(func.count()).select_from(Person).where(where)) or 0))
        persons = db.scalars(
            select(Person)
            .where(where)
            .order_by(Person.name, Person.id)
            .limit(page.size)
            .offset(page.offset)
        ).all()
    return render_template("persons/list.html", persons=persons, q=query, page=page)


def _matching(query: str) -> ColumnElement[bool]:
    """Persons whose name or e-mail contains the words typed, in any letter case
    (``%`` and ``_`` are plain characters here)."""
    if not query:
        return true()
    words = query.lower()
    return or_(
        func.lower(Person.name).contains(words, autoescape=True),
        func.lower(Person.email).contains(words, autoescape=True),
    )


def _person(session: Session, person_id: int) -> Person:
    person = session.get(Person, person_id)
    if person is None:
        abort(404)
    return person


@bp.get(f"/<{ID}:person_id>")
@signed_in
def show_person(person_id: int) -> Response:
    """The guide's person overview: name, e-mail, mobile, the envelope, the history."""
    with g.crm.transaction() as db:
        person = _person(db, person_id)
        history, total = operations.person_history(db, person, HISTORY)
        shown = visible(db, [e.outbox_id for e in history if e.outbox_id is not None])
        queued = _queued_notice(db)
    context = {
        "person": person,
        "history": history,
        "total": total,
        "linked": shown,
        "queued": queued,
    }
    template = "persons/_history.html" if wants_fragment() else "persons/show.html"
    return live(render_template(template, **context))


def _queued_notice(session: Session) -> OutboxMessage | None:
    """The mail just sent from the envelope (``?queued=ID``), if it is the viewer's."""
    raw = request.args.get("queued", "")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return None
    outbox_id = int(raw)
    return session.get(OutboxMessage, outbox_id) if visible(session, [outbox_id]) else None


@bp.get(f"/<{ID}:person_id>/mail")
@signed_in
def compose(person_id: int) -> str:
    """The envelope: a new mail to the person, From the signed-in user."""
    with g.crm.transaction() as db:
        person = _person(db, person_id)
        form = Compose(to=str(Address(person.email, person.name)))
    return render_template("persons/compose.html", person=person, form=form)


@bp.post(f"/<{ID}:person_id>/mail")
@signed_in
def send(person_id: int) -> Response | tuple[str, int]:
    """Queue the mail through the outbox, or show why not next to each field."""
    typed = request.form
    form = Compose(
        typed.get("to", ""), typed.get("cc", ""), typed.get("subject", ""), typed.get("text", "")
    )
    files = _attachments()
    form.files = len(files)
    try:
        with g.crm.transaction() as db:
            person = _person(db, person_id)
            queued = enqueue(g.crm, db, _request(form, files, person))
            audit.record(db, actor(), "mail queued", f"outbox #{queued.outbox_id}", person.email)
    except MailValidationError as exc:
        form.errors = _errors_by_field(exc.problems)
        with g.crm.transaction() as db:
            person = _person(db, person_id)
        return render_template("persons/compose.html", person=person, form=form), 400
    target = url_for("persons.show_person", person_id=person_id, queued=queued.outbox_id)
    return redirect(target, code=303)


def _request(form: Compose, files: list[Attachment], person: Person) -> MailRequest:
    """The core's request: From is the signed-in user, whatever the form held."""
    return MailRequest(
        sender_email=str(g.user.email),
        to=split_list(form.to),
        cc=split_list(form.cc),
        subject=form.subject,
        text=form.text,
        attachments=tuple(files),
        person_email=person.email,
    )


def _attachments() -> list[Attachment]:
    """The uploaded files; the type is read from the name, as ``crm send`` does."""
    found = []
    for upload in request.files.getlist("attachments"):
        if not upload.filename:
            continue  # the empty part a browser sends when no file was chosen
        name = PurePosixPath(upload.filename.replace("\\", "/")).name
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        found.append(Attachment(name, content_type, upload.read()))
    return found


def _errors_by_field(problems: tuple[Problem, ...]) -> dict[str, list[str]]:
    """Each problem next to the field it concerns; the rest above the form."""
    errors: dict[str, list[str]] = {}
    for problem in problems:
        name = _field_of(problem.key)
        errors.setdefault(name, []).append(_describe(problem, name))
    return errors


def _field_of(key: str) -> str:
    """Which field a core Problem's key names (``to 'x@nodot'`` is the To field)."""
    first = key.split(" ", 1)[0]
    if first in ("to", "cc", "subject"):
        return first
    if first in ("attachment", "size"):
        return "attachments"
    return "to" if first == "recipients" else "form"


def _describe(problem: Problem, name: str) -> str:
    """``'x@nodot': the domain … (write …)``; known phrases in the page's language."""
    what = problem.key
    if name in ("to", "cc", "subject"):
        what = what.removeprefix(name).strip()  # the field's label says the rest
    elif name == "attachments" and not what.startswith("attachment "):
        what = ""
    text = f"{what}: {_(problem.message)}" if what else _(problem.message)
    return f"{text} ({problem.fix})" if problem.fix else text
