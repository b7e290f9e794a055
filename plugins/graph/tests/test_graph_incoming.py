"""The Graph incoming session against the stand-in: delta paging, MIME, acknowledgements."""
from __future__ import annotations

import pytest
from graph_helpers import ALICE, BOB, SUPPORT, Settings, message
from mailhost.errors import AuthenticationFailed, PermanentFailure, TemporaryFailure, TLSFailure
from mailhost.protocols import ConnectionSettings
from mailhost_graph.incoming import GraphIncomingSession, open_incoming

from tests.servers.graph import GraphServer


def nothing_known(keys: object) -> set[str]:
    return set()


def session(settings: ConnectionSettings) -> GraphIncomingSession:
    return open_incoming(settings)


def test_delta_pages_then_only_new(graph: GraphServer, settings: Settings) -> None:
    """120 messages over three delta pages; the stored delta link then lists only new mail."""
    graph.deliver_many(ALICE, [message(i) for i in range(120)])
    with session(settings()) as s:
        listing = s.list_new(None, nothing_known)
        assert len(listing.refs) == 120 and not listing.reset
        assert all(ref.cursor is None and ref.size for ref in listing.refs)
        assert graph.stats["delta"] == 3  # 50 per page at most on this server
        assert listing.cursor and "$deltatoken=" in listing.cursor["delta_link"]
        assert s.list_new(listing.cursor, nothing_known).refs == []
        graph.deliver_many(ALICE, [message(200), message(201)])
        again = s.list_new(listing.cursor, nothing_known)
    assert [graph.messages(ALICE)[-2].immutable_id, graph.messages(ALICE)[-1].immutable_id] == \
        [ref.key for ref in again.refs]


def test_refs_oldest_first_and_known_left_out(graph: GraphServer, settings: Settings) -> None:
    """Keys already stored are not listed, so nothing is downloaded for them."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(10)])
    with session(settings()) as s:
        listing = s.list_new(None, lambda keys: set(ids[:7]))
    assert [ref.key for ref in listing.refs] == ids[7:]


def test_fetch_is_byte_exact_and_skips_vanished(graph: GraphServer, settings: Settings) -> None:
    """$value bytes arrive untouched (8-bit and bare bytes too); a message gone meanwhile is skipped."""
    raws = [message(i, size=3000 + i) for i in range(30)] + [b"Subject: odd\n\n\xff\xfe\x00binary\r\r\n"]
    graph.deliver_many(ALICE, raws)
    with session(settings()) as s:
        refs = s.list_new(None, nothing_known).refs
        graph.purge_message(ALICE, refs[3].key)
        got = list(s.fetch(refs))
    assert [raw for _, raw in got] == raws[:3] + raws[4:]
    assert [ref.size for ref, _ in got] == [len(r) for r in raws[:3] + raws[4:]]
    assert max(graph.max_inflight.values()) <= 4  # Outlook's MailboxConcurrency


def test_a_404_for_a_message_still_there_fails_the_batch(graph: GraphServer, settings: Settings) -> None:
    """Exchange may answer 404 for a message its folder still holds (a replica behind):
    the batch fails with a sentence naming it, so the host keeps the cursor before it,
    and the next try gets every message."""
    raws = [message(i) for i in range(5)]
    graph.deliver_many(ALICE, raws)
    with session(settings()) as s:
        refs = s.list_new(None, nothing_known).refs
        graph.fail("value", 404, "ErrorItemNotFound", "The specified object was not found in the store.")
        with pytest.raises(TemporaryFailure, match=r"answered 404 for 1 message\(s\) still in folder Inbox of "
                                                   r"alice@contoso.com .*the next pass tries again"):
            list(s.fetch(refs))
        assert [raw for _, raw in s.fetch(refs)] == raws


def test_mark_seen_delete_and_move(graph: GraphServer, settings: Settings) -> None:
    """The after-download actions, 20 per $batch; move creates the missing folder."""
    graph.deliver_many(ALICE, [message(i) for i in range(45)])
    with session(settings()) as s:
        refs = s.list_new(None, nothing_known).refs
        s.mark_seen(refs[:25])
        s.delete(refs[25:35])
        s.move(refs[35:], "Processed/2026")
        s.mark_seen(refs[:25])  # again, as after a crash: harmless
        s.delete(refs[25:35])
    inbox = graph.messages(ALICE)
    assert [m.is_read for m in inbox] == [True] * 25
    assert len(graph.messages(ALICE, "recoverableitemsdeletions")) == 10
    assert len(graph.messages(ALICE, "deleteditems")) == 0  # DELETE does not fill Deleted Items
    assert [m.immutable_id for m in graph.messages(ALICE, "Processed/2026")] == [r.key for r in refs[35:]]
    # delete and move look first (one $batch of GETs per 20) for what is still in the folder
    assert graph.stats["batch"] == 2 + (1 + 1) + (1 + 1) + 2 + 1


def test_delete_and_move_leave_what_a_user_filed_meanwhile(graph: GraphServer, settings: Settings) -> None:
    """Listed and downloaded, then before the after-download action a user files one
    message in Archive and deletes another (to Deleted Items): an immutable id still opens
    them, and both were stored, but the action leaves them where the user put them."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(6)])
    with session(settings()) as s:
        refs = s.list_new(None, nothing_known).refs
        assert [raw for _, raw in s.fetch(refs)] == [message(i) for i in range(6)]
        graph.move_message(ALICE, ids[1], "archive")
        graph.move_message(ALICE, ids[4], "deleteditems")
        s.move(refs[:3], "Processed")
        s.delete(refs[3:])
    assert [m.immutable_id for m in graph.messages(ALICE, "archive")] == [ids[1]]
    assert [m.immutable_id for m in graph.messages(ALICE, "deleteditems")] == [ids[4]]
    assert [m.immutable_id for m in graph.messages(ALICE, "Processed")] == [ids[0], ids[2]]
    assert [m.immutable_id for m in graph.messages(ALICE, "recoverableitemsdeletions")] == [ids[3], ids[5]]
    assert graph.messages(ALICE) == []


def test_folder_by_path_and_missing_folder(graph: GraphServer, settings: Settings) -> None:
    """A folder by display-name path; a missing one is named in the error with the fix."""
    graph.create_folder(ALICE, "Projects/Support")
    graph.deliver(ALICE, message(1), "Projects/Support")
    graph.deliver(ALICE, message(2), "inbox")
    with session(settings(folder="projects/support")) as s:
        assert [r.key for r in s.list_new(None, nothing_known).refs] == \
            [graph.messages(ALICE, "Projects/Support")[0].immutable_id]
    with session(settings(folder="Projects/Nope")) as s, pytest.raises(PermanentFailure, match="Projects/Nope.*Folder"):
        s.list_new(None, nothing_known)


def test_stale_delta_token_resyncs_with_reset(graph: GraphServer, settings: Settings) -> None:
    """410 Gone: the folder is listed again (reset), without what is stored already."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(60)])
    with session(settings()) as s:
        cursor = s.list_new(None, nothing_known).cursor
        graph.expire_delta_tokens()
        new = graph.deliver(ALICE, message(99))
        listing = s.list_new(cursor, lambda keys: set(ids))
    assert listing.reset and [r.key for r in listing.refs] == [new]
    assert listing.cursor != cursor


def test_a_listing_forgotten_twice_in_a_pass_is_temporary(graph: GraphServer, settings: Settings) -> None:
    """410 for the stored delta link, then again while listing the folder anew (a skip
    token expired too): one sentence, a TemporaryFailure, not an unexpected error; the
    next pass lists the folder again."""
    graph.deliver_many(ALICE, [message(i) for i in range(60)])
    with session(settings()) as s:
        cursor = s.list_new(None, nothing_known).cursor
        graph.fail("delta", 410, "SyncStateNotFound", "The sync state generation is not found.", count=2)
        with pytest.raises(TemporaryFailure, match="forgot its place twice in one listing of folder Inbox "
                                                   r"\(SyncStateNotFound\): the next pass lists the folder again"):
            s.list_new(cursor, nothing_known)
        again = s.list_new(cursor, nothing_known)
    assert not again.reset and again.refs == []  # the stored link still holds on this server


def test_throttling_is_honoured(graph: GraphServer, settings: Settings) -> None:
    """Every 3rd request answers 429 (and a burst of 503): everything still completes."""
    graph.deliver_many(ALICE, [message(i) for i in range(80)])
    graph.throttle(every=3)
    with session(settings()) as s:
        refs = s.list_new(None, nothing_known).refs
        got = list(s.fetch(refs))
        graph.throttle(burst=5, status=503)
        s.mark_seen(refs)
    assert len(got) == 80 and all(m.is_read for m in graph.messages(ALICE))
    assert graph.stats["throttled"] >= 30


def test_a_retry_after_that_is_no_number_nor_date_backs_off(graph: GraphServer, settings: Settings) -> None:
    """``Retry-After: soon`` is read as no Retry-After at all: the client backs off and
    tries again, as for any throttled request."""
    graph.deliver(ALICE, message(1))
    graph.fail("delta", 429, "TooManyRequests", "slow down", headers={"Retry-After": "soon"})
    with session(settings()) as s:
        assert len(s.list_new(None, nothing_known).refs) == 1


def test_expired_token_is_fetched_again(graph: GraphServer, settings: Settings) -> None:
    """A 401 gets one fresh token; a token refused twice is an authentication failure."""
    graph.deliver(ALICE, message(1))
    tokens = [graph.issue_token(ALICE, expires_in=-1), graph.issue_token(ALICE)]
    with session(settings(access_token=lambda: tokens.pop(0))) as s:
        assert len(s.list_new(None, nothing_known).refs) == 1
    with session(settings(access_token=lambda: "not-a-token")) as s, \
            pytest.raises(AuthenticationFailed, match="refused the access token.*oauth authorize"):
        s.list_new(None, nothing_known)


def test_untrusted_certificate_is_refused(graph: GraphServer, settings: Settings) -> None:
    """TLS is verified: a CA file that did not sign the server's certificate fails."""
    with session(settings(ca_file=graph.pki.untrusted_ca_file)) as s, pytest.raises(TLSFailure, match="not trusted"):
        s.list_new(None, nothing_known)


def test_shared_mailbox_needs_rights(graph: GraphServer, settings: Settings) -> None:
    """alice reads the shared mailbox with .Shared scopes and Full Access; bob may not."""
    graph.deliver(SUPPORT, message(1, to=SUPPORT))
    scopes = ("Mail.ReadWrite", "Mail.ReadWrite.Shared", "Mail.Send.Shared")
    with session(settings(scopes=scopes, shared_mailbox=SUPPORT)) as s:
        refs = s.list_new(None, nothing_known).refs
        assert [raw for _, raw in s.fetch(refs)] == [message(1, to=SUPPORT)]
        s.mark_seen(refs)
    assert graph.messages(SUPPORT)[0].is_read
    with session(settings(scopes=scopes, user=BOB, username=BOB, shared_mailbox=SUPPORT)) as s, \
            pytest.raises(PermanentFailure, match="ErrorAccessDenied.*Shared"):
        s.list_new(None, nothing_known)


def test_app_only_token_reads_any_mailbox(graph: GraphServer, settings: Settings) -> None:
    """Client-credentials tokens carry roles and open every mailbox."""
    graph.deliver(BOB, message(7, to=BOB))
    with session(settings(user=None, scopes=("Mail.ReadWrite",), username=BOB)) as s:
        assert len(s.list_new(None, nothing_known).refs) == 1


def test_resolve_keeps_only_keys_still_in_the_folder(graph: GraphServer, settings: Settings) -> None:
    """After a crash, acknowledgements finish only for messages still in the folder."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(25)])
    graph.move_message(ALICE, ids[0], "archive")
    with session(settings()) as s:
        assert [r.key for r in s.resolve(ids + ["AAMkgone"])] == ids[1:]


def test_estimate(graph: GraphServer, settings: Settings) -> None:
    """From the folder's counts first (high), then exactly by delta; low after a lost token."""
    graph.deliver_many(ALICE, [message(i) for i in range(12)])
    graph.deliver(ALICE, message(12), is_read=True)
    with session(settings()) as s:
        first = s.estimate(None, nothing_known)
        assert (first.count, first.confidence) == (13, "high") and "12 unread" in first.note
        cursor = s.list_new(None, nothing_known).cursor
        graph.deliver_many(ALICE, [message(20), message(21)])
        assert (s.estimate(cursor, nothing_known).count, s.estimate(cursor, nothing_known).confidence) == (2, "exact")
        graph.expire_delta_tokens()
        assert s.estimate(cursor, nothing_known).confidence == "low"


def test_links_to_another_server_are_not_followed(graph: GraphServer, settings: Settings) -> None:
    """A stored delta link for another endpoint is a reset, never a request carrying the token there."""
    graph.deliver(ALICE, message(1))
    with session(settings()) as s:
        folder = s.folder()
        cursor = {"delta_link": "https://graph.example.net/v1.0/users/x/mailFolders/y/messages/delta?$deltatoken=1",
                  "folder_id": folder.id}
        listing = s.list_new(cursor, nothing_known)
    assert listing.reset and len(listing.refs) == 1


def test_transcript_has_no_token(graph: GraphServer, settings: Settings) -> None:
    """Debug lines show methods, paths and statuses; never the bearer token."""
    lines: list[str] = []
    token = graph.issue_token(ALICE)
    graph.deliver(ALICE, message(1))
    with session(settings(access_token=lambda: token, transcript=lines.append)) as s:
        list(s.fetch(s.list_new(None, nothing_known).refs))
    assert any(line.startswith("> GET /v1.0/users/alice@contoso.com/messages/") for line in lines)
    assert "< 200 OK" in lines
    assert not any(token in line for line in lines)


def test_listing_without_sizes_when_the_server_will_not_expand(graph: GraphServer, settings: Settings) -> None:
    """A 400 for the size expansion: the round runs again without it; nothing is lost."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(5)])
    graph.fail("delta", 400, "ErrorInvalidUrlQuery", "The expand is not supported.")
    with session(settings()) as s:
        listing = s.list_new(None, nothing_known)
    assert [r.key for r in listing.refs] == ids and all(r.size is None for r in listing.refs)
