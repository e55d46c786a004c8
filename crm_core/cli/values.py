"""Reading a setting's value on the command line: given, typed at a prompt, or piped.

Why a prompt when VALUE is left out: every fix hint is a command that works when
typed, and most hints cannot know the value (a domain, a username). A secret is
always asked for without echo; piped standard input or ``--value-from-env NAME``
serve scripts. A secret given as an argument is refused: it would show in ``ps`` to
every user of the machine and stay in the shell's history.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import click

from crm_core.cli.context import fail

if TYPE_CHECKING:
    from crm_core.fields import SettingField

FROM_ENV_HELP = (
    "Read the value from environment variable NAME (for scripts; a secret must never be "
    "given as an argument, where `ps` and the shell's history show it)."
)


def read_value(
    spec: SettingField,
    value: str | None,
    from_env: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The value to save for ``spec``: the argument, a variable, asked for, or piped."""
    if from_env is not None:
        return _from_env(spec, value, from_env, environ or {})
    if value is not None:
        if spec.secret:
            fail(
                f"{spec.key} is a secret: given on the command line it shows in `ps` and "
                "in the shell's history, so it was not saved. Leave the value out to be "
                "asked for it without echo, pipe it on standard input, or use "
                "--value-from-env NAME"
            )
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


def _from_env(spec: SettingField, value: str | None, name: str, environ: Mapping[str, str]) -> str:
    if value is not None:
        fail(f"give the value of {spec.key} either after the key or with --value-from-env")
    found = environ.get(name)
    if found is None:
        fail(f"--value-from-env {name}: no environment variable {name} is set")
    return found


def read_file_content(data: bytes) -> str:
    """A file read from standard input: its text, or base64 when it is binary (a PFX)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")
