"""Microsoft Graph for mailhost: incoming and outgoing mail over the Graph API, on httpx.

The plugin registers the protocol ``graph`` in both directions. :mod:`.incoming` lists
new mail with the delta query and downloads raw MIME; :mod:`.outgoing` sends MIME with
``sendMail``, or over Graph's 4 MB request limit as a draft with its attachments uploaded;
:mod:`.client` is the well-behaved HTTP side (TLS, tokens, throttling, batching);
:mod:`.folders` finds folders by name; :mod:`.diagnose` is the connection test.
The Graph endpoint per Microsoft cloud comes from the host overrides the OAuth2 provider
plugin registers (``mailhost host-overrides --protocol graph``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailhost import hookimpl
from mailhost.protocols import Direction, ProtocolProvider, lazy

from .folders import canonical_folder

if TYPE_CHECKING:
    from .client import DEFAULT_HOST, GraphClient
    from .incoming import GraphIncomingSession
    from .outgoing import GraphOutgoingSession

__all__ = [
    "DEFAULT_HOST",
    "INCOMING",
    "OUTGOING",
    "GraphClient",
    "GraphIncomingSession",
    "GraphOutgoingSession",
    "register_protocols",
]

__version__ = "0.1.0"


# The client (httpx and what it imports) loads only when a Graph connection is opened or tested.
open_incoming = lazy("mailhost_graph.incoming:open_incoming")
open_outgoing = lazy("mailhost_graph.outgoing:open_outgoing")
test_incoming = lazy("mailhost_graph.diagnose:test_incoming")
test_outgoing = lazy("mailhost_graph.diagnose:test_outgoing")


INCOMING = ProtocolProvider(
    name="graph",
    direction=Direction.INCOMING,
    title="Microsoft Graph",
    open=open_incoming,
    connect_modes=frozenset({"oauth2"}),
    attributes=frozenset({
        "host", "port", "username", "shared_mailbox", "folder", "oauth_credential", "host_override",
        "ca_file", "certificates",
    }),
    required=frozenset({"username"}),
    after_download=("mark-seen", "delete", "move", "keep"),
    default_folder="Inbox",
    canonical_folder=canonical_folder,  # Exchange folder names ignore case
    test=test_incoming,
)

OUTGOING = ProtocolProvider(
    name="graph",
    direction=Direction.OUTGOING,
    title="Microsoft Graph",
    open=open_outgoing,
    connect_modes=frozenset({"oauth2"}),
    attributes=frozenset({
        # The seeds' Prefix applies to OAuth2 connections too; the host writes it into the
        # subject, as it does the From address, before the session gets the message.
        "host", "port", "username", "from_address", "prefix", "oauth_credential", "host_override", "ca_file",
        "size_limit", "debug",
    }),
    required=frozenset({"username"}),
    test=test_outgoing,
)


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register ``graph`` for incoming and for outgoing mail."""
    register(INCOMING)
    register(OUTGOING)


#: Exported names that load their module on first use.
_LAZY = {
    "DEFAULT_HOST": ".client",
    "GraphClient": ".client",
    "GraphIncomingSession": ".incoming",
    "GraphOutgoingSession": ".outgoing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
