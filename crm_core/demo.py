"""``crm demo``: a working installation in one folder, for ``make run``.

Why a command and not a script: it exercises exactly the code paths a real
installation uses (config file, migrations, settings, validation, the outbox and a
worker, a transport plugin), so "make run works" means the product works.
"""

from __future__ import annotations

import mailbox
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from crm_core import directory
from crm_core.app import Crm
from crm_core.config import load_config
from crm_core.files import private_folder
from crm_core.mail.enqueue import MailRequest, enqueue
from crm_core.mail.operations import show_message
from crm_core.mail.worker import Worker
from crm_core.models import Person, User
from crm_core.plugins import installed_plugins

DEMO_CONFIG = """\
# crm-mail demo installation, made by `crm demo`.
# Every product line can use the development transport (maildir) besides its real ones.

[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.sales]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.rentals]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.boplats]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"
"""

DEMO_USER = ("anna.andersson@example.se", "Anna Andersson", "commercial")
DEMO_PERSON = ("per.persson@example.com", "Per Persson", "+46 70 123 45 67")


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put things and what happened to the mail."""

    folder: Path
    config: Path
    outbox_id: int
    message_id: str
    state: str
    landed: Path | None


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


def populate(crm: Crm, folder: Path) -> None:
    """Settings, one user and one test person (skipped where they exist)."""
    with crm.transaction() as session:
        crm.set_system_setting(session, "maildir.path", str((folder / "maildir").resolve()))
        email, name, line = DEMO_USER
        if session.scalar(select(User).where(User.email == email)) is None:
            directory.add_user(session, email, name, line, admin=True)
        p_email, p_name, mobile = DEMO_PERSON
        if session.scalar(select(Person).where(Person.email == p_email)) is None:
            directory.add_person(session, p_email, p_name, mobile)


def send_demo_mail(crm: Crm) -> tuple[int, str]:
    """Queue a mail from the user to the test person, as the envelope button would."""
    request = MailRequest(
        sender_email=DEMO_USER[0],
        to=[DEMO_PERSON[0]],
        subject="Välkommen på visning – Storgatan 1",
        text="Hej Per,\n\nvälkommen på visning av Storgatan 1 på lördag kl. 11.\n\nAnna",
        html="<p>Hej Per,</p><p>välkommen på visning av <b>Storgatan 1</b> "
        "på lördag kl. 11.</p><p>Anna</p>",
        person_email=DEMO_PERSON[0],
    )
    with crm.transaction() as session:
        queued = enqueue(crm, session, request)
    return queued.outbox_id, queued.message_id


def find_landed(folder: Path, message_id: str) -> Path | None:
    """The Maildir file that holds ``message_id``, if it arrived."""
    box = mailbox.Maildir(folder / "maildir", create=False)
    for key, message in box.items():
        if message["Message-ID"] == message_id:
            subdir = "cur" if message.get_subdir() == "cur" else "new"
            return folder / "maildir" / subdir / key
    return None


def run_demo(folder: Path) -> DemoResult:
    """Set up the demo installation, send one mail and find where it landed."""
    crm = prepare(folder)
    try:
        populate(crm, folder)
        outbox_id, message_id = send_demo_mail(crm)
        Worker(crm, name="demo-worker").run_once()
        with crm.transaction() as session:
            state = show_message(session, outbox_id).view.state
    finally:
        crm.close()
    return DemoResult(
        folder=folder,
        config=folder / "crm.toml",
        outbox_id=outbox_id,
        message_id=message_id,
        state=state,
        landed=find_landed(folder, message_id),
    )
