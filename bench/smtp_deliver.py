"""Benchmark: `mailhost deliver` against raw smtplib, to one local SMTP sink, in one run.

    python bench/smtp_deliver.py [--messages 10000] [--sessions 1 4 8 16] [--database URL]

What it does, all on 127.0.0.1:

1. starts the test suite's SMTP sink (aiosmtpd, plain mode) as its own process;
2. raw smtplib: sends N messages over ONE connection (``sendmail`` in a loop): the
   physical reference of one Python SMTP client against this sink; then over as many
   connections as the largest sessions count (threads), the sink's ceiling;
3. for each sessions count: a fresh mailhost installation (SQLite by default), N
   messages queued through the Python API (``Outgoing.send``; timed, but not part of the
   delivery figure), then ``mailhost deliver --sessions S`` run as a subprocess and
   timed whole (interpreter start, plugin loading, claiming, sending, recording);
   every message must end ``sent``.

Prints messages per second and the ratio to raw smtplib. The sink is a single Python
process, so on a small machine it is the ceiling for both.
"""
from __future__ import annotations

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers.smtpd import SmtpServerProcess  # noqa: E402

BODY = "This is a benchmark message.\nIt has a few lines of text, like a notification would.\n" * 8


def raw_smtplib(port: int, n: int, raw: bytes, connections: int = 1) -> float:
    """Seconds to send ``n`` copies of ``raw`` with smtplib over ``connections``
    connections (one thread each): nothing stored, nothing recorded."""

    def run(count: int) -> None:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.local")
        client.ehlo()
        for _ in range(count):
            client.sendmail("bench@example.org", ["sink@example.org"], raw)
        client.quit()

    threads = [threading.Thread(target=run, args=(n // connections + (i < n % connections),))
               for i in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def mailhost_run(port: int, n: int, sessions: int, database: str | None, workdir: Path) -> tuple[float, float, str]:
    """(seconds to queue, seconds for `mailhost deliver`, its summary line)."""
    from mailhost import Mailhost

    home = workdir / f"mh-{sessions}"
    home.mkdir()
    config = home / "mailhost.toml"
    env = {**os.environ, "MAILHOST_CONFIG": str(config)}
    host = Mailhost.init(config, database)
    cli = [sys.executable, "-m", "mailhost", "--config", str(config)]
    subprocess.run([*cli, "outgoing", "add", "sink", "--protocol", "smtp", "--host", "127.0.0.1", "--port", str(port),
                    "--encryption", "none", "--from", "Bench <bench@example.org>", "--default"],
                   check=True, env=env, capture_output=True)
    started = time.perf_counter()
    for i in range(n):
        host.outgoing.send(["sink@example.org"], subject=f"benchmark {i}", body=BODY)
    queued = time.perf_counter() - started
    host.close()
    started = time.perf_counter()
    done = subprocess.run([*cli, "deliver", "--sessions", str(sessions)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mailhost deliver failed: {done.stderr}")
    host = Mailhost.open(config)
    with host.session() as s:
        from mailhost.store import OutgoingItem
        from sqlalchemy import func, select

        counts = dict(s.execute(select(OutgoingItem.status, func.count()).group_by(OutgoingItem.status)).all())
    host.close()
    if counts != {"sent": n}:
        raise SystemExit(f"not every message was sent: {counts}")
    return queued, seconds, done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--database", metavar="URL", help="an EMPTY store per run, '{sessions}' in the URL standing for "
                    "the sessions count, e.g. postgresql+psycopg://postgres@127.0.0.1/mh_bench_{sessions} "
                    "(default: SQLite in a temporary folder)")
    ns = ap.parse_args()
    n = ns.messages
    with tempfile.TemporaryDirectory(prefix="mh-bench-") as tmp, SmtpServerProcess("plain") as sink:
        work = Path(tmp)
        from mailhost.outgoing import Outgoing

        # The same bytes mailhost sends: composed, with the connection's From added.
        raw = (b"From: Bench <bench@example.org>\r\nTo: sink@example.org\r\nSubject: benchmark\r\n"
               b"Content-Type: text/plain; charset=\"utf-8\"\r\nMIME-Version: 1.0\r\n\r\n"
               + BODY.replace("\n", "\r\n").encode())
        _ = Outgoing  # imported to fail early when mailhost is not installed
        raw_s = raw_smtplib(sink.port, n, raw)
        print(f"messages: {n}, {len(raw)} bytes each; sink: aiosmtpd (plain) on 127.0.0.1:{sink.port}")
        print(f"{'raw smtplib, 1 connection':<38} {n / raw_s:8.0f} msg/s  ({raw_s:.2f} s)")
        wide = max(ns.sessions)
        if wide > 1:
            wide_s = raw_smtplib(sink.port, n, raw, wide)
            print(f"{f'raw smtplib, {wide} connections':<38} {n / wide_s:8.0f} msg/s  ({wide_s:.2f} s; the sink's "
                  "ceiling here)")
        for sessions in ns.sessions:
            url = ns.database.replace("{sessions}", str(sessions)) if ns.database else None
            queued, seconds, line = mailhost_run(sink.port, n, sessions, url, work)
            rate = n / seconds
            print(f"{f'mailhost deliver --sessions {sessions}':<38} {rate:8.0f} msg/s  ({seconds:.2f} s, "
                  f"{rate / (n / raw_s):.2f}x raw smtplib; queued in {queued:.1f} s)   [{line}]")


if __name__ == "__main__":
    main()
