"""Listing and downloading against a real Dovecot."""
from __future__ import annotations

from mailhost.protocols import ConnectionSettings, Encryption
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


NOV5 = 1793872800  # 5-Nov-2026 10:00:00 +0000, in seconds since the epoch


def nothing_known(keys: object) -> set[str]:
    return set()


def test_fetch_is_byte_exact_and_leaves_messages_unseen(settings, dovecot, mailbox):
    """Every message arrives exactly as stored, in the listing's order, still unseen."""
    odd = b"From: x@example.com\r\nSubject: 8-bit\r\n\r\n\xff\xfe\xc3\xa9 {5}\r\n) no CRLF at the end"
    messages = [generate_message(i, size=2000 + 500 * i) for i in range(5)] + [odd]
    dovecot.deliver_many(mailbox.user, messages)
    with PROVIDER.open(settings()) as session:
        listing = session.list_new(None, nothing_known)
        got = list(session.fetch(listing.refs))
    assert [raw for _, raw in got] == dovecot.maildir_messages(mailbox.user)
    assert [ref for ref, _ in got] == list(listing.refs)
    assert [ref.size for ref in listing.refs] == [len(raw) for raw in dovecot.maildir_messages(mailbox.user)]
    assert dovecot.flags(mailbox.user) == [""] * 6


def test_fetch_keeps_the_refs_order_and_skips_vanished(settings, dovecot, mailbox):
    """fetch yields in the order asked and leaves out messages deleted meanwhile."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(4)))
    with PROVIDER.open(settings()) as session:
        refs = session.list_new(None, nothing_known).refs
        session.delete([refs[1]])
        got = [ref.handle for ref, _ in session.fetch([refs[3], refs[1], refs[0]])]
    assert got == [4, 1]


def test_list_new_is_incremental_and_nothing_new_costs_no_fetch(settings, dovecot, mailbox):
    """A second pass lists only what came since; with nothing new only SELECT runs."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings()) as session:
        first = session.list_new(None, nothing_known)
    assert [ref.handle for ref in first.refs] == [1, 2, 3]
    assert first.cursor == {"uidvalidity": first.cursor["uidvalidity"], "last_uid": 3,
                            "witness": [3, first.cursor["witness"][1]]}
    assert {**first.refs[-1].cursor, "witness": first.cursor["witness"]} == first.cursor
    assert first.refs[0].key == f"{first.cursor['uidvalidity']}:1"

    lines: list[str] = []
    with PROVIDER.open(settings(transcript=lines.append)) as session:
        again = session.list_new(first.cursor, nothing_known)
    assert again.refs == [] and again.cursor == first.cursor and not again.reset
    assert not [line for line in lines if "FETCH" in line or "SEARCH" in line]

    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3, 5)))
    with PROVIDER.open(settings()) as session:
        more = session.list_new(first.cursor, nothing_known)
    assert [ref.handle for ref in more.refs] == [4, 5] and more.cursor["last_uid"] == 5


def test_last_plus_one_star_never_lists_the_highest_old_message(settings, dovecot, mailbox):
    """UID FETCH last+1:* returns the highest message even when it is old: it is dropped."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings()) as session:
        cursor = session.list_new(None, nothing_known).cursor
    dovecot.deliver(mailbox.user, generate_message(3))
    with PROVIDER.open(settings()) as session:  # UID 4 comes and goes: UIDNEXT 5, highest UID 3
        session.delete(session.list_new(cursor, nothing_known).refs)

    lines: list[str] = []
    with PROVIDER.open(settings(transcript=lines.append)) as session:
        listing = session.list_new(cursor, nothing_known)
        assert listing.refs == []
        assert any("UID FETCH 4:*" in line for line in lines)
        # the cursor moved up to UIDNEXT - 1, so the next poll needs no FETCH
        assert listing.cursor["last_uid"] == 4
        lines.clear()
        assert session.list_new(listing.cursor, nothing_known).refs == []
        assert not [line for line in lines if "FETCH" in line]


def test_empty_mailbox_records_its_uidvalidity(settings, dovecot, mailbox):
    """An empty folder still yields a cursor with its UIDVALIDITY."""
    with PROVIDER.open(settings()) as session:
        listing = session.list_new(None, nothing_known)
    assert listing.refs == [] and listing.cursor["last_uid"] == 0
    assert listing.cursor["uidvalidity"] == dovecot.uidvalidity(mailbox.user)


def test_uidvalidity_reset_lists_everything_again(settings, dovecot, mailbox):
    """A renumbered folder lists every message from UID 1 and says reset."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings()) as session:
        cursor = session.list_new(None, nothing_known).cursor
    dovecot.reset_uidvalidity(mailbox.user)
    with PROVIDER.open(settings()) as session:
        listing = session.list_new(cursor, nothing_known)
        estimate = session.estimate(cursor, nothing_known)
    assert listing.reset
    assert listing.cursor["uidvalidity"] != cursor["uidvalidity"]
    assert [ref.handle for ref in listing.refs] == [1, 2, 3]
    assert estimate.count == 3 and estimate.confidence == "low" and "recognised by content" in estimate.note


def test_uids_given_out_again_start_a_new_era_of_keys(settings, dovecot, mailbox):
    """A restored backup takes UIDNEXT back under the same UIDVALIDITY: everything is
    listed again under keys no stored one equals, and keys of the old era resolve to
    nothing (an acknowledgement left pending must not hit the mail that took its UID)."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(2)))
    with PROVIDER.open(settings()) as session:
        session.list_new(None, nothing_known)  # Dovecot numbers them: the backup holds its dovecot-uidlist
    backup = dovecot.backup(mailbox.user)
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(2, 5)))
    with PROVIDER.open(settings()) as session:
        before = session.list_new(None, nothing_known)  # UIDs 1-5
    dovecot.restore(mailbox.user, backup)
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(5, 7)))  # UIDs 3, 4 again
    with PROVIDER.open(settings()) as session:
        estimate = session.estimate(before.cursor, nothing_known)
        listing = session.list_new(before.cursor, nothing_known)
        assert session.resolve([ref.key for ref in before.refs]) == []
        again = session.list_new(listing.cursor, nothing_known)
    assert (estimate.count, estimate.confidence) == (4, "low") and "UIDNEXT went back" in estimate.note
    assert listing.reset and [ref.handle for ref in listing.refs] == [1, 2, 3, 4]
    assert not {ref.key for ref in listing.refs} & {ref.key for ref in before.refs}
    assert listing.cursor == {**before.cursor, "last_uid": 4, "era": 1, "witness": [4, listing.cursor["witness"][1]]}
    assert {**listing.refs[-1].cursor, "witness": listing.cursor["witness"]} == listing.cursor
    assert again.refs == [] and again.cursor == listing.cursor and not again.reset


def test_uids_given_out_again_past_the_cursor_start_a_new_era_too(settings, dovecot, mailbox):
    """A restored backup took UIDNEXT back, and more new mail came than the backup
    lacked, so UIDNEXT is past the cursor again: UIDs 3-5 hold new mail under keys
    already stored. The witness (UID 5, listed with its INTERNALDATE) now has another
    date: everything is listed again under keys of a new era, none of the new mail is lost."""
    day = 86400
    for i in range(2):
        dovecot.deliver(mailbox.user, generate_message(i), internaldate=NOV5)
    with PROVIDER.open(settings()) as session:
        session.list_new(None, nothing_known)  # Dovecot numbers them: the backup holds its dovecot-uidlist
    backup = dovecot.backup(mailbox.user)
    for i in range(2, 5):
        dovecot.deliver(mailbox.user, generate_message(i), internaldate=NOV5 + day)
    with PROVIDER.open(settings()) as session:
        before = session.list_new(None, nothing_known)  # UIDs 1-5
    dovecot.restore(mailbox.user, backup)
    for i in range(5, 9):  # UIDs 3-6
        dovecot.deliver(mailbox.user, generate_message(i), internaldate=NOV5 + 2 * day)
    with PROVIDER.open(settings()) as session:
        estimate = session.estimate(before.cursor, nothing_known)
        listing = session.list_new(before.cursor, nothing_known)
        again = session.list_new(listing.cursor, nothing_known)
    assert before.cursor["witness"] == [5, NOV5 + day]
    assert (estimate.count, estimate.confidence) == (6, "low")
    assert "UID 5, stored before, now holds another message" in estimate.note
    assert listing.reset and [ref.handle for ref in listing.refs] == [1, 2, 3, 4, 5, 6]
    assert not {ref.key for ref in listing.refs} & {ref.key for ref in before.refs}
    assert listing.cursor == {**before.cursor, "last_uid": 6, "era": 1, "witness": [6, NOV5 + 2 * day]}
    assert again.refs == [] and again.cursor == listing.cursor and not again.reset


def scripted(fake_imap, respond) -> ConnectionSettings:
    """Settings for a scripted server answering each command's words with ``respond``."""
    return ConnectionSettings(name="desk", protocol="imap", host="127.0.0.1",
                              port=fake_imap(lambda peer: peer.answer(respond)),
                              encryption=Encryption.NONE, username="u", password="p", timeout=5)


def lagging_folder(fake_imap, highest: int, uidnext: int) -> ConnectionSettings:
    """Settings for a scripted folder (UIDVALIDITY 7) holding UIDs 1 to ``highest``, of
    300 bytes each, UID n delivered on the n-th of November 2026, whose UIDNEXT says
    ``uidnext``."""
    def respond(words):
        verb, out = words[0].upper(), b""
        if verb == b"CAPABILITY":
            out = b"* CAPABILITY IMAP4rev1\r\n"
        elif verb == b"STATUS":
            out = b"* STATUS INBOX (MESSAGES %d UIDNEXT %d UIDVALIDITY 7)\r\n" % (highest, uidnext)
        elif verb == b"SELECT":
            out = b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT %d] ok\r\n" % (highest, uidnext)
        elif words[:2] == [b"UID", b"FETCH"]:
            dated = b"INTERNALDATE" in words[-1]
            out = b"".join(b"* %d FETCH (UID %d %s)\r\n" % (
                uid, uid, b'INTERNALDATE "%02d-Nov-2026 10:00:00 +0000"' % uid if dated else b"RFC822.SIZE 300")
                for uid in sorted(_uid_set(words[2], highest)))
        return out

    return scripted(fake_imap, respond)


def test_a_uidnext_below_the_uids_the_folder_holds_is_not_taken_for_a_restore(fake_imap):
    """A server whose UIDNEXT lags behind its own messages (UIDs 1-6, UIDNEXT 3) reuses
    no UID: the messages above the cursor are listed, and nothing is listed again."""
    with PROVIDER.open(lagging_folder(fake_imap, highest=6, uidnext=3)) as session:
        listing = session.list_new({"uidvalidity": 7, "last_uid": 5, "witness": [5, NOV5]}, nothing_known)
        again = session.list_new(listing.cursor, nothing_known)
        estimate = session.estimate({"uidvalidity": 7, "last_uid": 5, "witness": [5, NOV5]}, nothing_known)
    assert [ref.key for ref in listing.refs] == ["7:6"] and not listing.reset
    assert listing.cursor == {"uidvalidity": 7, "last_uid": 6, "witness": [6, NOV5 + 86400]} == again.cursor
    assert again.refs == [] and not again.reset
    assert (estimate.count, estimate.confidence) == (1, "exact")
    assert estimate.note == ("the server says the next UID in folder INBOX is 3, not above UIDs it holds (up to 6), "
                             "a server fault that gives no UID out again: the messages above UID 5, the last "
                             "stored, are counted, and downloaded, as listed")


def test_the_estimate_counts_what_a_pass_lists_above_a_uidnext_that_lags(fake_imap):
    """UIDs 1-8 in the folder, 4 stored, UIDNEXT 7: a pass lists UIDs 5-8, and the
    estimate counts the same four, not just the two below UIDNEXT."""
    with PROVIDER.open(lagging_folder(fake_imap, highest=8, uidnext=7)) as session:
        estimate = session.estimate({"uidvalidity": 7, "last_uid": 4}, nothing_known)
        listing = session.list_new({"uidvalidity": 7, "last_uid": 4}, nothing_known)
    assert [ref.handle for ref in listing.refs] == [5, 6, 7, 8]
    assert (estimate.count, estimate.confidence) == (4, "exact")
    assert "the next UID in folder INBOX is 7, not above UIDs it holds (up to 8)" in estimate.note


def _uid_set(uid_set: bytes, highest: int) -> set[int]:
    """The UIDs of an IMAP UID set (``1:3,5,7:*``) in a folder whose highest UID is ``highest``."""
    uids: set[int] = set()
    for part in uid_set.decode().split(","):
        first, _, last = part.partition(":")
        ends = [highest if end == "*" else int(end) for end in (first, last or first)]
        uids.update(range(min(ends), min(max(ends), highest) + 1))
    return uids


def test_estimate_counts_what_a_pass_would_download(settings, dovecot, mailbox):
    """First pass: every message; later: exactly the UIDs above the cursor."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(4)))
    with PROVIDER.open(settings()) as session:
        assert session.estimate(None, nothing_known).count == 4
        refs = session.list_new(None, nothing_known).refs
        cursor = refs[1].cursor  # two stored
        assert (session.estimate(cursor, nothing_known).count, session.estimate(cursor, nothing_known).confidence) == (2, "exact")
        session.delete([refs[3]])
        assert session.estimate(cursor, nothing_known).count == 1
        assert session.estimate(refs[3].cursor, nothing_known).count == 0


def test_resolve_finds_keys_still_on_the_server(settings, dovecot, mailbox):
    """resolve keeps keys of the current UIDVALIDITY whose message is still there."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings()) as session:
        refs = session.list_new(None, nothing_known).refs
        session.delete([refs[0]])
    with PROVIDER.open(settings()) as session:
        resolved = session.resolve([ref.key for ref in refs] + ["1:2"])
    assert resolved == list(refs[1:])


def test_all_encryptions_download_the_same(settings, dovecot, mailbox):
    """none, STARTTLS and SSL all list and fetch the mailbox."""
    dovecot.deliver(mailbox.user, generate_message(1))
    for encryption in Encryption:
        with PROVIDER.open(settings(encryption=encryption)) as session:
            (_, raw), = session.fetch(session.list_new(None, nothing_known).refs)
        assert raw == dovecot.maildir_messages(mailbox.user)[0]


def test_many_refs_are_split_into_short_commands(settings, dovecot, mailbox):
    """Scattered UIDs are fetched with compact sets no longer than the server takes."""
    dovecot.deliver_many(mailbox.user, (generate_message(i, size=300) for i in range(3000)))
    with PROVIDER.open(settings()) as session:
        refs = session.list_new(None, nothing_known).refs[::2]  # 1,3,5,...: no ranges
        got = list(session.fetch(refs))
    assert [ref for ref, _ in got] == list(refs)


def test_a_message_the_server_cannot_send_stops_the_batch_there(settings, dovecot, mailbox):
    """A message file that grew behind Dovecot's back (its size is in its name): Dovecot
    sends the literal's size, then drops the link. What came whole before it is still
    yielded (the host stores it), and the error names the message."""
    import pytest
    from mailhost.errors import ConnectFailure

    paths = [dovecot.deliver(mailbox.user, generate_message(i)) for i in range(3)]
    with open(paths[1], "ab") as grown:
        grown.write(b"appended in place\r\n")
    got = []
    with PROVIDER.open(settings()) as session:
        refs = session.list_new(None, nothing_known).refs
        with pytest.raises(ConnectFailure, match=r"of message UID 2; if that repeats, the server's log says why"):
            for ref, raw in session.fetch(refs):
                got.append((ref, raw))
    assert got == [(refs[0], dovecot.maildir_messages(mailbox.user)[0])]


def test_every_legal_body_form_is_read_and_none_is_skipped_while_still_there(fake_imap):
    """A server may answer in lower case, with a literal8 (RFC 3516), with a quoted
    string, or with NIL. The first three are read; a message the server still lists but
    sent no content for fails the batch (the host would move its cursor past it), while
    one that is gone is left out."""
    import pytest
    from mailhost.errors import TemporaryFailure
    from mailhost.protocols import MessageRef

    raw = b"Subject: hi\r\n\r\nbody {3}\r\n"
    answers = {
        1: b"* 1 fetch (uid 1 body[] {%d}\r\n%s)\r\n" % (len(raw), raw),
        2: b"* 2 FETCH (UID 2 BODY[] ~{%d}\r\n%s)\r\n" % (len(raw), raw),
        3: b'* 3 FETCH (UID 3 BODY[] "tiny \\"quoted\\" \\\\ message")\r\n',
        4: b"* 4 FETCH (FLAGS (\\Seen) UID 4)\r\n* 4 FETCH (BODY[] {%d}\r\n%s UID 4)\r\n" % (len(raw), raw),
        5: b"* 5 FETCH (UID 5 BODY[] NIL)\r\n",
    }
    listed = {1, 2, 3, 4, 5}  # UID 6 is gone: no answer, and the server no longer lists it

    def uids(uid_set: bytes) -> list[int]:
        return [uid for part in uid_set.split(b",") for first, _, last in [part.partition(b":")]
                for uid in range(int(first), int(last or first) + 1)]

    def respond(words):
        verb, out = words[0].upper(), b""
        if verb == b"CAPABILITY":
            out = b"* CAPABILITY IMAP4rev1 UIDPLUS\r\n"
        elif verb == b"SELECT":
            out = b"* 5 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 7] ok\r\n"
        elif words[:2] == [b"UID", b"FETCH"] and b"RFC822.SIZE" in b" ".join(words):  # which are still there
            out = b"".join(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (uid, uid, len(raw))
                           for uid in uids(words[2]) if uid in listed)
        elif words[:2] == [b"UID", b"FETCH"]:
            out = b"".join(answers.get(uid, b"") for uid in uids(words[2]))
        return out

    conn = scripted(fake_imap, respond)
    refs = {uid: MessageRef(f"7:{uid}", handle=uid) for uid in range(1, 7)}
    with PROVIDER.open(conn) as session:
        got = {ref.handle: body for ref, body in session.fetch([refs[uid] for uid in (1, 2, 3, 4, 6)])}
        assert got == {1: raw, 2: raw, 3: b'tiny "quoted" \\ message', 4: raw}
        with pytest.raises(TemporaryFailure, match=r"sent no content for 1 message\(s\) .* \(UID 5\): the next pass"):
            list(session.fetch([refs[4], refs[5], refs[6]]))


def test_estimate_counts_more_new_uids_than_a_search_line_holds(fake_imap):
    """200,000 new messages: the UID SEARCH answer would be one 1.3 MB line, longer than
    imaplib reads; the count still comes (listed as a pass would list them)."""
    new = range(2, 200_002)

    def respond(words):
        verb, out = words[0].upper(), b""
        if verb == b"CAPABILITY":
            out = b"* CAPABILITY IMAP4rev1\r\n"
        elif verb == b"STATUS":
            out = b"* STATUS INBOX (MESSAGES 200001 UIDNEXT 200002 UIDVALIDITY 7)\r\n"
        elif verb == b"SELECT":
            out = b"* 200001 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 200002] ok\r\n"
        elif words[:2] == [b"UID", b"SEARCH"]:
            out = b"* SEARCH " + b" ".join(b"%d" % uid for uid in new) + b"\r\n"
        elif words[:2] == [b"UID", b"FETCH"] and words[2] == b"2:*":
            out = b"".join(b"* %d FETCH (UID %d RFC822.SIZE 300)\r\n" % (uid, uid) for uid in new)
        return out

    conn = scripted(fake_imap, respond)
    with PROVIDER.open(conn) as session:
        estimate = session.estimate({"uidvalidity": 7, "last_uid": 1}, nothing_known)
    assert (estimate.count, estimate.confidence) == (200_000, "exact")


def test_a_listing_in_any_shape_gives_every_uid_and_size(fake_imap):
    """Listing lines as Dovecot writes them are read a buffer at a time; the other
    shapes servers use (items in another order or case, unsolicited FETCH and EXISTS
    lines among them) still count, wherever they fall in those buffers."""
    def line(uid: int) -> bytes:
        if uid % 97 == 0:
            return b"* %d fetch (rfc822.size %d uid %d)\r\n" % (uid, uid + 10, uid)
        if uid % 89 == 0:
            return b"* %d FETCH (FLAGS (\\Seen))\r\n* 4000 EXISTS\r\n* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (
                uid, uid, uid, uid + 10)
        return b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (uid, uid, uid + 10)

    def respond(words):
        verb, out = words[0].upper(), b""
        if verb == b"CAPABILITY":
            out = b"* CAPABILITY IMAP4rev1\r\n"
        elif verb == b"SELECT":
            out = b"* 3000 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 3001] ok\r\n"
        elif words[:2] == [b"UID", b"FETCH"] and b"RFC822.SIZE" in b" ".join(words):
            out = b"".join(line(uid) for uid in range(1, 3001))
        elif words[:2] == [b"UID", b"FETCH"]:
            out = b'* 3000 FETCH (UID 3000 INTERNALDATE "01-Nov-2026 10:00:00 +0000")\r\n'
        return out

    conn = scripted(fake_imap, respond)
    with PROVIDER.open(conn) as session:
        listing = session.list_new(None, nothing_known)
    assert [(ref.handle, ref.size) for ref in listing.refs] == [(uid, uid + 10) for uid in range(1, 3001)]
