"""``mailhost oauth ...``: OAuth2 credentials, their authorization and their tokens."""
from __future__ import annotations

import webbrowser
from collections.abc import Callable
from typing import Any

import click

from ..oauth import CredentialSpec
from ..oauth_providers import FLOWS, Interaction
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


@cli.group()
def oauth() -> None:
    """OAuth2 credentials: client registrations, their authorization and their tokens."""


def _credential_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--provider", metavar="NAME",
                     help="microsoft, google, oidc, or one a plugin adds (see `mailhost plugins list`)."),
        click.option("--client-id", metavar="ID", help="The application (client) ID of the app registration."),
        secret_options("client-secret", "client secret"),
        click.option("--tenant", metavar="TENANT", help="Microsoft: the directory (tenant) ID or domain; "
                     "default organizations (any work account); app-only access needs yours."),
        click.option("--authority", metavar="URL", help="The sign-in authority (OpenID Connect: the issuer). "
                     "Microsoft: also a cloud by name: global, gcc-high, dod, china."),
        click.option("--authorization-endpoint", metavar="URL", help="Override the authorization endpoint."),
        click.option("--token-endpoint", metavar="URL", help="Override the token endpoint."),
        click.option("--scope", "scopes", multiple=True, metavar="SCOPE",
                     help="A scope to ask for (repeatable); default: the provider's mail scopes (Microsoft: "
                          "Exchange Online's IMAP, POP and SMTP; Microsoft Graph connections need Graph's, "
                          "e.g. https://graph.microsoft.com/.default for app-only access)."),
        click.option("--flow", type=click.Choice(FLOWS),
                     help="authorization-code (default: a browser, redirect to 127.0.0.1), device-code "
                          "(a code entered on another device) or client-credentials (app-only, no user)."),
        click.option("--ca-file", metavar="PATH", help="Also trust this PEM CA for the provider's endpoints."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _spec(name: str | None, opts: dict[str, Any]) -> CredentialSpec:
    secret = read_secret(opts.pop("client_secret_env"), opts.pop("client_secret_file"),
                         opts.pop("client_secret_stdin"), what="client secret")
    scopes = opts.pop("scopes") or None
    return CredentialSpec(name=name, client_secret=secret, scopes=list(scopes) if scopes else None, **opts)


_COLUMNS = ["name", "provider", "client_id", "flow", "authorized", "token_expires_at", "last_error"]


def _row(ctx: Context, cred: Any) -> dict[str, Any]:
    row = ctx.host.oauth.as_dict(cred)
    row["authorized"] = ", ".join(a["username"] or "(app)" for a in row["authorizations"]) or None
    return row


@oauth.command("add")
@click.argument("name")
@_credential_options
@json_option
@pass_ctx
def oauth_add(ctx: Context, name: str, as_json: bool, **opts: Any) -> None:
    """Add an OAuth2 credential named NAME; then authorize it with `mailhost oauth authorize`."""
    defaults = not opts.get("scopes")
    cred = ctx.host.oauth.add(_spec(name, opts))
    if as_json:
        print_json(ctx.host.oauth.as_dict(cred))
    else:
        click.echo(f"added OAuth2 credential {cred.name} ({cred.provider}, {cred.flow}): authorize it with "
                   f"`mailhost oauth authorize {cred.name}"
                   + ("`" if cred.flow == "client-credentials" else " --username USER`"), err=True)
        if defaults and cred.provider == "microsoft":
            click.echo("note: with the default scopes its tokens are for Exchange Online's IMAP, POP and SMTP; "
                       "Microsoft Graph connections need a credential with Graph's scopes, such as "
                       "--scope https://graph.microsoft.com/.default", err=True)


@oauth.command("edit")
@click.argument("name")
@click.option("--name", "new_name", metavar="NEW", help="Rename the credential.")
@_credential_options
@json_option
@pass_ctx
def oauth_edit(ctx: Context, name: str, new_name: str | None, as_json: bool, **opts: Any) -> None:
    """Change an OAuth2 credential, e.g. store a new client secret when the old one expired.

    Another app or other scopes drop the stored tokens: the text says whose, and --json
    lists those authorizations as they were under `dropped_authorizations`."""
    spec = _spec(new_name, opts)
    if all(value is None for value in vars(spec).values()):
        ctx.host.oauth.get(name)  # a typo in the name is said as such
        fail(f"nothing to change in OAuth2 credential {name}: give the options to change "
             "(`mailhost oauth edit --help` lists them)")
    cred, dropped = ctx.host.oauth.edit(name, spec)
    if as_json:  # what the text says on stderr, for scripts: the authorizations to sign in again
        print_json({**ctx.host.oauth.as_dict(cred), "dropped_authorizations": dropped})
        return
    again = ""
    if dropped:
        users = [a["username"] for a in dropped if not a["app_only"]]
        whose = " and ".join(([f"the tokens of {', '.join(users)}"] if users else [])
                             + (["its app-only token"] if len(users) < len(dropped) else []))
        were, they = ("was", "it") if not users else ("were", "they")
        again = f": {whose} {were} for another app or other scopes, so {they} {were} dropped; " + (
            "the next one is fetched when a connection needs it" if cred.flow == "client-credentials" else
            f"authorize it again with `mailhost oauth authorize {cred.name} --username USER`")
    click.echo(f"changed OAuth2 credential {cred.name}{again}", err=True)


@oauth.command("list")
@json_option
@limit_option
@pass_ctx
def oauth_list(ctx: Context, as_json: bool, limit: int | None) -> None:
    """List OAuth2 credentials, who they are authorized for, and their token state."""
    rows = [_row(ctx, c) for c in ctx.host.oauth.list()]
    print_rows(rows, _COLUMNS, as_json, limit, empty="no OAuth2 credentials (add one with `mailhost oauth add`)")


@oauth.command("show")
@click.argument("name")
@json_option
@pass_ctx
def oauth_show(ctx: Context, name: str, as_json: bool) -> None:
    """Show one OAuth2 credential: settings, authorizations, expiry, last error; never a secret."""
    record = ctx.host.oauth.as_dict(ctx.host.oauth.get(name))
    if as_json:
        print_json(record)
        return
    authorizations = record.pop("authorizations")
    print_record(record, False)
    for a in authorizations:
        click.echo(f"\nauthorization {a['username'] or '(app-only)'}")
        print_record({k: v for k, v in a.items() if k not in ("username", "app_only")}, False)


@oauth.command("remove")
@click.argument("name")
@pass_ctx
def oauth_remove(ctx: Context, name: str) -> None:
    """Remove an OAuth2 credential and its tokens (refused while connections use it)."""
    ctx.host.oauth.remove(name)
    click.echo(f"removed OAuth2 credential {name}", err=True)


@oauth.command("authorize")
@click.argument("name")
@click.option("--username", metavar="USER",
              help="The mailbox login the tokens are for (a connection's --username); default: who signs in.")
@click.option("--no-browser", is_flag=True, help="Do not open a browser; print the URL to open elsewhere.")
@click.option("--redirect-port", type=click.IntRange(0, 65535), default=0, metavar="PORT",
              help="The port of the redirect to http://127.0.0.1:PORT/ (default: any free one).")
@click.option("--timeout", type=click.IntRange(min=10), default=300, metavar="SECONDS",
              help="How long to wait for the sign-in (default 300).")
@json_option
@pass_ctx
def oauth_authorize(ctx: Context, name: str, username: str | None, no_browser: bool, redirect_port: int,
                    timeout: int, as_json: bool) -> None:
    """Run the credential's flow (a browser sign-in, a device code, or app-only) and store the tokens."""
    interaction = Interaction(
        show=lambda line: click.echo(line, err=True),
        open_url=None if no_browser else webbrowser.open,
        redirect_port=redirect_port,
        timeout=float(timeout),
    )
    result = ctx.host.oauth.authorize(name, username, interaction)
    if as_json:
        print_json(result)
        return
    who = result["username"] or "app-only access"
    expires = result["expires_at"].isoformat(sep=" ", timespec="seconds")
    click.echo(f"authorized {name} for {who}; the access token expires at {expires} and is renewed "
               "automatically", err=True)
    if result["identity"] and result["username"] and result["identity"].lower() != result["username"].lower():
        click.echo(f"note: signed in as {result['identity']}, stored for {result['username']}: connections with "
                   f"--username {result['username']} use it", err=True)
