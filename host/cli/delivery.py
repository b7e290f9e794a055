"""``mailhost send``, ``mailhost deliver``, ``mailhost queue outgoing``,
``mailhost outgoing test-email``."""
from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import click

from ..outgoing import OUTGOING_STATUSES, item_dict
from . import (
    DAYS,
    ITEM_ID,
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
from .connections import outgoing
from .incoming import queue


@cli.command()
@click.option("--to", "to", multiple=True, metavar="ADDRESS", help="A recipient (repeatable).")
@click.option("--cc", "cc", multiple=True, metavar="ADDRESS", help="A copy recipient (repeatable).")
@click.option("--bcc", "bcc", multiple=True, metavar="ADDRESS", help="A blind-copy recipient (repeatable).")
@click.option("--from", "from_address", metavar="ADDRESS", help="The sender; default: the connection's from address.")
@click.option("--connection", metavar="NAME", help="The outgoing connection; default: the default one.")
@click.option("--subject", metavar="TEXT", help="The subject (the connection's prefix is added when sent).")
@click.option("--body", metavar="TEXT", help="The text of the message.")
@click.option("--body-file", metavar="FILE", help="Read the text of the message from FILE (UTF-8).")
@click.option("--eml", metavar="FILE", help="Send this ready message (.eml) as it is; recipients from its headers "
                                            "unless --to/--cc/--bcc are given.")
@click.option("--attach", "attachments", multiple=True, metavar="FILE", help="Attach FILE (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the queued message as JSON instead of its id.")
@pass_ctx
def send(ctx: Context, to: tuple[str, ...], cc: tuple[str, ...], bcc: tuple[str, ...], from_address: str | None,
         connection: str | None, subject: str | None, body: str | None, body_file: str | None, eml: str | None,
         attachments: tuple[str, ...], as_json: bool) -> None:
    """Queue a message for delivery and print its queue id."""
    item = ctx.host.outgoing.send(
        list(to), cc=list(cc), bcc=list(bcc), subject=subject, body=body, body_file=body_file, eml=eml,
        attachments=list(attachments), from_address=from_address, connection=connection,
    )
    if as_json:
        print_json(item_dict(item))
    else:
        click.echo(item.id)


@cli.command()
@click.option("--sessions", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Parallel sessions at most (default: [service] delivery_sessions).")
@click.option("--connection", metavar="NAME", help="Only the messages of this connection.")
@json_option
@pass_ctx
def deliver(ctx: Context, sessions: int | None, connection: str | None, as_json: bool) -> None:
    """One delivery pass over the outgoing queue: every message that is due."""
    host = ctx.host
    report = host.outgoing.deliver(sessions or host.config.delivery_sessions, connection=connection)
    rows = report.as_dicts()
    if as_json:
        print_json(rows)
    else:
        if report.recovered:
            click.echo(f"requeued {report.recovered} message(s) an interrupted delivery left", err=True)
        if not rows:
            click.echo("nothing to deliver", err=True)
        for r in report.connections.values():
            click.echo(f"{r.connection}: {r.counts()} in {report.seconds:.2f}s ({r.sessions} session(s))")
            if r.error:
                click.echo(f"{r.connection}: {r.error}", err=True)
    # A failed purge of old sent messages is in the log already; it fails the command too.
    if report.error or report.purge_error or any(r["error"] for r in rows):
        if report.error and not as_json:
            click.echo(f"mailhost: {report.error}", err=True)
        raise SystemExit(1)


@queue.group("outgoing", invoke_without_command=True, subcommand_metavar=OPTIONAL_SUBCOMMAND)
@click.option("--status", type=click.Choice(OUTGOING_STATUSES), help="Only this status.")
@click.option("--connection", metavar="NAME", help="Only messages queued for this connection.")
@json_option
@limit_option
@click.pass_context
def queue_outgoing(cctx: click.Context, status: str | None, connection: str | None, as_json: bool,
                   limit: int | None) -> None:
    """Messages to send and sent, newest first."""
    if cctx.invoked_subcommand:
        return
    ctx: Context = cctx.obj
    rows = [item_dict(i) for i in ctx.host.outgoing.items(status, connection, limit)]
    print_rows(rows, ["id", "connection", "status", "to", "subject", "attempts", "next_attempt_at", "sent_via",
                      "last_error"], as_json, limit,
               empty="the outgoing queue is empty" if not (status or connection) else "no queue items match")


@queue_outgoing.command("show")
@click.argument("item_id", type=ITEM_ID, metavar="ID")
@click.option("--raw", is_flag=True, help="Write the message exactly as queued to stdout.")
@json_option
@pass_ctx
def queue_outgoing_show(ctx: Context, item_id: int, raw: bool, as_json: bool) -> None:
    """One message: its state, each recipient, and every attempt."""
    item = ctx.host.outgoing.item(item_id)
    if raw:
        sys.stdout.buffer.write(item.raw)
        sys.stdout.flush()
        return
    record = item_dict(item, with_attempts=True)
    if as_json:
        print_json(record)
        return
    attempts = record.pop("attempts_log")
    recipients = record.pop("recipients")
    print_record(record, False)
    click.echo("recipients:")
    for r in recipients:
        click.echo(f"  {r['address']}: {r['status']}" + (f" ({r['reply']})" if r["reply"] else ""))
    click.echo("attempts:" if attempts else "attempts: none yet")
    for a in attempts:
        at = a["at"].strftime("%Y-%m-%d %H:%M:%S") if isinstance(a["at"], dt.datetime) else a["at"]
        took = f", {a['duration_ms']} ms" if a["duration_ms"] is not None else ""
        click.echo(f"  {at}  {a['connection'] or '-'}  {a['result']}{took}: {a['detail'] or ''}")


@queue_outgoing.command("retry")
@click.argument("item_id", type=ITEM_ID, metavar="ID")
@pass_ctx
def queue_outgoing_retry(ctx: Context, item_id: int) -> None:
    """Queue a message again now, with a fresh budget of attempts."""
    item = ctx.host.outgoing.retry(item_id)
    click.echo(f"outgoing item {item.id} is queued again; `mailhost deliver` sends it", err=True)


@queue_outgoing.command("delete")
@click.argument("item_id", type=ITEM_ID, metavar="ID")
@pass_ctx
def queue_outgoing_delete(ctx: Context, item_id: int) -> None:
    """Remove a message (and its attempts) from the queue."""
    ctx.host.outgoing.delete(item_id)
    click.echo(f"deleted outgoing item {item_id}", err=True)


@queue_outgoing.command("purge")
@click.option("--older-than", "days", type=DAYS, required=True, metavar="DAYS",
              help="Messages last changed more than DAYS days ago.")
@click.option("--status", "statuses", multiple=True, type=click.Choice(["sent", "failed"]),
              help="sent (default) and/or failed.")
@pass_ctx
def queue_outgoing_purge(ctx: Context, days: float, statuses: tuple[str, ...]) -> None:
    """Delete old sent (or failed) messages; sent ones are kept for audit until then."""
    n = ctx.host.outgoing.purge(dt.timedelta(days=days), statuses or ("sent",))
    click.echo(f"purged {n} outgoing message(s)", err=True)


@outgoing.command("test-email")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="ADDRESS", help="Who gets the test message.")
@json_option
@pass_ctx
def outgoing_test_email(ctx: Context, name: str, to: str, as_json: bool) -> None:
    """Send one test message through NAME at once and print the session transcript
    (secrets redacted)."""
    result = ctx.host.outgoing.test_email(name, to)
    if as_json:
        record: dict[str, Any] = {"connection": result.connection, "to": result.to, "ok": result.ok,
                                  "response": result.response, "refused": dict(result.refused),
                                  "error": result.error, "transcript": list(result.transcript)}
        print_json(record)
    else:
        for line in result.transcript:
            click.echo(line)
        if result.ok and not result.refused:
            click.echo(f"sent a test message to {result.to} through {name}: {result.response}", err=True)
    if not result.ok or result.refused:
        if not as_json:
            why = result.error or "; ".join(f"{r}: {w}" for r, w in result.refused.items())
            click.echo(f"mailhost: the test message through {name} was not delivered: {why}", err=True)
        raise SystemExit(1)
