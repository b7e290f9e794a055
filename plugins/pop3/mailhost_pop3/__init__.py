"""mailhost-pop3: incoming mail over POP3 (RFC 1939), recognised by UIDL.

POP3 has no folders and no read flag: after download a message is kept on the server
(the default; its stored UIDL keeps it from coming twice) or deleted.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mailhost.hookspecs import hookimpl
from mailhost.protocols import Direction, Encryption, ProtocolProvider, lazy

if TYPE_CHECKING:
    from ._session import Pop3Session

__all__ = ["DEFAULT_PORTS", "PROVIDER", "Pop3Session", "open_session", "register_protocols", "test"]

#: Default ports by encryption (the session modules use these too).
DEFAULT_PORTS: Mapping[Encryption, int] = {Encryption.NONE: 110, Encryption.STARTTLS: 110, Encryption.SSL: 995}


# The session and poplib load only when a connection is opened or tested.
open_session = lazy("mailhost_pop3._session:open_session")
test = lazy("mailhost_pop3._session:test")


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


def __getattr__(name: str) -> Any:
    if name == "Pop3Session":  # exported, loaded on first use
        from ._session import Pop3Session

        return Pop3Session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
