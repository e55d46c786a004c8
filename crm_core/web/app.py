"""The web app: the guide's screens on the core's services.

Why Flask: the core is synchronous (SQLAlchemy sessions, blinker signals, pluggy
hooks), so a WSGI framework fits it without a second concurrency model; Flask is small
and well kept, renders on the server with Jinja2 (pages work without JavaScript), and
Flask-WTF gives every form a CSRF token. Production serves it with waitress, a pure
Python WSGI server that runs on every platform the CLI does (``crm serve``); Flask's
own server runs only with ``crm serve --dev``.

No rule lives here twice: views call the same services as the CLI (the settings
store and its validators, ``Crm.sender_problems``, the outbox's enqueue and operations,
Test connection), and the settings screens are rendered from the fields the plugins
declare.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask, g, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.wrappers import Response

from crm_core.web import auth, setting_forms
from crm_core.web.i18n import COOKIE, LANGUAGES, _, choose_language, load_catalogs

if TYPE_CHECKING:
    from crm_core.app import Crm

SESSION_HOURS = 12


def create_app(crm: Crm, *, secure_cookies: bool = False, catcher: Path | None = None) -> Flask:
    """A web app on ``crm`` (opened, checked and migrated by the caller).

    ``secure_cookies`` marks the session cookie Secure: set it when the app is served
    over HTTPS (directly or behind a proxy that terminates TLS). ``catcher`` is the
    local mail catcher's Maildir folder (``crm demo``): only then has the app the
    catcher's screen.
    """
    from crm_core.web import screens

    crm.check_plugins()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=crm.secret_box().derive("web-session"),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        MAX_CONTENT_LENGTH=crm.config.mail.max_message_bytes * 2,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the signed session
        CATCHER_FOLDER=str(catcher) if catcher is not None else None,
    )
    catalogs = load_catalogs()

    @app.before_request
    def per_request() -> None:
        g.crm = crm
        g.catalogs = catalogs
        g.lang = choose_language()
        auth.load_user()

    CSRFProtect(app)  # after per_request: a refusal page speaks the user's language

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    app.jinja_env.globals.update(
        _=_, is_admin=auth.is_admin, languages=LANGUAGES, file_field=setting_forms.file_field
    )
    app.jinja_env.filters["when"] = _when
    app.register_error_handler(CSRFError, _csrf_refused)
    for status in (403, 404, 413):
        app.register_error_handler(status, _error_page)
    app.register_blueprint(auth.bp)
    app.add_url_rule("/language", "language", _switch_language, methods=["POST"])
    app.add_url_rule("/", "home", _home)
    screens.register(app)
    return app


def _home() -> Response:
    from flask import redirect, url_for

    return redirect(url_for("persons.list_persons"))


def _switch_language() -> Response:
    """Remember the chosen language in a cookie, and go back to the page."""
    from flask import redirect

    chosen = request.form.get("lang", "en")
    back = request.form.get("back", "/")
    target = back if back.startswith("/") and not back.startswith("//") else "/"
    response = redirect(target)
    if chosen in LANGUAGES:
        response.set_cookie(COOKIE, chosen, max_age=365 * 24 * 3600, httponly=True, samesite="Lax")
    return response


def _when(value: Any) -> str:
    """A time for people: ISO 8601 with the zone, to the minute."""
    from crm_core.cli.output import when

    text = when(value)
    return text[:16] + text[19:] if len(text) > 19 else text


def _csrf_refused(error: CSRFError) -> tuple[str, int]:
    return render_template(
        "error.html",
        status=400,
        message=_("The form was too old or came from another site; reload the page and try again."),
    ), 400


def _error_page(error: Any) -> tuple[str, int]:
    status = int(getattr(error, "code", 500) or 500)
    messages = {
        403: _("You may not see this page."),
        404: _("There is no such page."),
        413: _("What you sent is too large."),
    }
    return render_template("error.html", status=status, message=messages.get(status, "")), status
