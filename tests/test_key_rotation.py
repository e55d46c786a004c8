"""Key rotation that cannot pause everyone or lose everything.

The installation here keeps its key in a key file (``[secrets] key_file``), as a
default installation does; rotations run as ``crm secrets rotate`` or through
:func:`crm_core.rotation.rotate`, whose step callback lets a test hold one rotation
between its commit and its key file write while another runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, text

from crm_core import directory
from crm_core.app import Crm
from crm_core.config import load_config
from crm_core.mail import enqueue
from crm_core.mail.worker import Worker
from crm_core.models import AccountPause, OutboxMessage, SystemSetting
from crm_core.plugins import installed_plugins
from crm_core.rotation import rotate
from crm_core.secret_box import Secret, load_keys
from tests.conftest import CliResult
from tests.smtp_fixtures import servers

CONFIG = """\
[product_lines.commercial]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"
"""
PASSWORD = "Vinter-natt 2026 åäö!"
CLIENT_SECRET = "Rotated~client.secret-VALUE-1"


@pytest.fixture
def installation(tmp_path: Path, database_url: str) -> Iterator[Callable[[], Crm]]:
    """Makes Crm objects (each its own process, as it were) on one key-file installation."""
    config = tmp_path / "crm.toml"
    key_file = tmp_path / "keys" / "crm-secret.key"
    config.write_text(CONFIG + f'\n[secrets]\nkey_file = "{key_file}"\n', encoding="utf-8")
    env = {"CRM_DATABASE_URL": database_url}
    made: list[Crm] = []

    def make() -> Crm:
        loaded = load_config(config, available_plugins=tuple(installed_plugins()), environ=env)
        crm = Crm(loaded, environ=env)
        made.append(crm)
        return crm

    first = make()
    first.init_database()
    first.create_key()
    with first.transaction() as session:
        first.set_system_setting(session, "maildir.path", str(tmp_path / "Maildir"))
        first.set_system_setting(session, "exchange.client_secret", CLIENT_SECRET)
    yield make
    for crm in made:
        crm.close()


def cli_env(crm: Crm) -> dict[str, str]:
    return {
        "CRM_DATABASE_URL": str(crm.environ["CRM_DATABASE_URL"]),
        "CRM_CONFIG": crm.config.source,
    }


def client_secret(crm: Crm) -> object:
    with crm.transaction() as session:
        return crm.settings_store().system_values(session).get("exchange.client_secret")


def read_back(crm: Crm, key: str = "exchange.client_secret") -> str | None:
    """The secret as a process that starts now (keys read afresh) reads it."""
    with crm.transaction() as session:
        value = crm.settings_store().system_values(session).get(key)
    return value.reveal() if isinstance(value, Secret) else None


# --- a rotation with a worker running ----------------------------------------------------


def test_rotation_with_a_worker_running_pauses_no_account(
    installation: Callable[[], Crm], run_crm: Callable[..., CliResult]
) -> None:
    admin, worker = installation(), installation()
    with servers() as running:
        smtp = running.start(
            users={"anna@example.se": PASSWORD}, auth_required=True, auth_require_tls=False
        )
        with admin.transaction() as session:
            anna = directory.add_user(session, "anna@example.se", "Anna", "commercial")
            directory.add_user(session, "bo@example.se", "Bo", "commercial")  # maildir
            admin.set_system_setting(session, "smtp.host", "127.0.0.1")
            admin.set_system_setting(session, "smtp.port", str(smtp.port))
            admin.set_system_setting(session, "smtp.security", "none")
            admin.set_user_setting(session, anna, "mail.transport", "smtp")
            admin.set_user_setting(session, anna, "smtp.username", "anna@example.se")
            admin.set_user_setting(session, anna, "smtp.password", PASSWORD)

        def send_round() -> None:
            for sender in ("anna@example.se", "bo@example.se"):
                request = enqueue.MailRequest(sender, ["per@example.com"], "Offer", "Hej!")
                with admin.transaction() as session:
                    enqueue.enqueue(admin, session, request)
            Worker(worker).run_once()

        send_round()  # the worker has its keys now
        rotated = run_crm("secrets", "rotate", env=cli_env(admin))
        assert rotated.code == 0, rotated.output
        send_round()
        send_round()
        with admin.transaction() as session:
            assert [p.reason for p in session.scalars(select(AccountPause))] == []
            states = session.scalars(select(OutboxMessage.state)).all()
        assert states == ["sent"] * 6
        assert smtp.auth_successes == 3


def test_an_unreadable_secret_is_an_installation_error_not_a_pause(
    installation: Callable[[], Crm], run_crm: Callable[..., CliResult], tmp_path: Path
) -> None:
    crm = installation()
    with crm.transaction() as session:
        directory.add_user(session, "bo@example.se", "Bo", "commercial")  # uses no secret
    key_file = crm.config.key_file
    assert key_file is not None
    key_file.write_text(Fernet.generate_key().decode() + "\n")  # replaced, not rotated
    request = enqueue.MailRequest("bo@example.se", ["per@example.com"], "Offer", "Hej!")
    fresh = installation()
    with fresh.transaction() as session:
        enqueue.enqueue(fresh, session, request)
    Worker(fresh).run_once()
    with fresh.transaction() as session:
        assert session.scalars(select(AccountPause)).all() == []
        assert session.scalars(select(OutboxMessage.state)).all() == ["sent"]
    check = run_crm("check", env=cli_env(crm))
    assert check.code == 1
    assert "Installation error" in check.stdout and "exchange.client_secret" in check.stdout
    assert CLIENT_SECRET not in check.output


# --- the lock ----------------------------------------------------------------------------


def test_two_rotations_do_not_lose_secrets(installation: Callable[[], Crm]) -> None:
    first, second = installation(), installation()
    key_file = first.config.key_file
    assert key_file is not None
    committed, second_done = threading.Event(), threading.Event()

    def stall(step: str) -> None:
        if step == "committed":  # between the commit and the key file write
            committed.set()
            assert second_done.wait(60)

    stalled = threading.Thread(
        target=rotate, args=(first.transaction, key_file, first.environ, stall)
    )
    stalled.start()
    assert committed.wait(60)
    rotate(second.transaction, key_file, second.environ)
    second_done.set()
    stalled.join(60)
    assert not stalled.is_alive()
    assert len(load_keys(key_file, {})) == 1
    assert read_back(installation()) == CLIENT_SECRET


def test_a_secret_saved_during_a_rotation_is_not_under_the_retired_key(
    installation: Callable[[], Crm],
) -> None:
    rotator, saver = installation(), installation()
    assert client_secret(saver) is not None  # the saver has the key from before
    key_file = rotator.config.key_file
    assert key_file is not None
    retired = load_keys(key_file, {})
    inside, go_on = threading.Event(), threading.Event()

    def hold(step: str) -> None:
        if step == "re-encrypted":  # the lock is held, not yet committed
            inside.set()
            assert go_on.wait(60)

    rotation = threading.Thread(
        target=rotate, args=(rotator.transaction, key_file, rotator.environ, hold)
    )
    rotation.start()
    assert inside.wait(60)

    def save() -> None:
        with saver.transaction() as session:
            saver.set_system_setting(session, "exchange.client_secret", "Saved~during-rotation")

    saving = threading.Thread(target=save)
    saving.start()
    wait_until_blocked(saver)
    go_on.set()
    rotation.join(60)
    saving.join(60)
    assert not rotation.is_alive() and not saving.is_alive()
    with rotator.transaction() as session:
        row = session.get(SystemSetting, "exchange.client_secret")
        assert row is not None
        stored = row.value
    assert not opens(retired, stored)
    assert read_back(installation()) == "Saved~during-rotation"


def wait_until_blocked(crm: Crm) -> None:
    """On PostgreSQL, wait until the saver waits for the rotation's lock; on SQLite its
    BEGIN IMMEDIATE waits for the rotation's write transaction whenever it comes."""
    if crm.engine.dialect.name != "postgresql":
        return
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    event = threading.Event()
    with crm.engine.connect() as conn:
        while not conn.execute(waiting).scalar():
            event.wait(0.01)  # poll the server's own record of who waits


def opens(keys: list[bytes], token: str) -> bool:
    """Whether any of ``keys`` decrypts ``token``."""
    try:
        MultiFernet([Fernet(k) for k in keys]).decrypt(token.encode())
    except InvalidToken:
        return False
    return True


# --- the key file and CRM_SECRET_KEY -----------------------------------------------------


def test_a_planted_symlink_is_not_followed(
    installation: Callable[[], Crm], run_crm: Callable[..., CliResult], tmp_path: Path
) -> None:
    crm = installation()
    key_file = crm.config.key_file
    assert key_file is not None
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("someone else's file\n")
    (key_file.parent / (key_file.name + ".tmp")).symlink_to(victim)  # the old fixed name
    rotated = run_crm("secrets", "rotate", env=cli_env(crm))
    assert rotated.code == 0, rotated.output
    assert victim.read_text() == "someone else's file\n"
    assert not key_file.is_symlink() and (os.stat(key_file).st_mode & 0o777) == 0o600
    assert read_back(installation()) == CLIENT_SECRET


def test_a_single_key_in_the_environment_is_explained(
    installation: Callable[[], Crm], run_crm: Callable[..., CliResult]
) -> None:
    crm = installation()
    key_file = crm.config.key_file
    assert key_file is not None
    (only,) = load_keys(key_file, {})
    env = {**cli_env(crm), "CRM_SECRET_KEY": only.decode()}
    refused = run_crm("secrets", "rotate", env=env)
    assert refused.code == 2
    assert "single key" in refused.stderr and "in front of it" in refused.stderr
    assert "remove" not in refused.output.lower()
    new = run_crm("secrets", "new-key").stdout.strip()
    both = {**env, "CRM_SECRET_KEY": f"{new},{only.decode()}"}
    done = run_crm("secrets", "rotate", env=both)
    assert done.code == 0 and "Re-encrypted 1 secret(s)" in done.stdout
    with crm.transaction() as session:
        row = session.get(SystemSetting, "exchange.client_secret")
        assert row is not None and opens([new.encode()], row.value)
