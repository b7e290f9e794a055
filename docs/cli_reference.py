"""Write docs/cli.md, the reference of every ``mailhost`` command, from the CLI itself.

    python docs/cli_reference.py          # rewrite docs/cli.md
    python docs/cli_reference.py --check  # exit 1 if docs/cli.md is out of date

tests/test_docs.py runs the check, so the reference cannot drift from the code.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
TARGET = HERE / "cli.md"

HEAD = """# The `mailhost` command line, command by command

Generated from the CLI by `python docs/cli_reference.py`; do not edit by hand.
[../README.md](../README.md) shows the commands at work. Every listing takes `--json`
(one JSON document on stdout) and `--limit N`; every error is one sentence on stderr,
exit status 2 for bad usage or input and 1 for a failure while running. Secrets are
read from `--*-env VAR`, `--*-file FILE` or `--*-stdin`, never from the command line.

Beyond the contract every mailhost keeps (the names in the design's CLI contract),
this version adds: `send --bcc/--from`, `deliver --sessions/--connection`,
`queue outgoing --connection`, `queue outgoing show|purge`, `queue incoming purge|release`,
`log incoming --messages`, `oauth edit`, `certs remove --detach`,
`incoming edit --no-certificates`, `serve --once/--download-workers`,
`incoming|outgoing add|edit|test --option NAME=VALUE` (options a protocol declares),
`plugins options` and `secrets rotate|drop-old` (key rotation).
"""


def _commands(group: click.Group, ctx: click.Context, prefix: list[str]) -> list[tuple[list[str], click.Command]]:
    found: list[tuple[list[str], click.Command]] = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        path = [*prefix, name]
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _commands(command, click.Context(command, parent=ctx, info_name=name), path)
    return found


def _option(param: click.Parameter, ctx: click.Context) -> tuple[str, str] | None:
    record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
    if record is None or record[0] in ("--help", "-h, --help"):
        return None
    names, help_text = record
    return names.replace("|", "\\|"), " ".join(help_text.split()).replace("|", "\\|")


def render() -> str:
    from mailhost.cli import cli

    root = click.Context(cli, info_name="mailhost")
    lines = [HEAD]
    global_options = [o for o in (_option(p, root) for p in cli.get_params(root)) if o]
    lines += ["## Global options", "", "| option | |", "|---|---|"]
    lines += [f"| `{names}` | {text} |" for names, text in global_options]
    for path, command in _commands(cli, root, []):
        ctx = click.Context(command, info_name=" ".join(["mailhost", *path]))
        lines += ["", f"## mailhost {' '.join(path)}", ""]
        lines += ["```", " ".join(command.collect_usage_pieces(ctx)).join([f"mailhost {' '.join(path)} ", ""]), "```", ""]
        help_text = (command.help or "").strip()
        if help_text:
            lines += [inspect.cleandoc(help_text.split("\f")[0]), ""]
        options = [o for o in (_option(p, ctx) for p in command.get_params(ctx)) if o]
        if options:
            lines += ["| option | |", "|---|---|"]
            lines += [f"| `{names}` | {text} |" for names, text in options]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is out of date: run python docs/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
