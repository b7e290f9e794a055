"""``mailhost fetch``, ``mailhost queue incoming``, ``mailhost log incoming``."""
from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import click

from ..incoming import INCOMING_STATUSES, PassReport, item_dict
from . import (
    DAYS,
    ITEM_ID,
    MINUTES,
    OPTIONAL_SUBCOMMAND,
    Context,
    cli,
    json_option,
    limit_option,
    pass_ctx,
    print_json,
    print_record,
    print_rows,
)


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME ...]")
@json_option
@pass_ctx
def fetch(ctx: Context, names: tuple[str, ...], as_json: bool) -> None:
    """One download pass now: the named connections, or every enabled one."""
    show_progress = not as_json and sys.stderr.isatty()
    bar: Any = None

    def progress(done: int, total: int) -> None:  # a bar per pass: each starts at 0
        nonlocal bar
        if bar is not None and done == 0:
            bar.__exit__(None, None, None)
            bar = None
        if bar is None:
            bar = click.progressbar(length=total, label="downloading", file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(done - bar.pos)

    # One call: it checks every name before any download, so a typo changes nothing.
    reports: list[PassReport] = ctx.host.incoming.fetch(list(names) or None, progress if show_progress else None)
    if bar is not None:
        bar.__exit__(None, None, None)
    if as_json:
        print_json([r.as_dict() for r in reports])
    else:
        if not reports:
            click.echo("no enabled incoming connections to fetch", err=True)
        for r in reports:
            if r.skipped:
                click.echo(f"{r.connection}: skipped, {r.skipped}", err=True)
            elif r.ok:
                dup = f", {r.duplicates} already stored" if r.duplicates else ""
                click.echo(f"{r.connection}: {r.stored} new message(s), {r.bytes} bytes{dup}, in {r.seconds:.2f}s")
            else:
                error = (r.error or "").removeprefix(f"{r.connection}: ")  # the line names it already
                click.echo(f"{r.connection}: failed after {r.stored} message(s): {error}", err=True)
    if any(not r.ok for r in reports):
        raise SystemExit(1)


@cli.group()
def queue() -> None:
    """The incoming and outgoing mail queues."""



@queue.group("incoming", invoke_without_command=True, subcommand_metavar=OPTIONAL_SUBCOMMAND)
@click.option("--connection", metavar="NAME", help="Only this connection.")
@click.option("--status", type=click.Choice(INCOMING_STATUSES), help="Only this status.")
@json_option
@limit_option
@click.pass_context
def queue_incoming(cctx: click.Context, connection: str | None, status: str | None, as_json: bool, limit: int | None) -> None:
    """Downloaded messages, newest first."""
    if cctx.invoked_subcommand:
        return
    ctx: Context = cctx.obj
    rows = [item_dict(i) for i in ctx.host.incoming.items(connection, status, limit)]
    print_rows(rows, ["id", "connection", "status", "from", "subject", "size", "created_at"], as_json, limit,
               empty="the incoming queue is empty" if not (connection or status) else "no queue items match")


@queue_incoming.command("show")
@click.argument("item_id", type=ITEM_ID, metavar="ID")
@click.option("--raw", is_flag=True, help="Write the message exactly as downloaded to stdout.")
@click.option("--decrypted", is_flag=True, help="With --raw: the decrypted form instead.")
@json_option
@pass_ctx
def queue_incoming_show(ctx: Context, item_id: int, raw: bool, decrypted: bool, as_json: bool) -> None:
    """One downloaded message: its metadata, or its raw bytes."""
    item = ctx.host.incoming.item(item_id)
    if decrypted and not raw:
        raise click.UsageError("--decrypted goes with --raw")
    if raw:
        data = item.decrypted if decrypted else item.raw
        if decrypted and data is None:
            # No decryption record: nothing claimed it at download, which is also what
            # encrypted mail on a connection without certificates looks like.
            reason = (item.decryption or {}).get("error") or (
                "nothing decrypted it at download: it is not encrypted, or its connection had no "
                "certificate attached then (attaching one later does not decrypt stored mail)")
            raise click.UsageError(f"item {item_id} has no decrypted form: {reason}")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    record = item_dict(item)
    record["fingerprint"] = item.fingerprint
    record["decryption"] = item.decryption
    print_record(record, as_json)


@cli.group("log")
def log_group() -> None:
    """The incoming mail log."""


@log_group.command("incoming")
@click.option("--connection", metavar="NAME", help="Only this connection.")
@click.option("--messages", is_flag=True, help="Also list each message every pass saw.")
@json_option
@limit_option
@pass_ctx
def log_incoming(ctx: Context, connection: str | None, messages: bool, as_json: bool, limit: int | None) -> None:
    """Download passes, newest first: counts, bytes, duration, errors.

    A pass whose process died (killed, crashed) or lost its lease says interrupted; one
    that `serve` stopped after a batch as it shut down (SIGTERM) says stopped, and how far
    it got: the next pass goes on from there.
    """
    rows = []
    for entry in ctx.host.incoming.logs(connection, limit):
        seconds = (entry.finished_at - entry.started_at).total_seconds() if entry.finished_at else None
        row: dict[str, Any] = {
            "id": entry.id, "connection": entry.connection_name, "status": entry.status,
            "started_at": entry.started_at, "finished_at": entry.finished_at,
            "seconds": round(seconds, 3) if seconds is not None else None, "listed": entry.listed,
            "stored": entry.stored, "duplicates": entry.duplicates, "acknowledged": entry.acknowledged,
            "bytes": entry.bytes, "error": entry.error,
        }
        if messages:
            row["messages"] = [
                {"message_id": e.message_id, "from": e.from_addr, "subject": e.subject, "at": e.at,
                 "result": e.result, "detail": e.detail, "item_id": e.item_id}
                for e in ctx.host.incoming.log_entries(entry.id)
            ]
        rows.append(row)
    print_rows(rows, ["id", "connection", "status", "started_at", "seconds", "stored", "duplicates", "bytes", "error"],
               as_json, limit, empty="the incoming log is empty")


@queue_incoming.command("purge")
@click.option("--older-than", "days", type=DAYS, required=True, metavar="DAYS",
              help="Items downloaded more than DAYS days ago (and log passes as old).")
@click.option("--status", "statuses", multiple=True, type=click.Choice(["processed", "filtered", "failed", "new"]),
              help="processed and filtered by default; name others to purge them too (never processing: see "
                   "`queue incoming release`).")
@pass_ctx
def queue_incoming_purge(ctx: Context, days: float, statuses: tuple[str, ...]) -> None:
    """Delete old queue items and log passes; their keys stay, so nothing is downloaded again."""
    items, passes = ctx.host.incoming.purge(dt.timedelta(days=days), statuses or ("processed", "filtered"))
    click.echo(f"purged {items} incoming item(s) and {passes} log pass(es)", err=True)


@queue_incoming.command("release")
@click.option("--processing-for", "minutes", type=MINUTES, metavar="MINUTES",
              help="Items processing for more than MINUTES minutes (default: [incoming] "
                   "processing_timeout_minutes of the config file; 0: all of them).")
@pass_ctx
def queue_incoming_release(ctx: Context, minutes: float | None) -> None:
    """Put items whose handler died back to new: those left processing too long.

    `mailhost serve` does it by itself after [incoming] processing_timeout_minutes (60).
    Another handler then takes them, and may repeat what the dead one had done.
    """
    if minutes is None:
        timeout = ctx.host.config.processing_timeout
        if timeout is None:
            raise click.UsageError("[incoming] processing_timeout_minutes is 0 in the config file, so there is no "
                                   "default: give --processing-for MINUTES")
        minutes = timeout.total_seconds() / 60
    released = ctx.host.incoming.release(dt.timedelta(minutes=minutes))
    click.echo(f"released {released} incoming item(s) processing for more than {minutes:g} minute(s): "
               "they are new again", err=True)
