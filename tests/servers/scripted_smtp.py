"""A scripted SMTP responder: says what a test tells it to, where aiosmtpd cannot.

aiosmtpd is a correct server; the defects a client must survive come from servers that
are not, or from links that break: a reply line longer than a client reads, a 421 sent
while the client is still writing the message, a server that reads the message slowly.
:func:`scripted_server` answers each command line with what the test's ``answer`` says,
on a free port on 127.0.0.1, in a thread, for a given number of links in turn.
"""
from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["scripted_server"]

_PIECE = 64 * 1024

#: What the server sends: the bytes at once, or pieces (maybe without end) ``drip`` seconds apart.
Reply = bytes | Iterable[bytes]


def scripted_server(answer: Callable[[bytes], Reply | None], connections: int = 1, *,
                    greeting: Reply = b"220 scripted ESMTP\r\n", read_only: int | None = None,
                    pace: float = 0.0, drip: float = 0.0,
                    context: ssl.SSLContext | None = None) -> tuple[int, threading.Thread, list[bytes]]:
    """A server on a free port for ``connections`` links, one after the other: greets
    with ``greeting``, then answers each command line with ``answer(line)`` (None: close the
    link; a 421 closes it once sent, as RFC 5321 3.8 says). After a 354 it reads the
    message to its final dot, records it as one entry of what it heard (without the dot
    line) and sends ``answer(b"<message>")``.

    ``read_only``: read only this many bytes of the message, then send
    ``answer(b"<message>")`` at once (the client is still writing). ``pace``: take this
    many seconds for each 64 KiB of the message (a slow link; the listener's receive
    buffer is made small, so the client feels it). ``drip``: a greeting or answer given
    as pieces (an iterable of bytes, which may never end: a server dripping a reply a
    byte or a line at a time) is sent a piece every ``drip`` seconds, until the client
    goes away. ``context``: implicit TLS. Returns the port, the thread and what it heard."""
    listener = socket.socket()
    if pace:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _PIECE)  # accepted links inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen(connections)
    heard: list[bytes] = []

    def content(f: io.BufferedReader) -> bytes:
        if read_only is not None:
            return f.read(read_only)
        got = bytearray()
        while not got.endswith(b"\r\n.\r\n"):
            piece = f.read1(_PIECE)
            if not piece:
                break
            got += piece
            if pace:
                time.sleep(pace * len(piece) / _PIECE)
        return bytes(got[:-3]) if got.endswith(b"\r\n.\r\n") else bytes(got)

    def send(conn: socket.socket, reply: Reply) -> None:
        if isinstance(reply, bytes):
            conn.sendall(reply)
            return
        for n, piece in enumerate(reply):
            if n:
                time.sleep(drip)
            conn.sendall(piece)

    def serve() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            conn.settimeout(10)
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            f = conn.makefile("rb")
            try:
                send(conn, greeting)
                while line := f.readline():
                    heard.append(line)
                    reply = answer(line)
                    if reply is None:
                        break
                    send(conn, reply)
                    if isinstance(reply, bytes) and reply.startswith(b"354"):
                        heard.append(content(f))
                        reply = answer(b"<message>") or b""
                        send(conn, reply)
                    if isinstance(reply, bytes) and reply.startswith(b"421"):
                        break
            except OSError:  # the client went away: what it did is in heard
                pass
            finally:
                f.close()  # the file holds the socket open too
                conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, heard
