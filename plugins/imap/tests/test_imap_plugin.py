"""The plugin as the host sees it: entry point, hook, provider."""
from __future__ import annotations

import importlib.metadata

from mailhost.protocols import Direction, Encryption

from mailhost_imap import PROVIDER, link, register_protocols


def test_entry_point_in_the_mailhost_group():
    """The distribution declares ``imap = mailhost_imap`` in the group ``mailhost``."""
    points = importlib.metadata.entry_points(group="mailhost")
    assert any(point.name == "imap" and point.value == "mailhost_imap" for point in points)


def test_register_protocols_registers_the_provider():
    """The hook registers one incoming provider with the IMAP defaults."""
    registered = []
    register_protocols(registered.append)
    assert registered == [PROVIDER]
    assert PROVIDER.direction is Direction.INCOMING and PROVIDER.connect_modes == {"password", "oauth2"}
    assert PROVIDER.default_ports == {Encryption.NONE: 143, Encryption.STARTTLS: 143, Encryption.SSL: 993}
    assert PROVIDER.default_ports == link.DEFAULT_PORTS  # one declaration, beside the provider
    assert PROVIDER.after_download == ("mark-seen", "delete", "move", "keep") and PROVIDER.default_folder == "INBOX"
    assert "folder" in PROVIDER.attributes and PROVIDER.required == {"host", "username", "password"}


def test_inbox_is_case_insensitive_and_other_folders_are_not():
    """RFC 3501 5.1: INBOX in any case is the INBOX; other names keep their case."""
    assert [PROVIDER.canonical_folder(name) for name in ("inbox", "Inbox", "INBOX", "Inbox/Sub", "Sales")] == [
        "INBOX", "INBOX", "INBOX", "Inbox/Sub", "Sales"]
