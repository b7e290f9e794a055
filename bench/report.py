"""Tables, goals and plots from bench/run's results.json.

    python bench/report.py bench/out/results.json [--out DIR] [--publish]

bench/run calls :func:`write` at the end of a run; run this file by hand to redraw from
a saved results.json (``--publish`` writes bench/RESULTS.md and bench/plots/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MB = 1_000_000  # MB/s and memory: decimal megabytes

TITLES = {
    "imap-plain": "IMAP full download, plain",
    "imap-tls": "IMAP full download, TLS",
    "pop3-plain": "POP3 full download, plain",
    "pop3-tls": "POP3 full download, TLS",
    "smtp": "SMTP delivery of queued messages",
}


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------


def median(row: dict[str, Any], key: str = "seconds") -> float | None:
    values = [s[key] for s in row["samples"]]
    return statistics.median(values) if values else None


def spread(row: dict[str, Any], key: str = "seconds") -> tuple[float, float] | None:
    values = [s[key] for s in row["samples"]]
    return (min(values), max(values)) if values else None


def peak_mb(row: dict[str, Any]) -> float | None:
    values = [s["rss_kb"] for s in row["samples"]]
    return max(values) * 1024 / MB if values else None


def cpu_s(row: dict[str, Any], key: str = "cpu") -> float | None:
    """Median CPU seconds (user + system) of the tool's whole process (``server_cpu``:
    of the server meanwhile), where recorded."""
    values = [s[key] for s in row["samples"] if s.get(key) is not None]
    return statistics.median(values) if values else None


def expand(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two derived rows: the limit's own process timed whole, and mailhost's pass
    without its start-up (the seconds its --json report gives), each after its source."""
    out: list[dict[str, Any]] = []
    for row in rows:
        out.append(row)
        if row["kind"] == "limit" and row["samples"]:
            name = row["label"].split(":")[0]
            out.append({**row, "label": f"{name}: the same, whole process (start, log in, ..., exit)",
                        "kind": "reference", "note": "the interpreter, connect and log in included",
                        "samples": [{**s, "seconds": s["wall"]} for s in row["samples"]]})
        if row["kind"] == "mailhost" and row["samples"] and all(s.get("inner") for s in row["samples"]):
            out.append({**row, "label": f"{row['label']}: the pass alone, without start-up",
                        "kind": "variant", "note": "the seconds in its --json report",
                        "samples": [{**s, "seconds": s["inner"], "cpu": None, "server_cpu": None}
                                    for s in row["samples"]]})
    return out


def rate(row: dict[str, Any]) -> float | None:
    """Messages per second at the median time."""
    t = median(row)
    n = median(row, "messages")
    return n / t if t and n else None


def byte_rate(row: dict[str, Any]) -> float | None:
    t = median(row)
    b = median(row, "bytes")
    return b / t if t and b else None


def find(rows: list[dict[str, Any]], kind: str, contains: str = "") -> dict[str, Any] | None:
    for row in rows:
        if row["kind"] == kind and contains in row["label"] and row["samples"]:
            return row
    return None


def mailhost_ref(name: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    if name == "smtp":
        return find(rows, "mailhost", "--sessions 4") or find(rows, "mailhost")
    return find(rows, "mailhost")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.0f}"


def times(r: float) -> str:
    """A ratio as "N×", with the digits it deserves."""
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def seconds_cell(row: dict[str, Any]) -> str:
    t, sp = median(row), spread(row)
    if t is None or sp is None:
        return "–"
    digits = 3 if t < 1 else 2 if t < 10 else 1
    return f"{t:.{digits}f} ({sp[0]:.{digits}f}–{sp[1]:.{digits}f})"


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------

HOW = """## How each tool runs

- **mailhost**: the `mailhost` console script with a fresh installation per download round (config, key
  and SQLite store copied from a template made with `mailhost init`, `incoming add` and `incoming enable`),
  SQLite in WAL mode with `synchronous=FULL`, so every batch is on disk before the server is told
  anything. Over IMAP it also marks every stored message seen (its default after-download action: one
  `UID STORE` per batch, which makes Dovecot rename the message files); the peers below do not mark
  anything, so bench/run clears the flags again before and after each mailhost round (untimed). Over
  POP3 it keeps the mail on the server (its default). `mailhost deliver` runs on a store with the
  messages queued beforehand through the Python API (untimed) and records every outcome.
- **mbsync** (isync): `Sync Pull`, `Create Near`, `SyncState *`, isync's defaults otherwise (`FSync yes`),
  into a fresh Maildir per round.
- **getmail6**: `Simple{IMAP,POP3}[SSL]Retriever`, Maildir destination, `read_all = false`, a fresh
  getmail directory per round; run as `nobody` when bench/run runs as root (getmail refuses to deliver
  as root). getmail 6.18 loses a SIGCHLD now and then (the delivery child exits before the handler is
  installed; getmail6 issues #52 and #226) and then waits 180 s and aborts; bench/run starts it through
  `bench/peers.py`, which reaps that child with `waitpid(WNOHANG)` and changes nothing else.
- **offlineimap3**: one-shot (`-o`), `readonly = True` on the server, `folderfilter` INBOX only, its
  defaults otherwise, a fresh metadata folder and Maildir per round.
- **smtp-source** (Postfix): `-d` (many messages per connection), `-l` the same message size, against
  Postfix's `smtp-sink`; both run from Debian's postfix package unpacked with `dpkg -x` when they are not
  installed, so no mail server is ever installed or started.
- Polls reuse the state of the last download round (or make one, untimed) and then poll again and again.
- Every tool is its own process. Peak memory is its `ru_maxrss`; GNU time sits in between when it is
  installed, because on Linux a child's `ru_maxrss` otherwise starts at its parent's peak.
- CPU s: the user + system seconds of the tool's whole process (from `wait4()`), and of the server
  (Dovecot's processes, or the SMTP sink) during the same round, from `/proc`. Their sum over the
  machine's cores is the least time the round can take, however well the work overlaps.
"""


def throughput_table(name: str, scenario: dict[str, Any]) -> list[str]:
    rows = expand(scenario["rows"])
    limit = find(rows, "limit")
    ref = mailhost_ref(name, rows)
    lr, mr = (rate(limit) if limit else None), (rate(ref) if ref else None)
    limit_name = "smtplib" if name == "smtp" else "limit"
    lines = [f"| tool | msg/s | MB/s | ÷ {limit_name} | ÷ mailhost | seconds: median (min–max) | "
             "CPU s: tool (whole process) | CPU s: server | peak memory MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["error"] and not row["samples"]:
            lines.append(f"| {row['label']} | failed: {row['error'][:200]} | | | | | | | |")
            continue
        r = rate(row)
        label = f"**{row['label']}**" if row["kind"] in ("mailhost", "variant") else row["label"]
        lines.append(f"| {label} | {fmt(r)} | {fmt((byte_rate(row) or 0) / MB, 1)} | {ratio(r, lr)} | "
                     f"{ratio(r, mr)} | {seconds_cell(row)} | {fmt(cpu_s(row), 2)} | {fmt(cpu_s(row, 'server_cpu'), 2)} | "
                     f"{fmt(peak_mb(row))} |")
    lines.append("")
    notes = [f"- {row['label']}: {row['note']}" for row in scenario["rows"] if row.get("note")]
    return lines + notes


def poll_table(scenario: dict[str, Any]) -> list[str]:
    n = scenario["messages"]
    small = {r["label"]: r for r in expand(scenario.get("small", []))}
    big = {r["label"]: r for r in expand(scenario.get("big", []))}
    lines = [f"| tool | ms on 100 messages | ms on {n:,} | {n:,} ÷ 100 | peak memory MB (on {n:,}) |",
             "|---|---:|---:|---:|---:|"]
    for label in dict.fromkeys([*small, *big]):
        s, b = small.get(label), big.get(label)
        ms = (median(s) * 1000 if s and s["samples"] else None), (median(b) * 1000 if b and b["samples"] else None)
        shown = f"**{label}**" if (s or b or {}).get("kind") in ("mailhost", "variant") else label
        errors = [r["error"] for r in (s, b) if r and r.get("error")]
        if errors and None in ms:
            lines.append(f"| {shown} | failed: {errors[0][:200]} | | | |")
            continue
        lines.append(f"| {shown} | {fmt(ms[0], 1)} | {fmt(ms[1], 1)} | {ratio(ms[1], ms[0])} | "
                     f"{fmt(peak_mb(b) if b else None)} |")
    return lines + [""]


def startup_table(scenario: dict[str, Any]) -> list[str]:
    rows = scenario["rows"]
    base = next((r for r in rows if r["label"] == "python -c pass" and r["samples"]), None)
    lines = ["| command | ms: median (min–max) | ÷ python -c pass | peak memory MB |", "|---|---:|---:|---:|"]
    for row in rows:
        if not row["samples"]:
            lines.append(f"| `{row['label']}` | failed: {row['error']} | | |")
            continue
        t, sp = median(row), spread(row)
        assert t is not None and sp is not None
        lines.append(f"| `{row['label']}` | {t * 1000:.0f} ({sp[0] * 1000:.0f}–{sp[1] * 1000:.0f}) | "
                     f"{ratio(t, median(base) if base else None)} | {fmt(peak_mb(row))} |")
    return lines + [""]


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each goal the issues set."""
    sc = results["scenarios"]
    out: list[tuple[str, str, bool | None]] = []
    for name in ("imap-plain", "imap-tls"):
        if name not in sc:
            continue
        rows = sc[name]["rows"]
        limit, mh, mb = find(rows, "limit"), find(rows, "mailhost"), find(rows, "peer", "mbsync")
        link = "plain" if name.endswith("plain") else "TLS"
        if limit and mh:
            r = rate(mh) / rate(limit)  # type: ignore[operator]
            out.append((f"IMAP {link}: mailhost fetch ≥ 0.35 of the limit (issue 3)", f"{r:.2f}", r >= 0.35))
            out.append((f"IMAP {link}: mailhost fetch ≥ 0.5 of the limit (issue 9)", f"{r:.2f}", r >= 0.5))
        if mb and mh:
            r = rate(mh) / rate(mb)  # type: ignore[operator]
            out.append((f"IMAP {link}: mailhost fetch ≥ 10× mbsync", f"{r:.1f}×", r >= 10))
    if "imap-poll" in sc:
        s, b = find(sc["imap-poll"].get("small", []), "mailhost"), find(sc["imap-poll"].get("big", []), "mailhost")
        if s and b:
            r = median(b) / median(s)  # type: ignore[operator]
            out.append((f"IMAP poll, nothing new: {sc['imap-poll']['messages']:,} messages within 1.5× of 100",
                        f"{r:.2f}×", r <= 1.5))
    for name in ("pop3-plain", "pop3-tls"):
        if name in sc:
            rows = sc[name]["rows"]
            limit, mh = find(rows, "limit"), find(rows, "mailhost")
            if limit and mh:
                r = rate(mh) / rate(limit)  # type: ignore[operator]
                link = "plain" if name.endswith("plain") else "TLS"
                out.append((f"POP3 {link}: mailhost fetch ≥ 0.5 of raw poplib (issue 4)", f"{r:.2f}", r >= 0.5))
    if "smtp" in sc:
        rows = sc["smtp"]["rows"]
        best = max((r for r in rows if r["kind"] == "mailhost" and r["samples"] and "--sessions 1" not in r["label"]),
                   key=lambda r: rate(r) or 0, default=None)
        if best:
            r = rate(best) or 0
            out.append(("SMTP: mailhost deliver ≥ 1,500 msg/s with parallel sessions (issue 5; absolute, "
                        "this machine)", f"{r:,.0f} msg/s ({best['label'].split('deliver ')[1]})", r >= 1500))
    return out


def storage_floor(results: dict[str, Any]) -> list[str]:
    """What the disk alone allows: the IMAP rows' SQLite reference against the limit and mailhost."""
    out: list[str] = []
    for name in ("imap-plain", "imap-tls"):
        rows = results["scenarios"].get(name, {}).get("rows", [])
        limit, mh, floor = find(rows, "limit"), find(rows, "mailhost"), find(rows, "reference", "SQLite")
        pipeline = find(rows, "reference", "pipeline: each batch")
        stacked = find(rows, "reference", "ORM imported first")
        if limit and mh and floor and rate(floor) and rate(limit):
            out.append(f"- {name}: raw imaplib that marks everything seen and then writes each message durably "
                       f"into SQLite, nothing more, runs at {rate(floor) / rate(limit):.2f} of the limit "  # type: ignore[operator]
                       f"(in-process, no start-up); `mailhost fetch` runs at "
                       f"{rate(mh) / rate(floor):.2f} of that (whole process).")  # type: ignore[operator]
        if limit and mh and pipeline and rate(pipeline) and rate(limit):
            out.append(f"- {name}: the same work as a whole process overlapped as mailhost overlaps it (the "
                       f"imaplib pipeline row) runs at {rate(pipeline) / rate(limit):.2f} of the limit; "  # type: ignore[operator]
                       f"`mailhost fetch` at {rate(mh) / rate(pipeline):.2f} of that.")  # type: ignore[operator]
        if limit and mh and stacked and rate(stacked) and rate(limit):
            out.append(f"- {name}: that pipeline after importing SQLAlchemy's ORM, which mailhost's store is built on, "
                       f"runs at {rate(stacked) / rate(limit):.2f} of the limit: the most any client on that "  # type: ignore[operator]
                       f"library can reach here; `mailhost fetch` runs at {rate(mh) / rate(stacked):.2f} of that.")  # type: ignore[operator]
    return ["", *out] if out else []


def summary(results: dict[str, Any]) -> str:
    """A short paragraph for the README: ratios, which travel between machines."""
    sc, meta = results["scenarios"], results["meta"]
    parts: list[str] = []
    if "imap-plain" in sc:
        rows = sc["imap-plain"]["rows"]
        limit, mh = find(rows, "limit"), find(rows, "mailhost")
        if limit and mh:
            peers_text = []
            for label in ("mbsync", "getmail6", "offlineimap3"):
                p = find(rows, "peer", label)
                if p:
                    peers_text.append(f"{times(rate(mh) / rate(p))} {label}")  # type: ignore[operator]
            tls = ""
            if "imap-tls" in sc:
                tl, tm = find(sc["imap-tls"]["rows"], "limit"), find(sc["imap-tls"]["rows"], "mailhost")
                if tl and tm:
                    tls = f" ({rate(tm) / rate(tl):.2f} over TLS)"  # type: ignore[operator]
            parts.append(
                f"A whole `mailhost fetch` of {meta['messages']:,} IMAP messages of 2–4 KB (process start to exit, "
                f"every batch committed durably to SQLite) runs at {rate(mh) / rate(limit):.2f} of what raw "
                f"imaplib reaches with one in-process `UID FETCH 1:*`{tls}"
                + (f", {', '.join(peers_text)}" if peers_text else "") + ".")
    if "imap-poll" in sc:
        s, b = find(sc["imap-poll"].get("small", []), "mailhost"), find(sc["imap-poll"].get("big", []), "mailhost")
        if s and b:
            parts.append(f"A poll with nothing new takes {median(b) * 1000:.0f} ms on {sc['imap-poll']['messages']:,} "
                         f"messages and {median(s) * 1000:.0f} ms on 100, most of it interpreter and plugin start-up.")
    if "pop3-plain" in sc:
        rows = sc["pop3-plain"]["rows"]
        limit, mh = find(rows, "limit"), find(rows, "mailhost")
        if limit and mh:
            gm = find(rows, "peer", "getmail6")
            parts.append(f"POP3 runs at {rate(mh) / rate(limit):.2f} of raw poplib"  # type: ignore[operator]
                         + (f" ({times(rate(mh) / rate(gm))} getmail6)" if gm else "") + ".")  # type: ignore[operator]
    if "smtp" in sc:
        rows = sc["smtp"]["rows"]
        ref = find(rows, "limit")
        best = max((r for r in rows if r["kind"] == "mailhost" and r["samples"]), key=lambda r: rate(r) or 0,
                   default=None)
        if best and ref:
            parts.append(f"`{best['label']}` sends {rate(best):,.0f} messages/s to a local sink, recording each "
                         f"one durably: {rate(best) / rate(ref):.2f} of a bare in-process smtplib loop on one "  # type: ignore[operator]
                         "connection.")
    parts.append("Absolute figures depend on the machine (these: "
                 f"{meta.get('cores')} cores, {meta.get('cpu') or 'unknown CPU'}); the ratios are what to compare.")
    return " ".join(parts)


def markdown(results: dict[str, Any], plots_prefix: str, plots: list[str]) -> str:
    meta, sc = results["meta"], results["scenarios"]
    n = meta["messages"]
    lines = [
        "# mailhost benchmarks",
        "",
        f"Generated by `bench/run{' ' + ' '.join(meta.get('argv', [])) if meta.get('argv') else ''}` on "
        f"{meta.get('started', '?')}, in {meta.get('duration_s', 0) // 60} min. **Absolute figures depend on the "
        "machine, its disk and its load: compare the ratios.** Every figure is the median of "
        f"{meta['rounds']} rounds ({meta['poll_rounds']} for polls), the tools taking turns round by round, "
        "each tool a process of its own with fresh state (a new store, Maildir or state folder) for every "
        "download. `÷ limit` is the tool's rate divided by the limit's, `÷ mailhost` by mailhost's.",
        "",
        f"- Machine: {meta.get('cpu') or '?'}, {meta.get('cores')} cores, {meta.get('memory')}, "
        f"{meta.get('os')}, Linux {meta.get('kernel')}; load average {fmt_load(meta.get('load_before'))} at the "
        f"start, {fmt_load(meta.get('load_after'))} at the end (the machine was shared).",
        f"- Software: Python {meta.get('python')}, mailhost {meta.get('mailhost')} at {meta.get('commit')}, "
        f"{meta.get('dovecot') and 'Dovecot ' + meta['dovecot']}; "
        + ", ".join(v if k.split("-")[0] in v.lower() else f"{k} {v}" for k, v in meta.get("peers", {}).items()) + ".",
    ]
    if meta.get("mailbox_bytes"):
        lines.append(f"- Mailbox: {n:,} generated messages of 2–4 KB ({meta['mailbox_bytes'] / MB:.1f} MB) in a "
                     "private Dovecot on 127.0.0.1 (Maildir), plus one of 100 for polls. TLS: implicit TLS with a "
                     "private CA, verified by every client.")
    if meta.get("memory_method"):
        lines.append(f"- Peak memory: {meta['memory_method']}.")
    for binary, why in meta.get("missing", {}).items():
        lines.append(f"- Not measured: {binary}: {why}")
    if meta.get("quick"):
        lines += ["", "> A `--quick` run: a small mailbox, so start-up weighs more than in a full run."]
    lines.append("")

    g = goals(results)
    if g:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---:|:---:|"]
        lines += [f"| {goal} | {measured} | {'yes' if met else 'no'} |" for goal, measured, met in g]
        lines += storage_floor(results)
        lines.append("")

    def plot(name: str) -> list[str]:
        return [f"![{name}]({plots_prefix}{name}.png)", ""] if name in plots else []

    for name in ("imap-plain", "imap-tls"):
        if name in sc:
            lines += [f"## {TITLES[name]}", "",
                      f"{n:,} messages; the limit is stdlib imaplib's one `UID FETCH 1:* (BODY.PEEK[])` timed "
                      "in-process, the rest are whole processes that store what they download.", ""]
            lines += throughput_table(name, sc[name]) + [""]
            if name == "imap-tls":
                lines += plot("imap_download")
    if "imap-poll" in sc:
        lines += ["## IMAP poll with nothing new", "",
                  "Everything is already downloaded; each tool checks for new mail once (plain IMAP). The limit "
                  "logs in, SELECTs (UIDNEXT tells whether anything is new) and logs out, timed in-process.", ""]
        lines += poll_table(sc["imap-poll"]) + plot("imap_poll")
    for name in ("pop3-plain", "pop3-tls"):
        if name in sc:
            lines += [f"## {TITLES[name]}", "",
                      f"{n:,} messages; the limit is stdlib poplib's `RETR` loop on one session, timed in-process."
                      + (" getmail6 is measured over plain POP3 only (it is the slowest tool here)."
                         if name == "pop3-tls" else ""), ""]
            lines += throughput_table(name, sc[name]) + [""]
            if name == "pop3-tls" or "pop3-tls" not in sc:
                lines += plot("pop3_download")
    if "smtp" in sc:
        s = sc["smtp"]
        lines += [f"## {TITLES['smtp']}", "",
                  f"{s['messages']:,} messages of about {s['message_bytes']:,} bytes to {s.get('sink')} on 127.0.0.1. "
                  "The reference is stdlib smtplib sending in a loop on one connection, timed in-process; "
                  "`mailhost deliver` runs as a whole process on a store with the messages already queued "
                  "(queued beforehand, untimed) and records every outcome; smtp-source is Postfix's C load "
                  "generator (`-d`: many messages per connection).", ""]
        lines += throughput_table("smtp", s) + [""] + plot("smtp_delivery")
    if "startup" in sc:
        lines += ["## Start-up", "", "The whole process, spawn to exit.", ""]
        lines += startup_table(sc["startup"])
    lines += plot("peak_memory")
    if meta.get("profiles"):
        lines += ["## Where mailhost spends its time", "",
                  "Sampled wall-clock profiles (py-spy, waiting included) of one whole run of each command on the "
                  "same installation; `bench/run --profile` writes them in full, with cProfile's view, to "
                  "`OUT/profile/`.", ""]
        for name, prof in meta["profiles"].items():
            prof = prof if isinstance(prof, dict) else {"file": prof}
            if prof.get("top"):
                lines += [f"`{prof['title']}`", "", "```", prof["top"].rstrip(), "```", ""]
            else:
                lines += [f"- `{name}`: {prof.get('file')}", ""]
    lines += [HOW, "## Summary (for the README)", "", summary(results), ""]
    return "\n".join(lines)


def fmt_load(value: Any) -> str:
    return " / ".join(f"{x:.1f}" for x in value) if value else "?"


# ---------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------


OURS = ("(host/", "(plugins/", "(mailhost")  # how py-spy names mailhost's and its plugins' files


def wall_profile(raw: Path, rate: int, top: int = 40) -> str:
    """py-spy's collapsed stacks (``--format raw``) summed three ways: by the innermost
    mailhost function on the stack (time in the libraries it calls counts for it; imports
    count as start-up), by inclusive time of mailhost's functions, and by leaf function.
    Several threads add up to more than the wall time."""
    innermost: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";") if f] or ["(no Python frame: interpreter start, exit)"]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + n
        if any("_find_and_load" in f for f in frames):
            owner = "(importing modules: start-up and plugin loading)"
        else:
            owner = next((f for f in reversed(frames) if any(m in f for m in OURS)), f"(outside mailhost) {frames[-1]}")
        innermost[owner] = innermost.get(owner, 0) + n
    if not total:
        return "(no samples)\n"

    def listing(counts: dict[str, int], keep: Any = lambda f: True) -> list[str]:
        ranked = sorted(((f, n) for f, n in counts.items() if keep(f)), key=lambda x: -x[1])[:top]
        return [f"  {n / rate:7.3f} s {100 * n / total:5.1f}%  {f}" for f, n in ranked]

    out = [f"{total / rate:.2f} s sampled (all threads)", "",
           "by the innermost mailhost function on the stack (what it calls counts for it):"]
    out += listing(innermost)
    out += ["", "inclusive, mailhost's functions:"]
    out += listing(inclusive, lambda f: any(m in f for m in OURS))
    out += ["", "self, leaf functions (socket reads and fsync show up here):"]
    out += listing(leaves)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------


COLORS = {"limit": "#7f7f7f", "reference": "#c7c7c7", "mailhost": "#1f77b4", "variant": "#9ecae1", "peer": "#ff7f0e"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        print("installing matplotlib for the plots (pip) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=False)
        try:
            import matplotlib
        except ImportError:
            return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, rows: list[dict[str, Any]], value: Any, unit: str, ref: float | None = None,
          ref_name: str = "limit") -> None:
    rows = [r for r in rows if r["samples"]]
    labels = [r["label"] for r in rows][::-1]
    values = [value(r) or 0 for r in rows][::-1]
    colors = [COLORS.get(r["kind"], "#999") for r in rows][::-1]
    ax.barh(labels, values, color=colors)
    ax.set_xscale("log")
    ax.set_xlabel(unit)
    top = max(values or [1])
    ax.set_xlim(left=min([v for v in values if v > 0] or [1]) / 4, right=top * 12)  # every bar visibly long
    for i, v in enumerate(values):
        text = f"{v:,.0f}" + (f"  ({v / ref:.2f} of {ref_name})" if ref else "")
        ax.text(v * 1.1, i, text, va="center", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.2)


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    sc, meta = results["scenarios"], results["meta"]
    made: list[str] = []
    machine = f"{meta.get('cores')} cores, {meta.get('cpu') or ''}".strip(", ")

    def save(fig: Any, name: str) -> None:
        fig.text(0.99, 0.01, f"bench/run, {meta.get('started', '')[:10]}; {machine}; absolute figures vary "
                 "by machine", ha="right", fontsize=7, color="#666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(folder / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(name)

    for prefix, plot_name in (("imap", "imap_download"), ("pop3", "pop3_download")):
        names = [n for n in (f"{prefix}-plain", f"{prefix}-tls") if n in sc]
        if not names:
            continue
        fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 + 0.45 * sum(len(expand(sc[n]["rows"]))
                                                                              for n in names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names, strict=True):
            rows = expand(sc[name]["rows"])
            limit = find(rows, "limit")
            _bars(ax, rows, rate, "messages per second (log scale)", rate(limit) if limit else None)
            ax.set_title(f"{TITLES[name]}: {meta['messages']:,} messages of 2–4 KB", fontsize=10)
        save(fig, plot_name)

    if "imap-poll" in sc:
        p = sc["imap-poll"]
        small = {r["label"]: r for r in expand(p.get("small", [])) if r["samples"]}
        big = {r["label"]: r for r in expand(p.get("big", [])) if r["samples"]}
        labels = [label for label in dict.fromkeys([*small, *big]) if label in small and label in big][::-1]
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.6 * len(labels)))
        ys = range(len(labels))
        s_ms = [median(small[label]) * 1000 for label in labels]  # type: ignore[operator]
        b_ms = [median(big[label]) * 1000 for label in labels]  # type: ignore[operator]
        ax.barh([y + 0.2 for y in ys], s_ms, height=0.4, color="#9ecae1", label="100 messages")
        ax.barh([y - 0.2 for y in ys], b_ms, height=0.4, color="#08519c", label=f"{p['messages']:,} messages")
        ax.set_yticks(list(ys), labels)
        ax.set_xscale("log")
        ax.set_xlim(right=max(b_ms + s_ms) * 40)
        ax.set_xlabel("milliseconds per poll (log scale; less is better)")
        for y, s, b in zip(ys, s_ms, b_ms, strict=True):
            ax.text(b * 1.1, y - 0.2, f"{b:,.0f} ms ({times(b / s)} the 100-message poll)", va="center", fontsize=8)
            ax.text(s * 1.1, y + 0.2, f"{s:,.0f} ms", va="center", fontsize=8)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.06), ncol=2, fontsize=8, frameon=False)
        ax.set_title("IMAP poll with nothing new", fontsize=10, loc="right")
        ax.grid(axis="x", which="both", alpha=0.2)
        save(fig, "imap_poll")

    if "smtp" in sc:
        rows = expand(sc["smtp"]["rows"])
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * len(rows)))
        ref = find(rows, "limit")
        _bars(ax, rows, rate, "messages per second (log scale)", rate(ref) if ref else None, "smtplib")
        ax.set_title(f"SMTP: {sc['smtp']['messages']:,} queued messages to {sc['smtp'].get('sink')}", fontsize=10)
        save(fig, "smtp_delivery")

    mem: list[dict[str, Any]] = []
    for name, short in (("imap-plain", "IMAP"), ("pop3-plain", "POP3"), ("smtp", "SMTP")):
        if name in sc:
            for r in sc[name]["rows"]:
                if r["samples"]:
                    mem.append({**r, "label": f"{short}: {r['label'].split(':')[0]}"})
    if mem:
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.4 * len(mem)))
        labels = [r["label"] for r in mem][::-1]
        values = [peak_mb(r) or 0 for r in mem][::-1]
        ax.barh(labels, values, color=[COLORS.get(r["kind"], "#999") for r in mem][::-1])
        for i, v in enumerate(values):
            ax.text(v + max(values) * 0.01, i, f"{v:,.0f} MB", va="center", fontsize=8)
        ax.set_xlabel("peak resident memory of the process, MB (ru_maxrss)")
        ax.set_xlim(right=max(values) * 1.2)
        ax.set_title(f"Peak memory ({meta['messages']:,}-message downloads, {sc.get('smtp', {}).get('messages', 0):,} "
                     "messages sent)", fontsize=10)
        save(fig, "peak_memory")
    return made


def write(results: dict[str, Any], folder: Path, plots_prefix: str = "", results_name: str = "RESULTS.md",
          plots_dir: Path | None = None) -> None:
    """RESULTS.md, README-summary.md and the plots."""
    plots_dir = plots_dir or folder
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = plots(results, plots_dir)
    (folder / results_name).write_text(markdown(results, plots_prefix, made))
    if folder != BENCH:
        (folder / "README-summary.md").write_text(summary(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, help="default: the folder of results.json")
    parser.add_argument("--publish", action="store_true", help="write bench/RESULTS.md and bench/plots/")
    ns = parser.parse_args()
    results = json.loads(ns.results.read_text())
    if ns.publish:
        write(results, BENCH, plots_prefix="plots/", plots_dir=BENCH / "plots")
    else:
        write(results, ns.out or ns.results.parent)


if __name__ == "__main__":
    main()
