"""Options a protocol declares (ProviderOption): checked at registration, typed for sessions,
required ones enforced, and an identifying one treated like the host or username."""
from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailhost import Mailhost, ProtocolProvider, ProviderOption
from mailhost.connections import ConnectionSpec, connection_dict
from mailhost.errors import PluginError, ValidationError
from mailhost.plugins import PluginHost
from mailhost.protocols import RESERVED_OPTION_NAMES, ConnectionSettings, Direction

from .helpers import run_cli
from .testplugin import make_dist

# A third party's protocol: one Maildir-like folder per account under --folder; the
# account is a required option that names the mailbox.
ACCOUNTS = '''
from pathlib import Path

from mailhost import Direction, IncomingSession, Listing, MessageRef, ProtocolProvider, ProviderOption, hookimpl


class AccountSession(IncomingSession):
    def __init__(self, settings):
        self.root = Path(settings.folder) / settings.options["account_id"]

    def list_new(self, cursor, known):
        names = sorted(p.name for p in self.root.iterdir())
        stored = known(names)
        return Listing([MessageRef(n) for n in names if n not in stored])

    def fetch(self, refs):
        for ref in refs:
            yield ref, (self.root / ref.key).read_bytes()

    def mark_seen(self, refs):
        pass


@hookimpl
def register_protocols(register):
    register(ProtocolProvider(
        name="accounts", direction=Direction.INCOMING, open=AccountSession, attributes=frozenset({"folder"}),
        required=frozenset({"folder"}), after_download=("mark-seen",),
        options=(ProviderOption("account_id", "the account whose mail to download", required=True,
                                identifies_mailbox=True),
                 ProviderOption("page_size", "messages per request", int, default=50, minimum=1,
                                maximum=1000)),
    ))
'''


def _accounts() -> types.ModuleType:
    module = types.ModuleType("mailhost_accounts")
    exec(ACCOUNTS, module.__dict__)
    return module


@pytest.mark.parametrize("declaration, expect", [
    (dict(name="Account", description="d"), "option 'Account': an option name is 1-63 characters of a-z, 0-9 and _"),
    (dict(name="account-id", description="d"), "option 'account-id': an option name is"),
    (dict(name="x", description=" "), "option 'x' needs a description"),
    (dict(name="x", description="d", type=float), "option 'x': type 'float' is not str, int or bool"),
    (dict(name="x", description="d", type=int, default="5"), "option 'x': default '5' is not of its type int"),
    (dict(name="x", description="d", type=int, default=True), "option 'x': default True is not of its type int"),
    (dict(name="x", description="d", required=True, default="a"), "option 'x' is required and has a default"),
    (dict(name="x", description="d", choices=("a", "b"), default="c"),
     "option 'x': default 'c' is not valid: takes one of: a, b, not 'c'"),
    (dict(name="x", description="d", type=int, choices=(1, "2")), "option 'x': choice '2' is not of its type int"),
    (dict(name="x", description="d", type=bool, choices=(True,)), "option 'x': a bool option takes no choices"),
    (dict(name="x", description="d", choices=("a", "a")), "option 'x': its choices ['a', 'a'] repeat a value"),
    (dict(name="x", description="d", type=int, minimum=5, maximum=4), "option 'x': minimum 5 is more than maximum 4"),
    (dict(name="x", description="d", type=int, minimum=1, default=0),
     "option 'x': default 0 is not valid: takes a whole number of at least 1, not 0"),
    (dict(name="x", description="d", type=int, maximum=9, default=10),
     "option 'x': default 10 is not valid: takes a whole number of at most 9, not 10"),
    (dict(name="x", description="d", type=int, choices=(1, 20), minimum=1, maximum=10),
     "option 'x': choice 20 is not a whole number from 1 to 10"),
    (dict(name="x", description="d", minimum=1), "option 'x': a str option takes no minimum, only an int option"),
    (dict(name="x", description="d", type=bool, maximum=1), "option 'x': a bool option takes no maximum"),
    (dict(name="x", description="d", type=int, minimum=True), "option 'x': minimum True is not a whole number"),
    (dict(name="x", description="d", type=int, maximum="9"), "option 'x': maximum '9' is not a whole number"),
    (dict(name="api_key", description="d"), "option 'api_key' looks like a secret"),
    (dict(name="admin_password", description="d"), "option 'admin_password' looks like a secret"),
    (dict(name="refresh_token", description="d"), "take the secret from the connection's password or OAuth2"),
])
def test_a_bad_option_declaration_fails_its_plugin_naming_the_option(declaration: dict[str, Any], expect: str) -> None:
    """A declaration with a bad name, type, default or choices, or one that would hold a
    secret, fails the plugin that registers it, naming the plugin and the option."""
    with pytest.raises(ValueError, match=None) as raised:
        ProviderOption(**declaration)
    assert expect in str(raised.value)
    module = types.ModuleType("badopt")
    module.__dict__.update(declaration=declaration)
    exec("from mailhost import hookimpl, ProtocolProvider, ProviderOption, Direction\n"
         "@hookimpl\ndef register_protocols(register):\n"
         "    register(ProtocolProvider('bad', Direction.INCOMING, open=None,\n"
         "                              options=(ProviderOption(**declaration),)))\n", module.__dict__)
    host = PluginHost(only=[], extra=[("badopt", module)])
    assert host.plugins["badopt"].state == "failed" and expect in (host.plugins["badopt"].error or "")
    assert (Direction.INCOMING, "bad") not in host.protocols
    with pytest.raises(PluginError, match=r"plugin badopt \(badopt\) raised in register_protocols") as strict:
        PluginHost(only=[], extra=[("badopt", module)], strict=True)
    assert expect in str(strict.value)


@pytest.mark.parametrize("options, expect", [
    ((ProviderOption("folder", "d"),), "declares option 'folder', which is a connection attribute of the host"),
    ((ProviderOption("timeout", "d"),), "declares option 'timeout', which is a connection attribute"),
    ((ProviderOption("region", "d"), ProviderOption("region", "e")), "declares option 'region' twice"),
    (("region",), "declares option 'region', not a ProviderOption"),
])
def test_a_provider_refuses_option_names_it_cannot_take(options: tuple[Any, ...], expect: str) -> None:
    """An option may not take a host attribute's name, repeat, or be anything but a ProviderOption."""
    with pytest.raises(ValueError) as raised:
        ProtocolProvider("p", Direction.INCOMING, open=lambda s: None, options=options)  # type: ignore[arg-type]
    assert f"protocol 'p' {expect}" in str(raised.value)


def test_reserved_names_cover_every_host_field() -> None:
    """No option can read as a field of ConnectionSpec, ConnectionSettings or a
    connection's JSON form (both directions): the reserved names stay in step with them."""
    host_fields = {f.name for f in dataclasses.fields(ConnectionSpec)} | {
        f.name for f in dataclasses.fields(ConnectionSettings)}
    for direction in Direction:
        host_fields |= set(connection_dict(direction, _Stub()))
    assert host_fields <= RESERVED_OPTION_NAMES, sorted(host_fields - RESERVED_OPTION_NAMES)


class _Stub:
    """Enough of a stored connection for connection_dict."""

    def __getattr__(self, name: str) -> Any:
        return [] if name == "certificates" else None


@pytest.fixture
def amh(home: Path, testplugin: object) -> Iterator[Mailhost]:
    """An installation with the test plugin and the accounts plugin, in process."""
    host = Mailhost.open(home / "mailhost.toml",
                         plugins=PluginHost(only=[], extra=[("testplugin", testplugin), ("accounts", _accounts())]))
    yield host
    host.close()


def test_a_session_gets_typed_options_with_defaults(amh: Mailhost, tmp_path: Path) -> None:
    """Through the Python API too: text is converted, typed values are checked, the
    session's settings hold every declared option, defaults filled in."""
    conn = amh.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="accounts", folder=str(tmp_path),
                                                                  options={"account_id": "alice"}))
    assert amh.connections.settings(Direction.INCOMING, conn).options == {"account_id": "alice", "page_size": 50}
    conn, _ = amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"page_size": " 200 "}))
    assert amh.connections.settings(Direction.INCOMING, conn).options == {"account_id": "alice", "page_size": 200}
    conn, _ = amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"page_size": 20}))
    assert conn.options == {"account_id": "alice", "page_size": 20}
    with pytest.raises(ValidationError, match="option page_size takes a whole number, not True"):
        amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"page_size": True}))
    for value, bound in (("1001", "1001"), (0, "0")):
        with pytest.raises(ValidationError, match=f"option page_size takes a whole number from 1 to 1000, not {bound}"):
            amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"page_size": value}))
    with pytest.raises(ValidationError, match=r"needs option account_id \(the account whose mail to download\): "
                                              r"give --option account_id=VALUE"):
        amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"account_id": None}))
    assert amh.connections.get(Direction.INCOMING, "a").options == {"account_id": "alice", "page_size": 20}


def test_changing_an_identifying_option_reads_the_other_mailbox_afresh(amh: Mailhost, tmp_path: Path) -> None:
    """Two accounts may hold messages under the same keys: after the account changes,
    the new account's messages are downloaded, not skipped as stored; a change of an
    option that does not identify the mailbox keeps what was downloaded."""
    for account, body in (("alice", b"for alice"), ("bob", b"for bob")):
        (tmp_path / account).mkdir()
        (tmp_path / account / "1").write_bytes(b"Subject: " + body + b"\r\n\r\n" + body + b"\r\n")
    amh.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="accounts", folder=str(tmp_path),
                                                           options={"account_id": "alice"}))
    assert amh.incoming.fetch(["a"])[0].stored == 1
    amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"page_size": "10"}))
    assert amh.incoming.fetch(["a"])[0].stored == 0  # the same mailbox: nothing new
    amh.connections.edit(Direction.INCOMING, "a", ConnectionSpec(options={"account_id": "bob"}))
    assert amh.incoming.fetch(["a"])[0].stored == 1
    assert sorted(i.subject for i in amh.incoming.items()) == ["for alice", "for bob"]


def test_a_required_option_on_the_command_line(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """An installed plugin's required option: add without it is exit 2 naming it, with
    nothing written; NAME= cannot reset it; `show --json` and `test` carry it."""
    site = make_dist(tmp_path / "accounts", "mailhost-accounts", {"accounts": "mailhost_accounts"},
                     {"mailhost_accounts": ACCOUNTS})
    env = {**plugin_env, "PYTHONPATH": os.pathsep.join((str(site), plugin_env["PYTHONPATH"])),
           "MAILHOST_LOAD_PLUGINS": "accounts"}

    def cli(*args: str) -> Any:
        return run_cli(*args, env=env, cwd=home)

    missing = cli("incoming", "add", "a", "--protocol", "accounts", "--folder", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert ("connection 'a' (accounts) needs option account_id (the account whose mail to download): "
            "give --option account_id=VALUE") in missing.stderr
    assert json.loads(cli("incoming", "list", "--json").stdout) == []
    added = cli("incoming", "add", "a", "--protocol", "accounts", "--folder", str(tmp_path),
                "--option", "account_id=alice", "--option", "page_size=+7")
    assert added.returncode == 0, added.stderr
    assert json.loads(cli("incoming", "show", "a", "--json").stdout)["options"] == {"account_id": "alice",
                                                                                     "page_size": 7}
    reset = cli("incoming", "edit", "a", "--option", "account_id=")
    assert reset.returncode == 2 and "needs option account_id" in reset.stderr
    assert json.loads(cli("incoming", "show", "a", "--json").stdout)["options"]["account_id"] == "alice"


def test_options_keep_their_types_in_every_store(mh_any: Mailhost, tmh_factory: Any, tmp_path: Path) -> None:
    """The options column (JSON, there since the first migration) gives back ints, bools
    and text as stored, on SQLite and PostgreSQL."""
    tmh_factory(mh_any).connections.add(Direction.INCOMING, ConnectionSpec(
        name="c", protocol="dir", folder=str(tmp_path), options={"batch_size": "3", "newest_first": "yes"}))
    reopened = tmh_factory(mh_any)
    stored = reopened.connections.get(Direction.INCOMING, "c").options
    assert stored == {"batch_size": 3, "newest_first": True}
    assert type(stored["batch_size"]) is int and stored["newest_first"] is True
    settings = reopened.connections.settings(Direction.INCOMING, reopened.connections.get(Direction.INCOMING, "c"))
    assert settings.options == {"batch_size": 3, "newest_first": True, "label": None}


def test_another_protocol_keeps_none_of_the_old_ones_options(amh: Mailhost, tmp_path: Path) -> None:
    """Changing the protocol drops the old protocol's options; the new one's are checked."""
    amh.connections.add(Direction.INCOMING, ConnectionSpec(name="c", protocol="dir", folder=str(tmp_path),
                                                           options={"batch_size": 3}))
    with pytest.raises(ValidationError, match="needs option account_id .* keeps none of the old one's"):
        amh.connections.edit(Direction.INCOMING, "c", ConnectionSpec(protocol="accounts", folder=str(tmp_path)))
    conn, _ = amh.connections.edit(Direction.INCOMING, "c", ConnectionSpec(protocol="accounts", folder=str(tmp_path),
                                                                         options={"account_id": "a"}))
    assert conn.options == {"account_id": "a"}
