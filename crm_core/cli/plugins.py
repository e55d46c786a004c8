"""``crm plugins``: which plugins and transports each product line enables."""

from __future__ import annotations

from typing import Any

import click

from crm_core.cli.context import Context, json_option, pass_ctx
from crm_core.cli.output import emit_json
from crm_core.cli.users import known_line


@click.command("plugins")
@click.option(
    "--product-line", default=None, help="Only this product line (one in the configuration)."
)
@json_option
@pass_ctx
def plugins_cmd(ctx: Context, product_line: str | None, as_json: bool) -> None:
    """Which plugins are enabled in each product line, and their transports."""
    crm = ctx.crm(database=False)
    if product_line is not None:
        known_line(crm, product_line)
    names = [product_line] if product_line else list(crm.config.product_lines)
    data: list[dict[str, Any]] = []
    for name in names:
        line = crm.config.product_line(name)
        data.append(
            {
                "product_line": name,
                "label": line.label,
                "plugins": list(line.plugins),
                "default_transport": line.default_transport,
                "transports": {
                    t.name: {"label": t.label, "plugin": t.plugin}
                    for t in crm.transports(name).values()
                },
            }
        )
    if as_json:
        emit_json({"ok": True, "config": crm.config.source, "product_lines": data})
        return
    click.echo(f"Configuration: {crm.config.source}")
    for entry in data:
        click.echo(f"{entry['product_line']} — {entry['label']}")
        click.echo(f"  plugins: {', '.join(entry['plugins']) or '(none)'}")
        for tname, tinfo in entry["transports"].items():
            default = " (default)" if tname == entry["default_transport"] else ""
            click.echo(f"  transport {tname}: {tinfo['label']} [{tinfo['plugin']}]{default}")


COMMANDS = (plugins_cmd,)
