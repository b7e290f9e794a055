"""The POP3 session: sign in, list by UIDL, fetch, delete, and the connection test."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import poplib
import socket
import ssl
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any

from mailhost.errors import (
    AuthenticationFailed,
    ConnectFailure,
    MailError,
    PermanentFailure,
    TemporaryFailure,
    TLSFailure,
)
from mailhost.protocols import (
    ConnectionSettings,
    Encryption,
    Estimate,
    IncomingSession,
    Listing,
    MessageRef,
    TestStep,
)
from mailhost.tls import client_context, describe_peer, tls_error

from ._client import Client, LinkError
from . import DEFAULT_PORTS  # declared beside the provider, which registers without this module

__all__ = ["DEFAULT_PORTS", "Pop3Session", "open_session", "test"]

log = logging.getLogger(__name__)


# RFC 2449 / 3206 response codes that say "not now" rather than "wrong credentials".
_TEMPORARY_CODES = (b"[IN-USE]", b"[LOGIN-DELAY]", b"[SYS/TEMP]")


class Pop3Session(IncomingSession):
    """A signed-in POP3 session: a snapshot of the maildrop taken at sign-in.

    POP3 has no folders and no read flag. A message's key is its UIDL and its handle its
    message number in this session. ``delete`` sends DELE, which the server applies only
    at QUIT; :meth:`close` sends QUIT and sets ``closed_cleanly`` to whether the server
    confirmed it. Hence ``acknowledges_on_close``: the host counts a deletion as done only
    once ``close()`` has returned with ``closed_cleanly`` true.
    """

    acknowledges_on_close = True

    def __init__(self, settings: ConnectionSettings, client: Client) -> None:
        self.settings = settings
        self.closed_cleanly = False
        self._client: Client | None = client
        self._numbers: dict[str, int] | None = None  # key -> message number

    def __repr__(self) -> str:
        return f"<Pop3Session {_where(self.settings)}>"

    @property
    def client(self) -> Client:
        """The open POP3 link."""
        if self._client is None:
            raise ConnectFailure(f"{_where(self.settings)}: the POP3 session is closed: open a new one")
        return self._client

    def _keys(self) -> dict[str, int]:
        """UIDL of the maildrop, once per session (POP3 does not renumber mid-session)."""
        if self._numbers is None:
            try:
                lines = self.client.lines("UIDL")
            except poplib.error_proto as exc:
                raise PermanentFailure(
                    f"{_where(self.settings)}: the POP3 server does not support UIDL ({_words(exc)}), so "
                    "downloaded messages cannot be recognised and would come again: use IMAP for this mailbox"
                ) from exc
            numbers: dict[str, int] = {}
            for line in lines:
                try:
                    number, uidl = line.decode("ascii", "replace").split()[:2]
                except ValueError:
                    raise LinkError(f"the server sent a malformed UIDL line {line!r}") from None
                # A server that repeats a UIDL: keep both messages apart (a UIDL has no spaces).
                numbers[uidl if uidl not in numbers else f"{uidl} {number}"] = int(number)
            self._numbers = numbers
        return self._numbers

    def _new(self, known: Callable[[Sequence[str]], set[str]]) -> list[tuple[str, int]]:
        numbers = self._keys()
        stored = known(list(numbers))
        return [(key, n) for key, n in numbers.items() if key not in stored]

    def list_new(
        self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]
    ) -> Listing:
        """Every message whose UIDL is not stored yet, oldest first; POP3 has no cursor."""
        with _errors(self.settings):
            new = self._new(known)
            sizes: dict[int, int] = {}
            if new:  # a poll with nothing new skips LIST
                for line in self.client.lines("LIST"):
                    number, size = line.split()[:2]
                    sizes[int(number)] = int(size)
        return Listing([MessageRef(key, sizes.get(n), n) for key, n in new])

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes]]:
        """RETR each message, pipelined when the server allows; a vanished one is skipped.
        A broken link names the message it broke in, so that a message that breaks every
        pass (a server that cannot send it) can be found and dealt with."""
        wanted: list[tuple[MessageRef, int]] = []
        done = 0
        # One guard for the whole download, so that a stall names the message it came in.
        with _errors(self.settings), self.client.watching("its list of messages (UIDL)") as guard:
            try:
                numbers = self._keys()  # a ref's handle may come from another session
                wanted = [(ref, numbers[ref.key]) for ref in refs if ref.key in numbers]
                replies = self.client.pipeline([f"RETR {n}" for _, n in wanted], long=True)
                for (ref, number), raw in zip(wanted, replies):  # the caller's time is no stall
                    done += 1
                    if raw is None:  # gone meanwhile, or the server cannot read it now: next pass
                        log.info("%s: RETR %d (UIDL %s) refused; skipped", _where(self.settings), number, ref.key)
                        continue
                    yield ref, raw
            except OSError as exc:
                if not 0 <= done < len(wanted):
                    raise
                ref, number = wanted[done]
                size = f", {ref.size:,} bytes" if ref.size is not None else ""
                if guard.fired:
                    raise guard.failure(_where(self.settings), f"message {number} (UIDL {ref.key}{size})") from None
                raise ConnectFailure(f"{_link_error(self.settings, exc)}; it broke in message {number} (UIDL "
                                     f"{ref.key}{size}): if every pass breaks there, look at that message on the "
                                     "server") from exc

    def resolve(self, keys: Sequence[str]) -> list[MessageRef]:
        """Refs for the keys still on the server."""
        with _errors(self.settings):
            numbers = self._keys()
        return [MessageRef(key, handle=numbers[key]) for key in keys if key in numbers]

    def delete(self, refs: Sequence[MessageRef]) -> None:
        """DELE each message; the server removes them at QUIT (see :meth:`close`).

        Numbers come from this session's UIDL, never from the ref: a number from another
        session could name another message. ``-ERR`` (already deleted, gone) is fine.
        """
        with _errors(self.settings):
            numbers = self._keys()
            commands = [f"DELE {numbers[ref.key]}" for ref in refs if ref.key in numbers]
            for _ in self.client.pipeline(commands, long=False):
                pass

    def estimate(
        self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]
    ) -> Estimate:
        """Messages whose UIDL is not stored yet, read or not: POP3 has no read flag."""
        with _errors(self.settings):
            count = len(self._new(known))
        note = (
            "POP3 has no read flag: every message whose UIDL is not stored yet counts, read or not "
            "(if the server renumbered its UIDLs, this overcounts: those messages are not stored twice)"
        )
        return Estimate(count, "exact" if count == 0 else "high", note)

    def close(self) -> None:
        """Send QUIT (the server then applies DELE) and close the link. Never raises:
        ``closed_cleanly`` tells whether the server confirmed QUIT."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.quit()
            self.closed_cleanly = True
        except Exception as exc:  # a dead link, a -ERR to QUIT: deletions did not happen
            log.debug("%s: QUIT failed: %s", _where(self.settings), exc)
        finally:
            with contextlib.suppress(OSError):
                client.close()


# ---------------------------------------------------------------------------------------
# Opening and testing
# ---------------------------------------------------------------------------------------


def open_session(settings: ConnectionSettings) -> Pop3Session:
    """Connect, secure the link and sign in; raises the first failure as a MailError."""
    steps = _connect(settings)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return Pop3Session(settings, done.value)


def test(settings: ConnectionSettings) -> Iterator[TestStep]:
    """The connection test, step by step; stops at the first failure with its fix."""
    order = ["dns", "tcp"] + (["tls"] if settings.encryption is not Encryption.NONE else []) + ["authentication"]
    steps, passed = _connect(settings), 0
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                client: Client = done.value
                break
            passed += 1
            yield step
    except MailError as exc:
        yield TestStep(order[min(passed, len(order) - 1)], False, str(exc))
        return
    session = Pop3Session(settings, client)
    try:
        step = _capabilities_step(settings, session)
        yield step
        if step.ok:
            with _errors(settings):
                count, size = client.stat()
            yield TestStep("messages", True, f"{count} message(s), {size} bytes on the server")
    except MailError as exc:
        yield TestStep("messages", False, str(exc))
    finally:
        session.close()


def _capabilities_step(settings: ConnectionSettings, session: Pop3Session) -> TestStep:
    """What the server offers; UIDL asked for when CAPA does not list it (CAPA is
    optional, RFC 2449, and lists what the server chose to): the step then passes
    exactly when a download pass would get past its listing."""
    caps = session.client.capabilities
    shown = [name for name in ("UIDL", "PIPELINING", "TOP", "STLS", "USER") if name in caps]
    if caps.get("SASL"):
        shown.append("SASL " + " ".join(caps["SASL"]))
    detail = ", ".join(shown) if caps else "the server does not answer CAPA"
    if "UIDL" not in caps:
        try:
            with _errors(settings):
                session._keys()  # the listing every pass starts with
        except PermanentFailure as exc:
            return TestStep("capabilities", False, str(exc))
        detail += "; UIDL answers" + (", though CAPA does not list it" if caps else "")
    return TestStep("capabilities", True, detail)


def _connect(settings: ConnectionSettings) -> Generator[TestStep, None, Client]:
    """Connect, secure and sign in, yielding an ok step per stage; raises the first failure."""
    host, port, where = settings.host or "", _port(settings), _where(settings)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailure(f"{where}: cannot resolve the host name {host!r} ({exc.strerror}): check the host") from exc
    yield TestStep("dns", True, f"{host} is {', '.join(sorted({str(a[4][0]) for a in addresses}))}")

    with _errors(settings, connecting=True):
        sock = socket.create_connection((host, port), settings.timeout)
    yield TestStep("tcp", True, f"connected to {sock.getpeername()[0]} port {port}")

    client: Client | None = None
    try:
        with _errors(settings):
            if settings.encryption is Encryption.SSL:
                context = _context(settings)
                sock = _tls(settings, lambda: context.wrap_socket(sock, server_hostname=host))
                yield TestStep("tls", True, describe_peer(sock).describe())
            client = Client(sock, host, where, settings.timeout)
            if settings.encryption is Encryption.STARTTLS:
                if "STLS" not in client.capa():
                    raise TLSFailure(
                        f"{where}: the POP3 server does not offer STLS (STARTTLS), and mailhost never falls back "
                        "to plain text: choose encryption ssl (port 995), or ask the server's admin to enable STLS"
                    )
                context, plain = _context(settings), client
                _tls(settings, lambda: plain.stls(context))
                assert isinstance(client.sock, ssl.SSLSocket)
                yield TestStep("tls", True, "STLS: " + describe_peer(client.sock).describe())
            how = _sign_in(settings, client)
        yield TestStep("authentication", True, how)
        return client
    except BaseException:  # also GeneratorExit: a test report abandoned half-way
        with contextlib.suppress(OSError):
            client.close() if client is not None else sock.close()
        raise


def _context(settings: ConnectionSettings) -> ssl.SSLContext:
    try:
        return client_context(settings.ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TLSFailure(
            f"{_where(settings)}: cannot load the CA file {settings.ca_file} ({exc}): give a PEM file with --ca-file"
        ) from exc


def _tls(settings: ConnectionSettings, handshake: Callable[[], Any]) -> Any:
    """Run ``handshake``; certificate and protocol errors become TLSFailure."""
    try:
        return handshake()
    except ssl.SSLError as exc:
        raise tls_error(exc, _where(settings), settings.ca_file) from exc
    except poplib.error_proto as exc:
        raise TLSFailure(
            f"{_where(settings)}: the POP3 server refused STLS ({_words(exc)}): choose encryption ssl, "
            "or ask the server's admin to fix STARTTLS"
        ) from exc


def _sign_in(settings: ConnectionSettings, client: Client) -> str:
    """Authenticate (inside ``_errors``); returns how, for the test report.

    SASL PLAIN when offered (it carries an authorization identity, and UTF-8), else
    USER/PASS. APOP is not used: it needs the server to keep plain passwords and adds
    nothing over USER/PASS inside TLS.
    """
    user, shared = settings.username or "", settings.shared_mailbox
    before = client.capa()
    sasl = set(before.get("SASL", ()))
    try:
        if settings.access_token is not None:
            mechanism = "OAUTHBEARER" if "OAUTHBEARER" in sasl and "XOAUTH2" not in sasl else "XOAUTH2"
            try:
                client.auth(mechanism, _oauth_response(mechanism, shared or user, settings))
            except poplib.error_proto as exc:
                if _is_temporary(exc):
                    raise
                # Refused: revoked, or expired early by the server's clock. Asked again,
                # the token source renews the token (or says why it cannot); one retry.
                client.auth(mechanism, _oauth_response(mechanism, shared or user, settings))
            how = f"{mechanism} as {shared or user}"
        elif shared or "PLAIN" in sasl:
            if "PLAIN" not in sasl:
                raise PermanentFailure(
                    f"{_where(settings)}: the POP3 server does not offer SASL PLAIN, which signing in to the "
                    f"shared mailbox {shared} needs: remove the shared mailbox, or ask the server's admin to enable PLAIN"
                )
            client.auth("PLAIN", f"{shared or ''}\0{user}\0{settings.password or ''}".encode())
            how = f"SASL PLAIN as {user}" + (f" for the shared mailbox {shared}" if shared else "")
        else:
            client.user(user)
            client.pass_(settings.password or "")
            how = f"USER/PASS as {user}"
        # Ask again: the TRANSACTION state decides PIPELINING and UIDL; keep what came
        # before (STLS, SASL) for the test report. A server that signed the user in
        # and cannot open the mailbox answers here.
        client.capabilities = {**before, **client.capa()}
    except poplib.error_proto as exc:
        raise _auth_error(settings, exc) from exc
    return how


def _oauth_response(mechanism: str, user: str, settings: ConnectionSettings) -> bytes:
    assert settings.access_token is not None
    token = settings.access_token()
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    escaped = user.replace("=", "=3D").replace(",", "=2C")  # RFC 7628 gs2 header
    return f"n,a={escaped},\x01host={settings.host}\x01port={_port(settings)}\x01auth=Bearer {token}\x01\x01".encode()


def _is_temporary(exc: poplib.error_proto) -> bool:
    """A refusal for now (RFC 3206 [IN-USE], [SYS/TEMP]), not of the credentials."""
    reply = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
    return any(code in reply.upper() for code in _TEMPORARY_CODES)


def _auth_error(settings: ConnectionSettings, exc: poplib.error_proto) -> MailError:
    words, host = _words(exc), settings.host
    reply = exc.args[0].upper() if exc.args and isinstance(exc.args[0], bytes) else b""
    if b"[SYS/" in reply:  # RFC 3206: a fault of the server's, not of the credentials
        kind = PermanentFailure if b"[SYS/PERM]" in reply else TemporaryFailure
        return kind(
            f"{_where(settings)}: the POP3 server could not open the mailbox of {settings.username or 'the user'}, "
            f"for a reason of its own, not of the password (it said: {words}): "
            + ("the next pass tries again; if this persists, " if kind is TemporaryFailure else "")
            + "the server's log says why"
        )
    if _is_temporary(exc):
        return TemporaryFailure(
            f"the POP3 server {host} did not let {settings.label} sign in now ({words}): try again later; "
            "another client may have the mailbox open"
        )
    if settings.access_token is not None:
        fix = "authorize the OAuth2 credential again with `mailhost oauth authorize`"
    elif settings.shared_mailbox:
        fix = (f"check the username and password, and that {settings.username} may open "
               f"the shared mailbox {settings.shared_mailbox}")
    else:
        fix = "check the username and password"
    return AuthenticationFailed(
        f"authentication failed for {settings.label} on {host}: {fix} (the server said: {words})"
    )


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def _port(settings: ConnectionSettings) -> int:
    return settings.port or DEFAULT_PORTS[settings.encryption]


def _where(settings: ConnectionSettings) -> str:
    """The connection as errors name it (:meth:`ConnectionSettings.describe`), its default port filled in."""
    return dataclasses.replace(settings, port=_port(settings)).describe()


def _words(exc: poplib.error_proto) -> str:
    """The server's reply without the ``-ERR``."""
    reply = exc.args[0] if exc.args else b""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return text.removeprefix("-ERR").strip() or "no reason given"


@contextlib.contextmanager
def _errors(settings: ConnectionSettings, connecting: bool = False) -> Iterator[None]:
    """Socket and protocol errors as mailhost errors that name the connection and the fix."""
    try:
        yield
    except OSError as exc:
        raise _link_error(settings, exc, connecting) from exc
    except poplib.error_proto as exc:
        raise TemporaryFailure(
            f"{_where(settings)}: the POP3 server refused a command ({_words(exc)}): try again later"
        ) from exc


def _link_error(settings: ConnectionSettings, exc: OSError, connecting: bool = False) -> ConnectFailure:
    where = _where(settings)
    if isinstance(exc, TimeoutError):
        return ConnectFailure(
            f"{where}: the POP3 server did not answer within {settings.timeout:g} s: check the host and "
            "the port, or raise the timeout"
        )
    if connecting:
        return ConnectFailure(
            f"{where}: cannot connect ({exc.strerror or exc}): check the host, the port and the encryption, "
            "and that a firewall lets the connection through"
        )
    return ConnectFailure(
        f"{where}: the connection to the POP3 server broke ({exc.strerror or exc}): try again later; "
        "messages already stored are kept"
    )
