"""``mailhost secrets ...``: rotating the key that encrypts secrets at rest."""
from __future__ import annotations

import click

from ..rotation import KINDS, RotationReport, drop_old, rotate
from . import Context, cli, json_option, pass_ctx, print_json


@cli.group()
def secrets() -> None:
    """The key that encrypts passwords, client secrets, tokens and private keys at rest."""


@secrets.command("rotate")
@click.option("--drop-old", "drop", is_flag=True,
              help="Then remove the old keys from the key file (see `mailhost secrets drop-old`).")
@json_option
@pass_ctx
def secrets_rotate(ctx: Context, drop: bool, as_json: bool) -> None:
    """Make a new key and re-encrypt every stored secret under it, in one transaction.

    The key file gets the new key first and keeps the old ones after it, so that every
    secret opens at any instant, and a running `mailhost serve` reads it again by itself.
    With $MAILHOST_SECRET_KEY, which mailhost cannot write, put a new key before the
    current one (NEW,OLD) where the variable is set; rotate re-encrypts under it.
    """
    _show(rotate(ctx.host, drop), as_json, "under the new key")


@secrets.command("drop-old")
@json_option
@pass_ctx
def secrets_drop_old(ctx: Context, as_json: bool) -> None:
    """Remove the old keys from the key file once no stored secret needs them.

    Run it when every machine sharing the store has the rotated key file: what still
    needs an old key (written meanwhile by a process with the old file) is re-encrypted
    under the first key before the old keys go. With $MAILHOST_SECRET_KEY it does the
    same and then says that you can leave the variable its first key alone.
    """
    _show(drop_old(ctx.host), as_json, "still under an old key")


def _show(report: RotationReport, as_json: bool, what: str) -> None:
    if as_json:
        print_json(report.as_dict())
        return
    total = sum(report.reencrypted.values())
    click.echo(f"re-encrypted {total} secret(s) {what} ({report.source}):", err=True)
    for kind, n in report.reencrypted.items():
        click.echo(f"  {KINDS[kind] + 's':<31} {n}", err=True)
    if report.dropped:
        click.echo(f"dropped {report.dropped} old key(s)", err=True)
    click.echo(f"next: {report.next}", err=True)
