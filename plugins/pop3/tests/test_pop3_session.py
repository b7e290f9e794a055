"""The POP3 session against a real Dovecot (dovecot-pop3d)."""
from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from mailhost.errors import AuthenticationFailed, ConnectFailure, TemporaryFailure, TLSFailure
from mailhost.protocols import ConnectionSettings, Encryption, MessageRef
import mailhost_pop3
from mailhost_pop3 import PROVIDER, Pop3Session, open_session
from tests.servers.dovecot import Dovecot, generate_message
from tests.servers.fixtures import Mailbox

DOTTY = (
    b"Subject: lines that start with a dot\r\n"
    b"Message-ID: <dotty@mailhost.test>\r\n"
    b"\r\n"
    b".\r\n"
    b"..\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b"a line\r\n"
    b".\r\n"
    b"\r\n"
    b".\r\n"
)


def settings(dc: Dovecot, box: Mailbox, encryption: Encryption = Encryption.NONE, **kw: Any) -> ConnectionSettings:
    """Settings for ``box`` on ``dc`` (localhost, so the certificate's name matches)."""
    port = dc.pop3s_port if encryption is Encryption.SSL else dc.pop3_port
    given: dict[str, Any] = {"host": "localhost", "port": port, "username": box.user, "password": box.password,
                             "ca_file": dc.ca_file, **kw}
    return ConnectionSettings(name="helpdesk", protocol="pop3", encryption=encryption, timeout=10, **given)


def nothing_known(keys: Any) -> set[str]:
    """A store that holds nothing yet."""
    return set()


def fetch_all(session: Pop3Session, known: Callable[[Any], set[str]] = nothing_known) -> list[bytes]:
    """Every new message of the session, in order."""
    return [raw for _, raw in session.fetch(session.list_new(None, known).refs)]


def test_provider_declares_pop3() -> None:
    """The provider is incoming pop3 on 110/995, without Folder, keeping by default."""
    assert PROVIDER.name == "pop3" and PROVIDER.direction.value == "incoming"
    assert dict(PROVIDER.default_ports) == {Encryption.NONE: 110, Encryption.STARTTLS: 110, Encryption.SSL: 995}
    from mailhost_pop3 import _session

    assert PROVIDER.default_ports == _session.DEFAULT_PORTS  # one declaration, beside the provider
    assert "folder" not in PROVIDER.attributes and "shared_mailbox" in PROVIDER.attributes
    assert PROVIDER.after_download == ("keep", "delete")
    assert PROVIDER.connect_modes == {"password", "oauth2"}


def test_fetch_is_byte_exact(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Messages come back byte for byte, dot-stuffed lines included."""
    dovecot.deliver(mailbox.user, generate_message(1))
    dovecot.deliver(mailbox.user, DOTTY)
    dovecot.deliver(mailbox.user, generate_message(2, 200_000))
    with open_session(settings(dovecot, mailbox)) as session:
        got = fetch_all(session)
    assert got == dovecot.maildir_messages(mailbox.user)
    assert got[1] == DOTTY


def test_listing_carries_uidl_number_and_size(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A ref's key is the UIDL, its handle the message number, its size from LIST."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(3)])
    with open_session(settings(dovecot, mailbox)) as session:
        listing = session.list_new(None, nothing_known)
    assert [r.handle for r in listing.refs] == [1, 2, 3]
    assert len({r.key for r in listing.refs}) == 3
    assert [r.size for r in listing.refs] == [len(m) for m in dovecot.maildir_messages(mailbox.user)]
    assert listing.cursor is None and all(r.cursor is None for r in listing.refs)


def test_only_unknown_uidls_are_new(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A pass lists only messages whose UIDL the store does not know."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(3)])
    with open_session(settings(dovecot, mailbox)) as session:
        stored = {ref.key for ref in session.list_new(None, nothing_known).refs}
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(3, 5)])
    asked: list[str] = []

    def known(keys: Any) -> set[str]:
        asked.extend(keys)
        return stored & set(keys)

    with open_session(settings(dovecot, mailbox)) as session:
        assert session.estimate(None, known).count == 2
        got = fetch_all(session, known)
        assert session.estimate(None, lambda keys: set(keys)).confidence == "exact"
    assert got == dovecot.maildir_messages(mailbox.user)[3:]
    assert stored <= set(asked)


def test_keep_leaves_messages_on_the_server(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Downloading without deleting leaves every message in the mailbox."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(3)])
    before = dovecot.maildir_messages(mailbox.user)
    with open_session(settings(dovecot, mailbox)) as session:
        fetch_all(session)
    assert session.closed_cleanly
    assert dovecot.maildir_messages(mailbox.user) == before


def test_delete_takes_effect_at_quit(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """DELE removes messages once QUIT succeeds, and close() says so."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(4)])
    session = open_session(settings(dovecot, mailbox))
    refs = session.list_new(None, nothing_known).refs
    session.delete(refs[:3])
    session.delete(refs[:1])  # again, as after a crash: harmless
    assert len(dovecot.maildir_messages(mailbox.user)) == 4
    session.close()
    assert session.closed_cleanly and Pop3Session.acknowledges_on_close
    assert len(dovecot.maildir_messages(mailbox.user)) == 1


def test_session_killed_before_quit_keeps_messages(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A process killed after DELE but before QUIT deletes nothing; the next session can."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(3)])
    before = dovecot.maildir_messages(mailbox.user)
    script = textwrap.dedent(f"""
        import os, signal
        from mailhost.protocols import ConnectionSettings, Encryption
        from mailhost_pop3 import open_session
        s = open_session(ConnectionSettings(name="k", protocol="pop3", host="127.0.0.1",
            port={dovecot.pop3_port}, encryption=Encryption.NONE, username={mailbox.user!r},
            password={mailbox.password!r}))
        s.delete(s.list_new(None, lambda keys: set()).refs)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with open_session(settings(dovecot, mailbox)) as session:
        assert fetch_all(session) == before
        refs = session.resolve([session.list_new(None, nothing_known).refs[0].key, "no-such-uidl"])
        assert len(refs) == 1
        session.delete(refs)
    assert dovecot.maildir_messages(mailbox.user) == before[1:]


def test_link_lost_before_quit_is_not_clean(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """When QUIT cannot be sent, close() does not raise and reports an unclean close."""
    dovecot.deliver(mailbox.user, generate_message(1))
    session = open_session(settings(dovecot, mailbox))
    session.delete(session.list_new(None, nothing_known).refs)
    session.client.sock.shutdown(2)
    session.close()
    assert not session.closed_cleanly
    assert len(dovecot.maildir_messages(mailbox.user)) == 1


def test_pipelined_retr_equals_one_at_a_time(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """RETR pipelined (Dovecot offers PIPELINING) returns what RETR in lockstep returns."""
    dovecot.deliver_many(mailbox.user, [generate_message(i, 500 + 97 * i) for i in range(300)])
    dovecot.deliver(mailbox.user, DOTTY)
    with open_session(settings(dovecot, mailbox)) as session:
        assert "PIPELINING" in session.client.capabilities
        pipelined = fetch_all(session)
    with open_session(settings(dovecot, mailbox)) as session:
        del session.client.capabilities["PIPELINING"]
        lockstep = fetch_all(session)
    assert pipelined == lockstep == dovecot.maildir_messages(mailbox.user)


def test_abandoned_fetch_keeps_the_session_in_step(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Stopping a pipelined fetch early leaves the next command's reply intact."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(200)])
    with open_session(settings(dovecot, mailbox)) as session:
        refs = session.list_new(None, nothing_known).refs
        first = next(iter(session.fetch(refs)))
        again = list(session.fetch(refs[:2]))
        messages = dovecot.maildir_messages(mailbox.user)
        session.delete(refs[:1])
    assert session.closed_cleanly
    assert first == (refs[0], messages[0]) and again == list(zip(refs[:2], messages[:2]))
    assert len(dovecot.maildir_messages(mailbox.user)) == 199


def test_vanished_ref_is_skipped(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A ref whose message is gone (deleted, unknown UIDL) is skipped, not an error."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(2)])
    with open_session(settings(dovecot, mailbox)) as session:
        refs = session.list_new(None, nothing_known).refs
        session.delete(refs[:1])
        got = list(session.fetch([*refs, MessageRef("no-such-uidl", handle=1)]))
    assert [ref.key for ref, _ in got] == [refs[1].key]


@pytest.mark.parametrize("encryption", [Encryption.SSL, Encryption.STARTTLS])
def test_tls_is_verified_and_used(dovecot: Dovecot, mailbox: Mailbox, encryption: Encryption) -> None:
    """SSL and STLS sessions run over a verified TLS link."""
    dovecot.deliver(mailbox.user, DOTTY)
    with open_session(settings(dovecot, mailbox, encryption)) as session:
        assert isinstance(session.client.sock, ssl.SSLSocket)
        assert fetch_all(session) == [DOTTY]


def test_stls_not_offered_is_refused(dovecot_factory: Callable[..., Dovecot]) -> None:
    """STARTTLS against a server without STLS fails; it never falls back to plain text."""
    dc = dovecot_factory(starttls=False)
    with pytest.raises(TLSFailure, match="does not offer STLS.*never falls back"):
        open_session(settings(dc, Mailbox("alice", "alice-pw"), Encryption.STARTTLS))


@pytest.mark.parametrize("encryption", [Encryption.SSL, Encryption.STARTTLS])
def test_untrusted_certificate_is_refused(dovecot_factory: Callable[..., Dovecot], encryption: Encryption) -> None:
    """A certificate from an unknown CA fails with the fix (give the CA with --ca-file)."""
    dc = dovecot_factory(untrusted=True)
    with pytest.raises(TLSFailure, match="not trusted") as failure:
        open_session(settings(dc, Mailbox("alice", "alice-pw"), encryption))
    assert "helpdesk" in str(failure.value)


def test_bad_password_names_connection_and_fix(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A wrong password is AuthenticationFailed naming the connection, never the password."""
    wrong = "wrong-" + mailbox.password
    with pytest.raises(AuthenticationFailed) as failure:
        open_session(settings(dovecot, mailbox, password=wrong))
    text = str(failure.value)
    assert text.startswith("authentication failed for helpdesk on localhost: check the username and password")
    assert "Authentication failed" in text  # the server's words
    assert wrong not in text and wrong not in repr(failure.value)


def test_a_mailbox_the_server_cannot_open_fails_with_what_the_server_said(dovecot: Dovecot) -> None:
    """Dovecot signs the user in ("+OK Logged in."), then cannot open the mailbox (here a
    home it cannot use), says "-ERR [SYS/TEMP] Internal error occurred. Refer to server
    log ..." and hangs up: the pass and the connection test fail with those words, as
    temporary, pointing at the server's log; not as a link that broke."""
    dovecot.add_user("broken-home", "broken-pw", home="/dev/null/x")
    box = Mailbox("broken-home", "broken-pw")
    with pytest.raises(TemporaryFailure) as failure:
        open_session(settings(dovecot, box))
    text = str(failure.value)
    assert not isinstance(failure.value, ConnectFailure), text
    assert text.startswith("helpdesk on localhost") and "[SYS/TEMP] Internal error occurred" in text, text
    assert "not of the password" in text and "the next pass tries again; if this persists, the server's log" in text
    steps = list(mailhost_pop3.test(settings(dovecot, box)))
    assert (steps[-1].name, steps[-1].ok) == ("authentication", False)
    assert steps[-1].detail.partition(" [20")[0] == text.partition(" [20")[0]  # the same, but the server's clock


def test_user_pass_without_sasl(dovecot: Dovecot, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SASL in CAPA the session signs in with USER/PASS."""
    from mailhost_pop3._client import Client

    real = Client.capa

    def no_sasl(self: Client) -> dict[str, list[str]]:
        caps = real(self)
        caps.pop("SASL", None)
        return caps

    monkeypatch.setattr(Client, "capa", no_sasl)
    dovecot.deliver(mailbox.user, DOTTY)
    steps = list(mailhost_pop3.test(settings(dovecot, mailbox)))
    assert [s.detail for s in steps if s.name == "authentication"] == [f"USER/PASS as {mailbox.user}"]


def test_shared_mailbox_with_master_user(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """SASL PLAIN with the shared mailbox as authorization identity opens that mailbox."""
    dovecot.deliver(mailbox.user, DOTTY)
    shared = settings(dovecot, mailbox, username="master", password="master-pw", shared_mailbox=mailbox.user)
    with open_session(shared) as session:
        assert fetch_all(session) == [DOTTY]
    with pytest.raises(AuthenticationFailed, match="may open the shared mailbox"):
        open_session(settings(dovecot, mailbox, username="master", password="nope", shared_mailbox=mailbox.user))


def test_unreachable_server_is_connect_failure(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """DNS and TCP failures are ConnectFailure naming the connection and the fix."""
    with pytest.raises(ConnectFailure, match="helpdesk.*cannot resolve.*check the host"):
        open_session(settings(dovecot, mailbox, host="no-such-host.invalid"))
    from tests.servers.dovecot import free_ports

    closed = ConnectionSettings(name="helpdesk", protocol="pop3", host="127.0.0.1", port=free_ports(1)[0],
                                encryption=Encryption.NONE, username="u", password="p")
    with pytest.raises(ConnectFailure, match="helpdesk on 127.0.0.1.*cannot connect.*check the host"):
        open_session(closed)


def test_connection_test_reports_each_step(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """The test reports DNS, TCP, TLS, authentication, capabilities and the message count."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(2)])
    steps = list(mailhost_pop3.test(settings(dovecot, mailbox, Encryption.STARTTLS)))
    assert [s.name for s in steps] == ["dns", "tcp", "tls", "authentication", "capabilities", "messages"]
    assert all(s.ok for s in steps)
    detail = {s.name: s.detail for s in steps}
    assert detail["tls"].startswith("STLS: TLSv1.") and "commonName=localhost" in detail["tls"]
    assert all(c in detail["capabilities"] for c in ("UIDL", "PIPELINING", "TOP", "SASL PLAIN"))
    assert detail["messages"].startswith("2 message(s)")


def test_connection_test_stops_at_first_failure(dovecot: Dovecot, dovecot_factory: Callable[..., Dovecot],
                                                mailbox: Mailbox) -> None:
    """A failing step is the last one, with the failure and the fix."""
    steps = list(mailhost_pop3.test(settings(dovecot, mailbox, Encryption.SSL, password="wrong")))
    assert [(s.name, s.ok) for s in steps] == [("dns", True), ("tcp", True), ("tls", True), ("authentication", False)]
    assert "check the username and password" in steps[-1].detail
    plain = dovecot_factory(starttls=False)
    steps = list(mailhost_pop3.test(settings(plain, Mailbox("alice", "alice-pw"), Encryption.STARTTLS)))
    assert [(s.name, s.ok) for s in steps] == [("dns", True), ("tcp", True), ("tls", False)]
    assert "choose encryption ssl" in steps[-1].detail
