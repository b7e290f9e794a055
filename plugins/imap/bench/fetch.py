"""The IMAP session's download speed against raw imaplib, on a private Dovecot.

    cd /work/main && python plugins/imap/bench/fetch.py [--messages 20000] [--batch 500]

Delivers N messages of 2-4 KB into a fresh Dovecot mailbox, then measures (best of
``--repeat`` runs, in-process, no store):

- the limit: stdlib imaplib, one ``UID FETCH 1:* (BODY.PEEK[])`` (that command alone,
  and with connect, login, select and logout);
- imapclient's own ``fetch`` parser on the same response;
- this plugin: ``list_new`` + ``fetch`` in batches, as the host calls them;
- a poll with nothing new, on N messages and on 100 (open, list_new, close).

Plain and TLS links both; every downloaded message is checked byte for byte.
"""
from __future__ import annotations

import argparse
import imaplib
import random
import ssl
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from imapclient.response_parser import parse_fetch_response
from mailhost.protocols import ConnectionSettings, Encryption

from bench.timing import best_of
from tests.servers.dovecot import Dovecot, generate_message

from mailhost_imap import PROVIDER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)  # the host's BATCH_COUNT
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.messages
    with Dovecot() as dc:
        rnd = random.Random(1)
        user, password = dc.new_user("bench")
        dc.deliver_many(user, (generate_message(i, rnd.randint(2000, 4000)) for i in range(n)))
        small, small_pw = dc.new_user("small")
        dc.deliver_many(small, (generate_message(i) for i in range(100)))
        expected = dc.maildir_messages(user)

        def settings(encryption: Encryption, who: str = user, pw: str = password) -> ConnectionSettings:
            port = dc.imaps_port if encryption is Encryption.SSL else dc.imap_port
            return ConnectionSettings(
                name="bench", protocol="imap", host="127.0.0.1", port=port, encryption=encryption,
                username=who, password=pw, ca_file=dc.ca_file, timeout=60,
            )

        def raw(tls: bool, parse: bool = False) -> Callable[[], None]:
            def run() -> None:
                if tls:
                    context = ssl.create_default_context(cafile=dc.ca_file)
                    m = imaplib.IMAP4_SSL(dc.host, dc.imaps_port, ssl_context=context)
                else:
                    m = imaplib.IMAP4(dc.host, dc.imap_port)
                m.login(user, password)
                m.select("INBOX")
                start = time.perf_counter()
                _, data = m.uid("FETCH", "1:*", "(BODY.PEEK[])")
                assert sum(1 for d in data if isinstance(d, tuple)) == n
                if parse:
                    assert len(parse_fetch_response(data, True, True)) == n
                fetch_only[(tls, parse)].append(time.perf_counter() - start)
                m.logout()

            return run

        def plugin(encryption: Encryption) -> Callable[[], None]:
            def run() -> None:
                with PROVIDER.open(settings(encryption)) as session:
                    start = time.perf_counter()
                    refs = session.list_new(None, lambda keys: set()).refs
                    listed = time.perf_counter()
                    got = []
                    for i in range(0, len(refs), args.batch):
                        got.extend(raw for _, raw in session.fetch(refs[i : i + args.batch]))
                    phases[encryption].append((listed - start, time.perf_counter() - listed))
                assert got == expected, "downloaded bytes differ from the Maildir files"

            return run

        fetch_only: dict[tuple[bool, bool], list[float]] = defaultdict(list)
        phases: dict[Encryption, list[tuple[float, float]]] = defaultdict(list)
        raw(False)()  # warm Dovecot's index and cache
        timed = best_of(args.repeat, {
            "raw": raw(False), "raw tls": raw(True),
            "parsed": raw(False, True), "parsed tls": raw(True, True),
            "plugin": plugin(Encryption.NONE), "plugin tls": plugin(Encryption.SSL),
        })
        limit = {False: min(fetch_only[(False, False)]), True: min(fetch_only[(True, False)])}
        rows = [
            ("imaplib, one UID FETCH 1:* (the limit: the FETCH alone)", limit[False], limit[True]),
            ("imaplib, connect, login, select, UID FETCH 1:*, logout", timed["raw"], timed["raw tls"]),
            ("imaplib + imapclient's FETCH parser (the FETCH alone)",
             min(fetch_only[(False, True)]), min(fetch_only[(True, True)])),
            (f"mailhost-imap: open, list_new, fetch x{args.batch}, close", timed["plugin"], timed["plugin tls"]),
            ("mailhost-imap: list_new alone",
             min(p[0] for p in phases[Encryption.NONE]), min(p[0] for p in phases[Encryption.SSL])),
            (f"mailhost-imap: fetch x{args.batch} alone",
             min(p[1] for p in phases[Encryption.NONE]), min(p[1] for p in phases[Encryption.SSL])),
        ]
        print(f"{n} messages of 2-4 KB, Python {sys.version.split()[0]}, best of {args.repeat}")
        print(f"{'':58} {'plain':>15} {'TLS':>16}")
        for label, plain, tls in rows:
            print(f"{label:58} {n / plain:9,.0f} msg/s {n / tls:9,.0f} msg/s"
                  f"   speed vs the limit: {limit[False] / plain:.2f} / {limit[True] / tls:.2f}")

        def poll(who: str, pw: str) -> Callable[[], None]:
            conn = settings(Encryption.NONE, who, pw)
            with PROVIDER.open(conn) as session:
                cursor = session.list_new(None, lambda keys: set()).cursor

            def run() -> None:
                with PROVIDER.open(conn) as session:
                    assert not session.list_new(cursor, lambda keys: set()).refs

            return run

        polls = {"big": poll(user, password), "small": poll(small, small_pw)}
        medians = {name: [] for name in polls}
        for _ in range(30):  # in turns, so that load on the machine hits both alike
            for name, run in polls.items():
                start = time.perf_counter()
                run()
                medians[name].append(time.perf_counter() - start)
        big, little = (statistics.median(medians[name]) for name in ("big", "small"))
        print(f"poll with nothing new (open, list_new, close; median of 30): "
              f"{big * 1000:.2f} ms on {n}, {little * 1000:.2f} ms on 100 ({big / little:.2f}x)")


if __name__ == "__main__":
    main()
