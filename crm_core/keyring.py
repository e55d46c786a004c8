"""The installation's secret keys as one process holds them, following rotations.

Why: ``crm secrets rotate`` re-encrypts every secret with a new key while workers run,
on this machine or others. A process that kept the keys it started with could read
nothing the rotation re-encrypted, and would store a secret saved meanwhile under the
key being retired. So the database keeps a key version, raised by every rotation, and
each process compares it with the version its keys were loaded at before it reads or
writes a secret, and reloads them when it went up (once per transaction: one small
query). A secret saving transaction holds the version row's share lock while it
encrypts, so a rotation (which updates the row) waits for it, and it for a rotation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from crm_core.errors import SecretKeyError
from crm_core.models import SecretKeyVersion
from crm_core.secret_box import Secret, SecretBox

log = logging.getLogger(__name__)

_CHECKED = "crm.key_version"
"""``Session.info`` key: the key version this transaction already checked."""
_RELOADED = "crm.keys_reloaded"
"""``Session.info`` key: keys were re-read once in this transaction after a failure."""


def key_version(
    session: Session, *, share: bool = False, lock: bool = False
) -> tuple[int, str | None]:
    """The database's key version and the id of the key it was last rotated to.

    ``share`` takes the row's share lock, so that a rotation in progress is waited
    for; ``lock`` its exclusive lock (a rotation). PostgreSQL only: SQLite's
    transaction began with ``BEGIN IMMEDIATE`` and is already the only writer.
    """
    query = select(SecretKeyVersion.version, SecretKeyVersion.key_id).where(
        SecretKeyVersion.id == 1
    )
    if share or lock:
        query = query.with_for_update(read=not lock)
    row = session.execute(query).first()
    return (int(row.version), row.key_id) if row is not None else (0, None)


def bump_key_version(session: Session, key_id: str) -> int:
    """Raise the key version (holding the row's lock until commit); the new version."""
    session.execute(
        update(SecretKeyVersion)
        .where(SecretKeyVersion.id == 1)
        .values(version=SecretKeyVersion.version + 1, key_id=key_id)
    )
    return key_version(session)[0]


class KeyRing:
    """This process's keys: loaded on first use, reloaded when a rotation is seen."""

    def __init__(self, load: Callable[[], Sequence[bytes]]) -> None:
        self._load = load
        self._box: SecretBox | None = None
        self._keys: tuple[bytes, ...] = ()
        self._version: int | None = None
        self._lock = threading.Lock()
        self._reported: frozenset[str] = frozenset()

    def box(self) -> SecretBox:
        """The keys as loaded (on first use), without asking the database."""
        with self._lock:
            if self._box is None:
                self._keys = tuple(self._load())
                self._box = SecretBox(self._keys)
            return self._box

    def box_for(self, session: Session, *, writing: bool = False) -> SecretBox:
        """The keys to use in this transaction, reloaded first if a rotation happened.

        ``writing``: the caller is about to encrypt. The version row's share lock is
        taken (a rotation in progress is waited for), and a key that is not the one
        the database was last rotated to is refused instead of used.
        """
        checked = session.info.get(_CHECKED)
        if checked is None or writing:
            version, key_id = key_version(session, share=writing)
            session.info[_CHECKED] = version
            self._follow(version)
            if writing:
                return self._current(key_id)
        return self.box()

    def _follow(self, version: int) -> None:
        with self._lock:
            if self._version is not None and version != self._version and self._box:
                log.info("the secret key was rotated (version %d): reloading the keys", version)
                self._box = None
            self._version = version

    def _current(self, key_id: str | None) -> SecretBox:
        box = self.box()
        if key_id is None or box.key_id == key_id:
            return box
        box = self.reload()
        if box.key_id != key_id:
            raise SecretKeyError(
                "this process's secret key is not the one the database's secrets were last "
                "rotated to, so a secret saved with it could not be read by the others: use "
                "the key file (or CRM_SECRET_KEY) that `crm secrets rotate` made, on every "
                "machine"
            )
        return box

    def reload(self) -> SecretBox:
        """Read the keys again (after a rotation, or a key file put back)."""
        keys = tuple(self._load())
        with self._lock:
            if self._box is None or keys != self._keys:
                self._box, self._keys = SecretBox(keys), keys
                self._reported = frozenset()  # other keys: say again what they cannot read
            return self._box

    def decrypt(self, session: Session, token: str) -> Secret | None:
        """The stored value, or None when no key of this process can decrypt it.

        Keys that cannot be loaded at all (a missing key file) raise: the command
        stops with what to restore. A value they do not decrypt re-reads the keys once
        per transaction first: a key file that a rotation (or a restore) changed is
        then picked up without waiting for the next transaction.
        """
        secret = _decrypt(self.box_for(session), token)
        if secret is not None or session.info.get(_RELOADED):
            return secret
        session.info[_RELOADED] = True
        return _decrypt(self._reload_quietly(), token)

    def _reload_quietly(self) -> SecretBox:
        try:
            return self.reload()
        except SecretKeyError as exc:  # the key file went missing: keep what we have
            log.error("the secret keys could not be read again: %s", exc)
            return self.box()

    def report_unreadable(self, where: Iterable[str]) -> None:
        """Log, once per change, the stored secrets that no key here can decrypt.

        An installation-wide error (``crm check`` shows it too): never a reason to
        pause an account, whose mail waits until the key is back.
        """
        found = frozenset(where)
        with self._lock:
            new = found - self._reported
            self._reported = self._reported | found
        if new:
            log.error(
                "%d stored secret(s) cannot be decrypted with this installation's secret "
                "key (%s); the mail that needs them waits. Restore the key file (or "
                "CRM_SECRET_KEY) they were encrypted with; `crm check` lists them",
                len(new),
                ", ".join(sorted(new)),
            )


def _decrypt(box: SecretBox, token: str) -> Secret | None:
    try:
        return box.decrypt(token)
    except SecretKeyError:
        return None
