"""A real SMTP server for tests, built on aiosmtpd.

:class:`SmtpServer` runs in a background thread (own asyncio loop) on
127.0.0.1 and a free port, in one of three modes:

* ``"plain"``    -- no TLS at all (AUTH only if ``auth_require_tls=False``);
* ``"starttls"`` -- offers STARTTLS (``require_starttls=True``: MAIL etc. get
  ``530`` before STARTTLS); AUTH is offered only after STARTTLS;
* ``"tls"``      -- implicit TLS (SMTPS) from the first byte.

Behaviour useful for client tests:

* AUTH PLAIN / LOGIN against ``users`` (``{login: password}``); without
  ``users`` no AUTH is advertised;
* RCPT whose local part starts with ``tempfail`` -> ``451 4.3.0 try again
  later``; ``reject`` -> ``550 5.1.1 no such user``;
* :meth:`SmtpServer.fail_next_data` -- the next *n* DATA commands fail (451 by
  default) and are NOT recorded;
* ``size_limit`` -- advertised as ``SIZE N`` and enforced (552);
* ``max_recipients`` -- RCPT beyond that many in one transaction gets
  ``552 5.5.3 too many recipients`` (the code RFC 821 gave it, which servers
  still send; RFC 5321 4.5.3.1.10 says 452 and asks clients to read 552 so);
* ``hide`` -- EHLO keywords not to announce (``{"8BITMIME", "SMTPUTF8"}``: a
  server from before those extensions, RFC 6152 and RFC 6531);
* :meth:`SmtpServer.drop_next_data` -- the next *n* messages are recorded (the
  server keeps them) and the link is closed without a reply to the final dot:
  the client cannot know they were accepted;
* ``slow_rcpt_seconds`` -- sleep before answering each RCPT, as a server that
  checks the recipient (a callout, greylisting) does;
* ``slow_data_seconds`` -- sleep before answering the final DATA dot. The
  message is recorded (and spooled) *after* the sleep, right before the 250,
  like a real server committing it -- a client killed during the sleep does
  not get the 250, but the server still keeps the message, i.e. a retry
  produces a duplicate, exactly the real-world ambiguity;
* every accepted message is recorded (:class:`ReceivedMessage`: envelope,
  raw bytes, session id, AUTH login, TLS) in :attr:`SmtpServer.messages`
  (thread-safe), and with ``spool_dir`` also written there as
  ``<seq>-<pid>-<rand>.eml`` (+ ``.json`` envelope, written first; the
  ``.eml`` appears atomically) so another process can count them
  (:func:`count_spool`, :func:`read_spool`).

Run standalone (for benchmarks / SIGKILL tests) -- see :class:`SmtpServerProcess`::

    python -m tests.servers.smtpd --port 0 --mode plain --spool DIR

prints one JSON line ``{"ready": true, "port": ..., "pid": ..., "ca_file": ...}``
to stdout when listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .certs import Pki, make_pki, server_ssl_context

__all__ = [
    "ReceivedMessage",
    "SmtpServer",
    "SmtpServerProcess",
    "SpoolEntry",
    "count_spool",
    "read_spool",
    "MODES",
]

MODES = ("plain", "starttls", "tls")
TEMPFAIL_REPLY = "451 4.3.0 try again later"
REJECT_REPLY = "550 5.1.1 no such user"
TOO_MANY_REPLY = "552 5.5.3 too many recipients"

# aiosmtpd logs every connection at INFO; keep test output readable
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted (250 after DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received, dot-unstuffed, ending in CRLF
    session_id: int  # 1, 2, ... per TCP connection
    auth_login: str | None  # AUTH identity, None if unauthenticated
    tls: bool  # sent over STARTTLS or implicit TLS
    peer: tuple[str, int] | None
    mail_options: list[str] = field(default_factory=list)
    seq: int = 0  # 1, 2, ... in acceptance order
    received_at: float = 0.0

    @property
    def raw(self) -> bytes:  # alias
        return self.data


@dataclass(frozen=True)
class SpoolEntry:
    """A message read back from a spool directory."""

    path: str
    data: bytes
    meta: dict[str, Any]


def count_spool(spool_dir: str | os.PathLike[str]) -> int:
    """Number of complete messages (``*.eml``) in ``spool_dir``."""
    try:
        return sum(1 for n in os.listdir(spool_dir) if n.endswith(".eml"))
    except FileNotFoundError:
        return 0


def read_spool(spool_dir: str | os.PathLike[str]) -> list[SpoolEntry]:
    """All complete spooled messages, in acceptance order."""
    out: list[SpoolEntry] = []
    try:
        names = sorted(n for n in os.listdir(spool_dir) if n.endswith(".eml"))
    except FileNotFoundError:
        return out
    for n in names:
        p = Path(spool_dir, n)
        try:
            meta = json.loads(p.with_suffix(".json").read_text())
        except (FileNotFoundError, ValueError):
            meta = {}
        out.append(SpoolEntry(path=str(p), data=p.read_bytes(), meta=meta))
    return out


class _Handler:
    """aiosmtpd handler: RCPT/DATA policy and recording."""

    def __init__(self, owner: "SmtpServer") -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        hidden = set(self.owner.hide) | (set() if self.owner.users else {"AUTH"})
        return [r for r in responses if r[4:].split(" ", 1)[0].upper() not in hidden]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.owner.slow_rcpt_seconds > 0:
            await asyncio.sleep(self.owner.slow_rcpt_seconds)
        local = address.split("@", 1)[0].lower()
        if local.startswith("tempfail"):
            return TEMPFAIL_REPLY
        if local.startswith("reject"):
            return REJECT_REPLY
        limit = self.owner.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return TOO_MANY_REPLY
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        failure = owner._take_data_failure()
        if failure is not None:
            return failure
        delay = owner.slow_data_seconds
        if delay > 0:
            await asyncio.sleep(delay)
        proto = server if isinstance(server, _SMTP) else None
        drop = owner._take_data_drop()
        msg = owner._record(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            session_id=getattr(proto, "mh_session_id", 0),
            auth_login=session.auth_data if isinstance(session.auth_data, str) else None,
            tls=owner.mode == "tls" or getattr(server, "_tls_protocol", None) is not None,
            peer=tuple(session.peer) if session.peer else None,  # type: ignore[arg-type]
            mail_options=list(envelope.mail_options or []),
        )
        if drop:
            server.transport.abort()  # kept, and never confirmed
        return f"250 2.0.0 OK queued as {msg.seq}"


class _Session(Session):
    """Session whose legacy ``login_data`` does not emit DeprecationWarning
    (aiosmtpd 1.4 itself sets it on every AUTH; under ``-W error`` the
    warning would break AUTH inside the server thread)."""

    @property  # type: ignore[override]
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SMTP(SMTP):
    """SMTP protocol that numbers its connections."""

    def __init__(self, handler: Any, owner: "SmtpServer", **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self.mh_session_id = 0

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.mh_session_id == 0
        super().connection_made(transport)
        if first:  # not the re-entry after STARTTLS
            self.mh_session_id = self._owner._new_session()


class _Controller(Controller):
    def __init__(self, owner: "SmtpServer", handler: Any, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        return _SMTP(self.handler, owner=self._owner, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # port=0: learn the kernel-chosen port before aiosmtpd connects to it
        if self.port == 0 and self.server is not None:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """Threaded aiosmtpd server on 127.0.0.1 (see module docstring)."""

    host: str = "127.0.0.1"

    def __init__(
        self,
        mode: str = "plain",
        *,
        pki: Pki | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        users: Mapping[str, str] | None = None,
        require_starttls: bool = False,
        auth_require_tls: bool = True,
        auth_required: bool = False,
        size_limit: int | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        slow_data_seconds: float = 0.0,
        slow_rcpt_seconds: float = 0.0,
        port: int = 0,
        hostname: str = "smtp.mailhost.test",
        untrusted: bool = False,
        hide: Iterable[str] = (),
        max_recipients: int | None = None,
    ) -> None:
        """``mode``: plain | starttls | tls. TLS certificate: ``cert_file`` +
        ``key_file``, else ``pki`` (its *untrusted* cert if ``untrusted``),
        else a PKI generated into a temp dir (see :attr:`ca_file`).
        ``users``: AUTH PLAIN/LOGIN credentials. ``size_limit``: advertised
        ``SIZE`` (default aiosmtpd's 32 MiB). ``hide``: EHLO keywords left out
        (never the last line, HELP). ``max_recipients``: RCPT beyond it
        gets 552. ``port=0``: a free port."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.users: dict[str, str] = dict(users or {})
        self.require_starttls = require_starttls
        self.auth_require_tls = auth_require_tls
        self.auth_required = auth_required
        self.size_limit = size_limit
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.slow_data_seconds = slow_data_seconds
        self.slow_rcpt_seconds = slow_rcpt_seconds
        self.hostname = hostname
        self.hide = frozenset(k.upper() for k in hide)
        self.max_recipients = max_recipients
        self._requested_port = port
        self._tmpdir: str | None = None
        self.ca_file: str | None = None
        self.cert_file = cert_file
        self.key_file = key_file
        if mode != "plain" and not (cert_file and key_file):
            if pki is None:
                self._tmpdir = tempfile.mkdtemp(prefix="mhsmtp-")
                pki = make_pki(self._tmpdir)
            self.cert_file = pki.untrusted_cert_file if untrusted else pki.cert_file
            self.key_file = pki.untrusted_key_file if untrusted else pki.key_file
            self.ca_file = pki.untrusted_ca_file if untrusted else pki.ca_file
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._messages: list[ReceivedMessage] = []
        self._sessions = 0
        self._auth_attempts: list[tuple[str, bool]] = []
        self._data_failures: list[str] = []
        self._data_drops = 0
        self._seq = itertools.count(1)
        self._controller: _Controller | None = None
        self._port: int | None = None

    # ------------------------------------------------------------ lifecycle

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = login in self.users and self.users[login] == password
        with self._lock:
            self._auth_attempts.append((login, ok))
        if ok:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    def start(self) -> "SmtpServer":
        """Start listening; returns self once the server answers."""
        if self._controller is not None:
            return self
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self._requested_port,
            "server_hostname": self.hostname,
            "decode_data": False,
            "enable_SMTPUTF8": True,
            "auth_required": self.auth_required,
            "authenticator": self._authenticator,
            "ready_timeout": 10.0,
            "timeout": 300,
        }
        if self.size_limit is not None:
            kwargs["data_size_limit"] = self.size_limit
        if self.mode == "starttls":
            assert self.cert_file and self.key_file
            kwargs["tls_context"] = server_ssl_context(self.cert_file, self.key_file)
            kwargs["require_starttls"] = self.require_starttls
            kwargs["auth_require_tls"] = self.auth_require_tls
        elif self.mode == "tls":
            assert self.cert_file and self.key_file
            kwargs["ssl_context"] = server_ssl_context(self.cert_file, self.key_file)
            kwargs["auth_require_tls"] = False  # the whole session is TLS
        else:
            kwargs["auth_require_tls"] = self.auth_require_tls
        if not self.users:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        controller = _Controller(self, _Handler(self), **kwargs)
        controller.start()
        self._controller = controller
        self._port = controller.port
        with self._lock:  # forget aiosmtpd's own readiness probe connection
            self._sessions = 0
        return self

    def stop(self) -> None:
        """Stop the server thread (idempotent)."""
        c, self._controller = self._controller, None
        if c is not None:
            c.stop()

    def cleanup(self) -> None:
        """stop() and remove a generated temp PKI."""
        self.stop()
        if self._tmpdir:
            import shutil

            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "SmtpServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<SmtpServer mode={self.mode} {self.host}:{self._port}>"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SMTP server not started")
        return self._port

    # ------------------------------------------------------------ behaviour

    def fail_next_data(self, n: int = 1, code: int = 451, message: str | None = None) -> None:
        """Make the next ``n`` DATA commands fail with ``code`` (not recorded)."""
        if not 400 <= code <= 599:
            raise ValueError("code must be a 4xx or 5xx SMTP reply code")
        reply = f"{code} {code // 100}.3.0 {message or ('temporary failure (test)' if code < 500 else 'permanent failure (test)')}"
        with self._lock:
            self._data_failures.extend([reply] * n)

    def drop_next_data(self, n: int = 1) -> None:
        """Keep the next ``n`` messages but close the link instead of answering their final dot."""
        with self._lock:
            self._data_drops += n

    def _take_data_drop(self) -> bool:
        with self._lock:
            if self._data_drops:
                self._data_drops -= 1
                return True
            return False

    def _take_data_failure(self) -> str | None:
        with self._lock:
            return self._data_failures.pop(0) if self._data_failures else None

    def _new_session(self) -> int:
        with self._lock:
            self._sessions += 1
            return self._sessions

    def _record(self, **kw: Any) -> ReceivedMessage:
        with self._lock:
            msg = ReceivedMessage(seq=next(self._seq), received_at=time.time(), **kw)
            if self.spool_dir is not None:
                _spool_write(self.spool_dir, msg)
            self._messages.append(msg)
            self._cond.notify_all()
        return msg

    # ------------------------------------------------------------ inspection

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Snapshot of accepted messages, in acceptance order."""
        with self._lock:
            return list(self._messages)

    @property
    def sessions_opened(self) -> int:
        """Number of TCP connections accepted since start (or :meth:`clear`)."""
        with self._lock:
            return self._sessions

    @property
    def auth_attempts(self) -> list[tuple[str, bool]]:
        """``(login, success)`` for every AUTH attempt."""
        with self._lock:
            return list(self._auth_attempts)

    def clear(self) -> None:
        """Forget recorded messages, sessions, auth attempts and pending failures."""
        with self._lock:
            self._messages.clear()
            self._sessions = 0
            self._auth_attempts.clear()
            self._data_failures.clear()
            self._data_drops = 0

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``n`` messages were accepted; raise TimeoutError."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {len(self._messages)} of {n} messages arrived")
                self._cond.wait(left)
            return list(self._messages)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context trusting the CA of the served cert."""
        if not self.ca_file:
            raise RuntimeError("no CA known (plain mode, or explicit cert_file/key_file)")
        return ssl.create_default_context(cafile=self.ca_file)


def _spool_write(spool_dir: Path, msg: ReceivedMessage) -> None:
    stem = f"{msg.seq:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    meta = asdict(msg)
    del meta["data"]
    meta["size"] = len(msg.data)
    (spool_dir / f"{stem}.json").write_text(json.dumps(meta))
    tmp = spool_dir / f".{stem}.tmp"
    with open(tmp, "wb") as f:
        f.write(msg.data)
    os.replace(tmp, spool_dir / f"{stem}.eml")


# ---------------------------------------------------------------------------
# separate-process mode

_REPO_ROOT = Path(__file__).resolve().parents[2]


class SmtpServerProcess:
    """Runs ``python -m tests.servers.smtpd`` as a child process.

    ``args`` are extra CLI options (e.g. ``["--user", "u:p"]``). Use
    :meth:`terminate` (SIGTERM) or :meth:`kill` (SIGKILL) -- both by PID."""

    host = "127.0.0.1"

    def __init__(
        self,
        mode: str = "plain",
        spool_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        args: list[str] | None = None,
        python: str = sys.executable,
        startup_timeout: float = 20.0,
    ) -> None:
        self.mode = mode
        self.spool_dir = str(spool_dir) if spool_dir is not None else None
        self._argv = [python, "-m", "tests.servers.smtpd", "--port", str(port), "--mode", mode]
        if self.spool_dir:
            self._argv += ["--spool", self.spool_dir]
        self._argv += list(args or [])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> "SmtpServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self.proc = subprocess.Popen(
            self._argv,
            cwd=_REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,
        )
        assert self.proc.stdout is not None
        result: dict[str, Any] = {}

        def read_ready() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            line = self.proc.stdout.readline()
            try:
                result.update(json.loads(line))
            except ValueError:
                result["error"] = line

        t = threading.Thread(target=read_ready, daemon=True)
        t.start()
        t.join(self.startup_timeout)
        if not result.get("ready"):
            self.kill()
            raise RuntimeError(f"smtpd process did not become ready: {result or 'timeout'}")
        self.info = result
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def ca_file(self) -> str | None:
        return self.info.get("ca_file")

    def count(self) -> int:
        """Messages in the spool."""
        return count_spool(self.spool_dir) if self.spool_dir else 0

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful), SIGKILL after ``timeout``."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL."""
        self._signal(signal.SIGKILL, 5.0)

    stop = terminate

    def __enter__(self) -> "SmtpServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m tests.servers.smtpd --help``."""
    ap = argparse.ArgumentParser(prog="python -m tests.servers.smtpd", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    ap.add_argument("--mode", choices=MODES, default="plain")
    ap.add_argument("--spool", help="also write accepted messages into this directory")
    ap.add_argument("--cert", help="server certificate PEM (TLS modes)")
    ap.add_argument("--key", help="server key PEM (TLS modes)")
    ap.add_argument("--ca", help="CA file to report in the ready line (with --cert/--key)")
    ap.add_argument("--pki-dir", help="generate (or reuse) a test PKI here for TLS modes")
    ap.add_argument("--user", action="append", default=[], metavar="LOGIN:PASSWORD")
    ap.add_argument("--require-starttls", action="store_true")
    ap.add_argument("--no-auth-require-tls", action="store_true", help="allow AUTH without TLS")
    ap.add_argument("--auth-required", action="store_true")
    ap.add_argument("--size-limit", type=int)
    ap.add_argument("--slow-data-seconds", type=float, default=0.0)
    ap.add_argument("--fail-next-data", type=int, default=0, metavar="N")
    ap.add_argument("--fail-code", type=int, default=451)
    ns = ap.parse_args(argv)

    users = dict(u.split(":", 1) for u in ns.user)
    pki: Pki | None = None
    if ns.mode != "plain" and not (ns.cert and ns.key) and ns.pki_dir:
        d = Path(ns.pki_dir)
        pki = make_pki(d) if not (d / "trusted-ca.pem").exists() else _load_pki(d)
    server = SmtpServer(
        ns.mode,
        pki=pki,
        cert_file=ns.cert,
        key_file=ns.key,
        users=users,
        require_starttls=ns.require_starttls,
        auth_require_tls=not ns.no_auth_require_tls,
        auth_required=ns.auth_required,
        size_limit=ns.size_limit,
        spool_dir=ns.spool,
        slow_data_seconds=ns.slow_data_seconds,
        port=ns.port,
    )
    if ns.ca:
        server.ca_file = ns.ca
    if ns.fail_next_data:
        server.fail_next_data(ns.fail_next_data, ns.fail_code)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        print(
            json.dumps(
                {"ready": True, "port": server.port, "pid": os.getpid(), "mode": ns.mode, "ca_file": server.ca_file}
            ),
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        server.cleanup()
    return 0


def _load_pki(d: Path) -> Pki:
    names = {
        "ca_file": "trusted-ca.pem",
        "ca_key_file": "trusted-ca.key",
        "cert_file": "trusted-server.pem",
        "key_file": "trusted-server.key",
        "untrusted_ca_file": "untrusted-ca.pem",
        "untrusted_ca_key_file": "untrusted-ca.key",
        "untrusted_cert_file": "untrusted-server.pem",
        "untrusted_key_file": "untrusted-server.key",
    }
    return Pki(directory=str(d), **{k: str(d / v) for k, v in names.items()})


if __name__ == "__main__":
    sys.exit(main())
