"""The recipients of ``crm send --to-file``: a list of addresses, or a CSV of persons.

Why two forms: an address list is what people paste from anywhere; a CSV is what a
person list exported from a spreadsheet or another CRM looks like, with the name in
its own column. Each recipient keeps its line number, so a refused address is named
by where it is in the file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from crm_core.cli.context import fail
from crm_core.files import read_regular
from crm_core.mail.addresses import Address

MAX_BYTES = 64 * 1024 * 1024
"""Far beyond any real list (a million addresses fit), so a wrong file is refused
before it is read whole."""


def read_recipients(path: Path) -> list[tuple[int, str]]:
    """(line number, address as typed) for each recipient; exits 2 on a bad file."""
    data = read_regular(path, MAX_BYTES, "--to-file")  # a regular file only, as --attach
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    found = _from_csv(path, text) if path.suffix.lower() == ".csv" else _from_lines(text)
    if not found:
        fail(f"{path} holds no recipients (one address a line, or a CSV with an 'email' column)")
    return found


def _from_lines(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        address = line.strip()
        if address and not address.startswith("#"):
            found.append((number, address))
    return found


def _from_csv(path: Path, text: str) -> list[tuple[int, str]]:
    """Rows of a CSV whose header names an ``email`` column (and maybe ``name``)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if "email" not in header:
        named = ", ".join(header) or "nothing"
        fail(f"{path} has no 'email' column in its first line (found: {named})")
    email_at = header.index("email")
    name_at = header.index("name") if "name" in header else None
    found = []
    for row in reader:
        email = row[email_at].strip() if email_at < len(row) else ""
        if not email and not any(cell.strip() for cell in row):
            continue  # a blank line
        name = row[name_at].strip() if name_at is not None and name_at < len(row) else ""
        found.append((reader.line_num, str(Address(email, name)) if name else email))
    return found
