"""The after-download primitives: mark seen, delete, move; each safe to repeat."""
from __future__ import annotations

import pytest
from tests.servers.dovecot import ACL_CONFIG, generate_message

from mailhost_imap import PROVIDER

# Dovecot advertising neither MOVE nor UIDPLUS (the commands still work; we must not use them).
OLD_SERVER = "imap_capability = IMAP4rev1 LITERAL+ SASL-IR IDLE NAMESPACE UNSELECT CHILDREN\n"


def listed(session):
    return session.list_new(None, lambda keys: set()).refs


def message_ids(dovecot, user, folder="INBOX"):
    return sorted(dovecot.flags_by_message_id(user, folder))


def test_mark_seen_sets_seen_and_repeats_safely(settings, dovecot, mailbox):
    """mark_seen flags exactly the given messages, twice without harm."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings()) as session:
        refs = listed(session)
        session.mark_seen(refs[:2])
        session.mark_seen(refs[:2])
    assert dovecot.flags(mailbox.user) == ["S", "S", ""]


def test_delete_expunges_only_the_given_messages(settings, dovecot, mailbox):
    """delete removes exactly its messages (UID EXPUNGE), not others flagged deleted."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    dovecot.deliver(mailbox.user, generate_message(3), flags="T")  # someone else's \Deleted
    with PROVIDER.open(settings()) as session:
        refs = listed(session)
        session.delete(refs[:2])
        session.delete(refs[:2])  # after a crash: already gone, no error
    assert dovecot.flags(mailbox.user) == ["", "T"]


def test_move_creates_the_target_folder(settings, dovecot, mailbox):
    """move puts the messages in a new Archive/2024 folder, and repeats safely."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(3)))
    before = dovecot.flags_by_message_id(mailbox.user)
    with PROVIDER.open(settings()) as session:
        refs = listed(session)
        session.move(refs[:2], "Archive/2024")
        session.move(refs[:2], "Archive/2024")
    assert "Archive/2024" in dovecot.folders(mailbox.user)
    assert "Archive/2024" in dovecot.subscriptions(mailbox.user)
    moved = message_ids(dovecot, mailbox.user, "Archive/2024")
    assert len(moved) == 2 and len(message_ids(dovecot, mailbox.user)) == 1
    assert sorted(moved + message_ids(dovecot, mailbox.user)) == sorted(before)


def test_move_into_an_existing_localized_folder(settings, dovecot, mailbox):
    """move reaches an existing non-ASCII subfolder."""
    dovecot.create_folder(mailbox.user, "Posteingang/Erledigt ✓")
    dovecot.deliver(mailbox.user, generate_message(1))
    with PROVIDER.open(settings()) as session:
        session.move(listed(session), "Posteingang/Erledigt ✓")
    assert len(dovecot.maildir_messages(mailbox.user, "Posteingang/Erledigt ✓")) == 1
    assert dovecot.maildir_messages(mailbox.user) == []


@pytest.fixture
def old_server(dovecot_factory, pki):
    """A Dovecot that advertises neither MOVE nor UIDPLUS, and a user on it."""
    server = dovecot_factory(extra_config=OLD_SERVER)
    return server, server.new_user("old")


def test_without_uidplus_delete_expunges_only_when_safe(settings, old_server):
    """Without UIDPLUS, EXPUNGE waits while a message not yet stored is flagged deleted."""
    server, (user, password) = old_server
    server.deliver_many(user, (generate_message(i) for i in range(3)))
    server.deliver(user, generate_message(3), flags="T")  # flagged by someone else
    conn = settings(server, username=user, password=password)
    with PROVIDER.open(conn) as session:
        assert not session.client.has_capability("UIDPLUS")
        refs = listed(session)
        session.delete(refs[:1])
    assert server.flags(user) == ["T", "", "", "T"]  # UID 4 is not stored yet: no EXPUNGE

    with PROVIDER.open(conn) as session:
        session.delete(refs[1:])  # now every flagged message is stored
        session.delete(refs[1:])
    assert server.flags(user) == []


def test_without_move_copies_then_deletes(settings, old_server):
    """Without MOVE, move copies into the (new) folder and deletes the originals."""
    server, (user, password) = old_server
    server.deliver_many(user, (generate_message(i) for i in range(2)))
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        assert not session.client.has_capability("MOVE")
        session.move(listed(session), "Done/Sub")
    assert len(server.maildir_messages(user, "Done/Sub")) == 2
    assert server.maildir_messages(user) == []


def test_a_folder_the_user_may_only_read_is_downloaded_and_never_acknowledged(settings, dovecot_factory):
    """SELECT answers OK [READ-ONLY] (imaplib raises on it): the folder is still listed
    and downloaded; mark seen and delete, which the server would answer OK and ignore,
    and a copy-then-delete move, which would copy again every pass, are refused."""
    from mailhost.errors import PermanentFailure

    server = dovecot_factory(extra_config=ACL_CONFIG + OLD_SERVER)
    user, password = server.new_user("ro")
    server.deliver_many(user, (generate_message(i) for i in range(2)))
    (server.maildir(user) / "dovecot-acl").write_text("owner lr\n")  # lookup and read
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        refs = listed(session)
        assert [raw for _, raw in session.fetch(refs)] == server.maildir_messages(user)
        for act in (lambda: session.mark_seen(refs), lambda: session.delete(refs),
                    lambda: session.move(refs, "Archive")):
            with pytest.raises(PermanentFailure, match=r"cannot \w+ messages.*: it lets this user only read "
                                                        r"folder INBOX \(READ-ONLY\)"):
                act()
    assert server.flags(user) == ["", ""] and server.folders(user) == ["INBOX"]


def test_a_flag_the_server_does_not_keep_is_not_taken_for_done(settings, dovecot_factory):
    """Read-write, but the user may set only \\Seen (PERMANENTFLAGS): a delete, which
    the server would answer OK without flagging anything, is refused; mark seen works."""
    from mailhost.errors import PermanentFailure

    server = dovecot_factory(extra_config=ACL_CONFIG)
    user, password = server.new_user("rs")
    server.deliver(user, generate_message(1))
    (server.maildir(user) / "dovecot-acl").write_text("owner lrs\n")  # lookup, read, seen
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        refs = listed(session)
        with pytest.raises(PermanentFailure, match=r"cannot delete messages: it does not let this user set "
                                                    r"the flag \\Deleted in folder INBOX \(it keeps only \\Seen\)"):
            session.delete(refs)
        session.mark_seen(refs)
    assert server.flags(user) == ["S"]


@pytest.mark.parametrize("target", ["existing", "missing"])
@pytest.mark.parametrize("server_kind", ["move", "copy"])
def test_move_after_another_client_expunged_one_moves_the_rest(settings, dovecot, mailbox, request, server_kind,
                                                               target):
    """Another client expunges one of the messages between download and move: Dovecot
    refuses the whole UID MOVE (or COPY) with [EXPUNGEISSUED]; the others still move,
    also when the target folder is missing at first (Dovecot then says [TRYCREATE]
    first, and [EXPUNGEISSUED] only once the folder is created)."""
    import imaplib

    server, (user, password) = (dovecot, mailbox) if server_kind == "move" else request.getfixturevalue("old_server")
    if target == "existing":
        server.create_folder(user, "Done")
    server.deliver_many(user, (generate_message(i) for i in range(3)))
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        refs = listed(session)
        other = imaplib.IMAP4("127.0.0.1", server.imap_port)
        other.login(user, password)
        other.select("INBOX")
        other.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
        other.expunge()
        other.logout()
        session.move(refs, "Done")
    assert len(server.maildir_messages(user, "Done")) == 2 and server.maildir_messages(user) == []


def test_an_expunge_the_server_ignores_is_not_taken_for_done(settings, dovecot_factory):
    """A user who may flag \\Deleted but not expunge: Dovecot answers the EXPUNGE "OK
    Expunge ignored", so delete looks and refuses; a move without MOVE copies once,
    however often it is tried again."""
    from mailhost.errors import PermanentFailure

    server = dovecot_factory(extra_config=ACL_CONFIG + OLD_SERVER)
    user, password = server.new_user("ne")
    server.deliver_many(user, (generate_message(i) for i in range(2)))
    (server.maildir(user) / "dovecot-acl").write_text("owner lrst\n")  # lookup, read, seen, \Deleted
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        refs = listed(session)
        for _ in range(2):
            with pytest.raises(PermanentFailure, match=r"cannot delete messages: it kept 2 of them in folder INBOX "
                                                        r"after EXPUNGE \(UID 1, 2\); the user may not have the right"):
                session.move(refs, "Archive")
    assert len(server.maildir_messages(user, "Archive")) == 2 and server.flags(user) == ["T", "T"]


def test_move_into_the_folder_read_under_another_spelling_is_refused(settings, dovecot, mailbox):
    """Dovecot takes inbox/Sub for INBOX/Sub: a move there would put the mail back where
    each pass finds it again. It is refused, and the mail stays as it was."""
    from mailhost.errors import PermanentFailure

    dovecot.deliver(mailbox.user, generate_message(1), folder="INBOX/Sub")
    with PROVIDER.open(settings(folder="INBOX/Sub")) as session:
        listing = session.list_new(None, lambda keys: set())
        with pytest.raises(PermanentFailure, match="cannot move messages to folder inbox/Sub: it takes that for "
                                                   "folder INBOX/Sub, which this connection downloads from"):
            session.move(listing.refs, "inbox/Sub")
        assert session.list_new(listing.cursor, lambda keys: set()).refs == []


#: Dovecot's quota plugin: 20 KB for each user, answered NO [OVERQUOTA] (RFC 5530) past it.
QUOTA = ("mail_plugins = $mail_plugins quota\nprotocol imap {\n  mail_plugins = $mail_plugins quota imap_quota\n}\n"
         "plugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=20K\n}\n")


def test_a_move_refused_over_quota_is_temporary_and_says_to_free_space(settings, dovecot_factory, mh):
    """Without MOVE, a move copies first, and a copy counts against the quota: Dovecot
    answers NO [OVERQUOTA]. Quota frees up, so the pass fails as temporary, with the
    messages stored, nothing deleted, and the fix: free space or raise the quota."""
    from mailhost.connections import ConnectionSpec
    from mailhost.errors import TemporaryFailure
    from mailhost.protocols import Direction

    server = dovecot_factory(extra_config=QUOTA + OLD_SERVER)
    user, password = server.new_user("full")
    server.deliver_many(user, (generate_message(i, size=3000) for i in range(5)))  # 15 KB; copied: 30 KB
    with PROVIDER.open(settings(server, username=user, password=password)) as session:
        with pytest.raises(TemporaryFailure, match=r"refused to move messages to folder Archive because the "
                                                   r"mailbox is over its quota \(the server said: \[OVERQUOTA\] .*\): "
                                                   r"free space in it \(its Trash, old mail\) or have its quota raised"):
            session.move(listed(session), "Archive")
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="full", protocol="imap", host="127.0.0.1", port=server.imaps_port, encryption="ssl", username=user,
        password=password, ca_file=server.ca_file, after_download="move", after_download_argument="Archive"))
    report = mh.incoming.fetch_one("full")
    assert (report.ok, report.stored, report.acknowledged) == (False, 5, 0)
    assert "over its quota" in (report.error or "") and "the messages are stored" in (report.error or "")
    assert len(server.maildir_messages(user)) == 5 and server.maildir_messages(user, "Archive") == []
