"""mailhost: mail connections as a service, with every protocol a plugin.

The public face of the package: the Python API (:class:`Mailhost`), the hook markers
for plugin authors (:data:`hookimpl`), and the types a protocol plugin implements.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .certificates import Certificate, Decryption
from .errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectFailure,
    MailError,
    MailhostError,
    NotFound,
    PermanentFailure,
    PluginError,
    StoreError,
    TemporaryFailure,
    TLSFailure,
    UsageError,
    ValidationError,
)
from .hookspecs import hookimpl, hookspec
from .protocols import (
    AfterDownloadAction,
    ConnectionSettings,
    Direction,
    Encryption,
    Estimate,
    HostOverride,
    IncomingSession,
    Listing,
    MessageRef,
    OutgoingSession,
    ProtocolProvider,
    ProviderOption,
    SendResult,
    TestStep,
)

if TYPE_CHECKING:
    from .app import Mailhost

__version__ = "0.1.0"

__all__ = [
    "AfterDownloadAction",
    "AuthenticationFailed",
    "Certificate",
    "ConfigError",
    "ConnectFailure",
    "ConnectionSettings",
    "Decryption",
    "Direction",
    "Encryption",
    "Estimate",
    "HostOverride",
    "IncomingSession",
    "Listing",
    "MailError",
    "Mailhost",
    "MailhostError",
    "MessageRef",
    "NotFound",
    "OutgoingSession",
    "PermanentFailure",
    "PluginError",
    "ProtocolProvider",
    "ProviderOption",
    "SendResult",
    "StoreError",
    "TLSFailure",
    "TemporaryFailure",
    "TestStep",
    "UsageError",
    "ValidationError",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    # Mailhost loads lazily (PEP 562): a plugin's ``from mailhost import hookimpl`` should
    # not import the store and SQLAlchemy, which only the host itself needs.
    if name == "Mailhost":
        from .app import Mailhost

        return Mailhost
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
