"""Who holds a lease: worker ids, telling that a holder on this machine died, and
the one clock that leases are read by.

Both pipelines lease work in the store (a mailbox being downloaded, messages being
sent). A lease ends when it expires; one held by a process on this machine (same boot
of its kernel, same PID namespace) that no longer runs ends at once, so a crashed
``mailhost fetch`` or ``deliver`` never blocks the next one for the rest of its lease.

Workers on several machines compare lease times that other workers wrote, so they all
read them by the store's clock (:class:`StoreClock`), never by their own: a machine
whose clock runs minutes ahead would otherwise take leases that are still held.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy.engine import Engine

from .store import utcnow

__all__ = ["StoreClock", "holder_is_gone", "worker_id"]

log = logging.getLogger(__name__)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def _boot_id() -> str:
    """This machine's kernel, as it booted (Linux's random boot id), or ``-``.

    A hostname and a PID namespace do not tell machines apart: VMs cloned from one image
    keep one hostname, and the initial PID namespace has the same id on every Linux
    machine; a worker on the other machine would pass for a dead process of this one.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:16] or "-"
    except OSError:
        return "-"


def worker_id() -> str:
    """host:boot:pid-namespace:pid:random — enough to tell, on this host, that a worker died."""
    return f"{socket.gethostname()}:{_boot_id()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(owner: str) -> bool:
    """Whether ``owner`` was a process of this machine's running kernel (same boot, same
    PID namespace) that is gone.

    Only a certain "gone" counts: another host, another boot (another machine of the
    same name, or this one before a restart), another namespace, or a PID that runs
    (perhaps reused) all wait for the lease to expire instead.
    """
    parts = owner.split("/", 1)[0].rsplit(":", 4)
    if len(parts) != 5:  # a worker id of an older mailhost, which could not tell machines apart
        return False
    hostname, boot, namespace, pid, _ = parts
    if hostname != socket.gethostname() or "-" in (boot, namespace) or boot != _boot_id() \
            or namespace != _pid_namespace():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class StoreClock:
    """Now, by the clock of the database server that every worker shares (UTC, aware).

    This machine's clock corrected by its offset from the database's, measured with
    one query (``clock_timestamp()``) and again every :attr:`EVERY` seconds, so that a
    stepped or drifting local clock is caught up with. A measurement that fails (the
    store is away) keeps the last offset: the work that follows fails on the store
    anyway. SQLite runs on this machine, so its clock is this machine's.
    """

    #: Seconds between two measurements of the offset.
    EVERY = 60.0
    #: Seconds before a failed measurement is tried again.
    RETRY = 5.0
    #: An offset beyond this is said once, as a warning.
    NOTED = dt.timedelta(seconds=30)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.offset = dt.timedelta(0)
        self._shared = engine.dialect.name == "postgresql"
        self._next = 0.0  # time.monotonic() of the next measurement
        self._lock = threading.Lock()
        self._noted = False

    def __call__(self) -> dt.datetime:
        if self._shared and time.monotonic() >= self._next:
            self._measure()
        return utcnow() + self.offset

    def _measure(self) -> None:
        with self._lock:
            if time.monotonic() < self._next:  # another thread measured meanwhile
                return
            try:
                with self.engine.connect() as conn:
                    before = utcnow()
                    theirs = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
                    after = utcnow()
            except Exception as exc:
                log.debug("could not read the store's clock: %s", exc)
                self._next = time.monotonic() + self.RETRY
                return
            self.offset = theirs - (before + (after - before) / 2)
            self._next = time.monotonic() + self.EVERY
            if abs(self.offset) > self.NOTED and not self._noted:
                self._noted = True
                log.warning("this machine's clock is %.0f s %s the clock of the store's database server: leases and "
                            "schedules go by the database's; synchronise this machine's clock (NTP) for its logs",
                            abs(self.offset.total_seconds()), "behind" if self.offset > dt.timedelta(0) else "ahead of")
