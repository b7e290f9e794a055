"""The SMTP session: connect, secure, sign in once, then send many messages.

Built on :class:`smtplib.SMTP`, with three things the stdlib does not do by itself:
certificates are always verified (the context comes from :mod:`mailhost.tls`),
STARTTLS is never optional once chosen, and every line of the dialogue can be written
to a transcript with secrets masked at the source and then redacted by the host.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import io
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from email.utils import parseaddr
from typing import NoReturn

from mailhost import (
    AuthenticationFailed,
    ConnectFailure,
    ConnectionSettings,
    Encryption,
    MailError,
    OutgoingSession,
    PermanentFailure,
    SendResult,
    TemporaryFailure,
    TestStep,
    TLSFailure,
)
from mailhost.protocols import STALL_PIECE, crlf
from mailhost.secrets import REDACTED, redact
from mailhost.tls import client_context, describe_peer, tls_error

from . import DEFAULT_PORTS  # declared beside the provider, which registers without this module

__all__ = ["DEFAULT_PORTS", "SmtpSession", "open_session", "test_connection"]


Report = Callable[[str, str], None]  # (step name, detail) for each step that succeeded
# Seconds a transaction waits, at least, for each reply and each piece of the message
# to go out (RFC 5321 4.5.3.2; the connection's timeout when longer, which alone bounds
# connecting, the greeting, EHLO and AUTH). A server may check a recipient (a callout,
# greylisting) or the sender for minutes: giving up sooner fails a message it would take.
#: MAIL FROM's reply (RFC 5321 4.5.3.2.2).
MAIL_TIMEOUT = 300.0
#: Each RCPT TO's reply (4.5.3.2.3).
RCPT_TIMEOUT = 300.0
#: DATA's 354 (4.5.3.2.4).
DATA_TIMEOUT = 120.0
#: Each piece of the message going out (4.5.3.2.5).
BLOCK_TIMEOUT = 180.0
#: The reply to the message's final dot (4.5.3.2.6): the server may be committing the
#: message, and giving up sooner invites a duplicate.
FINAL_REPLY_TIMEOUT = 600.0
_DOT_LINE = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2)
#: The longest reply line smtplib reads (its private ``_MAXLINE``); a longer one ends the link.
_MAXLINE: int = getattr(smtplib, "_MAXLINE", 8192)
#: The most one reply may hold, its lines together: 128 of RFC 5321's longest (512 octets,
#: 4.5.3.1.5), far more than any server's EHLO. Past it the server is not answering but
#: streaming, and the link is ended.
MAX_REPLY = 64 * 1024
#: What a command line is called in errors (``"its answer to RCPT TO"``); any other line
#: sent is a step of an AUTH exchange (a SASL response, never named: it may be secret).
_COMMANDS = {"MAIL": "MAIL FROM", "RCPT": "RCPT TO", **{v: v for v in (
    "EHLO", "HELO", "STARTTLS", "AUTH", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP")}}


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    """The name we greet with; looked up once (``getfqdn`` may ask DNS)."""
    name = socket.getfqdn()
    return name if name and "." in name else "localhost.localdomain"


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return " ".join(reply.split())


class _Unreadable(smtplib.SMTPServerDisconnected):
    """A reply could not be read (a line longer than smtplib reads, or no reply code):
    the dialogue is out of step, so the link is closed; its text says why."""


class _Unsent(smtplib.SMTPServerDisconnected):
    """The link failed while the message was being written, before its final dot went
    out, and the server said nothing: it cannot have taken the message."""


class _Answered(smtplib.SMTPResponseException):
    """The server answered while the message was still being written (and the link
    failed): its words, before the final dot went out."""


class _Dripped(smtplib.SMTPServerDisconnected):
    """A reply had begun but not ended when its wait ran out (a server dripping it a
    byte or a line at a time, each within the socket timeout, or sending lines without
    end): the link is closed."""

    def __init__(self, awaiting: str, wait: float, got: int) -> None:
        #: What it was (``"its answer to RCPT TO"``), and why that is wrong: for the in-doubt error.
        self.late = f"{awaiting} did not end within {wait:g} s"
        super().__init__(f"{self.late} ({got} bytes of it came)")


class _Overdue(Exception):
    """Raised by :class:`_Replies` when the reply being read is past its deadline."""


class _Replies(io.RawIOBase):
    """The socket as the reply reader's buffered file reads it, one ``recv`` at a time.

    The socket's timeout stays the connection's: setting it gives up the GIL (a
    ``fcntl``), and doing so around every command cost parallel delivery an eighth of
    its rate. A longer wait (:meth:`_Client.patient`) reads again after each timeout
    until :attr:`deadline`. That bound is the reply's as a whole: a server that sends
    a byte, or a line, just before each read would time out would otherwise hold the
    link (and the messages it carries) for ever; a read after the reply's first raises
    :class:`_Overdue` once the deadline passed (at most one socket timeout late). No
    thread watches and, on the usual one-read reply, no clock is read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        #: When the reply being read must have ended (``time.monotonic``); None: no bound.
        self.deadline: float | None = None
        self.first = True  # the reply's first read is still to come
        self.got = 0  # bytes read since the reply began (for the error)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.first:
            self.first = False
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Overdue
        while True:
            try:
                n = self._sock.recv_into(buffer)
            except (socket.timeout, TimeoutError):
                if self.deadline is None or time.monotonic() >= self.deadline:
                    if self.got:
                        raise _Overdue from None
                    raise  # nothing of the reply came: no answer in time
                continue  # a wait longer than the socket's timeout: read on
            self.got += n
            return n


class _Client(smtplib.SMTP):
    """``smtplib.SMTP`` that writes a masked transcript and is opened step by step."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self._transcript = settings.transcript
        self._mask_next = False
        self.content_sent = False  # the current message's final dot went out
        self.used = False  # a transaction was begun on this link (it is not fresh)
        self.greeted = False  # the server's first line came (a TLS-first port sends none)
        self._patient = False  # inside patient(), which names what is awaited itself
        self._replies: _Replies | None = None  # under self.file, made with it
        super().__init__(local_hostname=_local_hostname(), timeout=settings.timeout)
        #: What the reply being read answers, and how long it may take at most (the last
        #: :meth:`patient` block's, else the last command's and the timeout): for the error
        #: that says so when the wait ran out.
        self.awaiting, self.wait = "an answer", self.timeout

    @contextlib.contextmanager
    def patient(self, least: float, awaiting: str) -> Iterator[None]:
        """Inside, each reply and each piece of the message waits ``least`` seconds, or the
        connection's timeout when that is longer (RFC 5321 4.5.3.2); the connection's
        timeout again after. ``awaiting`` names what is waited for (``"its answer to
        RCPT TO"``). The socket's own timeout is left alone (see :class:`_Replies`)."""
        self.awaiting, self.wait = awaiting, max(least, self.timeout)
        self._patient = True
        try:
            yield
        finally:
            self._patient = False
        self.awaiting, self.wait = "an answer", self.timeout  # not when it failed: the error names the wait

    # -- transcript ---------------------------------------------------------------

    def note(self, line: str) -> None:
        """Write one line to the transcript (redacted by the host's one helper)."""
        if self._transcript is not None:
            self._transcript(redact(line, self._settings.password))

    def putcmd(self, cmd: str, args: str = "") -> None:
        if self._transcript is not None:
            if self._mask_next:
                shown = REDACTED
            elif cmd.upper() == "AUTH":
                mechanism, _, payload = args.partition(" ")
                shown = f"AUTH {mechanism}" + (f" {REDACTED}" if payload else "")
            else:
                shown = f"{cmd} {args}" if args else cmd
            self.note(f"C: {shown}")
        if not self._patient:
            self.awaiting = f"its answer to {_COMMANDS.get(cmd.upper(), 'the AUTH exchange')}"
        self._mask_next = False
        super().putcmd(cmd, args)

    def secret_cmd(self, payload: str) -> tuple[int, bytes]:
        """Send a SASL continuation line, masked in the transcript."""
        self._mask_next = True
        return self.docmd(payload)

    def getreply(self) -> tuple[int, bytes]:
        code, message = self._read_reply()
        if code < 0:  # smtplib stopped at a line without a reply code: the rest would be read as the next reply
            self.note("S: [a line that is not an SMTP reply]")
            self.close()
            raise _Unreadable("a line that is not an SMTP reply")
        if self._transcript is not None:
            lines = message.decode("utf-8", "replace").split("\n") or [""]
            for i, line in enumerate(lines):
                sep = "-" if i < len(lines) - 1 else " "
                self.note(f"S: {code}{sep}{line}")
        return code, message

    def _read_reply(self) -> tuple[int, bytes]:
        """smtplib's ``getreply`` (the same lines, codes and errors), bounded as a whole:
        the reply must end within the step's wait (see :meth:`patient`) and hold at most
        :data:`MAX_REPLY` bytes; else the link is closed and :class:`_Dripped` or
        :class:`_Unreadable` raised."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self.file is None:  # a new link, or TLS begun: nothing read before is kept
            self._replies = _Replies(sock)
            self.file = io.BufferedReader(self._replies)
        replies = self._replies
        assert replies is not None
        wait = self.wait if sock.gettimeout() is not None else None
        replies.deadline = None if wait is None else time.monotonic() + wait
        replies.first, replies.got = True, 0
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                line = self.file.readline(_MAXLINE + 1)
            except _Overdue:
                dripped = _Dripped(self.awaiting, wait or 0.0, replies.got)
                self.note(f"S: [{dripped}]")
                self.close()
                raise dripped from None
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            if len(line) > _MAXLINE:
                self.note(f"S: [a reply line longer than {_MAXLINE} bytes]")
                self.close()
                raise _Unreadable(f"a reply line too long to read (over {_MAXLINE} bytes)")
            size += len(line)
            if size > MAX_REPLY:
                self.note(f"S: [a reply longer than {MAX_REPLY // 1024} KiB]")
                self.close()
                raise _Unreadable(f"a reply of more than {MAX_REPLY // 1024} KiB, which no SMTP reply needs")
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b"-":
                break
        return code, b"\n".join(lines)

    # -- opening, one step at a time ----------------------------------------------

    def open_tcp(self, host: str, port: int) -> None:
        self._host = host
        self.sock = socket.create_connection((host, port), self.timeout)
        self.file = None
        self.note(f"* connected to {host}:{port}")

    def wrap_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        assert self.sock is not None
        self.sock = context.wrap_socket(self.sock, server_hostname=self._host)
        self.file = None
        return self.sock

    def read_greeting(self) -> str:
        self.awaiting = "its greeting"
        code, message = self.getreply()
        self.greeted = True
        if code != 220:
            raise smtplib.SMTPConnectError(code, message)
        return f"{code} {_text(message)}"

    def start_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        """STARTTLS: the reply must be 220, and nothing read before the handshake is kept."""
        code, message = self.docmd("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, message)
        # Anything the server sent after its 220 (an injection, CVE-2011-0411) sits
        # in the plain-text file buffer: smtplib's own starttls() drops that buffer,
        # and so do we by never reading from it again.
        self.file = None
        sock = self.wrap_tls(context)
        # RFC 3207: forget everything learned before the handshake.
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        return sock

    def data_gated(self, msg: bytes, gate: Callable[[], None] | None) -> tuple[int, bytes]:
        """``smtplib.SMTP.data`` with a gate between the 354 and the message, and the
        long wait for the final reply. ``content_sent`` says whether the final dot went out."""
        self.content_sent = False
        with self.patient(DATA_TIMEOUT, "its answer to DATA"):
            self.putcmd("data")
            code, reply = self.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, reply)
        if gate is not None:
            try:
                gate()
            except BaseException:
                self.close()  # no final dot: the server throws the message away
                raise
        q = _DOT_LINE.sub(b"..", msg)
        if q[-2:] != b"\r\n":
            q += b"\r\n"
        with self.patient(BLOCK_TIMEOUT, "the message"):
            self.write_content(q + b".\r\n")
        self.content_sent = True
        with self.patient(FINAL_REPLY_TIMEOUT, "its answer to the final dot"):
            return self.getreply()

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        with self.patient(MAIL_TIMEOUT, "its answer to MAIL FROM"):
            return super().mail(sender, options)

    def rcpt(self, recip: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        with self.patient(RCPT_TIMEOUT, "its answer to RCPT TO"):
            return super().rcpt(recip, options)

    def write_content(self, data: bytes) -> None:
        """Write the message (dot-stuffed, with its final dot) piece by piece.

        The wait bounds each piece of :data:`STALL_PIECE` bytes, not the whole: a
        socket's ``sendall`` gives the whole message one timeout, which a big one over a
        slow uplink never meets. When the link fails first, the server may have said
        why (a 421 as it closes): that is raised as :class:`_Answered`, else
        :class:`_Unsent`; either way the final dot did not go out."""
        self.note(f"C: [message, {len(data)} bytes, ending with <CRLF>.<CRLF>]")  # never what it says
        sock = self.sock
        assert sock is not None
        try:
            with memoryview(data) as view:
                for start in range(0, len(view), STALL_PIECE):
                    piece, began = view[start:start + STALL_PIECE], time.monotonic()
                    while piece:
                        try:
                            piece = piece[sock.send(piece):]
                        except (socket.timeout, TimeoutError):
                            # The socket times out after the connection's timeout; the
                            # step's wait may be longer (nothing went out: send again).
                            if time.monotonic() - began >= self.wait:
                                raise
        except OSError as exc:
            said = self._said_meanwhile()
            self.close()
            if said is not None and said[0] >= 400:  # a refusal; anything else before the dot is noise
                raise _Answered(*said) from None
            why = (f"the server took no {STALL_PIECE // 1024} KiB of it in {self.wait:g} s" if _timed_out(exc)
                   else f"the connection broke: {_reason(exc)}")
            raise _Unsent(why) from None

    def _said_meanwhile(self) -> tuple[int, bytes] | None:
        """The reply the server sent while the message was being written, if any: it is
        in the socket's buffer already when the server closed the link or stopped reading."""
        if self.sock is None:
            return None
        wait = self.wait  # the caller's error names it
        try:
            self.wait = min(self.timeout, 1.0)
            self.sock.settimeout(self.wait)
            return self.getreply()
        except (smtplib.SMTPException, OSError):
            return None
        finally:
            self.wait = wait

    def hello(self) -> None:
        """EHLO; HELO only when the server does not know EHLO (RFC 5321 4.1.4), not
        when it refuses the session (a 421 closes the link: HELO would find it gone)."""
        code, message = self.ehlo()
        if code != 250:
            if code not in (500, 501, 502, 504, 550):
                raise smtplib.SMTPHeloError(code, message)
            code, message = self.helo()
            if code != 250:
                raise smtplib.SMTPHeloError(code, message)


class SmtpSession(OutgoingSession):
    """An open, secured, signed-in SMTP session; many messages go through one."""

    def __init__(self, settings: ConnectionSettings, client: _Client) -> None:
        self.settings = settings
        self._client: _Client | None = client
        self.sent = 0

    @property
    def max_size(self) -> int | None:
        """The server's SIZE (0 or absent: no limit announced)."""
        return _size_limit(self._client) if self._client else None

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO extensions the server announced (after TLS)."""
        return dict(self._client.esmtp_features) if self._client else {}

    def send(self, raw: bytes, sender: str, recipients: Sequence[str],
             before_data: Callable[[], None] | None = None) -> SendResult:
        """One SMTP transaction: MAIL, RCPT for each recipient, DATA.

        ``before_data``, when given, is called after the server said 354 and before the
        message goes out: the host waits there until the previous message's outcome is
        committed, so the envelope of this one overlaps that commit while the server
        can still not have accepted two unrecorded messages. If it raises, the
        connection is dropped without the final dot, so the server discards the message.
        """
        where = _where(self.settings)
        raw = crlf(raw)  # before dot-stuffing: a bare CR or LF must not end a line for the server
        if not recipients:
            raise PermanentFailure(f"{where}: the message has no recipients")
        refused: dict[str, str] = {}
        try:
            code, reply = self._transaction(where, raw, sender, recipients, before_data, refused)
        except MailError as exc:
            # Whatever ended the transaction, the recipients refused on the way keep their
            # replies in the queue's record: a 5xx one is not asked again, and the admin sees why.
            if refused and not exc.refused:
                exc.refused = dict(refused)
            raise
        self.sent += 1
        return SendResult(f"{code} {_text(reply)}", refused)

    def _transaction(self, where: str, raw: bytes, sender: str, recipients: Sequence[str],
                     before_data: Callable[[], None] | None, refused: dict[str, str]) -> tuple[int, bytes]:
        """MAIL, RCPT, DATA; the final reply when it is 250. ``refused`` gets each
        recipient the server refused, as it does."""
        client = self._live()
        client.content_sent = False  # still True after the previous message went out
        try:
            code, reply = self._mail(client, raw, sender, [sender, *recipients])
            client = self._live()
            if code != 250:
                _rset(client)
                _fail(where, "refused the sender", code, reply, sender)
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                if code == 421:
                    _fail(where, "refused the recipient", code, reply, rcpt)
                if code == 552:
                    # RFC 5321 4.5.3.1.10: 552 is RFC 821's code for "too many recipients",
                    # really a 452: these recipients wait for another transaction.
                    refused[rcpt] = (f"452 (the server said 552 {_text(reply)}, which RFC 5321 4.5.3.1.10 "
                                     "reads as 452: too many recipients for now)")
                elif code not in (250, 251):
                    refused[rcpt] = f"{code} {_text(reply)}"
            if len(refused) == len(recipients):
                _rset(client)
                temporary = any(r.startswith("4") for r in refused.values())
                detail = "; ".join(f"{r}: {why}" for r, why in refused.items())
                cls = TemporaryFailure if temporary else PermanentFailure
                raise cls(f"{where} refused every recipient ({detail})")
            code, reply = client.data_gated(raw, before_data)
            if code != 250:
                _fail(where, "did not take the message", code, reply)
            return code, reply
        except smtplib.SMTPResponseException as exc:  # DATA refused, or the server's word while the content went out
            cut = isinstance(exc, _Answered)  # the link is gone; the final dot never went out
            if cut or exc.smtp_code == 421:
                self._drop()
            elif self._client is not None:
                _rset(self._client)  # end the transaction, keep the session
            _fail(where, "stopped the message before its end" if cut else "did not take the message",
                  exc.smtp_code, exc.smtp_error)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            in_doubt = self._client is not None and self._client.content_sent
            awaiting, wait = ((self._client.awaiting, self._client.wait) if self._client is not None
                              else ("an answer", self.settings.timeout))
            self._drop()
            if in_doubt:
                what = (exc.late if isinstance(exc, _Dripped)
                        else f"no reply within {wait:g} s" if _timed_out(exc)
                        else f"its reply could not be read: {exc}" if isinstance(exc, _Unreadable)
                        else f"the connection broke: {_reason(exc)}")
                raise ConnectFailure(
                    f"{where}: the whole message was sent but the server did not confirm it ({what}); it may have "
                    "been delivered, so it is tried again later and may arrive twice", in_doubt=True) from None
            if isinstance(exc, _Unsent):
                raise ConnectFailure(f"{where}: the message could not be sent whole ({exc}); without its end the "
                                     "server cannot have taken it, so it will be retried") from None
            if isinstance(exc, _Dripped):
                raise ConnectFailure(f"{where}: {exc}, so mailhost closed the link while sending; the message "
                                     f"will be retried{_DRIPPED_FIX}") from None
            if isinstance(exc, _Unreadable):
                raise ConnectFailure(f"{where}: the server's reply could not be read ({exc}) while sending; "
                                     "the message will be retried") from None
            if _timed_out(exc):
                raise ConnectFailure(f"{where}: {awaiting} did not come within {wait:g} s while sending; the "
                                     "message will be retried") from None
            raise ConnectFailure(
                f"{where}: the connection broke while sending ({_reason(exc)}); the message will be retried"
            ) from None
        except MailError as exc:
            if isinstance(exc, ConnectFailure):
                self._drop()
            raise
        except BaseException:
            if self._client is not None and self._client.sock is None:
                self._client = None  # closed at the gate: the next message reopens
            raise

    def _mail(self, client: _Client, raw: bytes, sender: str, addresses: Sequence[str]) -> tuple[int, bytes]:
        """MAIL FROM; a reused link the server has meanwhile closed is reopened once
        (nothing of this message has reached the server yet, so that is safe)."""
        for attempt in (1, 2):
            options = _mail_options(client, raw, addresses, self.settings)
            # A link that carried a transaction before, even a refused one, may have
            # been closed by the server since; a fresh one failing is the server's answer.
            reused = client.used
            client.used = True
            try:
                code, reply = client.mail(sender, options)
            except (smtplib.SMTPServerDisconnected, OSError):
                if attempt == 2 or not reused:
                    raise
                code, reply = 421, b"connection closed"
            if code == 421 and attempt == 1 and reused:
                self._drop()
                client = self._client = _open(self.settings)
                continue
            return code, reply
        raise AssertionError("unreachable")

    def _live(self) -> _Client:
        if self._client is None:
            self._client = _open(self.settings)
        return self._client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        """QUIT and close; never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


# ---------------------------------------------------------------------------------------
# Opening and testing
# ---------------------------------------------------------------------------------------


def open_session(settings: ConnectionSettings) -> SmtpSession:
    """Connect, secure and sign in: the provider's ``open``."""
    return SmtpSession(settings, _open(settings))


def _where(settings: ConnectionSettings) -> str:
    where = f"{settings.host}:{settings.port or DEFAULT_PORTS.get(settings.encryption, 25)}"
    return f"{settings.name} ({where})" if settings.name else where  # no name before it is saved


def _open(settings: ConnectionSettings, report: Report | None = None, stage: list[str] | None = None) -> _Client:
    """The opening dialogue. ``report`` hears each step that succeeded; ``stage[0]``
    names the step under way, so a test can say which one failed."""
    host = settings.host
    if not host:
        raise PermanentFailure(f"{settings.label}: no host is set: give --host")
    port = settings.port or DEFAULT_PORTS.get(settings.encryption, 25)
    where = _where(settings)
    stage = stage if stage is not None else [""]
    say: Report = report or (lambda _name, _detail: None)
    context = client_context(settings.ca_file) if settings.encryption is not Encryption.NONE else None
    client = _Client(settings)
    try:
        stage[0] = "connect"
        started = time.monotonic()
        client.open_tcp(host, port)
        say("connect", f"connected to {host}:{port} in {(time.monotonic() - started) * 1000:.0f} ms")
        if settings.encryption is Encryption.SSL:
            assert context is not None
            stage[0] = "tls"
            peer = describe_peer(client.wrap_tls(context))
            client.note(f"* TLS: {peer.describe()}")
            say("tls", peer.describe())
        stage[0] = "ehlo"
        greeting = client.read_greeting()
        client.hello()
        if settings.encryption is Encryption.STARTTLS:
            assert context is not None
            stage[0] = "tls"
            if not client.has_extn("starttls"):
                raise TLSFailure(
                    f"{where} does not offer STARTTLS, and this connection requires it: "
                    "check the port (587 usually offers it), use --encryption ssl for port 465, "
                    "or ask the server's admin to enable STARTTLS"
                )
            peer = describe_peer(client.start_tls(context))
            client.note(f"* TLS: {peer.describe()}")
            say("tls", f"STARTTLS, {peer.describe()}")
            stage[0] = "ehlo"
            client.hello()
        say("ehlo", f"{greeting}; extensions: {_extensions(client)}")
        stage[0] = "auth"
        say("auth", _sign_in(client, settings, where))
        return client
    except MailError:
        client.close()
        raise
    except BaseException as exc:
        client.close()
        raise _translate(exc, stage[0], settings, where, client.greeted) from None


def _sign_in(client: _Client, settings: ConnectionSettings, where: str) -> str:
    """AUTH with the access token (XOAUTH2, else OAUTHBEARER) or the password (PLAIN, else LOGIN)."""
    user = settings.username or ""
    mechanisms = client.esmtp_features.get("auth", "").upper().split()
    if settings.access_token is not None:
        # XOAUTH2 first, as Microsoft 365 and Gmail expect; OAUTHBEARER (RFC 7628) where it is the only one.
        mechanism = next((m for m in ("XOAUTH2", "OAUTHBEARER") if m in mechanisms), None)
        if mechanism is None:  # no token is asked for, none sent, none blamed
            hint = ("use --encryption starttls or ssl (servers offer it over TLS)"
                    if settings.encryption is Encryption.NONE else "check the host and the port")
            raise AuthenticationFailed(
                f"{where} offers neither XOAUTH2 nor OAUTHBEARER, which signing in with OAuth2 needs (it offers "
                f"AUTH {' '.join(mechanisms) or 'nothing'}): {hint}"
            )
        code, reply = _oauth(client, settings, user, mechanism)
        if code >= 500:
            # Refused: revoked, or expired early by the server's clock. Asked again,
            # the token source renews the token (or says why it cannot); one retry.
            code, reply = _oauth(client, settings, user, mechanism)
        _check_auth(code, reply, where, user, mechanism, oauth=True)
        return f"signed in as {user} with {mechanism}"
    if not user:
        return "skipped: no username (the server must accept mail from this host without signing in)"
    if settings.password is None:
        raise AuthenticationFailed(
            f"{where}: username {user} has no password: give --password-env, --password-file or --password-stdin"
        )
    if not client.has_extn("auth"):
        hint = (" before TLS: use --encryption starttls or ssl" if settings.encryption is Encryption.NONE
                else ": remove the username if it takes mail without signing in")
        raise AuthenticationFailed(f"{where} does not offer AUTH{hint}")
    if "PLAIN" in mechanisms:
        mechanism = "PLAIN"
        code, reply = client.docmd("AUTH", "PLAIN " + _b64(f"\0{user}\0{settings.password}"))
    elif "LOGIN" in mechanisms:
        mechanism = "LOGIN"
        code, reply = client.docmd("AUTH", "LOGIN")
        if code == 334:
            code, reply = client.docmd(_b64(user))
        if code == 334:
            code, reply = client.secret_cmd(_b64(settings.password))
    else:
        raise AuthenticationFailed(
            f"{where} offers AUTH {' '.join(mechanisms) or '(none)'} but neither PLAIN nor LOGIN: "
            "ask its admin to enable one of them, or sign in with OAuth2"
        )
    _check_auth(code, reply, where, user, mechanism)
    return f"signed in as {user} with {mechanism}"


def _oauth(client: _Client, settings: ConnectionSettings, user: str, mechanism: str) -> tuple[int, bytes]:
    """AUTH XOAUTH2 or OAUTHBEARER with a token from the connection's token source; the final reply."""
    assert settings.access_token is not None
    token = settings.access_token()
    redact("", token)  # remembered: never printed, whatever the server echoes
    if mechanism == "XOAUTH2":
        blob, done = f"user={user}\x01auth=Bearer {token}\x01\x01", ""
    else:  # RFC 7628 3.1: a GS2 header naming the user, then key=value pairs
        port = settings.port or DEFAULT_PORTS.get(settings.encryption, 25)
        escaped = user.replace("=", "=3D").replace(",", "=2C")
        blob, done = f"n,a={escaped},\x01host={settings.host}\x01port={port}\x01auth=Bearer {token}\x01\x01", "AQ=="
    code, reply = client.docmd("AUTH", f"{mechanism} {_b64(blob)}")
    if code == 334:  # the server's error details; an empty line (XOAUTH2) or ^A (RFC 7628 3.2.3) ends the exchange
        code, reply = client.docmd(done)
    return code, reply


def _check_auth(code: int, reply: bytes, where: str, user: str, mechanism: str, oauth: bool = False) -> None:
    if code == 235:
        return
    words = f"{code} {_text(reply)}"
    if 400 <= code < 500:
        raise TemporaryFailure(f"{where} could not sign in {user} for now ({words}): it will be retried")
    fix = ("authorize the OAuth2 credential again with `mailhost oauth authorize`" if oauth
           else "check the username and password (an app password may be needed)")
    raise AuthenticationFailed(f"{where} refused to sign in {user} with {mechanism} ({words}): {fix}")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _extensions(client: _Client) -> str:
    parts = [f"{k.upper()} {v}".strip() for k, v in client.esmtp_features.items()]
    return ", ".join(parts) or "none (HELO only)"


def _mail_options(client: _Client, raw: bytes, addresses: Sequence[str], settings: ConnectionSettings) -> list[str]:
    """SIZE, BODY=8BITMIME and SMTPUTF8, as the message and the server need and allow.

    A message the server cannot take as it is is refused before MAIL, never re-encoded:
    what goes out is the queued message, byte for byte."""
    wide = [a for a in addresses if not a.isascii()]
    if wide and not client.has_extn("smtputf8"):  # first: a UTF-8 address also makes 8-bit headers
        raise PermanentFailure(
            f"{_where(settings)} does not support SMTPUTF8, which the address {wide[0]} needs: "
            "use an ASCII address or another connection"
        )
    end = raw.find(b"\r\n\r\n")
    head, body = (raw[: end + 2], raw[end + 2:]) if end >= 0 else (raw, b"")
    limit = _size_limit(client)  # this link's: a link opened again may not have been asked before
    if limit and len(raw) > limit:
        raise PermanentFailure(
            f"{_message(head)} is {len(raw)} bytes, more than the {limit} bytes {_where(settings)} accepts "
            "(its SIZE): send it smaller or through another connection"
        )
    # RFC 6531 3.2: a message with raw UTF-8 header fields (RFC 6532) goes only with
    # SMTPUTF8; 8BITMIME covers the body alone.
    fields = [] if head.isascii() else _wide_fields(head)
    if fields and not client.has_extn("smtputf8"):
        raise PermanentFailure(
            f"{_message(head)} has raw UTF-8 in its {', '.join(fields)} header{'s' if len(fields) > 1 else ''} "
            f"(RFC 6532) and {_where(settings)} does not support SMTPUTF8, which that needs: encode "
            "the header as RFC 2047 encoded words (as `mailhost send` does), or send it through another connection"
        )
    if not body.isascii() and not client.has_extn("8bitmime"):  # RFC 6152: 8-bit data only if announced
        raise PermanentFailure(
            f"{_message(head)} has an 8-bit body and {_where(settings)} does not support 8BITMIME: "
            "encode its parts quoted-printable or base64, or send it through another connection"
        )
    options: list[str] = []
    if raw and client.has_extn("size"):
        options.append(f"SIZE={len(raw)}")
    if not raw.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if wide or fields:
        options.append("SMTPUTF8")
    return options


def _size_limit(client: _Client) -> int | None:
    """The SIZE the server announced (RFC 1870); None for none, 0 or one unreadable."""
    size = client.esmtp_features.get("size", "")
    try:
        value = int(size.split()[0]) if size.strip() else 0
    except ValueError:
        return None
    return value or None


def _wide_fields(head: bytes) -> list[str]:
    """The names of the header fields with 8-bit bytes in them, in order, once each."""
    fields: list[str] = []
    name = ""
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):  # not a continuation: a new field
            name = line.split(b":", 1)[0].decode("ascii", "replace")
        if not line.isascii() and name not in fields:
            fields.append(name)
    return fields


_MESSAGE_ID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[!-~]{1,200}?>)")


def _message(head: bytes) -> str:
    """The message as errors name it: by its Message-ID when it has one."""
    m = _MESSAGE_ID.search(head)
    return f"the message {m.group(1).decode('ascii')}" if m else "the message"


def _rset(client: _Client) -> None:
    try:
        client.rset()
    except (smtplib.SMTPException, OSError):
        pass


def _fail(where: str, what: str, code: int, reply: bytes | str, subject: str | None = None) -> NoReturn:
    """Raise the failure a reply code means: 421 ends the session, 4xx is temporary."""
    words = f"{code} {_text(reply)}"
    about = f" {subject}" if subject else ""
    if code == 421 or code < 0:
        raise ConnectFailure(f"{where} {what}{about} and closed the session ({words}): it will be retried")
    if 400 <= code < 500:
        raise TemporaryFailure(f"{where} {what}{about} for now ({words}): it will be retried")
    raise PermanentFailure(f"{where} {what}{about} ({words})")


#: The end of the error for a reply that did not end in time (:class:`_Dripped`).
_DRIPPED_FIX = ("; if this repeats, the server is overloaded or misbehaving (it must send each reply whole "
                "within the wait): check it and the network to it, or raise --timeout")


def _timed_out(exc: BaseException) -> bool:
    """A timeout, also when smtplib wrapped it in SMTPServerDisconnected."""
    return any(isinstance(e, (socket.timeout, TimeoutError)) for e in (exc, exc.__cause__, exc.__context__))


def _reason(exc: BaseException) -> str:
    if _timed_out(exc):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _translate(exc: BaseException, stage: str, settings: ConnectionSettings, where: str,
               greeted: bool = True, wait: float | None = None) -> MailError:
    """A MailError that says what failed, where, and the fix; ``greeted``: whether the
    server's greeting came; ``wait``: how long a reply was waited for (the timeout if None)."""
    port = settings.port or DEFAULT_PORTS.get(settings.encryption, 25)
    wait = settings.timeout if wait is None else wait
    # No greeting on a plain link: the usual cause is a port that expects TLS from the
    # first byte (465), where the server waits for a TLS handshake as we wait for it.
    tls_first = not greeted and settings.encryption is not Encryption.SSL
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)) and stage in ("tls", "connect"):
        return tls_error(exc, where, settings.ca_file)
    if isinstance(exc, socket.gaierror):
        return ConnectFailure(f"{where}: the host name {settings.host} does not resolve ({exc.strerror}): check --host")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailure(
            f"{where}: connection refused: check the host and the port ({port}), and that the server is running"
        )
    if isinstance(exc, _Dripped):
        return ConnectFailure(f"{where}: {exc}, so mailhost closed the link: it will be retried{_DRIPPED_FIX}")
    if _timed_out(exc):
        if tls_first:
            fix = ("port 465 expects TLS from the first byte: use --encryption ssl" if port == 465 else
                   f"if port {port} expects TLS from the first byte (as 465 does), use --encryption ssl; else check "
                   "the host, the port and the firewall")
            return ConnectFailure(f"{where}: no answer within {wait:g} s, not even a greeting: {fix}")
        return ConnectFailure(
            f"{where}: no answer within {wait:g} s during {stage}: check the host, the port and "
            "the firewall, or raise --timeout"
        )
    if isinstance(exc, _Unreadable):  # not the server's answer, nor the fix's: a broken or misbehaving link
        return ConnectFailure(f"{where}: the server's reply during {stage} could not be read ({exc}): the server "
                              f"misbehaves or is not an SMTP server (check port {port}); it will be retried")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        hint = ": the port may expect TLS from the first byte (--encryption ssl)" if tls_first else ""
        return ConnectFailure(f"{where}: the server closed the connection during {stage}{hint}")
    if isinstance(exc, smtplib.SMTPResponseException):
        words = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        if stage == "tls":
            if 400 <= exc.smtp_code < 500:
                return TemporaryFailure(f"{where} cannot start TLS for now ({words}): it will be retried")
            return TLSFailure(f"{where} refused STARTTLS ({words}): check the encryption setting")
        if exc.smtp_code == 421 or 400 <= exc.smtp_code < 500:
            return TemporaryFailure(f"{where} is not taking mail now ({words}, during {stage}): it will be retried")
        return PermanentFailure(f"{where} refused the session during {stage} ({words})")
    if isinstance(exc, OSError):
        return ConnectFailure(f"{where}: {stage} failed ({_reason(exc)}): check the host and the port")
    if isinstance(exc, UnicodeError):
        return PermanentFailure(f"{where}: a command could not be encoded ({exc}): use ASCII addresses")
    raise exc


def test_connection(settings: ConnectionSettings) -> Iterator[TestStep]:
    """Connect, TLS, EHLO, AUTH, then MAIL FROM / RCPT TO and RSET: one step each."""
    steps: list[TestStep] = []
    stage = [""]
    try:
        client = _open(settings, lambda name, detail: steps.append(TestStep(name, True, detail)), stage)
    except MailError as exc:
        steps.append(TestStep(stage[0] or "connect", False, redact(str(exc), settings.password)))
        yield from steps
        return
    yield from steps
    try:
        yield from _dry_run(client, settings)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


test_connection.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test, whoever imports it


def _dry_run(client: _Client, settings: ConnectionSettings) -> Iterator[TestStep]:
    where = _where(settings)
    sender = parseaddr(settings.from_address or "")[1]
    if not sender and "@" in (settings.username or ""):
        sender = settings.username or ""
    if not sender:
        yield TestStep("mail from", True, "skipped: the connection has no from address (give --from ADDRESS)")
        return
    try:
        options = _mail_options(client, b"", [sender], settings)
    except MailError as exc:  # the from address needs what the server lacks (SMTPUTF8)
        yield TestStep("mail from", False, str(exc))
        return
    step = "mail from"
    try:
        code, reply = client.mail(sender, options)
        if code != 250:
            yield TestStep("mail from", False, f"{where} refused MAIL FROM:<{sender}> ({code} {_text(reply)})")
            return
        yield TestStep("mail from", True, f"MAIL FROM:<{sender}>: {code} {_text(reply)}")
        step = "rcpt to"
        code, reply = client.rcpt(sender)
        ok = code in (250, 251)
        yield TestStep("rcpt to", ok, f"RCPT TO:<{sender}>: {code} {_text(reply)}"
                       + ("" if ok else f" ({where} would not take mail for it)"))
        step = "rset"
        code, reply = client.rset()
        yield TestStep("rset", code == 250, f"RSET: {code} {_text(reply)} (nothing was sent)")
    except (smtplib.SMTPException, OSError) as exc:
        yield TestStep(step, False, str(_translate(exc, step, settings, where, wait=client.wait)))
