"""Microsoft Graph end to end, the way an admin does it: the `mailhost` command line.

Every step runs `mailhost` in a subprocess, as the plugin's README says to:
`oauth add` + `oauth authorize` against the local identity provider
(:mod:`tests.servers.idp`, Microsoft-shaped v2.0 endpoints), `incoming add/test/enable`,
`fetch --json`, `outgoing add/test`, `send`, `deliver --json`. The Graph stand-in
(:mod:`tests.servers.graph`) accepts only tokens that identity provider issued for Microsoft
Graph, checked by RFC 7662 introspection: a token for another resource (Exchange's
IMAP/SMTP scopes, the Microsoft provider's default) is refused as Graph refuses it.

Covered: thousands of messages over many delta pages, byte for byte; new mail between
passes; throttling (429, 503) mid-pass; a stale delta token (410 Gone); `fetch` killed
with SIGKILL mid-pass then a clean pass (each message exactly once); a token the identity
provider stopped honouring, renewed without an admin; a shared mailbox with a delegated
token (authorization code flow, the admin's browser played by a script); sending as the
shared mailbox; and the credential without Graph scopes, refused with one sentence that
names the fix; `send --attach` with files over Graph's 4 MB request limit.
"""
from __future__ import annotations

import json
import os
import random
import ssl
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import run_cli
from tests.servers.certs import Pki
from tests.servers.graph import GraphServer, introspection_verifier
from tests.servers.idp import IdentityProvider

from .helpers import kill_when
from .helpers import message_id_of as _mid
from .helpers import stored_count
from .helpers import stored_messages as stored

ALICE = "alice@contoso.com"
SUPPORT = "support@contoso.com"
GRAPH = "https://graph.microsoft.com"  # the resource the stand-in plays
SECRET = "graph-app-secret"
_OUTPUT: list[str] = []  # what every `mailhost` of the running test printed


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def message(i: int, size: int = 1500, to: str = ALICE) -> bytes:
    """A MIME message with a unique Message-ID, about ``size`` bytes, some of them 8-bit."""
    head = (f"From: Sender {i} <s{i}@example.org>\r\nTo: {to}\r\nSubject: message {i}\r\n"
            f"Message-ID: <cli{i}@example.org>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode()
    body = f"Grüße {i}\r\n".encode()
    while len(head) + len(body) < size:
        body += b"-" * 70 + b"\r\n"
    return head + body



def cli(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``mailhost ARGS``; with ``ok``, it must succeed."""
    result = run_cli(*args, env=env)
    _OUTPUT.append(result.stdout + result.stderr)
    if ok:
        assert result.returncode == 0, f"mailhost {' '.join(args)} -> {result.returncode}\n{result.stderr}"
    return result


def cli_json(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> Any:
    result = cli(*args, "--json", env=env, ok=ok)
    return json.loads(result.stdout)



def raw_item(item_id: int) -> bytes:
    """`mailhost queue incoming show ID --raw`: the bytes as downloaded."""
    result = run_cli("queue", "incoming", "show", str(item_id), "--raw", input=b"")
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------------------------
# Fixtures: the identity provider, Graph checking its tokens, an admin's setup
# ---------------------------------------------------------------------------------------


@pytest.fixture
def graph(pki: Pki, idp: IdentityProvider) -> Iterator[GraphServer]:
    """The stand-in, validating tokens by introspection at ``idp``; alice, the shared
    mailbox support (alice has Full Access and Send As on it)."""
    verify = introspection_verifier(idp.add_resource_server("graph", "graph-rs-secret"), ca_file=idp.ca_file,
                                    clock=idp.now)
    server = GraphServer(pki, verify=verify, max_page_size=100, retry_after=0.01)
    server.start()
    server.add_user(ALICE)
    server.add_shared_mailbox(SUPPORT)
    server.grant(SUPPORT, ALICE, full_access=True, send_as=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_secret_is_printed(idp: IdentityProvider) -> Iterator[None]:
    """After each test: neither the client secret nor any token the provider issued
    appeared in what `mailhost` printed."""
    _OUTPUT.clear()
    yield
    issued = [SECRET, *idp._access, *idp._refresh, *idp._used_refresh]
    assert not [s for s in issued if any(s in out for out in _OUTPUT)]


@pytest.fixture
def env() -> dict[str, str]:
    """The environment the admin runs `mailhost` in: the client secret to read."""
    return {"GRAPH_SECRET": SECRET}


def add_app_only_credential(idp: IdentityProvider, env: dict[str, str], name: str = "m365",
                            scopes: tuple[str, ...] = (f"{GRAPH}/.default",), provider: str = "microsoft") -> None:
    """`mailhost oauth add NAME --flow client-credentials ...` then `oauth authorize NAME`:
    Microsoft's provider (msal, the authority and tenant), or any OpenID Connect provider
    (discovery from the issuer)."""
    idp.add_client("graph-app", SECRET)
    scope_args = [a for s in scopes for a in ("--scope", s)]
    where = (["--tenant", idp.tenant, "--authority", idp.authority] if provider == "microsoft"
             else ["--authority", idp.issuer()])
    cli("oauth", "add", name, "--provider", provider, "--client-id", "graph-app",
        "--client-secret-env", "GRAPH_SECRET", *where, *scope_args, "--flow", "client-credentials",
        "--ca-file", idp.ca_file, env=env)
    authorized = cli_json("oauth", "authorize", name)
    assert authorized["app_only"] is True


def add_incoming(graph: GraphServer, name: str = "g", *extra: str, credential: str = "m365") -> None:
    cli("incoming", "add", name, "--protocol", "graph", "--host", "127.0.0.1", "--port", str(graph.port),
        "--username", ALICE, "--oauth-credential", credential, "--folder", "Inbox", "--ca-file", graph.ca_file,
        *extra)


def fetch(name: str = "g") -> dict[str, Any]:
    [report] = cli_json("fetch", name)
    assert report["ok"], report
    return report


# ---------------------------------------------------------------------------------------
# App-only access (client credentials)
# ---------------------------------------------------------------------------------------


def test_thousands_over_many_pages_then_only_new(home: Path, idp: IdentityProvider, graph: GraphServer,
                                                 env: dict[str, str]) -> None:
    """The README's steps with an app-only credential: 2500 messages over 25 delta pages
    arrive byte for byte and are marked read; a pass with nothing new is one delta
    request; new mail between passes is all that is downloaded. Every Graph request
    carried a token the identity provider vouched for."""
    sent = [message(i, 1000 + (i * 37) % 2500) for i in range(2500)]
    graph.deliver_many(ALICE, sent)
    add_app_only_credential(idp, env)
    add_incoming(graph)

    steps = cli_json("incoming", "test", "g")
    assert [(s["step"], s["ok"]) for s in steps] == [("token", True), ("mailbox", True), ("folder", True),
                                                     ("permissions", True)], steps
    assert "m365" in steps[0]["detail"] and "app-only" in steps[0]["detail"]
    assert "2500 messages" in steps[2]["detail"]
    assert not any(m.is_read for m in graph.messages(ALICE))  # the test changed nothing

    enabled = cli("incoming", "enable", "g", "--yes")
    assert "would fetch about 2500 message(s) (confidence: high)" in enabled.stderr, enabled.stderr

    before = dict(graph.stats)
    report = fetch()
    assert (report["listed"], report["stored"], report["acknowledged"]) == (2500, 2500, 2500), report
    assert [raw for _, raw in stored(home)] == sent
    assert graph.stats["delta"] - before.get("delta", 0) == 25 and graph.stats["value"] - before.get("value", 0) == 2500
    assert all(m.is_read for m in graph.messages(ALICE))
    items = cli_json("queue", "incoming", "--connection", "g", "--limit", "3")
    assert [i["subject"] for i in items] == ["message 2499", "message 2498", "message 2497"]
    assert raw_item(items[0]["id"]) == sent[-1]

    before = dict(graph.stats)
    again = fetch()
    assert (again["listed"], again["stored"]) == (0, 0)
    assert graph.stats["delta"] - before["delta"] == 1 and graph.stats["value"] == before["value"]

    new = [message(5000 + i) for i in range(7)]
    graph.deliver_many(ALICE, new)
    third = fetch()
    assert (third["listed"], third["stored"]) == (7, 7)
    assert graph.stats["value"] == before["value"] + 7
    assert [raw for _, raw in stored(home)] == sent + new

    # The real token path: one client-credentials grant, checked by Graph at the provider.
    assert len(idp.grants("client_credentials")) == 1
    assert idp.introspections and all(i["active"] and i["caller"] == "graph" for i in idp.introspections)
    shown = cli_json("incoming", "show", "g")
    assert shown["oauth_credential"] == "m365" and shown["oauth_authorized"] is True
    assert shown["oauth_last_error"] is None


def test_throttling_mid_pass_stores_each_once(home: Path, idp: IdentityProvider, graph: GraphServer,
                                              env: dict[str, str]) -> None:
    """Every 7th request answers 429, then a burst of 503s: both passes complete, each
    message stored once, all marked read."""
    sent = [message(i) for i in range(600)]
    graph.deliver_many(ALICE, sent)
    add_app_only_credential(idp, env)
    add_incoming(graph)
    graph.throttle(every=7)
    assert fetch()["stored"] == 600
    new = [message(900 + i) for i in range(40)]
    graph.deliver_many(ALICE, new)
    graph.throttle(burst=6, status=503)
    assert fetch()["stored"] == 40
    assert graph.stats["throttled"] > 90
    ids = Counter(m for m, _ in stored(home))
    assert len(ids) == 640 and max(ids.values()) == 1
    assert [raw for _, raw in stored(home)] == sent + new
    assert all(m.is_read for m in graph.messages(ALICE))


@pytest.mark.parametrize("provider", ["microsoft", "oidc"])
def test_stale_delta_token_resyncs_without_duplicates(home: Path, idp: IdentityProvider, graph: GraphServer,
                                                      env: dict[str, str], provider: str) -> None:
    """410 Gone: the folder is listed again, what was stored is skipped (also messages put
    back into the folder), the one new message comes. The credential is Microsoft's, or
    the generic OpenID Connect provider's."""
    graph.deliver_many(ALICE, [message(i) for i in range(120)])
    add_app_only_credential(idp, env, provider=provider)
    add_incoming(graph, "g", "--after-download", "move", "--move-to", "Done")
    assert fetch()["stored"] == 120
    assert graph.messages(ALICE) == [] and len(graph.messages(ALICE, "Done")) == 120
    graph.deliver_many(ALICE, [message(i) for i in range(200, 205)], "Done")  # outside the folder
    for m in graph.messages(ALICE, "Done")[:30]:  # someone puts stored ones back
        graph.move_message(ALICE, m.immutable_id, "inbox")
    graph.expire_delta_tokens()
    graph.deliver(ALICE, message(999))
    report = fetch()
    assert (report["listed"], report["stored"]) == (1, 1), report
    ids = Counter(m for m, _ in stored(home))
    assert len(ids) == 121 and max(ids.values()) == 1 and "<cli999@example.org>" in ids
    [log] = cli_json("log", "incoming", "--connection", "g", "--limit", "1")
    assert (log["status"], log["stored"], log["error"]) == ("ok", 1, None), log


def test_a_retyped_folder_is_the_same_folder(home: Path, idp: IdentityProvider, graph: GraphServer,
                                            env: dict[str, str]) -> None:
    """Exchange ignores case in folder names: "inbox" retyped keeps Inbox's delta token
    and stored keys, so nothing is listed again, let alone stored twice."""
    graph.deliver_many(ALICE, [message(i) for i in range(20)])
    add_app_only_credential(idp, env)
    add_incoming(graph, "g", "--after-download", "keep")
    assert fetch()["stored"] == 20
    cli("incoming", "edit", "g", "--folder", " inbox/")
    assert cli_json("incoming", "show", "g")["folder"] == "Inbox"
    graph.deliver(ALICE, message(99))
    report = fetch()
    assert (report["listed"], report["stored"], report["duplicates"]) == (1, 1, 0), report
    assert stored_count(home) == 21


def test_a_404_for_a_listed_message_loses_nothing(home: Path, idp: IdentityProvider, graph: GraphServer,
                                                  env: dict[str, str]) -> None:
    """One 404 while downloading a message the folder still holds: the pass ends not ok
    with a sentence naming it, the delta link stays where it was, and the next pass
    stores every message once."""
    graph.deliver_many(ALICE, [message(i) for i in range(5)])
    add_app_only_credential(idp, env)
    add_incoming(graph, "g")
    graph.fail("value", 404, "ErrorItemNotFound", "The specified object was not found in the store.")
    [failed] = cli_json("fetch", "g", ok=False)
    assert not failed["ok"] and "answered 404 for 1 message(s) still in folder Inbox" in failed["error"], failed
    assert fetch()["stored"] == 5 - failed["stored"]
    ids = Counter(m for m, _ in stored(home))
    assert len(ids) == 5 and max(ids.values()) == 1
    assert all(m.is_read for m in graph.messages(ALICE))


def test_refused_token_is_renewed_without_an_admin(home: Path, idp: IdentityProvider, graph: GraphServer,
                                                   env: dict[str, str]) -> None:
    """The provider no longer honours the stored token (its clock moved past the expiry;
    mailhost's did not): Graph answers 401, the credential fetches a new token once, the
    pass completes, and `oauth show` records the renewal."""
    sent = [message(i) for i in range(30)]
    graph.deliver_many(ALICE, sent)
    add_app_only_credential(idp, env)
    add_incoming(graph)
    idp.advance(idp.access_token_lifetime + 60)
    report = fetch()
    assert (report["stored"], report["acknowledged"]) == (30, 30), report
    assert [raw for _, raw in stored(home)] == sent
    assert len(idp.grants("client_credentials")) == 2
    assert [i["active"] for i in idp.introspections[:2]] == [False, True]
    [authorization] = cli_json("oauth", "show", "m365")["authorizations"]
    assert authorization["refreshes"] == 1 and authorization["last_error"] is None


def test_send_attach_over_4_mb_then_deliver(home: Path, idp: IdentityProvider, graph: GraphServer,
                                            env: dict[str, str]) -> None:
    """`mailhost send --attach` a 6 MB and a 100 KB file, `deliver` through a Graph
    connection: over the 4 MB request limit, so a draft with the large file uploaded in
    ranges, then send; carol and the Bcc erin get both files byte for byte, once."""
    add_app_only_credential(idp, env)
    cli("outgoing", "add", "gout", "--protocol", "graph", "--host", "127.0.0.1", "--port", str(graph.port),
        "--username", ALICE, "--oauth-credential", "m365", "--ca-file", graph.ca_file)
    scan, notes = home / "scan.pdf", home / "notes.txt"
    scan.write_bytes(random.Random(6).randbytes(6_000_000))
    notes.write_bytes("Grüße\n".encode() * 20_000)
    item = cli_json("send", "--to", "carol@example.org", "--bcc", "erin@example.org", "--connection", "gout",
                    "--subject", "Scans", "--body", "Both attached.", "--attach", str(scan), "--attach", str(notes))
    assert item["status"] == "queued" and item["size"] > 8_000_000
    [delivered] = cli_json("deliver")
    assert (delivered["connection"], delivered["sent"], delivered["error"]) == ("gout", 1, None), delivered
    [mail] = graph.sent
    assert set(mail.recipients) == {"carol@example.org", "erin@example.org"}
    assert sorted((a.name, a.content) for a in mail.attachments) == [("notes.txt", notes.read_bytes()),
                                                                     ("scan.pdf", scan.read_bytes())]
    assert (graph.stats["sendmail"], graph.stats["uploadsession"], graph.stats["send"]) == (0, 1, 1)
    assert graph.messages(ALICE, "drafts") == [] and len(graph.messages(ALICE, "sentitems")) == 1
    [queued] = cli_json("queue", "outgoing")
    assert (queued["id"], queued["status"]) == (item["id"], "sent")
    assert sum(r["sent"] for r in cli_json("deliver")) == 0 and len(graph.sent) == 1  # once


def test_credential_without_graph_scopes_is_one_sentence_naming_the_fix(
        home: Path, idp: IdentityProvider, graph: GraphServer, env: dict[str, str]) -> None:
    """A Microsoft credential with the default scopes gets tokens for Exchange Online,
    which Graph refuses. `incoming test` and `fetch` say so in one sentence naming the
    command that fixes it, before any token goes to Graph; after `oauth edit --scope`
    the old token is dropped, a Graph token is fetched, and mail comes."""
    graph.deliver_many(ALICE, [message(i) for i in range(5)])
    add_app_only_credential(idp, env, scopes=())
    assert cli_json("oauth", "show", "m365")["scopes"] == ["https://outlook.office365.com/.default"]
    add_incoming(graph)
    fix = f"`mailhost oauth edit m365 --scope {GRAPH}/.default`"

    tested = cli("incoming", "test", "g", "--json", ok=False)
    assert tested.returncode == 1
    [step] = json.loads(tested.stdout)
    assert (step["step"], step["ok"]) == ("token", False)
    assert "https://outlook.office365.com" in step["detail"] and fix in step["detail"], step
    failed = cli("fetch", "g", "--json", ok=False)
    assert failed.returncode == 1
    [report] = json.loads(failed.stdout)
    assert not report["ok"] and fix in report["error"] and "\n" not in report["error"]
    assert stored(home) == [] and idp.introspections == []  # no token went to Graph
    # ... which would have refused it, as Graph refuses a token for Exchange Online:
    exchange = httpx.post(idp.endpoint("token"), verify=ssl.create_default_context(cafile=idp.ca_file), data={
        "grant_type": "client_credentials", "client_id": "graph-app", "client_secret": SECRET,
        "scope": "https://outlook.office365.com/.default"}).json()["access_token"]
    refused = httpx.get(f"{graph.base_url}/users/{ALICE}/mailFolders/inbox",
                        headers={"Authorization": f"Bearer {exchange}"},
                        verify=ssl.create_default_context(cafile=graph.ca_file))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "InvalidAuthenticationToken"

    edited = cli("oauth", "edit", "m365", "--scope", f"{GRAPH}/.default")
    assert "dropped" in edited.stderr
    steps = cli_json("incoming", "test", "g")
    assert all(s["ok"] for s in steps), steps
    assert fetch()["stored"] == 5
    scopes = [g["scope"] for g in idp.grants("client_credentials")]
    assert scopes == ["https://outlook.office365.com/.default"] * 2 + [f"{GRAPH}/.default"]


# ---------------------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_pass_then_a_clean_pass(home: Path, idp: IdentityProvider, graph: GraphServer,
                                            env: dict[str, str]) -> None:
    """`mailhost fetch` killed with SIGKILL at four points of its work: downloading the
    first batch, acknowledging it after its commit, downloading a later one, acknowledging
    the third; with 429s on the way. A clean pass then finishes: each message stored
    exactly once, byte for byte, all marked read."""
    from mailhost.incoming import _batches
    from mailhost.protocols import MessageRef

    rng = random.Random(int(os.environ.get("MAILHOST_TEST_SEED", "20261122")))
    sent = [message(i, rng.randint(1500, 6000)) for i in range(2400)]
    # Where the pipeline's commits fall (its batches grow: 250, 500, 1000, ...).
    sizes = [len(b) for b in _batches([MessageRef(str(i), 0) for i in range(len(sent))])]
    assert len(sizes) >= 4, sizes
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    graph.deliver_many(ALICE, sent)
    add_app_only_credential(idp, env)
    add_incoming(graph)
    cli("incoming", "enable", "g", "--yes")
    graph.throttle(every=11)

    def after(first: Callable[[], bool], kind: str, count: int) -> Callable[[], bool]:
        """Ready ``count`` requests of ``kind`` (``value``: downloads, ``batch``:
        acknowledgements, 20 a request) after ``first()`` holds."""
        mark: list[int] = []

        def ready() -> bool:
            if not mark:
                if not first():
                    return False
                mark.append(graph.stats[kind])
            return graph.stats[kind] - mark[0] >= count
        return ready

    acks_of = [-(-n // 20) for n in sizes]  # $batch requests (20 acknowledgements each) per batch
    points = [
        ("downloading batch 1", lambda: True, "value", rng.randint(20, sizes[0] - 10)),  # nothing committed yet
        ("acknowledging batch 1", lambda: stored_count(home) >= ends[0], "batch", rng.randint(1, acks_of[0] - 1)),
        ("downloading a later batch", lambda: stored_count(home) >= ends[1], "value", rng.randint(20, sizes[2] - 10)),
        ("acknowledging batch 3", lambda: stored_count(home) >= ends[2], "batch", rng.randint(1, acks_of[2] - 1)),
    ]
    kills = []
    for label, first, kind, count in points:
        proc = subprocess.Popen([sys.executable, "-m", "mailhost", "fetch", "--json"], cwd=home,
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if kill_when(proc, after(first, kind, count)):
                proc.wait()
                kills.append((label, stored_count(home)))
        finally:
            proc.kill()
            proc.wait()
    assert len(kills) >= 3, kills  # the test proved something only if it really killed passes
    assert any(0 < n < len(sent) for _, n in kills), kills  # killed between two commits
    graph.throttle()
    [report] = cli_json("fetch")
    assert report["ok"], report
    rows = stored(home)
    ids = Counter(m for m, _ in rows)
    assert set(ids) == {_mid(m) for m in sent} and max(ids.values()) == 1, kills
    by_id = {_mid(m): m for m in sent}
    assert all(raw == by_id[m] for m, raw in rows)
    assert all(m.is_read for m in graph.messages(ALICE))  # every acknowledgement finished


# ---------------------------------------------------------------------------------------
# Delegated access: a shared mailbox, and sending as it
# ---------------------------------------------------------------------------------------

BROWSER = '''\
#!{python}
"""The admin's browser: sign in at the provider, deliver its answer to the loopback listener."""
import html, re, ssl, sys, urllib.error, urllib.parse, urllib.request

class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None

url = sys.argv[1]
context = ssl.create_default_context(cafile={ca!r})
opener = urllib.request.build_opener(NoRedirect(), urllib.request.HTTPSHandler(context=context))
try:
    with opener.open(url, timeout=10) as response:  # response_mode=form_post: a form to submit
        page = response.read().decode("utf-8")
except urllib.error.HTTPError as exc:  # a 302 to the redirect URI
    urllib.request.urlopen(exc.headers["Location"], timeout=10).read()
    sys.exit(0)
action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))
fields = {{html.unescape(k): html.unescape(v)
          for k, v in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)"', page)}}
urllib.request.urlopen(action, data=urllib.parse.urlencode(fields).encode(), timeout=10).read()
'''


@pytest.fixture
def browser(tmp_path: Path, pki: Pki) -> str:
    """A program for ``$BROWSER``, which Python's webbrowser (what `oauth authorize` opens) runs."""
    path = tmp_path / "browser"
    path.write_text(BROWSER.format(python=sys.executable, ca=pki.ca_file))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_shared_mailbox_and_sending_as_it_with_a_delegated_token(
        home: Path, idp: IdentityProvider, graph: GraphServer, env: dict[str, str], browser: str) -> None:
    """alice authorizes a credential with Graph's .Shared scopes in her browser; her token
    reads the shared mailbox support (a folder by path) and sends as support: `send`
    queues, `deliver` hands the MIME to sendMail, Graph got it from alice as support."""
    idp.add_client("desk-app", SECRET)
    idp.add_user(ALICE, mailboxes={SUPPORT})
    scopes = [f"{GRAPH}/Mail.ReadWrite", f"{GRAPH}/Mail.Send", f"{GRAPH}/Mail.ReadWrite.Shared",
              f"{GRAPH}/Mail.Send.Shared", "offline_access"]
    cli("oauth", "add", "desk", "--provider", "microsoft", "--client-id", "desk-app",
        "--client-secret-env", "GRAPH_SECRET", "--tenant", idp.tenant, "--authority", idp.authority,
        *[a for s in scopes for a in ("--scope", s)], "--ca-file", idp.ca_file, env=env)
    authorized = cli_json("oauth", "authorize", "desk", "--username", ALICE, env={"BROWSER": browser})
    assert (authorized["username"], authorized["identity"], authorized["refresh_token"]) == (ALICE, ALICE, True)
    assert len(idp.grants("authorization_code")) == 1

    graph.create_folder(SUPPORT, "Queues/Level 1")
    sent = [message(i, to=SUPPORT) for i in range(25)]
    graph.deliver_many(SUPPORT, sent, "Queues/Level 1")
    graph.deliver(ALICE, message(77))  # alice's own inbox stays out of it
    cli("incoming", "add", "shared", "--protocol", "graph", "--host", "127.0.0.1", "--port", str(graph.port),
        "--username", ALICE, "--shared-mailbox", SUPPORT, "--folder", "Queues/Level 1",
        "--oauth-credential", "desk", "--ca-file", graph.ca_file)
    steps = cli_json("incoming", "test", "shared")
    assert [(s["step"], s["ok"]) for s in steps] == [("token", True), ("mailbox", True), ("folder", True),
                                                     ("permissions", True)], steps
    assert f"delegated for {ALICE}" in steps[0]["detail"] and "shared mailbox" in steps[1]["detail"]
    assert "send: yes" in steps[3]["detail"]
    cli("incoming", "enable", "shared", "--yes")
    report = fetch("shared")
    assert (report["stored"], report["acknowledged"]) == (25, 25), report
    assert [raw for _, raw in stored(home)] == sent
    assert all(m.is_read for m in graph.messages(SUPPORT, "Queues/Level 1"))
    assert not graph.messages(ALICE)[0].is_read
    assert {i["username"] for i in idp.introspections} == {ALICE}  # alice's token, no other

    cli("outgoing", "add", "gout", "--protocol", "graph", "--host", "127.0.0.1", "--port", str(graph.port),
        "--username", ALICE, "--oauth-credential", "desk", "--from", SUPPORT, "--ca-file", graph.ca_file)
    steps = cli_json("outgoing", "test", "gout")
    assert all(s["ok"] for s in steps) and "send: yes" in steps[-1]["detail"], steps
    item = cli_json("send", "--to", "carol@example.org", "--bcc", "erin@example.org", "--connection", "gout",
                    "--subject", "Ticket 1", "--body", "Grüße from the desk")
    assert item["status"] == "queued"
    [delivered] = cli_json("deliver")
    assert (delivered["connection"], delivered["sent"], delivered["error"]) == ("gout", 1, None), delivered
    [mail] = graph.sent
    assert (mail.mailbox, mail.caller) == (SUPPORT, ALICE)
    assert set(mail.recipients) == {"carol@example.org", "erin@example.org"}
    assert mail.raw.startswith(b"Bcc: erin@example.org\r\n")  # the envelope-only recipient
    assert b"Subject: Ticket 1\r\n" in mail.raw and SUPPORT.encode() in mail.raw
    [queued] = cli_json("queue", "outgoing")
    assert (queued["id"], queued["status"]) == (item["id"], "sent")
    assert len(idp.grants("refresh_token")) == 0  # the stored token served every pass
