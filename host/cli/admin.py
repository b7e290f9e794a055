"""``mailhost init``, ``mailhost plugins``, ``mailhost host-overrides``."""
from __future__ import annotations

import click

from ..app import Mailhost
from ..config import Config
from ..plugins import BUILTIN, OPTION_COLUMNS, installed_plugin_names
from . import Context, cli, fail, json_option, limit_option, pass_ctx, print_rows


@cli.command()
@click.option("--database", "database_url", metavar="URL",
              help="sqlite:///FILE (default sqlite:///mailhost.db) or postgresql+psycopg://USER@HOST/DB.")
@pass_ctx
def init(ctx: Context, database_url: str | None) -> None:
    """Write a starter config and secret key, and create (or upgrade) the store."""
    host = Mailhost.init(ctx.config, database_url)
    click.echo(f"config:   {host.config.path}", err=True)
    click.echo(f"store:    {host.engine.url.render_as_string(hide_password=True)}", err=True)
    key = "from $MAILHOST_SECRET_KEY" if not host.config.key_file.exists() else str(host.config.key_file)
    click.echo(f"key:      {key} (keep a copy: stored secrets need it)", err=True)


@cli.group()
def plugins() -> None:
    """List, enable and disable plugins."""


@plugins.command("list")
@json_option
@limit_option
@pass_ctx
def plugins_list(ctx: Context, as_json: bool, limit: int | None) -> None:
    """Every installed plugin: distribution, version, state and what it provides."""
    rows = [p.as_dict() for p in ctx.host.plugins.plugins.values()]
    for row in rows:
        if row["state"] == "failed":
            row["provides"] = row["error"]
        else:
            row["provides"] = ", ".join(row["protocols"] + row["after_download_actions"] + row["oauth_providers"]
                                        + row["host_overrides"] or row["hooks"])
    print_rows(rows, ["name", "distribution", "version", "state", "provides"], as_json, limit)


@plugins.command("options")
@click.option("--protocol", metavar="NAME", help="Only this protocol's options (e.g. imap, smtp, graph).")
@json_option
@limit_option
@pass_ctx
def plugins_options(ctx: Context, protocol: str | None, as_json: bool, limit: int | None) -> None:
    """The options each protocol declares (type, default, choices, bounds), for `--option NAME=VALUE` on its
    connections."""
    plugins = ctx.host.plugins
    print_rows(plugins.option_rows(protocol),
               list(OPTION_COLUMNS), as_json, limit,
               empty=f"protocol {protocol} takes no options" if protocol else "no protocol declares options")


def _set_plugin(ctx: Context, name: str, enabled: bool) -> None:
    config = Config.load(ctx.config)
    if name == BUILTIN:
        if enabled:  # already what was asked: not an error
            click.echo(f"plugin {BUILTIN} is part of mailhost and always enabled; nothing to change", err=True)
            return
        fail(f"the {BUILTIN} plugin is part of mailhost and cannot be disabled: disable the plugins you do not want "
             "by name (`mailhost plugins list` shows them)")
    installed = installed_plugin_names()  # without importing any: a disabled one stays unimported
    if name not in installed:
        fail(f"no plugin named {name!r} is installed: installed plugins are {', '.join(installed) or 'none'}")
    config.set_plugin_state(name, enabled)
    state = "enabled" if enabled else "disabled"
    click.echo(f"plugin {name} {state} in {config.path}; it takes effect when mailhost next starts", err=True)
    if config.plugins_enabled == [BUILTIN]:
        click.echo(f"[plugins] enabled now names only {BUILTIN}: no installed plugin is loaded until you enable one",
                   err=True)


@plugins.command("enable")
@click.argument("name")
@pass_ctx
def plugins_enable(ctx: Context, name: str) -> None:
    """Enable plugin NAME (edits the config file)."""
    _set_plugin(ctx, name, True)


@plugins.command("disable")
@click.argument("name")
@pass_ctx
def plugins_disable(ctx: Context, name: str) -> None:
    """Disable plugin NAME (edits the config file); it is then never imported."""
    _set_plugin(ctx, name, False)


@cli.command("host-overrides")
@click.option("--provider", metavar="NAME", help="Only this provider (e.g. microsoft).")
@click.option("--protocol", metavar="NAME", help="Only this protocol (e.g. imap, smtp, graph).")
@json_option
@limit_option
@pass_ctx
def host_overrides(ctx: Context, provider: str | None, protocol: str | None, as_json: bool, limit: int | None) -> None:
    """Predefined hosts per provider and protocol, from the plugins."""
    overrides = ctx.host.plugins.host_overrides
    if protocol is not None:  # in any case, as everywhere
        protocol = ctx.host.plugins.protocol_name(protocol) or protocol
    for what, value in (("provider", provider), ("protocol", protocol)):
        known = sorted({getattr(o, what) for o in overrides})
        if value is not None and value not in known:  # a typo, not "none match"
            fail(f"no host overrides for {what} {value!r}: choose one of {', '.join(known) or 'none installed'}")
    rows = [
        {
            "provider": o.provider, "protocol": o.protocol, "name": o.name, "title": o.title,
            "host": o.host, "port": o.port, "authority": o.authority, "scopes": list(o.scopes),
            "plugin": o.plugin,
        }
        for o in overrides
        if (provider is None or o.provider == provider) and (protocol is None or o.protocol == protocol)
    ]
    print_rows(rows, ["provider", "protocol", "name", "host", "title"], as_json, limit,
               empty="no host overrides match (install a plugin that provides them)")
