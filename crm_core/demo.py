"""``crm demo``: the whole product on one machine, for ``make run``.

It creates (or reuses) a demo installation in one folder, then runs the three parts a
real installation runs: the web app (waitress), one outbox worker and, instead of a
mail server, the local mail catcher (:mod:`crm_core.catcher`), which the demo user's
SMTP settings point at. A mail sent from the web app therefore goes the real way:
validated and queued, claimed by the worker, handed to the SMTP transport over a
socket, and kept where the catcher's screen shows it.

Why a command and not a script: it exercises exactly the code paths a real
installation uses (config file, migrations, settings and their checks, the outbox,
a worker, a transport plugin, the web app), so "make run works" means the product works.
"""

from __future__ import annotations

import errno
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session

from crm_core import audit, directory
from crm_core.app import Crm
from crm_core.catcher import HOST, MailCatcher
from crm_core.config import load_config
from crm_core.files import private_folder
from crm_core.mail.worker import BatchReport, Worker, WorkerStats
from crm_core.models import Person, User
from crm_core.passwords import set_password
from crm_core.plugins import installed_plugins

log = logging.getLogger(__name__)

DEMO_CONFIG = """\
# crm-mail demo installation, made by `crm demo`.
# Every product line sends through SMTP by default; the demo user's SMTP settings
# point at the local mail catcher that `crm demo` runs.

[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "smtp"

[product_lines.sales]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "smtp"

[product_lines.rentals]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "smtp"

[product_lines.boplats]
plugins = ["smtp_mail"]
default_transport = "smtp"
"""

ADMIN = ("admin@example.se", "Ada Admin", "commercial")
DEMO_USER = ("anna.andersson@example.se", "Anna Andersson", "commercial")
DEMO_PERSON = ("per.persson@example.com", "Per Persson", "+46 70 123 45 67")
ACTOR = "demo"
WEB_PORT = 8000
SMTP_PORT = 2525


@dataclass(frozen=True)
class Account:
    """One account that can sign in, and its password when it was just set."""

    email: str
    name: str
    password: str | None  # None: set before, not known any more


def prepare(folder: Path) -> Crm:
    """Write the demo config (once), open the Crm and create or upgrade the database."""
    private_folder(folder)  # it will hold the database and the secret key
    config_path = folder / "crm.toml"
    if not config_path.exists():
        config_path.write_text(DEMO_CONFIG, encoding="utf-8")
    # The demo's own database, whatever CRM_DATABASE_URL says in this shell.
    env = {"CRM_DATABASE_URL": f"sqlite:///{(folder / 'crm.db').resolve()}"}
    config = load_config(config_path, available_plugins=installed_plugins(), environ=env)
    crm = Crm(config, environ={})
    crm.check_plugins()
    crm.init_database()
    crm.create_key()
    return crm


def populate(crm: Crm, new_passwords: bool = False) -> tuple[Account, Account]:
    """The administrator, the demo user and the test person (kept where they exist).

    A password is made when its account is made (or with ``new_passwords``), and
    returned that once: only its hash is stored.
    """
    with crm.transaction() as session:
        admin = _account(session, ADMIN, admin=True, new_password=new_passwords)
        user = _account(session, DEMO_USER, admin=False, new_password=new_passwords)
        p_email, p_name, mobile = DEMO_PERSON
        if session.scalar(select(Person).where(Person.email == p_email)) is None:
            directory.add_person(session, p_email, p_name, mobile)
    return admin, user


def _account(
    session: Session, who: tuple[str, str, str], admin: bool, new_password: bool
) -> Account:
    email, name, line = who
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = directory.add_user(session, email, name, line, admin=admin)
    elif not new_password and user.password_hash:
        return Account(email, name, None)
    password = secrets.token_urlsafe(12)
    set_password(session, user, password)
    audit.record(session, ACTOR, "password set", email)
    return Account(email, name, password)


def point_at_catcher(crm: Crm, port: int) -> None:
    """The demo user sends through SMTP to the catcher: loopback, no TLS, no login.

    The order matters: each save is checked, and plain text is allowed only to a
    server on this machine, so the host is set before the transport is chosen.
    """
    values = (
        ("smtp.auth", "none"),
        ("smtp.security", "none"),
        ("smtp.host", HOST),
        ("smtp.port", str(port)),
        ("mail.transport", "smtp"),
    )
    with crm.transaction() as session:
        user = directory.find_user(session, DEMO_USER[0])
        for key, raw in values:
            crm.set_user_setting(session, user, key, raw, actor=ACTOR)


def serve_web(app: Any, port: int) -> Any:
    """A waitress server for ``app`` on 127.0.0.1:``port``, or a free port if it is taken."""
    from waitress.server import create_server

    try:
        return create_server(app, host=HOST, port=port, threads=8, ident="crm-mail")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
        return create_server(app, host=HOST, port=0, threads=8, ident="crm-mail")


def start_catcher(folder: Path, port: int) -> MailCatcher:
    """The mail catcher on ``port``, or on a free port if it is taken."""
    try:
        return MailCatcher(folder, port).start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
        return MailCatcher(folder, 0).start()


@dataclass
class Running:
    """The web app, the worker and the catcher, each in a thread of its own."""

    crm: Crm
    catcher: MailCatcher
    server: Any
    app: Flask
    on_batch: Callable[[BatchReport], None] | None = None
    stop_worker: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    stats: WorkerStats = field(default_factory=WorkerStats)
    worker_error: BaseException | None = None

    @property
    def url(self) -> str:
        """Where the web app answers."""
        return f"http://{HOST}:{self.server.effective_port}/"

    def start(self) -> None:
        """Start the worker and the web server threads (the catcher runs already)."""
        worker = Worker(self.crm, name="demo-worker", on_batch=self.on_batch)
        self.threads[:] = [
            threading.Thread(target=self._work, args=(worker,), name="outbox-worker"),
            threading.Thread(target=self.server.run, name="web"),
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, worker: Worker) -> None:
        try:
            self.stats = worker.run(self.stop_worker)
        except Exception as exc:  # reported by stop(); the web app goes on meanwhile
            log.exception("the demo's outbox worker stopped")
            self.worker_error = exc

    def stop(self) -> None:
        """Stop all three: the worker finishes or releases what it holds, the web
        server closes its connections, the catcher frees its port.

        Safe at any point after :func:`start` returned, even before :meth:`start`
        ran (a Ctrl-C during start-up).
        """
        self.stop_worker.set()
        self._close_web()
        for thread in self.threads:
            if thread.ident is not None:
                thread.join()
        self.server.task_dispatcher.shutdown()
        self.catcher.stop()

    def _close_web(self) -> None:
        """Close every socket from inside waitress's loop, so the loop ends by itself."""
        from waitress import wasyncore

        server = self.server
        serving = any(t.name == "web" and t.ident is not None for t in self.threads)
        if serving:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        else:
            wasyncore.close_all(server._map)


def start(
    crm: Crm,
    folder: Path,
    web_port: int = WEB_PORT,
    smtp_port: int = SMTP_PORT,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> Running:
    """Start the catcher, point the demo user at it and bind the web app's port.

    The worker and the web server start with :meth:`Running.start`: a caller keeps
    the returned object first, so that a Ctrl-C at any moment can stop what runs.
    """
    from crm_core.web import create_app

    caught = folder / "caught"
    catcher = start_catcher(caught, smtp_port)
    try:
        point_at_catcher(crm, catcher.port)
        app = create_app(crm, catcher=caught)
        server = serve_web(app, web_port)
    except BaseException:
        catcher.stop()
        raise
    return Running(crm, catcher, server, app, on_batch)
