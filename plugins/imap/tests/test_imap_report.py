"""``mailhost incoming test`` for IMAP: step by step, stopping at the first failure."""
from __future__ import annotations

import socket

from mailhost.protocols import Encryption
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


def report(conn):
    return [(step.name, step.ok, step.detail) for step in PROVIDER.test(conn)]


def test_report_of_a_good_connection(settings, dovecot, mailbox):
    """Every step passes and says what it found."""
    dovecot.deliver_many(mailbox.user, (generate_message(i) for i in range(2)), folder="Main/Sub")
    steps = report(settings(host="localhost", encryption=Encryption.STARTTLS, folder="Main/Sub"))
    assert [(name, ok) for name, ok, _ in steps] == [
        ("dns", True), ("tcp", True), ("tls", True), ("authentication", True), ("capabilities", True), ("folder", True),
    ]
    details = {name: detail for name, _, detail in steps}
    assert "127.0.0.1" in details["dns"] and str(dovecot.imap_port) in details["tcp"]
    assert details["tls"].startswith("STARTTLS: TLSv1.") and "commonName=localhost" in details["tls"]
    assert "valid until 20" in details["tls"]
    assert details["authentication"] == f"signed in as {mailbox.user}"
    assert details["capabilities"] == "IDLE yes, MOVE yes, UIDPLUS yes, CONDSTORE yes, QRESYNC yes"
    assert details["folder"] == "folder Main/Sub exists and holds 2 messages"


def test_report_stops_at_dns(settings):
    """An unknown host fails at DNS, with the fix."""
    steps = report(settings(host="no-such-host.invalid"))
    assert len(steps) == 1 and steps[0][:2] == ("dns", False)
    assert "does not resolve" in steps[0][2] and "check the host name" in steps[0][2]


def test_report_stops_at_tcp(settings):
    """A closed port fails at TCP, after DNS passed."""
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    steps = report(settings(port=port))
    assert [(name, ok) for name, ok, _ in steps] == [("dns", True), ("tcp", False)]
    assert "cannot connect to helpdesk on 127.0.0.1" in steps[1][2] and "check the host, the port" in steps[1][2]


def test_report_stops_at_tls_on_a_plain_port(settings, dovecot):
    """SSL against the plain port fails at TLS, suggesting the encryption setting."""
    steps = report(settings(port=dovecot.imap_port))
    assert [(name, ok) for name, ok, _ in steps][-1] == ("tls", False)
    assert "check the encryption setting and the port" in steps[-1][2]


def test_report_stops_at_authentication(settings, mailbox):
    """A wrong password fails at authentication; no later step runs."""
    steps = report(settings(password="wrong"))
    assert [(name, ok) for name, ok, _ in steps][-2:] == [("tls", True), ("authentication", False)]
    assert "check the username and password" in steps[-1][2] and "wrong" not in steps[-1][2].split("(")[0]


def test_report_stops_at_a_missing_folder(settings):
    """A missing folder is the last step, failed, naming the folder."""
    steps = report(settings(folder="Nowhere"))
    assert steps[-1][:2] == ("folder", False) and "folder Nowhere does not exist" in steps[-1][2]


def test_report_without_tls_warns(settings):
    """Encryption none passes, but says the password crosses the network readable."""
    steps = report(settings(encryption=Encryption.NONE))
    assert steps[2][:2] == ("greeting", True) and "readable" in steps[2][2]
    assert all(ok for _, ok, _ in steps)
