"""Signing in and out, changing one's own password, and who may see what.

Why the checks live here as decorators: every view states who may use it
(:func:`signed_in`, :func:`admin_only`), and the check runs on the server for every
request, whatever the page showed; a user who asks for another user's page or the
system settings by a direct request gets 403.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import Blueprint, abort, flash, g, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from crm_core import audit
from crm_core.errors import ValidationError
from crm_core.models import Role, User
from crm_core.passwords import password_matches, set_password
from crm_core.signin import sign_in
from crm_core.web.i18n import _

F = TypeVar("F", bound=Callable[..., Any])
bp = Blueprint("auth", __name__)


def load_user() -> None:
    """Before each request: the signed-in user, read afresh (a removed user is out)."""
    g.user = None
    user_id = session.get("user_id")
    if isinstance(user_id, int):
        with g.crm.transaction() as db:
            g.user = db.get(User, user_id)
        if g.user is None:
            session.clear()


def is_admin() -> bool:
    """True when the signed-in user is an administrator."""
    return g.user is not None and g.user.role == Role.ADMIN.value


def signed_in(view: F) -> F:
    """The view needs a signed-in user; others go to the sign-in page."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.sign_in_page", next=request.full_path))
        return view(*args, **kwargs)

    return cast(F, checked)


def admin_only(view: F) -> F:
    """The view is for administrators; a signed-in user gets 403."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("auth.sign_in_page", next=request.full_path))
        if not is_admin():
            abort(403)
        return view(*args, **kwargs)

    return cast(F, checked)


def actor() -> str:
    """Who is acting, for the audit log."""
    return str(g.user.email) if g.user is not None else "anonymous"


def _safe_next(target: str | None) -> str:
    """Only a path on this site: a sign-in link cannot send anyone elsewhere."""
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("persons.list_persons")


@bp.get("/sign-in")
def sign_in_page() -> str:
    """The sign-in form."""
    return render_template("sign_in.html", email="", next=request.args.get("next", ""))


@bp.post("/sign-in")
def sign_in_submit() -> Response | tuple[str, int]:
    """Check the password; a wrong one, or too many tries, say the same few words."""
    email = request.form.get("email", "").strip()
    password = request.form.get("password", "")
    address = request.remote_addr or "unknown"
    with g.crm.transaction() as db:
        answer = sign_in(db, email, password, address)
        user_id = answer.user.id if answer.user is not None else None
    if user_id is None:
        message = (
            _("Too many failed sign-ins. Try again later.")
            if answer.locked_until is not None
            else _("The e-mail or the password is wrong.")
        )
        status = 429 if answer.locked_until is not None else 401
        page = render_template(
            "sign_in.html", email=email, next=request.form.get("next", ""), error=message
        )
        return page, status
    session.clear()
    session["user_id"] = user_id
    session.permanent = True
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/sign-out")
def sign_out() -> Response:
    """Forget the session."""
    session.clear()
    flash(_("You are signed out."))
    return redirect(url_for("auth.sign_in_page"))


@bp.get("/account/password")
@signed_in
def password_page() -> str:
    """The form to change one's own password."""
    return render_template("password.html", errors={})


@bp.post("/account/password")
@signed_in
def password_submit() -> Response | tuple[str, int]:
    """Change one's own password after confirming the current one."""
    current = request.form.get("current", "")
    new = request.form.get("new", "")
    errors: dict[str, str] = {}
    if new != request.form.get("repeat", ""):
        errors["repeat"] = _("The two new passwords differ.")
    with g.crm.transaction() as db:
        user = db.get(User, g.user.id)
        if user is None or not password_matches(db, user, current):
            errors["current"] = _("The current password is wrong.")
        if not errors and user is not None:
            try:
                set_password(db, user, new)
            except ValidationError as exc:
                errors["new"] = "; ".join(_(p.message) for p in exc.problems)
            else:
                audit.record(db, actor(), "password changed", user.email)
    if errors:
        return render_template("password.html", errors=errors), 400
    flash(_("Your password is changed."))
    return redirect(url_for("persons.list_persons"))
