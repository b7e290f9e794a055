"""A real, private Dovecot (IMAP + POP3) instance for tests.

Each :class:`Dovecot` gets its own temp directory holding the config, base_dir
(sockets, ``master.pid``), state_dir, log file, PEM files, the user databases
and the users' Maildirs. It listens ONLY on 127.0.0.1, on free high ports:

* ``imap_port``  -- plain IMAP, STARTTLS offered (unless ``starttls=False``)
* ``imaps_port`` -- IMAP over implicit TLS
* ``pop3_port``  -- plain POP3, STLS offered (unless ``starttls=False``)
* ``pop3s_port`` -- POP3 over implicit TLS

How it runs unprivileged
------------------------
When the tests run as root (CI, containers) the Dovecot *master* runs as root
(it needs that only to bind, read the keys and switch users) and every
process that touches mail runs unprivileged:

* mail processes (imap, pop3) run as the uid/gid the userdb returns for every
  user: those of ``mail_user`` (default ``nobody``, 65534:65534 if the account
  is missing -- Dovecot needs no passwd entry for it). Homes and Maildirs are
  created and chowned to that uid/gid; :meth:`Dovecot.deliver` chowns each
  file it writes;
* login processes run as ``dovenull``, auth/stats/anvil as ``dovecot`` (the
  accounts the Debian package creates), falling back to ``nobody``;
* the per-user passdb/userdb files are readable by the auth process only
  (mode 0640, group of the internal user).

When the tests run as an ordinary user, everything (master included) runs as
that user: ``default_login_user``/``default_internal_user`` are set to it,
login chroots are disabled and the userdb returns the caller's uid/gid.

Users
-----
Every user has its own passwd-file ``users.d/<name>`` (the passdb/userdb path
is ``users.d/%u``). Dovecot re-reads a given passwd-file at most once per
second (``passwd_file_sync()``), so a single shared file would make a user
added in the same second as a previous lookup invisible; a *new* file is
always read on first use, so :meth:`Dovecot.add_user` takes effect at once,
also while the server runs. Master users live in ``masters.d/%u``
(``master = yes``, ``pass = yes``, ``auth_master_user_separator = *``):
SASL PLAIN with authzid ``alice``, authcid ``master`` (or LOGIN
``alice*master``) opens alice's mailbox.

Mail store
----------
``mail_location = maildir:~/Maildir`` (Maildir++ layout), namespace separator
``/``: folder ``Main/Sub`` is the directory ``~/Maildir/.Main.Sub`` (names
mUTF-7 encoded on disk). :meth:`Dovecot.deliver` / :meth:`Dovecot.deliver_many`
write message files straight into ``new/`` (unseen) or ``cur/`` (with
``:2,<flags>``) -- no LDA, no IMAP APPEND -- so 20,000 messages take about
a second. File names carry strictly increasing timestamps, so Dovecot assigns
UIDs in delivery order.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime as _dt
import email.utils
import grp
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .certs import Pki, make_pki

__all__ = [
    "ACL_CONFIG",
    "DOVECOT_BINARY",
    "DEFAULT_USERS",
    "DEFAULT_MASTER_USERS",
    "Dovecot",
    "DovecotError",
    "MaildirMessage",
    "dovecot_missing_reason",
    "generate_message",
    "free_ports",
    "mutf7_encode",
    "mutf7_decode",
]

DOVECOT_BINARY: str = os.environ.get("MAILHOST_DOVECOT_BINARY", "/usr/sbin/dovecot")
DEFAULT_USERS: dict[str, str] = {"alice": "alice-pw", "bob": "bob-pw"}
DEFAULT_MASTER_USERS: dict[str, str] = {"master": "master-pw"}
#: ``extra_config`` loading the ACL plugin: a ``dovecot-acl`` file in a folder's directory
#: (``owner lr`` in the Maildir root for INBOX) then sets what its user may do there.
ACL_CONFIG = ("mail_plugins = $mail_plugins acl\nprotocol imap {\n  mail_plugins = $mail_plugins acl imap_acl\n}\n"
              "plugin {\n  acl = vfile\n}\n")

# Dovecot's default auth_username_chars, minus nothing: we validate names
# against it (it is also what keeps "%u" safe inside a file path).
_USERNAME_RE = re.compile(r"^[A-Za-z0-9.\-_@]+$")
_HOSTNAME = (socket.gethostname() or "localhost").replace("/", r"\057").replace(":", r"\072")


class DovecotError(RuntimeError):
    """Dovecot could not be started/stopped; the message includes its log."""


def dovecot_missing_reason(binary: str = DOVECOT_BINARY) -> str | None:
    """``None`` if a usable Dovecot binary exists, else a human-readable reason."""
    if not os.path.isfile(binary):
        return f"Dovecot not installed ({binary} missing; apt-get install dovecot-imapd dovecot-pop3d)"
    if not os.access(binary, os.X_OK):
        return f"Dovecot binary {binary} is not executable"
    return None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct currently-free TCP ports on ``host`` (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------
# modified UTF-7 (RFC 3501 5.1.3), used for Maildir++ folder names on disk


def mutf7_encode(name: str) -> str:
    """Encode a mailbox name (str) into IMAP modified UTF-7."""
    import base64

    out: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            raw = "".join(buf).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            buf.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            buf.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(name: str) -> str:
    """Decode IMAP modified UTF-7 into str."""
    import base64

    def repl(m: re.Match[str]) -> str:
        body = m.group(1)
        if not body:
            return "&"
        b64 = body.replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        return base64.b64decode(b64).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", repl, name)


# --------------------------------------------------------------------------
# message generation

_FILLER_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis "
    "nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat "
    "duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore "
    "eu fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt "
    "in culpa qui officia deserunt mollit anim id est laborum"
).split()


def _make_filler(total: int = 1 << 17) -> bytes:
    lines: list[str] = []
    n = 0
    words = itertools.cycle(_FILLER_WORDS)
    while n < total:
        line: list[str] = []
        length = 0
        while length < 68:
            w = next(words)
            line.append(w)
            length += len(w) + 1
        text = " ".join(line)
        lines.append(text)
        n += len(text) + 2
    return ("\r\n".join(lines) + "\r\n").encode()


_FILLER = _make_filler()
_MSG_COUNTER = itertools.count()
_RUN_TOKEN = uuid.uuid4().hex[:10]


def generate_message(
    i: int,
    size: int = 3000,
    *,
    sender: str | None = None,
    to: str | None = None,
    subject: str | None = None,
    date: _dt.datetime | None = None,
    message_id: str | None = None,
) -> bytes:
    """A realistic RFC 5322 text/plain message, CRLF line endings, about
    ``size`` bytes, with a unique ``Message-ID`` (``<msg-<i>-...@mailhost.test>``)."""
    sender = sender or f'"Sender {i}" <sender{i}@example.com>'
    to = to or '"Alice Example" <alice@example.com>'
    subject = subject or f"Test message {i}"
    when = date or _dt.datetime.now(_dt.timezone.utc)
    message_id = message_id or f"<msg-{i}-{_RUN_TOKEN}-{next(_MSG_COUNTER)}@mailhost.test>"
    headers = (
        f"Return-Path: <sender{i}@example.com>\r\n"
        f"Message-ID: {message_id}\r\n"
        f"Date: {email.utils.format_datetime(when)}\r\n"
        f"From: {sender}\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "X-Mailhost-Test: yes\r\n"
        "\r\n"
    ).encode()
    intro = f"Hello,\r\n\r\nthis is generated test message number {i}.\r\n\r\n".encode()
    outro = b"\r\n-- \r\nmailhost test kit\r\n"
    need = size - len(headers) - len(intro) - len(outro)
    body = b""
    if need > 0:
        while len(_FILLER) < need:  # pragma: no cover - huge messages
            globals()["_FILLER"] = _make_filler(need * 2)
        cut = _FILLER.rfind(b"\r\n", 0, need)
        body = _FILLER[: cut + 2] if cut >= 0 else b""
    return headers + intro + body + outro


# --------------------------------------------------------------------------
# process helpers (everything by PID, never by name)


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) of ``pid`` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2 :].split()
    # rest[0] = state, rest[1] = ppid, ..., starttime is field 22 -> rest[19]
    if rest[0] == b"Z":
        return None
    return int(rest[1]), int(rest[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, starttime) of all live descendants of ``pid``."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no procfs
        return []
    for e in entries:
        if not e.isdigit():
            continue
        st = _proc_stat(int(e))
        if st is not None:
            children.setdefault(st[0], []).append((int(e), st[1]))
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c[0])
    return out


def _same_process_alive(pid: int, starttime: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] == starttime


def _is_log_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").endswith(b"/log")
    except OSError:
        return False


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - non-Linux
        pass


_LIVE: "weakref.WeakSet[Dovecot]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for d in list(_LIVE):
        try:
            d.stop()
        except Exception:
            pass


# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MaildirMessage:
    """One message file in a Maildir folder."""

    path: str
    subdir: str  # "new" or "cur"
    flags: str  # maildir info flags, e.g. "S", "FS", "ST"; "" for new/
    uid: int | None  # from dovecot-uidlist, if Dovecot has seen the file

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    @property
    def seen(self) -> bool:
        return "S" in self.flags

    @property
    def deleted(self) -> bool:
        return "T" in self.flags


def _flags_from_name(name: str) -> str:
    i = name.find(":2,")
    return name[i + 3 :] if i >= 0 else ""


def _time_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"^(\d+)\.(?:M(\d+))?", name)
    if not m:
        return (0, 0, name)
    return (int(m.group(1)), int(m.group(2) or 0), name)


class Dovecot:
    """A private Dovecot instance (see module docstring).

    >>> with Dovecot(pki) as dc:
    ...     dc.deliver("alice", generate_message(1))
    ...     imaplib.IMAP4_SSL(dc.host, dc.imaps_port, ssl_context=ctx)
    """

    host: str = "127.0.0.1"
    generate_message = staticmethod(generate_message)

    def __init__(
        self,
        pki: Pki | None = None,
        *,
        starttls: bool = True,
        untrusted: bool = False,
        pop3_no_flag_updates: bool = True,
        users: Mapping[str, str] | None = None,
        master_users: Mapping[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        mail_user: str = "nobody",
        extra_config: str = "",
        binary: str = DOVECOT_BINARY,
        startup_timeout: float = 15.0,
        keep_workdir: bool | None = None,
    ) -> None:
        """Prepare (not start) an instance.

        ``pki``: certificates to serve (generated into the workdir if None).
        ``starttls=False``: ``ssl = no`` -- plain listeners offer no
        STARTTLS/STLS and the implicit-TLS listeners are disabled.
        ``untrusted=True``: serve the certificate of the *untrusted* CA.
        ``users``: initial users (default alice/alice-pw, bob/bob-pw).
        ``master_users``: default master/master-pw.
        ``extra_config``: appended verbatim to dovecot.conf.
        ``keep_workdir``: keep the temp dir after :meth:`cleanup` (default:
        env ``MAILHOST_KEEP_SERVERS=1``)."""
        self.binary = binary
        self.starttls = starttls
        self.untrusted = untrusted
        self.pop3_no_flag_updates = pop3_no_flag_updates
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        if keep_workdir is None:
            keep_workdir = os.environ.get("MAILHOST_KEEP_SERVERS", "") in ("1", "true", "yes")
        self.keep_workdir = keep_workdir

        if workdir is None:
            # short path: unix socket paths under base_dir must stay < 108 bytes
            self.workdir = Path(tempfile.mkdtemp(prefix="mhdc-"))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        os.chmod(self.workdir, 0o755)  # mail/auth processes must traverse it

        self._pki = pki if pki is not None else make_pki(self.workdir / "pki")

        self._root = os.geteuid() == 0
        if self._root:
            self.login_user = self._first_existing_user("dovenull", "nobody")
            self.internal_user = self._first_existing_user("dovecot", "nobody")
            try:
                pw = pwd.getpwnam(mail_user)
                self.mail_uid, self.mail_gid = pw.pw_uid, pw.pw_gid
            except KeyError:
                if mail_user != "nobody":
                    raise
                self.mail_uid = self.mail_gid = 65534
            self._auth_gid = pwd.getpwnam(self.internal_user).pw_gid
            self.internal_group = grp.getgrgid(self._auth_gid).gr_name
        else:
            me = pwd.getpwuid(os.getuid()).pw_name
            self.login_user = self.internal_user = me
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()
            self._auth_gid = os.getgid()
            self.internal_group = grp.getgrgid(self._auth_gid).gr_name

        self.config_file = self.workdir / "dovecot.conf"
        self.base_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        self.log_file = self.workdir / "dovecot.log"
        self.stderr_file = self.workdir / "dovecot.stderr"
        self.users_dir = self.workdir / "users.d"
        self.masters_dir = self.workdir / "masters.d"
        self.home_root = self.workdir / "home"
        for d in (self.base_dir, self.state_dir):
            d.mkdir(exist_ok=True)
        for d in (self.users_dir, self.masters_dir):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o750)
            if self._root:
                os.chown(d, 0, self._auth_gid)
        self.home_root.mkdir(exist_ok=True)
        os.chmod(self.home_root, 0o755)

        self._users: dict[str, str] = {}
        self._masters: dict[str, str] = {}
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._deliver_seq = itertools.count()
        self._last_stamp_us = 0
        self._instance = f"mh-{uuid.uuid4().hex[:8]}"

        for name, password in (DEFAULT_USERS if users is None else users).items():
            self.add_user(name, password)
        for name, password in (
            DEFAULT_MASTER_USERS if master_users is None else master_users
        ).items():
            self.add_master_user(name, password)

    # ------------------------------------------------------------------ props

    @staticmethod
    def _first_existing_user(*names: str) -> str:
        for n in names:
            try:
                pwd.getpwnam(n)
                return n
            except KeyError:
                continue
        raise DovecotError(f"none of the users {names} exist")

    @property
    def pki(self) -> Pki:
        return self._pki

    @property
    def ca_file(self) -> str:
        """The *trusted* CA (even for ``untrusted=True`` instances, whose
        certificate it must fail to verify)."""
        return self._pki.ca_file

    @property
    def served_ca_file(self) -> str:
        """The CA that actually issued the certificate this instance serves."""
        return self._pki.untrusted_ca_file if self.untrusted else self._pki.ca_file

    def _port(self, name: str) -> int:
        if self._ports is None:
            raise DovecotError("Dovecot not started yet (ports are chosen at start())")
        if not self.starttls and name in ("imaps", "pop3s"):
            raise DovecotError(f"{name} listener is disabled on a starttls=False (ssl=no) instance")
        return self._ports[name]

    @property
    def imap_port(self) -> int:
        return self._port("imap")

    @property
    def imaps_port(self) -> int:
        return self._port("imaps")

    @property
    def pop3_port(self) -> int:
        return self._port("pop3")

    @property
    def pop3s_port(self) -> int:
        return self._port("pop3s")

    @property
    def pid(self) -> int | None:
        """PID of the Dovecot master process (None when not running)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def users(self) -> dict[str, str]:
        """Copy of ``{user: password}``."""
        return dict(self._users)

    def setting(self, name: str) -> str:
        """The value Dovecot reads for setting ``name`` from this instance's
        config (``doveconf -h``; nested ones as ``service/anvil/...``)."""
        # doveconf is installed beside the dovecot binary: <prefix>/sbin -> <prefix>/bin
        doveconf = Path(self.binary).parent.parent / "bin" / "doveconf"
        return subprocess.run([str(doveconf), "-c", str(self.config_file), "-h", name],
                              capture_output=True, text=True, check=True).stdout.strip()

    def log_text(self, since: int = 0) -> str:
        """Contents of the Dovecot log from byte offset ``since`` (plus the
        master's early stderr output of the last start, if any)."""
        parts = []
        for p, offset in ((self.log_file, since), (self.stderr_file, 0)):
            try:
                with open(p, "rb") as f:
                    f.seek(offset)
                    t = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                continue
            if t.strip():
                parts.append(f"--- {p} ---\n{t}")
        return "\n".join(parts)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------------ users

    @staticmethod
    def _check_cred(name: str, password: str) -> None:
        if not _USERNAME_RE.match(name):
            raise ValueError(f"invalid user name {name!r} (allowed: A-Z a-z 0-9 . - _ @)")
        if any(c in password for c in ":\r\n\0") or not password:
            raise ValueError("password must be non-empty and contain no ':', CR, LF or NUL")

    def _write_db_file(self, directory: Path, name: str, line: str) -> None:
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, line.encode())
            if self._root:
                os.fchown(fd, 0, self._auth_gid)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)

    def home(self, user: str) -> Path:
        return self.home_root / user

    def maildir(self, user: str) -> Path:
        return self.home(user) / "Maildir"

    def add_user(self, name: str, password: str, home: str | None = None) -> None:
        """Create (or overwrite) a user with a plaintext password and an empty
        Maildir. Works before start and while running (takes effect at once
        for a new user; a *changed* password of an existing user may take up
        to ~1 s because Dovecot re-stats a passwd-file at most once a second).
        ``home``: a home directory taken as it is, nothing created (``/dev/null/x``:
        one the server cannot open, so that it signs the user in and then fails)."""
        self._check_cred(name, password)
        with self._lock:
            if home is None:
                home = str(self.home(name))
                self._mkdir_owned(self.home(name), 0o700)
                self._mkdir_owned(self.maildir(name), 0o700)
                for sub in ("cur", "new", "tmp"):
                    self._mkdir_owned(self.maildir(name) / sub, 0o700)
            self._write_db_file(
                self.users_dir,
                name,
                f"{name}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{home}::\n",
            )
            self._users[name] = password

    def add_master_user(self, name: str, password: str) -> None:
        """Add a master user (may log in as any user via authzid / ``user*master``)."""
        self._check_cred(name, password)
        with self._lock:
            self._write_db_file(self.masters_dir, name, f"{name}:{{PLAIN}}{password}\n")
            self._masters[name] = password

    def remove_user(self, name: str) -> None:
        """Remove a user's passdb entry (its Maildir stays)."""
        with self._lock:
            try:
                os.unlink(self.users_dir / name)
            except FileNotFoundError:
                pass
            self._users.pop(name, None)

    def new_user(self, prefix: str = "u") -> tuple[str, str]:
        """Create a fresh, unique user; returns ``(user, password)``."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        password = f"pw-{uuid.uuid4().hex[:12]}"
        self.add_user(name, password)
        return name, password

    # ------------------------------------------------------------- lifecycle

    def _render_config(self) -> str:
        assert self._ports is not None
        p = self._ports
        cert = self._pki.untrusted_cert_file if self.untrusted else self._pki.cert_file
        key = self._pki.untrusted_key_file if self.untrusted else self._pki.key_file
        tls_port = (lambda n: p[n]) if self.starttls else (lambda n: 0)
        if self.starttls:
            ssl_conf = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2\n"
        else:
            ssl_conf = "ssl = no\n"
        chroot = "" if self._root else "  chroot =\n"
        return f"""# generated by tests/servers/dovecot.py -- private test instance
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = {self._instance}
log_path = {self.log_file}
info_log_path = {self.log_file}
log_timestamp = "%Y-%m-%d %H:%M:%S "
listen = 127.0.0.1
protocols = imap pop3
shutdown_clients = yes

default_internal_user = {self.internal_user}
default_login_user = {self.login_user}
default_internal_group = {self.internal_group}
first_valid_uid = {min(self.mail_uid, 500) if self.mail_uid else 1}
first_valid_gid = 1

{ssl_conf}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
auth_failure_delay = 0
auth_verbose = yes
auth_cache_size = 0

passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.masters_dir}/%u
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = {self.users_dir}/%u
}}

mail_location = maildir:~/Maildir
mail_fsync = never
mailbox_idle_check_interval = 1 secs
mail_max_userip_connections = 1000
namespace inbox {{
  inbox = yes
  separator = /
  prefix =
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
}}

protocol imap {{
  mail_max_userip_connections = 1000
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
  pop3_no_flag_updates = {"yes" if self.pop3_no_flag_updates else "no"}
}}

# no growing auth penalty for failed logins from 127.0.0.1 (tests fail
# logins on purpose; with the penalty later valid logins wait up to 15 s)
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
{chroot}  inet_listener imap {{
    address = 127.0.0.1
    port = {p["imap"]}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port("imaps")}
    ssl = yes
  }}
}}
service pop3-login {{
{chroot}  inet_listener pop3 {{
    address = 127.0.0.1
    port = {p["pop3"]}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {tls_port("pop3s")}
    ssl = yes
  }}
}}
{self.extra_config}
"""

    def start(self) -> "Dovecot":
        """Write the config, spawn ``dovecot -F`` and wait until all listeners
        accept connections and IMAP greets. Raises :class:`DovecotError` (with
        the log) on failure. Ports are chosen on the first start and kept
        across restarts."""
        with self._lock:
            if self.running:
                return self
            reason = dovecot_missing_reason(self.binary)
            if reason:
                raise DovecotError(reason)
            fresh_ports = self._ports is None
            attempts = 4 if fresh_ports else 3
            last: DovecotError | None = None
            for attempt in range(attempts):
                if self._ports is None or (fresh_ports and attempt > 0):
                    self._ports = dict(zip(("imap", "imaps", "pop3", "pop3s"), free_ports(4)))
                try:
                    self._spawn_and_wait()
                    _LIVE.add(self)
                    return self
                except DovecotError as e:
                    last = e
                    if "in use" not in str(e):
                        raise
                    time.sleep(0.2)
            assert last is not None
            raise last

    def _spawn_and_wait(self) -> None:
        self.config_file.write_text(self._render_config())
        log_from = self._log_size()
        stale = self.base_dir / "master.pid"
        if stale.exists():
            stale.unlink()
        with open(self.stderr_file, "wb") as err:
            preexec = _set_pdeathsig if threading.current_thread() is threading.main_thread() else None
            self._proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                close_fds=True,
                preexec_fn=preexec,
            )
        deadline = time.monotonic() + self.startup_timeout
        ports = [self._ports["imap"], self._ports["pop3"]]  # type: ignore[index]
        if self.starttls:
            ports += [self._ports["imaps"], self._ports["pop3s"]]  # type: ignore[index]
        pending = list(ports)
        try:
            while pending:
                if self._proc.poll() is not None:
                    raise DovecotError(
                        f"dovecot exited with status {self._proc.returncode} during startup\n"
                        + self.log_text(log_from)
                    )
                if time.monotonic() > deadline:
                    raise DovecotError(
                        f"dovecot did not listen on {pending} within {self.startup_timeout}s\n"
                        + self.log_text(log_from)
                    )
                try:
                    with socket.create_connection((self.host, pending[0]), timeout=1.0):
                        pass
                    pending.pop(0)
                except OSError:
                    time.sleep(0.01)
            # imap-login must actually answer
            greeting = self._read_greeting(self._ports["imap"], deadline)  # type: ignore[index]
            if not greeting.startswith(b"* OK") or self._proc.poll() is not None:
                raise DovecotError(
                    f"dovecot not serving (greeting {greeting!r}, exit status "
                    f"{self._proc.returncode})\n" + self.log_text(log_from)
                )
        except BaseException:
            self._kill_tree()
            raise

    def _read_greeting(self, port: int, deadline: float) -> bytes:
        while True:
            try:
                with socket.create_connection((self.host, port), timeout=5.0) as s:
                    s.settimeout(max(0.5, deadline - time.monotonic()))
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(1024)
                        if not chunk:
                            break
                        data += chunk
                    if data:
                        return data
            except OSError as e:
                if time.monotonic() > deadline:
                    raise DovecotError(f"no IMAP greeting: {e}\n" + self.log_text()) from e
            time.sleep(0.02)

    def _our_processes(self) -> list[tuple[int, int]]:
        """(pid, starttime) of this instance's processes: descendants of the
        master we spawned, plus orphans whose process title carries our
        unique instance name (``dovecot-<instance>/...``)."""
        found: dict[int, int] = {}
        if self._proc is not None and self._proc.poll() is None:
            found.update(descendants(self._proc.pid))
        tag = f"dovecot-{self._instance}/".encode()
        for e in os.listdir("/proc"):
            if not e.isdigit() or int(e) in found:
                continue
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    if not f.read(len(tag)) == tag:
                        continue
            except OSError:
                continue
            st = _proc_stat(int(e))
            if st is not None:
                found[int(e)] = st[1]
        return list(found.items())

    def _kill_tree(self, grace: float = 0.5) -> None:
        """Stop the master we spawned and all its processes, by PID.

        SIGTERM to the master makes every child shut down within
        milliseconds -- except processes still serving a client connection,
        which linger (even after the master is gone); and Dovecot's own
        shutdown always ends with a fixed 1 s sleep. So: SIGTERM the master;
        wait (at most ``grace`` s) until every child except the ``log``
        process has exited; SIGTERM the stragglers (their clients get
        "* BYE"), SIGKILL the master (only sleeping by then), SIGKILL
        whatever is left after 1 s."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < end:
                if all(_is_log_process(pid) for pid, _ in self._our_processes()):
                    break
                time.sleep(0.005)
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            left = [k for k in self._our_processes() if _same_process_alive(*k)]
            for pid, start in left:
                if sig == signal.SIGKILL or not _is_log_process(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if proc.poll() is None:
                proc.kill()
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if proc.poll() is not None and not any(
                    _same_process_alive(*k) for k in self._our_processes()
                ):
                    break
                time.sleep(0.005)
            else:
                continue
            break
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self._proc = None

    def stop(self) -> None:
        """Stop the master (SIGTERM to the PID we spawned, SIGKILL after 10 s)
        and wait for its children to exit. Idempotent."""
        with self._lock:
            self._kill_tree()
            _LIVE.discard(self)

    def restart(self) -> None:
        """stop() + start() on the same ports."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """stop() and remove the temp directory (unless keep_workdir)."""
        self.stop()
        if self._own_workdir and not self.keep_workdir:
            for _ in range(20):
                shutil.rmtree(self.workdir, ignore_errors=True)
                if not self.workdir.exists():
                    break
                time.sleep(0.05)

    def __enter__(self) -> "Dovecot":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        ports = self._ports or {}
        return f"<Dovecot pid={self.pid} workdir={self.workdir} ports={ports}>"

    # --------------------------------------------------------------- maildir

    def _mkdir_owned(self, path: Path, mode: int = 0o700) -> None:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return
        if self._root:
            os.chown(path, self.mail_uid, self.mail_gid)

    @staticmethod
    def _folder_parts(folder: str) -> list[str]:
        if folder.upper() == "INBOX":
            return []
        parts = folder.strip("/").split("/")
        for p in parts:
            if not p or "." in p or p in ("cur", "new", "tmp"):
                raise ValueError(
                    f"folder {folder!r}: empty components, '.' and cur/new/tmp are not "
                    "representable in the Maildir++ layout"
                )
        return parts

    def folder_path(self, user: str, folder: str = "INBOX") -> Path:
        """Directory of ``folder`` ("INBOX", "Main/Sub") in ``user``'s Maildir."""
        parts = self._folder_parts(folder)
        root = self.maildir(user)
        if not parts:
            return root
        return root / ("." + ".".join(mutf7_encode(p) for p in parts))

    def create_folder(self, user: str, folder: str, subscribe: bool = True) -> Path:
        """Create ``folder`` and its parents as Maildir++ directories (so IMAP
        LIST shows them); optionally add them to the subscriptions file."""
        with self._lock:
            root = self.maildir(user)
            if not root.is_dir():
                raise KeyError(f"unknown user {user!r} (no Maildir at {root})")
            parts = self._folder_parts(folder)
            for n in range(1, len(parts) + 1):
                d = root / ("." + ".".join(mutf7_encode(p) for p in parts[:n]))
                if not (d / "cur").is_dir():
                    self._mkdir_owned(d, 0o700)
                    for sub in ("cur", "new", "tmp"):
                        self._mkdir_owned(d / sub, 0o700)
                    mf = d / "maildirfolder"
                    if not mf.exists():
                        mf.touch(0o600)
                        if self._root:
                            os.chown(mf, self.mail_uid, self.mail_gid)
                    if subscribe:
                        self.subscribe(user, "/".join(parts[:n]))
            return self.folder_path(user, folder)

    def subscriptions(self, user: str) -> list[str]:
        """Subscribed folder names from Dovecot's ``subscriptions`` file."""
        try:
            text = (self.maildir(user) / "subscriptions").read_text("utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        if lines and lines[0].startswith("V\t"):
            lines = lines[1:]
        return [ln.replace("\t", "/") for ln in lines if ln.strip()]

    def subscribe(self, user: str, folder: str) -> None:
        """Add ``folder`` to the user's subscriptions (Dovecot 2.3 format:
        ``V\\t2`` header, hierarchy separated by TAB)."""
        if folder.upper() == "INBOX":
            return
        with self._lock:
            current = self.subscriptions(user)
            if folder in current:
                return
            current.append(folder)
            body = "V\t2\n\n" + "".join(f.replace("/", "\t") + "\n" for f in current)
            path = self.maildir(user) / "subscriptions"
            tmp = path.with_name(".subscriptions.mhtmp")
            tmp.write_text(body, "utf-8")
            if self._root:
                os.chown(tmp, self.mail_uid, self.mail_gid)
            os.replace(tmp, path)

    def folders(self, user: str) -> list[str]:
        """All folders in ``user``'s Maildir ("INBOX" first, then sorted)."""
        root = self.maildir(user)
        out = []
        for e in os.scandir(root):
            if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir():
                if not os.path.isdir(os.path.join(e.path, "cur")):
                    continue
                out.append("/".join(mutf7_decode(p) for p in e.name[1:].split(".")))
        return ["INBOX"] + sorted(out)

    def _stamp(self) -> tuple[int, int]:
        """Strictly increasing (seconds, microseconds) for file names."""
        now = time.time_ns() // 1000
        with self._lock:
            if now <= self._last_stamp_us:
                now = self._last_stamp_us + 1
            self._last_stamp_us = now
        return divmod(now, 1_000_000)

    def _write_one(
        self,
        tmpdir: str,
        destdir: str,
        raw: bytes,
        info: str | None,
        mtime: float | None,
    ) -> str:
        sec, usec = self._stamp()
        vsize = len(raw) + raw.count(b"\n") - raw.count(b"\r\n")
        base = f"{sec}.M{usec}P{os.getpid()}Q{next(self._deliver_seq)}.{_HOSTNAME},S={len(raw)},W={vsize}"
        tmp = os.path.join(tmpdir, base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(raw)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self._root:
                os.fchown(fd, self.mail_uid, self.mail_gid)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        final = os.path.join(destdir, base if info is None else f"{base}:2,{info}")
        os.rename(tmp, final)
        return final

    def _target(self, user: str, folder: str) -> Path:
        path = self.folder_path(user, folder)
        if not (path / "cur").is_dir():
            if folder.upper() == "INBOX":
                raise KeyError(f"unknown user {user!r} (no Maildir at {path})")
            self.create_folder(user, folder)
        return path

    @staticmethod
    def _info(seen: bool, flags: str) -> str | None:
        letters = set(flags.upper() if flags else "")
        if seen:
            letters.add("S")
        bad = letters - set("DFPRST")
        if bad:
            raise ValueError(f"unknown maildir flags {sorted(bad)} (use D F P R S T)")
        return "".join(sorted(letters)) if (seen or flags) else None

    def deliver(
        self,
        user: str,
        raw: bytes,
        folder: str = "INBOX",
        seen: bool = False,
        *,
        flags: str = "",
        internaldate: float | None = None,
    ) -> str:
        """Write one message straight into the Maildir (``new/`` if unseen
        and no flags, else ``cur/`` with ``:2,<flags>``; flags are maildir
        letters D F R S T). Creates the folder if needed. ``internaldate``
        (epoch) sets the file mtime, which Dovecot reports as INTERNALDATE.
        Returns the file path."""
        target = self._target(user, folder)
        info = self._info(seen, flags)
        return self._write_one(
            str(target / "tmp"),
            str(target / ("new" if info is None else "cur")),
            raw,
            info,
            internaldate,
        )

    def deliver_many(
        self,
        user: str,
        messages: Iterable[bytes],
        folder: str = "INBOX",
        seen: bool = False,
        *,
        flags: str = "",
    ) -> int:
        """Bulk version of :meth:`deliver`; returns the number written.
        UIDs will follow iteration order."""
        target = self._target(user, folder)
        info = self._info(seen, flags)
        tmpdir = str(target / "tmp")
        dest = str(target / ("new" if info is None else "cur"))
        n = 0
        for raw in messages:
            self._write_one(tmpdir, dest, raw, info, None)
            n += 1
        return n

    # --------------------------------------------------------------- reading

    def _uidlist(self, path: Path) -> tuple[dict[str, int], dict[str, str]]:
        """(basename -> uid, header fields) from dovecot-uidlist."""
        uids: dict[str, int] = {}
        header: dict[str, str] = {}
        try:
            with open(path / "dovecot-uidlist", "r", encoding="utf-8", errors="replace") as f:
                first = f.readline().split()
                for field in first[1:]:
                    header[field[0]] = field[1:]
                for line in f:
                    idx = line.find(" :")
                    if idx < 0:
                        continue
                    try:
                        uid = int(line.split(" ", 1)[0])
                    except ValueError:
                        continue
                    uids[line[idx + 2 :].rstrip("\n")] = uid
        except FileNotFoundError:
            pass
        return uids, header

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int | None:
        """UIDVALIDITY recorded in the folder's dovecot-uidlist (None if Dovecot
        has not indexed the folder yet)."""
        _, header = self._uidlist(self.folder_path(user, folder))
        v = header.get("V")
        return int(v) if v else None

    def maildir_entries(self, user: str, folder: str = "INBOX") -> list[MaildirMessage]:
        """Message files in the folder, in UID order (files Dovecot has not
        seen yet last, in file-name time order)."""
        path = self.folder_path(user, folder)
        uids, _ = self._uidlist(path)
        entries: list[MaildirMessage] = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(path / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith("."):
                    continue
                base = name.split(":2,", 1)[0]
                entries.append(
                    MaildirMessage(
                        path=str(path / sub / name),
                        subdir=sub,
                        flags=_flags_from_name(name) if sub == "cur" else "",
                        uid=uids.get(base),
                    )
                )

        def key(m: MaildirMessage) -> tuple[int, int, tuple[int, int, str]]:
            name = os.path.basename(m.path)
            if m.uid is not None:
                return (0, m.uid, (0, 0, ""))
            return (1, 0, _time_key(name))

        entries.sort(key=key)
        return entries

    def maildir_messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Raw bytes of every message currently in the folder (UID order)."""
        out: list[bytes] = []
        for e in self.maildir_entries(user, folder):
            try:
                out.append(e.read())
            except FileNotFoundError:  # expunged/renamed meanwhile
                continue
        return out

    def flags(self, user: str, folder: str = "INBOX") -> list[str]:
        """Maildir flag letters per message, same order as :meth:`maildir_messages`
        (S=seen, T=deleted, F=flagged, R=answered, D=draft; "" = new/unseen)."""
        return [e.flags for e in self.maildir_entries(user, folder)]

    def flags_by_message_id(self, user: str, folder: str = "INBOX") -> dict[str, str]:
        """``{Message-ID: flags}`` for the folder (messages without an ID skipped)."""
        out: dict[str, str] = {}
        for e in self.maildir_entries(user, folder):
            try:
                with open(e.path, "rb") as f:
                    head = f.read(8192)
            except FileNotFoundError:
                continue
            m = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", head.split(b"\r\n\r\n", 1)[0])
            if m:
                out[m.group(1).decode("ascii", "replace")] = e.flags
        return out

    def reset_uidvalidity(self, user: str, folder: str = "INBOX") -> None:
        """Stop Dovecot, delete the folder's dovecot-uidlist and index files
        (and the user's mailbox-list index, which caches UIDVALIDITY), start
        again: the next SELECT sees a new UIDVALIDITY and renumbered UIDs."""
        with self._lock:
            was_running = self.running
            self.stop()
            path = self.folder_path(user, folder)
            for pattern_dir, prefixes in (
                (path, ("dovecot-uidlist", "dovecot.index")),
                (self.maildir(user), ("dovecot.list.index",)),
            ):
                for e in os.scandir(pattern_dir):
                    if e.is_file() and e.name.startswith(prefixes):
                        os.unlink(e.path)
            # messages Dovecot had moved to cur/ keep their flags; that's fine.
            if was_running:
                self.start()

    def backup(self, user: str) -> Path:
        """A copy of ``user``'s whole Maildir (messages, ``dovecot-uidlist``, indexes),
        for :meth:`restore`. Take it once an IMAP session opened the folder: without
        its ``dovecot-uidlist`` the restored folder gets a new UIDVALIDITY."""
        with self._lock:
            copy = self.workdir / "backups" / uuid.uuid4().hex[:8]
            shutil.copytree(self.maildir(user), copy)
            return copy

    def restore(self, user: str, backup: Path) -> None:
        """Stop Dovecot, put ``backup`` back as ``user``'s Maildir, start again.

        As when an admin restores last night's backup: each folder keeps its
        UIDVALIDITY while its UIDNEXT goes back, so the next messages get UIDs that
        were given to others before (RFC 3501 2.3.1.1 forbids it; restores do it)."""
        with self._lock:
            was_running = self.running
            self.stop()
            target = self.maildir(user)
            shutil.rmtree(target)
            shutil.copytree(backup, target)
            if self._root:
                for root, dirs, files in os.walk(target):
                    for name in [*dirs, *files]:
                        os.chown(os.path.join(root, name), self.mail_uid, self.mail_gid)
                os.chown(target, self.mail_uid, self.mail_gid)
            if was_running:
                self.start()
