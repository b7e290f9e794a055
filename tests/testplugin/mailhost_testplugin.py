"""A tiny plugin that implements every hook, so the host can be tested without a server.

Its ``dir`` protocol treats a local directory as a mailbox: incoming, every file in
the connection's folder is a message (key: the file name); outgoing, each message is
written as a file. The events it receives are appended, one JSON line each, to the
file named by ``$MAILHOST_TESTPLUGIN_EVENTS`` when that is set. The fetch of the message
named by ``$MAILHOST_TESTPLUGIN_FAIL_AT`` fails; of the one named by
``$MAILHOST_TESTPLUGIN_HANG_AT``, never returns. A plugin's bug (a RuntimeError, which
no session should raise) comes at the fetch of the message named by
``$MAILHOST_TESTPLUGIN_BUG_AT``, or in the step named by ``$MAILHOST_TESTPLUGIN_BUG_IN``
(``open``, ``mark_seen``, ``estimate``, ``close``, ``test``).

Both protocols declare options (``ProviderOption``): incoming ``batch_size`` (int, at least 0),
``newest_first`` (bool) and ``label`` (str with choices), outgoing ``suffix`` (the
file name ending). Their connection tests report the options the session was given.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mailhost import (
    AfterDownloadAction,
    ConnectionSettings,
    Decryption,
    Direction,
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
    hookimpl,
)
from mailhost.errors import PermanentFailure, TemporaryFailure


def _event(kind: str, **data: Any) -> None:
    path = os.environ.get("MAILHOST_TESTPLUGIN_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": kind, **data}) + "\n")


def _bug(step: str) -> None:
    if os.environ.get("MAILHOST_TESTPLUGIN_BUG_IN") == step:
        raise RuntimeError(f"a bug in {step}")


class DirIncoming(IncomingSession):
    """Every file in the folder is a message; ``.seen`` marks it read."""

    def __init__(self, settings: ConnectionSettings) -> None:
        _bug("open")
        self.root = Path(settings.folder or ".")
        if not self.root.is_dir():
            raise PermanentFailure(f"{settings.name}: folder {self.root} does not exist")
        self.batch_size: int = settings.options["batch_size"]
        self.newest_first: bool = settings.options["newest_first"]

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def list_new(self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]) -> Listing:
        files = self._files()
        seen = known([p.name for p in files])
        new = [p for p in files if p.name not in seen][::-1 if self.newest_first else 1]
        if self.batch_size:
            new = new[:self.batch_size]
        return Listing([MessageRef(p.name, p.stat().st_size, p) for p in new], cursor={"count": len(files)})

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes]]:
        for ref in refs:
            if os.environ.get("MAILHOST_TESTPLUGIN_BUG_AT") == ref.key:
                raise RuntimeError(f"a bug at {ref.key}")
            if os.environ.get("MAILHOST_TESTPLUGIN_FAIL_AT") == ref.key:
                raise TemporaryFailure(f"connection dropped while fetching {ref.key}")
            if os.environ.get("MAILHOST_TESTPLUGIN_HANG_AT") == ref.key:  # a server that stops answering
                _event("hanging", key=ref.key)
                threading.Event().wait()
            if ref.handle.exists():
                yield ref, ref.handle.read_bytes()

    def resolve(self, keys: Sequence[str]) -> list[MessageRef]:
        return [MessageRef(k, None, self.root / k) for k in keys if (self.root / k).exists()]

    def estimate(self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]) -> Estimate:
        _bug("estimate")
        return Estimate(len(self.list_new(cursor, known).refs), "exact")

    def mark_seen(self, refs: Sequence[MessageRef]) -> None:
        _bug("mark_seen")
        for ref in refs:
            (self.root / f".{ref.key}.seen").touch()

    def delete(self, refs: Sequence[MessageRef]) -> None:
        for ref in refs:
            (self.root / ref.key).unlink(missing_ok=True)

    def close(self) -> None:
        _bug("close")

    def move(self, refs: Sequence[MessageRef], folder: str) -> None:
        target = self.root / folder
        target.mkdir(exist_ok=True)
        for ref in refs:
            if (self.root / ref.key).exists():
                (self.root / ref.key).rename(target / ref.key)


class DirOutgoing(OutgoingSession):
    """Writes each message to a file in ``$MAILHOST_TESTPLUGIN_OUTBOX/<host>``;
    recipients starting with 'reject' are refused."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.root = Path(os.environ.get("MAILHOST_TESTPLUGIN_OUTBOX", ".")) / (settings.host or "outbox")
        self.root.mkdir(parents=True, exist_ok=True)
        self.suffix: str = settings.options["suffix"]

    def send(self, raw: bytes, sender: str, recipients: Sequence[str]) -> SendResult:
        refused = {r: "550 no such user" for r in recipients if r.startswith("reject")}
        if len(refused) == len(recipients):
            raise PermanentFailure("550 every recipient refused")
        n = len(list(self.root.iterdir()))
        (self.root / f"{n:06d}{self.suffix}").write_bytes(raw)
        return SendResult("250 ok", refused)


def _test(settings: ConnectionSettings) -> Iterator[TestStep]:
    _bug("test")
    yield TestStep("folder", Path(settings.folder or ".").is_dir(), str(settings.folder))
    yield TestStep("options", True, json.dumps(dict(settings.options), sort_keys=True))


def _test_outgoing(settings: ConnectionSettings) -> Iterator[TestStep]:
    DirOutgoing(settings).close()
    yield TestStep("options", True, json.dumps(dict(settings.options), sort_keys=True))


@hookimpl
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    register(ProtocolProvider(
        name="dir", direction=Direction.INCOMING, open=DirIncoming, title="Directory (tests)",
        attributes=frozenset({"folder", "username", "password", "certificates", "shared_mailbox"}),
        required=frozenset({"folder"}), after_download=("mark-seen", "delete", "move", "keep"), test=_test,
        options=(
            ProviderOption("batch_size", "list at most this many messages per pass (0: all)", int, default=0,
                           minimum=0),
            ProviderOption("newest_first", "download the newest files (by name) first", bool, default=False),
            ProviderOption("label", "a colour to file the connection's mail under", str, choices=("red", "green")),
        ),
    ))
    register(ProtocolProvider(
        name="dir", direction=Direction.OUTGOING, open=DirOutgoing, title="Directory (tests)",
        attributes=frozenset({"host", "from_address", "prefix", "size_limit", "debug", "username", "password",
                              "ca_file", "host_override"}),
        required=frozenset({"host"}), test=_test_outgoing,
        options=(ProviderOption("suffix", "the file name ending of each message written", str, default=".eml"),),
    ))


@hookimpl
def register_host_overrides(register: Callable[[HostOverride], None]) -> None:
    register(HostOverride(provider="test", protocol="dir", name="local", host="localhost", title="Local test host"))


def _flag(session: IncomingSession, refs: Sequence[MessageRef], argument: str | None) -> None:
    for ref in refs:
        _event("flagged", key=ref.key, argument=argument)


def _test_tokens(username: str | None, previous: Any = None) -> Any:
    import datetime as dt

    from mailhost.oauth import utcnow
    from mailhost.oauth_providers import TokenSet

    now, n = utcnow(), int(getattr(previous, "refresh_token", "rt-0").rsplit("-", 1)[1]) + 1
    return TokenSet(access_token=f"at-{username or 'app'}-{n}", refresh_token=f"rt-{n}", obtained_at=now,
                    expires_at=now + dt.timedelta(hours=1), identity=username)


@hookimpl
def register_oauth_providers(register: Callable[[Any], None]) -> None:
    from mailhost.oauth_providers import OAuthProvider

    # Tokens without a server: at-USER-N, renewed to N+1 (each refresh rotates rt-N).
    register(OAuthProvider(
        "test", authorize=lambda config, interaction, username: _test_tokens(username),
        refresh=lambda config, tokens: _test_tokens(tokens.identity, tokens), title="Test provider (no server)",
        flows=("authorization-code", "device-code", "client-credentials"),
    ))


@hookimpl
def register_after_download_actions(register: Callable[[AfterDownloadAction], None]) -> None:
    register(AfterDownloadAction("test-flag", _flag, "record the message in the event file",
                                 takes_argument=True, protocols=frozenset({"dir"})))


@hookimpl
def decrypt_message(raw: bytes, certificates: Sequence[Any]) -> Decryption | None:
    if b"X-Test-Encrypted: rot13" not in raw:
        return None
    import codecs

    head, _, body = raw.partition(b"\r\n\r\n")
    return Decryption(head + b"\r\n\r\n" + codecs.encode(body.decode(), "rot13").encode(),
                      certificate=certificates[0].name if certificates else None)


@hookimpl
def message_stored(connection: str, item_id: int, message_id: str | None, raw: bytes) -> None:
    _event("stored", connection=connection, item_id=item_id, message_id=message_id, size=len(raw))


@hookimpl
def message_sent(connection: str, item_id: int, message_id: str | None, recipients: Sequence[str]) -> None:
    _event("sent", connection=connection, item_id=item_id, message_id=message_id, recipients=list(recipients))
