"""Incoming and outgoing connections: validated from what each protocol declares.

The core hard-codes no protocol: which attributes apply, which are required, the
default ports and the after-download actions all come from the protocol's
:class:`~mailhost.protocols.ProtocolProvider`. Every rule raises a
:class:`~mailhost.errors.ValidationError` naming the attribute and the fix, before
anything is written.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, selectinload

from .errors import MailError, MailhostError, NotFound, ValidationError
from .plugins import broke_contract
from .protocols import (
    ATTRIBUTES,
    ConnectionSettings,
    Direction,
    Encryption,
    ProtocolProvider,
    TestStep,
)
from .secrets import redact
from .store import (
    MAX_INT,
    Certificate,
    IncomingConnection,
    IncomingItem,
    IncomingLog,
    OAuthCredential,
    OutgoingAttempt,
    OutgoingConnection,
    OutgoingItem,
)

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["ConnectionSpec", "Connections", "check_address", "connection_dict"]

log = logging.getLogger(__name__)

INCOMING_TIMEOUT_MAX_MS = 30000  # the seeds: 1-30000 ms, 0 or blank for 30000
OUTGOING_TIMEOUT_MAX_MS = 600000
DEFAULT_TIMEOUT_MS = 30000
DEFAULT_INTERVAL_MIN = 1
MAX_SIZE_LIMIT = MAX_INT  # bytes: the column is an INTEGER
MAX_INTERVAL_MIN = 7 * 24 * 60

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}[A-Za-z0-9_])?)*\.?$")
# Changing one of these points the connection at another mailbox: its cursors go.
#: The columns that name a connection: its queue, log and attempts, renamed with it.
_NAMED_AFTER = {
    Direction.INCOMING: (IncomingItem.connection_name, IncomingLog.connection_name),
    Direction.OUTGOING: (OutgoingItem.connection_name, OutgoingAttempt.connection_name),
}
_MAILBOX_IDENTITY = ("protocol", "host", "port", "username", "shared_mailbox", "host_override")


@dataclass
class ConnectionSpec:
    """Attributes of a connection as an admin gives them.

    ``None`` means "not given": the default on add, unchanged on edit. An empty string
    clears an optional text attribute on edit.
    """

    name: str | None = None
    protocol: str | None = None
    description: str | None = None
    host: str | None = None
    port: int | None = None
    encryption: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: int | None = None
    oauth_credential: str | None = None
    host_override: str | None = None
    ca_file: str | None = None
    # incoming
    folder: str | None = None
    interval: int | None = None
    after_download: str | None = None
    after_download_argument: str | None = None
    shared_mailbox: str | None = None
    certificates: list[str] | None = None
    # outgoing
    from_address: str | None = None
    prefix: str | None = None
    size_limit: int | None = None
    debug: bool | None = None
    fallback_to_default: bool | None = None
    default: bool | None = None
    #: Values of options the protocol declares (``ProtocolProvider.options``), by name:
    #: typed, or text to convert (from ``--option NAME=VALUE``). ``None`` or ``""``
    #: resets one to its default on edit.
    options: dict[str, Any] = field(default_factory=dict)

    def given(self) -> dict[str, Any]:
        """The attributes that were given."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if v is not None and not (k == "options" and not v)
        }


_INCOMING_ONLY = ("folder", "interval", "after_download", "after_download_argument", "shared_mailbox", "certificates")
_OUTGOING_ONLY = ("from_address", "prefix", "size_limit", "debug", "fallback_to_default", "default")


class Connections:
    """Create, change, list and remove connections; build session settings."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host

    # -- queries ----------------------------------------------------------------------

    def list(self, direction: Direction, search: str | None = None) -> list[Any]:
        """Connections by name; ``search`` matches name, description, host and username."""
        model = _model(direction)
        with self.host.session() as s:
            query = select(model).options(*_eager(model)).order_by(model.name)
            if search:
                from sqlalchemy import func

                # autoescape: a % or _ in the search is that character, not a wildcard
                query = query.where(
                    or_(*(func.lower(func.coalesce(col, "")).contains(search.lower(), autoescape=True)
                          for col in (model.name, model.description, model.host, model.username)))
                )
            return list(s.scalars(query))

    def get(self, direction: Direction, name: str, s: Session | None = None) -> Any:
        """The connection ``name``, or NotFound naming it."""
        if s is None:
            with self.host.session() as s2:
                return self.get(direction, name, s2)
        model = _model(direction)
        conn = s.scalar(select(model).options(*_eager(model)).where(model.name == name))
        if conn is None:
            raise NotFound(
                f"no {direction.value} connection named {name!r}: see `mailhost {direction.value} list`"
            )
        return conn

    def check_filter(self, direction: Direction, name: str, column: Any, s: Session) -> None:
        """NotFound for a ``--connection`` filter that names no connection and no row of
        ``column`` (queues and logs keep a removed connection's name): a typo must not
        read as an empty queue."""
        if s.scalar(select(column).where(column == name).limit(1)) is None:
            self.get(direction, name, s)

    def as_dict(self, direction: Direction, conn: Any) -> dict[str, Any]:
        """The JSON form of a connection (no secrets), as the CLI and the REST API show it."""
        out = connection_dict(direction, conn, self.host.plugins.protocols.get((direction, conn.protocol)))
        if conn.oauth_credential_id is not None:  # (not loading the OAuth2 code for the others)
            out.update(self.host.oauth.connection_status(conn))  # token expiry and last renewal error
        return out

    # -- changes ----------------------------------------------------------------------

    def add(self, direction: Direction, spec: ConnectionSpec) -> Any:
        """Validate and store a new connection; incoming ones start disabled."""
        if not spec.name:
            raise ValidationError("a connection needs a name: give NAME", field="name")
        if not spec.protocol:
            raise ValidationError(
                f"connection {spec.name!r} needs a protocol: give --protocol, one of "
                f"{', '.join(self.host.plugins.protocol_names(direction)) or 'none installed'}",
                field="protocol",
            )
        with self.host.session() as s:
            model = _model(direction)
            if s.scalar(select(model.id).where(model.name == spec.name.strip())) is not None:
                raise ValidationError(
                    f"an {direction.value} connection named {spec.name!r} already exists: "
                    f"choose another name or use `mailhost {direction.value} edit`",
                    field="name",
                )
            values, extra = self._validate(direction, s, spec.given(), None)
            conn = model(**values)
            if direction is Direction.INCOMING:
                conn.enabled = False
                conn.certificates = extra["certificates"]
            if values.get("is_default"):
                s.execute(update(OutgoingConnection).values(is_default=False))
            s.add(conn)
            s.flush()
            return self.get(direction, conn.name, s)

    def edit(self, direction: Direction, name: str, spec: ConnectionSpec) -> tuple[Any, bool]:
        """Change a connection; returns it and whether editing disabled it (an enabled
        incoming connection is disabled by any edit, as in the seeds)."""
        with self.host.session() as s:
            conn = self.get(direction, name, s)  # a typo in the name is said as such first
            if not spec.given():  # an edit disables an enabled incoming connection: a no-op must not
                raise ValidationError(f"nothing to change in {direction.value} connection {name}: give the options "
                                      f"to change (`mailhost {direction.value} edit --help` lists them)")
            # Its row first, before the rows named after it: a pass's batch locks them in
            # this order too (Incoming._hold), and PostgreSQL aborts one of two
            # transactions that lock in opposite orders (a deadlock).
            model = _model(direction)
            s.execute(select(model.id).where(model.id == conn.id).with_for_update())
            current = connection_values(direction, conn)
            given = spec.given()
            if "name" in given and given["name"] != conn.name:
                if s.scalar(select(model.id).where(model.name == given["name"])) is not None:
                    raise ValidationError(
                        f"an {direction.value} connection named {given['name']!r} already exists: choose another name",
                        field="name",
                    )
            if given.get("protocol"):  # as its plugin spells it: `--protocol IMAP` names the same protocol
                given["protocol"] = self.host.plugins.protocol(direction, given["protocol"]).name
            if "protocol" in given and given["protocol"] != conn.protocol:
                # Another protocol: attributes of the old one must not leak into it.
                current = {k: v for k, v in current.items() if k in ("name", "description", "interval", "timeout")}
            merged = {**current, **given}
            try:
                values, extra = self._validate(direction, s, merged, conn, explicit=set(given))
            except ValidationError as exc:
                if merged["protocol"] == conn.protocol:
                    raise
                raise ValidationError(f"{exc} (another protocol keeps none of the old one's server settings)",
                                      field=exc.field) from None
            was_enabled = bool(getattr(conn, "enabled", False))
            moved = any(values.get(k) != getattr(conn, k, None) for k in _MAILBOX_IDENTITY) or any(
                values["options"].get(o.name, o.default) != (conn.options or {}).get(o.name, o.default)
                for o in self.host.plugins.protocol(direction, values["protocol"]).options if o.identifies_mailbox)
            old_folder = getattr(conn, "folder", None)
            if values["name"] != conn.name:  # its mail and history follow it (queued mail is routed by name)
                for column in _NAMED_AFTER[direction]:
                    s.execute(update(column.class_).where(column == conn.name).values({column.key: values["name"]})
                              .execution_options(synchronize_session=False))
            for key, value in values.items():
                setattr(conn, key, value)
            disabled = False
            if direction is Direction.INCOMING:
                conn.certificates = extra["certificates"]
                if was_enabled:
                    conn.enabled, disabled = False, True
                if moved:
                    self.host.incoming.forget_mailbox(s, conn.id)
                elif old_folder and values["folder"] != old_folder:
                    canonical = self.provider(direction, conn).canonical_folder
                    if canonical is not None and canonical(old_folder) == values["folder"]:
                        # the same folder in the protocol's one spelling: its keys and cursor follow
                        self.host.incoming.respell_folder(s, conn.id, old_folder, values["folder"])
            else:
                if moved or values.get("encryption") != current.get("encryption"):
                    conn.server_size_limit = None  # another server: its SIZE is learned anew
                if values.get("is_default"):
                    s.execute(
                        update(OutgoingConnection).where(OutgoingConnection.id != conn.id).values(is_default=False)
                    )
            s.flush()
            return self.get(direction, conn.name, s), disabled

    def remove(self, direction: Direction, name: str) -> None:
        """Delete a connection; its downloaded messages stay in the queue."""
        with self.host.session() as s:
            s.delete(self.get(direction, name, s))

    def set_enabled(self, name: str, enabled: bool) -> Any:
        """Enable or disable an incoming connection (enable polls it at once)."""
        with self.host.session() as s:
            conn = self.get(Direction.INCOMING, name, s)
            conn.enabled = enabled
            conn.next_poll_at = None
            return conn

    def set_default(self, name: str) -> Any:
        """Make ``name`` the default outgoing connection (and no other)."""
        with self.host.session() as s:
            conn = self.get(Direction.OUTGOING, name, s)
            s.execute(update(OutgoingConnection).where(OutgoingConnection.id != conn.id).values(is_default=False))
            s.flush()
            conn.is_default = True
            return conn

    def default_outgoing(self, s: Session) -> OutgoingConnection | None:
        """The default outgoing connection, if one is set."""
        return s.scalar(select(OutgoingConnection).where(OutgoingConnection.is_default.is_(True)))

    def test(self, direction: Direction, name: str | None, spec: ConnectionSpec) -> Iterator[TestStep]:
        """Test a stored connection (``name``), optionally with some attributes
        changed by ``spec``, or a new one given whole by ``spec``; nothing is saved."""
        with self.host.session() as s:
            existing = None
            given = spec.given()
            explicit = set(given)  # the attributes the admin gave; stored ones may not apply
            if name is not None:
                existing = s.scalar(select(_model(direction)).where(_model(direction).name == name))
            if existing is not None:
                given = {**connection_values(direction, existing), **given}
            elif not given.get("protocol"):
                raise ValidationError(
                    f"no {direction.value} connection named {name!r}; to test one before saving, give its "
                    "options (at least --protocol)" if name else "give NAME or the options of add (at least --protocol)",
                    field="protocol",
                )
            given.setdefault("name", name or "unsaved")  # to validate; then none (ConnectionSettings.label)
            values, _ = self._validate(direction, s, given, existing,
                                       explicit=explicit if existing is not None else None, named=bool(name))
            if not name:
                values["name"] = ""
            conn = _model(direction)(**values)  # transient: never added, never saved
        provider = self.provider(direction, conn)
        settings = self.settings(direction, conn)  # remembers the secret, for redact()
        for step in self._steps(provider, settings):
            # A server may quote what it was sent ("wrong password ... for user").
            yield dataclasses.replace(step, detail=redact(step.detail))

    def _steps(self, provider: ProtocolProvider, settings: ConnectionSettings) -> Iterator[TestStep]:
        try:
            if provider.test is not None:
                for step in provider.test(settings):
                    if not isinstance(step, TestStep):
                        raise broke_contract(self.host.plugins.named(provider.plugin), "test",
                                             f"its {provider.name} test yielded {step!r:.80}, not a mailhost.TestStep")
                    yield step
                return
            try:
                provider.open(settings).close()
            except MailError as exc:
                yield TestStep("connect", False, str(exc))
            else:
                yield TestStep("connect", True, f"signed in to {settings.describe()}")
        except MailhostError:
            raise
        except Exception as exc:  # a plugin's bug is the test's finding, not a crash of the command
            log.warning("testing %s failed", settings.describe(), exc_info=True)
            yield TestStep("plugin", False, self.host.plugins.unexpected(exc))

    # -- sessions ---------------------------------------------------------------------

    def provider(self, direction: Direction, conn: Any) -> ProtocolProvider:
        """The protocol provider of a stored connection."""
        return self.host.plugins.protocol(direction, conn.protocol)

    def settings(self, direction: Direction, conn: Any) -> ConnectionSettings:
        """What a session needs for ``conn``: defaults resolved, the secret decrypted."""
        provider = self.provider(direction, conn)
        encryption = Encryption(conn.encryption)
        port = conn.port or provider.default_ports.get(encryption)
        access_token = None
        if conn.oauth_credential_id is not None:
            # A token source, asked at sign-in: the stored token, renewed when due.
            access_token = self.host.oauth.access_token_for(conn.oauth_credential_id, conn.username)
        debug = bool(getattr(conn, "debug", False))
        return ConnectionSettings(
            name=conn.name,
            protocol=conn.protocol,
            host=conn.host,
            port=port,
            encryption=encryption,
            username=conn.username,
            password=self.host.vault.decrypt(conn.password_enc),
            folder=getattr(conn, "folder", None),
            shared_mailbox=getattr(conn, "shared_mailbox", None),
            timeout=(conn.timeout or DEFAULT_TIMEOUT_MS) / 1000.0,
            ca_file=conn.ca_file,
            from_address=getattr(conn, "from_address", None),
            size_limit=getattr(conn, "size_limit", 0) or 0,
            access_token=access_token,
            transcript=_transcript(conn.name) if debug else None,
            options=_effective_options(provider, f"connection {conn.name!r} ({provider.name})", conn.options or {}),
        )

    # -- validation -------------------------------------------------------------------

    def _validate(
        self, direction: Direction, s: Session, given: Mapping[str, Any], existing: Any,
        explicit: set[str] | None = None, named: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check every attribute; return column values and related objects.

        ``explicit`` names the attributes the admin gave (all of ``given`` when None);
        stored attributes that do not apply to the protocol are dropped, given ones
        are refused. Not ``named``: a connection tested before it is saved, whose name
        is no name of the admin's, so errors do not quote it.
        """
        plugins = self.host.plugins
        provider = plugins.protocol(direction, str(given.get("protocol")))
        explicit = set(given) if explicit is None else explicit
        name = _text(given.get("name"), "name")
        if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
            raise ValidationError(
                f"the connection name {given.get('name')!r} is not valid: use 1-200 printable characters",
                field="name",
            )
        label = f"connection {name!r} ({provider.name})" if named else f"this {provider.name} connection"
        wrong_side = _OUTGOING_ONLY if direction is Direction.INCOMING else _INCOMING_ONLY
        for key in wrong_side:
            if given.get(key) not in (None, False, [], ""):
                raise ValidationError(
                    f"{key.replace('_', ' ')} does not apply to {direction.value} connections: leave it out",
                    field=key,
                )
        oauth_name = _text(given.get("oauth_credential"), "oauth_credential")
        mode = "oauth2" if oauth_name else "password"
        if mode not in provider.connect_modes:
            raise ValidationError(
                f"{label}: {provider.name} does not support {mode} sign-in; "
                + ("give --oauth-credential NAME (see `mailhost oauth add`)" if mode == "password"
                   else "leave out --oauth-credential and give a password"),
                field="oauth_credential" if mode == "oauth2" else "password",
            )
        applies = set(provider.attributes)
        for key in ("host", "port", "encryption", "username", "password", "folder", "shared_mailbox",
                    "host_override", "ca_file", "certificates", "from_address", "prefix", "size_limit", "debug"):
            value = given.get(key)
            if value in (None, "", [], 0, False):
                continue
            if key not in applies:
                if key not in explicit:
                    given = {**given, key: None}
                    continue
                raise ValidationError(
                    f"{key.replace('_', ' ')} does not apply to {provider.name} connections"
                    f"{' (it has no folders)' if key == 'folder' else ''}: leave it out",
                    field=key,
                )
        if mode == "oauth2" and given.get("password"):
            raise ValidationError(
                f"{label} signs in with OAuth2 credential {oauth_name!r}, so it takes no password: leave it out",
                field="password",
            )

        values: dict[str, Any] = {"name": name, "protocol": provider.name}
        values["description"] = _text(given.get("description"), "description") or ""

        # Host, or a predefined host override.
        override_name = _text(given.get("host_override"), "host_override")
        host = _text(given.get("host"), "host")
        credential = None
        if oauth_name:
            credential = s.scalar(select(OAuthCredential).where(OAuthCredential.name == oauth_name))
            if credential is None:
                raise ValidationError(
                    f"{label}: no OAuth2 credential named {oauth_name!r}: add it with `mailhost oauth add`",
                    field="oauth_credential",
                )
        values["oauth_credential_id"] = credential.id if credential else None
        values["host_override"] = None
        if override_name and host and "host" not in explicit:
            host = ""  # a stored host yields to a predefined host chosen now
        if override_name and host:  # the override would win at the next edit: say it now
            raise ValidationError(
                f"{label}: give either --host or --host-override {override_name}, not both "
                "(--host-override '' drops the override)", field="host")
        if override_name:
            matches = [o for o in plugins.host_overrides
                       if o.protocol == provider.name and o.name == override_name
                       and (credential is None or o.provider == credential.provider)]
            if not matches:
                choices = sorted({o.name for o in plugins.host_overrides if o.protocol == provider.name})
                raise ValidationError(
                    f"{label}: no host override named {override_name!r} for {provider.name}; "
                    f"choose one of: {', '.join(choices) or 'none installed'} (see `mailhost host-overrides`)",
                    field="host_override",
                )
            values["host_override"] = override_name
            host = matches[0].host
        if host:
            values["host"] = _check_host(host, label)
        else:
            values["host"] = None
        if "host" in provider.required and not values["host"]:
            raise ValidationError(f"{label} needs a host: give --host (the mail server's name)", field="host")

        # Encryption and port.
        if provider.default_ports:
            enc_text = (given.get("encryption") or _default_encryption(provider)).lower()
            try:
                encryption = Encryption(enc_text)
            except ValueError:
                encryption = None
            if encryption is None or encryption not in provider.default_ports:
                raise ValidationError(
                    f"{label}: encryption {enc_text!r} is not valid; choose one of: "
                    f"{', '.join(e.value for e in provider.default_ports)}",
                    field="encryption",
                )
            values["encryption"] = encryption.value
        else:
            values["encryption"] = Encryption.SSL.value  # HTTPS-only protocols
        port = given.get("port")
        if port in (None, 0):
            values["port"] = None  # the protocol's default for the encryption
        else:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValidationError(f"{label}: port {port!r} is not valid: use 1-65535, or 0 for the default", field="port")
            values["port"] = port

        # Credentials.
        username = _on_the_wire(_text(given.get("username"), "username"), "username", label)
        values["username"] = username or None
        password = given.get("password")
        if password is not None and not isinstance(password, str):
            raise ValidationError(f"{label}: the password must be text", field="password")
        if password and direction is Direction.INCOMING and not password.isascii():
            raise ValidationError(
                f"{label}: the password contains non-ASCII characters, which IMAP and POP3 servers "
                "do not accept reliably: use an ASCII-only password",
                field="password",
            )
        if password is not None and password != "" and any(c in password for c in "\r\n\0"):
            raise ValidationError(f"{label}: the password contains a line break or NUL: remove it", field="password")
        if password:
            values["password_enc"] = self.host.vault.encrypt(password)
        elif password == "" or mode == "oauth2":
            values["password_enc"] = None
        elif existing is not None and values["username"]:
            # Kept; clearing the username (--username '') clears its password with it.
            values["password_enc"] = existing.password_enc
        else:
            values["password_enc"] = None
        if mode == "password":
            for key in ("username", "password"):
                have = values["username"] if key == "username" else values.get("password_enc")
                if key in provider.required and not have:
                    how = "--username USER" if key == "username" else "--password-env VAR, --password-file F or --password-stdin"
                    raise ValidationError(f"{label} needs a {key}: give {how}", field=key)
            if values.get("password_enc") and not values["username"]:
                raise ValidationError(f"{label} has a password but no username: give --username", field="username")
        elif not values["username"]:
            raise ValidationError(
                f"{label} signs in with OAuth2 and needs the mailbox's username: give --username", field="username"
            )

        # Timeout.
        timeout = given.get("timeout")
        limit = INCOMING_TIMEOUT_MAX_MS if direction is Direction.INCOMING else OUTGOING_TIMEOUT_MAX_MS
        if timeout in (None, 0):
            values["timeout"] = DEFAULT_TIMEOUT_MS
        elif not isinstance(timeout, int) or not 1 <= timeout <= limit:
            raise ValidationError(
                f"{label}: timeout {timeout!r} ms is not valid: use 1-{limit} ms, or 0 for {DEFAULT_TIMEOUT_MS}",
                field="timeout",
            )
        else:
            values["timeout"] = timeout

        # CA file.
        ca_file = _text(given.get("ca_file"), "ca_file")
        values["ca_file"] = _check_ca_file(ca_file, label) if ca_file else None

        # Options: the stored ones stay (unless the protocol changed), the given ones are merged in.
        stored = dict(existing.options or {}) if existing is not None and existing.protocol == provider.name else {}
        values["options"] = _options(provider, label, stored, given.get("options") or {})
        extra: dict[str, Any] = {}
        if direction is Direction.INCOMING:
            self._validate_incoming(s, provider, label, given, values, extra, explicit)
        else:
            self._validate_outgoing(provider, label, given, values)
        check_lengths(_model(direction), values, label)
        return values, extra

    def _validate_incoming(
        self, s: Session, provider: ProtocolProvider, label: str, given: Mapping[str, Any],
        values: dict[str, Any], extra: dict[str, Any], explicit: set[str],
    ) -> None:
        folder = _text(given.get("folder"), "folder")
        if "folder" in provider.required and not folder:
            raise ValidationError(f"{label} needs a folder: give --folder FOLDER", field="folder")
        canonical = provider.canonical_folder or (lambda name: name)
        if "folder" in provider.attributes:
            folder = folder or provider.default_folder or "INBOX"
            if any(ord(c) < 32 for c in folder) or len(folder) > 1000:
                raise ValidationError(f"{label}: folder {folder!r} is not a valid folder name", field="folder")
            values["folder"] = folder = canonical(folder)
        else:
            values["folder"] = None
        interval = given.get("interval")
        if interval in (None, 0):
            values["interval"] = DEFAULT_INTERVAL_MIN
        elif not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL_MIN:
            raise ValidationError(
                f"{label}: interval {interval!r} is not valid: use 1-{MAX_INTERVAL_MIN} minutes", field="interval"
            )
        else:
            values["interval"] = interval
        action_name = given.get("after_download") or (provider.after_download[0] if provider.after_download else "keep")
        action = self.host.plugins.action(action_name)
        if not action.supports(provider):
            supported = sorted(a.name for a in self.host.plugins.actions.values() if a.supports(provider))
            raise ValidationError(
                f"{label}: after-download action {action_name!r} does not work with {provider.name}; "
                f"choose one of: {', '.join(supported)}",
                field="after_download",
            )
        values["after_download"] = action.name
        argument = _text(given.get("after_download_argument"), "after_download_argument")
        if action.takes_argument and not argument:
            need = ("a folder: give --move-to FOLDER" if action.name == "move" else
                    f"an argument ({action.description or 'see its plugin'}): give --action-argument VALUE")
            raise ValidationError(f"{label}: after-download action {action.name!r} needs {need}",
                                  field="after_download_argument")
        if action.name == "move" and argument and values["folder"] and canonical(argument) == values["folder"]:
            raise ValidationError(  # each pass would list the moved messages again, and move them again
                f"{label}: --move-to {argument} is the folder it downloads from: choose another folder",
                field="after_download_argument",
            )
        if argument and not action.takes_argument and "after_download_argument" in explicit:
            takers = sorted(a.name for a in self.host.plugins.actions.values() if a.takes_argument and a.supports(provider))
            raise ValidationError(f"{label}: --move-to (or --action-argument) applies to an action that takes an "
                                  f"argument ({', '.join(takers) or 'none for ' + provider.name}): choose one with "
                                  "--after-download, or leave it out", field="after_download_argument")
        values["after_download_argument"] = argument if action.takes_argument else None
        shared = _on_the_wire(_text(given.get("shared_mailbox"), "shared_mailbox"), "shared mailbox", label)
        values["shared_mailbox"] = shared or None
        names = list(dict.fromkeys(given.get("certificates") or []))
        certs = list(s.scalars(select(Certificate).where(Certificate.name.in_(names)))) if names else []
        missing = sorted(set(names) - {c.name for c in certs})
        if missing:
            raise ValidationError(
                f"{label}: no certificate named {', '.join(map(repr, missing))}: add it with `mailhost certs add`",
                field="certificates",
            )
        extra["certificates"] = certs

    def _validate_outgoing(
        self, provider: ProtocolProvider, label: str, given: Mapping[str, Any], values: dict[str, Any]
    ) -> None:
        address = _on_the_wire(_text(given.get("from_address"), "from_address"), "from address", label)
        if address:
            address = check_address(address, "--from", label, field="from_address")
        elif "from_address" in provider.required:
            raise ValidationError(f"{label} needs a from address: give --from ADDRESS", field="from_address")
        values["from_address"] = address or None
        values["prefix"] = _on_the_wire(_text(given.get("prefix"), "prefix"), "prefix", label) or None
        size = given.get("size_limit")
        if size is not None and (not isinstance(size, int) or not 0 <= size <= MAX_SIZE_LIMIT):
            raise ValidationError(f"{label}: size limit {size!r} is not valid: use 0-{MAX_SIZE_LIMIT} bytes "
                                  "(0 = unlimited)", field="size_limit")
        values["size_limit"] = size or 0
        values["debug"] = bool(given.get("debug"))
        values["fallback_to_default"] = bool(given.get("fallback_to_default"))
        values["is_default"] = bool(given.get("default"))


def connection_values(direction: Direction, conn: Any) -> dict[str, Any]:
    """A stored connection as spec values (for merging an edit)."""
    values = {
        "name": conn.name,
        "protocol": conn.protocol,
        "description": conn.description,
        "host": conn.host if not conn.host_override else None,
        "port": conn.port,
        "encryption": conn.encryption,
        "username": conn.username,
        "timeout": conn.timeout,
        "oauth_credential": conn.oauth_credential.name if conn.oauth_credential else None,
        "host_override": conn.host_override,
        "ca_file": conn.ca_file,
    }
    if direction is Direction.INCOMING:
        values.update(
            folder=conn.folder,
            interval=conn.interval,
            after_download=conn.after_download,
            after_download_argument=conn.after_download_argument,
            shared_mailbox=conn.shared_mailbox,
            certificates=[c.name for c in conn.certificates],
        )
    else:
        values.update(
            from_address=conn.from_address,
            prefix=conn.prefix,
            size_limit=conn.size_limit,
            debug=conn.debug,
            fallback_to_default=conn.fallback_to_default,
            default=conn.is_default,
        )
    return values


def cleartext_warning(direction: Direction, record: Mapping[str, Any]) -> str | None:
    """A sentence when connection ``record`` (its JSON form) sends its password or
    OAuth2 token unencrypted over the network: encryption none to a host that is not
    this machine. The admin may mean it (a relay on a trusted segment), so it is said,
    not refused, as mail clients warn at set-up."""
    host = (record.get("host") or "").strip().lower()
    secret = ("OAuth2 token" if record.get("connect_mode") == "oauth2"
              else "password" if record.get("password_set") else None)
    if record.get("encryption") != Encryption.NONE.value or not host or secret is None or _loopback(host):
        return None
    name, word = record["name"], direction.value
    return (f"{word} connection {name} sends its {secret} unencrypted to {host} (encryption none), where anyone "
            f"on the way can read it: `mailhost {word} edit {name} --encryption starttls` (or ssl) protects it")


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def connection_dict(direction: Direction, conn: Any, provider: ProtocolProvider | None = None) -> dict[str, Any]:
    """The JSON form of a connection, with the seeds' attribute names; no secrets. Times
    are datetimes, as in a queue item's: the CLI prints them in its one way, and its
    ``--json`` and the REST API as ISO 8601 (:func:`mailhost.store.json_value`)."""
    port = conn.port
    if not port and provider is not None:
        port = provider.default_ports.get(Encryption(conn.encryption))
    out: dict[str, Any] = {
        "name": conn.name,
        "description": conn.description,
        "protocol": conn.protocol,
        "connect_mode": "oauth2" if conn.oauth_credential_id else "password",
        "host": conn.host,
        "port": port,
        "encryption": conn.encryption,
        "username": conn.username,
        "password_set": conn.password_enc is not None,
        "timeout": conn.timeout,
        "oauth_credential": conn.oauth_credential.name if conn.oauth_credential else None,
        "host_override": conn.host_override,
        "ca_file": conn.ca_file,
    }
    if direction is Direction.INCOMING:
        out.update(
            folder=conn.folder,
            interval=conn.interval,
            after_download=conn.after_download,
            after_download_argument=conn.after_download_argument,
            shared_mailbox=conn.shared_mailbox,
            certificates=[c.name for c in conn.certificates],
            enabled=conn.enabled,
            last_poll_at=conn.last_poll_at,
            last_error=conn.last_error,
        )
    else:
        out.update(
            from_address=conn.from_address,
            prefix=conn.prefix,
            size_limit=conn.size_limit,
            debug=conn.debug,
            fallback_to_default=conn.fallback_to_default,
            default=conn.is_default,
        )
    stored = dict(conn.options or {})
    if provider is None:  # its plugin is not loaded: what is stored
        out.update(options=stored, undeclared_options={})
        return out
    out.update(options={o.name: stored.get(o.name, o.default) for o in provider.options},
               undeclared_options={k: v for k, v in stored.items() if provider.option(k) is None})
    # Only what the protocol has: a column of another protocol's holds a default it never
    # uses (a Graph connection's encryption "ssl").
    return {k: v for k, v in out.items() if k not in _SHOWN_IF or _SHOWN_IF[k] in provider.attributes}


#: The keys of :func:`connection_dict` shown only for a protocol that declares the attribute.
_SHOWN_IF: dict[str, str] = {
    **{a: a for a in ATTRIBUTES if a != "password"}, "password_set": "password",
}


def _options(provider: ProtocolProvider, label: str, stored: Mapping[str, Any],
             given: Mapping[str, Any]) -> dict[str, Any]:
    """The options to store: ``stored`` with ``given`` merged in (``None`` or ``""``
    resets one), each given one declared by the protocol and converted to its type."""
    result = dict(stored)
    for name, value in given.items():
        option = provider.option(name)
        reset = value is None or value == ""
        if option is None and not (reset and name in stored):  # resetting a stale one removes it
            valid = "; ".join(o.describe() for o in provider.options)
            raise ValidationError(
                f"{label}: {provider.name} has no option {name!r}; "
                + (f"its options are: {valid}" if valid else f"{provider.name} takes no options")
                + " (see `mailhost plugins options`)", field="options")
        if reset:
            result.pop(name, None)
            continue
        assert option is not None
        try:
            result[name] = option.convert(value)
        except ValueError as exc:
            raise ValidationError(f"{label}: option {name} {exc}: give --option {name}=VALUE",
                                  field="options") from None
    _effective_options(provider, label, result)
    return result


def _effective_options(provider: ProtocolProvider, label: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """What a session gets: every declared option, its stored value or its default.
    A stored value the declaration no longer takes (the plugin changed it), or a
    required option not set, is a ValidationError naming the option."""
    out: dict[str, Any] = {}
    for option in provider.options:
        if option.name not in stored:
            if option.required:
                raise ValidationError(f"{label} needs option {option.name} ({option.description}): "
                                      f"give --option {option.name}=VALUE", field="options")
            out[option.name] = option.default
            continue
        try:
            out[option.name] = option.convert(stored[option.name])
        except ValueError as exc:
            raise ValidationError(f"{label}: its stored option {option.name} no longer fits {provider.name}, which "
                                  f"now {exc}: give --option {option.name}=VALUE, or --option {option.name}= for "
                                  "the default", field="options") from None
    return out


def _model(direction: Direction) -> type[Any]:
    return IncomingConnection if direction is Direction.INCOMING else OutgoingConnection


def _eager(model: type[Any]) -> list[Any]:
    """Load the relationships a listing shows, so objects work after the session."""
    opts = [selectinload(model.oauth_credential)]
    if model is IncomingConnection:
        opts.append(selectinload(IncomingConnection.certificates))
    return opts


def _default_encryption(provider: ProtocolProvider) -> str:
    for enc in (Encryption.SSL, Encryption.STARTTLS, Encryption.NONE):
        if enc in provider.default_ports:
            return enc.value
    return Encryption.SSL.value


def _text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(f"{key.replace('_', ' ')} must be text, not {value!r}", field=key)
    return value.strip()


def check_lengths(model: type[Any], values: Mapping[str, Any], label: str) -> None:
    """Refuse a text longer than its column holds (PostgreSQL would fail the write,
    SQLite would keep it whole): one sentence naming the attribute and the limit."""
    for key, value in values.items():
        column = model.__table__.c.get(key)
        limit = getattr(column.type, "length", None) if column is not None else None
        if isinstance(value, str) and limit and len(value) > limit:
            raise ValidationError(f"{label}: the {key.replace('_', ' ')} is {len(value)} characters long: "
                                  f"use at most {limit}", field=key)


def check_address(value: str, what: str, label: str | None = None, field: str | None = None) -> str:
    """The one address ``value`` holds, written ``Name <addr>`` from what was parsed, so
    that a header says what the envelope does. One sentence naming ``what`` (the option)
    when it holds none, or several (``a, b``, ``a <b>``, ``a; b``, a group)."""
    where = f"{label}: " if label else ""
    field = field or what.lstrip("-").lower()
    text = value.strip()
    found = [(name, addr) for name, addr in getaddresses([text]) if addr]
    if len(found) > 1:
        raise ValidationError(f"{where}{what} {value!r} holds {len(found)} addresses: give one address per {what}",
                              field=field)
    name, addr = found[0] if found else ("", "")
    local, _, domain = addr.rpartition("@")
    written = str(Address(display_name=name, username=local, domain=domain)) if local and domain else ""
    # Written back and read again, it must be the address the envelope gets.
    if (not written or addr != parseaddr(text)[1] or parseaddr(written) != (name, addr) or " " in addr
            or any(ord(c) < 32 or ord(c) == 127 for c in text)):
        raise ValidationError(f"{where}{what} {value!r} is not an email address: use name@example.org",
                              field=field)
    return written


def _on_the_wire(value: str, what: str, label: str | None = None) -> str:
    """``value``, refused if it holds a control character (C0, DEL, C1) or a Unicode line
    or paragraph separator: it goes into a protocol command line or a header, where a
    line break would end it and start another (Python's email package splits on them all)."""
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in value):
        where = f"{label}: " if label else ""
        raise ValidationError(f"{where}the {what} contains a line break or control character: remove it",
                              field=what.replace(" ", "_").lower())
    return value


def _check_host(host: str, label: str) -> str:
    if "://" in host or "/" in host:
        raise ValidationError(
            f"{label}: host {host!r} looks like a URL: give the server's name only, like imap.example.org",
            field="host",
        )
    if host.count(":") == 1:
        raise ValidationError(
            f"{label}: host {host!r} includes a port: give the port with --port instead", field="host"
        )
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host.strip("[]")
    except ValueError:
        pass
    name = host
    if not host.isascii():  # an internationalized name: kept as DNS knows it (IDNA)
        try:
            name = host.encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
    if not _HOSTNAME.match(name):
        raise ValidationError(f"{label}: host {host!r} is not a valid host name: give a name like "
                              "imap.example.org, or an IP address", field="host")
    return name.lower().rstrip(".")


def _check_ca_file(path: str, label: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValidationError(f"{label}: CA file {path} is a folder: give the path of a PEM file in it",
                              field="ca_file")
    if not p.is_file():
        raise ValidationError(f"{label}: CA file {path} does not exist: give the path of a PEM file", field="ca_file")
    try:
        p.open("rb").close()  # else ssl would call a file it may not read "no PEM certificate"
    except OSError as exc:
        raise ValidationError(f"{label}: CA file {path} cannot be read ({exc.strerror}): make it readable for "
                              "the user that runs mailhost", field="ca_file") from None
    try:
        ssl.create_default_context(cafile=str(p))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValidationError(
            f"{label}: CA file {path} holds no PEM certificate ({exc}): give a PEM file of CA certificates",
            field="ca_file",
        ) from None
    return str(p.absolute())


def _transcript(name: str) -> Any:
    logger = logging.getLogger(f"mailhost.transcript.{name}" if name else "mailhost.transcript")

    def write(line: str) -> None:
        logger.info("%s", redact(line))

    return write
