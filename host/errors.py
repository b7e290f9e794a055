"""The one exception tree of mailhost.

::

    MailhostError
     ├── UsageError                 bad input from an admin or a caller: exit status 2
     │    ├── ConfigError           the config file or the environment is wrong
     │    ├── ValidationError       a connection attribute (or other value) is invalid
     │    └── NotFound              a named thing does not exist
     ├── PluginError                a plugin failed to load or broke its contract
     ├── StoreError                 the store cannot be used just now (unreachable, busy,
     │                              full, read-only): exit status 1, try again later
     └── MailError                  talking to a mail server failed: exit status 1
          ├── TemporaryFailure      try again later (timeouts, dropped links, 4xx, 429);
          │                         ``in_doubt``: the message went out and may have arrived
          │    └── ConnectFailure   DNS, TCP or the server closed the link
          └── PermanentFailure      retrying will not help (5xx, refused message)
               ├── AuthenticationFailed
               └── TLSFailure       certificate not trusted, STARTTLS missing, ...

Every message is one sentence that names the offender and, where there is one, the fix.
Protocol plugins raise ``MailError`` subclasses; the host adds the connection's name.
"""
from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConnectFailure",
    "MailError",
    "MailhostError",
    "NotFound",
    "PermanentFailure",
    "PluginError",
    "StoreError",
    "TLSFailure",
    "TemporaryFailure",
    "UsageError",
    "ValidationError",
]


class MailhostError(Exception):
    """Base of every error mailhost raises on purpose."""

    exit_code: int = 1


class UsageError(MailhostError):
    """Bad input: the caller can fix it; nothing was changed."""

    exit_code = 2


class ConfigError(UsageError):
    """The config file, the secret key or an environment variable is wrong."""


class ValidationError(UsageError):
    """A value is invalid; the message names the field and the fix."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(UsageError):
    """A named connection, credential, certificate or queue item does not exist."""


class PluginError(MailhostError):
    """A plugin failed to import, to register, or broke its contract."""


class StoreError(MailhostError):
    """The store failed while working: the database is unreachable, busy, full or
    read-only. Nothing half-done was kept (the transaction rolled back); trying again
    later may succeed."""


class StoreUnreachable(StoreError):
    """The database server did not answer (not running, starting up, out of
    connections, or not at that address): nothing was done; ``serve`` waits for it."""


class MailError(MailhostError):
    """Talking to a mail server failed."""

    #: Whether trying again later may succeed.
    temporary: bool = False
    #: The reply per recipient a server refused, when the message failed: every
    #: recipient refused, or the message itself (DATA, a broken link) after some were.
    refused: dict[str, str] | None = None


class TemporaryFailure(MailError):
    """Timeouts, dropped connections, 4xx replies, throttling: retry later."""

    temporary = True

    def __init__(self, message: str, retry_after: float | None = None, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The whole message reached the server and its answer never came (a timeout or
        #: a dropped link after the content): it may have been delivered. The outgoing
        #: queue records such an attempt as ``interrupted`` and never hands the message
        #: to another connection at once, which would send it twice.
        self.in_doubt = in_doubt


class ConnectFailure(TemporaryFailure):
    """The server could not be reached (DNS, TCP refused, connection dropped)."""


class PermanentFailure(MailError):
    """The server refused for good (5xx, a message it will never take)."""


class AuthenticationFailed(PermanentFailure):
    """The server refused the credentials."""


class TLSFailure(PermanentFailure):
    """TLS could not be set up safely: untrusted certificate, STARTTLS missing, ..."""
