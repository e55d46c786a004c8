"""``crm serve``: the web app, served by waitress (or Flask's own server with --dev)."""

from __future__ import annotations

import click

from crm_core.cli.context import Context, pass_ctx


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port."
)
@click.option(
    "--threads", type=click.IntRange(1, 64), default=8, show_default=True, help="Worker threads."
)
@click.option(
    "--secure-cookies",
    is_flag=True,
    help="Mark the session cookie Secure: when the app is reached over HTTPS (a proxy "
    "that terminates TLS in front of it).",
)
@click.option(
    "--dev",
    is_flag=True,
    help="Flask's development server instead of waitress: never in production.",
)
@pass_ctx
def serve(
    ctx: Context, host: str, port: int, threads: int, secure_cookies: bool, dev: bool
) -> None:
    """Serve the web app (sign in, settings, users, persons, outbox).

    It uses the same database, key and configuration as every other command; the
    outbox worker (`crm outbox work`) runs beside it. Ctrl-C stops it.
    """
    from crm_core.web import create_app

    app = create_app(ctx.crm(), secure_cookies=secure_cookies)
    url = f"http://{host}:{port}/"
    if dev:
        click.echo(f"Development server (Flask's own; not for production) on {url}")
        app.run(host=host, port=port, debug=False, use_reloader=False)
        return
    import waitress

    click.echo(f"Serving on {url} (waitress, {threads} threads). Ctrl-C stops it.")
    try:
        waitress.serve(app, host=host, port=port, threads=threads, ident="crm-mail", _quiet=True)
    except KeyboardInterrupt:
        click.echo("Stopped.")


COMMANDS = (serve,)
