"""crm.toml plus environment, parsed once into frozen dataclasses.

Why strict: a typo in a key (``default_transprot``) that is silently ignored turns into
mail going out the wrong way in production. Every unknown key stops start-up with a
message naming the file, the key and what is allowed.

Where the file is found: ``--config`` on the command line, else ``CRM_CONFIG``, else
``crm.toml`` in the working directory, else the embedded default (four product lines).
``CRM_DATABASE_URL`` overrides ``[database] url``.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from crm_core.errors import ConfigError

PRODUCT_LINES: tuple[str, ...] = ("commercial", "sales", "rentals", "boplats")
PRODUCT_LINE_LABELS: Mapping[str, str] = {
    "commercial": "Kommersiella lokaler (commercial premises)",
    "sales": "Försäljning bostäder (residential sales)",
    "rentals": "Online lägenheter (apartment rentals)",
    "boplats": "Boplats Sverige CRM (housing queue)",
}

EMBEDDED_DEFAULT = """\
# The embedded default: used when no crm.toml is found.
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "exchange"

[product_lines.sales]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "exchange"

[product_lines.rentals]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "smtp"

[product_lines.boplats]
plugins = ["smtp_mail"]
default_transport = "smtp"
"""


@dataclass(frozen=True)
class ProductLineConfig:
    """One product line: which plugins it enables and which transport users get."""

    name: str
    plugins: tuple[str, ...]
    default_transport: str
    label: str = ""


LEASE_FLOOR = 150
"""The shortest lease, in seconds: longer than the longest our transports wait for one
answer (exchangelib's and Graph's 120 s read timeout, SMTP's 30 s default) and than the
30 s a renewal may wait for the database, so a live worker whose server or database is
slow is never taken for dead and its mail turned ``unknown``."""


@dataclass(frozen=True)
class OutboxConfig:
    """Outbox tuning; see the README's operations section for what each does.

    ``give_up_after`` is the retry budget: how long after its enqueue a mail that keeps
    failing for now is still tried (a mail server's queue lifetime; Postfix's
    ``maximal_queue_lifetime`` is 5 days). A count of attempts is the wrong budget:
    with the back-off capped, a few attempts span an hour, and an outage of the
    server or of Entra ID that long failed every queued mail. ``max_attempts`` is an
    extra bound, off (None) unless set.
    """

    lease_seconds: int = field(
        default=300,
        metadata={
            "range": (LEASE_FLOOR, 86400),
            "why": " (longer than the transports' timeouts: Exchange waits up to 120 s)",
        },
    )
    give_up_after: timedelta = field(
        default=timedelta(days=2), metadata={"range": (1, 365 * 86400)}
    )
    max_attempts: int | None = field(default=None, metadata={"range": (1, 1000), "example": 8})
    backoff_base_seconds: float = field(default=30.0, metadata={"range": (1, 86400)})
    backoff_max_seconds: float = field(default=3600.0, metadata={"range": (1, 7 * 86400)})
    batch_size: int = field(default=50, metadata={"range": (1, 10000)})
    poll_seconds: float = field(default=1.0, metadata={"range": (0.01, 3600)})
    reconcile_seconds: float = field(default=300.0, metadata={"range": (1, 7 * 86400)})
    """How often a running worker asks the transports about ``unknown`` mail: a lookup
    that was "too soon to tell" is then settled without an operator."""


@dataclass(frozen=True)
class MailConfig:
    """Limits checked at enqueue so that nothing is queued that cannot be sent."""

    max_message_bytes: int = field(
        default=25 * 1024 * 1024, metadata={"range": (1024, 1024 * 1024 * 1024)}
    )
    max_recipients: int = field(default=500, metadata={"range": (1, 100000)})


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from ``source``."""

    source: str
    database_url: str
    key_file: Path | None
    product_lines: Mapping[str, ProductLineConfig]
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    mail: MailConfig = field(default_factory=MailConfig)
    base_dir: Path = field(default_factory=Path.cwd)

    def product_line(self, name: str) -> ProductLineConfig:
        """The named product line, or a ConfigError listing the configured ones."""
        try:
            return self.product_lines[name]
        except KeyError:
            allowed = ", ".join(sorted(self.product_lines)) or "(none configured)"
            raise ConfigError(
                f"{self.source}: product line {name!r} is not configured; "
                f"configured product lines: {allowed}"
            ) from None

    @property
    def enabled_plugins(self) -> tuple[str, ...]:
        """Every plugin enabled by at least one product line, sorted."""
        names = {p for line in self.product_lines.values() for p in line.plugins}
        return tuple(sorted(names))


_TOP_KEYS = ("database", "secrets", "outbox", "mail", "product_lines")
_LINE_KEYS = ("plugins", "default_transport", "label")


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read: explicit path, ``CRM_CONFIG``, ``./crm.toml``, or None."""
    chosen = explicit or os.environ.get("CRM_CONFIG")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        return path
    local = Path.cwd() / "crm.toml"
    return local if local.is_file() else None


def load_config(
    path: str | os.PathLike[str] | None = None,
    available_plugins: Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and check the configuration; raise ConfigError naming file and key."""
    env = os.environ if environ is None else environ
    found = find_config_file(path)
    if found is None:
        source, text, base = "<embedded default>", EMBEDDED_DEFAULT, Path.cwd()
    else:
        source, text, base = str(found), _read(found), found.parent
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return parse_config(raw, source, base, available_plugins, env)


def _read(path: Path) -> str:
    """The configuration file's text, or a ConfigError that says what to do."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None


def parse_config(
    raw: Mapping[str, Any],
    source: str,
    base: Path,
    available_plugins: Iterable[str] | None,
    env: Mapping[str, str],
) -> Config:
    """Turn the parsed TOML into a Config; every key is checked."""
    _reject_unknown(raw, _TOP_KEYS, source, "")
    database = _table(raw, "database", source)
    _reject_unknown(database, ("url",), source, "database")
    secrets = _table(raw, "secrets", source)
    _reject_unknown(secrets, ("key_file",), source, "secrets")
    url = env.get("CRM_DATABASE_URL") or _str(database, "url", source, "database", "")
    if not url:
        url = f"sqlite:///{(base / 'crm.db').as_posix()}"
    key_file_raw = _str(secrets, "key_file", source, "secrets", "")
    key_file = _resolve(base, key_file_raw) if key_file_raw else _default_key_file(url, base)
    lines = _product_lines(_table(raw, "product_lines", source), source, available_plugins)
    return Config(
        source=source,
        database_url=url,
        key_file=key_file,
        product_lines=lines,
        outbox=_dataclass_from(OutboxConfig, _table(raw, "outbox", source), source, "outbox"),
        mail=_dataclass_from(MailConfig, _table(raw, "mail", source), source, "mail"),
        base_dir=base,
    )


def _product_lines(
    table: Mapping[str, Any], source: str, available: Iterable[str] | None
) -> dict[str, ProductLineConfig]:
    known = set(available) if available is not None else None
    lines: dict[str, ProductLineConfig] = {}
    for name, body in table.items():
        where = f"product_lines.{name}"
        if name not in PRODUCT_LINES:
            raise ConfigError(
                f"{source}: unknown product line [{where}]; allowed: {', '.join(PRODUCT_LINES)}"
            )
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: [{where}] must be a table")
        _reject_unknown(body, _LINE_KEYS, source, where)
        plugins = body.get("plugins", [])
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(f"{source}: {where}.plugins must be a list of plugin names")
        if known is not None:
            for plugin in plugins:
                if plugin not in known:
                    raise ConfigError(
                        f"{source}: {where}.plugins names unknown plugin {plugin!r}; "
                        f"installed plugins: {', '.join(sorted(known)) or '(none)'}"
                    )
        default = body.get("default_transport")
        if not isinstance(default, str) or not default:
            raise ConfigError(
                f"{source}: {where}.default_transport is required "
                '(a transport name such as "exchange" or "smtp")'
            )
        label = body.get("label", PRODUCT_LINE_LABELS.get(name, name))
        if not isinstance(label, str):
            raise ConfigError(f"{source}: {where}.label must be a string")
        lines[name] = ProductLineConfig(name, tuple(dict.fromkeys(plugins)), default, label)
    return lines


def _dataclass_from(cls: Any, table: Mapping[str, Any], source: str, where: str) -> Any:
    allowed = tuple(cls.__dataclass_fields__)
    _reject_unknown(table, allowed, source, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        spec = cls.__dataclass_fields__[key]
        name = f"{source}: {where}.{key}"
        values[key] = _in_range(_typed(value, hints[key], name), spec, name)
    made = cls(**values)
    _cross_field(made, source, where)
    return made


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the field's type (an ``int | None`` field takes an int)."""
    expected = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if expected is timedelta:
        return parse_duration(value, name)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a {_kind(expected)}, got {value!r}")
    return value


def _kind(expected: type) -> str:
    return "whole number" if expected is int else "number" if expected is float else "string"


def _in_range(value: Any, spec: Any, name: str) -> Any:
    """``value`` if it lies in the field's range; a ConfigError saying the range if not.

    Why: TOML takes ``nan``, ``inf`` and 20-digit integers; a ``poll_seconds = nan``
    made the worker spin and a huge ``lease_seconds`` overflowed every poll.
    """
    low, high = spec.metadata.get("range", (None, None))
    if low is None:
        return value
    size = value.total_seconds() if isinstance(value, timedelta) else value
    if low <= size <= high:  # False for nan too
        return value
    shown = _duration_words if isinstance(value, timedelta) else _number_words
    why = spec.metadata.get("why", "")
    raise ConfigError(
        f"{name} must be from {shown(low)} to {shown(high)}{why}, got {_given(value)}; "
        f"write e.g. {spec.name} = {_example(spec)}"
    )


def _example(spec: Any) -> str:
    """What to write: the default, or the field's example when it has no default."""
    if "example" in spec.metadata:
        return _given(spec.metadata["example"], toml=True)
    return f"{_given(spec.default, toml=True)} (the default)"


def _number_words(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


def _duration_words(seconds: float) -> str:
    for unit, size in _UNIT_SECONDS:
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _given(value: Any, toml: bool = False) -> str:
    if isinstance(value, timedelta):
        words = _duration_words(value.total_seconds())
        return f'"{words}"' if toml else words
    return _number_words(value) if isinstance(value, int | float) else repr(value)


def _cross_field(made: Any, source: str, where: str) -> None:
    """Rules between keys of one table: each names both keys and what to write."""
    if isinstance(made, OutboxConfig) and made.backoff_max_seconds < made.backoff_base_seconds:
        raise ConfigError(
            f"{source}: {where}.backoff_max_seconds ({_given(made.backoff_max_seconds)}) "
            f"must be at least {where}.backoff_base_seconds "
            f"({_given(made.backoff_base_seconds)}): the longest wait between two tries "
            "cannot be shorter than the first; raise backoff_max_seconds or lower "
            "backoff_base_seconds"
        )


_DURATION = re.compile(r"(?:\s*\d+\s*[wdhms])+\s*")
_DURATION_PART = re.compile(r"(\d+)\s*([wdhms])")
_UNIT_SECONDS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
DURATION_FORMAT = 'a duration such as "2d", "36h", "90m" or "1d 12h" (units: w, d, h, m, s)'


def parse_duration(value: object, name: str) -> timedelta:
    """A duration as crm.toml writes it (``"2d"``, ``"36h"``, ``"1d 12h"``), or a
    ConfigError naming ``name`` and saying how to write it.

    Why a unit is required: a bare number is seconds to some programs and days to
    others (Postfix's ``maximal_queue_lifetime = 5``), so it is refused, not guessed.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        as_seconds = f'"{value}s" for seconds, or ' if isinstance(value, int) else ""
        raise ConfigError(f'{name} needs a unit: write {as_seconds}e.g. "2d" or "36h"')
    if not isinstance(value, str) or not _DURATION.fullmatch(value.lower()):
        raise ConfigError(f"{name} must be {DURATION_FORMAT}, got {value!r}")
    units = dict(_UNIT_SECONDS)
    if any(len(n) > 9 for n, _ in _DURATION_PART.findall(value.lower())):
        raise ConfigError(f'{name} is far too long, got {value!r}; write e.g. "2d"')
    seconds = sum(int(n) * units[u] for n, u in _DURATION_PART.findall(value.lower()))
    if seconds <= 0:
        raise ConfigError(f"{name} must be longer than 0, got {value!r}")
    return timedelta(seconds=seconds)


def _reject_unknown(
    table: Mapping[str, Any], allowed: Iterable[str], source: str, where: str
) -> None:
    allowed_set = tuple(allowed)
    for key in table:
        if key not in allowed_set:
            name = f"{where}.{key}" if where else key
            raise ConfigError(
                f"{source}: unknown key {name!r}; allowed here: {', '.join(allowed_set)}"
            )


def _table(raw: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: [{key}] must be a table")
    return value


def _str(table: Mapping[str, Any], key: str, source: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where}.{key} must be a string")
    return value


def _resolve(base: Path, raw: str) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base / path


def _default_key_file(url: str, base: Path) -> Path:
    """Beside the SQLite database file; beside the config for other databases."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url and len(url) > len(prefix):
        return Path(url[len(prefix) :]).parent / "crm-secret.key"
    return base / "crm-secret.key"
