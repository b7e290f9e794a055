"""mailhost-pop3: incoming mail over POP3 (RFC 1939), recognised by UIDL.

POP3 has no folders and no read flag: after download a message is kept on the server
(the default; its stored UIDL keeps it from coming twice) or deleted.
"""
from __future__ import annotations

from collections.abc import Callable

from mailhost.hookspecs import hookimpl
from mailhost.protocols import Direction, ProtocolProvider

from ._session import DEFAULT_PORTS, Pop3Session, open_session, test

__all__ = ["DEFAULT_PORTS", "PROVIDER", "Pop3Session", "open_session", "register_protocols", "test"]

#: The ``pop3`` incoming protocol.
PROVIDER = ProtocolProvider(
    name="pop3",
    direction=Direction.INCOMING,
    title="POP3",
    open=open_session,
    test=test,
    connect_modes=frozenset({"password", "oauth2"}),
    default_ports=DEFAULT_PORTS,
    # No "folder": POP3 has one maildrop, so the host refuses a Folder for it.
    attributes=frozenset(
        {"host", "port", "encryption", "username", "password", "shared_mailbox",
         "oauth_credential", "host_override", "ca_file", "certificates"}
    ),
    required=frozenset({"host", "username", "password"}),
    after_download=("keep", "delete"),  # no "mark-seen": POP3 has no read flag
)


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register the ``pop3`` incoming protocol."""
    register(PROVIDER)
