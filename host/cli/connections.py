"""``mailhost incoming ...`` and ``mailhost outgoing ...``: connections."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from ..connections import ConnectionSpec, cleartext_warning
from ..errors import MailError, MailhostError, PluginError
from ..secrets import redact
from ..protocols import Direction, TestStep
from . import (
    Context,
    cli,
    fail,
    json_option,
    limit_option,
    pass_ctx,
    print_json,
    print_record,
    print_rows,
    read_secret,
    secret_options,
)

_ENCRYPTIONS = click.Choice(["none", "ssl", "starttls"], case_sensitive=False)


def _common_options(f: Callable[..., Any], protocols: str) -> Callable[..., Any]:
    options = [
        click.option("--protocol", metavar="NAME", help=f"{protocols}, ... (see `mailhost plugins list`)."),
        click.option("--description", metavar="TEXT"),
        click.option("--host", metavar="HOST", help="The server's host name."),
        click.option("--port", type=int, metavar="PORT", help="0 or absent: the protocol's default for the encryption."),
        click.option("--encryption", type=_ENCRYPTIONS, help="none, ssl (implicit TLS) or starttls."),
        click.option("--username", metavar="USER"),
        click.option("--timeout", type=int, metavar="MS", help="Milliseconds; 0 or absent: 30000."),
        click.option("--oauth-credential", metavar="NAME", help="Sign in with this OAuth2 credential."),
        click.option("--host-override", metavar="NAME", help="A predefined host (see `mailhost host-overrides`)."),
        click.option("--ca-file", metavar="PATH", help="Also trust this PEM CA for this connection."),
        click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
                     help="A setting the protocol declares (see `mailhost plugins options`); repeatable. "
                          "NAME= resets it to its default. Not for secrets: options are shown in clear."),
        secret_options(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _incoming_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--folder", metavar="FOLDER", help="Mailbox folder (INBOX by default; Main/Sub for subfolders)."),
        click.option("--interval", type=int, metavar="MINUTES", help="Minutes between downloads (default 1)."),
        click.option("--after-download", metavar="ACTION", help="mark-seen (IMAP default), keep (POP3 default), delete, move, ..."),
        # One value, two spellings: move's target folder, or the argument a plugin's action takes.
        click.option("--move-to", "--action-argument", "after_download_argument", metavar="FOLDER",
                     help="The target folder of --after-download move; --action-argument VALUE: the argument "
                          "of an action a plugin adds. `show` and --json name it after_download_argument."),
        click.option("--shared-mailbox", metavar="ALIAS", help="Open this shared mailbox with the user's credentials."),
        click.option("--certificate", "certificates", multiple=True, metavar="NAME",
                     help="Decrypt S/MIME mail with this certificate (repeatable; replaces the list)."),
        click.option("--no-certificates", is_flag=True, help="Detach every certificate."),
    ]
    for option in reversed(options):
        f = option(f)
    return _common_options(f, "imap, pop3, graph")


def _outgoing_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--from", "from_address", metavar="ADDRESS", help="The sender address of mail sent through it."),
        click.option("--prefix", metavar="TEXT", help="Added to the front of every subject."),
        click.option("--size-limit", type=int, metavar="BYTES", help="Largest message it takes; 0 = unlimited."),
        click.option("--debug/--no-debug", default=None, help="Write a redacted session transcript to the log."),
        click.option("--fallback-to-default/--no-fallback-to-default", default=None,
                     help="Hand undeliverable mail to the default connection."),
        click.option("--default/--no-default", "default", default=None, help="Make this the default connection."),
    ]
    for option in reversed(options):
        f = option(f)
    return _common_options(f, "smtp, graph")


def _spec(name: str | None, opts: dict[str, Any]) -> ConnectionSpec:
    password = read_secret(opts.pop("password_env"), opts.pop("password_file"), opts.pop("password_stdin"))
    certificates: list[str] | None = list(opts.pop("certificates", ()) or ()) or None
    if opts.pop("no_certificates", False):
        if certificates:
            fail("give --certificate or --no-certificates, not both")
        certificates = []  # given, and empty: detach them all
    options: dict[str, str] = {}
    for pair in opts.pop("options", ()):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            fail(f"--option {pair!r} is not NAME=VALUE: give the option's name, '=' and its value "
                 "(NAME= resets it to its default)")
        if key.strip() in options:
            fail(f"--option {key.strip()} is given twice: give each option once")
        options[key.strip()] = value
    spec = ConnectionSpec(name=name, password=password, options=options, **{k: v for k, v in opts.items()})
    if certificates is not None:
        spec.certificates = certificates
    if spec.encryption:
        spec.encryption = spec.encryption.lower()
    return spec


def _print_steps(steps: list[TestStep], as_json: bool) -> bool:
    ok = all(s.ok for s in steps)
    if as_json:
        print_json([{"step": s.name, "ok": s.ok, "detail": s.detail} for s in steps])
    else:
        for s in steps:
            click.echo(f"{'ok  ' if s.ok else 'FAIL'}  {s.name:<15} {s.detail}")
    return ok


def _warn_cleartext(direction: Direction, record: dict[str, Any]) -> None:
    warning = cleartext_warning(direction, record)
    if warning:
        click.echo(f"mailhost: warning: {warning}", err=True)


def _register(direction: Direction, group: click.Group, options: Callable[..., Any]) -> None:
    word = direction.value

    @group.command("add")
    @click.argument("name")
    @options
    @json_option
    @pass_ctx
    def add(ctx: Context, name: str, as_json: bool, **opts: Any) -> None:
        conn = ctx.host.connections.add(direction, _spec(name, opts))
        record = ctx.host.connections.as_dict(direction, conn)
        if as_json:
            print_json(record)
        else:
            note = " (disabled: test it, then `mailhost incoming enable`)" if direction is Direction.INCOMING else ""
            click.echo(f"added {word} connection {conn.name}{note}", err=True)
        _warn_cleartext(direction, record)

    add.help = f"Add an {word} connection named NAME." + (" It starts disabled." if direction is Direction.INCOMING else "")

    @group.command("edit")
    @click.argument("name")
    @click.option("--name", "new_name", metavar="NEW", help="Rename the connection.")
    @options
    @json_option
    @pass_ctx
    def edit(ctx: Context, name: str, new_name: str | None, as_json: bool, **opts: Any) -> None:
        conn, disabled = ctx.host.connections.edit(direction, name, _spec(new_name, opts))
        record = ctx.host.connections.as_dict(direction, conn)
        if as_json:
            print_json(record)
        else:
            click.echo(f"changed {word} connection {conn.name}" + (" and disabled it: enable it again when ready" if disabled else ""), err=True)
        _warn_cleartext(direction, record)

    edit.help = f"Change an {word} connection." + (
        " Editing an enabled one disables it; pointing it at another mailbox stops a download pass of the old one"
        " under way." if direction is Direction.INCOMING else "")

    @group.command("list")
    @click.option("--search", metavar="TEXT", help="Match name, description, host or username.")
    @json_option
    @limit_option
    @pass_ctx
    def list_(ctx: Context, search: str | None, as_json: bool, limit: int | None) -> None:
        rows = [ctx.host.connections.as_dict(direction, c) for c in ctx.host.connections.list(direction, search)]
        columns = (["name", "protocol", "host", "port", "username", "folder", "enabled", "last_error"]
                   if direction is Direction.INCOMING else
                   ["name", "protocol", "host", "port", "username", "from_address", "default"])
        print_rows(rows, columns, as_json, limit, empty=f"no {word} connections" + (" match" if search else ""))

    list_.help = f"List {word} connections."

    @group.command("show")
    @click.argument("name")
    @json_option
    @pass_ctx
    def show(ctx: Context, name: str, as_json: bool) -> None:
        record = ctx.host.connections.as_dict(direction, ctx.host.connections.get(direction, name))
        print_record(record, as_json)
        _warn_cleartext(direction, record)
        stale = sorted(record["undeclared_options"])
        if stale:  # kept, so that a plugin downgraded and upgraded again loses nothing; said, so it is not a mystery
            click.echo(f"mailhost: warning: {word} connection {name!r} holds option(s) {', '.join(stale)}, which "
                       f"protocol {record['protocol']} no longer declares: they are kept but not used; "
                       f"`mailhost {word} edit {name} --option {stale[0]}=` removes one", err=True)

    show.help = f"Show one {word} connection."

    @group.command("remove")
    @click.argument("name")
    @pass_ctx
    def remove(ctx: Context, name: str) -> None:
        ctx.host.connections.remove(direction, name)
        click.echo(f"removed {word} connection {name}", err=True)

    remove.help = f"Remove an {word} connection " + (
        "(the mail it downloaded stays in the queue)." if direction is Direction.INCOMING else
        "(mail still queued for it is retried, and fails unless a connection of that name is added again).")

    @group.command("test")
    @click.argument("name", required=False)
    @options
    @json_option
    @pass_ctx
    def test(ctx: Context, name: str | None, as_json: bool, **opts: Any) -> None:
        spec = _spec(name, opts)
        steps = list(ctx.host.connections.test(direction, name, spec))
        if not _print_steps(steps, as_json):
            raise SystemExit(1)

    test.help = (f"Test an {word} connection step by step: NAME, or the options of add before saving "
                 "(options given with NAME override the stored ones for this test).")


@cli.group()
def incoming() -> None:
    """Incoming mail connections (IMAP, POP3, Graph, ...)."""


@cli.group()
def outgoing() -> None:
    """Outgoing mail connections (SMTP, Graph, ...)."""


_register(Direction.INCOMING, incoming, _incoming_options)
_register(Direction.OUTGOING, outgoing, _outgoing_options)


@incoming.command("enable")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask; enable at once.")
@pass_ctx
def incoming_enable(ctx: Context, name: str, yes: bool) -> None:
    """Enable an incoming connection, after saying how many messages it would download."""
    conn = ctx.host.connections.get(Direction.INCOMING, name)
    if conn.enabled:
        click.echo(f"incoming connection {name} is already enabled", err=True)
        return
    try:
        estimate = ctx.host.incoming.estimate(name)
        what = (f"the next download of {name} would fetch about {estimate.count} message(s) "
                f"(confidence: {estimate.confidence})")
        if estimate.note:
            what += f"; {estimate.note}"
    except (MailError, PluginError) as exc:
        what = f"could not estimate the messages to download ({exc})"
    except MailhostError:
        raise
    except Exception as exc:  # a plugin's bug: it does not keep the connection from being enabled
        logging.getLogger(__name__).debug("estimating %s failed", name, exc_info=True)
        what = f"could not estimate the messages to download ({redact(ctx.host.plugins.unexpected(exc))})"
    click.echo(what, err=True)
    if not yes:
        if not click.get_text_stream("stdin").isatty():
            fail(f"enabling {name} needs confirmation: run it on a terminal or pass --yes")
        again = f"run `mailhost incoming enable {name}` again when ready (--yes does not ask)"
        try:
            confirmed = click.confirm(f"enable {name}?", err=True)
        except click.Abort:  # Ctrl-C, or the end of input: click has not ended the prompt's line
            click.echo(err=True)
            fail(f"interrupted: incoming connection {name} stays disabled; {again}", 130)
        if not confirmed:
            fail(f"incoming connection {name} stays disabled; {again}", 1)
    ctx.host.connections.set_enabled(name, True)
    click.echo(f"enabled incoming connection {name}", err=True)


@incoming.command("disable")
@click.argument("name")
@pass_ctx
def incoming_disable(ctx: Context, name: str) -> None:
    """Disable an incoming connection: no more downloads until enabled."""
    ctx.host.connections.set_enabled(name, False)
    click.echo(f"disabled incoming connection {name}", err=True)


@outgoing.command("set-default")
@click.argument("name")
@pass_ctx
def outgoing_set_default(ctx: Context, name: str) -> None:
    """Make NAME the default outgoing connection."""
    ctx.host.connections.set_default(name)
    click.echo(f"{name} is now the default outgoing connection", err=True)
