"""mailhost-smtp: outgoing mail over SMTP, on the standard library's smtplib.

Registers the ``smtp`` outgoing protocol. Like an httpx transport it does one job:
open a verified, signed-in session and send raw messages through it. The host owns the
queue, the retries, the fallback to the default connection and the records.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailhost import Direction, Encryption, ProtocolProvider, hookimpl
from mailhost.protocols import lazy

if TYPE_CHECKING:
    from ._session import SmtpSession

__all__ = ["PROVIDER", "SmtpSession", "open_session", "register_protocols", "test_connection"]

#: Default ports by encryption (the session modules use these too).
DEFAULT_PORTS: dict[Encryption, int] = {Encryption.NONE: 25, Encryption.SSL: 465, Encryption.STARTTLS: 587}

# The session and smtplib load only when a connection is opened or tested.
open_session = lazy("mailhost_smtp._session:open_session")
test_connection = lazy("mailhost_smtp._session:test_connection")


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


def __getattr__(name: str) -> Any:
    if name == "SmtpSession":  # exported, loaded on first use
        from ._session import SmtpSession

        return SmtpSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
