"""``mailhost certs ...``: PKCS#12 certificates for decrypting S/MIME mail at ingest."""
from __future__ import annotations

import click

from ..certs import certificate_dict
from . import (
    Context,
    cli,
    json_option,
    limit_option,
    pass_ctx,
    print_json,
    print_rows,
    read_secret,
    secret_options,
)


@cli.group()
def certs() -> None:
    """Certificates that incoming connections decrypt S/MIME mail with (attach them
    with `mailhost incoming add/edit --certificate NAME`)."""


@certs.command("add")
@click.argument("name")
@click.option("--file", "file", required=True, metavar="PKCS12", help="The .p12 / .pfx file: certificate and private key.")
@secret_options("password", "PKCS#12 password")
@secret_options("key-password", "private key's own password")
@click.option("--alias", metavar="ALIAS", help="Another name to find it by, e.g. the mailbox address.")
@json_option
@pass_ctx
def certs_add(
    ctx: Context, name: str, file: str, password_env: str | None, password_file: str | None, password_stdin: bool,
    key_password_env: str | None, key_password_file: str | None, key_password_stdin: bool, alias: str | None,
    as_json: bool,
) -> None:
    """Add the certificate and private key of a PKCS#12 file as NAME.

    Give --key-password-* only when the private key has a password of its own
    (`openssl pkcs12 -twopass`). With both --password-stdin and --key-password-stdin, the first line read is the
    file's password and the second the private key's.
    """
    password = read_secret(password_env, password_file, password_stdin, "PKCS#12 password")
    key_password = read_secret(key_password_env, key_password_file, key_password_stdin, "private key password")
    row = ctx.host.certificates.add(name, file, password=password, key_password=key_password, alias=alias)
    if as_json:
        print_json(certificate_dict(row))
    else:
        click.echo(f"added certificate {row.name} ({row.subject}, valid until {row.not_after:%Y-%m-%d}): "
                   f"attach it with `mailhost incoming edit CONNECTION --certificate {row.name}`", err=True)


@certs.command("list")
@click.option("--search", metavar="TEXT", help="Match name or alias.")
@json_option
@limit_option
@pass_ctx
def certs_list(ctx: Context, search: str | None, as_json: bool, limit: int | None) -> None:
    """List certificates: subject, issuer, serial, validity and the connections using each."""
    rows = [certificate_dict(c) for c in ctx.host.certificates.list(search)]
    print_rows(rows, ["name", "alias", "subject", "serial", "not_after", "expired", "connections"], as_json, limit,
               empty="no certificates" + (" match" if search else ""))


@certs.command("remove")
@click.argument("name")
@click.option("--detach", is_flag=True, help="Also detach it from the connections that use it.")
@pass_ctx
def certs_remove(ctx: Context, name: str, detach: bool) -> None:
    """Remove a certificate (refused while connections use it, unless --detach).

    The connections it is detached from keep downloading: mail encrypted only for it
    is stored as downloaded, not decrypted, and flagged where other certificates are
    attached (docs/smime.md).
    """
    removal = ctx.host.certificates.remove(name, detach=detach)
    if not removal.detached:
        click.echo(f"removed certificate {name}", err=True)
        return
    click.echo(f"removed certificate {name}, detached from {', '.join(removal.detached)}", err=True)
    flagging, bare = removal.flagging, removal.bare
    fates = []
    if flagging:
        fates.append(f"{', '.join(flagging)} flag{'s' if len(flagging) == 1 else ''} it with the reason")
    if bare:
        fates.append(f"{', '.join(bare)} {'has' if len(bare) == 1 else 'have'} no certificate left and "
                     f"{'does' if len(bare) == 1 else 'do'} not flag it")
    click.echo(f"from now on, mail encrypted only for {name} is stored as downloaded, not decrypted (attaching "
               f"a certificate later does not decrypt it): {'; '.join(fates)}", err=True)
