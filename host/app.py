"""The Python API's entry point: one installation's config, plugins, store and key.

::

    from mailhost import Mailhost

    host = Mailhost.open("mailhost.toml")
    host.connections.add_incoming(IncomingSpec(name="helpdesk", protocol="imap", ...))
    report = host.incoming.fetch()

The CLI and the web admin are thin layers over this object.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from . import store
from .config import Config, config_path, write_starter_config
from .errors import ConfigError, MailhostError, StoreError, StoreUnreachable
from .plugins import PluginHost, plugin_host
from .secrets import RedactingFilter, Vault, create_key_file, create_private_file

__all__ = ["Mailhost", "exit_now"]

log = logging.getLogger(__name__)


class Mailhost:
    """One installation: its config, its plugins, its store and its secret key."""

    def __init__(self, config: Config, plugins: PluginHost | None = None) -> None:
        self.config = config
        self._plugins = plugins
        install_redaction()

    # -- construction -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, plugins: PluginHost | None = None) -> Mailhost:
        """Open the installation whose config file is ``path`` (see :func:`config_path`)."""
        return cls(Config.load(path), plugins)

    @classmethod
    def init(cls, path: str | os.PathLike[str] | None = None, database_url: str | None = None) -> Mailhost:
        """Create a starter config, a secret key (unless ``$MAILHOST_SECRET_KEY`` is set)
        and the store; an existing config is left alone and its store upgraded."""
        cfg_path = config_path(path)
        created: list[Path] = []  # removed again if init fails: a failed init leaves nothing
        if cfg_path.exists() and database_url:
            raise ConfigError(
                f"{cfg_path} already exists: edit its [store] url instead of passing --database"
            )
        try:
            if not cfg_path.exists():
                # The config's folder first: the store and the key go in it by default.
                missing = [p for p in reversed(cfg_path.parents) if not p.exists()]
                for folder in missing:
                    folder.mkdir()
                    created.append(folder)
                write_starter_config(cfg_path, database_url)
                created.append(cfg_path)
            host = cls.open(cfg_path)
            database = host.config.sqlite_file
            if database is not None and not database.exists():
                created += [database, *(database.with_name(database.name + end) for end in ("-wal", "-shm"))]
                # The store holds every downloaded message: owner only, like the key. An
                # empty file is an empty SQLite database, and SQLite gives its -wal and
                # -shm files the database's mode.
                create_private_file(database)
            new_key = not os.environ.get("MAILHOST_SECRET_KEY") and not host.config.key_file.exists()
            if new_key:
                create_key_file(host.config.key_file)
                created.append(host.config.key_file)
            host.vault  # noqa: B018  (fails early on an unusable key)
            # A config written just now is removed again if this fails: name the option.
            host.migrate("check --database" if database_url and cfg_path in created else None)
            if new_key and host._a_stored_secret() is not None:
                # A new key opens none of them: the key file was lost, not never made.
                raise ConfigError(
                    f"the secret key file {host.config.key_file} is missing, and the store holds secrets encrypted "
                    f"under the key it held: restore that file (or set MAILHOST_SECRET_KEY to its key); a new key "
                    "could not open them, so init made none")
        except BaseException as exc:
            for made in reversed(created):  # newest first: the files, then their folders
                with contextlib.suppress(OSError):  # (a folder someone else filled meanwhile stays)
                    made.rmdir() if made.is_dir() else made.unlink(missing_ok=True)
            if isinstance(exc, OSError):  # a folder this user may not write (a service account), a read-only disk
                folder = Path(exc.filename).parent if exc.filename else cfg_path.parent
                place = "--config FILE (the key and the store go beside it)" + (" or --database" if database_url else "")
                raise ConfigError(f"cannot create files in {folder} ({exc.strerror or exc}): make that folder "
                                  f"writable for this user, or choose another place with {place}; nothing was "
                                  "left behind") from None
            raise
        return host

    # -- parts ------------------------------------------------------------------------

    @property
    def plugins(self) -> PluginHost:
        """The loaded plugins (discovered once per process)."""
        if self._plugins is None:
            self._plugins = plugin_host(
                self.config.plugins_enabled, self.config.plugins_disabled, self.config.protocol_choices
            )
        return self._plugins

    @cached_property
    def engine(self) -> Engine:
        """The store's engine."""
        return store.make_engine(self.config.database_url)

    @cached_property
    def clock(self) -> Callable[[], dt.datetime]:
        """Now, by the store's clock: what leases and schedules that several workers
        share are read by (see :class:`mailhost.leases.StoreClock`)."""
        from .leases import StoreClock

        return StoreClock(self.engine)

    @cached_property
    def vault(self) -> Vault:
        """Encrypts and decrypts secrets at rest."""
        return Vault.from_env_or_file(self.config.key_file, self._a_stored_secret)

    def check_key(self) -> None:
        """Raise ConfigError when the store holds secrets and the key cannot open them
        (missing, unreadable, invalid or another installation's). The pipelines call it
        first: a pass would otherwise fail on every connection and count the failures."""
        if self._a_stored_secret() is not None:
            self.vault.check()

    def _a_stored_secret(self) -> bytes | None:
        """Any secret the store holds, for :class:`Vault` to check its key against."""
        with self.session() as s:
            for column in store.SECRET_COLUMNS:
                found = s.scalar(select(column).where(column.is_not(None)).limit(1))
                if found is not None:
                    return bytes(found)
        return None

    @cached_property
    def _sessionmaker(self) -> Any:
        return store.make_sessionmaker(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A store transaction: committed on success, rolled back on error; the store
        failing (unreachable, busy, full, read-only) raises :class:`StoreError`."""
        self.check_schema()
        with self.store_errors(), self._sessionmaker.begin() as s:
            yield s

    @contextlib.contextmanager
    def store_errors(self) -> Iterator[None]:
        """Turn the database's own failures in the block into one :class:`StoreError`
        sentence that names the store and what to do, for admins and for the service's
        log; errors of mailhost's own code pass through untouched."""
        try:
            yield
        except DBAPIError as exc:  # SQLAlchemy's wrapper of a driver error
            if not ((isinstance(exc, OperationalError) and _environmental(exc.orig)) or exc.connection_invalidated):
                raise
            raise StoreError(self._store_failure(exc.orig)) from exc
        except self._driver_errors as exc:  # raw driver calls of the hot paths (see mailhost.incoming)
            if not _environmental(exc):
                raise
            raise StoreError(self._store_failure(exc)) from exc

    @cached_property
    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        dbapi = self.engine.dialect.loaded_dbapi
        return (dbapi.OperationalError,)

    def _store_failure(self, orig: BaseException | None) -> str:
        """One sentence for a failure of the store: what it is and the way out."""
        url = self.engine.url.render_as_string(hide_password=True)
        why = " ".join(str(orig).split()).rstrip(".") or type(orig).__name__
        low = why.lower()
        denied = self._sqlite_denied(orig, why)
        if denied:
            return denied
        if _lock_timeout(orig):  # PostgreSQL: store.BUSY_TIMEOUT passed waiting for another session's lock
            held = re.search(r'in relation "([^"]+)"', why)
            what = f"a row of {held.group(1)}" if held else "a table"
            return (f"the store {url} is busy: {what} stayed locked by another session for {store.BUSY_TIMEOUT} s "
                    f"({why}); end that session's transaction (pg_stat_activity shows it, mostly as 'idle in "
                    "transaction'), then try again")
        if _idled_out(orig):  # PostgreSQL ended the session: it sat in its transaction past the timeout
            return (f"the store {url} ended this session because it sat in a transaction without a statement for "
                    "longer than idle_in_transaction_session_timeout (this process was stalled: stopped, swapping, "
                    "starved of CPU); nothing half-done was kept: try again")
        if "deadlock" in low:  # PostgreSQL aborted this transaction to free another one
            return (f"the store {url} aborted this change to end a deadlock with another process ({why}); "
                    "try again")
        if "locked" in low:
            return (f"the store {url} is busy: another process kept it locked for {store.BUSY_TIMEOUT} s "
                    f"({why}); try again when it is done")
        if "full" in low or "no space" in low or "quota" in low:
            return f"the store {url} is full ({why}): free space on its disk, then try again"
        if "readonly" in low or "read-only" in low:
            return f"the store {url} is read-only ({why}): make it writable for this user, then try again"
        return (f"the store {url} failed ({why}): check that the database runs and its disk works, "
                f"then try again (nothing half-done was kept)")

    def _sqlite_denied(self, orig: BaseException | None, why: str) -> str | None:
        """The sentence for an SQLite store this user may not open or write, else None.

        SQLite writes the store and creates its -wal and -shm files beside it: a folder
        the user may not write fails even a read (SQLITE_READONLY_DIRECTORY), which the
        driver words as "attempt to write a readonly database", not as the folder's fault.
        """
        code = getattr(orig, "sqlite_errorcode", None)
        database = self.config.sqlite_file
        if code is None or database is None:
            return None
        folder = database.parent
        # The -wal and -shm files take the store's mode when SQLite makes them: one made
        # while the store was read-only stays so after the store is made writable again.
        files = [database, *(database.with_name(database.name + end) for end in ("-wal", "-shm"))]
        unusable = [f.name for f in files if f.exists() and not os.access(f, os.R_OK | os.W_OK)]
        if code == _SQLITE_READONLY_DIRECTORY or (code & 0xFF == _SQLITE_CANTOPEN and not os.access(folder, os.W_OK)):
            what = f"its folder {folder} is not writable for this user"
        elif code & 0xFF in (_SQLITE_READONLY, _SQLITE_CANTOPEN) and unusable:
            names = unusable[0] if len(unusable) == 1 else f"{', '.join(unusable[:-1])} and {unusable[-1]}"
            what = f"{names} {'is' if len(unusable) == 1 else 'are'} not readable and writable for this user"
        else:
            return None
        return (f"the store {database} cannot be used: {what} ({why}); SQLite writes the file and creates "
                f"{database.name}-wal and {database.name}-shm beside it, so give the user that runs mailhost "
                "the folder and those files (chown), then try again")

    def migrate(self, fix: str | None = None) -> None:
        """Bring the store's schema up to date (``mailhost init`` does this); ``fix`` says
        what to check when the store cannot be opened (default: the config's [store] url)."""
        self._reach(fix)
        try:
            store.upgrade(self.engine)
        except OperationalError as exc:
            raise self._cannot_open(exc, fix) from None
        self._schema_ok = True

    def _reach(self, fix: str | None = None) -> None:
        """Connect once: a store that cannot be reached, or whose URL has options its
        driver refuses (``?connect_timeout=abc``), is the admin's to fix, in one sentence."""
        try:
            with self.engine.connect():
                pass
        except (DBAPIError, ValueError) as exc:  # older psycopg raises ValueError for a bad option
            raise self._cannot_open(exc, fix) from None

    def _cannot_open(self, exc: Exception, fix: str | None = None) -> MailhostError:
        """The error for a store that cannot be opened; ``fix`` is what to check when it is
        not the configured store (``init --database``), where even a server that does not
        answer is a URL to correct, not one to wait for."""
        configured = fix is None
        fix = fix or f"check [store] url in {self.config.path}"
        reason = getattr(exc, "orig", None) or exc  # the driver's words, without SQLAlchemy's wrapping
        if _lock_timeout(reason):  # a session holds the schema (a migration under way, an open transaction)
            return StoreError(self._store_failure(reason))
        denied = self._sqlite_denied(reason, " ".join(str(reason).split()).rstrip("."))
        if denied:  # the URL is right: the file's or its folder's permissions are not
            return StoreError(denied)
        if configured and _unanswered(reason):  # it worked at init: the server is away
            return StoreUnreachable(
                f"cannot reach the store {self.engine.url.render_as_string(hide_password=True)}: "
                f"{' '.join(str(reason).split())}; start the database server, or {fix}")
        return ConfigError(f"cannot open the store {self.engine.url.render_as_string(hide_password=True)}: "
                           f"{' '.join(str(reason).split())}; {fix}")

    def check_schema(self) -> None:
        """Refuse to work on a store that is missing or older than this code."""
        if getattr(self, "_schema_ok", False):
            return
        database = self.config.sqlite_file
        if database is not None and not database.exists():  # connecting would create it, empty
            raise ConfigError(f"the store {database} does not exist: run `mailhost init` to create it, "
                              f"or check [store] url in {self.config.path}")
        self._reach()
        try:
            current = store.current_revision(self.engine)
        except OperationalError as exc:
            raise self._cannot_open(exc) from None
        head = store.head_revision()
        if current != head:
            raise ConfigError(
                f"the store at {self.engine.url.render_as_string(hide_password=True)} is at schema "
                f"{current or 'none'}, this mailhost needs {head}: run `mailhost init` to create or upgrade it"
            )
        self._schema_ok = True

    @cached_property
    def connections(self) -> Any:
        """Incoming and outgoing connections (:class:`mailhost.connections.Connections`)."""
        from .connections import Connections

        return Connections(self)

    @cached_property
    def certificates(self) -> Any:
        """Certificates for decrypting incoming mail (:class:`mailhost.certs.Certificates`)."""
        from .certs import Certificates

        return Certificates(self)

    @cached_property
    def oauth(self) -> Any:
        """OAuth2 credentials and their tokens (:class:`mailhost.oauth.OAuth2`)."""
        from .oauth import OAuth2

        return OAuth2(self)

    @cached_property
    def incoming(self) -> Any:
        """The incoming pipeline and queue (:class:`mailhost.incoming.Incoming`)."""
        from .incoming import Incoming

        return Incoming(self)

    @cached_property
    def outgoing(self) -> Any:
        """The outgoing pipeline and queue (:class:`mailhost.outgoing.Outgoing`)."""
        from .outgoing import Outgoing

        return Outgoing(self)

    def close(self, *, exiting: bool = False) -> None:
        """Release the store's connections. ``exiting``: the process ends right after
        without the interpreter's teardown; an embedded SQLite store is then left open, as
        every commit is already durable and closing it would only run its checkpoint."""
        if "engine" in self.__dict__ and not (exiting and self.engine.dialect.name == "sqlite"):
            self.engine.dispose()


# SQLite's result codes (the primary code is the low byte of an extended one).
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14
_SQLITE_READONLY_DIRECTORY = 1544


def _sqlstate(orig: BaseException | None) -> str | None:
    """The SQLSTATE of a PostgreSQL driver's error (psycopg 3, or psycopg2's pgcode)."""
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def _idled_out(orig: BaseException | None) -> bool:
    """Whether PostgreSQL ended the session for idling in its transaction (SQLSTATE
    25P03): the error itself, or the one during which the link was found lost (the
    rollback of a transaction that failed so). Older psycopg 3 releases report it as a
    lost link without the SQLSTATE, with the server's own words (English servers)."""
    while orig is not None:
        if _sqlstate(orig) == "25P03" or "due to idle-in-transaction timeout" in str(orig):
            return True
        orig = orig.__context__
    return False


def _lock_timeout(orig: BaseException | None) -> bool:
    """Whether a driver's error is PostgreSQL's lock_timeout (SQLSTATE 55P03) running out."""
    return _sqlstate(orig) == "55P03"


def _unanswered(orig: BaseException | None) -> bool:
    """Whether a driver's error says the database server did not answer: a PostgreSQL
    connection that failed before any reply (refused, timed out, no such host), or a
    server starting up, shutting down or out of connections. A server that answered
    "no" (wrong credentials, no such role or database: libpq's ``FATAL:`` lines, which
    psycopg gives without a SQLSTATE while connecting) is the config's to fix."""
    if getattr(orig, "sqlite_errorcode", None) is not None or not type(orig).__module__.startswith("psycopg"):
        return False
    state = _sqlstate(orig)
    if state is not None:
        return state.startswith("08") or state in ("57P01", "57P03", "53300")
    text = str(orig)
    return "FATAL:" not in text or any(words in text for words in (
        "the database system is starting up", "the database system is shutting down",
        "the database system is in recovery mode", "too many clients"))


def _environmental(orig: BaseException | None) -> bool:
    """Whether a driver's OperationalError comes from the store's surroundings (link,
    lock, disk, permissions) rather than from the SQL: SQLite also raises it for
    SQLITE_ERROR ("no such table", a syntax error), a broken store or a bug to report."""
    code = getattr(orig, "sqlite_errorcode", None)
    return code is None or code & 0xFF != 1  # the primary result code SQLITE_ERROR


def install_redaction() -> None:
    """Put the redacting filter on every handler of the root logger, once."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, after flushing the logs and the output.

    No interpreter teardown: no atexit handlers and no joining of threads. That is safe
    wherever mailhost is, because every pipeline commits before it acknowledges and
    leases end with the process (see :mod:`mailhost.leases`).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)
