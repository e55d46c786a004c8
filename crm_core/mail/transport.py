"""The typed objects that pass between the core and transport plugins.

Hooks return these dataclasses, never ad-hoc dicts or tuples, so the core can check
what a plugin returned and a plugin author can read the contract in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any, TypeVar

from crm_core.errors import PluginError
from crm_core.outcome import Outcome as Outcome
from crm_core.secret_box import Secret

SettingValue = str | int | bool | date | Secret
T = TypeVar("T")


@dataclass(frozen=True)
class TransportSpec:
    """A transport a plugin offers: its name (a user's ``mail.transport``) and label.

    ``in_flight`` is how many of one account's messages the transport hands over
    before it reports their results, when it sends them in the order given (SMTP: one
    message at a time; EWS: one request of up to 50). When a worker dies, only that
    many of its unreported messages per account can have gone; the rest were never
    handed over and are queued again. 0 (the default, and the safe answer for a
    transport that does not say) counts every unreported message as possibly gone.

    ``in_flight_for``: when the window depends on the account (SMTP sends one account's
    batch over as many connections as its settings allow, one message in flight on
    each, handing them out in order), the window for that account; ``in_flight`` is
    then used when the account cannot be read.
    """

    name: str
    label: str
    plugin: str = ""
    description: str = ""
    in_flight: int = 0
    in_flight_for: Callable[[SenderAccount], int] | None = None


@dataclass(frozen=True)
class SenderAccount:
    """Everything a transport needs to send as one CRM user.

    ``system`` and ``user`` hold the resolved setting values (secrets as masked
    :class:`Secret` objects). :meth:`get` looks at the user's value first, so a
    per-user override (e.g. ``smtp.host``) wins over the installation's value.

    A saved secret the core withholds is absent from both: ``reenter`` names those
    whose destination changed since they were saved (with the settings that changed),
    ``unreadable`` those no key of this installation decrypts. The core explains them
    in the account's problems; a transport simply finds no value.
    """

    user_id: int
    email: str
    name: str
    product_line: str
    transport: str
    system: Mapping[str, SettingValue] = field(default_factory=dict)
    user: Mapping[str, SettingValue] = field(default_factory=dict)
    reenter: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unreadable: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """Identifies the account for grouping a batch and for pausing."""
        return f"{self.transport}:{self.user_id}"

    def get(self, key: str) -> SettingValue | None:
        """The user's value for ``key``, else the system's, else None."""
        if key in self.user:
            return self.user[key]
        return self.system.get(key)

    def get_str(self, key: str, default: str = "") -> str:
        """A text setting (numbers and dates as text); secrets are refused."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, Secret):
            raise TypeError(f"{key} is a secret; use get_secret()")
        return str(value)

    def get_int(self, key: str, default: int) -> int:
        """An integer setting."""
        value = self.get(key)
        return int(value) if isinstance(value, int | str) and str(value) != "" else default

    def get_bool(self, key: str, default: bool = False) -> bool:
        """A yes/no setting."""
        value = self.get(key)
        return value if isinstance(value, bool) else default

    def get_secret(self, key: str) -> Secret | None:
        """A secret setting, or None when not saved."""
        value = self.get(key)
        return value if isinstance(value, Secret) else None

    def get_date(self, key: str) -> date | None:
        """A date setting, or None."""
        value = self.get(key)
        return value if isinstance(value, date) else None

    def fingerprint(self, *keys: str) -> str:
        """A digest of the named settings, for keying caches that must follow changes."""
        digest = hashlib.sha256()
        for key in keys:
            value = self.get(key)
            raw = value.reveal() if isinstance(value, Secret) else repr(value)
            digest.update(f"{key}\x00{raw}\x00".encode())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SenderAccount({self.email!r}, transport={self.transport!r})"


class RecipientStatus(StrEnum):
    """What became of one recipient of a message, as the server answered for it."""

    DELIVERED = "delivered"
    """The server took the message for this recipient."""
    DEFERRED = "deferred"
    """Refused for now (a 4xx, e.g. ``452 4.5.3 too many recipients``): tried again
    later, for this recipient alone, with the same Message-ID."""
    REFUSED = "refused"
    """Refused for good (a 5xx): never tried again."""


@dataclass(frozen=True)
class RecipientResult:
    """One envelope recipient's fate in one attempt, with the server's own words."""

    address: str
    status: RecipientStatus
    reply: str = ""


@dataclass(frozen=True)
class SendResult:
    """The outcome for one message of a batch.

    ``detail`` is written for the person who sent the mail (what happened and what
    to do); ``code`` is the server's own code for support (``550 5.1.1``,
    ``ErrorInvalidRecipients``, ``AADSTS7000222``). ``retry_after`` (seconds) lets a
    transport pass on a server's requested back-off. ``reply`` is the server's own
    answer to a sent message (``250 2.0.0 Ok: queued as 4Xb…``), or for a lost one its
    last words; it is kept and shown, because it is what a mail administrator asks
    for.

    ``recipients`` tells each envelope recipient's fate when they differ (SMTP's
    answer to each RCPT); empty means every recipient shares the message's outcome.
    With recipients, ``outcome`` is ``SENT`` when the server took the message for at
    least one of them; the outbox then tries the deferred ones again, alone, and
    records the refused ones with their reasons.

    A ``THROTTLED`` result pauses the sender's mailbox for ``retry_after`` seconds
    (the transport's own back-off when the server named none); with ``quota`` the
    mailbox's daily quota is spent, and it is paused until its 24-hour window rolls.
    """

    message_id: str
    outcome: Outcome
    detail: str = ""
    code: str = ""
    retry_after: float | None = None
    provider_ref: str = ""
    reply: str = ""
    recipients: tuple[RecipientResult, ...] = ()
    quota: bool = False


@dataclass(frozen=True)
class MailboxLimits:
    """How fast a server lets one mailbox send: the transport's defaults for it.

    ``mailbox`` names the mailbox at the server (several CRM users may send through
    one, e.g. a shared SMTP login); every limit is shared by all workers through the
    database. 0 means no limit. ``per_minute`` counts messages in a rolling minute,
    ``recipients_per_day`` envelope recipients in a rolling 24 hours, ``connections``
    the connections or requests in flight at once. ``parallel`` is how many requests
    one batch of this account may run at once (a Graph ``$batch`` runs up to 4 of its
    items together), so a batch takes that many of the mailbox's ``connections``.
    """

    mailbox: str
    per_minute: int = 0
    recipients_per_day: int = 0
    connections: int = 0
    parallel: int = 1


class StepStatus(StrEnum):
    """The colour of one Test connection step."""

    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class ConnectionStep:
    """One rung of the Test connection ladder: green or red, with reason and fix."""

    name: str
    status: StepStatus
    detail: str = ""
    fix: str = ""


@dataclass(frozen=True)
class ConnectionReport:
    """The result of Test connection for one user's transport."""

    transport: str
    summary: str
    steps: tuple[ConnectionStep, ...] = ()

    @property
    def ok(self) -> bool:
        """Green: no step failed."""
        return all(s.status is not StepStatus.FAILED for s in self.steps)


@dataclass(frozen=True)
class ReconcileResult:
    """What a transport found out about a message whose send is ``unknown``.

    ``sent`` is True (found, e.g. in Sent Items), False (certainly not sent), or None
    (the transport cannot tell; an operator must decide).
    """

    message_id: str
    sent: bool | None
    detail: str = ""


@dataclass(frozen=True)
class RouteInfo:
    """How a transport would send for an account: for ``crm send --dry-run``."""

    transport: str
    server: str
    account: str
    notes: tuple[str, ...] = ()


class Resources:
    """Per-``Crm`` cache where plugins keep connections, token clients and sessions.

    Why: plugin modules must hold no module-level state, yet an msal client or an
    exchangelib Account must outlive one batch. The core owns one Resources per
    ``Crm`` and passes it to every hook; keys are tuples that start with the plugin
    name. Thread-safe, because a worker may run several sending threads.
    """

    def __init__(self, pool_size: int = 1) -> None:
        self._items: dict[Hashable, Any] = {}
        self._versions: dict[Hashable, Hashable] = {}
        self._lock = threading.RLock()
        self.pool_size = pool_size

    def set_pool_size(self, size: int) -> None:
        """How many threads may use one cached client at once (the worker's concurrency).

        Why here: an HTTP client's connection pool must be as large as the number of
        threads that share it, or requests queue for a connection (urllib3 warns and
        discards); the worker knows its concurrency, the plugins build the clients.
        """
        self.pool_size = max(1, size)

    def current(self, key: tuple[Hashable, ...], version: Hashable, factory: Callable[[], T]) -> T:
        """The cached object for ``key`` if it was made for ``version``; else a new one.

        Why: caches are keyed per account (or per app registration), and the version
        is a fingerprint of the settings the object was built from. When the settings
        change, the old object is closed as it is replaced, instead of lingering with
        open connections under a key nobody asks for any more.
        """
        with self._lock:
            if key in self._items and self._versions.get(key) == version:
                value: T = self._items[key]
                return value
            old = self._items.pop(key, None)
            fresh = factory()
            self._items[key] = fresh
            self._versions[key] = version
        if old is not None:
            _close_quietly(old)
        return fresh

    def get_or_create(self, key: tuple[Hashable, ...], factory: Callable[[], T]) -> T:
        """The cached object for ``key``, made by ``factory`` the first time."""
        with self._lock:
            if key not in self._items:
                self._items[key] = factory()
            value: T = self._items[key]
            return value

    def get(self, key: tuple[Hashable, ...]) -> Any:
        """The cached object for ``key``, or None."""
        with self._lock:
            return self._items.get(key)

    def discard(self, prefix: tuple[Hashable, ...]) -> int:
        """Drop (and close) every object whose key starts with ``prefix``."""
        with self._lock:
            doomed = [k for k in self._items if isinstance(k, tuple) and k[: len(prefix)] == prefix]
            values = [self._items.pop(k) for k in doomed]
            for k in doomed:
                self._versions.pop(k, None)
        for value in values:
            _close_quietly(value)
        return len(values)

    def close(self) -> None:
        """Close everything (worker shutdown)."""
        self.discard(())


def _close_quietly(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        # Closing a connection the peer already dropped must not stop shutdown.
        with contextlib.suppress(OSError):
            close()


def check_results(plugin: str, messages_ids: list[str], results: object) -> list[SendResult]:
    """Check a plugin's send_mail answer: a list with one SendResult per message."""
    if not isinstance(results, list) or not all(isinstance(r, SendResult) for r in results):
        raise PluginError(f"plugin {plugin!r}: send_mail must return a list of SendResult")
    got = [r.message_id for r in results]
    if sorted(got) != sorted(messages_ids):
        raise PluginError(
            f"plugin {plugin!r}: send_mail returned results for {len(got)} messages, "
            f"expected exactly one for each of {len(messages_ids)}"
        )
    return results
