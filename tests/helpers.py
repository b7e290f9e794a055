"""Fixtures and helpers shared by the host's tests and the plugins' tests.

- ``home``: a fresh installation (config, key, SQLite store) in a temporary folder,
  with ``MAILHOST_CONFIG`` pointing at it.
- ``mh``: the :class:`mailhost.Mailhost` of ``home``.
- ``database_url``: parametrized over SQLite and a fresh PostgreSQL database.
- :func:`run_cli`: ``mailhost`` in a subprocess, as an admin runs it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailhost import Mailhost

from .servers.fixtures import in_ci

PG_ADMIN_URL = os.environ.get("MAILHOST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def run_cli(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None, timeout: float = 120,
            obey_permissions: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``mailhost ARGS`` in a subprocess; text output, never raises on exit status.

    ``obey_permissions``: file modes bind it even when the tests run as root, as they bind
    the service account an admin runs mailhost as (see :func:`_without_root_bypass`)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mailhost", *args], input=input, env=full_env, cwd=cwd,
        capture_output=True, text=isinstance(input, str) or input is None, timeout=timeout,
        preexec_fn=_without_root_bypass if obey_permissions and os.geteuid() == 0 else None,
    )


def _without_root_bypass() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that the program run as root gets neither and a folder of mode 0555
    refuses it a new file, as it does any other user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh installation folder; MAILHOST_CONFIG points at its config file."""
    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    monkeypatch.delenv("MAILHOST_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("MAILHOST_STRICT_PLUGINS", raising=False)
    config = tmp_path / "mailhost.toml"
    Mailhost.init(config).close()
    monkeypatch.setenv("MAILHOST_CONFIG", str(config))
    return tmp_path


@pytest.fixture
def mh(home: Path) -> Iterator[Mailhost]:
    """The installation in ``home``."""
    host = Mailhost.open(home / "mailhost.toml")
    yield host
    host.close()


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the PostgreSQL server on 127.0.0.1:5432 (skipped if absent, never in CI)."""
    if not _pg_available():
        if in_ci():
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432, and CI must test against it")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    import psycopg

    name = f"mailhost_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL: SQLite in a temporary folder, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def mh_any(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailhost]:
    """A fresh installation on each store backend (SQLite, PostgreSQL)."""
    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    config = tmp_path / "pg" / "mailhost.toml"
    host = Mailhost.init(config, database_url)
    monkeypatch.setenv("MAILHOST_CONFIG", str(config))
    yield host
    host.close()


def as_installed(host: Mailhost, monkeypatch: pytest.MonkeyPatch, plugin: str = "testplugin") -> str:
    """Give ``plugin``, loaded in process, the distribution it would have when installed
    (``mailhost-PLUGIN 0.1.0``); returns the plugin as errors then name it."""
    info = host.plugins.plugins[plugin]
    monkeypatch.setattr(info, "distribution", f"mailhost-{plugin}")
    monkeypatch.setattr(info, "version", "0.1.0")
    return f"plugin {plugin} (mailhost-{plugin} 0.1.0)"


def message_id_of(raw: bytes) -> str:
    """The Message-ID header of a raw message."""
    import re

    return re.search(rb"^Message-ID: (.*?)\r?$", raw, re.MULTILINE | re.IGNORECASE).group(1).decode()


def outbox_subjects(outbox: Path) -> list[bytes]:
    """The subjects of the messages the test plugin's ``dir`` protocol wrote to ``outbox``, sorted."""
    return sorted(p.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0] for p in outbox.iterdir())


def stored_messages(home: Path) -> list[tuple[str, bytes]]:
    """(Message-ID, raw bytes) of the incoming queue of the SQLite store in ``home``, oldest first."""
    import sqlite3

    db = sqlite3.connect(home / "mailhost.db")
    try:
        return [(m, bytes(r)) for m, r in db.execute("SELECT message_id, raw FROM incoming_queue ORDER BY id")]
    finally:
        db.close()


def stored_count(home: Path) -> int:
    """How many messages the incoming queue of the SQLite store in ``home`` holds."""
    import sqlite3

    db = sqlite3.connect(home / "mailhost.db", timeout=30)
    try:
        return db.execute("SELECT count(*) FROM incoming_queue").fetchone()[0]
    finally:
        db.close()


def kill_when(proc: subprocess.Popen[Any], ready: Callable[[], bool], then: float = 0.0) -> bool:
    """SIGKILL ``proc`` once ``ready()`` (and ``then`` seconds more); False if it ended
    first (nothing to kill)."""
    deadline = time.monotonic() + 120  # a safety net, not an assertion on speed
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    if then:
        time.sleep(then)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def kill_mid_pass(proc: subprocess.Popen[Any], home: Path, rng: random.Random,
                  within: tuple[float, float] = (0.05, 0.8)) -> bool:
    """SIGKILL a `mailhost fetch` at a random point of its pass; False if it ended first.

    At a random instant ``within`` seconds of the start (a program whose start-up is
    slower wants a later window), but no later than just after the pass's first or second commit:
    by the clock alone a faster machine (or a faster mailhost) finishes whole passes
    between kills and the test proves nothing. So kills land before the first commit,
    in an acknowledgement, or in the next download; a pass's batches start small and
    double, so each killed pass leaves most of the mailbox for the next."""
    at = time.monotonic() + rng.uniform(*within)
    commits, counts = rng.choice((1, 1, 2)), [stored_count(home)]

    def ready() -> bool:
        n = stored_count(home)
        if n > counts[-1]:
            counts.append(n)
        return time.monotonic() >= at or len(counts) > commits

    return kill_when(proc, ready, then=rng.uniform(0.0, 0.01))


@contextlib.contextmanager
def machine_clock_off(delta: dt.timedelta) -> Iterator[None]:
    """Within the block, this machine's clock runs ``delta`` off (ahead if positive), as
    mailhost reads it: every mailhost module's ``utcnow``. The database's clock is
    untouched, as for a worker on another machine whose clock is wrong."""
    import mailhost.store

    real = mailhost.store.utcnow

    def skewed() -> dt.datetime:
        return real() + delta

    def modules(holding: Callable[[], dt.datetime]) -> list[Any]:
        return [module for name, module in list(sys.modules.items())
                if (name == "mailhost" or name.startswith("mailhost.")) and getattr(module, "utcnow", None) is holding]

    for module in modules(real):
        module.utcnow = skewed
    try:
        yield
    finally:  # also the modules imported in the block, which took the skewed one from mailhost.store
        for module in modules(skewed):
            module.utcnow = real
