"""How the ``crm`` command prints: JSON, times, tables, and text from outside.

Why one module: every command prints the same way. Times are ISO 8601 with the zone,
in text and JSON alike; text that came from outside (a subject, a name, a server's
reply) has its control characters escaped, so a crafted subject cannot rewrite the
terminal; tables have a header and aligned columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import click


def when(value: datetime | None) -> str:
    """A time as ISO 8601 with the zone (UTC when the database gave none), or "-"."""
    if value is None:
        return "-"
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.isoformat(timespec="seconds")


def printable(text: str) -> str:
    """``text`` with control characters escaped (\\n, \\x1b, \\u202e …); tabs stay."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    named = {"\n": "\\n", "\r": "\\r"}
    if ch in named:
        return named[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def emit_json(data: dict[str, Any]) -> None:
    """Print one JSON document (an object) on standard output."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_default))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of an aligned table with a header; the last column is not padded."""
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.ljust(widths[i]) for i, v in enumerate(values[:-1])]
        return "  ".join([*padded, values[-1]]).rstrip()

    return [line(list(headers)), *(line(r) for r in cells)]


def shortened(total: int, shown: int, hint: str) -> str | None:
    """ "200 of 202; use --limit" when a list was cut, else None."""
    return f"{shown} of {total}; {hint}" if total > shown else None
