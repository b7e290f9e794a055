"""The ``mailhost`` command line: a thin layer over :class:`mailhost.Mailhost`.

The contract is ``shared/CLI.md``: every listing takes ``--json`` (one JSON list on
stdout and nothing else) and ``--limit N``; errors are one sentence on stderr with exit
status 2 for bad input and 1 for a failure while running; secrets never come from the
command line itself.

The commands live by subject: :mod:`.admin` (init, plugins, host overrides),
:mod:`.connections` (incoming and outgoing connections), :mod:`.certs` (certificates),
:mod:`.incoming` (fetch, the
incoming queue and log), :mod:`.delivery` (send, deliver, the outgoing queue),
:mod:`.service` (serve), :mod:`.oauth` (OAuth2 credentials), :mod:`.secrets` (key
rotation). A command's module is
imported only when that command runs (see :data:`COMMAND_MODULES`), so that
``mailhost fetch`` does not pay for certificates, OAuth2 or the outgoing pipeline.
"""
from __future__ import annotations

import errno
import gc
import importlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from ..app import Mailhost, exit_now
from ..errors import MailhostError
from ..secrets import RedactingFilter, redact
from ..store import MAX_INT, MAX_ROWS, json_value, text_value

__all__ = ["cli", "main"]


class Context:
    """What every command gets: the config path and a lazily opened installation."""

    def __init__(self, config: str | None) -> None:
        self.config = config
        self._host: Mailhost | None = None

    @property
    def host(self) -> Mailhost:
        """The installation named by ``--config`` (opened on first use)."""
        if self._host is None:
            self._host = Mailhost.open(self.config)
            if _leaving:
                # What is alive now (modules, the store's tables and mappers) lives as long
                # as the program: out of the cyclic collector's sight, its collections
                # during a pass need not walk ~70,000 objects again (0.02-0.03 s of a
                # 1.5 s fetch). Not in-process (tests, embedding): frozen garbage stays.
                gc.freeze()
        return self._host

    def close(self) -> None:
        """Release the store when the command is done (the program leaves at once after
        it: see :func:`_leave`)."""
        if self._host is not None:
            self._host.close(exiting=_leaving)


pass_ctx = click.make_pass_decorator(Context)


#: Each top-level command, and the modules that define it and its subcommands (``queue``
#: and ``outgoing`` are groups that two modules add to). A new command goes here too;
#: tests/test_plugins.py checks that this map and the modules agree.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "init": ("admin",),
    "plugins": ("admin",),
    "host-overrides": ("admin",),
    "incoming": ("connections",),
    "outgoing": ("connections", "delivery"),
    "certs": ("certs",),
    "fetch": ("incoming",),
    "queue": ("incoming", "delivery"),
    "log": ("incoming",),
    "send": ("delivery",),
    "deliver": ("delivery",),
    "serve": ("service",),
    "oauth": ("oauth",),
    "secrets": ("secrets",),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when the command is looked up
    (click's documented lazy-loading pattern): ``mailhost fetch`` imports the fetch
    command's module and not the others, whose imports (the outgoing pipeline,
    cryptography's X.509, OAuth2) are a large part of the start-up. ``--help`` looks
    every command up, so it imports them all."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module in COMMAND_MODULES.get(cmd_name, ()):
            importlib.import_module(f"{__name__}.{module}")  # its decorators add it to this group
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config", "config", metavar="FILE", envvar="MAILHOST_CONFIG",
    help="The config file (default: $MAILHOST_CONFIG, else ./mailhost.toml).",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug). Secrets are always redacted.")
@click.version_option(package_name="mailhost", prog_name="mailhost")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: int) -> None:
    """mailhost: named mail connections that download into, and deliver from, durable queues."""
    setup_logging(verbose)
    ctx.obj = Context(config)
    ctx.call_on_close(ctx.obj.close)


def setup_logging(verbose: int) -> None:
    """Log to stderr through the redacting filter."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not any(getattr(h, "_mailhost", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        handler._mailhost = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Debug transcripts of connections are INFO records; keep them at -v and above,
    # and always when a connection's Debug attribute is on.
    logging.getLogger("mailhost.transcript").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------
# Output helpers, shared by every command
# ---------------------------------------------------------------------------------------


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``: print one JSON document and nothing else."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text (a list, for a listing).")(f)


def limit_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--limit N``: print at most N rows."""
    return click.option(
        "--limit", type=click.IntRange(1, MAX_ROWS), default=None, metavar="N", help="Print at most N rows."
    )(f)


# The usage line of a group that lists when given no subcommand (``queue incoming``).
# Click marks the subcommand optional by itself only since 8.5: older ones printed it as
# required, so say it here, the same under every click version setup.cfg allows.
OPTIONAL_SUBCOMMAND = "[COMMAND] [ARGS]..."

# A queue item's id: ids are INTEGER columns, so one beyond them is a typo to refuse
# here, not a lookup that the database fails on.
ITEM_ID = click.IntRange(1, MAX_INT)


class _Span(click.FloatRange):
    """A number of days (or another unit) from 0 to 100 years; "nan" parses as a float but is none."""

    def __init__(self, unit: str, most: float) -> None:
        super().__init__(0, most)
        self.unit = unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):  # click would say "not a valid float range"
            number = math.nan
        if math.isnan(number):
            self.fail(f"{value!r} is not a number of {self.unit}: give one from 0 to {self.max:.0f}", param, ctx)
        return super().convert(number, param, ctx)


DAYS = _Span("days", 36500)
MINUTES = _Span("minutes", 36500 * 24 * 60)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout."""
    click.echo(json.dumps(data, indent=2, default=json_value, ensure_ascii=False))


def print_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], as_json: bool, limit: int | None = None,
    empty: str = "nothing to show",
) -> None:
    """A listing: JSON, or an aligned table of ``columns``."""
    rows = list(rows)[:limit] if limit else list(rows)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo(empty, err=True)
        return
    cells = [[text_value(r.get(c), 60) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def print_record(record: Mapping[str, Any], as_json: bool) -> None:
    """One object: JSON, or ``key: value`` lines."""
    if as_json:
        print_json(record)
        return
    width = max((len(k) for k in record), default=0)
    for key, value in record.items():
        click.echo(f"{key.ljust(width)}  {text_value(value, 200)}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Stop with one sentence on stderr."""
    raise _Exit(message, code)


class _Exit(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------
# Secrets: never on the command line itself
# ---------------------------------------------------------------------------------------


def secret_options(prefix: str = "password", what: str = "password") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--{prefix}-env VAR | --{prefix}-file F | --{prefix}-stdin``."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option(f"--{prefix}-stdin", f"{prefix.replace('-', '_')}_stdin", is_flag=True,
                         help=f"Read the {what} from standard input.")(f)
        f = click.option(f"--{prefix}-file", f"{prefix.replace('-', '_')}_file", metavar="F",
                         help=f"Read the {what} from file F.")(f)
        f = click.option(f"--{prefix}-env", f"{prefix.replace('-', '_')}_env", metavar="VAR",
                         help=f"Read the {what} from environment variable VAR.")(f)
        return f

    return decorate


def read_secret(env: str | None, file: str | None, stdin: bool, what: str = "password") -> str | None:
    """The secret from exactly one of the three sources, or ``None`` if none is given.

    An empty secret is refused: it is a variable, file or line that was meant to hold
    one (the store would take "" as "no password" and drop the one it has).
    """
    given = [x for x in (env, file, stdin or None) if x]
    if len(given) > 1:
        fail(f"give the {what} one way only: --*-env, --*-file or --*-stdin")
    keep = f"or leave the option out to give no {what}"
    if env:
        value = os.environ.get(env)
        if value is None:
            fail(f"environment variable {env} is not set: export it with the {what}, or use another source")
        if not value:
            fail(f"environment variable {env} is empty: set it to the {what}, {keep}")
        return value
    if file:
        try:
            value = Path(file).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            fail(f"cannot read the {what} from {file}: {exc.strerror}")
        except UnicodeDecodeError:
            fail(f"the {what} file {file} is not UTF-8 text")
        if not value:
            fail(f"the {what} file {file} is empty: write the {what} into it, {keep}")
        return value
    if stdin:
        if sys.stdin.isatty():
            import getpass

            try:
                value = getpass.getpass(f"{what.capitalize()}: ")
            except KeyboardInterrupt:  # Ctrl-C: before anything was written
                click.echo(err=True)  # getpass has not ended the prompt's line
                fail(f"interrupted while reading the {what}: nothing was changed", 130)
            except EOFError:  # Ctrl-D on an empty line
                click.echo(err=True)
                fail(f"no {what} was read from the terminal (Ctrl-D ends the input): type it and press "
                     f"Enter, {keep}")
        else:
            value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            fail(f"the {what} read from standard input is empty: give it on the first line, {keep}")
        return value
    return None


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> NoReturn:
    """Run the CLI; errors become one sentence on stderr and an exit status.

    Run as the ``mailhost`` program (no ``argv``), the process ends at once when the
    command is done: see :func:`_leave`.
    """
    global _leaving
    _leaving = argv is None
    code = 0
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="mailhost", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of Ctrl-C (KeyboardInterrupt) in a command
        click.echo("mailhost: interrupted", err=True)
        code = 130
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except _NO_COMMAND as exc:  # `mailhost incoming`: the group's help, not dressed as an error
        click.echo(exc.format_message(), err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        click.echo(f"mailhost: {exc.format_message()}", err=True)
        code = exc.exit_code
    except _Exit as exc:
        click.echo(f"mailhost: {exc}", err=True)
        code = exc.code
    except MailhostError as exc:
        click.echo(f"mailhost: {redact(str(exc))}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("mailhost: interrupted", err=True)
        code = 130
    except BrokenPipeError:
        code = 0
    except OSError as exc:
        # Files mailhost writes (config, key, store) say their own errors; an OSError
        # without a file name that runs out of room is the output, redirected to a full disk.
        if exc.filename is not None or exc.errno not in _NO_ROOM:
            code = _unexpected(exc)
        else:
            click.echo(f"mailhost: cannot write the output ({exc.strerror}): make room where it goes, "
                       "then run the command again", err=True)
            code = 1
    except Exception as exc:  # a bug: say so in one line, the traceback on request
        code = _unexpected(exc)
    if _leaving:
        _leave(code)
    sys.exit(code)


def _unexpected(exc: Exception) -> int:
    """A bug: say so in one line, the traceback on request."""
    if os.environ.get("MAILHOST_DEBUG"):
        click.echo(redact(traceback.format_exc()), err=True)
    click.echo(
        f"mailhost: unexpected error {type(exc).__name__}: {redact(str(exc))} "
        "(set MAILHOST_DEBUG=1 for the traceback, and please report it)",
        err=True,
    )
    return 1


_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_leaving = False  # main() runs as the program and will end with _leave()
#: A group run without its command (click >= 8.2 raises it; 8.1 prints the help itself).
_NO_COMMAND: type[click.ClickException] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _leave(code: int) -> NoReturn:
    """End the program without the interpreter's teardown.

    Everything a command did is committed (durably: SQLite in WAL mode with
    ``synchronous=FULL``) before it returns, so tearing down the interpreter only
    costs time: after a download of 20,000 messages, freeing every object and the
    checkpoint SQLite runs when its last connection closes took 0.1-0.2 s of a 2 s
    ``mailhost fetch``. The SQLite write-ahead log stays; the next writer checkpoints it
    (or, if no process has the store open, the next one to open it reads it back in).
    Network stores were closed with the command (:meth:`Context.close`), so that their
    servers saw a clean goodbye.
    """
    exit_now(code)
