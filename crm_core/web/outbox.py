"""The outbox: every mail with its state, its recipients' states and its attempts.

Why these rules: a user sees only their own mail, in the list and by a direct URL
(another user's mail is "no such page", so its existence is not told either); an
administrator sees all, and may retry, cancel or resolve a mail. What the state allows
is the core's rule (crm_core.mail.operations); a refusal is shown in its words. Each
action writes its audit entry in the same transaction as the change.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from crm_core import audit
from crm_core.errors import NotFoundError, ValidationError
from crm_core.mail import operations
from crm_core.models import OutboxMessage, OutboxState
from crm_core.web.auth import actor, admin_only, is_admin, signed_in
from crm_core.web.i18n import _
from crm_core.web.listing import ID, PAGE_SIZE, live, page_of, wants_fragment
from crm_core.web.screens import NavItem

bp = Blueprint("outbox", __name__, url_prefix="/outbox")
NAV = (NavItem("outbox.list_messages", "Outbox"),)


@bp.app_template_global()
def state_label(state: str | None) -> str:
    """A mail's or a recipient's state in words of the page's language."""
    labels = {
        "queued": _("queued"),
        "sending": _("sending"),
        "sent": _("sent"),
        "partial": _("partly sent"),
        "retry": _("waiting to retry"),
        "failed": _("failed"),
        "unknown": _("unknown"),
        "cancelled": _("cancelled"),
        "delivered": _("delivered"),
        "deferred": _("deferred"),
        "refused": _("refused"),
        "waiting": _("waiting"),
    }
    return labels.get(state or "", state or "")


def owner_filter() -> int | None:
    """Whose mail the signed-in person may see: their own, or (administrator) all."""
    return None if is_admin() else int(g.user.id)


def visible(session: Session, ids: Collection[int]) -> set[int]:
    """Which of these outbox ids the signed-in person may open."""
    if not ids:
        return set()
    query = select(OutboxMessage.id).where(OutboxMessage.id.in_(list(ids)))
    owner = owner_filter()
    if owner is not None:
        query = query.where(OutboxMessage.user_id == owner)
    return set(session.scalars(query))


def _checked_row(session: Session, outbox_id: int) -> OutboxMessage:
    """The row, or 404 when it does not exist or is another user's."""
    try:
        row = operations.get_message(session, outbox_id)
    except NotFoundError:
        abort(404)
    owner = owner_filter()
    if owner is not None and row.user_id != owner:
        abort(404)
    return row


@bp.get("/")
@signed_in
def list_messages() -> Response:
    """The outbox, newest first, one page at a time, optionally of one state."""
    state = request.args.get("state", "")
    chosen = state if state in {s.value for s in OutboxState} else None
    owner = owner_filter()
    with g.crm.transaction() as db:
        total = operations.count_messages(db, chosen, user_id=owner)
        page = page_of(total)
        views = operations.list_messages(
            db, chosen, PAGE_SIZE, g.crm, user_id=owner, offset=page.offset
        )
    context = {"views": views, "page": page, "state": chosen or "", "states": list(OutboxState)}
    template = "outbox/_list.html" if wants_fragment() else "outbox/list.html"
    return live(render_template(template, **context))


@bp.get(f"/<{ID}:outbox_id>")
@signed_in
def show_message(outbox_id: int) -> Response:
    """One mail: state, recipients, attempts, the server's reply, the next try."""
    return live(_detail_page(outbox_id))


def _detail_page(outbox_id: int, refusal: str | None = None) -> str:
    with g.crm.transaction() as db:
        _checked_row(db, outbox_id)
        detail = operations.show_message(db, outbox_id, g.crm)
    template = "outbox/_detail.html" if wants_fragment() else "outbox/detail.html"
    return render_template(template, detail=detail, view=detail.view, refusal=refusal)


@bp.post(f"/<{ID}:outbox_id>/retry")
@admin_only
def retry(outbox_id: int) -> Response | tuple[str, int]:
    """Queue the mail again, due now."""
    return _act(
        outbox_id,
        lambda db: operations.retry(db, outbox_id),
        "mail retried",
        _("Outbox #{id} is queued again.", id=outbox_id),
    )


@bp.post(f"/<{ID}:outbox_id>/cancel")
@admin_only
def cancel(outbox_id: int) -> Response | tuple[str, int]:
    """Cancel a mail that is not sent."""
    return _act(
        outbox_id,
        lambda db: operations.cancel(db, outbox_id),
        "mail cancelled",
        _("Outbox #{id} is cancelled.", id=outbox_id),
    )


@bp.post(f"/<{ID}:outbox_id>/resolve")
@admin_only
def resolve(outbox_id: int) -> Response | tuple[str, int]:
    """An administrator's decision on a mail whose fate is unknown: sent or not sent."""
    decision = request.form.get("decision", "")
    if decision not in ("sent", "not-sent"):
        abort(400)
    sent = decision == "sent"
    done = (
        _("Outbox #{id} is marked sent.", id=outbox_id)
        if sent
        else _("Outbox #{id} is not sent; it is queued again.", id=outbox_id)
    )
    return _act(
        outbox_id,
        lambda db: operations.resolve(db, outbox_id, sent, why=f"decided by {actor()}"),
        "mail resolved",
        done,
        "sent" if sent else "not sent",
    )


def _act(
    outbox_id: int,
    change: Callable[[Session], OutboxMessage],
    action: str,
    done: str,
    detail: str = "",
) -> Response | tuple[str, int]:
    """Do ``change`` and its audit entry in one transaction; a refusal changes nothing."""
    try:
        with g.crm.transaction() as db:
            change(db)
            audit.record(db, actor(), action, f"outbox #{outbox_id}", detail)
    except NotFoundError:
        abort(404)
    except ValidationError as exc:
        return _detail_page(outbox_id, refusal=_refusal_text(exc)), 409
    flash(done)
    return redirect(url_for("outbox.show_message", outbox_id=outbox_id), code=303)


def _refusal_text(exc: ValidationError) -> str:
    """The core's refusal in its words: what cannot be done, and why."""
    reasons = "; ".join(f"{p.key}: {p.message}" if p.key else p.message for p in exc.problems)
    return f"{exc.summary}: {reasons}" if reasons else exc.summary
