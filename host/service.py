"""``mailhost serve``: scheduled downloads, delivery passes and the web admin.

Each enabled incoming connection is polled when its interval has passed; delivery runs
every ``[service] delivery_interval`` seconds; once a minute, incoming items left
``processing`` longer than ``[incoming] processing_timeout_minutes`` (their handler
died) go back to ``new``. One connection's failure never stops the others (it is
logged, on the connection and in the incoming log). SIGTERM or SIGINT
stops the service after the batches under way (a download pass ends after the batch it
is storing, the next pass goes on from there; a delivery pass finishes); a second one
exits at once, which is safe because every pipeline stores before it acknowledges.

Many ``serve`` processes may share one PostgreSQL store: connection leases and row
leases on the outgoing queue keep them from doing the same work twice.

The service reads the config file once, at start: it warns when the file changes (a
``plugins enable``, a new ``[service]``, ``[incoming]`` or ``[outgoing]`` setting) that a restart
applies it. Connections, credentials and certificates live in the store and are read
at every pass, so changes made with the CLI apply without a restart.

While the store cannot be used (a database restart, a dropped link, a full disk) the
service says so in one line, tries again at every tick, and says when it is back; no
pass acknowledges or records anything that was not committed, so nothing is lost.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from .app import exit_now
from .errors import StoreError

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["Service"]

T = TypeVar("T")
log = logging.getLogger(__name__)

RELEASE_EVERY = 60.0  # seconds between looks for items whose handler died: a timeout is minutes


class Service:
    """The long-running loop of one worker process."""

    STORE_REMINDER = 300.0

    def __init__(self, host: Mailhost, download_workers: int = 4, tick: float = 1.0) -> None:
        self.host = host
        self.stop = threading.Event()
        self.tick = tick
        self._pool = ThreadPoolExecutor(max_workers=download_workers, thread_name_prefix="download")
        self._running: dict[str, Future[object]] = {}
        self._signals = 0
        # A failing store is said once (and again every STORE_REMINDER seconds while it
        # lasts), and once more when each job that failed on it has worked since. Not when
        # some time passed without a failure: a store that reads but cannot write (full,
        # read-only, locked) keeps a pass waiting BUSY_TIMEOUT for its lock meanwhile,
        # and the reads of every tick work.
        self._store_said: float | None = None
        self._store_failing: set[str] = set()  # the jobs (their ``what``) whose last run failed on the store
        self._config_seen = self._config_stamp()
        self._store_lock = threading.Lock()
        #: Whether a pass failed (a connection's error, the store, a bug): `serve --once`
        #: then exits 1, like `fetch` and `deliver`.
        self.failed = False

    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGTERM/SIGINT; a second signal exits at once."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                # Not SystemExit: the interpreter would join the download threads first,
                # finishing (and throwing away) their passes. Stopping mid-pass is safe:
                # every pipeline stores before it acknowledges.
                exit_now(128 + signum)
            log.warning("%s: finishing the batches under way, then stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, once: bool = False) -> None:
        """Serve until stopped (or one round, with ``once``)."""
        interval = self.host.config.delivery_interval
        next_delivery = next_release = 0.0
        log.info("mailhost serve started; store %s", self.host.engine.url.render_as_string(hide_password=True))
        try:
            while not self.stop.is_set():
                self._notice_config_change()
                self._start_due_downloads()
                if time.monotonic() >= next_delivery:
                    self._deliver()
                    next_delivery = time.monotonic() + interval
                if time.monotonic() >= next_release:
                    self._release()
                    next_release = time.monotonic() + RELEASE_EVERY
                if once:
                    break
                self.stop.wait(self.tick)
        finally:
            self._pool.shutdown(wait=True)
            log.info("mailhost serve stopped")

    def _config_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.host.config.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _notice_config_change(self) -> None:
        """Say once per change that the config file changed and what applies it: the
        plugins, [service], [incoming] and [outgoing] were read at start and stay as they were."""
        stamp = self._config_stamp()
        if stamp != self._config_seen:
            self._config_seen = stamp
            log.warning("the config file %s changed: restart mailhost serve to apply it (this one goes on with the "
                        "plugins and settings it started with)", self.host.config.path)

    def _start_due_downloads(self) -> None:
        self._running = {n: f for n, f in self._running.items() if not f.done()}
        due = self._guarded("reading the connections that are due", self.host.incoming.due)
        if due is None:
            return
        # A connection neither due nor under way runs no pass that could fail again
        # (disabled, removed): its failed pass no longer keeps the store from being back.
        self._store_worked(*(self._pass(name) for name in self._failing_passes() - set(due) - set(self._running)))
        for name in due:
            if name not in self._running and not self.stop.is_set():
                self._running[name] = self._pool.submit(self._download, name)

    def _download(self, name: str) -> None:
        # A stopping service ends the pass after the batch under way, not after the mailbox.
        report = self._guarded(self._pass(name), lambda: self.host.incoming.fetch_one(name, stop=self.stop))
        if report is None:
            return
        if report.error:
            self.failed = True
            log.warning("%s", report.error)
        elif report.stopped:
            log.warning("%s: %s", name, report.stop_note)
        elif report.stored:
            log.info("%s: %d new message(s)", name, report.stored)

    def _release(self) -> None:
        timeout = self.host.config.processing_timeout
        if timeout is None:
            return
        released = self._guarded("releasing the incoming items whose handler died",
                                 lambda: self.host.incoming.release(timeout))
        if released:
            log.warning("%d incoming item(s) were processing for more than %s: they are new again", released, timeout)

    def _deliver(self) -> None:
        report = self._guarded("the delivery pass",
                               lambda: self.host.outgoing.deliver(sessions=self.host.config.delivery_sessions))
        if report is None:
            return
        if report.purge_error:  # said in the log by the outgoing queue
            self.failed = True
        # Said as `mailhost deliver` says it: a connection that cannot send is in the log,
        # as a download that fails is, not only in the queue's last_error.
        for r in report.connections.values():
            if r.error:
                self.failed = True
                named = r.error if r.error.startswith(r.connection) else f"{r.connection}: {r.error}"
                log.warning("%s (%s)", named, r.counts())
            elif r.failed or r.retrying:  # each message's own reason is in the queue
                log.warning("%s: %s (`mailhost queue outgoing --connection %s` says why)", r.connection, r.counts(),
                            r.connection)
            elif r.sent or r.partial or r.fell_back:
                log.info("%s: %s", r.connection, r.counts())
        if report.error:
            self.failed = True
            log.warning("%s", report.error)

    def _guarded(self, what: str, work: Callable[[], T]) -> T | None:
        """``work()``, or None once its failure is said: the store's once (it is the same
        for every job, see :meth:`_store_failed`), anything else with its traceback; one
        job's failure never stops the service."""
        try:
            result = work()
        except StoreError as exc:
            self._store_failed(what, exc)
        except Exception:
            log.exception("%s failed", what)
        else:
            self._store_worked(what)
            return result
        self.failed = True
        return None

    @staticmethod
    def _pass(name: str) -> str:
        """The ``what`` of connection ``name``'s download pass."""
        return f"the download pass of {name}"

    def _failing_passes(self) -> set[str]:
        """The connections whose last download pass failed on the store."""
        prefix = self._pass("")
        with self._store_lock:
            return {what[len(prefix):] for what in self._store_failing if what.startswith(prefix)}

    def _store_failed(self, what: str, exc: StoreError) -> None:
        """Say that the store fails once, not at every tick while it does."""
        now = time.monotonic()
        with self._store_lock:
            self._store_failing.add(what)
            say = self._store_said is None or now - self._store_said >= self.STORE_REMINDER
            if say:
                self._store_said = now
        if say:
            log.error("%s; mailhost serve tries again at every tick", exc)
        else:
            log.debug("%s", exc)

    def _store_worked(self, *whats: str) -> None:
        """Jobs ``whats`` worked: say the store is back once no job that failed on it fails still."""
        with self._store_lock:
            self._store_failing.difference_update(whats)
            back = self._store_said is not None and not self._store_failing
            if back:
                self._store_said = None
        if back:
            log.warning("the store answers again: downloads and deliveries go on")
