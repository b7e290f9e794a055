"""The Graph outgoing session against the stand-in: sendMail with MIME, and its refusals."""
from __future__ import annotations

import pytest
from graph_helpers import ALICE, BOB, SUPPORT, Settings, message
from mailhost.errors import PermanentFailure, TemporaryFailure
from mailhost_graph.outgoing import open_outgoing, with_envelope

from tests.servers.graph import GraphServer

RAW = (b"From: Alice <alice@contoso.com>\r\nTo: Carol <carol@example.org>\r\nCc: dave@example.org\r\n"
       b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <s1@contoso.com>\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")


def test_send_202_as_mime(graph: GraphServer, settings: Settings) -> None:
    """The queued bytes reach Graph as they are (base64 MIME); 202 is success; Sent Items has a copy."""
    with open_outgoing(settings()) as s:
        result = s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert result.response.startswith("202 Accepted") and not result.refused
    [sent] = graph.sent
    assert (sent.mailbox, sent.caller, sent.raw) == (ALICE, ALICE, RAW)
    assert sent.recipients == ("carol@example.org", "dave@example.org")
    assert [m.raw for m in graph.messages(ALICE, "sentitems")] == [RAW]


def test_envelope_only_recipients_go_as_bcc(graph: GraphServer, settings: Settings) -> None:
    """Bcc recipients are only in the envelope: they are added as a Bcc header, which Exchange strips."""
    with open_outgoing(settings()) as s:
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org", "Erin@Example.org"])
    [sent] = graph.sent
    assert sent.raw == b"Bcc: Erin@Example.org\r\n" + RAW
    assert b"Bcc" not in graph.messages(ALICE, "sentitems")[0].raw


def test_header_recipient_not_in_envelope_is_refused() -> None:
    """Graph would send to every header recipient: one the envelope leaves out is refused, nothing sent."""
    with pytest.raises(PermanentFailure, match="dave@example.org.*SMTP"):
        with_envelope(RAW, ["carol@example.org"])
    assert with_envelope(RAW, ["DAVE@example.org", "carol@example.org"]) == RAW


def test_shared_mailbox_sends_as_itself(graph: GraphServer, settings: Settings) -> None:
    """From address = the shared mailbox: sendMail on its URL, with alice's Send As right."""
    raw = RAW.replace(b"Alice <alice@contoso.com>", b"Support <support@contoso.com>")
    scopes = ("Mail.Send", "Mail.Send.Shared")
    with open_outgoing(settings(scopes=scopes, from_address=f"Support <{SUPPORT}>")) as s:
        s.send(raw, SUPPORT, ["carol@example.org", "dave@example.org"])
    assert [(m.mailbox, m.caller) for m in graph.sent] == [(SUPPORT, ALICE)]
    with open_outgoing(settings(scopes=scopes, user=BOB, username=BOB, from_address=SUPPORT)) as s, \
            pytest.raises(PermanentFailure) as refused:
        s.send(raw, SUPPORT, ["carol@example.org", "dave@example.org"])
    assert len(graph.sent) == 1
    assert str(refused.value).startswith(
        f"Microsoft Graph at 127.0.0.1:{graph.port} refused to let {BOB} send as {SUPPORT} (403 ErrorSendAsDenied): "
        f"an Exchange admin must give {BOB} Send As or Send on Behalf on {SUPPORT}, and the connection's OAuth2 "
        "credential needs the scope Mail.Send.Shared")


def test_send_as_without_full_access_goes_through_the_users_mailbox(graph: GraphServer, settings: Settings) -> None:
    """bob has Send As on support but no Full Access, which sending through support's own
    URL needs (Microsoft: "Send Outlook messages from another user"): Graph refuses that
    URL, nothing is sent, and the message goes through bob's mailbox with From support."""
    graph.grant(SUPPORT, BOB, full_access=False, send_as=True)
    raw = RAW.replace(b"Alice <alice@contoso.com>", b"Support <support@contoso.com>")
    with open_outgoing(settings(scopes=("Mail.Send", "Mail.Send.Shared"), user=BOB, username=BOB,
                                from_address=f"Support <{SUPPORT}>")) as s:
        result = s.send(raw, SUPPORT, ["carol@example.org", "dave@example.org"])
        s.send(raw, SUPPORT, ["carol@example.org", "dave@example.org"])  # the session remembers the way
    assert result.response.endswith(f"from mailbox {BOB} as {SUPPORT}")
    assert [(m.mailbox, m.caller, m.raw) for m in graph.sent] == [(BOB, BOB, raw)] * 2
    assert graph.stats["sendmail"] == 3 and len(graph.messages(BOB, "sentitems")) == 2  # one refusal


def test_an_alias_of_the_user_sends_through_the_users_mailbox(graph: GraphServer, settings: Settings) -> None:
    """From address = one of dana's proxy addresses, which /users/{...} does not take (404
    ErrorInvalidUser): the message goes through dana's mailbox, From as written; the
    connection test says so instead of failing."""
    from mailhost_graph.diagnose import test_outgoing

    dana = "dana@contoso.com"
    graph.add_user(dana, aliases=["sales@contoso.com"])
    raw = RAW.replace(b"Alice <alice@contoso.com>", b"Sales <sales@contoso.com>")
    conn = settings(user=dana, username=dana, from_address="Sales <sales@contoso.com>")
    with open_outgoing(conn) as s:
        s.send(raw, "sales@contoso.com", ["carol@example.org", "dave@example.org"])
    assert [(m.mailbox, m.caller, m.raw) for m in graph.sent] == [(dana, dana, raw)]
    steps = list(test_outgoing(conn))
    assert [s.ok for s in steps] == [True, True, True], steps
    assert f"go through {dana}'s mailbox with From sales@contoso.com" in steps[1].detail


def test_refusals_are_permanent_with_graphs_code(graph: GraphServer, settings: Settings) -> None:
    """403 (no Mail.Send) and 400 are permanent and name Graph's error code and message."""
    with open_outgoing(settings(scopes=("Mail.Read",))) as s, \
            pytest.raises(PermanentFailure, match="403 ErrorAccessDenied: Access is denied.*Mail.Send"):
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    graph.fail("sendmail", 400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
    with open_outgoing(settings()) as s, pytest.raises(PermanentFailure, match="400 ErrorInvalidRecipients"):
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert graph.sent == []


@pytest.mark.parametrize("status", [429, 503, 500])
def test_throttled_or_failing_send_is_temporary(graph: GraphServer, settings: Settings, status: int) -> None:
    """429, 503 and 5xx are temporary, with the server's Retry-After; the session does not resend itself."""
    if status == 500:
        graph.fail("sendmail", 500, "InternalServerError", "Something went wrong.")
    else:
        graph.throttle(burst=1, status=status, retry_after=7)
    with open_outgoing(settings()) as s, pytest.raises(TemporaryFailure) as caught:
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert caught.value.retry_after == (None if status == 500 else 7.0)
    assert graph.sent == [] and graph.stats["sendmail"] == 0


def test_a_gateway_timeout_on_send_is_in_doubt(graph: GraphServer, settings: Settings) -> None:
    """504 from a gateway: the mailbox server behind it may have sent the message."""
    graph.fail("sendmail", 504, "GatewayTimeout", "The gateway did not receive a response.")
    with open_outgoing(settings()) as s, pytest.raises(TemporaryFailure, match="504 Gateway Timeout") as caught:
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert caught.value.in_doubt is True


def test_refused_token_is_temporary(graph: GraphServer, settings: Settings) -> None:
    """A token refused twice is a sign-in problem of the connection, not of the message."""
    with open_outgoing(settings(access_token=lambda: "expired")) as s, \
            pytest.raises(TemporaryFailure, match="refused the access token"):
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])


def test_too_large_is_permanent(graph: GraphServer, settings: Settings) -> None:
    """413 for a request body Graph will not take: permanent, nothing sent."""
    graph.max_request_bytes = 100
    with open_outgoing(settings()) as s, pytest.raises(PermanentFailure, match="413 BadRequest: The maximum request length"):
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert graph.sent == []


def test_send_without_an_answer_is_in_doubt(graph: GraphServer, settings: Settings) -> None:
    """Graph took the message and the link dropped before its 202: the failure is
    temporary and in doubt (it may have been sent), so the queue neither falls back at
    once nor forgets it; a refused connection is not in doubt."""
    graph.drop("sendmail")
    with open_outgoing(settings()) as s, pytest.raises(TemporaryFailure, match="may have acted on it") as caught:
        s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert caught.value.in_doubt is True and len(graph.sent) == 1
    with open_outgoing(settings()) as s:
        graph.stop()
        with pytest.raises(TemporaryFailure) as refused:
            s.send(RAW, ALICE, ["carol@example.org", "dave@example.org"])
    assert refused.value.in_doubt is False


def test_too_large_without_attachments_is_permanent(graph: GraphServer, settings: Settings) -> None:
    """5 MB of text and no attachment to send on its own: refused before any request, naming SMTP."""
    raw = message(1, size=5 * 1024 * 1024, to="carol@example.org")
    with open_outgoing(settings()) as s, pytest.raises(PermanentFailure) as caught:
        s.send(raw, ALICE, ["carol@example.org"])
    assert str(caught.value) == ("the message is 5.2 MB, more than Microsoft Graph takes in one request (4 MB in "
                                 "base64), even without its attachments: send it through an SMTP connection")
    assert graph.sent == [] and not graph.stats
