"""``mailhost serve``."""
from __future__ import annotations

import logging

import click

from ..service import Service
from . import Context, cli, pass_ctx


@cli.command()
@click.option("--once", is_flag=True, help="Run one round of due downloads and one delivery pass, then exit "
                                           "(status 1 if one of them failed).")
@click.option("--download-workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Connections downloaded at the same time.")
@pass_ctx
def serve(ctx: Context, once: bool, download_workers: int) -> None:
    """Run the service: scheduled downloads, delivery, and the web admin."""
    host = ctx.host
    host.check_schema()
    # Bad configuration stops serve here (exit 2), not in every pass of every connection.
    host.check_key()
    host.outgoing.policy  # noqa: B018  (reads and checks [outgoing])
    logging.getLogger("mailhost").setLevel(logging.INFO)
    service = Service(host, download_workers=download_workers)
    service.install_signal_handlers()
    web = None
    if host.config.web_listen and not once:
        from ..web import start_web

        web = start_web(host, host.config.web_listen)
        click.echo(f"web admin on http://{web.address}/", err=True)
    click.echo(f"mailhost serving from {host.config.path}" + ("" if once else " (Ctrl-C to stop)"), err=True)
    try:
        service.run(once=once)
    finally:
        if web is not None:
            web.stop()
    if once and service.failed:  # what failed is in the log above
        raise SystemExit(1)
