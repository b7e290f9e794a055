"""How the Graph session should talk to Graph: measured against the local stand-in.

    cd /work/main && python plugins/graph/bench/fetch.py [--messages 400] [--listing 5000]

The stand-in runs in process; ``--rtt`` adds a network round trip to every HTTP request
and ``--service`` the mailbox server's work to every request it serves (the requests of
a ``$batch`` four at a time, as Graph dispatches them). Best of ``--repeat`` runs, each
variant in turn:

- downloading raw MIME: one ``GET .../$value`` at a time; four at a time (what the
  plugin does, Outlook's concurrency limit per mailbox); ``$batch`` of 20;
- marking read: one ``PATCH`` at a time; four at a time; ``$batch`` of 20 (the plugin);
- listing a big folder by delta query with ``Prefer: odata.maxpagesize`` 10 (Graph's
  default), 100, 500 (the plugin), 1000.

Every download is checked byte for byte.
"""
from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from mailhost.protocols import ConnectionSettings
from mailhost_graph import incoming
from mailhost_graph.incoming import open_incoming

from bench.timing import best_of
from tests.servers.certs import make_pki
from tests.servers.graph import GraphServer

USER = "bench@contoso.com"


def message(i: int, size: int) -> bytes:
    head = f"From: s{i}@example.org\r\nTo: {USER}\r\nSubject: bench {i}\r\nMessage-ID: <b{i}@x>\r\n\r\n".encode()
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--listing", type=int, default=5000)
    parser.add_argument("--rtt", type=float, default=0.020, help="seconds per HTTP request (default 0.020)")
    parser.add_argument("--service", type=float, default=0.010, help="seconds per request served (default 0.010)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    pki = make_pki(tempfile.mkdtemp(prefix="graph-bench-"))
    with GraphServer(pki, latency=args.rtt, service_time=args.service, max_page_size=1000) as graph:
        graph.add_user(USER)
        raws = [message(i, args.size) for i in range(args.messages)]
        graph.deliver_many(USER, raws)
        token = graph.issue_token(USER)
        settings = ConnectionSettings(name="bench", protocol="graph", host="127.0.0.1", port=graph.port,
                                      username=USER, ca_file=graph.ca_file, timeout=30, access_token=lambda: token)
        print(f"{args.messages} messages of {args.size} bytes; round trip {args.rtt * 1000:g} ms, "
              f"server work {args.service * 1000:g} ms per request\n")
        with open_incoming(settings) as s:
            refs = s.list_new(None, lambda keys: set())
            refs = refs.refs
            client = s.client
            paths = [f"{s.prefix}/messages/{r.key}" for r in refs]

            def sequential_get() -> None:
                got = [client.request("GET", p + "/$value", doing="bench").content for p in paths]
                assert got == raws

            def parallel_get() -> None:
                assert [raw for _, raw in s.fetch(refs)] == raws

            def batch_get() -> None:
                got: list[bytes] = []
                for start in range(0, len(paths), 20):
                    chunk = [{"id": str(i), "method": "GET", "url": p + "/$value"}
                             for i, p in enumerate(paths[start:start + 20])]
                    answers = client.batch(chunk, "bench")
                    got += [base64.b64decode(answers[str(i)]["body"]) for i in range(len(chunk))]
                assert got == raws

            report("download raw MIME", args.messages, best_of(args.repeat, {
                "GET $value, one at a time": sequential_get,
                "GET $value, 4 at a time (plugin)": parallel_get,
                "$batch of 20 GET $value": batch_get,
            }))

            def sequential_patch() -> None:
                for p in paths:
                    client.call("PATCH", p, doing="bench", json_body={"isRead": True})

            def parallel_patch() -> None:
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda p: client.call("PATCH", p, doing="bench", json_body={"isRead": True}), paths))

            report("mark read", args.messages, best_of(args.repeat, {
                "PATCH, one at a time": sequential_patch,
                "PATCH, 4 at a time": parallel_patch,
                "$batch of 20 PATCH (plugin)": lambda: s.mark_seen(refs),
            }))

        graph.deliver_many(USER, [message(10_000 + i, 600) for i in range(args.listing - args.messages)])
        variants = {}
        for size in (10, 100, 500, 1000):
            def listing(size: int = size) -> None:
                incoming.PAGE_SIZE = size
                with open_incoming(settings) as s2:
                    assert len(s2.list_new(None, lambda keys: set()).refs) == args.listing
            variants[f"delta, maxpagesize {size}" + (" (plugin)" if size == 500 else "")] = listing
        report(f"list {args.listing} messages (delta query)", args.listing, best_of(args.repeat, variants))
        incoming.PAGE_SIZE = 500


def report(title: str, count: int, results: dict[str, float]) -> None:
    print(title)
    for name, seconds in results.items():
        print(f"  {name:<40} {seconds:8.2f} s  {count / seconds:9.0f} messages/s")
    print()


if __name__ == "__main__":
    main()
