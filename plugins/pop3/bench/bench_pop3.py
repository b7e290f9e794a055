"""POP3 download speed: mailhost against raw poplib, on a private Dovecot.

Run from the repository root::

    /tmp/venv0/bin/python plugins/pop3/bench/bench_pop3.py [--messages 20000] [--rounds 3] [--ssl]

Delivers N messages of 2-4 KB to a fresh mailbox, then measures (best of ``--rounds``):

- ``poplib``: raw stdlib poplib, USER/PASS then RETR 1..N in a loop, in-process (the limit);
  with ``--ssl``, POP3_SSL on port 995's stand-in with the same verifying context;
- ``session``: this plugin's session, list_new + fetch of every message, in-process;
- ``mailhost fetch``: the whole command (process start to exit, durable commits into a
  fresh SQLite store), with the after-download action ``keep``.

Dovecot runs with pop3_no_flag_updates, so rounds do not change the mailbox.
"""
from __future__ import annotations

import argparse
import os
import poplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from mailhost.protocols import ConnectionSettings, Encryption  # noqa: E402
from mailhost.tls import client_context  # noqa: E402
from mailhost_pop3 import open_session  # noqa: E402
from tests.servers.dovecot import Dovecot, generate_message  # noqa: E402


def raw_poplib(dc: Dovecot, user: str, password: str, n: int, tls: bool) -> float:
    start = time.perf_counter()
    if tls:
        client = poplib.POP3_SSL("localhost", dc.pop3s_port, context=client_context(dc.ca_file))
    else:
        client = poplib.POP3("localhost", dc.pop3_port)
    client.user(user)
    client.pass_(password)
    for i in range(1, n + 1):
        client.retr(i)
    client.quit()
    return time.perf_counter() - start


def session(dc: Dovecot, user: str, password: str, n: int, tls: bool) -> float:
    settings = ConnectionSettings(name="bench", protocol="pop3", host="localhost",
                                  port=dc.pop3s_port if tls else dc.pop3_port, ca_file=dc.ca_file,
                                  encryption=Encryption.SSL if tls else Encryption.NONE,
                                  username=user, password=password)
    start = time.perf_counter()
    with open_session(settings) as s:
        refs = s.list_new(None, lambda keys: set()).refs
        got = sum(1 for _ in s.fetch(refs))
    assert got == n, got
    return time.perf_counter() - start


def whole_fetch(dc: Dovecot, user: str, password: str, n: int, tls: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MAILHOST_CONFIG": f"{tmp}/mailhost.toml", "BENCH_PW": password}
        mh = [sys.executable, "-m", "mailhost"]
        subprocess.run([*mh, "init"], env=env, check=True, capture_output=True)
        subprocess.run([*mh, "incoming", "add", "bench", "--protocol", "pop3", "--host", "localhost",
                        "--port", str(dc.pop3s_port if tls else dc.pop3_port), "--encryption",
                        "ssl" if tls else "none", "--ca-file", dc.ca_file, "--username", user,
                        "--password-env", "BENCH_PW"], env=env, check=True, capture_output=True)
        subprocess.run([*mh, "incoming", "enable", "bench", "--yes"], env=env, check=True, capture_output=True)
        start = time.perf_counter()
        out = subprocess.run([*mh, "fetch", "bench", "--json"], env=env, check=True, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        assert f'"stored": {n}' in out.stdout, out.stdout
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ssl", action="store_true", help="implicit TLS instead of plain text")
    args = parser.parse_args()
    n, tls = args.messages, args.ssl
    with Dovecot() as dc:
        user, password = dc.new_user("bench")
        dc.deliver_many(user, (generate_message(i, 2000 + (i * 37) % 2048) for i in range(n)))
        raw_poplib(dc, user, password, n, tls)  # warm Dovecot's index and the page cache
        limit = min(raw_poplib(dc, user, password, n, tls) for _ in range(args.rounds))
        print(f"raw poplib RETR loop : {n / limit:8.0f} msg/s  ({limit:.2f} s)")
        for name, run in (("session fetch", session), ("mailhost fetch", whole_fetch)):
            best = min(run(dc, user, password, n, tls) for _ in range(args.rounds))
            print(f"{name:<21}: {n / best:8.0f} msg/s  ({best:.2f} s)  {limit / best:.2f} of poplib")


if __name__ == "__main__":
    main()
