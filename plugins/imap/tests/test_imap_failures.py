"""Links that break: every failure is a mailhost error naming the connection."""
from __future__ import annotations

import time

import pytest
from mailhost.errors import ConnectFailure, PermanentFailure, TemporaryFailure
from mailhost.protocols import ConnectionSettings, Encryption
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


def test_server_restart_mid_pass_is_temporary(settings, dovecot_factory):
    """A link dropped between listing and download fails as temporary; close still works."""
    server = dovecot_factory()
    server.deliver_many("alice", (generate_message(i) for i in range(3)))
    session = PROVIDER.open(settings(server, username="alice", password="alice-pw"))
    refs = session.list_new(None, lambda keys: set()).refs
    server.restart()
    with pytest.raises(TemporaryFailure, match="helpdesk on 127.0.0.1") as failed:
        list(session.fetch(refs))
    assert isinstance(failed.value, ConnectFailure)
    session.close()
    session.close()
    with PROVIDER.open(settings(server, username="alice", password="alice-pw")) as again:
        assert len(list(again.fetch(refs))) == 3


def test_silent_server_times_out(fake_imap):
    """A server that never greets fails after the connection's timeout, with the fix."""

    def script(peer):
        peer.file.read()  # say nothing until the client gives up

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.NONE, username="u", password="p", timeout=0.3)
    with pytest.raises(ConnectFailure, match="did not answer within 0.3 s .* encryption setting matches the port"):
        PROVIDER.open(conn)


def test_not_an_imap_server(fake_imap):
    """A server greeting like SMTP is refused with a hint at the host and port."""

    def script(peer):
        peer.send(b"220 smtp.example.org ESMTP ready\r\n")
        peer.file.read()

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.NONE, username="u", password="p", timeout=5)
    with pytest.raises(PermanentFailure, match="does not greet like an IMAP server .* check the host and the port"):
        PROVIDER.open(conn)


DRIPPED = [b"Subject: one\r\n\r\nbody one\r\n", b"Subject: two\r\n\r\n" + b"x" * 3000 + b"\r\n"]


def answer_like_dovecot(words: list[bytes], stored: list[bytes]) -> bytes:
    """The untagged lines Dovecot answers ``words`` with, in a folder of the two messages
    :data:`DRIPPED` (UIDs 1 and 2); ``UID STORE`` commands land in ``stored``."""
    verb = words[0].upper()
    if verb == b"CAPABILITY":
        return b"* CAPABILITY IMAP4rev1 UIDPLUS MOVE\r\n"
    if verb == b"SELECT":
        return (b"* FLAGS (\\Seen \\Deleted)\r\n* OK [PERMANENTFLAGS (\\Seen \\Deleted)] ok\r\n"
                b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 3] ok\r\n")
    if words[:2] == [b"UID", b"STORE"]:
        stored.append(b" ".join(words[2:]))
        return b""
    if words[:2] != [b"UID", b"FETCH"]:
        return b""
    first, _, last = words[2].partition(b":")
    top = 2 if last == b"*" else int(last or first)
    uids = [uid for uid in (1, 2) if int(first) <= uid <= top]
    if b"RFC822.SIZE" in b" ".join(words):
        return b"".join(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (uid, uid, len(DRIPPED[uid - 1]))
                        for uid in uids)
    if b"INTERNALDATE" in b" ".join(words):
        return b"".join(b'* %d FETCH (UID %d INTERNALDATE "05-Nov-2026 10:00:0%d +0000")\r\n' % (uid, uid, uid)
                        for uid in uids)
    return b"".join(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (uid, uid, len(DRIPPED[uid - 1]),
                                                                    DRIPPED[uid - 1]) for uid in uids)


def dripping_server(drips: list[bool], stored: list[bytes], tls: bool = False):
    """A script answering like Dovecot for two messages (over implicit TLS with ``tls``);
    while ``drips[0]`` holds, the literal of UID 2 comes half at once and then a byte
    every 0.05 s, each well within any read's timeout. ``UID STORE`` commands land in
    ``stored``."""

    def respond(peer, words):
        if not (drips[0] and words[:2] == [b"UID", b"FETCH"] and b"BODY" in words[-1].upper()):
            return answer_like_dovecot(words, stored)
        first, _, last = words[2].partition(b":")
        top = 2 if last == b"*" else int(last or first)
        out = b""
        for uid in [uid for uid in (1, 2) if int(first) <= uid <= top]:
            raw = DRIPPED[uid - 1]
            answer = b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (uid, uid, len(raw), raw)
            if uid == 2:
                peer.send(out + answer[: len(answer) // 2])
                for at in range(len(answer) // 2, len(answer)):
                    time.sleep(0.05)
                    peer.send(answer[at : at + 1])
                answer, out = b"", b""
            out += answer
        return out

    def script(peer):
        if tls:
            peer.starttls()  # from the first byte
        peer.answer(lambda words: respond(peer, words))

    return script


@pytest.mark.parametrize("encryption", [Encryption.NONE, Encryption.SSL])
def test_a_dripping_fetch_is_cut_off_after_the_whole_messages(fake_imap, pki, encryption):
    """A server that sends the literal of UID 2 a byte at a time, each byte within the
    read timeout, never times a read out: the stall guard ends the download with a
    TemporaryFailure naming the server, the message and what to do; UID 1, which came
    whole, is still handed over."""
    port = fake_imap(dripping_server([True], [], tls=encryption is Encryption.SSL))
    conn = ConnectionSettings(name="desk", protocol="imap", host="localhost", port=port, encryption=encryption,
                              ca_file=pki.ca_file, username="u", password="p", timeout=0.3)
    got = []
    with PROVIDER.open(conn) as session:
        with pytest.raises(TemporaryFailure) as failure:
            for ref, raw in session.fetch(session.list_new(None, lambda keys: set()).refs):
                got.append(raw)
    assert got == DRIPPED[:1] and not isinstance(failure.value, ConnectFailure)
    assert (f"desk on localhost:{port} sent message UID 2 from folder INBOX so slowly that neither a message "
            "nor 64 KiB of one came in 1.2 s (4 times the connection's timeout of 0.3 s)") in str(failure.value)
    assert "the next pass goes on from there" in str(failure.value) and "raise the timeout" in str(failure.value)


def _desk(mh, port: int) -> int:
    """Add the incoming connection "desk" to the scripted server on ``port``; returns the port."""
    from mailhost.connections import ConnectionSpec
    from mailhost.protocols import Direction

    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="imap", host="127.0.0.1", port=port, encryption="none", username="u", password="p",
        timeout=300))
    return port


def test_a_pass_a_server_drips_stores_what_came_whole_and_the_next_resumes(fake_imap, mh):
    """The dripped pass ends (and with it the lease its keeper renews) not ok, with UID 1
    stored and not yet marked seen; the next pass marks it seen, then brings UID 2."""
    drips, stored = [True], []
    port = _desk(mh, fake_imap(dripping_server(drips, stored), connections=2))
    first = mh.incoming.fetch_one("desk")
    assert (first.ok, first.stored, stored) == (False, 1, [])
    assert (first.error or "").startswith(f"desk on 127.0.0.1:{port} sent message UID 2 from folder INBOX so slowly")
    drips[0] = False
    second = mh.incoming.fetch_one("desk")
    assert (second.ok, second.listed, second.stored, second.acknowledged) == (True, 1, 1, 2)
    assert stored == [b"1 +FLAGS.SILENT (\\Seen)", b"2 +FLAGS.SILENT (\\Seen)"]
    assert [mh.incoming.item(item.id).raw for item in reversed(mh.incoming.items())] == DRIPPED


def test_a_big_message_that_comes_slowly_but_steadily_is_not_cut_off(fake_imap):
    """384 KiB at 8 KiB every 0.05 s takes longer than the stall guard's 2 s, but every
    64 KiB of it comes well within them: the guard counts pieces, not whole messages."""
    raw = b"Subject: big\r\n\r\n" + (b"y" * 1022 + b"\r\n") * 384

    def respond(peer, words):
        verb = words[0].upper()
        if verb == b"CAPABILITY":
            return b"* CAPABILITY IMAP4rev1\r\n"
        if verb == b"SELECT":
            return b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 2] ok\r\n"
        if words[:2] == [b"UID", b"FETCH"] and b"RFC822.SIZE" in b" ".join(words):
            return b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % len(raw)
        if words[:2] == [b"UID", b"FETCH"] and b"INTERNALDATE" in b" ".join(words):
            return b'* 1 FETCH (UID 1 INTERNALDATE "05-Nov-2026 10:00:00 +0000")\r\n'
        if words[:2] == [b"UID", b"FETCH"]:
            answer = b"* 1 FETCH (UID 1 BODY[] {%d}\r\n%s)\r\n" % (len(raw), raw)
            for at in range(0, len(answer), 8192):
                time.sleep(0.05)
                peer.send(answer[at : at + 8192])
        return b""

    conn = ConnectionSettings(name="desk", protocol="imap", host="127.0.0.1",
                              port=fake_imap(lambda peer: peer.answer(lambda words: respond(peer, words))),
                              encryption=Encryption.NONE, username="u", password="p", timeout=0.5)
    with PROVIDER.open(conn) as session:
        assert [body for _, body in session.fetch(session.list_new(None, lambda keys: set()).refs)] == [raw]



def busy_server(busy: list[bytes], stored: list[bytes]):
    """A script answering like Dovecot (:func:`answer_like_dovecot`), except that it
    answers the command whose words start with ``busy`` with an endless slow stream of
    untagged ``* OK`` lines (Dovecot's "Hang in there.." of a long command), each well
    within any read's timeout, for 20 s; then it hangs up."""

    def respond(peer, words):
        if [word.upper() for word in words[: len(busy)]] == busy:
            for _ in range(400):
                time.sleep(0.05)
                peer.send(b"* OK Hang in there..\r\n")
            raise OSError("hung up: the client never gave up")
        return answer_like_dovecot(words, stored)

    return lambda peer: peer.answer(lambda words: respond(peer, words))


@pytest.mark.parametrize(("busy", "answer"), [
    ([b"CAPABILITY"], "its answer to CAPABILITY"),
    ([b"LOGIN"], "its answer to LOGIN"),
    ([b"SELECT"], "its answer to SELECT"),
    ([b"UID", b"FETCH"], "its answer to UID FETCH from folder INBOX"),  # the listing: a * OK line is no message
    ([b"UID", b"STORE"], "its answer to UID STORE"),
], ids=["capability", "login", "select", "listing", "store"])
def test_a_command_the_server_answers_with_an_endless_drip_is_cut_off(fake_imap, busy, answer):
    """Not only the download: the sign-in, SELECT, the listing and the after-download
    STORE each end within the stall guard's allowance when the server drips ``* OK``
    lines at them, with a TemporaryFailure naming the connection, the server and the command."""
    port = fake_imap(busy_server(busy, []))
    conn = ConnectionSettings(name="desk", protocol="imap", host="127.0.0.1", port=port, encryption=Encryption.NONE,
                              username="u", password="p", timeout=0.3)
    with pytest.raises(TemporaryFailure) as failure:
        with PROVIDER.open(conn) as session:
            session.mark_seen(session.list_new(None, lambda keys: set()).refs)
    assert not isinstance(failure.value, ConnectFailure)
    assert str(failure.value).startswith(
        f"desk on 127.0.0.1:{port} sent {answer} so slowly that neither all of it nor 64 KiB of it came in 1.2 s "
        "(4 times the connection's timeout of 0.3 s), so mailhost closed the link: the next pass tries again"
    ), str(failure.value)
    assert "raise the timeout" in str(failure.value)


def test_a_pass_whose_store_the_server_drips_ends_with_the_mail_stored(fake_imap, mh):
    """The pass ends (and with it the lease its keeper renews) not ok, naming UID STORE,
    with both messages stored; the next pass marks them seen and stores nothing twice."""
    busy, stored = [b"UID", b"STORE"], []
    port = _desk(mh, fake_imap(busy_server(busy, stored), connections=2))
    first = mh.incoming.fetch_one("desk")
    assert (first.ok, first.stored, stored) == (False, 2, [])
    assert f"desk on 127.0.0.1:{port} sent its answer to UID STORE so slowly" in (first.error or ""), first.error
    busy[:] = [b"NOTHING"]
    second = mh.incoming.fetch_one("desk")
    assert (second.ok, second.listed, second.stored, second.acknowledged) == (True, 0, 0, 2)
    assert stored == [b"1:2 +FLAGS.SILENT (\\Seen)"]
    assert [mh.incoming.item(item.id).raw for item in reversed(mh.incoming.items())] == DRIPPED
