"""mailhost-smtp: outgoing mail over SMTP, on the standard library's smtplib.

Registers the ``smtp`` outgoing protocol. Like an httpx transport it does one job:
open a verified, signed-in session and send raw messages through it. The host owns the
queue, the retries, the fallback to the default connection and the records.
"""
from __future__ import annotations

from collections.abc import Callable

from mailhost import Direction, ProtocolProvider, hookimpl

from ._session import DEFAULT_PORTS, SmtpSession, open_session, test_connection

__all__ = ["PROVIDER", "SmtpSession", "open_session", "register_protocols", "test_connection"]

PROVIDER = ProtocolProvider(
    name="smtp",
    direction=Direction.OUTGOING,
    open=open_session,
    title="SMTP",
    connect_modes=frozenset({"password", "oauth2"}),
    default_ports=DEFAULT_PORTS,
    attributes=frozenset({
        "host", "port", "encryption", "username", "password", "oauth_credential", "host_override",
        "ca_file", "from_address", "prefix", "size_limit", "debug",
    }),
    required=frozenset({"host"}),
    test=test_connection,
)


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register the ``smtp`` outgoing protocol."""
    register(PROVIDER)
