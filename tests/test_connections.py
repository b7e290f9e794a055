"""Connections through the CLI: validation from the protocol's declaration, exit 2, nothing written."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from mailhost.connections import ConnectionSpec
from mailhost.errors import PluginError
from mailhost.protocols import Direction

from .helpers import as_installed, run_cli


@pytest.fixture
def cli(home: Path, plugin_env: dict[str, str], tmp_path: Path):
    """Run mailhost with the test plugin installed, in the installation folder."""
    mailbox = tmp_path / "mailbox"
    mailbox.mkdir()

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None):
        # Only the test plugin: the tests must not depend on what else is installed.
        base = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
        return run_cli(*args, input=input, env={**base, **(env or {})}, cwd=home)

    run.mailbox = mailbox  # type: ignore[attr-defined]
    run.home = home  # type: ignore[attr-defined]
    run.env = plugin_env  # type: ignore[attr-defined]
    return run


def _rows(home: Path, table: str) -> int:
    db = sqlite3.connect(home / "mailhost.db")
    try:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def _bad(cli, *args: str, expect: str, table: str = "incoming_connections", **kw) -> None:
    before = _rows(cli.home, table)
    out = cli(*args, **kw)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert expect in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert _rows(cli.home, table) == before


def test_add_list_show_incoming(cli) -> None:
    """An incoming connection is added disabled and shown with the seeds' attribute names."""
    out = cli("incoming", "add", "helpdesk", "--protocol", "dir", "--folder", str(cli.mailbox),
              "--description", "Support mailbox", "--username", "help", "--password-env", "PW",
              env={"PW": "s3cret-pw"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(cli("incoming", "show", "helpdesk", "--json").stdout)
    assert shown["enabled"] is False
    assert shown["after_download"] == "mark-seen"
    assert shown["timeout"] == 30000 and shown["interval"] == 1
    assert shown["password_set"] is True
    assert "s3cret" not in json.dumps(shown)
    listed = json.loads(cli("incoming", "list", "--json").stdout)
    assert [c["name"] for c in listed] == ["helpdesk"]
    assert json.loads(cli("incoming", "list", "--search", "SUPPORT", "--json").stdout)[0]["name"] == "helpdesk"
    assert json.loads(cli("incoming", "list", "--search", "nomatch", "--json").stdout) == []
    for literal in ("%", "_", "help_esk"):  # a search is text, not a LIKE pattern
        assert json.loads(cli("incoming", "list", "--search", literal, "--json").stdout) == []


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--protocol", "nosuch"], "no incoming protocol named 'nosuch'"),
        ([], "needs a protocol"),
        (["--protocol", "dir"], "needs a folder"),
        (["--protocol", "dir", "--folder", "x", "--host", "h.example"], "host does not apply to dir"),
        (["--protocol", "dir", "--folder", "x", "--timeout", "30001"], "timeout 30001 ms is not valid: use 1-30000"),
        (["--protocol", "dir", "--folder", "x", "--timeout", "-5"], "timeout -5 ms is not valid"),
        (["--protocol", "dir", "--folder", "x", "--interval", "-1"], "interval -1 is not valid"),
        (["--protocol", "dir", "--folder", "x", "--after-download", "burn"], "no after-download action named 'burn'"),
        (["--protocol", "dir", "--folder", "x", "--after-download", "move"], "needs a folder: give --move-to"),
        (["--protocol", "dir", "--folder", "x", "--move-to", "Archive"], "applies to an action that takes an argument (move, test-flag)"),
        (["--protocol", "dir", "--folder", "x", "--certificate", "nocert"], "no certificate named 'nocert'"),
        (["--protocol", "dir", "--folder", "x", "--oauth-credential", "o"], "does not support oauth2"),
        (["--protocol", "dir", "--folder", "x", "--from", "a@b.example"], "No such option '--from'"),
        (["--protocol", "dir", "--folder", "x", "--username", "u", "--password-env", "NOPE_UNSET"],
         "environment variable NOPE_UNSET is not set"),
        (["--protocol", "dir", "--folder", "x", "--port", "abc"], "'abc' is not a valid integer"),
        (["--protocol", "dir", "--folder", "x", "--username", "u\r\nA1 DELETE INBOX"],
         "the username contains a line break or control character: remove it"),
        (["--protocol", "dir", "--folder", "x", "--username", "u" * 501], "the username is 501 characters long: use at most 500"),
        (["--protocol", "dir", "--folder", "x", "--shared-mailbox", "te\nam"],
         "the shared mailbox contains a line break"),
    ],
)
def test_incoming_validation(cli, args: list[str], expect: str) -> None:
    """Each invalid attribute is one sentence naming it and the fix; nothing is stored."""
    _bad(cli, "incoming", "add", "c1", *args, expect=expect)


def test_non_ascii_incoming_password_refused(cli) -> None:
    """Incoming passwords must be ASCII, as the seeds say."""
    _bad(cli, "incoming", "add", "c1", "--protocol", "dir", "--folder", "x", "--username", "u",
         "--password-stdin", input="pässwörd\n", expect="non-ASCII")


def test_duplicate_name_refused(cli) -> None:
    """Names are unique per direction."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", "x").returncode == 0
    _bad(cli, "incoming", "add", "c1", "--protocol", "dir", "--folder", "y", expect="already exists")


def test_ca_file_checked(cli, tmp_path: Path) -> None:
    """A CA file that is missing or not PEM is refused."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--ca-file", str(tmp_path / "none.pem"),
         expect="does not exist", table="outgoing_connections")
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--ca-file", str(junk),
         expect="holds no PEM certificate", table="outgoing_connections")
    # a folder is not "missing", and a file this user may not read holds no news about PEM
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--ca-file", str(tmp_path),
         expect=f"CA file {tmp_path} is a folder: give the path of a PEM file in it", table="outgoing_connections")
    private = tmp_path / "private-ca.pem"
    private.write_text("-----BEGIN CERTIFICATE-----\n")
    private.chmod(0)
    out = run_cli("outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--ca-file", str(private),
                  cwd=cli.home, env={**cli.env, "MAILHOST_LOAD_PLUGINS": "testplugin"}, obey_permissions=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"CA file {private} cannot be read (Permission denied): make it readable" in out.stderr, out.stderr
    assert _rows(cli.home, "outgoing_connections") == 0


@pytest.mark.parametrize(
    "host, expect",
    [("imap://mail.example.org", "looks like a URL"), ("mail.example.org:993", "includes a port"),
     ("bad host", "not a valid host name")],
)
def test_host_checked(cli, host: str, expect: str) -> None:
    """Hosts an admin might mistype get a precise error."""
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", host, expect=expect, table="outgoing_connections")


@pytest.mark.parametrize("option, value, expect", [
    ("--prefix", "[x]\r\nBcc: evil@example.org", "the prefix contains a line break"),
    ("--from", "App\r\nX-Injected: 1 <app@example.org>", "the from address contains a line break"),
])
def test_no_header_injection(cli, option: str, value: str, expect: str) -> None:
    """A prefix or from address becomes a header: a line break in it would add headers."""
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", option, value, expect=expect,
         table="outgoing_connections")


def test_internationalized_host_is_kept_as_dns_knows_it(cli) -> None:
    """An IDN host name is accepted and stored in its IDNA (punycode) form."""
    assert cli("outgoing", "add", "o1", "--protocol", "dir", "--host", "ímap.exämple.org").returncode == 0
    assert json.loads(cli("outgoing", "show", "o1", "--json").stdout)["host"] == "xn--map-qma.xn--exmple-cua.org"


def test_protocol_change_says_the_old_settings_are_gone(cli) -> None:
    """Another protocol starts afresh; when that leaves a required setting out, the
    error says why it is missing."""
    env = {"MAILHOST_LOAD_PLUGINS": "imap,pop3", "PW": "pw"}
    assert cli("incoming", "add", "c1", "--protocol", "imap", "--host", "mail.example.org", "--username", "u",
               "--password-env", "PW", env=env).returncode == 0
    _bad(cli, "incoming", "edit", "c1", "--protocol", "pop3", env=env,
         expect="needs a host: give --host (the mail server's name) (another protocol keeps none of the old one's")


def test_a_protocol_name_in_any_case_is_that_protocol(cli) -> None:
    """`--protocol DIR` (add, edit, test, `plugins options`, `host-overrides`) is dir,
    stored as the plugin registered it; it was "no protocol named 'DIR'". A typo still
    is one, and an edit that names the same protocol in capitals keeps its settings."""
    assert cli("incoming", "add", "c1", "--protocol", "DIR", "--folder", str(cli.mailbox)).returncode == 0
    assert cli("outgoing", "add", "o1", "--protocol", "Dir", "--host", "box").returncode == 0
    assert json.loads(cli("incoming", "show", "c1", "--json").stdout)["protocol"] == "dir"
    assert json.loads(cli("outgoing", "show", "o1", "--json").stdout)["protocol"] == "dir"
    edited = cli("incoming", "edit", "c1", "--protocol", "Dir", "--description", "same")
    assert edited.returncode == 0, edited.stderr
    assert json.loads(cli("incoming", "show", "c1", "--json").stdout)["folder"] == str(cli.mailbox)
    tested = cli("incoming", "test", "--protocol", "DIR", "--folder", str(cli.mailbox), "--json")
    assert tested.returncode == 0, tested.stderr
    assert cli("plugins", "options", "--protocol", "DIR", "--json").stdout == \
        cli("plugins", "options", "--protocol", "dir", "--json").stdout
    assert json.loads(cli("host-overrides", "--protocol", "DIR", "--json").stdout)[0]["protocol"] == "dir"
    _bad(cli, "incoming", "add", "c2", "--protocol", "DRI", "--folder", "x",
         expect="no incoming protocol named 'DRI' is available; choose one of: dir")


def test_edit_enabled_incoming_disables_it(cli) -> None:
    """Editing an enabled incoming connection disables it."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    assert cli("incoming", "enable", "c1", "--yes").returncode == 0
    assert json.loads(cli("incoming", "show", "c1", "--json").stdout)["enabled"] is True
    out = cli("incoming", "edit", "c1", "--description", "changed")
    assert out.returncode == 0 and "disabled" in out.stderr
    shown = json.loads(cli("incoming", "show", "c1", "--json").stdout)
    assert shown["enabled"] is False and shown["description"] == "changed"


def test_enable_reports_estimate_and_needs_confirmation(cli) -> None:
    """`enable` estimates the messages to download and asks unless --yes."""
    for i in range(3):
        (cli.mailbox / f"m{i}.eml").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    out = cli("incoming", "enable", "c1")
    assert out.returncode == 2 and "pass --yes" in out.stderr
    assert "about 3 message(s)" in out.stderr
    out = cli("incoming", "enable", "c1", "--yes")
    assert out.returncode == 0, out.stderr


def _api(host, path: str):
    """What the REST API answers to a GET of ``path`` (its WSGI application, called as a
    server would)."""
    from mailhost.web import WebAdmin

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "HTTP_HOST": "localhost"}
    return json.loads(b"".join(WebAdmin(host)(environ, lambda status, headers: None)))


def test_last_poll_is_printed_like_every_other_time(cli, tmh) -> None:
    """`incoming show` prints the last poll as the CLI prints every time (``2026-11-21
    19:23:17``), --json as ISO 8601, and the REST API as --json does."""
    import datetime as dt

    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    assert cli("incoming", "enable", "c1", "--yes").returncode == 0
    assert cli("fetch", "c1").returncode == 0
    polled = json.loads(cli("incoming", "show", "c1", "--json").stdout)["last_poll_at"]
    when = dt.datetime.fromisoformat(polled)
    [line] = [x for x in cli("incoming", "show", "c1").stdout.splitlines() if x.startswith("last_poll_at ")]
    assert line.split(None, 1)[1] == when.strftime("%Y-%m-%d %H:%M:%S"), line
    [row] = _api(tmh, "/api/incoming")
    assert row["last_poll_at"] == polled and row["name"] == "c1"


def test_action_argument_has_one_name_everywhere(cli, tmh) -> None:
    """The argument of an after-download action (move's folder, or a plugin action's
    value) is ``after_download_argument`` in the text of `show`, its --json and the REST
    API, as in the Python API: not ``move_to``, which a plugin's argument is not."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox),
               "--after-download", "test-flag", "--action-argument", "urgent").returncode == 0
    assert cli("incoming", "add", "c2", "--protocol", "dir", "--folder", str(cli.mailbox),
               "--after-download", "move", "--move-to", "Done").returncode == 0
    shown = json.loads(cli("incoming", "show", "c1", "--json").stdout)
    assert (shown["after_download"], shown["after_download_argument"]) == ("test-flag", "urgent")
    assert "move_to" not in shown
    assert "after_download_argument  urgent" in cli("incoming", "show", "c1").stdout
    rows = _api(tmh, "/api/incoming")
    assert [(r["name"], r["after_download_argument"]) for r in rows] == [("c1", "urgent"), ("c2", "Done")]
    assert not any("move_to" in r for r in rows)


def test_outgoing_single_default(cli) -> None:
    """At most one outgoing connection is the default."""
    assert cli("outgoing", "add", "a", "--protocol", "dir", "--host", "a", "--default").returncode == 0
    assert cli("outgoing", "add", "b", "--protocol", "dir", "--host", "b", "--default").returncode == 0
    rows = {r["name"]: r["default"] for r in json.loads(cli("outgoing", "list", "--json").stdout)}
    assert rows == {"a": False, "b": True}
    assert cli("outgoing", "set-default", "a").returncode == 0
    rows = {r["name"]: r["default"] for r in json.loads(cli("outgoing", "list", "--json").stdout)}
    assert rows == {"a": True, "b": False}


def test_remove_and_not_found(cli) -> None:
    """Removing works; an unknown name is exit 2 naming it."""
    assert cli("outgoing", "add", "a", "--protocol", "dir", "--host", "a").returncode == 0
    assert cli("outgoing", "remove", "a").returncode == 0
    out = cli("outgoing", "show", "a")
    assert out.returncode == 2 and "no outgoing connection named 'a'" in out.stderr


def test_test_before_saving(cli) -> None:
    """`incoming test` with the options of add tests without saving."""
    out = cli("incoming", "test", "--protocol", "dir", "--folder", str(cli.mailbox), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["ok"] is True
    assert json.loads(cli("incoming", "list", "--json").stdout) == []


@pytest.mark.parametrize("direction, protocol, expect", [
    ("incoming", "imap", "cannot connect to 127.0.0.1:{port} ("),
    ("incoming", "pop3", "127.0.0.1:{port}: cannot connect ("),
    ("outgoing", "smtp", "127.0.0.1:{port}: connection refused: "),
])
def test_a_test_before_saving_names_the_server_not_a_made_up_name(home: Path, direction: str, protocol: str,
                                                                   expect: str) -> None:
    """`incoming test` / `outgoing test` with the options of add, no NAME: the connection
    has no name yet, so what they say names its server (or "this connection"), in text
    and in JSON, not a placeholder as if it were its name."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MAILHOST_LOAD_PLUGINS": protocol, "PW": "secret"}
    args = (direction, "test", "--protocol", protocol, "--host", "127.0.0.1", "--port", str(port),
            "--encryption", "none", "--username", "u@example.org", "--password-env", "PW")
    for json_option in ((), ("--json",)):
        out = run_cli(*args, *json_option, env=env, cwd=home)
        assert out.returncode == 1, out.stderr
        said = out.stdout + out.stderr
        if json_option:
            said = " ".join(step["detail"] for step in json.loads(out.stdout))
        assert expect.format(port=port) in said and "unsaved" not in said, said
    bad = run_cli(direction, "test", "--protocol", protocol, env=env, cwd=home)
    assert bad.returncode == 2, bad.stderr
    assert f"mailhost: this {protocol} connection needs a host: give --host" in bad.stderr, bad.stderr


@pytest.mark.parametrize("line, expect", [
    ("delivery_interval = true", "[service] delivery_interval in"),
    ('delivery_interval = "10"', "[service] delivery_interval in"),
    ("delivery_interval = nan", "[service] delivery_interval in"),
    ("delivery_interval = inf", "[service] delivery_interval in"),
    ("delivery_sessions = 2.5", "[service] delivery_sessions in"),
    ('delivery_sessions = "4"', "[service] delivery_sessions in"),
    ("delivery_sessions = true", "[service] delivery_sessions in"),
    ("key_file = 5", "[secrets] key_file in"),
    ("key_file = []", "[secrets] key_file in"),
    ('key_file = ""', "[secrets] key_file in"),
])
def test_config_settings_of_the_wrong_type_are_bad_input(cli, line: str, expect: str) -> None:
    """A [service] value of the wrong type (text, true, a fraction of a session, NaN) is
    refused naming the key, as [outgoing] values are, not read as some number; so is a
    key_file that is no path (5 would be read as a file named "5")."""
    config = cli.home / "mailhost.toml"
    key = line.split(" = ")[0]
    config.write_text("\n".join(line if text.startswith(f"{key} = ") else text
                                for text in config.read_text().splitlines()) + "\n")
    out = cli("incoming", "list")
    assert out.returncode == 2 and expect in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("line, expect", [
    ("keep_sent_days = inf", "[outgoing] keep_sent_days in"),
    ("keep_sent_days = 1e12", "[outgoing] keep_sent_days in"),
    ("max_age_hours = nan", "[outgoing] max_age_hours in"),
    ("max_age_hours = 1e300", "[outgoing] max_age_hours in"),
    ("max_attempts = nan", "[outgoing] max_attempts in"),
    ("messages_per_session = inf", "[outgoing] messages_per_session in"),
    ("retry_base_seconds = nan", "[outgoing] retry_base_seconds in"),
    ("retry_max_seconds = 1e300", "[outgoing] retry_max_seconds in"),
])
def test_outgoing_settings_out_of_range_are_bad_input(cli, line: str, expect: str) -> None:
    """An [outgoing] value that is no finite number in a sensible range (inf, nan, 1e300,
    which TOML reads as floats) is refused naming the key, not an "unexpected error"."""
    config = cli.home / "mailhost.toml"
    key = line.split(" = ")[0]
    config.write_text("\n".join(line if text.startswith(f"{key} = ") else text
                                for text in config.read_text().splitlines()) + "\n")
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8025"', 'listen = ""'))
    for args in (("deliver",), ("serve", "--once")):
        out = cli(*args)
        assert out.returncode == 2 and expect in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("line, expect", [
    ("keep_sent_days = -1", "[outgoing] keep_sent_days in {config} must be a number from 0 to 36500, not -1"),
    ('max_attempts = "many"', "[outgoing] max_attempts in {config} must be a whole number from 1 to 1000000, "
                              "not 'many'"),
    ("retries = 3", "[outgoing] in {config} has unknown keys ['retries']: use ["),
])
def test_a_bad_outgoing_setting_is_bad_input_wherever_the_config_is_read(cli, line: str, expect: str) -> None:
    """[outgoing] is checked with the rest of the config file, by every command that reads
    it (`init` run again, `incoming list`), as [service] and [web] are, not only by the
    `deliver` and `serve` that use it: one sentence naming the key, exit 2."""
    config = cli.home / "mailhost.toml"
    key = line.split(" = ")[0]
    text = config.read_text()
    lines = [line if old.startswith(f"{key} = ") else old for old in text.splitlines()]
    if line not in lines:
        lines.insert(lines.index("[outgoing]") + 1, line)
    config.write_text("\n".join(lines) + "\n")
    for args in (("init",), ("incoming", "list"), ("deliver",)):
        out = cli(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("mailhost: " + expect.format(config=config)), out.stderr


def test_missing_config_is_clear(tmp_path: Path) -> None:
    """Without a config file, the error says to run init."""
    out = run_cli("incoming", "list", cwd=tmp_path, env={"MAILHOST_CONFIG": ""})
    assert out.returncode == 2
    assert "mailhost init" in out.stderr


def test_config_typos_and_huge_numbers_are_bad_input(cli) -> None:
    """An unknown section or key in the config file, a folder for --config, and numbers
    beyond any sensible range are each one sentence with exit 2, never a traceback."""
    config = cli.home / "mailhost.toml"
    good = config.read_text()
    for text, expect in ((good + "[stor]\nurl = 'x'\n", "unknown sections ['stor']"),
                         (good.replace("[plugins]\n", "[plugins]\ndisable = ['pop3']\n"), "[plugins] in"),
                         (good.replace("delivery_interval =", "delivery_intervall ="),
                          "unknown keys ['delivery_intervall']")):
        config.write_text(text)
        out = cli("incoming", "list")
        assert out.returncode == 2 and expect in out.stderr and "Traceback" not in out.stderr, out.stderr
    config.write_text(good)
    for args, expect in ((("--config", str(cli.home), "incoming", "list"), "is a folder: give the config file"),
                         (("queue", "incoming", "--limit", "99999999999999999999"), "is not in the range"),
                         (("queue", "outgoing", "purge", "--older-than", "999999999"), "is not in the range"),
                         (("queue", "incoming", "purge", "--older-than", "nan"), "'nan' is not a number of days"),
                         (("queue", "outgoing", "purge", "--older-than", "NaN"), "'NaN' is not a number of days"),
                         (("queue", "outgoing", "purge", "--older-than", "abc"), "'abc' is not a number of days"),
                         (("queue", "incoming", "release", "--processing-for", "1h"),
                          "'1h' is not a number of minutes"),
                         (("queue", "incoming", "show", "99999999999999999999", "--raw"), "is not in the range"),
                         (("queue", "outgoing", "retry", "99999999999999999999"), "is not in the range")):
        out = cli(*args)
        assert out.returncode == 2 and expect in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_host_overrides_listing(cli) -> None:
    """`host-overrides` lists what the plugins register, filtered by provider."""
    rows = json.loads(cli("host-overrides", "--provider", "test", "--json").stdout)
    assert rows[0]["name"] == "local" and rows[0]["protocol"] == "dir"
    typo = cli("host-overrides", "--provider", "nobody", "--json")  # no such provider: a typo, said so
    assert typo.returncode == 2 and typo.stdout == "" and "provider 'nobody': choose one of" in typo.stderr
    assert json.loads(cli("host-overrides", "--provider", "test", "--protocol", "dir", "--json").stdout) == rows


def test_show_has_only_the_settings_of_the_connections_protocol(cli) -> None:
    """`show` and its --json list the attributes the protocol declares, not the columns of
    every protocol: a connection whose protocol has no encryption, host or port (dir
    incoming, like Graph has no encryption) showed `encryption ssl`, a default it never uses."""
    assert cli("incoming", "add", "d", "--protocol", "dir", "--folder", "x", "--username", "u").returncode == 0
    assert cli("outgoing", "add", "o", "--protocol", "dir", "--host", "box").returncode == 0
    for direction, name, absent, present in (
            ("incoming", "d", {"host", "port", "encryption", "oauth_credential", "host_override", "ca_file"},
             {"folder", "username", "password_set", "certificates", "shared_mailbox", "after_download"}),
            ("outgoing", "o", {"port", "encryption", "oauth_credential"},
             {"host", "username", "password_set", "from_address", "ca_file", "host_override", "default"})):
        shown = json.loads(cli(direction, "show", name, "--json").stdout)
        assert not absent & set(shown) and present <= set(shown), shown
        text = cli(direction, "show", name).stdout
        assert not {line.split()[0] for line in text.splitlines()} & absent, text
        [listed] = json.loads(cli(direction, "list", "--json").stdout)
        assert listed == shown


def test_certificates_attached_and_detached(cli) -> None:
    """--certificate attaches (replacing the list); --no-certificates detaches them all."""
    from mailhost import Mailhost
    from mailhost.store import Certificate

    host = Mailhost.open(cli.home / "mailhost.toml")
    with host.session() as s:
        s.add_all([Certificate(name=n, cert_pem=b"-", key_enc=b"-") for n in ("c1", "c2")])
    host.close()
    assert cli("incoming", "add", "d", "--protocol", "dir", "--folder", "x", "--certificate", "c1",
               "--certificate", "c2").returncode == 0
    assert json.loads(cli("incoming", "show", "d", "--json").stdout)["certificates"] == ["c1", "c2"]
    assert cli("incoming", "edit", "d", "--no-certificates").returncode == 0
    assert json.loads(cli("incoming", "show", "d", "--json").stdout)["certificates"] == []


def test_an_empty_secret_is_refused_and_username_clears_the_password(cli, tmp_path: Path) -> None:
    """An empty --password-env, --password-file or --password-stdin (and client secret)
    is exit 2 naming the source: it never wipes the stored password, nor adds a username
    without one. `--username ''` is how a connection stops signing in: its password goes too."""
    added = cli("outgoing", "add", "s1", "--protocol", "dir", "--host", "h", "--username", "u",
                "--password-env", "PW", env={"PW": "s3cret"})
    assert added.returncode == 0, added.stderr
    (tmp_path / "empty").write_text("\n")
    empty = str(tmp_path / "empty")
    for extra, kw, words in ((["--password-env", "EMPTY"], {"env": {"EMPTY": ""}}, "environment variable EMPTY is empty"),
                             (["--password-file", empty], {}, f"password file {empty} is empty"),
                             (["--password-stdin"], {"input": "\n"}, "read from standard input is empty")):
        _bad(cli, "outgoing", "edit", "s1", *extra, expect=words, table="outgoing_connections", **kw)
        _bad(cli, "outgoing", "add", "s2", "--protocol", "dir", "--host", "h", "--username", "u", *extra,
             expect=words, table="outgoing_connections", **kw)
        _bad(cli, "incoming", "add", "i1", "--protocol", "dir", "--folder", str(cli.mailbox), "--username", "u",
             *extra, expect=words, **kw)
    _bad(cli, "oauth", "add", "o1", "--provider", "microsoft", "--client-id", "c", "--client-secret-env", "EMPTY",
         expect="environment variable EMPTY is empty: set it to the client secret", table="oauth_credentials",
         env={"EMPTY": ""})
    assert json.loads(cli("outgoing", "show", "s1", "--json").stdout)["password_set"] is True
    cleared = cli("outgoing", "edit", "s1", "--username", "")
    assert cleared.returncode == 0, cleared.stderr
    shown = json.loads(cli("outgoing", "show", "s1", "--json").stdout)
    assert shown["username"] is None and shown["password_set"] is False


def _stored_options(home: Path, table: str, name: str) -> dict:
    db = sqlite3.connect(home / "mailhost.db")
    try:
        return json.loads(db.execute(f"SELECT options FROM {table} WHERE name = ?", (name,)).fetchone()[0])
    finally:
        db.close()


def _set_stored_options(home: Path, table: str, name: str, options: dict) -> None:
    """What a connection holds after its plugin changed what it declares."""
    db = sqlite3.connect(home / "mailhost.db")
    try:
        db.execute(f"UPDATE {table} SET options = ? WHERE name = ?", (json.dumps(options), name))
        db.commit()
    finally:
        db.close()


DIR_DEFAULTS = {"batch_size": 0, "newest_first": False, "label": None}


def test_options_are_set_typed_shown_and_reset(cli) -> None:
    """--option NAME=VALUE stores each declared option typed; show (text and JSON) gives
    every declared option, defaults filled in; an edit changes only what it names, and
    NAME= resets one to its default."""
    added = cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox),
                "--option", "batch_size=2", "--option", "newest_first=YES", "--option", "label=red", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["options"] == {"batch_size": 2, "newest_first": True, "label": "red"}
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 2, "newest_first": True,
                                                                       "label": "red"}
    assert cli("incoming", "add", "c2", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    shown = json.loads(cli("incoming", "show", "c2", "--json").stdout)
    assert shown["options"] == DIR_DEFAULTS and shown["undeclared_options"] == {}
    assert _stored_options(cli.home, "incoming_connections", "c2") == {}  # defaults are not copied into the store

    assert cli("incoming", "edit", "c1", "--option", "batch_size=5", "--option", "label=").returncode == 0
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 5, "newest_first": True}
    text = cli("incoming", "show", "c1")
    assert re.search(r"^options +batch_size=5, newest_first=yes, label=-$", text.stdout, re.M), text.stdout
    assert text.stderr == ""
    listed = json.loads(cli("incoming", "list", "--json").stdout)
    assert [c["options"]["batch_size"] for c in listed] == [5, 0]


def test_the_session_gets_the_options_typed_with_defaults(cli, tmp_path: Path) -> None:
    """`test` reports what the session was given: stored options, those given with the
    test (not saved), defaults for the rest; delivery uses an outgoing one."""
    def tested(*args: str) -> dict:
        out = cli(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads([s for s in json.loads(out.stdout) if s["step"] == "options"][0]["detail"])

    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox),
               "--option", "batch_size=2").returncode == 0
    assert tested("incoming", "test", "c1") == {**DIR_DEFAULTS, "batch_size": 2}
    assert tested("incoming", "test", "c1", "--option", "newest_first=on", "--option", "batch_size=") == {
        **DIR_DEFAULTS, "newest_first": True}
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 2}  # a test saves nothing
    assert tested("incoming", "test", "--protocol", "dir", "--folder", str(cli.mailbox),
                  "--option", "label=green") == {**DIR_DEFAULTS, "label": "green"}

    assert cli("outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--option", "suffix=.txt",
               "--from", "app@example.org", "--default").returncode == 0
    assert tested("outgoing", "test", "o1") == {"suffix": ".txt"}
    assert cli("send", "--to", "bob@example.org", "--subject", "hi", "--body", "hello").returncode == 0
    assert cli("deliver").returncode == 0
    assert [p.suffix for p in (tmp_path / "outbox" / "box").iterdir()] == [".txt"]


def test_incoming_options_limit_what_a_pass_downloads(cli) -> None:
    """The dir protocol's batch_size and newest_first change what `fetch` downloads."""
    for name in ("a.eml", "b.eml", "c.eml"):
        (cli.mailbox / name).write_bytes(f"Subject: {name}\r\n\r\nbody\r\n".encode())
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox), "--option", "batch_size=1",
               "--option", "newest_first=true").returncode == 0
    assert cli("incoming", "enable", "c1", "--yes").returncode == 0
    assert cli("fetch", "c1").returncode == 0
    assert [i["subject"] for i in json.loads(cli("queue", "incoming", "--json").stdout)] == ["c.eml"]


_DIR_OPTIONS = "batch_size (int, at least 0, default 0); newest_first (bool, default false); label (str, one of red/green)"


@pytest.mark.parametrize("option, expect", [
    ("nosuch=1", f"connection 'c1' (dir): dir has no option 'nosuch'; its options are: {_DIR_OPTIONS} "
                 "(see `mailhost plugins options`)"),
    ("batch_size=abc", "connection 'c1' (dir): option batch_size takes a whole number, not 'abc': "
                       "give --option batch_size=VALUE"),
    ("batch_size=1.5", "option batch_size takes a whole number, not '1.5'"),
    ("batch_size=-1", "connection 'c1' (dir): option batch_size takes a whole number of at least 0, not -1: "
                      "give --option batch_size=VALUE"),
    ("newest_first=maybe", "option newest_first takes true or false (true/false, yes/no, on/off, 1/0), not 'maybe'"),
    ("label=blue", "option label takes one of: red, green, not 'blue'"),
    ("batch_size", "--option 'batch_size' is not NAME=VALUE"),
    ("=3", "--option '=3' is not NAME=VALUE"),
])
@pytest.mark.parametrize("command", ["add", "edit", "test"])
def test_bad_options_are_refused_naming_them(cli, command: str, option: str, expect: str) -> None:
    """An unknown option, a value of the wrong type, out of its bounds or not among the
    choices, a malformed pair: one sentence naming it and what is valid, exit 2, nothing written."""
    if command != "add":
        assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox),
                   "--option", "batch_size=7").returncode == 0
    args = ["--protocol", "dir", "--folder", str(cli.mailbox)] if command == "add" else []
    _bad(cli, "incoming", command, "c1", *args, "--option", option, expect=expect)
    if command != "add":
        assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 7}


def test_bad_outgoing_options_are_refused(cli) -> None:
    """Outgoing connections check their protocol's options the same way."""
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--option", "batch_size=1",
         table="outgoing_connections",
         expect="connection 'o1' (dir): dir has no option 'batch_size'; its options are: suffix (str, default \".eml\")")
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--option", "suffix=.a",
         "--option", "suffix=.b", table="outgoing_connections", expect="--option suffix is given twice")
    _bad(cli, "outgoing", "add", "o1", "--protocol", "dir", "--host", "box", "--option", "suffix=a\tb",
         table="outgoing_connections", expect="option suffix takes one line of at most 1000 characters")


def test_options_the_protocol_stopped_declaring(cli) -> None:
    """An option the plugin no longer declares is kept, shown apart with a warning, never
    given to the session, refused when set, and removed by NAME=; a stored value the
    declaration no longer takes stops its use with a sentence naming the option."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    _set_stored_options(cli.home, "incoming_connections", "c1", {"batch_size": 3, "colour": "blue"})
    shown = cli("incoming", "show", "c1", "--json")
    assert json.loads(shown.stdout)["undeclared_options"] == {"colour": "blue"}
    assert json.loads(shown.stdout)["options"] == {**DIR_DEFAULTS, "batch_size": 3}
    assert ("holds option(s) colour, which protocol dir no longer declares: they are kept but not used; "
            "`mailhost incoming edit c1 --option colour=` removes one") in shown.stderr
    assert "colour" not in cli("incoming", "test", "c1", "--json").stdout
    assert cli("incoming", "edit", "c1", "--description", "kept").returncode == 0
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 3, "colour": "blue"}
    _bad(cli, "incoming", "edit", "c1", "--option", "colour=red", expect="dir has no option 'colour'")
    assert cli("incoming", "edit", "c1", "--option", "colour=").returncode == 0
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 3}
    assert cli("incoming", "show", "c1").stderr == ""

    _set_stored_options(cli.home, "incoming_connections", "c1", {"batch_size": "lots"})
    refused = cli("incoming", "test", "c1")
    assert refused.returncode == 2 and ("connection 'c1' (dir): its stored option batch_size no longer fits dir, "
                                        "which now takes a whole number, not 'lots': give --option batch_size=VALUE, "
                                        "or --option batch_size= for the default") in refused.stderr, refused.stderr
    assert cli("incoming", "edit", "c1", "--option", "batch_size=4").returncode == 0
    assert _stored_options(cli.home, "incoming_connections", "c1") == {"batch_size": 4}


def test_plugins_options_lists_what_each_protocol_takes(cli) -> None:
    """`plugins options` (and `plugins list --json`) tell an admin each protocol's options."""
    rows = json.loads(cli("plugins", "options", "--json").stdout)
    assert [(r["protocol"], r["name"], r["type"]) for r in rows] == [
        ("incoming/dir", "batch_size", "int"), ("incoming/dir", "newest_first", "bool"),
        ("incoming/dir", "label", "str"), ("outgoing/dir", "suffix", "str")]
    assert rows[2] == {"protocol": "incoming/dir", "plugin": "testplugin", "name": "label",
                       "description": "a colour to file the connection's mail under", "type": "str", "default": None,
                       "required": False, "choices": ["red", "green"], "minimum": None, "maximum": None,
                       "identifies_mailbox": False}
    assert (rows[0]["minimum"], rows[0]["maximum"]) == (0, None)
    text = cli("plugins", "options", "--protocol", "dir").stdout
    assert re.search(r"^MINIMUM +MAXIMUM +DESCRIPTION$", text.splitlines()[0][text.index("MINIMUM"):]), text
    assert re.search(r"^incoming/dir +batch_size +int +0 +no +- +0 +- +list at most", text, re.M), text
    assert re.search(r"^incoming/dir +newest_first +bool +no +no +- +- +- +download", text, re.M), text
    typo = cli("plugins", "options", "--protocol", "dri")
    assert typo.returncode == 2 and "no protocol named 'dri' is loaded: choose one of dir" in typo.stderr
    [plugin] = [p for p in json.loads(cli("plugins", "list", "--json").stdout) if p["name"] == "testplugin"]
    assert [o["name"] for o in plugin["protocol_options"]["incoming/dir"]] == ["batch_size", "newest_first", "label"]
    assert plugin["protocol_options"]["outgoing/dir"][0]["default"] == ".eml"


@pytest.mark.parametrize("bug", ["test", "open", "estimate"])
def test_a_plugin_bug_in_a_test_or_an_estimate_is_a_finding_not_a_crash(cli, bug: str) -> None:
    """A protocol plugin raising a bug (a RuntimeError) in its connection test, or while
    `enable` estimates, is named in the command's answer: `incoming test` reports a failed
    step naming the plugin and its distribution, and `enable` says it could not estimate
    and enables the connection (both ended in "unexpected error ... please report it", as
    if mailhost were at fault, and the connection could not be enabled at all)."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    found = f"unexpected RuntimeError in plugin testplugin (mailhost-testplugin 0.1.0): a bug in {bug}"
    env = {"MAILHOST_TESTPLUGIN_BUG_IN": bug}
    if bug == "test":
        out = cli("incoming", "test", "c1", "--json", env=env)
        assert out.returncode == 1, out.stderr
        assert {"step": "plugin", "ok": False, "detail": found} in json.loads(out.stdout)
    else:
        out = cli("incoming", "enable", "c1", "--yes", env=env)
        assert out.returncode == 0, out.stderr
        assert f"could not estimate the messages to download ({found})" in out.stderr
        assert json.loads(cli("incoming", "show", "c1", "--json").stdout)["enabled"] is True
    assert "please report it" not in out.stderr


def test_a_connection_test_that_yields_no_step_names_the_plugin(tmh, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol's connection test that yields something other than a TestStep broke
    the test contract: the error names the plugin and its distribution (whom to tell), as
    every contract error does."""
    plugin = as_installed(tmh, monkeypatch)
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="c1", protocol="dir", folder=str(tmp_path)))
    key = (Direction.INCOMING, "dir")
    monkeypatch.setitem(tmh.plugins.protocols, key, dataclasses.replace(
        tmh.plugins.protocols[key], test=lambda settings: iter([("connect", True)])))
    with pytest.raises(PluginError) as caught:
        list(tmh.connections.test(Direction.INCOMING, "c1", ConnectionSpec()))
    assert str(caught.value) == (f"{plugin} broke the test contract: its dir test yielded ('connect', True), not a "
                                 "mailhost.TestStep (report it to the plugin's author)")


def _wait_until_reading_the_terminal(pid: int) -> None:
    """Wait until process ``pid`` sits in read() (Linux: /proc/PID/syscall).

    A Ctrl-C that arrives between the prompt being written and the read starting is
    noted by CPython but acted on only at the next signal (input() does not check
    before it blocks): the child would wait at its question for ever. A person never
    types that fast; a test does."""
    read = {"x86_64": 0, "aarch64": 63}.get(os.uname().machine)
    if read is None:
        return
    deadline = time.monotonic() + 120  # a safety net, not a timing assertion
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[:1] == [str(read)]:  # any fd: getpass reads /dev/tty, not stdin
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never read its terminal")


def _on_a_terminal(cli, args: tuple[str, ...], prompt: bytes, answer: bytes) -> tuple[int, str]:
    """Run ``mailhost ARGS`` on a terminal, type ``answer`` at ``prompt``; its exit status
    and everything it wrote there."""
    import pty
    import select
    import signal
    import sys

    env = {**os.environ, **cli.env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: mailhost on the terminal
        os.chdir(cli.home)
        os.execve(sys.executable, [sys.executable, "-m", "mailhost", *args], env)
    said = b""
    try:
        while prompt not in said:
            assert select.select([fd], [], [], 120)[0], said  # a safety net, not a timing assertion
            said += os.read(fd, 1024)
        _wait_until_reading_the_terminal(pid)
        os.write(fd, answer)
        while True:
            assert select.select([fd], [], [], 120)[0], said
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            said += chunk
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # a child still at its question would never end
        raise
    finally:
        _, wait_status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(wait_status), said.decode().replace("\r\n", "\n")


@pytest.mark.parametrize("answer, status, expect", [
    (b"\x03", 130, "interrupted: incoming connection c1 stays disabled"),  # Ctrl-C at the question
    (b"n\r", 1, "incoming connection c1 stays disabled"),
])
def test_enable_interrupted_or_declined_at_the_question_stays_disabled(cli, answer: bytes, status: int,
                                                                       expect: str) -> None:
    """On a terminal `incoming enable` asks; Ctrl-C there (or no) says on a line of its own
    that the connection stays disabled and how to enable it, instead of "aborted"."""
    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    code, text = _on_a_terminal(cli, ("incoming", "enable", "c1"), b"[y/N]", answer)
    assert code == status, text
    assert f"\nmailhost: {expect}; run `mailhost incoming enable c1` again" in text, text
    assert "aborted" not in text and "Traceback" not in text, text
    assert json.loads(cli("incoming", "show", "c1", "--json").stdout)["enabled"] is False


def test_a_password_sent_unencrypted_over_the_network_is_warned_about(cli) -> None:
    """Encryption none with a password to another machine is said on add, edit and show
    (the admin may mean it: a relay on a trusted segment), never to this machine, and
    never on stdout, where --json prints only the record."""
    def smtp(*args: str):
        return cli(*args, env={"PW": "s3cret", "MAILHOST_LOAD_PLUGINS": "smtp"})

    words = ("outgoing connection relay sends its password unencrypted to smtp.example.org (encryption none), where "
             "anyone on the way can read it: `mailhost outgoing edit relay --encryption starttls` (or ssl) protects it")
    added = smtp("outgoing", "add", "relay", "--protocol", "smtp", "--host", "smtp.example.org", "--encryption", "none",
                 "--username", "u", "--password-env", "PW", "--from", "a@example.org", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["encryption"] == "none"
    assert f"mailhost: warning: {words}" in added.stderr
    assert words in smtp("outgoing", "show", "relay").stderr
    assert "unencrypted" not in smtp("outgoing", "edit", "relay", "--encryption", "starttls").stderr
    assert "unencrypted" not in smtp("outgoing", "show", "relay").stderr
    edited = smtp("outgoing", "edit", "relay", "--encryption", "none")
    assert edited.returncode == 0 and words in edited.stderr, edited.stderr
    for quiet in (["--host", "127.0.0.1"], ["--host", "localhost"], ["--username", ""]):
        out = smtp("outgoing", "edit", "relay", *quiet)
        assert out.returncode == 0 and "unencrypted" not in out.stderr, (quiet, out.stderr)


@pytest.mark.parametrize("answer, status, expect", [
    (b"\x03", 130, "interrupted while reading the password: nothing was changed"),  # Ctrl-C
    (b"\x04", 2, "no password was read from the terminal"),  # Ctrl-D, the end of input
])
def test_ctrl_c_or_ctrl_d_at_the_password_prompt_changes_nothing(cli, answer: bytes, status: int,
                                                                 expect: str) -> None:
    """--password-stdin on a terminal asks without echo; Ctrl-C or Ctrl-D there is one
    sentence saying what happened and that nothing changed, not "mailhost: aborted"."""
    code, text = _on_a_terminal(cli, ("outgoing", "add", "o1", "--protocol", "dir", "--host", "h",
                                      "--username", "u", "--password-stdin"), b"Password: ", answer)
    assert code == status, text
    assert f"\nmailhost: {expect}" in text and text.count("mailhost:") == 1, text
    assert "aborted" not in text and "Traceback" not in text, text
    assert json.loads(cli("outgoing", "list", "--json").stdout) == []


@pytest.mark.parametrize("args", [(), ("incoming",), ("queue",), ("queue", "outgoing", "purge", "--help")])
def test_a_group_without_its_command_shows_its_help(cli, args: tuple[str, ...]) -> None:
    """`mailhost incoming` (what a new admin types to see what it can do) shows that
    group's help, not the help dressed as an error ("mailhost: Usage: ...")."""
    out = cli(*args)
    text = out.stdout + out.stderr
    assert "mailhost: Usage" not in text and "Traceback" not in text, text
    assert text.startswith(f"Usage: mailhost {' '.join(a for a in args if a != '--help')}".rstrip()), text
    assert out.returncode == (0 if "--help" in args else 2), text


def test_output_to_a_full_disk_is_said_so(cli) -> None:
    """A listing redirected to a full disk (here /dev/full) fails with one sentence saying
    the output could not be written and why, exit 1, not "unexpected error ... report it"."""
    import subprocess
    import sys

    assert cli("incoming", "add", "c1", "--protocol", "dir", "--folder", str(cli.mailbox)).returncode == 0
    env = {**os.environ, **cli.env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "mailhost", "incoming", "list", "--json"], stdout=full,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=cli.home, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot write the output (No space left on device)" in out.stderr, out.stderr
    assert "unexpected" not in out.stderr, out.stderr


@pytest.mark.parametrize("direction", ["incoming", "outgoing"])
def test_edit_without_options_changes_nothing(cli, direction: str) -> None:
    """`edit NAME` with nothing to change is bad input: an enabled incoming connection is
    not disabled by it (any edit disables one), and nothing claims it "changed"."""
    add = (["--folder", str(cli.mailbox)] if direction == "incoming" else ["--host", "box"])
    assert cli(direction, "add", "c1", "--protocol", "dir", *add).returncode == 0
    if direction == "incoming":
        assert cli("incoming", "enable", "c1", "--yes").returncode == 0
    before = json.loads(cli(direction, "show", "c1", "--json").stdout)
    out = cli(direction, "edit", "c1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"nothing to change in {direction} connection c1: give the options to change" in out.stderr, out.stderr
    assert json.loads(cli(direction, "show", "c1", "--json").stdout) == before
    missing = cli(direction, "edit", "nosuch")  # a typo in the name is still said as such
    assert missing.returncode == 2 and f"no {direction} connection named 'nosuch'" in missing.stderr
