"""Opening a signed-in IMAP link, one step at a time: DNS, TCP, TLS, greeting, sign-in.

The steps are separate functions so that the connection test can report each one and
every failure says which step failed. :func:`connect` runs them all.
"""
from __future__ import annotations

import ast
import imaplib
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from mailhost.errors import (
    AuthenticationFailed,
    ConnectFailure,
    MailError,
    PermanentFailure,
    TemporaryFailure,
    TLSFailure,
)
from mailhost.protocols import STALL_PIECE, ConnectionSettings, Encryption, StallGuard
from mailhost.tls import client_context, tls_error

from . import DEFAULT_PORTS  # declared beside the provider, which registers without this module

__all__ = [
    "DEFAULT_PORTS",
    "GuardedIMAP4",
    "connect",
    "connect_tcp",
    "resolve",
    "sign_in",
    "start",
    "translated",
    "with_defaults",
]


Address = tuple[Any, ...]  # one getaddrinfo() entry

_MAXLINE = imaplib._MAXLINE  # type: ignore[attr-defined]  # imaplib's longest line
_BYTES_REPR = re.compile(r"""b('[^'\\]*'|"[^"\\]*")""")  # imaplib's str() of bytes

# Response codes (RFC 5530) that say "not now" rather than "never". A mailbox over its
# quota takes mail again once its user or the expunges free space: not now either.
_TEMPORARY_CODES = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]", "[OVERQUOTA]")


def with_defaults(settings: ConnectionSettings) -> ConnectionSettings:
    """``settings`` with the default port for its encryption and the INBOX filled in."""
    encryption = Encryption(settings.encryption)
    return replace(
        settings,
        encryption=encryption,
        port=settings.port or DEFAULT_PORTS[encryption],
        folder=settings.folder or "INBOX",
    )


def failure(exc: BaseException, settings: ConnectionSettings, doing: str) -> MailError:
    """The mailhost error for a socket, TLS or IMAP error raised while ``doing``."""
    where = settings.describe()
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, ssl.SSLError):
        return tls_error(exc, where, settings.ca_file)
    if isinstance(exc, TimeoutError):
        return ConnectFailure(
            f"{where} did not answer within {settings.timeout:g} s while trying to {doing}: "
            "check that the server is up and the encryption setting matches the port, or raise the timeout"
        )
    if isinstance(exc, OSError):
        return ConnectFailure(
            f"the link to {where} failed while trying to {doing} ({exc.strerror or exc}): "
            "check the network; the next pass tries again"
        )
    if isinstance(exc, imaplib.IMAP4.abort):
        return ConnectFailure(
            f"{where} dropped the link while trying to {doing} ({exc}): the next pass tries again"
        )
    words = server_words(exc)
    if "[OVERQUOTA]" in words.upper():
        return TemporaryFailure(
            f"{where} refused to {doing} because the mailbox is over its quota (the server said: {words}): "
            "free space in it (its Trash, old mail) or have its quota raised"
        )
    kind = TemporaryFailure if any(code in words.upper() for code in _TEMPORARY_CODES) else PermanentFailure
    return kind(f"{where} refused to {doing}: {words}")


def server_words(exc: BaseException) -> str:
    """What the server said, without imapclient's ``"login failed: "`` prefix and
    without the ``b'...'`` of imaplib's bytes."""
    text = str(exc)
    head, sep, rest = text.partition(" failed: ")
    if sep and " " not in head:
        text = rest
    if _BYTES_REPR.fullmatch(text):
        text = ast.literal_eval(text).decode("utf-8", "replace")
    return text


@contextmanager
def translated(settings: ConnectionSettings, doing: str) -> Iterator[None]:
    """Turn socket, TLS and IMAP errors raised inside into mailhost errors."""
    try:
        yield
    except (OSError, imaplib.IMAP4.error) as exc:  # ssl.SSLError is an OSError
        raise failure(exc, settings, doing) from exc


def resolve(settings: ConnectionSettings) -> list[Address]:
    """The server's addresses (DNS)."""
    if not settings.host:
        raise PermanentFailure(f"{settings.label} has no host: set the IMAP server's host name")
    try:
        return socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConnectFailure(
            f"the host name {settings.host} of {settings.label} does not resolve ({exc}): "
            "check the host name and the DNS"
        ) from exc


def connect_tcp(settings: ConnectionSettings, addresses: list[Address]) -> socket.socket:
    """A TCP connection to the first address that answers."""
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(settings.timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    reason = "timed out" if isinstance(error, TimeoutError) else getattr(error, "strerror", None) or error
    raise ConnectFailure(
        f"cannot connect to {settings.describe()} ({reason}): "
        "check the host, the port and that no firewall blocks it"
    )


class GuardedIMAP4(imaplib.IMAP4):
    """imaplib on a socket we connected (and, for SSL, wrapped) ourselves, every answer
    of which is read inside a :class:`~mailhost.protocols.StallGuard`.

    A command's guard starts when the command's first line goes out (the line that
    begins with the tag :meth:`_new_tag` gave, whoever sends it: imaplib, imapclient, the
    session's own FETCH reader) and ends when its tagged answer came, or the read
    failed; the greeting is read under one too. The guard steps for every
    :data:`~mailhost.protocols.STALL_PIECE` bytes read, never for a line: a server that
    answers SELECT, STORE or LOGIN with an endless slow stream of untagged ``* OK``
    lines, each within the read timeout, is cut off with an error naming the command,
    instead of holding the pass and its lease for ever.
    """

    def __init__(self, sock: socket.socket, host: str, where: str, timeout: float) -> None:
        self._given = sock
        self._where, self._timeout = where, timeout
        #: The guard of the answer being read; None between commands.
        self.guard: StallGuard | None = None
        self._answer = ""  # what the guard waits for: "its greeting", "its answer to SELECT"
        self._answer_tag: bytes | None = None  # the tag that ends it; None for the greeting
        self._next_tag: bytes | None = None  # given out, its command not sent yet
        self._unstepped = 0  # bytes read since the guard's last step
        super().__init__(host, 0)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return self._given

    def open(self, host: str = "", port: int = imaplib.IMAP4_PORT, timeout: float | None = None) -> None:
        super().open(host, port, timeout)
        self._watch("its greeting", None)

    def _new_tag(self) -> bytes:
        self._next_tag = tag = super()._new_tag()
        return tag

    def send(self, data: bytes) -> None:
        tag = self._next_tag
        if tag is not None and data.startswith(tag + b" "):
            self._next_tag = None
            words = data[len(tag) + 1 :].split(None, 2)  # the name only: LOGIN's arguments are secret
            name = b" ".join(words[:2] if words and words[0].upper() == b"UID" else words[:1])
            self._watch(f"its answer to {name.decode('ascii', 'replace').upper()}", tag)
        try:
            super().send(data)
        except OSError:
            self.unwatch()
            raise

    def _get_response(self) -> Any:
        try:
            response = super()._get_response()
        except (OSError, imaplib.IMAP4.error):
            guard, answer = self.guard, self._answer
            self.unwatch()
            if guard is not None and guard.fired:
                raise guard.failure(self._where, answer, download=False) from None
            raise
        if self._answer_tag is None or self.tagged_commands.get(self._answer_tag) is not None:
            self.unwatch()  # the greeting, or the tagged answer, came
        return response

    # readline and read replace imaplib's own (the same reads, counted): the FETCH
    # reader calls them for every message, so they call the file directly.
    def readline(self) -> bytes:
        line = self.file.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            raise self.error(f"got more than {_MAXLINE} bytes")
        self._unstepped += len(line)
        if self._unstepped >= STALL_PIECE:
            self._step()
        return line

    def take(self, lines: re.Pattern[bytes]) -> bytes:
        """The whole lines at the head of what is buffered (read once if nothing is) that
        ``lines`` matches, consumed; ``b""`` when the next line does not match. An answer
        of many short lines (a listing) is read a buffer at a time, not a line at a time."""
        run = lines.match(self.file.peek(_MAXLINE))
        return self.read(run.end()) if run else b""

    def read(self, size: int) -> bytes:
        """``size`` bytes (fewer at the end of the stream), a step for each
        :data:`~mailhost.protocols.STALL_PIECE` of them: a drip inside a big literal is
        caught within one piece."""
        if size <= STALL_PIECE:
            data: bytes = self.file.read(size)
            self._unstepped += len(data)
            if self._unstepped >= STALL_PIECE:
                self._step()
            return data
        pieces = []
        while size > 0:
            piece = self.file.read(min(size, STALL_PIECE))
            pieces.append(piece)
            if len(piece) < min(size, STALL_PIECE):
                break
            size -= len(piece)
            self._step()
        return b"".join(pieces)

    def shutdown(self) -> None:
        self.unwatch()
        super().shutdown()

    def _step(self) -> None:
        self._unstepped = 0
        if self.guard is not None:
            self.guard.step()

    def _watch(self, answer: str, tag: bytes | None) -> None:
        self.unwatch()  # a command whose answer nobody read to the end: the link moved on
        self._answer, self._answer_tag, self._unstepped = answer, tag, 0
        self.guard = StallGuard(self.sock, self._timeout).__enter__()

    def unwatch(self) -> None:
        """End the guard of the answer being read (a reader of its own calls this once
        it read the tagged answer)."""
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.__exit__(None, None, None)


class _Client(IMAPClient):
    """IMAPClient over :class:`GuardedIMAP4`: DNS, TCP and TLS stay our own, separately reported steps."""

    def __init__(self, sock: socket.socket, settings: ConnectionSettings, context: ssl.SSLContext | None) -> None:
        self._given, self._settings = sock, settings
        super().__init__(
            settings.host,
            settings.port,
            ssl=settings.encryption is Encryption.SSL,
            ssl_context=context,
            timeout=settings.timeout,
        )

    def _create_IMAP4(self) -> imaplib.IMAP4:
        return GuardedIMAP4(self._given, self.host, self._settings.describe(), self._settings.timeout)


def start(settings: ConnectionSettings, sock: socket.socket) -> IMAPClient:
    """TLS (implicit or STARTTLS) and the greeting: a client ready to sign in.

    Closes ``sock`` when it fails. Under STARTTLS a PREAUTH greeting is refused (the
    session would be signed in before TLS could protect it), a server that does not
    offer STARTTLS is refused, and nothing the server sent in plain text survives the
    handshake.
    """
    where = settings.describe()
    client: IMAPClient | None = None
    try:
        # A plain link needs no context: loading the trust store costs milliseconds.
        context = None if settings.encryption is Encryption.NONE else client_context(settings.ca_file)
        with translated(settings, "start the IMAP session"):
            if settings.encryption is Encryption.SSL:
                assert context is not None
                sock = context.wrap_socket(sock, server_hostname=settings.host)
            try:
                client = _Client(sock, settings, context)
            except imaplib.IMAP4.error as exc:
                if isinstance(exc, imaplib.IMAP4.abort) and "unexpected response" not in str(exc):
                    raise  # the link dropped: translated() says so
                raise PermanentFailure(
                    f"{where} does not greet like an IMAP server ({exc}): check the host and the port"
                ) from exc
            imap = client._imap
            _attach_transcript(imap, settings.transcript)
            if settings.encryption is Encryption.STARTTLS:
                if imap.state != "NONAUTH":
                    raise TLSFailure(
                        f"{where} signed the session in before TLS (PREAUTH greeting), so STARTTLS "
                        "cannot protect it: use encryption ssl, or stop the server pre-authenticating"
                    )
                if "STARTTLS" not in imap.capabilities:
                    raise TLSFailure(
                        f"{where} does not offer STARTTLS, and mailhost never falls back to plain text: "
                        "use encryption ssl (port 993) or enable TLS on the server"
                    )
                try:
                    client.starttls(context)  # never None here: the encryption is STARTTLS
                except imaplib.IMAP4.error as exc:
                    raise TLSFailure(f"{where} refused STARTTLS ({server_words(exc)}): check the server's TLS setup") from exc
                # STARTTLS response injection (the client side of CVE-2011-0411, as in
                # CVE-2020-14954): imaplib reads the TLS link through a new buffer, so
                # plain-text bytes read ahead after the OK are gone with the old one;
                # untagged responses the server sent before the OK are dropped here.
                imap.untagged_responses.clear()
        return client
    except BaseException:
        if client is not None:
            _shutdown(client)
        else:
            sock.close()
        raise


def _attach_transcript(imap: imaplib.IMAP4, transcript: Callable[[str], None] | None) -> None:
    """Send imaplib's protocol lines to ``transcript``; keep them off otherwise.

    imapclient sets imaplib's debug level to 5, which formats every line for its logger,
    bulk FETCH responses included.
    """
    imap.debug = 0
    if transcript is not None:
        transcript(f"< {imap.welcome!r}")
        imap.debug = 4  # each line sent and received, literals by size only
        imap._mesg = lambda line, *_: transcript(line)  # type: ignore[attr-defined]


def sign_in(settings: ConnectionSettings, client: IMAPClient) -> None:
    """LOGIN, SASL PLAIN for a shared mailbox, or XOAUTH2/OAUTHBEARER with a token."""
    imap = client._imap
    if imap.state != "NONAUTH":
        return  # PREAUTH over implicit TLS or a plain link (refused under STARTTLS)
    caps = set(imap.capabilities)
    if settings.access_token is None and "LOGINDISABLED" in caps:
        raise PermanentFailure(
            f"{settings.describe()} takes no password without TLS (LOGINDISABLED): "
            "use encryption starttls or ssl"
        )
    level, imap.debug = imap.debug, 0  # keep the credentials out of the transcript
    if level and settings.transcript:
        settings.transcript("(signing in; the credentials are not shown)")
    try:
        with translated(settings, "sign in"):
            try:
                _authenticate(settings, client, caps)
            except LoginError as exc:
                words = server_words(exc)
                if any(code in words.upper() for code in _TEMPORARY_CODES):
                    # [UNAVAILABLE]: its password database is down, [INUSE], [LIMIT], ...: not the credentials
                    raise TemporaryFailure(
                        f"{settings.describe()} could not sign {settings.username} in now, for a reason of its own, "
                        f"not of the password (the server said: {words}): the next pass tries again; if this "
                        "persists, the server's log says why"
                    ) from None
                raise AuthenticationFailed(_auth_message(settings, words)) from None
    finally:
        imap.debug = level
        getattr(imap, "_cmd_log", {}).clear()  # imaplib's ring of recent lines holds the LOGIN line


def _authenticate(settings: ConnectionSettings, client: IMAPClient, caps: set[str]) -> None:
    user = settings.username or ""
    password = settings.password or ""
    if settings.access_token is not None:
        try:
            _bearer(settings, client, caps)
        except LoginError:
            # Refused: revoked, or expired early by the server's clock. Asked again,
            # the token source renews the token (or says why it cannot); one retry.
            _bearer(settings, client, caps)
    elif settings.shared_mailbox:
        # authorization identity = the shared mailbox, authentication identity = the
        # user (Dovecot master users, Exchange shared mailboxes)
        client.sasl_login("PLAIN", _once(f"{settings.shared_mailbox}\0{user}\0{password}", b""))
    elif (user + password).isascii():
        client.login(client._imap._quote(user), password)  # imaplib quotes only the password
    else:
        client.sasl_login("PLAIN", _once(f"\0{user}\0{password}", b""))  # LOGIN is ASCII-only


def _bearer(settings: ConnectionSettings, client: IMAPClient, caps: set[str]) -> None:
    """AUTHENTICATE with a token: XOAUTH2, or OAUTHBEARER where only that is offered."""
    assert settings.access_token is not None
    token = settings.access_token()
    mailbox = settings.shared_mailbox or settings.username or ""
    if "AUTH=OAUTHBEARER" in caps and "AUTH=XOAUTH2" not in caps:
        authzid = mailbox.replace("=", "=3D").replace(",", "=2C")
        client.sasl_login("OAUTHBEARER", _once(f"n,a={authzid},\1auth=Bearer {token}\1\1", b"\1"))
    else:
        client.sasl_login("XOAUTH2", _once(f"user={mailbox}\1auth=Bearer {token}\1\1", b""))


def _once(payload: str, then: bytes) -> Callable[[bytes], bytes]:
    """A SASL client sending ``payload`` first and ``then`` to any further challenge
    (an XOAUTH2/OAUTHBEARER error report), so the server ends the exchange."""
    sent = False

    def respond(challenge: bytes) -> bytes:
        nonlocal sent
        if sent:
            return then
        sent = True
        return payload.encode()

    return respond


def _auth_message(settings: ConnectionSettings, said: str) -> str:
    host = settings.host
    if settings.access_token is not None:
        fix = "check that the OAuth2 credential is authorized for this mailbox and has the IMAP scope"
    elif settings.shared_mailbox:
        fix = (
            f"check the username and password, and that {settings.username} may open "
            f"the shared mailbox {settings.shared_mailbox}"
        )
    else:
        fix = "check the username and password"
    return f"authentication failed for {settings.label} on {host}: {fix} (the server said: {said})"


def connect(settings: ConnectionSettings) -> IMAPClient:
    """A signed-in client for ``settings`` (whose defaults are filled in)."""
    client = start(settings, connect_tcp(settings, resolve(settings)))
    try:
        sign_in(settings, client)
    except BaseException:
        _shutdown(client)
        raise
    return client


def logout(client: IMAPClient) -> None:
    """LOGOUT, then close the socket; never raises."""
    try:
        client.logout()
    except Exception:
        _shutdown(client)


def _shutdown(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:
        pass
