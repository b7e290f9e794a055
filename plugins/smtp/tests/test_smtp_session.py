"""The SMTP plugin against a real SMTP server (aiosmtpd): TLS, AUTH, replies, transcript."""
from __future__ import annotations

import base64
import dataclasses
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mailhost import (
    AuthenticationFailed,
    ConnectFailure,
    ConnectionSettings,
    Encryption,
    PermanentFailure,
    TemporaryFailure,
    TLSFailure,
)
from mailhost.secrets import forget_secrets
from mailhost_smtp import PROVIDER, _session, open_session, test_connection

from tests.servers.certs import Pki
from tests.servers.scripted_smtp import scripted_server
from tests.servers.smtpd import SmtpServer

PASSWORD = "pässwörd-Ⅻ-s3cret"
USER = "bob@example.org"
RAW = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"
MODES = {"plain": Encryption.NONE, "tls": Encryption.SSL, "starttls": Encryption.STARTTLS}


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    yield
    forget_secrets()


def settings(server: SmtpServer, encryption: Encryption, **kw: Any) -> ConnectionSettings:
    values: dict[str, Any] = {"name": "test-smtp", "protocol": "smtp", "host": "127.0.0.1", "port": server.port,
                              "encryption": encryption, "timeout": 10.0, "ca_file": server.ca_file}
    values.update(kw)
    return ConnectionSettings(**values)


def secret_forms() -> list[str]:
    """The password and the base64 forms it travels in."""
    raw = PASSWORD.encode()
    return [PASSWORD, base64.b64encode(raw).decode(), base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()]


def test_provider_declares_smtp() -> None:
    """The provider says what the seeds say: ports 25/465/587, password and OAuth2."""
    assert PROVIDER.name == "smtp"
    assert PROVIDER.default_ports == {Encryption.NONE: 25, Encryption.SSL: 465, Encryption.STARTTLS: 587}
    assert PROVIDER.default_ports == _session.DEFAULT_PORTS  # one declaration, beside the provider
    assert PROVIDER.connect_modes == {"password", "oauth2"}
    assert {"from_address", "prefix", "size_limit", "debug", "ca_file"} <= PROVIDER.attributes
    assert PROVIDER.required == {"host"}


@pytest.mark.parametrize("mode", ["plain", "tls", "starttls"])
def test_sends_many_messages_on_one_session(smtp_server: Callable[..., SmtpServer], mode: str) -> None:
    """Each encryption signs in once and sends several messages through one session."""
    server = smtp_server(mode, users={USER: PASSWORD}, auth_require_tls=mode != "plain")
    with open_session(settings(server, MODES[mode], username=USER, password=PASSWORD)) as session:
        for n in range(3):
            result = session.send(RAW, "a@example.org", [f"r{n}@example.org"])
            assert result.response.startswith("250") and not result.refused
    got = server.messages
    assert [m.rcpt_tos for m in got] == [["r0@example.org"], ["r1@example.org"], ["r2@example.org"]]
    assert {m.session_id for m in got} == {1} and server.sessions_opened == 1
    assert all(m.auth_login == USER for m in got)
    assert all(m.tls == (mode != "plain") for m in got)
    assert got[0].data == RAW  # dot-stuffing undone by the server: the bytes arrive unchanged


def test_untrusted_certificate_is_refused(smtp_server: Callable[..., SmtpServer], pki: Pki) -> None:
    """A certificate from an unknown CA fails, with the fix in the message; nothing is sent."""
    server = smtp_server("tls", untrusted=True, users={USER: PASSWORD})
    with pytest.raises(TLSFailure) as err:
        open_session(settings(server, Encryption.SSL, ca_file=pki.ca_file, username=USER, password=PASSWORD))
    assert "not trusted" in str(err.value) and "test-smtp" in str(err.value)
    assert server.auth_attempts == [] and server.messages == []


def test_starttls_required_but_not_offered(smtp_server: Callable[..., SmtpServer]) -> None:
    """STARTTLS chosen and not offered: refused before any credential or mail goes out."""
    server = smtp_server("plain", users={USER: PASSWORD}, auth_require_tls=False)
    with pytest.raises(TLSFailure) as err:
        open_session(settings(server, Encryption.STARTTLS, username=USER, password=PASSWORD))
    assert "does not offer STARTTLS" in str(err.value)
    assert server.auth_attempts == [] and server.messages == []


def test_starttls_discards_what_the_server_sent_before_the_handshake(pki: Pki) -> None:
    """Lines injected after STARTTLS's 220 (CVE-2011-0411) are never read as replies."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        f = conn.makefile("rb")
        conn.sendall(b"220 fake ESMTP\r\n")
        seen.append(f.readline())  # EHLO
        conn.sendall(b"250-fake\r\n250 STARTTLS\r\n")
        seen.append(f.readline())  # STARTTLS
        # The injection: rides in the same segment as the 220.
        conn.sendall(b"220 go ahead\r\n250-fake\r\n250 AUTH PLAIN INJECTED\r\n")
        ctx = pki.server_context()
        tls = ctx.wrap_socket(conn, server_side=True)
        tf = tls.makefile("rb")
        seen.append(tf.readline())  # EHLO again, over TLS
        tls.sendall(b"250-fake\r\n250 SIZE 1000\r\n")
        seen.append(tf.readline())  # QUIT
        tls.sendall(b"221 bye\r\n")
        tls.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    s = ConnectionSettings(name="inject", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.STARTTLS, ca_file=pki.ca_file, timeout=10)
    session = open_session(s)
    assert session.extensions == {"size": "1000"}
    assert session.max_size == 1000
    session.close()
    thread.join(10)
    listener.close()
    assert seen[2].lower().startswith(b"ehlo")


def test_xoauth2_with_an_access_token(pki: Pki) -> None:
    """With an access token the session signs in with XOAUTH2; the token never shows
    in the transcript, neither does its base64."""
    token = "ya29.a0-very-secret-token"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        f = conn.makefile("rb")
        conn.sendall(b"220 fake ESMTP\r\n")
        f.readline()
        conn.sendall(b"250-fake\r\n250 AUTH XOAUTH2\r\n")
        got.append(f.readline())  # AUTH XOAUTH2 <blob>
        conn.sendall(b"235 2.7.0 accepted\r\n")
        f.readline()  # QUIT
        conn.sendall(b"221 bye\r\n")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    lines: list[str] = []
    s = ConnectionSettings(name="o365", protocol="smtp", host="127.0.0.1", port=port, encryption=Encryption.NONE,
                           username="user@example.org", access_token=lambda: token, transcript=lines.append)
    open_session(s).close()
    thread.join(10)
    listener.close()
    verb, mechanism, blob = got[0].split()
    assert (verb, mechanism) == (b"AUTH", b"XOAUTH2")
    assert base64.b64decode(blob) == f"user=user@example.org\x01auth=Bearer {token}\x01\x01".encode()
    joined = "\n".join(lines)
    assert "C: AUTH XOAUTH2 ********" in joined
    assert token not in joined and blob.decode() not in joined


def test_the_final_reply_is_waited_for_then_in_doubt(smtp_server: Callable[..., SmtpServer],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply to the final dot is waited for beyond the timeout (RFC 5321: 10 minutes);
    none in that time, or a dropped link, is a ConnectFailure in doubt: the message went out."""
    server = smtp_server("plain", slow_data_seconds=1.0)
    with open_session(settings(server, Encryption.NONE, timeout=0.2)) as session:
        assert session.send(RAW, "a@example.org", ["b@example.org"]).response.startswith("250")
        monkeypatch.setattr(_session, "FINAL_REPLY_TIMEOUT", 0.2)
        with pytest.raises(ConnectFailure, match="no reply within 0.2 s.*may have been delivered") as silent:
            session.send(RAW, "a@example.org", ["b@example.org"])
        server.slow_data_seconds = 0.0
        server.drop_next_data(1)
        with pytest.raises(ConnectFailure, match="connection broke.*may have been delivered") as dropped:
            session.send(RAW, "a@example.org", ["b@example.org"])
    assert silent.value.in_doubt and dropped.value.in_doubt


def test_a_slow_answer_to_rcpt_is_waited_for(smtp_server: Callable[..., SmtpServer]) -> None:
    """A server checking each recipient (a callout, greylisting) answers RCPT after the
    connection's timeout: RFC 5321 asks for 5 minutes, so the message is sent, not
    failed; the connection test says the recipient is taken."""
    server = smtp_server("plain", slow_rcpt_seconds=1.5)
    slow = settings(server, Encryption.NONE, timeout=0.5, from_address="a@example.org")
    with open_session(slow) as session:
        sent = session.send(RAW, "a@example.org", ["b@example.org", "c@example.org"])
    assert sent.response.startswith("250") and sent.refused == {}
    assert [m.rcpt_tos for m in server.messages] == [["b@example.org", "c@example.org"]]
    steps = list(test_connection(slow))
    assert all(s.ok for s in steps) and steps[-2].name == "rcpt to", steps


def test_a_silent_answer_to_rcpt_still_ends(smtp_server: Callable[..., SmtpServer],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """RCPT's long wait has an end (lowered here from RFC 5321's 5 minutes): past it the
    message is retried (nothing of it went out, so not in doubt), and the error says what
    was waited for and how long; the connection test names the rcpt step."""
    monkeypatch.setattr(_session, "RCPT_TIMEOUT", 0.5)
    server = smtp_server("plain", slow_rcpt_seconds=5.0)
    silent = settings(server, Encryption.NONE, timeout=0.2, from_address="a@example.org")
    with open_session(silent) as session:
        with pytest.raises(ConnectFailure, match="answer to RCPT TO did not come within 0.5 s") as caught:
            session.send(RAW, "a@example.org", ["b@example.org"])
    assert caught.value.in_doubt is False and server.messages == []
    steps = list(test_connection(silent))
    assert (steps[-1].name, steps[-1].ok) == ("rcpt to", False) and "within 0.5 s" in steps[-1].detail, steps


def test_a_silent_server_times_out() -> None:
    """No answer within the timeout before any message went out: a ConnectFailure
    (temporary, not in doubt)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        quiet = ConnectionSettings(name="test-smtp", protocol="smtp", host="127.0.0.1",
                                   port=silent.getsockname()[1], encryption=Encryption.NONE, timeout=0.2)
        with pytest.raises(ConnectFailure, match="no answer within 0.2 s") as caught:
            open_session(quiet)
    assert caught.value.in_doubt is False


def test_wrong_password_is_an_authentication_failure(smtp_server: Callable[..., SmtpServer]) -> None:
    """A refused sign-in names the connection and the fix, and never the password."""
    server = smtp_server("starttls", users={USER: "other"})
    with pytest.raises(AuthenticationFailed) as err:
        open_session(settings(server, Encryption.STARTTLS, username=USER, password=PASSWORD))
    text = str(err.value)
    assert "test-smtp" in text and "username and password" in text
    assert not any(form in text for form in secret_forms())


def test_login_mechanism_when_plain_is_not_offered(smtp_server: Callable[..., SmtpServer],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTH LOGIN, when the server offers it and not PLAIN (as some Exchange servers do)."""
    from mailhost_smtp import _session

    server = smtp_server("starttls", users={USER: PASSWORD})
    real_hello = _session._Client.hello

    def login_only(self: Any) -> None:
        real_hello(self)
        if "auth" in self.esmtp_features:
            self.esmtp_features["auth"] = "LOGIN"

    monkeypatch.setattr(_session._Client, "hello", login_only)
    lines: list[str] = []
    s = settings(server, Encryption.STARTTLS, username=USER, password=PASSWORD, transcript=lines.append)
    with open_session(s) as session:
        session.send(RAW, "a@example.org", ["b@example.org"])
    assert server.messages[0].auth_login == USER
    assert "C: AUTH LOGIN" in lines and "C: ********" in lines
    joined = "\n".join(lines)
    assert not any(form in joined for form in secret_forms())


def test_refusals_per_recipient(smtp_server: Callable[..., SmtpServer]) -> None:
    """Some recipients refused: delivered to the others, refusals reported with the
    server's words; everyone refused: temporary if any 4xx, else permanent."""
    server = smtp_server("plain")
    with open_session(settings(server, Encryption.NONE)) as session:
        result = session.send(RAW, "a@example.org", ["ok@example.org", "reject@example.org"])
        assert result.refused == {"reject@example.org": "550 5.1.1 no such user"}
        with pytest.raises(TemporaryFailure) as temp:
            session.send(RAW, "a@example.org", ["tempfail@example.org", "reject2@example.org"])
        assert temp.value.refused == {"tempfail@example.org": "451 4.3.0 try again later",  # type: ignore[attr-defined]
                                      "reject2@example.org": "550 5.1.1 no such user"}
        with pytest.raises(PermanentFailure) as perm:
            session.send(RAW, "a@example.org", ["reject@example.org"])
        assert "550 5.1.1 no such user" in str(perm.value)
        server.fail_next_data(1, 451)
        with pytest.raises(TemporaryFailure):
            session.send(RAW, "a@example.org", ["ok@example.org"])
        server.fail_next_data(1, 554, "message refused (test)")
        with pytest.raises(PermanentFailure) as data5:
            session.send(RAW, "a@example.org", ["ok@example.org"])
        assert "554" in str(data5.value) and "message refused (test)" in str(data5.value)
        # The session is still usable after every one of those.
        assert session.send(RAW, "a@example.org", ["ok@example.org"]).response.startswith("250")
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.org"], ["ok@example.org"]]


def test_552_to_rcpt_is_temporary(smtp_server: Callable[..., SmtpServer]) -> None:
    """A server at its recipient limit answers RCPT with 552 (RFC 821's code): that is a
    452 (RFC 5321 4.5.3.1.10), so the message goes to the recipients taken and the others
    are refused for now, not for good; all of them refused: a TemporaryFailure."""
    server = smtp_server("plain", max_recipients=2)
    with open_session(settings(server, Encryption.NONE)) as session:
        result = session.send(RAW, "a@example.org", ["r1@example.org", "r2@example.org", "r3@example.org"])
        assert list(result.refused) == ["r3@example.org"]
        assert result.refused["r3@example.org"].startswith("452 ")
        assert "552 5.5.3 too many recipients" in result.refused["r3@example.org"]
    assert [m.rcpt_tos for m in server.messages] == [["r1@example.org", "r2@example.org"]]
    server.max_recipients = 0
    with open_session(settings(server, Encryption.NONE)) as session, pytest.raises(TemporaryFailure) as err:
        session.send(RAW, "a@example.org", ["r1@example.org"])
    assert "552 5.5.3 too many recipients" in str(err.value)


def test_server_size_is_honoured(smtp_server: Callable[..., SmtpServer]) -> None:
    """The server's SIZE is known after EHLO, and a larger message is refused before MAIL,
    also on a link opened again after the first one was dropped (it was sent, and the
    server's 552 blamed the sender)."""
    server = smtp_server("plain", size_limit=500)
    lines: list[str] = []
    big = b"Message-ID: <big@example.org>\r\n" + RAW + b"x" * 600

    def drop() -> None:
        raise RuntimeError("the previous outcome was not recorded")

    with open_session(settings(server, Encryption.NONE, transcript=lines.append)) as session:
        assert session.max_size == 500
        with pytest.raises(PermanentFailure) as err:
            session.send(big, "a@example.org", ["b@example.org"])
        with pytest.raises(RuntimeError):
            session.send(RAW, "a@example.org", ["b@example.org"], before_data=drop)
        with pytest.raises(PermanentFailure) as again:
            session.send(big, "a@example.org", ["b@example.org"])
    for text in (str(err.value), str(again.value)):
        assert "<big@example.org> is 707 bytes, more than the 500 bytes test-smtp" in text and "SIZE" in text
    assert server.messages == [] and server.sessions_opened == 2
    assert sum(line.lower().startswith("c: mail from") for line in lines) == 1  # the dropped one's


def test_connection_refused_is_temporary() -> None:
    """Nothing listening: a ConnectFailure (temporary) that names the connection and port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = ConnectionSettings(name="nobody", protocol="smtp", host="127.0.0.1", port=port, encryption=Encryption.NONE)
    with pytest.raises(ConnectFailure) as err:
        open_session(s)
    assert "nobody" in str(err.value) and str(port) in str(err.value)


def test_transcript_is_redacted(smtp_server: Callable[..., SmtpServer]) -> None:
    """Debug transcript: the whole dialogue, and never the password or its base64 forms."""
    server = smtp_server("starttls", users={USER: PASSWORD})
    lines: list[str] = []
    with open_session(settings(server, Encryption.STARTTLS, username=USER, password=PASSWORD,
                               transcript=lines.append)) as session:
        session.send(RAW, "a@example.org", ["b@example.org"])
    joined = "\n".join(lines)
    assert "C: STARTTLS" in joined and "* TLS: TLSv1" in joined
    assert "C: AUTH PLAIN ********" in joined
    assert "C: [message," in joined and "hello" not in joined  # the content is not logged
    assert not any(form in joined for form in secret_forms())


def test_gate_holds_the_content(smtp_server: Callable[..., SmtpServer]) -> None:
    """``before_data`` runs after 354; if it raises, the server never gets the message
    and the next send opens a new session."""
    server = smtp_server("plain")
    calls: list[int] = []

    def refuse() -> None:
        calls.append(len(server.messages))
        raise RuntimeError("the previous outcome was not recorded")

    with open_session(settings(server, Encryption.NONE)) as session:
        session.send(RAW, "a@example.org", ["one@example.org"], before_data=lambda: calls.append(1))
        with pytest.raises(RuntimeError):
            session.send(RAW, "a@example.org", ["two@example.org"], before_data=refuse)
        session.send(RAW, "a@example.org", ["three@example.org"])
    assert calls == [1, 1]
    assert [m.rcpt_tos for m in server.messages] == [["one@example.org"], ["three@example.org"]]
    assert server.sessions_opened == 2


def test_connection_test_reports_each_step(smtp_server: Callable[..., SmtpServer]) -> None:
    """connect, tls, ehlo, auth, mail from, rcpt to, rset: all ok, and nothing is sent."""
    server = smtp_server("starttls", users={USER: PASSWORD}, size_limit=123456)
    steps = list(test_connection(settings(server, Encryption.STARTTLS, username=USER, password=PASSWORD,
                                          from_address="App <app@example.org>")))
    assert [s.name for s in steps] == ["connect", "tls", "ehlo", "auth", "mail from", "rcpt to", "rset"]
    assert all(s.ok for s in steps), steps
    assert "valid until" in steps[1].detail and "SIZE 123456" in steps[2].detail
    assert server.messages == []


def test_connection_test_stops_at_the_failing_step(smtp_server: Callable[..., SmtpServer]) -> None:
    """A wrong password: the auth step fails with the reason, the earlier ones pass."""
    server = smtp_server("tls", users={USER: "other"})
    steps = list(test_connection(settings(server, Encryption.SSL, username=USER, password=PASSWORD)))
    assert [(s.name, s.ok) for s in steps] == [("connect", True), ("tls", True), ("ehlo", True), ("auth", False)]
    assert not any(form in steps[-1].detail for form in secret_forms())


def test_connection_test_with_a_utf8_from_address_and_no_smtputf8(smtp_server: Callable[..., SmtpServer]) -> None:
    """A from address the server cannot take (UTF-8, no SMTPUTF8) is a failed 'mail from'
    step that says why, like any other refusal, instead of an error that ends the report."""
    server = smtp_server("plain", hide={"SMTPUTF8"})
    steps = list(test_connection(settings(server, Encryption.NONE, from_address="Jörg <jörg@example.org>")))
    assert [(s.name, s.ok) for s in steps] == [("connect", True), ("ehlo", True), ("auth", True), ("mail from", False)]
    assert "SMTPUTF8" in steps[-1].detail and "jörg@example.org" in steps[-1].detail


def test_implicit_tls_to_a_plain_port_fails_clearly(smtp_server: Callable[..., SmtpServer]) -> None:
    """SSL/TLS chosen for a port that speaks plain SMTP: a TLS failure naming the fix."""
    server = smtp_server("plain")
    with pytest.raises(TLSFailure) as err:
        open_session(settings(server, Encryption.SSL, ca_file=None))
    assert "encryption" in str(err.value)


@pytest.mark.parametrize("mode", ["starttls", "plain"])
def test_a_plain_start_on_an_implicit_tls_port_names_the_fix(smtp_server: Callable[..., SmtpServer],
                                                             mode: str) -> None:
    """STARTTLS (or none) chosen for a port that speaks TLS from the first byte (465, the
    usual mix-up): the server waits for a handshake and says nothing, and the error says
    to use --encryption ssl, not only 'raise --timeout', which never helps there. A server
    that greeted and then went silent gets no such hint."""
    server = smtp_server("tls")
    with pytest.raises(ConnectFailure) as err:
        open_session(settings(server, MODES[mode], timeout=0.5))
    text = str(err.value)
    assert f"test-smtp (127.0.0.1:{server.port})" in text and "no answer within 0.5 s" in text
    assert "not even a greeting" in text and "--encryption ssl" in text and "raise --timeout" not in text

    port, thread, _ = scripted_server(lambda line: b"250 scripted\r\n" if line.upper().startswith(b"QUIT") else b"",
                                      greeting=b"220 slow ESMTP\r\n")
    quiet = ConnectionSettings(name="quiet", protocol="smtp", host="127.0.0.1", port=port, encryption=Encryption.NONE,
                               timeout=0.5)
    with pytest.raises(ConnectFailure) as err:
        open_session(quiet)
    thread.join(10)
    assert "during ehlo" in str(err.value) and "--encryption ssl" not in str(err.value)


def test_client_context_has_no_way_out() -> None:
    """The plugin's TLS is the host's: verification on, hostname checked."""
    from mailhost.tls import client_context

    ctx = client_context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname


def test_line_ends_are_crlf_on_the_wire(smtp_server: Callable[..., SmtpServer]) -> None:
    """A message with bare LF or bare CR line ends goes out with CRLF only, then dot-stuffed:
    a server that ends DATA on ``<LF>.<LF>`` or ``<CR>.<CR>`` (SMTP smuggling) never sees
    the smuggled commands as commands, and a strict one does not refuse bare line ends."""
    server = smtp_server("plain")
    smuggled = (b"Subject: s\nTo: b@example.org\n\nbare lf\n.\nMAIL FROM:<evil@example.org>\r\n"
                b"bare cr\r.\rRCPT TO:<victim@example.org>\r\nmixed\n.\r\nend\n")
    with open_session(settings(server, Encryption.NONE)) as session:
        session.send(smuggled, "a@example.org", ["b@example.org"])
        session.send(RAW, "a@example.org", ["c@example.org"])
    first, second = server.messages
    assert first.data == (b"Subject: s\r\nTo: b@example.org\r\n\r\nbare lf\r\n.\r\nMAIL FROM:<evil@example.org>\r\n"
                          b"bare cr\r\n.\r\nRCPT TO:<victim@example.org>\r\nmixed\r\n.\r\nend\r\n")
    assert first.mail_options == [f"SIZE={len(first.data)}"]  # SIZE counts what goes out
    assert second.rcpt_tos == ["c@example.org"] and len(server.messages) == 2


def test_8bit_and_utf8_need_the_server_to_announce_them(smtp_server: Callable[..., SmtpServer]) -> None:
    """An 8-bit body goes with BODY=8BITMIME; to a server without 8BITMIME (RFC 6152) it is
    refused before MAIL, as is a non-ASCII address without SMTPUTF8 (RFC 6531): nothing
    reaches the server, the error names the extension, and ASCII mail still goes through."""
    eight = "Subject: cafe\r\n\r\nÇa va ?\r\n".encode()
    modern = smtp_server("plain")
    with open_session(settings(modern, Encryption.NONE)) as session:
        session.send(eight, "a@example.org", ["b@example.org"])
        session.send(eight, "a@example.org", ["bé@example.org"])
    assert [m.mail_options[1:] for m in modern.messages] == [["BODY=8BITMIME"], ["BODY=8BITMIME", "SMTPUTF8"]]

    old = smtp_server("plain", hide={"8BITMIME", "SMTPUTF8"})
    lines: list[str] = []
    with open_session(settings(old, Encryption.NONE, transcript=lines.append)) as session:
        with pytest.raises(PermanentFailure, match="8-bit body.*8BITMIME") as eight_bit:
            session.send(eight, "a@example.org", ["b@example.org"])
        with pytest.raises(PermanentFailure, match="SMTPUTF8.*bé@example.org"):  # the cause, not its 8 bits
            session.send("To: bé@example.org\r\n\r\nhi\r\n".encode(), "a@example.org", ["bé@example.org"])
        session.send(RAW, "a@example.org", ["b@example.org"])
    assert "test-smtp" in str(eight_bit.value)
    assert [m.data for m in old.messages] == [RAW]
    assert sum(line.lower().startswith("c: mail from") for line in lines) == 1


def test_raw_utf8_headers_need_smtputf8(smtp_server: Callable[..., SmtpServer]) -> None:
    """Raw UTF-8 in a header field (RFC 6532), with ASCII envelope addresses, goes with
    SMTPUTF8 (RFC 6531 3.2; 8BITMIME covers only the body); to a server without SMTPUTF8
    it is refused before MAIL, not sent as it is and not re-encoded, and the error names
    the message, the header, the connection and the fix."""
    wide = ("Message-ID: <m1@example.org>\r\nFrom: Jörg <a@example.org>\r\nSubject: Grüße,\r\n"
            " aus Köln\r\nTo: b@example.org\r\n\r\nplain body\r\n").encode()
    modern = smtp_server("plain")
    with open_session(settings(modern, Encryption.NONE)) as session:
        session.send(wide, "a@example.org", ["b@example.org"])
    assert modern.messages[0].mail_options[1:] == ["BODY=8BITMIME", "SMTPUTF8"]
    assert modern.messages[0].data == wide

    no_utf8 = smtp_server("plain", hide={"SMTPUTF8"})
    lines: list[str] = []
    with open_session(settings(no_utf8, Encryption.NONE, transcript=lines.append)) as session:
        with pytest.raises(PermanentFailure) as err:
            session.send(wide, "a@example.org", ["b@example.org"])
        session.send("Subject: ok\r\n\r\n8-bit body: Köln\r\n".encode(), "a@example.org", ["b@example.org"])
    text = str(err.value)
    assert "<m1@example.org>" in text and "From, Subject headers" in text and "SMTPUTF8" in text
    assert f"test-smtp (127.0.0.1:{no_utf8.port})" in text and "RFC 2047" in text
    assert [m.mail_options[1:] for m in no_utf8.messages] == [["BODY=8BITMIME"]]
    assert sum(line.lower().startswith("c: mail from") for line in lines) == 1


def test_ehlo_refused_for_now_is_not_retried_with_helo() -> None:
    """EHLO answered 421 (busy, closing): temporary, with the server's words, and no
    HELO on a closed link (which read as 'the port may expect TLS'). A server that does
    not know EHLO (502) still gets HELO (RFC 5321 4.1.4) and the mail."""
    port, thread, heard = scripted_server(lambda line: b"421 4.3.2 too busy, come back later\r\n")
    busy = ConnectionSettings(name="busy", protocol="smtp", host="127.0.0.1", port=port,
                              encryption=Encryption.NONE, timeout=10)
    with pytest.raises(TemporaryFailure, match="421 4.3.2 too busy") as err:
        open_session(busy)
    thread.join(10)
    assert "TLS" not in str(err.value) and [h.split()[0].upper() for h in heard] == [b"EHLO"]

    replies = {b"EHLO": b"502 5.5.1 what?\r\n", b"HELO": b"250 old.example.org\r\n", b"MAIL": b"250 ok\r\n",
               b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n", b"<MESSAGE>": b"250 kept\r\n",
               b"QUIT": b"221 bye\r\n"}
    port, thread, heard = scripted_server(lambda line: replies[line.split()[0].upper()])
    old = dataclasses.replace(busy, name="old", port=port)
    with open_session(old) as session:
        assert session.extensions == {}
        assert session.send(RAW, "a@example.org", ["b@example.org"]).response == "250 kept"
    thread.join(10)
    assert [h.split()[0].upper() for h in heard[:4]] == [b"EHLO", b"HELO", b"MAIL", b"RCPT"]
    assert heard[2] == b"mail FROM:<a@example.org>\r\n"  # no ESMTP parameters after HELO


def test_a_session_the_server_closed_after_a_refusal_is_reopened() -> None:
    """Every recipient of the first message refused, RSET, and the server hangs up (as
    some do after a failed transaction): the next message is not failed for it (which
    would send it through the fallback connection); the session is opened again."""
    closed = []
    replies = {b"EHLO": b"250 scripted\r\n", b"MAIL": b"250 ok\r\n", b"DATA": b"354 go\r\n",
               b"<MESSAGE>": b"250 kept\r\n", b"QUIT": b"221 bye\r\n"}

    def answer(line: bytes) -> bytes | None:
        verb = line.split()[0].upper()
        if verb == b"RCPT":
            return b"550 5.1.1 no such user\r\n" if b"nobody" in line else b"250 ok\r\n"
        if verb == b"RSET" and not closed:
            closed.append(line)
            return None
        return replies[verb]

    port, thread, heard = scripted_server(answer, connections=2)
    s = ConnectionSettings(name="hangs-up", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    with open_session(s) as session:
        with pytest.raises(PermanentFailure, match="550 5.1.1"):
            session.send(RAW, "a@example.org", ["nobody@example.org"])
        assert session.send(RAW, "a@example.org", ["b@example.org"]).response == "250 kept"
    thread.join(10)
    assert [h.split()[0].upper() for h in heard].count(b"EHLO") == 2
    assert heard[-2].endswith(b"hello\r\n..leading dot\r\n")  # the message, dot-stuffed, on the new link


def test_a_421_to_rcpt_ends_the_session_and_says_so_once() -> None:
    """RCPT answered 421: the server is closing; a temporary ConnectFailure that names
    the recipient and the reply, and says 'closed the session' once."""
    replies = {b"EHLO": b"250 scripted\r\n", b"MAIL": b"250 ok\r\n", b"RCPT": b"421 4.4.2 bye for now\r\n"}
    port, thread, _ = scripted_server(lambda line: replies.get(line.split()[0].upper()))
    s = ConnectionSettings(name="closing", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    session = open_session(s)
    with pytest.raises(ConnectFailure) as err:
        session.send(RAW, "a@example.org", ["b@example.org"])
    session.close()
    thread.join(10)
    assert str(err.value).count("closed the session") == 1
    assert "b@example.org" in str(err.value) and "421 4.4.2 bye for now" in str(err.value)


def test_a_link_lost_before_the_content_is_not_in_doubt() -> None:
    """One message sent, then the link breaks at the next one's RCPT: that message never
    went out, so it is a plain retry (which may fall back), not 'may have been delivered'
    (the flag of the message before it leaked into it)."""
    rcpts: list[bytes] = []

    def answer(line: bytes) -> bytes | None:
        verb = line.split()[0].upper()
        if verb == b"RCPT":
            rcpts.append(line)
            if len(rcpts) == 2:
                return None
        return {b"EHLO": b"250 scripted\r\n", b"DATA": b"354 go\r\n", b"<MESSAGE>": b"250 kept\r\n"}.get(
            verb, b"250 ok\r\n")

    port, thread, _ = scripted_server(answer)
    s = ConnectionSettings(name="drops", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    session = open_session(s)
    assert session.send(RAW, "a@example.org", ["b@example.org"]).response == "250 kept"
    with pytest.raises(ConnectFailure, match="broke while sending") as err:
        session.send(RAW, "a@example.org", ["c@example.org"])
    session.close()
    thread.join(10)
    assert err.value.in_doubt is False


@pytest.mark.parametrize(("reply", "said"), [(b"garbage\r\n", "not an SMTP reply"),
                                            (b"250 " + b"x" * 9000 + b"\r\n", "line too long")])
def test_an_unreadable_reply_to_the_content_is_in_doubt(reply: bytes, said: str) -> None:
    """The final dot answered with no reply code, or a line longer than smtplib reads: the
    server may hold the message, so it is in doubt (not failed for good with smtplib's
    own '500 Line too long', nor a plain retry that may go through another connection)."""
    replies = {b"EHLO": b"250 scripted\r\n", b"DATA": b"354 go\r\n", b"<MESSAGE>": reply}
    port, thread, _ = scripted_server(lambda line: replies.get(line.split()[0].upper(), b"250 ok\r\n"))
    s = ConnectionSettings(name="odd", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    session = open_session(s)
    with pytest.raises(ConnectFailure, match=f"did not confirm it.*{said}") as err:
        session.send(RAW, "a@example.org", ["b@example.org"])
    session.close()
    thread.join(10)
    assert err.value.in_doubt is True


def _bounded(call: Callable[[], object], stop: threading.Event, seconds: float = 30.0) -> BaseException | None:
    """What ``call`` raised (None: it returned), run in a thread. Still running after
    ``seconds``, a reply was never cut off: the test fails instead of hanging, and ``stop``
    ends the server's drip."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # what the test looks at
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        stop.set()
        pytest.fail(f"still reading a reply after {seconds:g} s: it was never cut off")
    return outcome[0]


def _endless(line: bytes, stop: threading.Event) -> Iterator[bytes]:
    """``line`` again and again, until ``stop``."""
    while not stop.is_set():
        yield line


def _bytewise(reply: bytes, stop: threading.Event) -> Iterator[bytes]:
    """``reply`` a byte at a time, until ``stop``."""
    for i in range(len(reply)):
        if stop.is_set():
            return
        yield reply[i:i + 1]


@pytest.mark.parametrize(("command", "wait"), [("EHLO", "0.5"), ("RCPT TO", "1")])
def test_an_endless_reply_is_cut_off(monkeypatch: pytest.MonkeyPatch, command: str, wait: str) -> None:
    """A server answers EHLO or RCPT with ``250-`` lines without end, each well within the
    timeout, so no read ever times out: the session, and the messages it holds, were kept
    for ever. A reply must end within its step's wait (the timeout; RCPT's own, lowered
    here from 5 minutes): a temporary ConnectFailure naming the connection, the server and
    the answer it was waiting for, not in doubt (the message did not go out); the
    connection test names the step."""
    monkeypatch.setattr(_session, "RCPT_TIMEOUT", 1.0)
    stop = threading.Event()
    verb = command.split()[0].encode()

    def answer(line: bytes) -> Any:
        said = line.split()[0].upper()
        if said == verb:
            return _endless(b"250-still thinking\r\n", stop)
        return {b"EHLO": b"250 scripted\r\n", b"QUIT": b"221 bye\r\n"}.get(said, b"250 ok\r\n")

    port, thread, heard = scripted_server(answer, connections=2, drip=0.05)
    s = ConnectionSettings(name="dripping", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=0.5, from_address="a@example.org")

    def send() -> None:
        with open_session(s) as session:
            session.send(RAW, "a@example.org", ["b@example.org"])

    err = _bounded(send, stop)
    steps: list[Any] = []
    _bounded(lambda: steps.extend(test_connection(s)), stop)
    stop.set()
    thread.join(15)
    assert isinstance(err, ConnectFailure) and err.in_doubt is False, err
    text = str(err)
    assert f"dripping (127.0.0.1:{port})" in text and f"its answer to {command} did not end within {wait} s" in text
    assert "closed the link" in text and "retried" in text
    assert not any(h.upper().startswith(b"DATA") for h in heard)
    failed = steps[-1]
    assert not failed.ok and failed.name == ("ehlo" if verb == b"EHLO" else "rcpt to"), steps
    assert f"its answer to {command} did not end within {wait} s" in failed.detail


@pytest.mark.parametrize(("which", "mode"), [("greeting", "plain"), ("final dot", "plain"), ("final dot", "tls")])
def test_a_reply_dripped_a_byte_at_a_time_is_cut_off(monkeypatch: pytest.MonkeyPatch, pki: Pki, which: str,
                                                     mode: str) -> None:
    """One reply line dripped a byte at a time (over TLS, a record each), each byte well
    within the timeout (the line would take 100 s): the reply must still end within its
    wait. The greeting: a temporary ConnectFailure while opening. The answer to the final
    dot (its 10 minutes lowered here): in doubt, as when no answer comes, for the server
    may have taken the message."""
    monkeypatch.setattr(_session, "FINAL_REPLY_TIMEOUT", 0.5)
    stop = threading.Event()
    slow = b"x" * 2000 + b"\r\n"
    replies = {b"EHLO": b"250 scripted\r\n", b"DATA": b"354 go\r\n", b"QUIT": b"221 bye\r\n"}

    def answer(line: bytes) -> Any:
        said = line.split()[0].upper()
        if said == b"<MESSAGE>":
            return _bytewise(b"250 " + slow, stop)
        return replies.get(said, b"250 ok\r\n")

    greeting: Any = _bytewise(b"220 " + slow, stop) if which == "greeting" else b"220 scripted ESMTP\r\n"
    port, thread, heard = scripted_server(answer, greeting=greeting, drip=0.05,
                                          context=pki.server_context() if mode == "tls" else None)
    s = ConnectionSettings(name="dripping", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=MODES[mode], ca_file=pki.ca_file, timeout=0.5)

    def send() -> None:
        with open_session(s) as session:
            session.send(RAW, "a@example.org", ["b@example.org"])

    err = _bounded(send, stop)
    stop.set()
    thread.join(15)
    assert isinstance(err, ConnectFailure), err
    text = str(err)
    assert f"dripping (127.0.0.1:{port})" in text
    if which == "greeting":
        assert err.in_doubt is False and heard == []
        assert "its greeting did not end within 0.5 s" in text and "closed the link" in text
    else:
        assert err.in_doubt is True
        assert "did not confirm it (its answer to the final dot did not end within 0.5 s)" in text
        assert "may have been delivered" in text


def test_a_reply_without_end_sent_at_full_speed_is_cut_off() -> None:
    """EHLO answered with ``250-`` lines without end, as fast as they are read: no wait
    runs out first, so the size of a reply is bounded too (64 KiB, far above any real
    one): a temporary ConnectFailure, the reply could not be read."""
    stop = threading.Event()
    line = b"250-" + b"x" * 500 + b"\r\n"
    port, thread, _ = scripted_server(lambda said: _endless(line, stop) if said.upper().startswith(b"EHLO")
                                      else b"221 bye\r\n")
    s = ConnectionSettings(name="flooding", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    err = _bounded(lambda: open_session(s).close(), stop)
    stop.set()
    thread.join(15)
    assert isinstance(err, ConnectFailure) and err.in_doubt is False, err
    text = str(err)
    assert f"flooding (127.0.0.1:{port})" in text and "could not be read (a reply of more than 64 KiB" in text


def test_an_overlong_reply_before_the_content_is_a_broken_link() -> None:
    """A reply to RCPT longer than smtplib reads: smtplib closes the link and says '500
    Line too long', which is not the server's answer; a retry, not a permanent failure."""
    replies = {b"EHLO": b"250 scripted\r\n", b"RCPT": b"250 " + b"x" * 9000 + b"\r\n"}
    port, thread, _ = scripted_server(lambda line: replies.get(line.split()[0].upper(), b"250 ok\r\n"))
    s = ConnectionSettings(name="odd", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    session = open_session(s)
    with pytest.raises(ConnectFailure, match="could not be read.*will be retried") as err:
        session.send(RAW, "a@example.org", ["b@example.org"])
    session.close()
    thread.join(10)
    assert err.value.in_doubt is False


@pytest.mark.parametrize("ehlo", [b"250 scripted\r\n", b"250-scripted\r\n250 AUTH PLAIN LOGIN\r\n"])
def test_oauth2_to_a_server_without_xoauth2(ehlo: bytes) -> None:
    """An OAuth2 connection to a server that offers no OAuth2 mechanism (a wrong host, or a
    password-only server): refused before any token is asked for or sent, saying what the
    server offers, instead of a refused token and 'authorize again'."""
    asked: list[int] = []
    port, thread, heard = scripted_server(lambda line: {b"EHLO": ehlo, b"QUIT": b"221 bye\r\n"}.get(
        line.split()[0].upper(), b"504 5.7.4 unrecognized authentication type\r\n"))
    s = ConnectionSettings(name="o365", protocol="smtp", host="127.0.0.1", port=port, encryption=Encryption.NONE,
                           username="user@example.org", access_token=lambda: str(asked.append(1)), timeout=10)
    with pytest.raises(AuthenticationFailed, match="offers neither XOAUTH2 nor OAUTHBEARER") as err:
        open_session(s)
    thread.join(10)
    assert "authorize" not in str(err.value) and asked == []
    assert not any(h.upper().startswith(b"AUTH") for h in heard)


@pytest.mark.parametrize("stage", ["greeting", "ehlo"])
def test_an_overlong_line_while_opening_is_a_broken_link(stage: str) -> None:
    """A greeting or EHLO reply with a line longer than smtplib reads: smtplib closes the
    link and says '500 Line too long', which is not the server's answer. A temporary
    ConnectFailure that names the connection and the server, not 'refused the session'
    (a PermanentFailure: a session opened again inside send() failed its message for good)."""
    greeting = b"220 " + b"x" * 9000 + b"\r\n" if stage == "greeting" else b"220 scripted ESMTP\r\n"
    ehlo = b"250-" + b"x" * 9000 + b"\r\n250 SIZE 1000\r\n" if stage == "ehlo" else b"250 scripted\r\n"
    port, thread, _ = scripted_server(lambda line: ehlo if line.upper().startswith(b"EHLO") else b"221 bye\r\n",
                                      greeting=greeting)
    s = ConnectionSettings(name="odd", protocol="smtp", host="127.0.0.1", port=port,
                           encryption=Encryption.NONE, timeout=10)
    with pytest.raises(TemporaryFailure) as err:
        open_session(s)
    thread.join(10)
    text = str(err.value)
    assert isinstance(err.value, ConnectFailure) and not err.value.in_doubt
    assert f"odd (127.0.0.1:{port})" in text and "could not be read" in text and "over 8192 bytes" in text
    assert "refused" not in text and "500" not in text


def _big(megabytes: int) -> bytes:
    """A message far bigger than the kernel's socket buffers, in 76-octet lines."""
    line = b"x" * 76 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (megabytes * 1024 * 1024 // len(line))


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_a_421_while_the_message_is_written_is_shown_and_not_in_doubt(pki: Pki, mode: str) -> None:
    """The server says 421 and closes while mailhost is still writing a big message: its
    words are what the error shows (not only 'the connection broke'), and the message is
    not in doubt: the final dot never went out, so the server cannot have taken it. The
    next message opens a new link and goes."""
    replies = {b"EHLO": b"250 scripted\r\n", b"DATA": b"354 go\r\n",
               b"<MESSAGE>": b"421 4.4.2 scripted: idle too long, closing\r\n", b"QUIT": b"221 bye\r\n"}
    context = pki.server_context() if mode == "tls" else None
    port, thread, heard = scripted_server(lambda line: replies.get(line.split()[0].upper(), b"250 ok\r\n"),
                                          read_only=64 * 1024, context=context)
    lines: list[str] = []
    s = ConnectionSettings(name="closing", protocol="smtp", host="127.0.0.1", port=port, encryption=MODES[mode],
                           ca_file=pki.ca_file, timeout=10, transcript=lines.append)
    session = open_session(s)
    with pytest.raises(ConnectFailure) as err:
        session.send(_big(16), "a@example.org", ["b@example.org"])
    session.close()
    thread.join(10)
    text = str(err.value)
    assert err.value.in_doubt is False and err.value.refused is None
    assert f"closing (127.0.0.1:{port})" in text and "421 4.4.2 scripted: idle too long, closing" in text
    assert "before its end" in text and "will be retried" in text
    assert "S: 421 4.4.2 scripted: idle too long, closing" in lines


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_a_big_message_over_a_slow_link_is_not_cut_by_the_timeout(pki: Pki, mode: str) -> None:
    """The timeout bounds a stall, not the whole upload: a message that takes several
    times the timeout to go over a slow link, each piece of it going in well within the
    timeout, is sent (socket.sendall gave the whole message one timeout, so a big
    attachment over a slow uplink timed out on every attempt)."""
    replies = {b"EHLO": b"250 scripted\r\n", b"DATA": b"354 go\r\n", b"<MESSAGE>": b"250 kept\r\n",
               b"QUIT": b"221 bye\r\n"}
    context = pki.server_context() if mode == "tls" else None
    port, thread, heard = scripted_server(lambda line: replies.get(line.split()[0].upper(), b"250 ok\r\n"),
                                          pace=1 / 64, context=context)
    s = ConnectionSettings(name="slow", protocol="smtp", host="127.0.0.1", port=port, encryption=MODES[mode],
                           ca_file=pki.ca_file, timeout=1)
    # Read at 4 MiB/s at most: past the kernel's buffers (4 MiB at most here) it takes longer than the timeout.
    message = _big(10)
    with open_session(s) as session:
        assert session.send(message, "a@example.org", ["b@example.org"]).response == "250 kept"
    thread.join(10)
    assert heard[-2] == message
