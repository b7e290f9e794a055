"""Smoke tests of the test-server kit itself (fast: a few seconds in total)."""

from __future__ import annotations

import email
import imaplib
import poplib
import smtplib
import socket
import ssl
from pathlib import Path

import pytest

from .certs import Pki, make_pkcs12
from .dovecot import Dovecot, DovecotError, generate_message, mutf7_decode, mutf7_encode
from .fixtures import Mailbox
from .smtpd import read_spool

TIMEOUT = 10


def ctx_for(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca_file)


def imaps(dc: Dovecot, pki: Pki) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(dc.host, dc.imaps_port, ssl_context=ctx_for(pki), timeout=TIMEOUT)


def uidvalidity(imap: imaplib.IMAP4) -> int:
    typ, data = imap.response("UIDVALIDITY")
    assert data and data[0] is not None
    return int(data[0])


# ---------------------------------------------------------------- certs


def test_pki_files_and_verification(pki: Pki) -> None:
    for f in (pki.ca_file, pki.cert_file, pki.key_file, pki.untrusted_ca_file,
              pki.untrusted_cert_file, pki.untrusted_key_file):
        assert Path(f).read_bytes().startswith(b"-----BEGIN")
    assert Path(pki.key_file).stat().st_mode & 0o077 == 0


def test_pkcs12_roundtrip(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs12

    path, cert_pem, key_pem = make_pkcs12(tmp_path, "alice", "s3cret", pki=pki)
    key, cert, extra = pkcs12.load_key_and_certificates(Path(path).read_bytes(), b"s3cret")
    assert key is not None and cert is not None and len(extra) == 1
    assert cert_pem.startswith(b"-----BEGIN CERTIFICATE")
    assert b"PRIVATE KEY" in key_pem
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(Path(path).read_bytes(), b"wrong")


# ---------------------------------------------------------------- messages


def test_generate_message() -> None:
    a, b = generate_message(1), generate_message(1, size=20_000)
    assert 2500 < len(a) <= 3000 and 19_000 < len(b) <= 20_000
    assert b"\n" not in a.replace(b"\r\n", b"")
    ma, mb = email.message_from_bytes(a), email.message_from_bytes(b)
    assert ma["Message-ID"] != mb["Message-ID"]
    assert ma["Subject"] == "Test message 1" and ma["Date"] and ma["From"] and ma["To"]


def test_mutf7_roundtrip() -> None:
    for name in ("Entwürfe", "A&B", "日本語", "plain"):
        assert mutf7_decode(mutf7_encode(name)) == name
    assert mutf7_encode("Entwürfe") == "Entw&APw-rfe"


# ---------------------------------------------------------------- dovecot


def test_imap_starttls_verified_fetch_exact(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    raw = generate_message(7)
    dovecot.deliver(mailbox.user, raw)
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT)
    assert "STARTTLS" in imap.capabilities
    imap.starttls(ctx_for(pki))  # verifies chain + hostname 127.0.0.1 (IP SAN)
    imap.login(mailbox.user, mailbox.password)
    caps = imap.capability()[1][0].split()
    for cap in (b"IDLE", b"MOVE", b"UIDPLUS", b"CONDSTORE", b"QRESYNC"):
        assert cap in caps
    typ, data = imap.select("INBOX")
    assert typ == "OK" and data == [b"1"]
    typ, data = imap.fetch("1", "(BODY.PEEK[])")
    assert data[0][1] == raw
    imap.logout()
    assert dovecot.flags(mailbox.user) == [""]  # PEEK: still unseen


def test_imaps_folders_flags(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    raw = generate_message(1)
    dovecot.deliver(mailbox.user, raw, "Main/Sub", seen=True)
    dovecot.deliver(mailbox.user, generate_message(2), "Main/Sub")
    assert dovecot.folders(mailbox.user) == ["INBOX", "Main", "Main/Sub"]
    imap = imaps(dovecot, pki)
    imap.login(mailbox.user, mailbox.password)
    typ, listing = imap.list()
    names = b" ".join(listing)
    assert b'"/" Main/Sub' in names and b'"/" Main' in names
    imap.select("Main/Sub")
    typ, data = imap.fetch("1:2", "(FLAGS)")
    assert b"\\Seen" in data[0] and b"\\Seen" not in data[1]
    imap.store("2", "+FLAGS", "(\\Deleted \\Flagged)")
    imap.logout()
    mid = email.message_from_bytes(raw)["Message-ID"]
    flags = dovecot.flags_by_message_id(mailbox.user, "Main/Sub")
    assert flags[mid] == "S"
    assert sorted(dovecot.flags(mailbox.user, "Main/Sub")) == ["FT", "S"]
    assert dovecot.maildir_messages(mailbox.user, "Main/Sub")[0] == raw


def test_pop3s_retr(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    raw = generate_message(3)
    dovecot.deliver(mailbox.user, raw)
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=ctx_for(pki), timeout=TIMEOUT)
    pop.user(mailbox.user)
    pop.pass_(mailbox.password)
    assert pop.stat() == (1, len(raw))
    resp, lines, octets = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == raw
    pop.quit()
    assert "S" not in dovecot.flags(mailbox.user)[0]  # pop3_no_flag_updates


def test_pop3_stls(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    assert "STLS" in pop.capa()
    pop.stls(ctx_for(pki))
    pop.user(mailbox.user)
    pop.pass_(mailbox.password)
    assert pop.stat() == (0, 0)
    pop.quit()


def test_master_user_authzid(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    raw = generate_message(11)
    dovecot.deliver(mailbox.user, raw)
    imap = imaps(dovecot, pki)
    typ, _ = imap.authenticate("PLAIN", lambda _: f"{mailbox.user}\0master\0master-pw".encode())
    assert typ == "OK"
    imap.select("INBOX")
    assert imap.fetch("1", "(BODY.PEEK[])")[1][0][1] == raw
    imap.logout()
    # LOGIN form with the separator, and a wrong master password
    imap = imaps(dovecot, pki)
    assert imap.login(f"{mailbox.user}*master", "master-pw")[0] == "OK"
    imap.logout()
    imap = imaps(dovecot, pki)
    with pytest.raises(imaplib.IMAP4.error):
        imap.authenticate("PLAIN", lambda _: f"{mailbox.user}\0master\0nope".encode())
    imap.logout()


def test_bad_password_and_unknown_user_fail_fast(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    """Failed logins are refused at once and never lock out the valid login that follows."""
    # what Dovecot runs with: by default it delays each failure by 2 s and, through
    # the anvil penalty socket, every later login from the address by up to 15 s
    assert dovecot.setting("auth_failure_delay") == "0"
    assert int(dovecot.setting("service/anvil/unix_listener/anvil-auth-penalty/mode"), 8) == 0
    for user, password in [(mailbox.user, "wrong"), ("nobody-here", "x")] * 2:
        imap = imaps(dovecot, pki)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(user, password)
        imap.logout()
    imap = imaps(dovecot, pki)
    assert imap.login(mailbox.user, mailbox.password)[0] == "OK"
    imap.logout()


def test_users_added_while_running_work_at_once(dovecot: Dovecot, pki: Pki) -> None:
    # several in the same second: a shared passwd-file would hit Dovecot's
    # once-per-second re-read gate here
    for _ in range(4):
        user, password = dovecot.new_user("burst")
        imap = imaps(dovecot, pki)
        assert imap.login(user, password)[0] == "OK"
        imap.logout()


def test_idle_sees_direct_delivery(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    imap = imaps(dovecot, pki)
    imap.login(mailbox.user, mailbox.password)
    imap.select("INBOX")
    imap.send(b"i1 IDLE\r\n")
    assert imap.readline().startswith(b"+")
    dovecot.deliver(mailbox.user, generate_message(1))
    imap.sock.settimeout(5)
    line = imap.readline()
    while b"EXISTS" not in line:
        line = imap.readline()
    assert line.strip() == b"* 1 EXISTS"
    imap.send(b"DONE\r\n")
    while not imap.readline().startswith(b"i1 OK"):
        pass
    imap.logout()


def test_deliver_many_bulk(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    msgs = [generate_message(i, size=1000) for i in range(2000)]
    assert dovecot.deliver_many(mailbox.user, msgs, "Bulk") == 2000
    # written straight into the Maildir: all there on return, before any IMAP session
    assert len(dovecot.maildir_entries(mailbox.user, "Bulk")) == 2000
    imap = imaps(dovecot, pki)
    imap.login(mailbox.user, mailbox.password)
    assert imap.select("Bulk") == ("OK", [b"2000"])
    # UIDs follow delivery order
    assert imap.uid("FETCH", "2000", "(BODY.PEEK[])")[1][0][1] == msgs[-1]
    imap.logout()


def test_uidvalidity_reset(dovecot: Dovecot, mailbox: Mailbox, pki: Pki) -> None:
    for i in range(3):
        dovecot.deliver(mailbox.user, generate_message(i))
    imap = imaps(dovecot, pki)
    imap.login(mailbox.user, mailbox.password)
    imap.select("INBOX")
    before = uidvalidity(imap)
    imap.store("1", "+FLAGS", "(\\Deleted)")
    imap.expunge()
    uids = imap.uid("SEARCH", "ALL")[1][0].split()
    assert uids == [b"2", b"3"]
    imap.logout()
    assert dovecot.uidvalidity(mailbox.user) == before

    pid = dovecot.pid
    dovecot.reset_uidvalidity(mailbox.user)
    assert dovecot.pid != pid and dovecot.running

    imap = imaps(dovecot, pki)
    imap.login(mailbox.user, mailbox.password)
    imap.select("INBOX")
    after = uidvalidity(imap)
    assert after != before
    assert imap.uid("SEARCH", "ALL")[1][0].split() == [b"1", b"2"]
    imap.logout()


def test_untrusted_instance_fails_verification(dovecot_factory, pki: Pki) -> None:
    dc = dovecot_factory(untrusted=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(dc.host, dc.imaps_port, ssl_context=ctx_for(pki), timeout=TIMEOUT)
    imap = imaplib.IMAP4(dc.host, dc.imap_port, timeout=TIMEOUT)
    with pytest.raises(ssl.SSLCertVerificationError):
        imap.starttls(ctx_for(pki))
    # ...while its own CA verifies it
    ok = imaplib.IMAP4_SSL(dc.host, dc.imaps_port, timeout=TIMEOUT,
                           ssl_context=ssl.create_default_context(cafile=dc.served_ca_file))
    ok.login("alice", "alice-pw")
    ok.logout()


def test_no_starttls_instance(dovecot_factory) -> None:
    dc = dovecot_factory(starttls=False)
    imap = imaplib.IMAP4(dc.host, dc.imap_port, timeout=TIMEOUT)
    assert "STARTTLS" not in imap.capabilities
    with pytest.raises(imaplib.IMAP4.abort):
        imap.starttls(ssl.create_default_context())
    imap.login("bob", "bob-pw")
    imap.logout()
    pop = poplib.POP3(dc.host, dc.pop3_port, timeout=TIMEOUT)
    assert "STLS" not in pop.capa()
    pop.quit()
    with pytest.raises(DovecotError):
        dc.imaps_port


def test_stop_start_by_pid_and_start_failure_reports_log(dovecot_factory, pki: Pki, tmp_path: Path) -> None:
    dc = dovecot_factory()
    pid, port = dc.pid, dc.imap_port
    assert pid and Path(dc.base_dir, "master.pid").read_text().strip() == str(pid)
    dc.stop()
    assert dc.pid is None and not Path(f"/proc/{pid}").exists()
    with pytest.raises(OSError):
        socket.create_connection((dc.host, port), timeout=1).close()
    dc.start()
    assert dc.imap_port == port
    socket.create_connection((dc.host, port), timeout=1).close()

    broken = Dovecot(pki, workdir=tmp_path / "broken", extra_config="this is not { valid\n")
    with pytest.raises(DovecotError, match="(?s)configuration.*"):
        broken.start()
    broken.cleanup()


# ---------------------------------------------------------------- smtp


def test_smtp_starttls_auth_and_recipient_policies(smtp_server, pki: Pki) -> None:
    srv = smtp_server("starttls", users={"sender": "pw"}, require_starttls=True)
    raw = generate_message(5)
    with smtplib.SMTP(srv.host, srv.port, timeout=TIMEOUT) as c:
        c.ehlo()
        assert c.has_extn("starttls") and not c.has_extn("auth")
        assert c.mail("a@example.com")[0] == 530  # STARTTLS required
        c.starttls(context=ctx_for(pki))  # verified
        c.ehlo()
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        c.login("sender", "pw")
        refused = c.sendmail("a@example.com", ["b@example.com", "tempfail-1@example.com"], raw)
        assert refused == {"tempfail-1@example.com": (451, b"4.3.0 try again later")}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as ei:
            c.sendmail("a@example.com", ["reject-me@example.com"], raw)
        assert ei.value.recipients["reject-me@example.com"][0] == 550
    (msg,) = srv.messages
    assert msg.data == raw and msg.rcpt_tos == ["b@example.com"] and msg.mail_from == "a@example.com"
    assert msg.auth_login == "sender" and msg.tls and msg.session_id == 1
    assert srv.sessions_opened == 1 and srv.auth_attempts == [("sender", True)]


def test_smtp_bad_auth_fail_next_data_and_size(smtp_server, pki: Pki) -> None:
    srv = smtp_server("tls", users={"u": "p"}, size_limit=5000)
    with smtplib.SMTP_SSL(srv.host, srv.port, context=ctx_for(pki), timeout=TIMEOUT) as c:
        assert c.ehlo()[0] == 250 and c.esmtp_features["size"] == "5000"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("u", "wrong")
        c.login("u", "p")
        srv.fail_next_data(2)
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as ei:
                c.sendmail("a@x.test", ["b@x.test"], generate_message(1, size=1000))
            assert ei.value.smtp_code == 451
        c.sendmail("a@x.test", ["b@x.test"], generate_message(2, size=1000))
        with pytest.raises(smtplib.SMTPSenderRefused):  # SIZE exceeded (552)
            c.sendmail("a@x.test", ["b@x.test"], generate_message(3, size=9000))
    assert len(srv.wait_for_messages(1)) == 1


def test_smtp_plain_no_auth_offered(smtp_server) -> None:
    srv = smtp_server("plain")
    with smtplib.SMTP(srv.host, srv.port, timeout=TIMEOUT) as c:
        c.ehlo()
        assert not c.has_extn("auth") and not c.has_extn("starttls")
        c.sendmail("a@x.test", ["b@x.test"], b"Subject: hi\r\n\r\n.leading dot\r\n")
    assert srv.messages[0].data == b"Subject: hi\r\n\r\n.leading dot\r\n"
    assert srv.messages[0].auth_login is None and not srv.messages[0].tls


def test_smtp_separate_process_spool(smtp_process) -> None:
    proc = smtp_process("plain", args=["--user", "u:p", "--no-auth-require-tls"])
    with smtplib.SMTP(proc.host, proc.port, timeout=TIMEOUT) as c:
        c.login("u", "p")
        c.sendmail("a@x.test", ["b@x.test"], b"Subject: one\r\n\r\nbody\r\n")
    assert proc.count() == 1
    (entry,) = read_spool(proc.spool_dir)
    assert entry.data == b"Subject: one\r\n\r\nbody\r\n" and entry.meta["auth_login"] == "u"
    pid = proc.pid
    proc.kill()
    assert not Path(f"/proc/{pid}").exists() or proc.proc.poll() is not None
