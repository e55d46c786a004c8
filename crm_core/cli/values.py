"""Reading a setting's value on the command line: given, typed at a prompt, or piped.

Why a prompt when VALUE is left out: every fix hint is a command that works when
typed, and most hints cannot know the value (a domain, a username). A secret is
always asked for without echo; piped standard input serves scripts.
"""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING

import click

from crm_core.cli.context import fail

if TYPE_CHECKING:
    from crm_core.fields import SettingField


def read_value(spec: SettingField, value: str | None) -> str:
    """The value to save for ``spec``: the argument, else asked for, else one piped line."""
    if value is not None:
        return value
    if sys.stdin.isatty() and spec.multiline:
        fail(f"{spec.key} is a file's content: give it on standard input (< app.pem)")
    if sys.stdin.isatty():
        hint = f" ({spec.help})" if spec.help and not spec.secret else ""
        entered: str = click.prompt(
            f"{spec.key} — {spec.label}{hint}",
            hide_input=spec.secret,
            default="" if spec.secret else None,
            show_default=False,
            err=True,
        )
        return entered
    if spec.multiline:
        return read_file_content(sys.stdin.buffer.read())
    line = sys.stdin.readline()
    if not line and not spec.secret:
        fail(f"give a value for {spec.key}, after the key or on standard input")
    return line.rstrip("\r\n")


def read_file_content(data: bytes) -> str:
    """A file read from standard input: its text, or base64 when it is binary (a PFX)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")
