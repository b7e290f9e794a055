"""The raw stdlib clients that set the limits, each run as its own process by bench/run.

    python bench/clients.py imap-fetch --port P --user U --password W [--tls --ca-file CA] [--mark-seen] [--store DIR]
    python bench/clients.py imap-pipeline --port P --user U --password W [--tls --ca-file CA] --store DIR [--preload M]
    python bench/clients.py imap-poll  --port P --user U --password W
    python bench/clients.py pop3-fetch --port P --user U --password W [--tls --ca-file CA]
    python bench/clients.py smtp-send  --port P --messages N --size BYTES

Each prints one JSON line: ``seconds`` is the time of the protocol work alone, measured
in-process (no interpreter start-up, no connect or login unless the poll needs them),
with the counts it checked. bench/run times the whole process around it and reads its
peak memory, so a row can show both the in-process limit and what a process costs.

Only the standard library is imported here: the limit must not pay for anything else.
(``--preload M``, for the pipeline alone, imports module ``M`` first: what the floor
becomes with a library a real client cannot do without.)
"""
from __future__ import annotations

import argparse
import hashlib
import imaplib
import json
import os
import poplib
import smtplib
import sqlite3
import ssl
import sys
import time


def _context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def imap_fetch(ns: argparse.Namespace) -> dict[str, object]:
    """One ``UID FETCH 1:* (BODY.PEEK[])`` on a selected INBOX: the IMAP limit.

    ``--mark-seen``: then ``UID STORE 1:* +FLAGS.SILENT (\\Seen)``, timed with it: the
    least a download that marks what it took as seen (mailhost's default) costs the server.
    ``--store DIR``: then write every message durably into a new SQLite file there, timed with
    it: the least any tool that keeps mail in SQLite, as mailhost's embedded store does,
    pays for the disk (see ``_store``).
    """
    if ns.tls:
        client = imaplib.IMAP4_SSL(ns.host, ns.port, ssl_context=_context(ns.ca_file))
    else:
        client = imaplib.IMAP4(ns.host, ns.port)
    client.login(ns.user, ns.password)
    client.select("INBOX", readonly=not ns.mark_seen)
    started = time.perf_counter()
    status, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    if ns.mark_seen and status == "OK":
        status, _ = client.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Seen)")
    bodies = [item[1] for item in data if isinstance(item, tuple)]
    stored = _store(ns.store, bodies) if ns.store and status == "OK" else None
    seconds = time.perf_counter() - started
    for leftover in (stored, f"{stored}-wal", f"{stored}-shm") if stored else ():
        if os.path.exists(leftover):
            os.remove(leftover)
    client.logout()
    if status != "OK":
        raise SystemExit(f"UID FETCH failed: {status} {data[:1]}")
    return {"seconds": seconds, "messages": len(bodies), "bytes": sum(len(b) for b in bodies)}


def _store(folder: str, bodies: list[bytes]) -> str:
    """The bare minimum of a durable SQLite store: one row per message (its bytes and a
    SHA-256, as mailhost keeps), with mailhost's settings (WAL, synchronous=FULL, 16 KiB
    pages) and its batch sizes (250 messages, doubling up to 2,000 per commit); no
    indexes, no dedup, no log: a floor, not a rival. Returns the file's path."""
    db, path = _floor_db(folder)
    for batch in _batch_sizes(len(bodies)):
        _commit(db, bodies[batch])
    db.close()
    return path


def _floor_db(folder: str) -> tuple[sqlite3.Connection, str]:
    path = os.path.join(folder, f"floor-{os.getpid()}.db")
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("page_size=16384", "journal_mode=WAL", "synchronous=FULL"):
        db.execute(f"PRAGMA {pragma}")
    db.execute("CREATE TABLE item (id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT, raw BLOB)")
    return db, path


def _batch_sizes(n: int) -> list[slice]:
    """mailhost's batches: 250 messages, doubling up to 2,000."""
    out, start, size = [], 0, 250
    while start < n:
        out.append(slice(start, min(n, start + size)))
        start, size = start + size, min(size * 2, 2000)
    return out


def _commit(db: sqlite3.Connection, bodies: list[bytes]) -> None:
    """One durable transaction of ``bodies``, in multi-row INSERTs (``executemany`` gives
    up the GIL per row, which a second busy thread turns into a switch interval per row)."""
    rows = [(hashlib.sha256(b).hexdigest(), b) for b in bodies]
    db.execute("BEGIN")
    for start in range(0, len(rows), 5000):
        chunk = rows[start:start + 5000]
        db.execute("INSERT INTO item (fingerprint, raw) VALUES " + ", ".join(["(?, ?)"] * len(chunk)),
                   [v for row in chunk for v in row])
    db.execute("COMMIT")


def imap_pipeline(ns: argparse.Namespace) -> dict[str, object]:
    """The least a whole store-then-acknowledge download can do, overlapped as mailhost
    overlaps it: a session thread fetches batch N+1 (``FETCH lo:hi (UID BODY.PEEK[])``)
    while the main thread commits batch N durably (:func:`_commit`), then marks N seen.
    No listing, no dedup, no indexes, no log. Meant to be timed as a whole process
    (interpreter start-up, log in, log out), as ``mailhost fetch`` is; ``seconds`` here is
    from SELECT to the last commit and acknowledgement."""
    from concurrent.futures import ThreadPoolExecutor

    if ns.tls:
        client = imaplib.IMAP4_SSL(ns.host, ns.port, ssl_context=_context(ns.ca_file))
    else:
        client = imaplib.IMAP4(ns.host, ns.port)
    client.login(ns.user, ns.password)
    started = time.perf_counter()
    exists = int(client.select("INBOX")[1][0] or 0)
    db, path = _floor_db(ns.store)

    def fetch(batch: slice) -> list[bytes]:
        status, data = client.fetch(f"{batch.start + 1}:{batch.stop}", "(UID BODY.PEEK[])")
        if status != "OK":
            raise SystemExit(f"FETCH failed: {status} {data[:1]}")
        return [item[1] for item in data if isinstance(item, tuple)]

    def mark_seen(batch: slice) -> None:
        client.store(f"{batch.start + 1}:{batch.stop}", "+FLAGS.SILENT", r"(\Seen)")

    batches, count, size = _batch_sizes(exists), 0, 0
    with ThreadPoolExecutor(max_workers=1) as session:
        ahead = session.submit(fetch, batches[0]) if batches else None
        acks = []
        for i, batch in enumerate(batches):
            assert ahead is not None
            bodies = ahead.result()
            ahead = session.submit(fetch, batches[i + 1]) if i + 1 < len(batches) else None
            _commit(db, bodies)
            count, size = count + len(bodies), size + sum(len(b) for b in bodies)
            acks.append(session.submit(mark_seen, batch))
        for ack in acks:
            ack.result()
    db.close()
    seconds = time.perf_counter() - started
    for leftover in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    client.logout()
    return {"seconds": seconds, "messages": count, "bytes": size}


def imap_poll(ns: argparse.Namespace) -> dict[str, object]:
    """The least a poll can do: connect, log in, SELECT (UIDNEXT says whether anything is new), log out."""
    started = time.perf_counter()
    client = imaplib.IMAP4(ns.host, ns.port)
    client.login(ns.user, ns.password)
    client.select("INBOX", readonly=True)
    uidnext = client.response("UIDNEXT")[1]
    client.logout()
    return {"seconds": time.perf_counter() - started, "messages": 0, "bytes": 0,
            "uidnext": uidnext[0].decode() if uidnext and uidnext[0] else None}


def pop3_fetch(ns: argparse.Namespace) -> dict[str, object]:
    """``RETR 1`` .. ``RETR n`` on one signed-in session: the POP3 limit."""
    if ns.tls:
        client = poplib.POP3_SSL(ns.host, ns.port, context=_context(ns.ca_file))
    else:
        client = poplib.POP3(ns.host, ns.port)
    client.user(ns.user)
    client.pass_(ns.password)
    count = client.stat()[0]
    started = time.perf_counter()
    total = 0
    for i in range(1, count + 1):
        _, _, octets = client.retr(i)
        total += octets
    seconds = time.perf_counter() - started
    client.quit()
    return {"seconds": seconds, "messages": count, "bytes": total}


def smtp_send(ns: argparse.Namespace) -> dict[str, object]:
    """``sendmail`` in a loop on ONE connection: the reference of one Python SMTP client."""
    body = ("Hello,\r\n\r\nthis is a benchmark message.\r\n" + "lorem ipsum dolor sit amet " * 2 + "\r\n") * 200
    head = ("From: Bench <bench@example.org>\r\nTo: sink@example.org\r\nSubject: benchmark\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    raw = (head + body)[: ns.size].encode() + b"\r\n"
    started = time.perf_counter()
    client = smtplib.SMTP(ns.host, ns.port, local_hostname="bench.local")
    client.ehlo()
    for _ in range(ns.messages):
        client.sendmail("bench@example.org", ["sink@example.org"], raw)
    client.quit()
    return {"seconds": time.perf_counter() - started, "messages": ns.messages, "bytes": ns.messages * len(raw)}


ACTIONS = {"imap-fetch": imap_fetch, "imap-pipeline": imap_pipeline, "imap-poll": imap_poll, "pop3-fetch": pop3_fetch, "smtp-send": smtp_send}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=sorted(ACTIONS))
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--tls", action="store_true", help="implicit TLS, verified against --ca-file")
    parser.add_argument("--ca-file")
    parser.add_argument("--mark-seen", action="store_true", help="imap-fetch: then flag everything \\Seen")
    parser.add_argument("--store", metavar="DIR", help="imap-fetch: then store everything in a new SQLite file here; imap-pipeline: "
                             "where its SQLite file goes")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="imap-pipeline: import MODULE before anything else (repeatable)")
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--size", type=int, default=3000)
    ns = parser.parse_args()
    for module in ns.preload:
        __import__(module)
    print(json.dumps(ACTIONS[ns.action](ns)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
