"""The POP3 session against a tiny scripted server: drops, missing UIDL, XOAUTH2."""
from __future__ import annotations

import base64
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.errors import AuthenticationFailed, ConnectFailure, PermanentFailure, TemporaryFailure
from mailhost.protocols import ConnectionSettings, Direction, Encryption
import mailhost_pop3
from mailhost_pop3 import open_session
from tests.servers.certs import Pki

MESSAGES = [b"Subject: one\r\n\r\n.dot\r\nbody\r\n", b"Subject: two\r\n\r\n" + b"x" * 5000 + b"\r\n"]
TOKEN = "ya29.secret-token"


@dataclass
class Script:
    """How the fake server behaves."""

    capa: list[str] = field(default_factory=lambda: ["USER", "UIDL", "SASL XOAUTH2"])
    drop_on_retr: int | None = None  # message number whose RETR is cut in the middle
    stall_on_retr: int | None = None  # message number whose RETR stops in the middle
    drip_on_retr: int | None = None  # message number whose RETR goes on a byte every 0.05 s after the middle
    trickle: bool = False  # every RETR comes 8 KiB every 0.05 s: slow, and steady
    busy: str | None = None  # a command answered by an endless drip (lines for UIDL, bytes of the line else)
    no_capa: bool = False  # -ERR to CAPA (an RFC 1939 server: CAPA is RFC 2449's)
    uidl: bool | None = None  # whether UIDL works; None: as CAPA says
    messages: list[bytes] = field(default_factory=lambda: list(MESSAGES))
    release: threading.Event = field(default_factory=threading.Event)  # ends a stall
    auth_lines: list[bytes] = field(default_factory=list)  # what the client sent after AUTH
    tls: ssl.SSLContext | None = None  # offer STLS with this server context
    inject: bytes = b""  # sent in plain text right after STLS's +OK, before the handshake
    echo_pass: bool = False  # refuse PASS, quoting the password back
    refuse_quit: bool = False  # -ERR to QUIT: the DELEs of the session are not applied
    deleted: list[int] = field(default_factory=list)  # messages DELE removed at a confirmed QUIT


def _stuffed(raw: bytes) -> bytes:
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n..")[2:]


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        script: Script = self.server.script  # type: ignore[attr-defined]
        send = self.wfile.write
        send(b"+OK fake POP3 ready\r\n")
        capa = script.capa + (["STLS"] if script.tls else [])
        marked: list[int] = []
        while line := self.rfile.readline():
            cmd, _, arg = line.strip().decode().partition(" ")
            cmd = cmd.upper()
            if cmd == script.busy:  # each piece well within any read's timeout: only a guard ends it
                send(b"+OK\r\n" if cmd == "UIDL" else b"+OK hang on")
                for n in range(1, 400):
                    if script.release.wait(0.05):
                        break
                    try:
                        send(b"%d uid-%d\r\n" % (n, n) if cmd == "UIDL" else b".")
                    except OSError:
                        return  # the client cut the link off
                return  # 20 s: hang up
            if cmd == "CAPA" and script.no_capa:
                send(b"-ERR unknown command\r\n")
            elif cmd == "CAPA":
                send(b"+OK\r\n" + b"".join(c.encode() + b"\r\n" for c in capa) + b".\r\n")
            elif cmd == "STLS" and script.tls:
                send(b"+OK Begin TLS\r\n" + script.inject)
                self.request = script.tls.wrap_socket(self.request, server_side=True)
                self.rfile, self.wfile = self.request.makefile("rb"), self.request.makefile("wb", 0)
                send, capa = self.wfile.write, script.capa
            elif cmd == "PASS" and script.echo_pass:
                send(b"-ERR [AUTH] wrong password " + arg.encode() + b" for user\r\n")
            elif cmd in ("USER", "PASS", "NOOP"):
                send(b"+OK\r\n")
            elif cmd == "AUTH":
                send(b"+ \r\n")
                script.auth_lines.append(self.rfile.readline().strip())
                creds = base64.b64decode(script.auth_lines[-1])
                if creds == f"user=shared@example.com\x01auth=Bearer {TOKEN}\x01\x01".encode():
                    send(b"+OK signed in\r\n")
                else:  # XOAUTH2 says why in a challenge, then -ERR after the empty reply
                    send(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
                    script.auth_lines.append(self.rfile.readline().strip())
                    send(b"-ERR [AUTH] invalid token\r\n")
            elif cmd == "UIDL" and ("UIDL" in script.capa if script.uidl is None else script.uidl):
                send(b"+OK\r\n" + b"".join(b"%d uid-%d\r\n" % (i, i) for i in range(1, len(script.messages) + 1))
                     + b".\r\n")
            elif cmd == "STAT":
                send(b"+OK %d %d\r\n" % (len(script.messages), sum(map(len, script.messages))))
            elif cmd == "LIST":
                send(b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(script.messages, 1)) + b".\r\n")
            elif cmd == "RETR":
                n = int(arg)
                body = b"+OK\r\n" + _stuffed(script.messages[n - 1]) + b".\r\n"
                if script.trickle:
                    for at in range(0, len(body), 8192):
                        time.sleep(0.05)
                        send(body[at : at + 8192])
                    continue
                if n == script.drip_on_retr:  # each byte well within any read's timeout: only a guard ends it
                    at = len(body) // 2
                    send(body[:at])
                    while at < len(body) and not script.release.wait(0.05):
                        try:
                            send(body[at : at + 1])
                        except OSError:
                            return  # the client cut the link off
                        at += 1
                    send(body[at:])
                    continue
                if n in (script.drop_on_retr, script.stall_on_retr):
                    send(body[: len(body) // 2])
                    if n == script.stall_on_retr:
                        script.release.wait()  # then the rest of the reply, late
                        send(body[len(body) // 2 :])
                        continue
                    self.request.shutdown(socket.SHUT_RDWR)
                    return
                send(body)
            elif cmd == "DELE":
                marked.append(int(arg))
                send(b"+OK marked\r\n")
            elif cmd == "QUIT":
                if script.refuse_quit:
                    send(b"-ERR some deleted messages not removed\r\n")
                    return
                script.deleted.extend(marked)
                send(b"+OK bye\r\n")
                return
            else:
                send(b"-ERR unknown command\r\n")


@pytest.fixture
def fake() -> Iterator[tuple[Script, int]]:
    """A scripted POP3 server on 127.0.0.1: its script and its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.script = Script()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.script, server.server_address[1]  # type: ignore[attr-defined]
    server.script.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def settings(port: int, **kw: Any) -> ConnectionSettings:
    """Plain-text settings for the fake server."""
    given: dict[str, Any] = {"host": "127.0.0.1", "encryption": Encryption.NONE, "username": "u", "password": "p",
                             "timeout": 10, **kw}
    return ConnectionSettings(name="hostile", protocol="pop3", port=port, **given)


def test_drop_mid_retr_is_connect_failure(fake: tuple[Script, int]) -> None:
    """A server that drops the link inside RETR raises ConnectFailure after the whole messages."""
    script, port = fake
    script.drop_on_retr = 2
    got = []
    session = open_session(settings(port))
    with pytest.raises(ConnectFailure, match="hostile on 127.0.0.1.*broke .the server closed the connection.*try again later"):
        for ref, raw in session.fetch(session.list_new(None, lambda keys: set()).refs):
            got.append(raw)
    session.close()
    assert got == MESSAGES[:1]
    assert not session.closed_cleanly


def test_timeout_mid_retr_leaves_no_stale_reply(fake: tuple[Script, int]) -> None:
    """After a timeout inside RETR, QUIT is not answered by the rest of the old reply."""
    script, port = fake
    script.stall_on_retr = 2
    session = open_session(settings(port, timeout=0.3))
    with pytest.raises(ConnectFailure, match="hostile on 127.0.0.1.*did not answer within 0.3 s"):
        list(session.fetch(session.list_new(None, lambda keys: set()).refs))
    script.release.set()
    session.close()
    assert not session.closed_cleanly


def test_lockstep_without_pipelining(fake: tuple[Script, int]) -> None:
    """A server without PIPELINING gets one RETR at a time, dot-unstuffed."""
    _, port = fake
    with open_session(settings(port)) as session:
        assert [raw for _, raw in session.fetch(session.list_new(None, lambda keys: set()).refs)] == MESSAGES
    assert session.closed_cleanly


def test_server_without_uidl_is_refused(fake: tuple[Script, int]) -> None:
    """Without UIDL messages cannot be recognised: listing fails with a clear reason."""
    script, port = fake
    script.capa = ["USER"]
    with open_session(settings(port)) as session:
        with pytest.raises(PermanentFailure, match="does not support UIDL.*use IMAP"):
            session.list_new(None, lambda keys: set())


@pytest.mark.parametrize(("no_capa", "uidl"), [(True, False), (True, True), (False, True)],
                         ids=["no-capa-no-uidl", "no-capa", "uidl-not-listed"])
def test_the_connection_test_asks_uidl_when_capa_does_not_list_it(fake: tuple[Script, int], no_capa: bool,
                                                                  uidl: bool) -> None:
    """CAPA is optional, and says only what the server chose to list: when it does not
    list UIDL the test asks UIDL itself, so that it passes exactly when the download
    passes would (a server without UIDL fails both, with the same reason and fix)."""
    script, port = fake
    script.capa, script.no_capa, script.uidl = ["USER"], no_capa, uidl
    steps = list(mailhost_pop3.test(settings(port)))
    with open_session(settings(port)) as session:
        try:
            session.list_new(None, lambda keys: set())
            listed = "ok"
        except PermanentFailure as exc:
            listed = str(exc)
    capabilities = next(step for step in steps if step.name == "capabilities")
    assert capabilities.ok is uidl and steps[-1].ok is uidl, steps
    if uidl:
        assert listed == "ok" and steps[-1].name == "messages"
        assert "UIDL answers" in capabilities.detail
    else:
        assert capabilities.detail == listed and "does not support UIDL" in listed and "use IMAP" in listed


def test_xoauth2_signs_in_as_shared_mailbox(fake: tuple[Script, int]) -> None:
    """OAuth2 uses AUTH XOAUTH2 with the shared mailbox as user and a fresh token."""
    script, port = fake
    with open_session(settings(port, password=None, shared_mailbox="shared@example.com",
                               access_token=lambda: TOKEN)) as session:
        assert len(session.list_new(None, lambda keys: set()).refs) == 2


def test_xoauth2_refusal_hides_the_token(fake: tuple[Script, int]) -> None:
    """A refused token is AuthenticationFailed with the fix; the token appears nowhere."""
    script, port = fake
    with pytest.raises(AuthenticationFailed, match="hostile on 127.0.0.1: authorize the OAuth2") as failure:
        open_session(settings(port, password=None, access_token=lambda: TOKEN))
    assert script.auth_lines[-1] == b""  # the error challenge was answered
    assert TOKEN not in str(failure.value) and TOKEN not in repr(failure.value)


def test_stls_discards_what_came_before_the_handshake(fake: tuple[Script, int], pki: Pki) -> None:
    """Replies injected in plain text after STLS's +OK are never taken for the server's."""
    script, port = fake
    script.tls = pki.server_context()
    script.inject = b"+OK\r\nPIPELINING\r\n.\r\n+OK injected\r\n"
    with open_session(settings(port, host="localhost", encryption=Encryption.STARTTLS,
                               ca_file=pki.ca_file)) as session:
        assert isinstance(session.client.sock, ssl.SSLSocket)
        assert "PIPELINING" not in session.client.capabilities
        assert [raw for _, raw in session.fetch(session.list_new(None, lambda keys: set()).refs)] == MESSAGES
    assert session.closed_cleanly


def test_a_server_quoting_the_password_does_not_show_it(fake: tuple[Script, int], mh: Mailhost) -> None:
    """The connection test prints what the server said when it refused; a server that
    quotes the password there has it hidden, before saving and after."""
    script, port = fake
    script.echo_pass = True
    secret = "S3cr3t-Pa55"
    spec = ConnectionSpec(name="p", protocol="pop3", host="127.0.0.1", port=port, encryption="none",
                          username="u", password=secret)
    unsaved = list(mh.connections.test(Direction.INCOMING, None, spec))
    mh.connections.add(Direction.INCOMING, spec)
    saved = list(mh.connections.test(Direction.INCOMING, "p", ConnectionSpec()))
    for steps in (unsaved, saved):
        assert not steps[-1].ok and "wrong password ******** for user" in steps[-1].detail
        assert not [step for step in steps if secret in step.detail]


def test_a_refused_quit_is_no_acknowledgement(fake: tuple[Script, int], mh: Mailhost) -> None:
    """-ERR to QUIT means the server applied none of the session's DELEs: the pass stores
    the mail but ends not ok, counting nothing acknowledged, and the next pass deletes."""
    script, port = fake
    script.refuse_quit = True
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="p", protocol="pop3", host="127.0.0.1", port=port, encryption="none", username="u", password="p",
        after_download="delete"))
    first = mh.incoming.fetch_one("p")
    assert (first.ok, first.stored, first.acknowledged, script.deleted) == (False, 2, 0, [])
    assert "did not confirm the end of the session" in (first.error or "") and "next pass" in (first.error or "")
    script.refuse_quit = False
    second = mh.incoming.fetch_one("p")
    assert (second.ok, second.stored, second.acknowledged, sorted(script.deleted)) == (True, 0, 2, [1, 2])


def test_a_link_that_breaks_mid_batch_keeps_the_whole_messages(fake: tuple[Script, int], mh: Mailhost) -> None:
    """The link breaks inside message 2: message 1, which came whole, is stored; the pass
    ends not ok naming message 2, and the next pass brings just that one."""
    script, port = fake
    script.drop_on_retr = 2
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="p", protocol="pop3", host="127.0.0.1", port=port, encryption="none", username="u", password="p"))
    first = mh.incoming.fetch_one("p")
    assert (first.ok, first.stored) == (False, 1)
    assert f"it broke in message 2 (UIDL uid-2, {len(MESSAGES[1]):,} bytes)" in (first.error or "")
    script.drop_on_retr = None
    second = mh.incoming.fetch_one("p")
    assert (second.ok, second.listed, second.stored) == (True, 1, 1)
    assert [mh.incoming.item(item.id).raw for item in reversed(mh.incoming.items())] == MESSAGES


def test_a_dripping_retr_is_cut_off_and_names_the_message(fake: tuple[Script, int]) -> None:
    """A server that sends message 2 a byte at a time, each byte well within the read
    timeout, never times a read out: the stall guard ends the download with a
    TemporaryFailure that names the server, the message and what to do."""
    script, port = fake
    script.drip_on_retr = 2
    session = open_session(settings(port, timeout=0.3))
    got = []
    with pytest.raises(TemporaryFailure) as failure:
        for _, raw in session.fetch(session.list_new(None, lambda keys: set()).refs):
            got.append(raw)
    session.close()
    assert got == MESSAGES[:1]
    assert not isinstance(failure.value, ConnectFailure)
    assert (f"hostile on 127.0.0.1:{port} sent message 2 (UIDL uid-2, {len(MESSAGES[1]):,} bytes) so slowly that "
            "neither a message nor 64 KiB of one came in 1.2 s (4 times the connection's timeout of 0.3 s)"
            ) in str(failure.value)
    assert "the next pass goes on from there" in str(failure.value) and "raise the timeout" in str(failure.value)


def test_a_pass_a_server_drips_stores_what_came_whole_and_the_next_resumes(fake: tuple[Script, int],
                                                                           mh: Mailhost) -> None:
    """The dripped pass ends (and with it the lease the keeper renews) not ok, with message 1
    stored; the next pass brings message 2 and deletes both, each after it was stored."""
    script, port = fake
    script.drip_on_retr = 2
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="p", protocol="pop3", host="127.0.0.1", port=port, encryption="none", username="u", password="p",
        timeout=300, after_download="delete"))
    first = mh.incoming.fetch_one("p")
    assert (first.ok, first.stored, script.deleted) == (False, 1, [])
    assert (first.error or "").startswith(f"p on 127.0.0.1:{port} sent message 2 (UIDL uid-2")
    script.drip_on_retr = None
    second = mh.incoming.fetch_one("p")
    assert (second.ok, second.listed, second.stored, sorted(script.deleted)) == (True, 1, 1, [1, 2])
    assert [mh.incoming.item(item.id).raw for item in reversed(mh.incoming.items())] == MESSAGES


def test_a_big_message_that_comes_slowly_but_steadily_is_not_cut_off(fake: tuple[Script, int]) -> None:
    """384 KiB at 8 KiB every 0.05 s takes longer than the stall guard's 2 s, but every
    64 KiB of it comes well within them: the guard counts pieces, not whole messages."""
    script, port = fake
    script.trickle = True
    script.messages = [b"Subject: big\r\n\r\n" + (b"y" * 1022 + b"\r\n") * 384]
    with open_session(settings(port, timeout=0.5)) as session:
        assert [raw for _, raw in session.fetch(session.list_new(None, lambda keys: set()).refs)] == script.messages


@pytest.mark.parametrize("command", ["USER", "PASS", "AUTH", "UIDL"])
def test_a_command_the_server_drips_is_cut_off_and_named(fake: tuple[Script, int], command: str) -> None:
    """Not only RETR: the sign-in (USER/PASS, or AUTH) and the listing each end within the
    stall guard's allowance when the server drips their answer, each piece well within
    the read timeout, with a TemporaryFailure naming the connection, the server and the command."""
    script, port = fake
    script.busy = command
    oauth = {"password": None, "access_token": lambda: TOKEN} if command == "AUTH" else {}
    with pytest.raises(TemporaryFailure) as failure:
        with open_session(settings(port, timeout=0.3, **oauth)) as session:
            session.list_new(None, lambda keys: set())
    assert not isinstance(failure.value, ConnectFailure)
    assert str(failure.value).startswith(
        f"hostile on 127.0.0.1:{port} sent its answer to {command} so slowly that neither all of it nor 64 KiB of "
        "it came in 1.2 s (4 times the connection's timeout of 0.3 s), so mailhost closed the link: the next pass "
        "tries again"), str(failure.value)


def test_a_quit_the_server_drips_ends_the_session_unconfirmed(fake: tuple[Script, int],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """close() never raises: a dripped QUIT is cut off by the guard (which the debug log
    says), and the session counts as not closed cleanly, so its DELEs are not taken for done."""
    script, port = fake
    script.busy = "QUIT"
    session = open_session(settings(port, timeout=0.3))
    session.delete(session.list_new(None, lambda keys: set()).refs)
    with caplog.at_level("DEBUG", logger="mailhost_pop3._session"):
        session.close()
    assert not session.closed_cleanly and script.deleted == []
    assert f"hostile on 127.0.0.1:{port} sent its answer to QUIT so slowly" in caplog.text, caplog.text


def test_a_pass_whose_listing_the_server_drips_ends_and_the_next_one_downloads(fake: tuple[Script, int],
                                                                              mh: Mailhost) -> None:
    """The pass ends (and with it the lease its keeper renews) not ok, naming UIDL; the
    next pass, with a server that answers, downloads both messages."""
    script, port = fake
    script.busy = "UIDL"
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="p", protocol="pop3", host="127.0.0.1", port=port, encryption="none", username="u", password="p",
        timeout=300))
    first = mh.incoming.fetch_one("p")
    assert (first.ok, first.stored) == (False, 0)
    assert f"p on 127.0.0.1:{port} sent its answer to UIDL so slowly" in (first.error or ""), first.error
    script.busy = None
    second = mh.incoming.fetch_one("p")
    assert (second.ok, second.stored) == (True, 2)
