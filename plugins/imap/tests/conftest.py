"""Fixtures of the IMAP plugin's tests: settings for the session Dovecot, and a tiny
scripted IMAP server (127.0.0.1 only) for the hostile cases Dovecot will not play."""
from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mailhost.protocols import ConnectionSettings, Encryption
from tests.servers.certs import Pki
from tests.servers.dovecot import Dovecot
from tests.servers.fixtures import Mailbox

Settings = Callable[..., ConnectionSettings]


@pytest.fixture
def settings(dovecot: Dovecot, mailbox: Mailbox) -> Settings:
    """``settings(**changes)``: an SSL connection "helpdesk" to ``mailbox`` in the session Dovecot."""

    def make(server: Dovecot = dovecot, **changes: Any) -> ConnectionSettings:
        encryption = changes.get("encryption", Encryption.SSL)
        port = server.imaps_port if encryption is Encryption.SSL else server.imap_port
        values: dict[str, Any] = {
            "name": "helpdesk",
            "protocol": "imap",
            "host": "127.0.0.1",
            "port": port,
            "encryption": encryption,
            "username": mailbox.user,
            "password": mailbox.password,
            "ca_file": server.ca_file,
            "timeout": 10.0,
        }
        values.update(changes)
        return ConnectionSettings(**values)

    return make


class Peer:
    """The server's end of one connection: read commands, answer, switch to TLS."""

    def __init__(self, conn: socket.socket, context: ssl.SSLContext) -> None:
        self.conn, self.context = conn, context
        self.file = conn.makefile("rb")
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def command(self) -> tuple[bytes, bytes]:
        """The next command line as (tag, the rest)."""
        line = self.file.readline()
        self.received.append(line)
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        return tag, rest

    def starttls(self) -> None:
        self.file.close()
        self.conn = self.context.wrap_socket(self.conn, server_side=True)
        self.file = self.conn.makefile("rb")

    def answer(self, respond: Callable[[list[bytes]], bytes]) -> None:
        """Greet, then answer each command (split in words) with the untagged lines
        ``respond(words)`` gives and OK, until LOGOUT."""
        self.send(b"* OK fake IMAP ready\r\n")
        while True:
            tag, rest = self.command()
            words = rest.split()
            if not tag or words[0].upper() == b"LOGOUT":
                self.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            self.send(respond(words) + tag + b" OK done\r\n")

    def serve(self, answers: dict[bytes, bytes]) -> None:
        """Answer each command with its untagged lines from ``answers`` and OK, until LOGOUT."""
        while True:
            tag, rest = self.command()
            verb = rest.split(b" ", 1)[0].upper()
            if not tag or verb == b"LOGOUT":
                self.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            self.send(answers.get(verb, b"") + tag + b" OK done\r\n")


@pytest.fixture
def fake_imap(pki: Pki) -> Iterator[Callable[[Callable[[Peer], None]], int]]:
    """``start(script, connections=1) -> port``: an IMAP server running ``script(peer)``
    for each of ``connections`` connections, one after the other."""
    started: list[tuple[socket.socket, threading.Thread, list[BaseException]]] = []

    def start(script: Callable[[Peer], None], connections: int = 1) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        errors: list[BaseException] = []

        def run() -> None:
            for _ in range(connections):
                try:
                    conn, _ = listener.accept()
                    conn.settimeout(10)
                    with conn:
                        script(Peer(conn, pki.server_context()))
                except (OSError, ValueError):
                    pass  # the client hung up, as the tests expect it to
                except BaseException as exc:  # pragma: no cover - a broken script
                    errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((listener, thread, errors))
        return listener.getsockname()[1]

    yield start
    for listener, thread, errors in started:
        listener.close()
        thread.join(10)
        assert not errors, errors
