"""IMAP for mailhost: incoming mail, incremental by UID, on imapclient.

The plugin registers one protocol provider, ``imap``; :mod:`.session` holds the session,
:mod:`.link` opens the signed-in link, :mod:`.diagnose` is the step-by-step connection test.
"""
from __future__ import annotations

from collections.abc import Callable

from mailhost import hookimpl
from mailhost.protocols import Direction, ProtocolProvider

from .diagnose import test
from .link import DEFAULT_PORTS
from .session import ImapSession, open_session

__all__ = ["PROVIDER", "ImapSession", "register_protocols"]

__version__ = "0.1.0"

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
    test=test,
)


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register the ``imap`` incoming protocol."""
    register(PROVIDER)
