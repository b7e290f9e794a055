"""The config file: where the store is, which plugins run, where the secret key lives.

``--config FILE``, else ``$MAILHOST_CONFIG``, else ``./mailhost.toml``. Relative paths in
the file (the SQLite database, the key file) are relative to the file's folder, so a
config works from any working directory. The file is read with the standard library's
tomllib (fast: every command reads it) and edited with tomlkit so that an admin's
comments survive ``mailhost plugins enable``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import math
import os
import random
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

__all__ = ["Config", "DEFAULT_CONFIG_NAME", "Policy", "config_path", "listen_address", "write_starter_config"]

DEFAULT_CONFIG_NAME = "mailhost.toml"

STARTER = """\
# mailhost configuration. Relative paths are relative to this file's folder.

[store]
# sqlite:///mailhost.db (embedded, the default) or
# postgresql+psycopg://user@host/dbname (many workers on many machines)
url = "{url}"

[secrets]
# The key that encrypts passwords, client secrets, tokens and private keys at rest.
# $MAILHOST_SECRET_KEY takes precedence. Keep a copy: without it, stored secrets are lost.
# `mailhost secrets rotate` replaces it (the file then holds several keys, newest first).
key_file = "mailhost.key"

[plugins]
# Plugins are entry points in the group "mailhost". Empty "enabled" means all installed;
# ["builtin"] means none but mailhost's own.
enabled = []
disabled = []

[service]
# Seconds between delivery passes of `mailhost serve`.
delivery_interval = 10
# Parallel SMTP sessions when the outgoing queue is long.
delivery_sessions = 4

[incoming]
# A queue item a handler marked "processing" and did not move on within this many
# minutes (its handler died, presumably) is put back to "new" by `mailhost serve`, so
# another handler takes it; a handler that needs longer sets "processing" again to
# renew it. 0: never (release them with `mailhost queue incoming release`).
processing_timeout_minutes = 60

[outgoing]
# Temporary failures (4xx, timeouts, dropped links) are retried after
# retry_base_seconds, doubling up to retry_max_seconds, with jitter; a message fails
# after max_attempts attempts or max_age_hours since it was queued (0: no age limit).
retry_base_seconds = 60
retry_max_seconds = 3600
max_attempts = 20
max_age_hours = 24
# One more parallel session per this many due messages, up to delivery_sessions.
messages_per_session = 100
# Sent messages are kept for audit this many days (0: forever).
keep_sent_days = 30

[web]
# The web admin of `mailhost serve`: HOST:PORT (IPv6 in brackets, like "[::1]:8025");
# set listen = "" to turn it off.
listen = "127.0.0.1:8025"
# It answers only requests addressed to localhost, 127.0.0.1, [::1], the listen address
# or a name listed here (a guard against DNS rebinding): the names of a proxy in front.
allowed_hosts = []
"""


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the explicit one, ``$MAILHOST_CONFIG``, or ./mailhost.toml."""
    chosen = explicit or os.environ.get("MAILHOST_CONFIG") or DEFAULT_CONFIG_NAME
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True)
class Policy:
    """How the pipeline retries and shares work; ``[outgoing]`` in the config file.

    The delay before attempt ``n + 1`` is ``min(retry_max, retry_base * 2 ** (n - 1))``,
    scaled by a random factor in [0.5, 1) so that a server's queue of failures does not
    come back all at once, and never shorter than a delay the server asked for. A
    message is given up (``failed``) after ``max_attempts`` attempts or ``max_age``
    since it was queued (or queued again by an admin), whichever comes first. A zero
    ``max_age_hours`` or ``keep_sent_days`` means no limit.
    """

    retry_base: float = 60.0
    retry_max: float = 3600.0
    max_attempts: int = 20
    max_age: dt.timedelta | None = dt.timedelta(hours=24)  # None: no age limit
    lease: dt.timedelta = dt.timedelta(minutes=10)
    batch: int = 50  # messages per claim
    per_session: int = 100  # a further parallel session per this many due messages
    keep_sent: dt.timedelta | None = dt.timedelta(days=30)  # sent mail kept for audit

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: object = "the config file") -> Policy:
        """Read ``[outgoing]``; a bad value is a ConfigError naming the key."""
        table = raw.get("outgoing", {}) or {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"[outgoing] in {where} must be a table")
        known = {"retry_base_seconds", "retry_max_seconds", "max_attempts", "max_age_hours", "lease_seconds",
                 "batch", "messages_per_session", "keep_sent_days"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"[outgoing] in {where} has unknown keys {unknown}: use {sorted(known)}")

        def number(key: str, default: float, low: float, high: float, integer: bool = False) -> float:
            # TOML reads inf, nan and 1e300 as floats: each would end a pass as an
            # "unexpected error" (a timedelta or an int of it overflows), so bound them.
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                    or (integer and int(value) != value):
                kind = "a whole number" if integer else "a number"
                raise ConfigError(f"[outgoing] {key} in {where} must be {kind} from {low:g} to {high:.0f}, "
                                  f"not {value!r}")
            return float(value)

        year = 365 * 86400
        keep = number("keep_sent_days", 30, 0, 36500)
        age = number("max_age_hours", 24, 0, 100 * 365 * 24)
        return cls(
            retry_base=number("retry_base_seconds", 60, 0, year),
            retry_max=number("retry_max_seconds", 3600, 0, year),
            max_attempts=int(number("max_attempts", 20, 1, 1_000_000, True)),
            max_age=dt.timedelta(hours=age) if age else None,
            lease=dt.timedelta(seconds=number("lease_seconds", 600, 5, 7 * 86400)),
            batch=int(number("batch", 50, 1, 100_000, True)),
            per_session=int(number("messages_per_session", 100, 1, 1_000_000, True)),
            keep_sent=dt.timedelta(days=keep) if keep else None,
        )

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        delay = min(self.retry_max, self.retry_base * 2.0 ** min(max(0, attempts - 1), 60))
        delay *= 0.5 + random.random() / 2
        return max(delay, retry_after or 0.0)


@dataclass
class Config:
    """The parsed config file, with paths resolved."""

    path: Path
    database_url: str
    key_file: Path
    plugins_enabled: list[str] = field(default_factory=list)
    plugins_disabled: list[str] = field(default_factory=list)
    protocol_choices: dict[str, str] = field(default_factory=dict)
    delivery_interval: float = 10.0
    delivery_sessions: int = 4
    web_listen: str = "127.0.0.1:8025"
    web_allowed_hosts: list[str] = field(default_factory=list)
    #: How long an incoming item may stay ``processing`` before ``serve`` puts it back to
    #: ``new``; None: never.
    processing_timeout: dt.timedelta | None = dt.timedelta(minutes=60)
    #: ``[outgoing]``: how the outgoing pipeline retries and shares work.
    outgoing: Policy = field(default_factory=Policy)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def sqlite_file(self) -> Path | None:
        """The store's file, for an SQLite store."""
        parsed = make_url(self.database_url)
        return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None

    @classmethod
    def load(cls, explicit: str | os.PathLike[str] | None = None) -> Config:
        """Read and check the config file; a missing or broken one is a ConfigError."""
        path = config_path(explicit)
        if not path.exists():
            raise ConfigError(
                f"no config file at {path}: run `mailhost init` there first, "
                "or pass --config FILE (or set MAILHOST_CONFIG)"
            )
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give the config file, like {path / 'mailhost.toml'}")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the config file {path} is not valid TOML ({exc}): fix it") from exc
        except OSError as exc:
            raise ConfigError(f"the config file {path} cannot be read ({exc.strerror or exc}): "
                              "check its permissions") from None
        return cls.from_dict(path, doc)

    @classmethod
    def from_dict(cls, path: Path, doc: dict[str, Any]) -> Config:
        """Build a Config from parsed TOML, checking each value."""
        base = path.parent
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:  # a typo would otherwise leave the setting at its default, unseen
            raise ConfigError(f"{path} has unknown sections {unknown}: use {list(SECTIONS)}")
        for section, keys in SECTIONS.items():
            table = doc.get(section)
            wrong = sorted(set(table) - keys) if isinstance(table, dict) and keys else []
            if wrong:
                raise ConfigError(f"[{section}] in {path} has unknown keys {wrong}: use {sorted(keys)}")
        store = _table(doc, "store", path)
        url = os.environ.get("MAILHOST_DATABASE_URL") or store.get("url") or "sqlite:///mailhost.db"
        url = resolve_database_url(str(url), base, path)
        secrets = _table(doc, "secrets", path)
        key_name = secrets.get("key_file", "mailhost.key")
        if not isinstance(key_name, str) or not key_name.strip():
            raise ConfigError(f"[secrets] key_file in {path} must be the path of the key file, like "
                              f"\"mailhost.key\", not {key_name!r}")
        key_file = Path(key_name).expanduser()
        plugins = _table(doc, "plugins", path)
        enabled = _strings(plugins.get("enabled", []), "plugins.enabled", path, '["imap"]', "plugin names")
        disabled = _strings(plugins.get("disabled", []), "plugins.disabled", path, '["imap"]', "plugin names")
        choices = plugins.get("protocols", {})
        if not isinstance(choices, dict):
            raise ConfigError(f"[plugins.protocols] in {path} must be a table of protocol = plugin")
        service = _table(doc, "service", path)
        incoming = _table(doc, "incoming", path)
        timeout = _number(incoming, "processing_timeout_minutes", 60, path, section="incoming", unit="minutes",
                          zero="never", most=52_560_000)
        web = _table(doc, "web", path)
        interval = _number(service, "delivery_interval", 10, path)
        sessions = int(_number(service, "delivery_sessions", 4, path, whole=True))
        return cls(
            path=path,
            database_url=url,
            key_file=key_file if key_file.is_absolute() else base / key_file,
            plugins_enabled=enabled,
            plugins_disabled=disabled,
            protocol_choices={str(k): str(v) for k, v in choices.items()},
            delivery_interval=interval,
            delivery_sessions=sessions,
            web_listen=_checked_listen(web.get("listen", "127.0.0.1:8025"), path),
            web_allowed_hosts=_strings(web.get("allowed_hosts", []), "[web] allowed_hosts", path,
                                       '["mailhost.example.org"]'),
            processing_timeout=dt.timedelta(minutes=timeout) if timeout else None,
            outgoing=Policy.from_config(doc, path),
            raw=doc,
        )

    def set_plugin_state(self, name: str, enabled: bool) -> None:
        """Enable or disable a plugin by editing the config file, keeping its comments."""
        import tomlkit  # round-trips comments and layout; only this edit needs it

        doc = tomlkit.parse(self.path.read_text(encoding="utf-8"))
        plugins = doc.setdefault("plugins", tomlkit.table())
        on = [n for n in plugins.get("enabled", []) if n != name]
        off = [n for n in plugins.get("disabled", []) if n != name]
        if enabled:
            # With an allowlist in force, enabling means joining it.
            if on:
                on.append(name)
        else:
            if plugins.get("enabled") and not on:
                from .plugins import BUILTIN  # the host's own plugin: always loaded, so naming it allows nothing more

                # An empty list means "every installed plugin": disabling the last allowed
                # plugin must leave the others off, as they were, not turn them all on.
                on = [BUILTIN]
            off.append(name)
        plugins["enabled"] = on
        plugins["disabled"] = off
        try:
            _atomic_write(self.path, tomlkit.dumps(doc))
        except OSError as exc:  # a folder this user may not write (a service account), a full disk
            folder = Path(os.path.realpath(self.path)).parent
            raise ConfigError(f"cannot write the config file {self.path} ({exc.strerror or exc}): mailhost writes "
                              f"a new file in its folder {folder} and renames it over the old one, so make that "
                              "folder writable for this user, or edit [plugins] yourself; nothing was "
                              "changed") from None
        self.plugins_enabled, self.plugins_disabled = on, off


#: The config file's sections and their keys (``[outgoing]``'s are checked by
#: :meth:`Policy.from_config`).
SECTIONS: dict[str, frozenset[str]] = {
    "store": frozenset({"url"}),
    "secrets": frozenset({"key_file"}),
    "plugins": frozenset({"enabled", "disabled", "protocols"}),
    "service": frozenset({"delivery_interval", "delivery_sessions"}),
    "incoming": frozenset({"processing_timeout_minutes"}),
    "outgoing": frozenset(),
    "web": frozenset({"listen", "allowed_hosts"}),
}


def resolve_database_url(url: str, base: Path, path: Path | None = None) -> str:
    """Check a database URL and make a relative SQLite path relative to ``base``."""
    shown = _without_password(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"the database URL {shown!r}{where} is not valid: use sqlite:///FILE "
            "or postgresql+psycopg://USER@HOST/DB"
        ) from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"the database URL {shown!r} uses {backend!r}: mailhost supports sqlite and postgresql"
        )
    if backend == "postgresql" and "+" in parsed.drivername and parsed.get_driver_name() != "psycopg":
        raise ConfigError(f"the database URL {shown!r} asks for the driver {parsed.get_driver_name()!r}: "
                          "mailhost uses psycopg 3, so write postgresql+psycopg://USER@HOST/DB")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file::memory:"):
            raise ConfigError(f"the database URL {url!r} is an in-memory SQLite store, which keeps nothing: "
                              "give a file, like sqlite:///mailhost.db")
        db = Path(parsed.database).expanduser()
        if not db.is_absolute():
            db = base / db
        if db.is_dir() or not db.parent.is_dir():
            raise ConfigError(f"the database URL {url!r} names {db}, "
                              + ("a folder" if db.is_dir() else f"in a folder that does not exist ({db.parent})")
                              + ": give the path of a file, like sqlite:///mailhost.db")
        url = parsed.set(database=str(db)).render_as_string(hide_password=False)
    return url


def _without_password(url: str) -> str:
    """``url`` for a message: a password in it (``USER:PASSWORD@``) shown as ``***``.

    Done on the text, since a URL this mentions may be one SQLAlchemy cannot parse."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def write_starter_config(path: Path, database_url: str | None) -> None:
    """Write a new config file; refuses to overwrite one (an admin's file is precious)."""
    if path.exists():
        raise ConfigError(f"{path} already exists: edit it, or pass --config for a new one")
    url = database_url or "sqlite:///mailhost.db"
    resolve_database_url(url, path.parent)  # fail before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, STARTER.format(url=url.replace('"', '\\"')))


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step, keeping what the admin set on it.

    A symlink stays a link: its target is rewritten. The new file gets the old one's
    mode, and its owner when we run as root (its group too, when we may), since the
    file can hold a database password; a new file is 0600 for the same reason.
    """
    import tempfile  # only edits need it, and every command reads this module

    target = Path(os.path.realpath(path))
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fd, stat.S_IMODE(old.st_mode) if old else 0o600)
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.fchown(fd, old.st_uid if os.geteuid() == 0 else -1, old.st_gid)
            fh.write(text)
            fh.flush()
            os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def listen_address(listen: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` listen address (IPv6 in brackets: ``[::1]:8025``;
    no host means 127.0.0.1); a ValueError says what is wrong."""
    if listen.startswith("["):
        name, sep, port = listen[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address needs its port after the bracket, like [::1]:8025")
        try:
            if ipaddress.ip_address(name).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{name!r} in brackets is not an IPv6 address") from None
    else:
        name, sep, port = listen.rpartition(":")
        if not sep:
            raise ValueError("it has no port")
        if ":" in name:
            raise ValueError("an IPv6 address goes in brackets, like [::1]:8025")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"the port {port!r} is not a number from 1 to 65535")
    return name or "127.0.0.1", int(port)


def _checked_listen(value: Any, path: Path) -> str:
    """[web] listen, checked: "" (no web admin) or HOST:PORT."""
    if value == "":
        return ""
    try:
        if not isinstance(value, str):
            raise ValueError("it is not a string")
        listen_address(value)
    except ValueError as exc:
        raise ConfigError(f"[web] listen = {value!r} in {path} is not valid ({exc}): use HOST:PORT with a port "
                          "from 1 to 65535, like \"127.0.0.1:8025\" or \"[::1]:8025\", or \"\" to turn the web "
                          "admin off") from None
    return value


def _number(table: dict[str, Any], key: str, default: float, path: Path, *, section: str = "service",
            whole: bool = False, unit: str = "seconds", zero: str | None = None, most: float = math.inf) -> float:
    """A number of the config file: an int or float (not text or true), finite, above 0
    (or 0 too, where ``zero`` says what 0 means) and at most ``most``."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (0 <= value if zero else 0 < value) or not value < math.inf or value > most \
            or (whole and int(value) != value):
        kind = ("a whole number >= 1" if whole else
                f"a number of {unit} from 0 ({zero}) to {most:.0f}" if zero else f"a number of {unit} > 0")
        raise ConfigError(f"[{section}] {key} in {path} must be {kind}, not {value!r}")
    return float(value)


def _table(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in {path} must be a table")
    return value


def _strings(value: Any, key: str, path: Path, example: str, what: str = "names") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} in {path} must be a list of {what}, like {example}")
    return list(value)
