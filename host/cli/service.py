"""``mailhost serve``."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import click

from ..errors import StoreUnreachable
from ..service import Service

if TYPE_CHECKING:
    from ..app import Mailhost
from . import Context, cli, pass_ctx


def _wait_for_the_store(host: Mailhost) -> None:
    """Check the store, waiting while its server does not answer: at boot mailhost may
    start before PostgreSQL, and a service that exits then needs its supervisor to try
    again. Anything else wrong with the store stops serve at once (exit 2)."""
    delay, waited = 1.0, False
    while True:
        try:
            host.check_schema()
        except StoreUnreachable as exc:
            if not waited:  # said once, not every try
                click.echo(f"mailhost: {exc}; waiting for it (trying again every {int(_MAX_WAIT)} s at most, "
                           "Ctrl-C to stop)", err=True)
                waited = True
            time.sleep(delay)
            delay = min(delay * 2, _MAX_WAIT)
            continue
        if waited:
            click.echo("mailhost: the store answers now", err=True)
        return


_MAX_WAIT = 30.0


@cli.command()
@click.option("--once", is_flag=True, help="Run one round of due downloads and one delivery pass, then exit "
                                           "(status 1 if one of them failed).")
@click.option("--download-workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Connections downloaded at the same time.")
@pass_ctx
def serve(ctx: Context, once: bool, download_workers: int) -> None:
    """Run the service: scheduled downloads, delivery, and the web admin."""
    host = ctx.host
    if once:
        host.check_schema()
    else:
        _wait_for_the_store(host)
    # Bad configuration stops serve here (exit 2), not in every pass of every connection
    # (the config file itself, [outgoing] included, was checked when it was read).
    host.check_key()
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
