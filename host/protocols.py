"""What a protocol plugin provides, and what it is given.

A protocol plugin registers :class:`ProtocolProvider` objects through the
``register_protocols`` hook. A provider describes the protocol (its name, its direction,
its connect modes, its default ports, which connection attributes apply) and opens
sessions. Sessions are small, in the spirit of httpx transports:

- :class:`IncomingSession`: ``list_new`` what is new after a cursor, ``fetch`` raw
  messages in batches, acknowledge them (``mark_seen``, ``delete``, ``move``), ``close``.
- :class:`OutgoingSession`: ``send`` one raw message, ``close``.

A session knows nothing of the store, the queues or the CLI: it is given plain
:class:`ConnectionSettings` and returns plain values. The host does the rest (it stores
first and acknowledges after, it retries, it logs).

Usage from the host's side::

    with provider.open(settings) as session:
        listing = session.list_new(cursor, known)
        for ref, raw in session.fetch(listing.refs[:500]):
            ...
"""
from __future__ import annotations

import builtins
import contextlib
import enum
import json
import re
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, cast

from .errors import TemporaryFailure

__all__ = [
    "ATTRIBUTES",
    "AfterDownloadAction",
    "ConnectionSettings",
    "Direction",
    "Encryption",
    "Estimate",
    "HostOverride",
    "IncomingSession",
    "Listing",
    "MessageRef",
    "OutgoingSession",
    "ProtocolProvider",
    "ProviderOption",
    "STALL_PIECE",
    "STALL_TIMEOUTS",
    "SendResult",
    "Session",
    "StallGuard",
    "TestStep",
    "crlf",
    "lazy",
]


class Direction(str, enum.Enum):
    """Whether a protocol downloads mail (incoming) or delivers it (outgoing)."""

    INCOMING = "incoming"
    OUTGOING = "outgoing"


class Encryption(str, enum.Enum):
    """How the link to the server is protected."""

    NONE = "none"
    SSL = "ssl"  # implicit TLS from the first byte ("SSL/TLS" in the seeds)
    STARTTLS = "starttls"


#: Connection attributes that a provider may declare as applicable. ``name``,
#: ``description``, ``interval``, ``timeout`` and ``enabled`` always apply.
ATTRIBUTES: frozenset[str] = frozenset(
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
        "from_address",
        "prefix",
        "size_limit",
        "debug",
    }
)


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything a session needs to talk to one server; no store, no CLI.

    ``password`` is the decrypted secret: a session must never log it. ``transcript``
    is set when the connection's Debug attribute is on; every line passed to it is
    redacted by the host before it reaches a log.

    ``name`` is empty for a connection tested before it is saved: it has no name yet, so
    messages name it with :attr:`label` and :meth:`describe`, not with ``name``.
    """

    name: str
    protocol: str
    host: str | None = None
    port: int | None = None
    encryption: Encryption = Encryption.SSL
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    folder: str | None = None
    shared_mailbox: str | None = None
    timeout: float = 30.0  # seconds
    ca_file: str | None = None
    from_address: str | None = None
    size_limit: int = 0
    #: For OAuth2 connect mode: returns a fresh access token each time it is called.
    access_token: Callable[[], str] | None = field(default=None, repr=False)
    transcript: Callable[[str], None] | None = None
    #: The connection's values of the options its protocol declares
    #: (:attr:`ProtocolProvider.options`), typed, each declared name present: the value
    #: set on the connection, else the option's default (``None`` when it has none).
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def oauth2(self) -> bool:
        """Whether this connection signs in with an OAuth2 access token."""
        return self.access_token is not None

    @property
    def label(self) -> str:
        """The connection in a sentence: its name, or "this connection" before it is saved."""
        return self.name or "this connection"

    def describe(self) -> str:
        """``name on host:port`` (``host:port`` before it is saved), for error messages."""
        where = f"{self.host}:{self.port}" if self.host else self.protocol
        return f"{self.name} on {where}" if self.name else where


@dataclass(frozen=True)
class MessageRef:
    """One message on the server, as listed by :meth:`IncomingSession.list_new`.

    ``key`` identifies the message within its folder for as long as the server keeps
    it (IMAP: ``"<uidvalidity>:<uid>"``, POP3: the UIDL, Graph: the message id); the
    host records it with the stored message so it is never downloaded twice.
    ``cursor`` is the folder cursor that holds once this message and every one listed
    before it are stored (IMAP: the UID), or ``None`` when the protocol has no ordered
    cursor. ``handle`` is the protocol's own handle (UID, message number, ...).
    """

    key: str
    size: int | None = None
    handle: Any = None
    cursor: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Listing:
    """What :meth:`IncomingSession.list_new` found.

    ``refs`` in the order to download them. ``cursor`` is the folder cursor to store
    once every ref is stored (for Graph, the delta link). ``reset`` says the server
    renumbered the folder (IMAP UIDVALIDITY changed): the host then relies on content
    fingerprints to avoid storing a message twice.
    """

    refs: Sequence[MessageRef]
    cursor: Mapping[str, Any] | None = None
    reset: bool = False


@dataclass(frozen=True)
class Estimate:
    """How many messages a first (or next) download pass would fetch.

    ``count`` is of downloads: a session cannot know which of them the connection has
    stored before from another folder or mailbox (the host adds that to the note of an
    exact count), and need not.
    """

    count: int
    confidence: Literal["exact", "high", "low"]
    note: str = ""


@dataclass(frozen=True)
class TestStep:
    """One step of a connection test: ``ok`` with details, or the failure and the fix."""

    __test__ = False  # not a pytest test class

    #: Lowercase, and for the steps every protocol shares ``dns``, ``tcp``, ``tls``,
    #: ``authentication``: scripts read them from ``incoming test --json``.
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class SendResult:
    """What the server said to one message.

    ``refused`` maps each recipient the server refused to its reply; the message was
    delivered to the others. A session raises instead when nobody accepted it.
    """

    response: str = ""
    refused: Mapping[str, str] = field(default_factory=dict)


class Session:
    """Base of both session kinds: a context manager that closes itself."""

    def close(self) -> None:
        """Log out and close the link. Must not raise."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class IncomingSession(Session, ABC):
    """An open, signed-in link to one mailbox folder."""

    #: True where acknowledgements take effect only when the session ends (POP3 applies
    #: DELE at QUIT): the host then counts them done only once ``close()`` returned
    #: with ``closed_cleanly`` true, and repeats them otherwise.
    acknowledges_on_close: bool = False
    #: Set by ``close()`` of such sessions: whether the server confirmed the end.
    closed_cleanly: bool = True

    @abstractmethod
    def list_new(
        self,
        cursor: Mapping[str, Any] | None,
        known: Callable[[Sequence[str]], set[str]],
    ) -> Listing:
        """List the messages not yet downloaded.

        ``cursor`` is what the host stored for this folder (``None`` on the first
        pass). ``known(keys)`` returns those of ``keys`` already stored, for protocols
        whose cursor is the set of stored keys (POP3).
        """

    @abstractmethod
    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes]]:
        """Download the raw messages, exactly as the server sends them.

        Must not change the messages' state on the server (IMAP: ``BODY.PEEK[]``).
        A ref that vanished meanwhile is skipped.
        """

    def resolve(self, keys: Sequence[str]) -> list[MessageRef]:
        """Refs for keys listed in an earlier pass (to finish an acknowledgement a
        crash interrupted); keys no longer on the server are left out."""
        return []

    def estimate(
        self,
        cursor: Mapping[str, Any] | None,
        known: Callable[[Sequence[str]], set[str]],
    ) -> Estimate:
        """How many messages the next pass would download. Default: list them."""
        return Estimate(len(self.list_new(cursor, known).refs), "exact")

    # After-download primitives. A provider lists the actions it supports in
    # ``ProtocolProvider.after_download``; the default bodies say it does not.
    def mark_seen(self, refs: Sequence[MessageRef]) -> None:
        """Mark the messages read on the server."""
        raise NotImplementedError(f"{type(self).__name__} cannot mark messages seen")

    def delete(self, refs: Sequence[MessageRef]) -> None:
        """Remove the messages from the server."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete messages")

    def move(self, refs: Sequence[MessageRef], folder: str) -> None:
        """Move the messages to ``folder``, creating it if it is missing."""
        raise NotImplementedError(f"{type(self).__name__} cannot move messages")


class OutgoingSession(Session, ABC):
    """An open, signed-in link to a server that delivers mail."""

    @abstractmethod
    def send(self, raw: bytes, sender: str, recipients: Sequence[str],
             before_data: Callable[[], None] | None = None) -> SendResult:
        """Deliver one raw message to ``recipients`` (the envelope, not the headers).

        Whatever its line ends, the message goes out with CRLF ones (:func:`crlf`).

        ``before_data``, when given, is called once, after the server agreed to take
        the content and before the content goes out; the host waits there until the
        previous message's outcome is committed. If it raises, the session makes sure
        the server discards the message (SMTP: drop the link before the final dot) and
        lets the exception through. A session whose ``send`` does not take it is
        given one message at a time instead.

        When every recipient is refused, raise TemporaryFailure (any 4xx among the
        replies) or PermanentFailure, with ``refused`` set to the reply per recipient;
        when the message fails after some recipients were refused, the error's
        ``refused`` holds theirs too, so the queue's record keeps them.
        When the whole message went out and the server's answer did not come (a timeout,
        a dropped link), raise TemporaryFailure with ``in_doubt=True``: it may have been
        delivered.

        A session whose ``send`` also takes ``delivery_key`` (a keyword, with
        ``before_data``) is given an opaque string that is the same on every attempt at
        one queued message and differs for any other: a protocol that can find what an
        earlier attempt left on the server (a Graph draft) tags it with this key.
        """

    @property
    def max_size(self) -> int | None:
        """The largest message the server takes (SMTP ``SIZE``), if it said so."""
        return None


#: Names no option may take: the host's own connection attributes and fields, so an
#: option never reads as one of them (in JSON, on the command line, in the settings).
RESERVED_OPTION_NAMES: frozenset[str] = ATTRIBUTES | frozenset(
    {
        "name", "protocol", "description", "interval", "timeout", "enabled", "after_download",
        "after_download_argument", "move_to", "fallback_to_default", "default", "connect_mode",
        "password_set", "access_token", "transcript", "options", "undeclared_options",
        "last_poll_at", "last_error",
    }
)

_OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Words that say an option would hold a secret; options are stored and shown in clear.
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "apikey"})
_SECRET_ENDINGS = ("token", "api_key", "private_key", "client_key")  # not token_endpoint
_OPTION_TYPES: dict[type, str] = {str: "text", int: "a whole number", bool: "true or false"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
#: The longest text an option takes.
MAX_OPTION_TEXT = 1000


@dataclass(frozen=True)
class ProviderOption:
    """A connection setting a protocol declares beyond the host's :data:`ATTRIBUTES`
    (an account id, a tenant region, a batch size), in :attr:`ProtocolProvider.options`.

    ``type`` is ``str``, ``int`` or ``bool``; ``choices``, when given, are the only
    values it takes; ``minimum`` and ``maximum``, when given, bound an ``int`` option
    (both included). A connection that does not set it gets ``default`` (``None`` when
    there is none); a ``required`` option has no default and every connection must set
    it. ``identifies_mailbox`` says that another value points the connection at another
    mailbox (an account id, not a batch size): changing it makes the host forget what it
    downloaded there, as changing the host or username does. Admins set options with
    ``--option NAME=VALUE``; they are stored in clear and shown by ``show``: a secret
    belongs in the connection's password or OAuth2 credential, and a name that says
    "password", "secret", "token" or "api_key" is refused.
    """

    name: str
    description: str
    type: builtins.type = str  # (builtins.: inside the class, "type" would name this field)
    default: str | int | bool | None = None
    required: bool = False
    choices: tuple[str | int, ...] = ()
    identifies_mailbox: bool = False
    minimum: int | None = None
    maximum: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        what = f"option {self.name!r}"
        if not isinstance(self.name, str) or not _OPTION_NAME.match(self.name):
            raise ValueError(f"{what}: an option name is 1-63 characters of a-z, 0-9 and _, starting with a letter")
        words = set(self.name.split("_"))
        if words & _SECRET_WORDS or self.name.endswith(_SECRET_ENDINGS):
            raise ValueError(f"{what} looks like a secret, and options are stored and shown in clear: take the "
                             "secret from the connection's password or OAuth2 credential instead")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"{what} needs a description: admins read it in `mailhost plugins options`")
        if self.type not in _OPTION_TYPES:
            raise ValueError(f"{what}: type {getattr(self.type, '__name__', self.type)!r} is not str, int or bool")
        if self.choices and self.type is bool:
            raise ValueError(f"{what}: a bool option takes no choices")
        for choice in self.choices:
            if type(choice) is not self.type:  # bool is an int: True is no choice of an int option
                raise ValueError(f"{what}: choice {choice!r} is not of its type {self.type.__name__}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"{what}: its choices {list(self.choices)} repeat a value")
        for bound, value in (("minimum", self.minimum), ("maximum", self.maximum)):
            if value is None:
                continue
            if self.type is not int:
                raise ValueError(f"{what}: a {self.kind} option takes no {bound}, only an int option does")
            if type(value) is not int:  # bool is an int: True is no bound
                raise ValueError(f"{what}: {bound} {value!r} is not a whole number")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"{what}: minimum {self.minimum} is more than maximum {self.maximum}")
        for choice in self.choices:
            if not _within(cast(int, choice), self.minimum, self.maximum):
                raise ValueError(f"{what}: choice {choice!r} is not a whole number {self.bounds}")
        if self.default is not None:
            if type(self.default) is not self.type:
                raise ValueError(f"{what}: default {self.default!r} is not of its type {self.kind}")
            if self.required:
                raise ValueError(f"{what} is required and has a default: give one or the other")
            try:
                self.convert(self.default)
            except ValueError as exc:
                raise ValueError(f"{what}: default {self.default!r} is not valid: {exc}") from None

    @property
    def kind(self) -> str:
        """``str``, ``int`` or ``bool``: the type's name, for listings."""
        return self.type.__name__

    def convert(self, value: Any) -> str | int | bool:
        """``value`` (text from the command line, or already typed) as this option's type;
        ValueError says why it is not valid, in words an admin reads after the option's name."""
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            if self.type is bool and text in _TRUE + _FALSE:
                value = text in _TRUE
            elif self.type is int and re.fullmatch(r"[+-]?[0-9]{1,18}", text):
                value = int(text)
        if type(value) is not self.type:
            raise ValueError(f"takes {_OPTION_TYPES[self.type]}"
                             + (" (true/false, yes/no, on/off, 1/0)" if self.type is bool else "")
                             + f", not {value!r}")
        if isinstance(value, str) and (len(value) > MAX_OPTION_TEXT or any(ord(c) < 32 or ord(c) == 127
                                                                            for c in value)):
            raise ValueError(f"takes one line of at most {MAX_OPTION_TEXT} characters")
        if self.choices and value not in self.choices:
            raise ValueError(f"takes one of: {', '.join(map(str, self.choices))}, not {value!r}")
        if self.type is int and not _within(cast(int, value), self.minimum, self.maximum):
            raise ValueError(f"takes a whole number {self.bounds}, not {value}")
        return value

    @property
    def bounds(self) -> str:
        """``from 1 to 500``, ``of at least 0``, ``of at most 9``, or ``""`` without bounds."""
        if self.minimum is not None and self.maximum is not None:
            return f"from {self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"of at least {self.minimum}"
        if self.maximum is not None:
            return f"of at most {self.maximum}"
        return ""

    def describe(self) -> str:
        """``name (int, default 50)``: the option in a list of valid ones."""
        about = [self.kind]
        if self.choices:
            about.append("one of " + "/".join(map(str, self.choices)))
        if self.bounds:
            about.append(self.bounds.removeprefix("of "))
        if self.required:
            about.append("required")
        elif self.default is not None:
            about.append(f"default {json.dumps(self.default)}")  # as the JSON output writes it
        return f"{self.name} ({', '.join(about)})"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "description": self.description, "type": self.kind, "default": self.default,
                "required": self.required, "choices": list(self.choices), "minimum": self.minimum,
                "maximum": self.maximum, "identifies_mailbox": self.identifies_mailbox}


def _within(value: int, minimum: int | None, maximum: int | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


@dataclass(frozen=True)
class ProtocolProvider:
    """A protocol a plugin offers: its description and how to open a session.

    ``attributes`` lists which optional connection attributes apply (see
    :data:`ATTRIBUTES`); the host refuses the others with a clear error, so the core
    need not know that Folder is IMAP-only. ``default_ports`` maps each supported
    encryption to its port; an empty mapping means the protocol is not host-based
    (Microsoft Graph). ``after_download`` lists supported actions, the default first.
    ``required`` lists the attributes a connection must set. ``options`` declares
    settings of the protocol's own (:class:`ProviderOption`), which sessions find typed in
    ``ConnectionSettings.options``. ``test`` runs a step-by-step connection test; when
    absent, the host opens and closes a session.
    """

    name: str
    direction: Direction
    open: Callable[[ConnectionSettings], Session]
    title: str = ""
    connect_modes: frozenset[str] = frozenset({"password"})
    default_ports: Mapping[Encryption, int] = field(default_factory=dict)
    attributes: frozenset[str] = frozenset()
    #: Attributes a connection must set (in password mode; OAuth2 replaces the password).
    required: frozenset[str] = frozenset()
    after_download: tuple[str, ...] = ()
    default_folder: str | None = None
    #: The one spelling of a folder name among those that name the same folder (IMAP:
    #: INBOX in any case), so that cursors and stored keys follow the folder, not the typing.
    canonical_folder: Callable[[str], str] | None = None
    test: Callable[[ConnectionSettings], Iterable[TestStep]] | None = None
    #: Settings of its own, beyond :data:`ATTRIBUTES`, that its connections take.
    options: tuple[ProviderOption, ...] = ()
    #: The plugin that registered it; filled in by the host.
    plugin: str = ""

    def __post_init__(self) -> None:
        # A plugin's mistakes stop at its registration, in a sentence naming the field:
        # later they would fail far from their cause, or take every command down.
        if not isinstance(self.name, str) or not self.name or not self.name.isprintable() or " " in self.name:
            raise ValueError(f"a protocol's name is one word of text (it is --protocol NAME), not {self.name!r}")
        try:
            object.__setattr__(self, "direction", Direction(self.direction))
        except ValueError:
            raise ValueError(f"protocol {self.name!r}: direction {self.direction!r} is not Direction.INCOMING "
                             "or Direction.OUTGOING") from None
        for names in ("connect_modes", "attributes", "required"):
            value = getattr(self, names)
            if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"protocol {self.name!r}: {names} is a set of names, such as "
                                 f"frozenset({{'host', 'username'}}), not {value!r}")
            object.__setattr__(self, names, frozenset(value))
        unknown = (self.attributes | self.required) - ATTRIBUTES
        if unknown:
            raise ValueError(
                f"protocol {self.name!r} declares unknown attributes {sorted(unknown)}; "
                f"choose from {sorted(ATTRIBUTES)}"
            )
        bad_modes = self.connect_modes - {"password", "oauth2"}
        if bad_modes:
            raise ValueError(
                f"protocol {self.name!r} declares unknown connect modes {sorted(bad_modes)}"
            )
        object.__setattr__(self, "options", tuple(self.options))
        seen: set[str] = set()
        for option in self.options:
            if not isinstance(option, ProviderOption):
                raise ValueError(f"protocol {self.name!r} declares option {option!r}, not a ProviderOption")
            if option.name in RESERVED_OPTION_NAMES:
                raise ValueError(f"protocol {self.name!r} declares option {option.name!r}, which is a connection "
                                 "attribute of the host: list it in attributes if it is one of ATTRIBUTES, "
                                 "else choose another name")
            if option.name in seen:
                raise ValueError(f"protocol {self.name!r} declares option {option.name!r} twice")
            seen.add(option.name)
        actions = self.after_download
        if isinstance(actions, str) or not isinstance(actions, Iterable) or not all(isinstance(a, str) for a in actions):
            raise ValueError(f"protocol {self.name!r}: after_download is a tuple of action names, the default first, "
                             f"such as ('mark-seen', 'delete'), not {actions!r} (one name needs a comma: ('keep',))")
        object.__setattr__(self, "after_download", tuple(actions))
        if self.direction is Direction.INCOMING and not self.after_download:
            raise ValueError(f"protocol {self.name!r}: an incoming protocol lists the after-download actions it "
                             "supports in after_download, the default first; ('keep',) if it leaves messages as "
                             "they are")
        for hook in ("open", "test", "canonical_folder"):
            value = getattr(self, hook)
            if not callable(value) and (hook == "open" or value is not None):
                raise ValueError(f"protocol {self.name!r}: {hook} is a callable (give lazy('package.module:name')), "
                                 f"not {value!r}")

    def option(self, name: str) -> ProviderOption | None:
        """The declared option ``name``, if there is one."""
        return next((o for o in self.options if o.name == name), None)


@dataclass(frozen=True)
class AfterDownloadAction:
    """What to do with a message on the server once it is safely stored.

    ``apply(session, refs, argument)`` acknowledges a batch; ``argument`` is the
    connection's action argument (the target folder of ``move``), ``None`` if
    ``takes_argument`` is false. ``protocols`` restricts the action to those protocol
    names; ``None`` means every protocol that lists this action's name in its
    ``ProtocolProvider.after_download``.
    """

    name: str
    apply: Callable[[IncomingSession, Sequence[MessageRef], str | None], None]
    description: str = ""
    takes_argument: bool = False
    protocols: frozenset[str] | None = None
    plugin: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.isprintable() or " " in self.name:
            raise ValueError(f"an after-download action's name is one word of text (it is --after-download NAME), "
                             f"not {self.name!r}")
        if not callable(self.apply):
            raise ValueError(f"after-download action {self.name!r}: apply is a callable (session, refs, argument), "
                             f"not {self.apply!r}")
        if self.protocols is not None:
            if isinstance(self.protocols, str) or not all(isinstance(p, str) for p in self.protocols):
                raise ValueError(f"after-download action {self.name!r}: protocols is a set of protocol names, such "
                                 f"as frozenset({{'maildir'}}), or None for every protocol that lists it; "
                                 f"not {self.protocols!r}")
            object.__setattr__(self, "protocols", frozenset(self.protocols))

    def supports(self, provider: ProtocolProvider) -> bool:
        """Whether this action can run on sessions of ``provider``."""
        if self.protocols is not None:
            return provider.name in self.protocols
        return self.name in provider.after_download


@dataclass(frozen=True)
class HostOverride:
    """A predefined host for a provider and protocol (the seeds' "Override default
    host setting"): for example Microsoft 365 operated by 21Vianet for IMAP."""

    provider: str  # e.g. "microsoft"
    protocol: str  # e.g. "imap", "smtp", "graph"
    name: str  # short, unique per provider and protocol: "global", "gcc-high", ...
    host: str
    title: str = ""
    port: int | None = None
    authority: str | None = None  # the matching sign-in authority, for OAuth2
    scopes: tuple[str, ...] = ()
    plugin: str = ""


_EOL = re.compile(rb"\r\n|\r|\n")


def crlf(raw: bytes) -> bytes:
    """``raw`` with CRLF line ends throughout (a bare CR or LF becomes CRLF), as the wire
    wants them (RFC 5321 2.3.8): a server that ends a line, or SMTP's DATA, on a bare one
    must never see a line the client did not mean."""
    if b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b""):
        return raw
    return _EOL.sub(b"\r\n", raw)


def lazy(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` as a callable that imports its module on the first
    call, for a provider's ``open`` and ``test``: the host imports every plugin package at
    start-up to register its protocols, and a session module (its protocol library, TLS,
    HTTP client) should load only when a connection is opened or tested."""
    import pkgutil

    def call(*args: Any, **kwargs: Any) -> Any:
        return pkgutil.resolve_name(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = target.rpartition(":")[2]
    call.__doc__ = f"Calls {target}, imported on first use."
    call.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test, whatever its name
    return call


#: A download must make a step (one message, or this many bytes of a bigger one)...
STALL_PIECE = 64 * 1024
#: ...within this many times the connection's timeout, else :class:`StallGuard` ends it.
STALL_TIMEOUTS = 4


class StallGuard:
    """Ends a download, or any command's answer, that a server drips: the "low speed"
    abort of curl (``--speed-limit``/``--speed-time``), for sessions that read from a socket.

    The socket timeout bounds one read only: a server that sends a few bytes just before
    each read would time out holds the link, and the host's lease on the mailbox, for
    ever. Inside ``with StallGuard(sock, timeout)``, the reader calls :meth:`step` for
    every message (or :data:`STALL_PIECE` bytes of a bigger one) that came whole; when
    none came for :data:`STALL_TIMEOUTS` times ``timeout`` seconds, a watcher thread
    shuts the socket down, the blocked read returns at once (end of stream), and the
    session raises :meth:`failure` instead of whatever the read raised::

        with StallGuard(sock, settings.timeout) as guard:
            try:
                for message in replies:  # reads; guard.step() after each
                    ...
            except OSError:
                if guard.fired:
                    raise guard.failure(settings.describe(), "message UID 7") from None
                raise

    Every other command (the sign-in, SELECT, STORE, UIDL, QUIT, ...) is read inside a
    guard of its own, stepped only per :data:`STALL_PIECE` bytes: a line is no step, or a
    server answering with an endless slow stream of ``* OK`` lines would hold the link
    as surely; the command ends within the allowance, or shows it is moving. Its failure
    names the command: ``guard.failure(where, "its answer to SELECT", download=False)``.

    The reader's cost is :meth:`step`, one counter per message: no clock, no lock. Time
    the session spends elsewhere (a generator handing out what it read) goes inside
    :meth:`paused`, which no stall counts.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.timeout = timeout
        #: Seconds without a step after which the link is shut down.
        self.allowance = STALL_TIMEOUTS * timeout
        #: Whether the guard shut the link down.
        self.fired = False
        self._sock = sock
        self._steps = 0
        self._paused = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no shutdown once the block is left: the socket may be closed

    def step(self) -> None:
        """A message, or :data:`STALL_PIECE` bytes of one, came whole."""
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not reading from the server inside this block: no stall is counted."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self._steps += 1

    def failure(self, where: str, reading: str, *, download: bool = True) -> TemporaryFailure:
        """The error for a link this guard ended, naming the server (``where``) and what it
        was sending (``reading``): a message of a download, or, with ``download`` false,
        the answer to a command (``"its answer to SELECT"``, ``"its greeting"``)."""
        if download:
            what, then = "neither a message nor", "the messages that came whole are stored, and the next pass goes on from there"
        else:
            what, then = "neither all of it nor", "the next pass tries again"
        return TemporaryFailure(
            f"{where} sent {reading} so slowly that {what} {STALL_PIECE // 1024} KiB of "
            f"{'one' if download else 'it'} came in {self.allowance:g} s ({STALL_TIMEOUTS} times the connection's "
            f"timeout of {self.timeout:g} s), so mailhost closed the link: {then}; if this repeats, check the "
            "server's load and the network to it, or raise the timeout"
        )

    def __enter__(self) -> Self:
        threading.Thread(target=self._watch, name="mailhost-stall-guard", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._stop.set()

    def _watch(self) -> None:
        seen, since = -1, time.monotonic()
        while not self._stop.wait(self.allowance / 8):
            now = time.monotonic()
            if self._paused or self._steps != seen:
                seen, since = self._steps, now
            elif now - since >= self.allowance:
                with self._lock:
                    if not self._stop.is_set():
                        self.fired = True
                        # socket.socket's own: an SSLSocket's would drop its TLS state under the reader
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                return
