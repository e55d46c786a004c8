"""Encryption at rest for secrets (client secrets, passwords), and a masked holder.

Why Fernet: authenticated encryption from the well-kept ``cryptography`` package, with
MultiFernet for key rotation (decrypt with any listed key, encrypt with the first).

The key comes from ``CRM_SECRET_KEY`` (one or more Fernet keys, comma separated, newest
first), else from a key file created on first use with mode 0600 (by default beside the
SQLite database). Back the key file up together with the database: without it no stored
secret can be read, and they must be entered again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from crm_core.errors import SecretKeyError

KEY_ENV = "CRM_SECRET_KEY"


class Secret:
    """A secret value that never shows itself in repr, str, logs or tracebacks.

    Transports call :meth:`reveal` at the moment they hand the value to a server.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The clear-text value; only for handing to the server that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", hashlib.sha256(self._value.encode()).digest()))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("a Secret cannot be pickled")


_FERNET_HINT = (
    "each key is 44 url-safe base64 characters (as `crm init` writes them); several keys "
    "are separated by commas, the newest first"
)


class SecretBox:
    """Encrypts and decrypts secrets with the installation's key(s)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise SecretKeyError("no secret key configured")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError) as exc:
            raise SecretKeyError(
                f"{KEY_ENV} or the key file does not hold valid keys: {_FERNET_HINT}"
            ) from exc
        self._primary = keys[0]

    def encrypt(self, value: str) -> str:
        """Ciphertext (text) for storage."""
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> Secret:
        """The stored value as a masked :class:`Secret`."""
        try:
            return Secret(self._fernet.decrypt(token.encode("ascii")).decode("utf-8"))
        except InvalidToken as exc:
            raise SecretKeyError(
                "a stored secret cannot be decrypted with the configured key: "
                f"was {KEY_ENV} or the key file changed without `crm secrets rotate`?"
            ) from exc

    def rotate(self, token: str) -> str:
        """Re-encrypt ``token`` with the primary key (for key rotation)."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise SecretKeyError("a stored secret cannot be decrypted for rotation") from exc

    def fingerprint(self, value: str) -> str:
        """A short keyed fingerprint, to tell two saved values apart without showing them.

        Keyed (HMAC with the installation key) so that a short fingerprint of a weak
        password cannot be checked against a dictionary by someone without the key.
        """
        digest = hmac.new(self._primary, value.encode("utf-8"), hashlib.sha256).hexdigest()
        return digest[:8]

    @property
    def key_id(self) -> str:
        """A name for the primary key that does not reveal it (to compare installations'
        keys: the database keeps the one its secrets were last rotated to)."""
        return self.derive("key-id").hex()[:16]

    def derive(self, purpose: str) -> bytes:
        """A key for ``purpose`` (e.g. signing the web app's session cookies), derived
        from the installation key, so that no further secret must be made, kept and
        backed up. Rotating the installation key signs everyone out."""
        return hmac.new(self._primary, f"crm-mail:{purpose}".encode(), hashlib.sha256).digest()


def load_keys(key_file: Path | None, environ: Mapping[str, str] | None = None) -> list[bytes]:
    """Keys from the environment, else from the key file (never created here)."""
    env = os.environ if environ is None else environ
    from_env = env.get(KEY_ENV, "").strip()
    if from_env:
        return _keys(from_env.replace(",", " "), KEY_ENV)
    if key_file is None:
        raise SecretKeyError(f"set {KEY_ENV} or configure [secrets] key_file in crm.toml")
    try:
        return _keys(key_file.read_text(encoding="ascii"), f"the key file {key_file}")
    except FileNotFoundError:
        raise SecretKeyError(
            f"no key file at {key_file}: run `crm init` for a new installation; otherwise "
            f"restore the file from your backup (or set {KEY_ENV})"
        ) from None
    except IsADirectoryError:
        raise SecretKeyError(
            f"the key file {key_file} is a folder; it must be the file `crm init` made"
        ) from None
    except UnicodeDecodeError:
        raise SecretKeyError(f"the key file {key_file} is not a key file (not text)") from None
    except OSError as exc:
        raise SecretKeyError(f"cannot read the key file {key_file}: {exc.strerror}") from None


def _keys(text: str, source: str) -> list[bytes]:
    """Fernet keys from text (one per line or separated by blanks); refused in words."""
    words = [
        w for line in text.splitlines() if not line.lstrip().startswith("#") for w in line.split()
    ]
    if not words:
        raise SecretKeyError(f"{source} holds no key")
    if not all(w.isascii() for w in words):
        raise SecretKeyError(f"{source} holds something that is not a key: {_FERNET_HINT}")
    return [w.encode("ascii") for w in words]


def create_key_file(path: Path) -> None:
    """Write a new key with mode 0600, never readable by others even for a moment.

    ``O_EXCL | O_NOFOLLOW``: a file or symbolic link already at ``path`` is refused,
    never written through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(Fernet.generate_key().decode("ascii") + "\n")


def write_key_file(path: Path, keys: Sequence[bytes]) -> None:
    """Atomically replace the key file with ``keys`` (newest first), mode 0600.

    Why a random temporary name opened with ``O_EXCL | O_NOFOLLOW``: a fixed name
    beside the key file could be a symbolic link planted by anyone who may write to
    that folder, and opening it would write the keys wherever it points. The rename
    replaces a link at ``path`` itself (never its target), and the folder is synced
    so that the new file survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write("".join(k.decode("ascii") + "\n" for k in keys))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def new_key() -> str:
    """A fresh Fernet key, for rotation."""
    return Fernet.generate_key().decode("ascii")
