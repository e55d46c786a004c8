"""``crm send`` and ``crm outbox``: the outbox's commands (filled in by the outbox work)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add the mail commands to the ``crm`` group."""
