"""Names and messages the Graph plugin's tests share."""
from __future__ import annotations

from collections.abc import Callable

from mailhost.protocols import ConnectionSettings

ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
SUPPORT = "support@contoso.com"

Settings = Callable[..., ConnectionSettings]


def message(i: int, size: int = 0, to: str = ALICE) -> bytes:
    """A small MIME message with a unique Message-ID, padded to about ``size`` bytes."""
    head = (f"From: Sender {i} <sender{i}@example.org>\r\nTo: {to}\r\nSubject: message {i}\r\n"
            f"Message-ID: <m{i}@example.org>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    body = f"Grüße, message {i}\r\n".encode()
    lines = max(0, -(-(size - len(head) - len(body)) // 78))  # whole lines, built at once
    return head + body + (b"x" * 76 + b"\r\n") * lines
