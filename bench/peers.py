"""The peers bench/run compares mailhost with: how to get them, and how to point them at
the private Dovecot.

Peers come from Debian's packages: mbsync (isync), getmail6 and offlineimap3 are
installed with apt-get when missing and we may (root, or sudo without a password).
Postfix's ``smtp-source`` and ``smtp-sink`` are never installed as a package, because the
package starts a mail server on port 25: when they are not on the PATH, the ``postfix``
package is downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into a
cache folder, and the two client tools run from there.

Each ``*_config`` function writes a fresh configuration into a folder and returns the
command line; the folder holds the peer's whole state, so a fresh folder is a fresh start
and an old one is a poll.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Installer", "PostfixTools", "Server", "chown_tree", "count_maildir", "getmail_config", "mbsync_config",
           "offlineimap_config", "unprivileged"]

# binary -> Debian package
PACKAGES = {"mbsync": "isync", "getmail": "getmail6", "offlineimap": "offlineimap3", "time": "time"}


@dataclass
class Installer:
    """Installs missing Debian packages once per run and remembers why one is missing."""

    allowed: bool = True
    log: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # binary -> why
    _updated: bool = False

    def _apt(self) -> list[str] | None:
        if not shutil.which("apt-get"):
            return None
        if os.geteuid() == 0:
            return []
        sudo = shutil.which("sudo")
        if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True, check=False).returncode == 0:
            return ["sudo", "-n"]
        return None

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        self.log.append(f"$ {' '.join(argv)} -> {done.returncode}")
        return done

    def update(self) -> bool:
        """``apt-get update``, once per run."""
        prefix = self._apt()
        if prefix is None:
            return False
        if not self._updated:
            self._updated = self._run([*prefix, "apt-get", "update", "-qq"]).returncode == 0
        return self._updated

    def ensure(self, binaries: list[str]) -> dict[str, str]:
        """Path of each binary that is (or could be made) available; the others land in ``missing``."""
        found = {b: shutil.which(b) for b in binaries}
        wanted = [b for b, path in found.items() if path is None]
        if wanted and not self.allowed:
            for b in wanted:
                self.missing[b] = f"not installed (Debian package {PACKAGES[b]}; --no-install given)"
        elif wanted:
            prefix = self._apt()
            if prefix is None:
                for b in wanted:
                    self.missing[b] = (f"not installed, and apt-get is not usable here (needs Debian/Ubuntu and root "
                                       f"or passwordless sudo): apt-get install {PACKAGES[b]}")
            else:
                self.update()
                for b in wanted:
                    done = self._run([*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                      PACKAGES[b]])
                    found[b] = shutil.which(b)
                    if found[b] is None:
                        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                        self.missing[b] = f"apt-get install {PACKAGES[b]} failed: {last[0]}"
        return {b: p for b, p in found.items() if p}


@dataclass
class PostfixTools:
    """``smtp-source`` and ``smtp-sink``: from the PATH, else unpacked from the postfix .deb."""

    source: str
    sink: str
    env: dict[str, str]
    origin: str

    @classmethod
    def find(cls, cache: Path, installer: Installer) -> PostfixTools | str:
        """The tools, or the reason they are not available."""
        source, sink = shutil.which("smtp-source"), shutil.which("smtp-sink")
        if source and sink:
            return cls(source, sink, {}, "installed (PATH)")
        root = cache / "postfix"
        unpacked = root / "usr" / "sbin" / "smtp-source"
        if not unpacked.exists():
            if not installer.allowed:
                return "smtp-source is not installed (Debian package postfix; --no-install given)"
            if not shutil.which("apt-get") or not shutil.which("dpkg"):
                return "smtp-source is not installed and there is no apt-get/dpkg to unpack Debian's postfix package"
            installer.update()
            cache.mkdir(parents=True, exist_ok=True)
            for old in cache.glob("postfix_*.deb"):
                old.unlink()
            done = installer._run(["sh", "-c", f"cd '{cache}' && apt-get download postfix"])
            debs = sorted(cache.glob("postfix_*.deb"))
            if not debs:
                return f"apt-get download postfix failed: {(done.stderr or done.stdout).strip()[-200:]}"
            installer._run(["dpkg", "-x", str(debs[-1]), str(root)])
            if not unpacked.exists():
                return f"dpkg -x {debs[-1].name} did not give usr/sbin/smtp-source"
        libs = root / "usr" / "lib" / "postfix"
        env = {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
        check = subprocess.run([str(unpacked)], capture_output=True, text=True, env={**os.environ, **env}, check=False)
        if "usage" not in (check.stderr + check.stdout):
            return f"the unpacked smtp-source does not run: {(check.stderr or check.stdout).strip()[-200:]}"
        return cls(str(unpacked), str(root / "usr" / "sbin" / "smtp-sink"), env,
                   "unpacked from Debian's postfix package (apt-get download + dpkg -x; no daemon)")


def unprivileged() -> tuple[int, int] | None:
    """(uid, gid) to run peers as when we are root (getmail refuses to deliver as root)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def chown_tree(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    for root, _, files in os.walk(path):
        os.chown(root, *owner)
        for name in files:
            os.chown(os.path.join(root, name), *owner)


def count_maildir(path: Path) -> int:
    """Message files in a Maildir folder (new/ and cur/)."""
    total = 0
    for sub in ("new", "cur"):
        try:
            total += sum(1 for name in os.listdir(path / sub) if not name.startswith("."))
        except FileNotFoundError:
            pass
    return total


@dataclass(frozen=True)
class Server:
    """Where the peers connect: one user's mailbox on the private Dovecot."""

    host: str
    port: int
    user: str
    password: str
    tls: bool
    ca_file: str


def mbsync_config(folder: Path, server: Server) -> tuple[list[str], Path]:
    """mbsync pulling INBOX into a Maildir, with isync's defaults otherwise (FSync yes)."""
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "mail"
    store.mkdir(exist_ok=True)
    rc = folder / "mbsyncrc"
    rc.write_text(f"""IMAPAccount bench
Host {server.host}
Port {server.port}
User {server.user}
Pass {server.password}
SSLType {"IMAPS" if server.tls else "None"}
CertificateFile {server.ca_file}

IMAPStore remote
Account bench

MaildirStore local
Path {store}/
Inbox {store}/INBOX
SubFolders Verbatim

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
    return ["mbsync", "-c", str(rc), "-q", "bench"], store / "INBOX"


def getmail_config(folder: Path, server: Server, protocol: str) -> tuple[list[str], Path]:
    """getmail6 into a Maildir, new messages only (its oldmail file is the state)."""
    maildir = folder / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    state = folder / "state"
    state.mkdir(exist_ok=True)
    kind = {"imap": "IMAP", "pop3": "POP3"}[protocol]
    retriever = f"Simple{kind}{'SSL' if server.tls else ''}Retriever"
    extra = 'mailboxes = ("INBOX",)\n' if protocol == "imap" else ""
    if server.tls:
        extra += f"ca_certs = {server.ca_file}\n"
    rc = folder / "getmailrc"
    rc.write_text(f"""[retriever]
type = {retriever}
server = {server.host}
port = {server.port}
username = {server.user}
password = {server.password}
{extra}
[destination]
type = Maildir
path = {maildir}/

[options]
read_all = false
delete = false
verbose = 0
message_log_syslog = false
""")
    return [*_getmail_interpreter(), "--rcfile", str(rc), "--getmaildir", str(state), "--quiet"], maildir


def _getmail_interpreter() -> list[str]:
    """getmail's own interpreter (its #! line) running this file, which fixes its race and runs it."""
    path = shutil.which("getmail")
    python = "python3"
    if path:
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
        if first.startswith("#!") and "python" in first:
            python = first[2:].strip().split()[0] if not first.startswith("#!/usr/bin/env") else first.split()[-1]
    return [python, str(Path(__file__).resolve()), "getmail", path or "getmail"]



def run_getmail(script: str, args: list[str]) -> None:
    """Run getmail with one bug fixed: a lost SIGCHLD in ``ForkingBase.forkchild``.

    getmail forks a child to deliver each message, installs its SIGCHLD handler only
    after the fork, and waits on a condition that the handler notifies. A child that
    exits before the handler is installed (likely on a busy machine: here within a few
    hundred messages) is never reaped, and getmail waits its whole ``timeout`` (180 s),
    then aborts the run with "waiting child pid N timed out" (getmail6 issues #52 and
    #226; Debian 12 ships 6.18.11). The fix waits in short slices and, between them,
    reaps the child itself with ``waitpid(WNOHANG)``; nothing else of getmail changes.
    """
    import runpy
    import signal
    import sys

    from getmailcore import baseclasses  # type: ignore[import-not-found]

    original = baseclasses.ForkingBase._wait_for_child

    def wait_for_child(self: object, childpid: int) -> int:
        cond = self._ForkingBase__child_exited  # type: ignore[attr-defined]
        with cond:
            while self._ForkingBase__child_status is None:  # type: ignore[attr-defined]
                if cond.wait(0.01):
                    continue
                try:
                    pid, status = os.waitpid(childpid, os.WNOHANG)
                except ChildProcessError:  # the handler reaped it meanwhile, or it is not ours
                    if self._ForkingBase__child_status is None:  # type: ignore[attr-defined]
                        raise baseclasses.getmailOperationError(f"child pid {childpid} is gone") from None
                    continue
                if pid == childpid:
                    signal.signal(signal.SIGCHLD, self._ForkingBase__orig_handler)  # type: ignore[attr-defined]
                    self._ForkingBase__child_pid, self._ForkingBase__child_status = pid, status
        return _checked(self, childpid)

    def _checked(self: object, childpid: int) -> int:  # the rest of the original, unchanged
        status = self._ForkingBase__child_status  # type: ignore[attr-defined]
        pid = self._ForkingBase__child_pid  # type: ignore[attr-defined]
        error = baseclasses.getmailOperationError
        if pid != childpid:
            raise error(f"got child pid {pid}, not {childpid}")
        if os.WIFSTOPPED(status):
            raise error(f"child pid {pid} stopped by signal {os.WSTOPSIG(status)}")
        if os.WIFSIGNALED(status):
            raise error(f"child pid {pid} killed by signal {os.WTERMSIG(status)}")
        if not os.WIFEXITED(status):
            raise error(f"child pid {pid} failed to exit")
        return os.WEXITSTATUS(status)

    assert original.__code__.co_argcount == 2, "getmail's _wait_for_child changed: review the fix"
    baseclasses.ForkingBase._wait_for_child = wait_for_child
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def offlineimap_config(folder: Path, server: Server) -> tuple[list[str], Path]:
    """offlineimap3 one-shot into a Maildir, read-only on the server, its defaults otherwise."""
    meta, mail = folder / "meta", folder / "mail"
    meta.mkdir(parents=True, exist_ok=True)
    mail.mkdir(exist_ok=True)
    tls = f"ssl = yes\nsslcacertfile = {server.ca_file}" if server.tls else "ssl = no\nstarttls = no"
    rc = folder / "offlineimaprc"
    rc.write_text(f"""[general]
accounts = bench
metadata = {meta}
ui = quiet

[Account bench]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {mail}

[Repository remote]
type = IMAP
remotehost = {server.host}
remoteport = {server.port}
remoteuser = {server.user}
remotepass = {server.password}
{tls}
folderfilter = lambda name: name == 'INBOX'
readonly = True
""")
    return ["offlineimap", "-c", str(rc), "-o", "-u", "quiet"], mail / "INBOX"


if __name__ == "__main__":
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "getmail":
        run_getmail(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit("usage: peers.py getmail /usr/bin/getmail [getmail options]")
