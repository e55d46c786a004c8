"""``crm secrets rotate``: re-encrypt every stored secret with a new key, under a lock.

Why a lock: a rotation reads every secret, re-encrypts it and rewrites the key file.
Two rotations at once, or a rotation and a setting saved meanwhile, could otherwise
leave a secret encrypted with a key that is no longer in the file, which loses it.
So a rotation holds the database's rotation lock (an advisory lock on PostgreSQL; on
SQLite every transaction is already the only writer) and the secret key version row
(which every secret save reads with a share lock, see :mod:`crm_core.keyring`) from
before it reads the key file until its commit.

With a key file the rotation goes in two locked steps, each safe to stop after:

1. add a new key in front of the file's keys (secrets readable with old and new),
   re-encrypt every secret with it, raise the key version, commit;
2. drop from the file every key that no stored secret needs any longer.

Step 2 looks at what is stored instead of assuming what step 1 did, so a second
rotation that ran between them (or a stopped first one) never loses a key in use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from crm_core.errors import SecretKeyError
from crm_core.keyring import bump_key_version, key_version
from crm_core.models import SystemSetting, UserSetting
from crm_core.secret_box import KEY_ENV, SecretBox, load_keys, write_key_file

ROTATION_LOCK = 0x63726D5F6B6579
"""PostgreSQL advisory lock number of key rotations ("crm_key")."""

Transactions = Callable[[], AbstractContextManager[Session]]
"""Begins a transaction that commits when its block ends (``Crm.transaction``)."""
Step = Callable[[str], None]
"""Told each step as it is done ("key added", "re-encrypted", "committed", "trimmed")."""

SINGLE_ENV_KEY = (
    f"{KEY_ENV} holds a single key, so there is no new key to re-encrypt with. Put a new "
    f'key in front of it first ({KEY_ENV}="NEW,CURRENT"; `crm secrets new-key` makes one), '
    "on every machine that runs crm, then run `crm secrets rotate` again. Keep the "
    "current key until the rotation has finished: it is the only one that reads the "
    "stored secrets now."
)


@dataclass(frozen=True)
class Rotation:
    """What a rotation did: how many secrets, and where the new key is."""

    count: int
    where: str
    from_env: bool


def rotate(
    sessions: Transactions,
    key_file: Path | None,
    environ: Mapping[str, str],
    step: Step | None = None,
) -> Rotation:
    """Re-encrypt every stored secret with a new key (see the module's docstring)."""
    told = step or _quiet
    if environ.get(KEY_ENV, "").strip():
        return _rotate_env(sessions, environ, told)
    if key_file is None:
        raise SecretKeyError(f"set {KEY_ENV} or configure [secrets] key_file in crm.toml")
    with sessions() as session:
        lock(session)
        keys = [Fernet.generate_key(), *load_keys(key_file, {})]
        write_key_file(key_file, keys)
        told("key added")
        count = reencrypt(session, SecretBox(keys))
        told("re-encrypted")
    told("committed")
    with sessions() as session:
        lock(session)
        trim_key_file(session, key_file)
    told("trimmed")
    return Rotation(count, str(key_file), from_env=False)


def _rotate_env(sessions: Transactions, env: Mapping[str, str], told: Step) -> Rotation:
    keys = load_keys(None, env)
    if len(keys) < 2:
        raise SecretKeyError(SINGLE_ENV_KEY)
    with sessions() as session:
        lock(session)
        count = reencrypt(session, SecretBox(keys))
        told("re-encrypted")
    told("committed")
    return Rotation(count, KEY_ENV, from_env=True)


def lock(session: Session) -> None:
    """Take the rotation lock and the key version row until this transaction ends.

    On SQLite the transaction began with ``BEGIN IMMEDIATE``: it is the only writer.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:n)"), {"n": ROTATION_LOCK})
    key_version(session, lock=True)


def reencrypt(session: Session, box: SecretBox) -> int:
    """Re-encrypt every stored secret with ``box``'s first key and raise the key
    version to it; how many secrets. A secret no key decrypts stops everything
    (nothing is written): rotating would make it unreadable for good."""
    rows = _secret_rows(session)
    for row in rows:
        clear = box.decrypt(row.value).reveal()
        row.value = box.rotate(row.value)
        row.fingerprint = box.fingerprint(clear)
    session.flush()
    bump_key_version(session, box.key_id)
    return len(rows)


def trim_key_file(session: Session, key_file: Path) -> None:
    """Drop from the key file every key but the first that no stored secret needs."""
    keys = load_keys(key_file, {})
    kept = keys[:1]
    for row in _secret_rows(session):
        if _opens(kept, row.value):
            continue
        kept += [k for k in keys[1:] if k not in kept and _opens([k], row.value)][:1]
    if kept != keys:
        write_key_file(key_file, kept)


def _opens(keys: Sequence[bytes], token: str) -> bool:
    try:
        MultiFernet([Fernet(k) for k in keys]).decrypt(token.encode("ascii"))
    except (InvalidToken, ValueError):
        return False
    return True


def _secret_rows(session: Session) -> list[SystemSetting | UserSetting]:
    return [
        *session.scalars(select(SystemSetting).where(SystemSetting.secret.is_(True))),
        *session.scalars(select(UserSetting).where(UserSetting.secret.is_(True))),
    ]


def _quiet(_step: str) -> None:
    """No one listens."""
