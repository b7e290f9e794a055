"""IMAP for mailhost: incoming mail, incremental by UID, on imapclient.

The plugin registers one protocol provider, ``imap``; :mod:`.session` holds the session,
:mod:`.link` opens the signed-in link, :mod:`.diagnose` is the step-by-step connection test.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailhost import hookimpl
from mailhost.protocols import Direction, Encryption, ProtocolProvider, lazy

if TYPE_CHECKING:
    from .session import ImapSession

__all__ = ["PROVIDER", "ImapSession", "register_protocols"]

__version__ = "0.1.0"

#: Default ports by encryption (the session modules use these too).
DEFAULT_PORTS = {Encryption.NONE: 143, Encryption.STARTTLS: 143, Encryption.SSL: 993}


# The session, the link and imapclient load only when a connection is opened or tested.
open_session = lazy("mailhost_imap.session:open_session")
test = lazy("mailhost_imap.diagnose:test")


PROVIDER = ProtocolProvider(
    name="imap",
    direction=Direction.INCOMING,
    title="IMAP",
    open=open_session,
    connect_modes=frozenset({"password", "oauth2"}),
    default_ports=DEFAULT_PORTS,
    attributes=frozenset(
        {
            "host",
            "port",
            "encryption",
            "username",
            "password",
            "folder",
            "shared_mailbox",
            "oauth_credential",
            "host_override",
            "ca_file",
            "certificates",
        }
    ),
    required=frozenset({"host", "username", "password"}),
    after_download=("mark-seen", "delete", "move", "keep"),
    default_folder="INBOX",
    canonical_folder=lambda name: "INBOX" if name.upper() == "INBOX" else name,  # RFC 3501 5.1
    test=test,
)


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register the ``imap`` incoming protocol."""
    register(PROVIDER)


def __getattr__(name: str) -> Any:
    if name == "ImapSession":  # exported, loaded on first use
        from .session import ImapSession

        return ImapSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
