"""A benchmark installation: crm.toml, a database, one user, and the mail to send.

Why through the public API (``Crm``, ``directory``, ``set_system_setting``,
``enqueue.enqueue``): the numbers must be what an application using this project
gets, with every validation and every row it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.core import RECIPIENT, SENDER, SENDER_NAME

SMTP_CONFIG = """\
[product_lines.commercial]
plugins = ["smtp_mail"]
default_transport = "smtp"
"""

EXCHANGE_CONFIG = """\
[product_lines.commercial]
plugins = ["exchange_mail"]
default_transport = "exchange"
"""


def crm_env(database_url: str, secret_key: str, config_path: Path) -> dict[str, str]:
    """The environment a ``crm`` process needs for this installation."""
    return {
        "CRM_DATABASE_URL": database_url,
        "CRM_SECRET_KEY": secret_key,
        "CRM_CONFIG": str(config_path),
    }


def open_crm(directory: Path, database_url: str, secret_key: str, config_text: str) -> Any:
    """Write crm.toml, open a Crm on ``database_url`` and create the schema."""
    from crm_core.app import Crm
    from crm_core.config import load_config
    from crm_core.plugins import installed_plugins

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "crm.toml"
    path.write_text(config_text, encoding="utf-8")
    env = crm_env(database_url, secret_key, path)
    config = load_config(path, available_plugins=installed_plugins(), environ=env)
    crm = Crm(config, environ=env)
    crm.check_plugins()
    crm.init_database()
    return crm


def new_secret_key() -> str:
    """A fresh Fernet key for one installation."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def add_smtp_sender(crm: Any, port: int, tls: Mapping[str, str] | None = None) -> None:
    """The sender, and system settings for the SMTP server on 127.0.0.1:``port``:
    plain text without login, or with ``tls`` (``ca``, ``user``, ``password``) STARTTLS
    verified against that CA, then AUTH with the sender's login and password."""
    from crm_core import directory

    settings = [("smtp.host", "127.0.0.1"), ("smtp.port", str(port)), ("smtp.timeout", "30")]
    if tls is None:
        settings += [("smtp.security", "none"), ("smtp.auth", "none")]
    else:
        settings += [
            ("smtp.security", "starttls"),
            ("smtp.auth", "password"),
            ("tls.ca_bundle", tls["ca"]),
        ]
    with crm.transaction() as session:
        user = directory.add_user(session, SENDER, SENDER_NAME, "commercial")
        for key, value in settings:
            crm.set_system_setting(session, key, value)
        if tls is not None:  # the password last: it is bound to the server named before
            crm.set_user_setting(session, user, "smtp.username", tls["user"])
            crm.set_user_setting(session, user, "smtp.password", tls["password"])


def add_exchange_sender(crm: Any, ews: Mapping[str, str]) -> str:
    """The sender (the stand-in's mailbox), with the guide's Exchange settings."""
    from crm_core import directory

    mailbox = ews["mailbox"]
    with crm.transaction() as session:
        hosts = dict.fromkeys(urlsplit(ews[u]).hostname or "" for u in ("ews_url", "entra_url"))
        for key, value in (
            # the stand-ins' host is trusted with the app-only token, as a proxy of one's own
            ("exchange.oauth_hosts", ", ".join(hosts)),
            ("exchange.url", ews["ews_url"]),
            ("exchange.client_id", ews["client_id"]),
            ("exchange.tenant_id", ews["tenant"]),
            ("exchange.authority", ews["entra_url"]),
            ("tls.ca_bundle", ews["ca_pem"]),
            ("exchange.client_secret", ews["secret"]),  # last: bound to the ones above
        ):
            crm.set_system_setting(session, key, value)
        user = directory.add_user(session, mailbox, ews["mailbox_name"], "commercial")
        for key, value in (
            ("mail.transport", "exchange"),
            ("exchange.domain", ews["domain"]),
            ("exchange.username", mailbox),
            ("exchange.sync", "true"),
        ):
            crm.set_user_setting(session, user, key, value)
    return mailbox


def subject(i: int) -> str:
    """The i-th mail's subject (tiny mails, like the SMTP server's measured ceiling)."""
    return f"Offer {i}"


def body(i: int) -> str:
    """The i-th mail's text."""
    return f"Hello, here is offer {i}.\n"


def enqueue(
    crm: Any, count: int, start: int = 0, sender: str = SENDER, one_transaction: bool = True
) -> list[str]:
    """Queue ``count`` mails through ``enqueue.enqueue``; their Message-IDs.

    ``one_transaction``: all in one unit of work (a bulk send), else one transaction
    per mail (a CRM that sends as users click).
    """
    from crm_core.mail import enqueue

    def request(i: int) -> Any:
        return enqueue.MailRequest(sender, [RECIPIENT], subject(i), body(i))

    if one_transaction:
        with crm.transaction() as session:
            return [
                enqueue.enqueue(crm, session, request(i)).message_id
                for i in range(start, start + count)
            ]
    ids = []
    for i in range(start, start + count):
        with crm.transaction() as session:
            ids.append(enqueue.enqueue(crm, session, request(i)).message_id)
    return ids


def enqueue_bulk(crm: Any, count: int, start: int = 0, sender: str = SENDER) -> list[str]:
    """Queue ``count`` mails with one ``enqueue.enqueue_many`` call; their Message-IDs.

    Each mail goes to its own recipient (a mass mailing to a person list).
    """
    from crm_core.mail import enqueue

    requests = [
        enqueue.MailRequest(sender, [recipient(i)], subject(i), body(i))
        for i in range(start, start + count)
    ]
    with crm.transaction() as session:
        return [q.message_id for q in enqueue.enqueue_many(crm, session, requests)]


def recipient(i: int) -> str:
    """The i-th person of a mass mailing (the SMTP stand-in accepts any mailbox)."""
    return f"kund{i}@example.org"


def states(crm: Any) -> dict[str, int]:
    """How many outbox rows are in each state."""
    from sqlalchemy import func, select

    from crm_core.models import OutboxMessage

    with crm.transaction() as session:
        rows = session.execute(
            select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)
        )
        return {str(state): int(n) for state, n in rows}


def dispatch_window(crm: Any) -> float:
    """Seconds from the first claim to the last recorded result, from the attempt log.

    Why from the database: with worker processes, the wall clock would also count
    interpreter start-up; the attempt log shows when sending really began and ended.
    """
    from sqlalchemy import func, select

    from crm_core.models import OutboxAttempt

    with crm.transaction() as session:
        first, last = session.execute(
            select(func.min(OutboxAttempt.started_at), func.max(OutboxAttempt.finished_at))
        ).one()
    return float((last - first).total_seconds())
