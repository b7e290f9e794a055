"""`mailhost serve`: scheduled downloads, isolation of failures, clean shutdown, web admin."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.protocols import Direction
from mailhost.service import Service

from .helpers import run_cli


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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8025"', f'listen = "127.0.0.1:{port}"'))
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
