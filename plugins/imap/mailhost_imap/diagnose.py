"""``mailhost incoming test`` for IMAP: each step ok, or the exact failure and the fix."""
from __future__ import annotations

from collections.abc import Iterator

from mailhost.errors import MailError
from mailhost.protocols import ConnectionSettings, Encryption, TestStep
from mailhost.tls import describe_peer

from .link import connect_tcp, logout, resolve, sign_in, start, translated, with_defaults
from .session import ImapSession

__all__ = ["test"]

_REPORTED = ("IDLE", "MOVE", "UIDPLUS", "CONDSTORE", "QRESYNC")


def test(settings: ConnectionSettings) -> Iterator[TestStep]:
    """dns, tcp, tls (the names every protocol uses), authentication, capabilities, folder; stops
    at the first failure."""
    settings = with_defaults(settings)
    step = "dns"
    sock = client = None
    try:
        addresses = resolve(settings)
        found = sorted({address[4][0] for address in addresses})
        yield TestStep(step, True, f"{settings.host} resolves to {', '.join(found)}")

        step = "tcp"
        sock = connect_tcp(settings, addresses)
        peer = sock.getpeername()
        yield TestStep(step, True, f"connected to {peer[0]} port {peer[1]}")

        step = "tls" if settings.encryption is not Encryption.NONE else "greeting"
        client, sock = start(settings, sock), None  # start() owns the socket now
        if settings.encryption is Encryption.NONE:
            yield TestStep(step, True, "no TLS (encryption none): the password and the mail cross the network readable")
        else:
            how = "implicit TLS" if settings.encryption is Encryption.SSL else "STARTTLS"
            yield TestStep(step, True, f"{how}: {describe_peer(client.socket()).describe()}")

        step = "authentication"
        if client._imap.state != "NONAUTH":
            yield TestStep(step, True, "the server signed the session in itself (PREAUTH greeting)")
        else:
            sign_in(settings, client)
            who = settings.username
            if settings.shared_mailbox:
                who = f"{who}, opening the shared mailbox {settings.shared_mailbox}"
            yield TestStep(step, True, f"signed in as {who}")

        step = "capabilities"
        with translated(settings, "list its capabilities"):
            caps = {cap.decode() for cap in client.capabilities()}
        listed = ", ".join(f"{cap} {'yes' if cap in caps else 'no'}" for cap in _REPORTED)
        notes = []
        if "MOVE" not in caps:
            notes.append("the move action copies, then deletes")
        if "UIDPLUS" not in caps:
            notes.append("delete expunges only when no message not yet stored is flagged deleted")
        yield TestStep(step, True, listed + (f" ({'; '.join(notes)})" if notes else ""))

        step = "folder"
        session = ImapSession(settings, client)
        count = session.estimate(None, lambda keys: set()).count
        yield TestStep(step, True, f"folder {settings.folder} exists and holds {count} messages")
    except MailError as exc:
        yield TestStep(step, False, str(exc))
    finally:
        if client is not None:
            logout(client)
        elif sock is not None:
            sock.close()
