"""`mailhost serve`: scheduled downloads, isolation of failures, clean shutdown, web admin."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.protocols import Direction
from mailhost.service import Service

from .helpers import run_cli


def _free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at ``host`` just now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _set_listen(home: Path, listen: str) -> None:
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8025"', f'listen = "{listen}"'))


def test_serve_once_polls_due_connections_and_survives_failures(tmh: Mailhost, tmp_path: Path) -> None:
    """One round downloads every due connection; a broken one does not stop the others."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    (good / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="good", protocol="dir", folder=str(good)))
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="bad", protocol="dir", folder=str(bad)))
    for name in ("good", "bad"):
        tmh.connections.set_enabled(name, True)
    Service(tmh).run(once=True)
    assert [i.connection_name for i in tmh.incoming.items()] == ["good"]
    bad_conn = tmh.connections.get(Direction.INCOMING, "bad")
    assert "does not exist" in bad_conn.last_error
    assert tmh.incoming.due() == []  # both polled, next poll after their interval


def test_serve_stops_cleanly_on_sigterm_and_serves_web(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """SIGTERM stops `mailhost serve` with status 0; the web admin answers meanwhile."""
    port = _free_port()
    _set_listen(home, f"127.0.0.1:{port}")
    box = tmp_path / "box"
    box.mkdir()
    env = {**os.environ, **plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
    assert run_cli("incoming", "add", "desk", "--protocol", "dir", "--folder", str(box), env=env, cwd=home).returncode == 0
    assert run_cli("incoming", "enable", "desk", "--yes", env=env, cwd=home).returncode == 0
    (box / "a.eml").write_bytes(b"Subject: <b>hi</b>\r\n\r\nx\r\n")
    proc = subprocess.Popen([sys.executable, "-m", "mailhost", "serve"], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rows: list = []
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/queue/incoming", timeout=2) as r:
                    rows = json.load(r)
                if rows:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert rows and rows[0]["subject"] == "<b>hi</b>"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue/incoming", timeout=2) as r:
            page = r.read().decode()
        assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("broken", ["download", "delivery"])
def test_serve_once_logs_what_failed_and_exits_1(home: Path, plugin_env: dict[str, str], tmp_path: Path,
                                                  broken: str) -> None:
    """`serve --once` (one round, e.g. from a timer) says in its log what failed, the
    delivery through a connection that cannot send as much as a download, and exits 1
    then, like `fetch` and `deliver`; a round where all went well exits 0 and says what
    it sent."""
    env = {**os.environ, **plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin,smtp"}
    box = tmp_path / "box"
    if broken == "delivery":
        box.mkdir()
    assert run_cli("incoming", "add", "desk", "--protocol", "dir", "--folder", str(box), env=env, cwd=home).returncode == 0
    assert run_cli("incoming", "enable", "desk", "--yes", env=env, cwd=home).returncode == 0
    for name, args in (("out", ["--protocol", "dir", "--host", "box", "--from", "app@example.org"]),
                       ("down", ["--protocol", "smtp", "--host", "127.0.0.1", "--port", str(_free_port()),
                                 "--encryption", "none", "--from", "app@example.org"])):
        assert run_cli("outgoing", "add", name, *args, env=env, cwd=home).returncode == 0
    send = ("send", "--to", "a@example.org", "--subject", "s", "--body", "b")
    assert run_cli(*send, "--connection", "out", env=env, cwd=home).returncode == 0
    if broken == "delivery":
        assert run_cli(*send, "--connection", "down", env=env, cwd=home).returncode == 0
    out = run_cli("serve", "--once", env=env, cwd=home)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "out: 1 sent" in out.stderr, out.stderr
    if broken == "delivery":
        assert re.search(r"WARNING mailhost.service: down \(127.0.0.1:\d+\): connection refused.*\(1 to retry\)",
                         out.stderr), out.stderr
    else:
        assert f"WARNING mailhost.service: desk: folder {box} does not exist" in out.stderr, out.stderr
        box.mkdir()
        out = run_cli("serve", "--once", env=env, cwd=home)  # due again: a failed pass does not wait its interval
        assert out.returncode == 0 and "WARNING" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [("serve", "--once"), ("deliver",)])
def test_a_purge_of_sent_messages_that_fails_is_a_failure(home: Path, command: tuple[str, ...]) -> None:
    """A store that reads but cannot be written: the purge of old sent messages that each
    delivery pass starts with fails, and nothing else had work. `serve --once` and
    `deliver` say what failed and the fix, and exit 1, not 0 as if all went well."""
    db = home / "mailhost.db"
    db.chmod(0o444)
    try:
        out = run_cli(*command, cwd=home, obey_permissions=True)
    finally:
        db.chmod(0o600)
    assert out.returncode == 1, out.stderr
    assert "purging sent outgoing messages failed: the store " in out.stderr, out.stderr
    assert "are not readable and writable for this user" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("listen, expect", [
    (":99999", "the port '99999' is not a number from 1 to 65535"),
    ("0.0.0.0:-1", "the port '-1' is not"),
    ("::1:18030", "an IPv6 address goes in brackets"),
    ("127.0.0.1", "it has no port"),
    ("[127.0.0.1]:18030", "is not an IPv6 address"),
])
def test_bad_web_listen_is_bad_input(home: Path, listen: str, expect: str) -> None:
    """A [web] listen that is not HOST:PORT with a port 1-65535 is refused when the config
    loads: one sentence naming the key and the fix, exit 2, not a program bug."""
    _set_listen(home, listen)
    out = run_cli("serve", cwd=home)
    assert out.returncode == 2, out.stderr
    assert "[web] listen" in out.stderr and expect in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_serve_on_a_web_address_in_use_says_another_program_listens(home: Path) -> None:
    """A second `serve` of one installation (or anything else) on the web admin's address:
    one sentence that says something listens there and what to do, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        _set_listen(home, listen)
        out = run_cli("serve", cwd=home)
    assert out.returncode == 2, out.stderr
    assert f"cannot serve the web admin on '{listen}': another program listens there, perhaps another `mailhost " \
           "serve`" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_bad_outgoing_setting_stops_serve_at_start(home: Path) -> None:
    """A bad [outgoing] value stops serve before it starts (exit 2, one sentence), instead
    of a traceback in every delivery pass of a service that looks healthy."""
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace("max_attempts = 20", "max_attempts = -1"))
    out = run_cli("serve", "--once", cwd=home)
    assert out.returncode == 2, out.stderr
    assert "[outgoing] max_attempts" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_web_admin_serves_on_ipv6(tmh: Mailhost) -> None:
    """[web] listen = "[::1]:PORT" serves the web admin over IPv6."""
    from mailhost.web import start_web

    port = _free_port("::1")
    web = start_web(tmh, f"[::1]:{port}")
    try:
        assert web.address == f"[::1]:{port}"
        with urllib.request.urlopen(f"http://{web.address}/api/plugins", timeout=30) as r:
            assert "testplugin" in {p["name"] for p in json.load(r)}
    finally:
        web.stop()


def test_an_idle_client_does_not_block_the_web_admin(tmh: Mailhost) -> None:
    """A client that sends half a request and waits does not hold up the others; its
    connection is closed after the request timeout."""
    from mailhost.web import start_web

    web = start_web(tmh, f"127.0.0.1:{_free_port()}", request_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", web.server.server_address[1])) as idle:
            idle.sendall(b"GET / HTTP/1.1\r\n")
            with urllib.request.urlopen(f"http://{web.address}/api/plugins", timeout=30) as r:
                assert r.status == 200
            idle.settimeout(60)  # a safety net: the server closes it after its 1 s
            assert idle.recv(1024) == b""
    finally:
        web.stop()


def _get(address: str, path: str, host_header: str) -> tuple[int, bytes]:
    """GET ``path`` from the server at ``address`` with the Host header ``host_header``."""
    import http.client

    name, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(name.strip("[]"), int(port), timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host_header})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_web_answers_head_and_refuses_an_unknown_protocol(tmh: Mailhost) -> None:
    """A monitor's HEAD (curl -I) gets GET's status and headers without the body, where
    it got 405; ?protocol= naming no loaded protocol is a 400 that lists them, as `plugins
    options --protocol` says, not an empty list that reads as "it takes no options"."""
    import http.client

    from mailhost.web import start_web

    web = start_web(tmh, f"127.0.0.1:{_free_port()}")
    try:
        name, _, port = web.address.rpartition(":")
        for path, status in (("/api/incoming", 200), ("/queue/incoming", 200), ("/nope", 404)):
            conn = http.client.HTTPConnection(name, int(port), timeout=30)
            try:
                conn.request("HEAD", path)
                response = conn.getresponse()
                assert (response.status, response.read()) == (status, b""), path
            finally:
                conn.close()
        status, body = _get(web.address, "/api/plugins/options?protocol=nosuch", "localhost")
        assert status == 400 and "no protocol named 'nosuch' is loaded: choose one of dir" in json.loads(body)["error"]
    finally:
        web.stop()


def test_web_admin_answers_only_its_own_host_names(tmh: Mailhost, tmh_factory) -> None:
    """A request addressed to another name (a DNS-rebinding page) gets 421 and no data;
    localhost, 127.0.0.1, [::1], the listen address and [web] allowed_hosts are answered."""
    from mailhost.web import start_web

    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder="/x", username="u1"))
    port = _free_port()
    web = start_web(tmh, f"127.0.0.1:{port}")
    try:
        status, body = _get(web.address, "/api/incoming", f"attacker.example:{port}")
        assert status == 421 and b"u1" not in body and b"[web] allowed_hosts" in body
        assert _get(web.address, "/", "attacker.example")[0] == 421
        for ok in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}"):
            status, body = _get(web.address, "/api/incoming", ok)
            assert status == 200 and json.loads(body)[0]["username"] == "u1", ok
    finally:
        web.stop()
    config = tmh.config.path
    config.write_text(config.read_text().replace("allowed_hosts = []", 'allowed_hosts = ["Mail.Example.org"]'))
    web = start_web(tmh_factory(tmh), f"127.0.0.1:{port}")
    try:
        assert _get(web.address, "/api/incoming", "mail.example.org")[0] == 200
        assert _get(web.address, "/api/incoming", "attacker.example")[0] == 421
    finally:
        web.stop()
    config.write_text(config.read_text().replace('allowed_hosts = ["Mail.Example.org"]', 'allowed_hosts = "x"'))
    out = run_cli("incoming", "list", cwd=config.parent)
    assert out.returncode == 2 and "[web] allowed_hosts in" in out.stderr and "must be a list" in out.stderr


def test_web_bad_query_is_400_and_a_failure_is_a_short_500(tmh: Mailhost, caplog: pytest.LogCaptureFixture,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """A limit that is not ASCII digits from 1 to 2^31 is 400 with one sentence; an
    unexpected error is 500 with a short body, logged once with secrets redacted, and no
    traceback on stderr."""
    import logging
    import sqlite3

    from mailhost.secrets import forget_secrets, remember_secret
    from mailhost.web import start_web

    web = start_web(tmh, f"127.0.0.1:{_free_port()}")
    try:
        for query in ("queue/incoming?limit=%C2%B2", "log/incoming?limit=99999999999999999999999",
                      "queue/incoming?limit=0", "log/incoming?limit=abc"):
            status, body = _get(web.address, f"/api/{query}", "localhost")
            assert status == 400 and "give a whole number from 1 to 2147483648" in json.loads(body)["error"], query
        assert _get(web.address, "/api/log/incoming?limit=2147483648", "localhost")[0] == 200
        db = sqlite3.connect(tmh.config.sqlite_file)
        db.execute("DROP TABLE incoming_log_entries")
        db.execute("DROP TABLE incoming_log")  # a store broken behind the service's back
        db.close()
        remember_secret("hunter2-secret")
        with caplog.at_level(logging.INFO, logger="mailhost"):
            status, body = _get(web.address, "/api/log/incoming?connection=hunter2-secret", "localhost")
    finally:
        web.stop()
        forget_secrets()
    assert status == 500 and len(body) < 100 and b"incoming_log" not in body
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "OperationalError" in errors[0] and "no such table" in errors[0]
    assert "hunter2-secret" not in errors[0]
    assert "Traceback" not in capfd.readouterr().err


def _wait_for(ready, what: str) -> None:
    """Wait until ``ready()``; the deadline is a safety net, not an assertion on speed."""
    deadline = time.monotonic() + 120
    while not ready():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def test_second_sigterm_exits_at_once_and_a_restart_takes_over(home: Path, plugin_env: dict[str, str],
                                                                tmp_path: Path) -> None:
    """A second SIGTERM ends `serve` at once (status 128+15) even while a pass hangs on
    its server; the first one waits for the passes under way. A `serve` started right
    after polls that connection at once, not when the dead process's lease runs out."""
    import threading

    _set_listen(home, "")
    box = tmp_path / "box"
    box.mkdir()
    (box / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    events = Path(plugin_env["MAILHOST_TESTPLUGIN_EVENTS"])
    env = {**os.environ, **plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "MAILHOST_TESTPLUGIN_HANG_AT": "a.eml"}
    assert run_cli("incoming", "add", "desk", "--protocol", "dir", "--folder", str(box), env=env, cwd=home).returncode == 0
    assert run_cli("incoming", "enable", "desk", "--yes", env=env, cwd=home).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "mailhost", "serve"], cwd=home, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: events.exists() and '"hanging"' in events.read_text(), "the pass reached a.eml")
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: any("finishing the batches under way" in line for line in err), "the first SIGTERM")
        assert proc.poll() is None  # the hanging pass holds it, as the first signal should
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    assert any("second SIGTERM: exiting now" in line for line in err), err
    assert not any("Traceback" in line for line in err), err
    del env["MAILHOST_TESTPLUGIN_HANG_AT"]
    out = run_cli("serve", "--once", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert [r["subject"] for r in json.loads(run_cli("queue", "incoming", "--json", env=env, cwd=home).stdout)] == ["a"]
    passes = json.loads(run_cli("log", "incoming", "--json", env=env, cwd=home).stdout)
    assert [p["status"] for p in passes] == ["ok", "interrupted"]


def test_due_skips_a_connection_leased_by_a_live_worker(tmh: Mailhost, tmp_path: Path) -> None:
    """A lease whose holder runs (this process) keeps its connection out of due()."""
    from mailhost.incoming import LEASE
    from mailhost.leases import worker_id
    from mailhost.store import IncomingConnection, utcnow

    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(tmp_path)))
    tmh.connections.set_enabled("desk", True)
    assert tmh.incoming.due() == ["desk"]
    with tmh.session() as s:
        conn = s.query(IncomingConnection).filter_by(name="desk").one()
        conn.lease_owner, conn.lease_until = worker_id(), utcnow() + LEASE
    assert tmh.incoming.due() == []


def test_web_shows_the_outgoing_queue(tmh: Mailhost) -> None:
    """/api/queue/outgoing lists the outgoing queue in the CLI's JSON shape, filtered by status."""
    from mailhost.web import start_web

    tmh.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="outbox",
                                                           from_address="a@example.org", default=True))
    tmh.outgoing.send(["bob@example.org"], subject="queued one", body="hi")
    web = start_web(tmh, f"127.0.0.1:{_free_port()}")
    try:
        status, body = _get(web.address, "/api/queue/outgoing", "localhost")
        assert status == 200
        rows = json.loads(body)
        assert [(r["subject"], r["status"], r["to"]) for r in rows] == [("queued one", "queued", "bob@example.org")]
        assert json.loads(_get(web.address, "/api/queue/outgoing?status=sent", "localhost")[1]) == []
        assert _get(web.address, "/queue/outgoing", "localhost")[0] == 200
    finally:
        web.stop()


def test_web_shows_connection_options_and_what_protocols_take(tmh: Mailhost, tmp_path: Path) -> None:
    """The connection pages and their REST API show each connection's options (defaults
    filled in, in the CLI's JSON shape, and as the CLI's text shows them: a bool as
    yes/no); /plugins/options lists what each protocol takes, bounds included."""
    from mailhost.web import start_web

    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="in", protocol="dir", folder=str(tmp_path),
                                                           options={"batch_size": "3", "label": "green"}))
    tmh.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="outbox"))
    web = start_web(tmh, f"127.0.0.1:{_free_port()}")
    try:
        [row] = json.loads(_get(web.address, "/api/incoming", "localhost")[1])
        assert row["options"] == {"batch_size": 3, "newest_first": False, "label": "green"}
        assert json.loads(_get(web.address, "/api/outgoing", "localhost")[1])[0]["options"] == {"suffix": ".eml"}
        status, page = _get(web.address, "/incoming", "localhost")
        assert status == 200 and b"<td>batch_size=3, newest_first=no, label=green</td>" in page, page
        rows = json.loads(_get(web.address, "/api/plugins/options?protocol=dir", "localhost")[1])
        assert [(r["protocol"], r["name"]) for r in rows] == [("incoming/dir", "batch_size"),
                                                            ("incoming/dir", "newest_first"),
                                                            ("incoming/dir", "label"), ("outgoing/dir", "suffix")]
        status, page = _get(web.address, "/plugins/options", "localhost")
        assert status == 200 and b"<td>red, green</td>" in page and b"list at most this many messages" in page
        assert b"<th>minimum</th><th>maximum</th>" in page and b"True" not in page and b"False" not in page, page
        assert b"<td>batch_size</td><td>int</td><td>0</td><td>no</td><td>-</td><td>0</td><td>-</td>" in page, page
    finally:
        web.stop()


def test_serve_releases_items_whose_handler_died(home: Path, testplugin: object, tmp_path: Path) -> None:
    """`serve` puts items left ``processing`` longer than ``[incoming]
    processing_timeout_minutes`` back to ``new`` (a visibility timeout, as SQS has); a
    bad value for it is one sentence naming the key."""
    from mailhost.errors import ConfigError
    from mailhost.plugins import PluginHost
    from mailhost.store import IncomingItem, utcnow
    from sqlalchemy import update

    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace("processing_timeout_minutes = 60", "processing_timeout_minutes = 30"))
    host = Mailhost.open(config, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    try:
        box = tmp_path / "box"
        box.mkdir()
        for i in range(2):
            (box / f"{i}.eml").write_bytes(f"Subject: {i}\r\n\r\nx\r\n".encode())
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
        host.incoming.fetch(["desk"])
        stale, fresh = (i.id for i in host.incoming.items())
        for item_id in (stale, fresh):
            host.incoming.set_status(item_id, "processing")
        with host.session() as s:
            s.execute(update(IncomingItem).where(IncomingItem.id == stale)
                      .values(updated_at=utcnow() - dt.timedelta(minutes=31)))
        Service(host).run(once=True)
        assert {i.id: i.status for i in host.incoming.items()} == {stale: "new", fresh: "processing"}
    finally:
        host.close()
    for value in ("-5", '"an hour"'):
        config.write_text(config.read_text().replace("processing_timeout_minutes = 30",
                                                     f"processing_timeout_minutes = {value}"))
        with pytest.raises(ConfigError, match=r"\[incoming\] processing_timeout_minutes in .* must be"):
            Mailhost.open(config)
        config.write_text(config.read_text().replace(f"processing_timeout_minutes = {value}",
                                                     "processing_timeout_minutes = 30"))


def test_serve_says_when_the_config_file_changes_that_a_restart_applies_it(
        tmh: Mailhost, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`plugins enable` (or any edit of the config file) while `serve` runs: it warns once
    that a restart applies it, and goes on; a connection added meanwhile is polled."""
    import logging
    import threading

    box = tmp_path / "box"
    box.mkdir()
    (box / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    service = Service(tmh, tick=0.02)
    runner = threading.Thread(target=service.run)
    caplog.set_level(logging.INFO, logger="mailhost")
    runner.start()
    try:
        time.sleep(0.1)
        assert run_cli("plugins", "disable", "pop3").returncode == 0
        tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
        tmh.connections.set_enabled("desk", True)
        _wait_for(lambda: len(tmh.incoming.items()) == 1, "a.eml stored")
        time.sleep(0.1)
    finally:
        service.stop.set()
        runner.join(timeout=60)
    said = [r.getMessage() for r in caplog.records if "config file" in r.getMessage()]
    assert len(said) == 1 and "restart mailhost serve" in said[0], said
