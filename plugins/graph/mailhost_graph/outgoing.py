"""The Graph outgoing session: the queued MIME message, sent as it is with ``sendMail``.

``POST /users/{mailbox}/sendMail`` with ``Content-Type: text/plain`` and the message in
base64 (Microsoft: "user: sendMail", MIME format); ``202 Accepted`` is success. The
mailbox is the connection's From address (a shared mailbox, which needs Send As) or
else its username. Exchange saves a copy in the mailbox's Sent Items.

Graph takes the recipients from the MIME headers (To, Cc, Bcc), not from an envelope.
Envelope recipients missing from the headers (the Bcc of a composed message) are added
as a ``Bcc`` header, which Exchange delivers to and strips. A message whose headers name
someone the envelope leaves out is refused rather than sent to them.
"""
from __future__ import annotations

import base64
import email.parser
import email.policy
import re
from collections.abc import Sequence
from email.utils import getaddresses, parseaddr
from urllib.parse import quote

from mailhost.errors import PermanentFailure, TemporaryFailure
from mailhost.protocols import ConnectionSettings, OutgoingSession, SendResult

from .client import GraphClient, signed_in

__all__ = ["GraphOutgoingSession", "open_outgoing", "sending_mailbox", "with_envelope"]

_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_END = re.compile(rb"\r?\n\r?\n")


def open_outgoing(settings: ConnectionSettings) -> GraphOutgoingSession:
    """The provider's ``open``: gets a token at once, so a bad credential fails early."""
    return GraphOutgoingSession(settings, signed_in(settings))


def sending_mailbox(settings: ConnectionSettings) -> str:
    """The mailbox that sends: the From address (shared mailbox) or the username."""
    address = parseaddr(settings.from_address or "")[1]
    return address or settings.username or ""


class GraphOutgoingSession(OutgoingSession):
    """Sends through one mailbox with ``sendMail`` (see the module doc)."""

    def __init__(self, settings: ConnectionSettings, client: GraphClient) -> None:
        self.settings = settings
        self.client = client
        self.mailbox = sending_mailbox(settings)
        if not self.mailbox:
            raise PermanentFailure(f"connection {settings.name} has no mailbox to send from: give --username")

    def __repr__(self) -> str:
        return f"<GraphOutgoingSession {self.mailbox} on {self.client.host}>"

    def send(self, raw: bytes, sender: str, recipients: Sequence[str]) -> SendResult:
        """One ``sendMail``; 429, 503 and 5xx raise TemporaryFailure (with the server's
        Retry-After), 400 and 403 PermanentFailure with Graph's code and message, a
        refused token TemporaryFailure (as a failed sign-in does). It is never retried
        here: the outgoing queue does that, so nothing goes twice."""
        message = with_envelope(raw, recipients)
        doing = f"send a message as {self.mailbox}"
        response = self.client.request(
            "POST", f"/users/{quote(self.mailbox, safe='@')}/sendMail", doing=doing,
            content=base64.b64encode(message), headers={"Content-Type": "text/plain"}, retry=False,
        )
        if response.status_code == 401:
            # The credential, not the message: like a failed sign-in, try again later.
            refused = self.client.error(401, response.json() if response.content else None, response.headers, doing)
            raise TemporaryFailure(str(refused))
        self.client.check(response, doing, ok=(202,))
        return SendResult(f"202 Accepted: {self.client.where} took the message for {len(recipients)} "
                          f"recipient(s) from mailbox {self.mailbox}")

    def close(self) -> None:
        """Close the HTTP connections; never raises."""
        self.client.close()


def with_envelope(raw: bytes, recipients: Sequence[str]) -> bytes:
    """``raw`` as Graph must get it so that exactly ``recipients`` receive it."""
    end = _END.search(raw)
    head = raw[: end.start()] if end else raw
    parsed = _HEADERS.parsebytes(head + b"\n\n")
    named = {a.lower() for _, a in getaddresses([str(v) for k in ("To", "Cc", "Bcc") for v in parsed.get_all(k, [])])
             if "@" in a}
    wanted = {r.strip().lower(): r.strip() for r in recipients if r.strip()}
    if not wanted:
        raise PermanentFailure("the message has no recipient")
    extra = [wanted[a] for a in wanted if a not in named]
    left_out = sorted(named - set(wanted))
    if left_out:
        raise PermanentFailure(
            f"Microsoft Graph sends to every To, Cc and Bcc of a MIME message, and this one names "
            f"{', '.join(left_out)}, whom it is not for (already delivered, or not asked): "
            "send it through an SMTP connection, or make its headers name only its recipients"
        )
    if not extra:
        return raw
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    return b"Bcc: " + ", ".join(extra).encode("utf-8") + newline + raw

