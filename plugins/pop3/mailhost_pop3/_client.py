"""poplib, with one receive buffer: exact bytes, pipelining, and speed.

poplib reads every reply line by line and drops the line endings, which costs more than
the network on a big mailbox and loses the message's exact bytes. :class:`Client` keeps
poplib's commands but reads through one buffer: a multi-line reply is located with one
search for its terminating ``CRLF.CRLF`` and dot-unstuffed with one replace.

Errors: ``poplib.error_proto`` carries a ``-ERR`` reply (the server said no);
:class:`LinkError` (an ``OSError``, like timeouts and resets) means the link is unusable.
Every reply is read inside a :class:`~mailhost.protocols.StallGuard` (see
:meth:`Client.watching`): a server that drips one, each byte within the read timeout,
is cut off with a ``TemporaryFailure`` naming the command.
"""
from __future__ import annotations

import base64
import contextlib
import poplib
import re
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from mailhost.protocols import STALL_PIECE, StallGuard

__all__ = ["Client", "LinkError", "WINDOW"]

_CHUNK = 256 * 1024
_MAXLINE = 8192  # status and listing lines; RFC 1939 allows 512, be lenient
#: Commands in flight when pipelining: a few hundred bytes, far below any TCP window,
#: so the server can never block on writing while we block on sending (RFC 2449).
WINDOW = 64


class LinkError(ConnectionError):
    """The server closed the link, or sent something that is not POP3."""


class Client(poplib.POP3):
    """A POP3 client on an already connected (and, for implicit TLS, wrapped) socket;
    ``where`` names the connection and server in errors, ``timeout`` is the connection's."""

    def __init__(self, sock: socket.socket, host: str, where: str, timeout: float) -> None:
        self._given = self.sock = sock  # (poplib sets sock again; the greeting's guard needs it first)
        self._where, self._timeout = where, timeout
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf
        self._pending = 0  # replies to pipelined commands nobody read (an abandoned fetch)
        self._pending_long = False
        self.broken = False  # a read or write failed: what is buffered can no longer be trusted
        #: Stepped for every pipelined reply and every STALL_PIECE bytes read; see :meth:`watching`.
        self.guard: StallGuard | None = None
        self._unstepped = 0  # bytes read since the guard's last step
        self.capabilities: dict[str, list[str]] = {}
        # poplib connects in __init__ (the timeout goes to _create_socket, which ignores
        # it), makes self.file, which stays unused (every byte goes through _buf), and
        # reads the greeting.
        with self.watching("its greeting"):
            super().__init__(host, sock.getpeername()[1], 0.0)

    if TYPE_CHECKING:  # poplib internals that typeshed leaves out

        def _putcmd(self, line: str) -> None: ...

        def _getresp(self) -> bytes: ...

    def _create_socket(self, timeout: float) -> socket.socket:
        return self._given

    @contextlib.contextmanager
    def watching(self, answer: str) -> Iterator[StallGuard]:
        """Read ``answer`` (``"its answer to UIDL"``) inside a :class:`StallGuard`, stepped
        for every reply of a pipeline and every STALL_PIECE bytes; a link it cut off raises
        the guard's ``TemporaryFailure`` naming the server and ``answer``. Inside a guard a
        caller set (a session's download, which names the message itself), that one watches."""
        if self.guard is not None:
            yield self.guard
            return
        with StallGuard(self.sock, self._timeout) as guard:
            self.guard, self._unstepped = guard, 0
            try:
                yield guard
            except OSError:
                if guard.fired:
                    raise guard.failure(self._where, answer, download=False) from None
                raise
            finally:
                if self.guard is guard:
                    self.guard = None

    def _shortcmd(self, line: str) -> bytes:
        with self.watching(f"its answer to {_name(line)}"):
            return super()._shortcmd(line)

    def _longcmd(self, line: str) -> tuple[bytes, list[bytes], int]:
        with self.watching(f"its answer to {_name(line)}"):
            return super()._longcmd(line)

    # -- reading ------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._pos:  # what is left is part of one reply
            del self._buf[: self._pos]
            self._pos = 0
        try:
            data = self.sock.recv(_CHUNK)
            if not data:
                raise LinkError("the server closed the connection")
        except OSError:
            # Half a reply stays in the buffer: never let a later command read it as its own.
            self.broken = True
            raise
        self._buf += data
        if self.guard is not None:
            self._unstepped += len(data)
            if self._unstepped >= STALL_PIECE:
                self._unstepped = 0
                self.guard.step()

    def _find(self, sep: bytes, start: int = 0, limit: int | None = None) -> int:
        """Offset (from the read position) of the next ``sep`` at or after ``start``."""
        while True:
            i = self._buf.find(sep, self._pos + start)
            if i >= 0:
                return i - self._pos
            start = max(start, len(self._buf) - self._pos - len(sep) + 1)
            if limit is not None and start > limit:
                self.broken = True
                raise LinkError(f"the server sent a line longer than {limit} bytes")
            self._fill()

    def _getline(self) -> tuple[bytes, int]:
        n = self._find(b"\n", 0, _MAXLINE) + 1
        line = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return line.rstrip(b"\r\n"), n

    def read_long(self) -> tuple[bytes, bytes]:
        """Status line and body of one multi-line reply, the body dot-unstuffed with its
        CRLFs as sent; raises ``error_proto`` for ``-ERR``."""
        eol = self._find(b"\n", 0, _MAXLINE)
        status = bytes(self._buf[self._pos : self._pos + eol]).rstrip(b"\r")
        if not status.startswith(b"+"):
            self._pos += eol + 1
            raise poplib.error_proto(status)
        # Search from the status line's own CRLF: an empty body ends right there.
        end = self._find(b"\r\n.\r\n", eol - 1)
        body = self._buf[self._pos + eol + 1 : self._pos + end + 2]
        self._pos += end + 5
        if body.startswith(b".."):
            del body[0]
        if b"\r\n.." in body:
            body = body.replace(b"\r\n..", b"\r\n.")
        return status, bytes(body)

    def _getlongresp(self) -> tuple[bytes, list[bytes], int]:
        status, body = self.read_long()
        return status, body.split(b"\r\n")[:-1], len(body)

    def lines(self, command: str) -> list[bytes]:
        """The lines of a multi-line reply (UIDL, LIST, CAPA); raises ``error_proto`` for ``-ERR``."""
        return self._longcmd(command)[1]

    # -- writing ------------------------------------------------------------------------

    def _putline(self, line: bytes) -> None:
        self._drain()
        self._send(line + b"\r\n")

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.broken = True
            raise

    def _drain(self) -> None:
        """Before a command: refuse a broken link, and read the replies an abandoned
        pipeline left, so the next reply is the command's own."""
        if self.broken:
            raise LinkError("the connection broke earlier in this session")
        while self._pending:
            try:
                self.read_long() if self._pending_long else self._getresp()
            except poplib.error_proto:
                pass
            self._pending -= 1

    def pipeline(self, commands: Sequence[str], long: bool) -> Iterator[bytes | None]:
        """Send ``commands``, yield each reply in order: the body of a multi-line reply
        (``long``) or the status line, ``None`` for ``-ERR``.

        With PIPELINING, up to :data:`WINDOW` commands are in flight; else one at a time.
        Each reply is a step of the guard; the time the caller takes between them counts
        for no stall.
        """
        if not commands:
            return
        with self.watching(f"its answers to {_name(commands[0])}") as guard:
            self._drain()
            window = WINDOW if "PIPELINING" in self.capabilities else 1
            self._pending_long = long
            sent = 0
            for i in range(len(commands)):
                if sent <= i + window // 2:  # refill once half the window is read
                    batch = commands[sent : i + window]
                    self._send("".join(f"{c}\r\n" for c in batch).encode("ascii"))
                    sent += len(batch)
                try:
                    reply: bytes | None = self.read_long()[1] if long else self._getresp()
                except poplib.error_proto:
                    reply = None
                guard.step()
                self._pending = sent - i - 1
                # The caller's time is no stall; and a caller that abandons the pipeline
                # here sends its next commands under guards of their own.
                self.guard = None
                with guard.paused():
                    yield reply
                self.guard = guard

    # -- commands -----------------------------------------------------------------------

    def capa(self) -> dict[str, list[str]]:
        """CAPA (RFC 2449) as ``{NAME: [arguments]}``; empty if the server has no CAPA.
        A ``-ERR`` with a response code (``[SYS/TEMP]``, ``[IN-USE]``, RFC 3206) is no
        "unknown command": the server refuses the session (Dovecot, signed in but unable
        to open the mailbox, says so before it hangs up), and ``error_proto`` says why."""
        try:
            lines = self.lines("CAPA")
        except poplib.error_proto as exc:
            if re.match(rb"-ERR \[[^\]]+\]", exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""):
                raise
            lines = []
        caps: dict[str, list[str]] = {}
        for line in lines:
            words = line.decode("ascii", "replace").split()
            if words:
                caps[words[0].upper()] = [w.upper() for w in words[1:]]
        self.capabilities = caps
        return caps

    def stls(self, context: ssl.SSLContext | None = None) -> bytes:
        """STLS (RFC 2595), then the handshake; verification is up to ``context``."""
        if context is None:
            raise ValueError("STLS needs a verifying SSL context")
        resp = self._shortcmd("STLS")
        # Bytes after the +OK came before any protection: an injection, never a reply.
        del self._buf[:]
        self._pos = 0
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        self._tls_established = True
        self.capabilities = {}  # RFC 2595: what was said in plain text no longer holds
        return resp

    def auth(self, mechanism: str, response: bytes) -> bytes:
        """SASL AUTH (RFC 5034) with one client response; raises ``error_proto`` with the
        server's final reply when it refuses."""
        with self.watching("its answer to AUTH"):
            self._putcmd(f"AUTH {mechanism}")
            reply, _ = self._getline()
            if _is_challenge(reply):
                self._putline(base64.b64encode(response))
                reply, _ = self._getline()
                if _is_challenge(reply):  # XOAUTH2 sends its error as a challenge: ack it
                    self._putline(b"")
                    reply, _ = self._getline()
        if not reply.startswith(b"+OK"):
            raise poplib.error_proto(reply)
        return reply


def _name(command: str) -> str:
    """The command's name, for errors: never its arguments (PASS, APOP carry secrets)."""
    return command.split(" ", 1)[0].upper()


def _is_challenge(reply: bytes) -> bool:
    return reply[:1] == b"+" and not reply.startswith(b"+OK")
