"""Pieces the list screens share: a page of a long list, and live fragments.

Why here: the outbox, a person's history and the audit log page the same way and
refresh the same way (app.js reloads an element marked ``data-refresh`` from its
``data-src`` with the header ``X-Fragment: 1``; the same URL without that header is
the whole page, so nothing needs JavaScript).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import make_response, request
from werkzeug.wrappers import Response

PAGE_SIZE = 50
ID = "int(max=9223372036854775807)"
"""A row id in a URL: a number the database can hold (a longer one is "no such page")."""


@dataclass(frozen=True)
class Page:
    """Which page of a list is shown, of how many rows."""

    number: int
    total: int
    size: int = PAGE_SIZE

    @property
    def offset(self) -> int:
        """Rows before this page."""
        return (self.number - 1) * self.size

    @property
    def pages(self) -> int:
        """How many pages there are (at least one, even when empty)."""
        return max(1, -(-self.total // self.size))

    @property
    def has_newer(self) -> bool:
        """Whether a page of newer rows comes before this one."""
        return self.number > 1

    @property
    def has_older(self) -> bool:
        """Whether a page of older rows comes after this one."""
        return self.number < self.pages


def page_of(total: int, size: int = PAGE_SIZE) -> Page:
    """The ``page`` asked for, within the pages there are (the first when it is missing
    or not a number, the last when it is past the end)."""
    raw = request.args.get("page", "1")
    last = Page(1, total, size).pages
    wanted = int(raw) if raw.isascii() and raw.isdigit() else 1
    return Page(min(max(wanted, 1), last), total, size)


def wants_fragment() -> bool:
    """True when app.js asks for the live part of a page only."""
    return request.headers.get("X-Fragment") == "1"


def live(body: str) -> Response:
    """A page or fragment that changes while one looks: never cached, and kept apart
    from the other form of the same URL."""
    response = make_response(body)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Vary"] = "X-Fragment, Cookie"
    return response
