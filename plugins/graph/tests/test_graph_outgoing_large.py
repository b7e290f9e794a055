"""Messages over Graph's 4 MB request limit: a draft, its attachments uploaded, then send.

Against the stand-in, which refuses any request over 4 MB as Graph does and records
what the recipients get (:attr:`tests.servers.graph.SentMail.attachments`).
"""
from __future__ import annotations

import email
import email.policy
import random
from email.message import EmailMessage

import pytest
from graph_helpers import ALICE, SUPPORT, Settings
from mailhost.errors import PermanentFailure, TemporaryFailure
from mailhost_graph.outgoing import REQUEST_LIMIT, TAG_PROPERTY, draft_key, open_outgoing, split_message

from tests.servers.graph import GraphServer

TO = ["carol@example.org"]
TEXT = "Grüße, the files you asked for.\n"


def data(size: int, seed: int = 1) -> bytes:
    """``size`` random bytes (no compression or pattern can hide a lost byte)."""
    return random.Random(seed).randbytes(size)


def mail(*files: tuple[str, bytes], inline: tuple[str, bytes] | None = None, pad: int = 0) -> bytes:
    """A message from alice to carol as ``mailhost send`` composes it, with these
    attachments (name, content), an inline image referenced from HTML, and ``pad``
    extra bytes of text."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = f"Alice <{ALICE}>", ", ".join(TO), "Files"
    msg["Message-ID"] = "<large@contoso.com>"
    msg.set_content(TEXT + ("x" * 70 + "\n") * (pad // 72) + "y" * (pad % 72) + "\n", cte="8bit")
    if inline is not None:
        msg.add_alternative(f'<p>{TEXT}<img src="cid:{inline[0]}"></p>', subtype="html")
        msg.get_payload()[1].add_related(inline[1], "image", "png", cid=f"<{inline[0]}>")
    for name, content in files:
        msg.add_attachment(content, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def received(graph: GraphServer) -> list[tuple[str, bytes, bool, str | None]]:
    """What carol finds attached to the one message sent."""
    [sent] = graph.sent
    return [(a.name, a.content, a.is_inline, a.content_id) for a in sent.attachments]


def test_5_mb_and_200_kb_attachments_arrive_complete(graph: GraphServer, settings: Settings) -> None:
    """The 5 MB file goes through an upload session in ranges, the 200 KB one stays in
    the draft's MIME; carol gets both byte for byte, and the text; no draft is left."""
    big, small = data(5 * 1024 * 1024), data(200 * 1024, seed=2)
    transcript: list[str] = []
    with open_outgoing(settings(transcript=transcript.append)) as s:
        result = s.send(mail(("report.pdf", big), ("notes.bin", small)), ALICE, TO)
    assert result.response.startswith("202 Accepted")
    puts = [line for line in transcript if line.startswith("> PUT ")]
    assert len(puts) == 2 and not [line for line in transcript if "authtoken" in line]  # the URL's token stays out
    assert received(graph) == [("report.pdf", big, False, None), ("notes.bin", small, False, None)]
    [sent] = graph.sent
    assert sent.recipients == ("carol@example.org",) and TEXT.strip().encode("utf-8") in sent.raw
    # notes.bin follows report.pdf, so it is POSTed after it rather than left in the MIME
    assert (graph.stats["sendmail"], graph.stats["create"], graph.stats["uploadsession"], graph.stats["upload"],
            graph.stats["attach"], graph.stats["send"]) == (0, 1, 1, 2, 1, 1)
    assert graph.messages(ALICE, "drafts") == [] and len(graph.messages(ALICE, "sentitems")) == 1


def test_just_under_the_limit_goes_in_one_sendmail(graph: GraphServer, settings: Settings) -> None:
    """Exactly 4 MB of base64 is one sendMail; three bytes more of MIME (four of base64)
    make a draft."""
    base = mail(("a.bin", data(2_200_000)))
    exact = mail(("a.bin", data(2_200_000)), pad=REQUEST_LIMIT * 3 // 4 - len(base))
    assert len(exact) * 4 // 3 == REQUEST_LIMIT
    with open_outgoing(settings()) as s:
        s.send(exact, ALICE, TO)
        assert (graph.stats["sendmail"], graph.stats["create"]) == (1, 0)
        s.send(mail(("a.bin", data(2_200_000)), pad=REQUEST_LIMIT * 3 // 4 - len(base) + 3), ALICE, TO)
    assert (graph.stats["sendmail"], graph.stats["create"], graph.stats["send"]) == (1, 1, 1)
    assert [[a.content for a in m.attachments] for m in graph.sent] == [[data(2_200_000)]] * 2


def test_a_413_to_sendmail_falls_back_to_a_draft(graph: GraphServer, settings: Settings) -> None:
    """Should Graph's limit be under 4 MiB, its 413 to sendMail (nothing sent) leads to the
    draft; the host's gate runs once, before the request that sends."""
    graph.max_request_bytes = 3_500_000
    gates: list[int] = []
    with open_outgoing(settings()) as s:
        s.send(mail(("a.bin", data(2_200_000))), ALICE, TO, before_data=lambda: gates.append(len(graph.sent)))
    assert gates == [0] and received(graph) == [("a.bin", data(2_200_000), False, None)]
    # stats count requests served: the sendMail was refused at the door
    assert (graph.stats["sendmail"], graph.stats["create"], graph.stats["attach"], graph.stats["send"]) == (0, 1, 1, 1)


def test_attachments_under_3_mb_are_posted(graph: GraphServer, settings: Settings) -> None:
    """Three files of 1.5 MB: two would do to fit the draft, but the third follows them,
    so all three leave the MIME and are POSTed whole (upload sessions refuse files under
    3 MB); carol gets all three, in order."""
    files = [(f"part{i}.bin", data(1_500_000, seed=i)) for i in range(3)]
    with open_outgoing(settings()) as s:
        s.send(mail(*files), ALICE, TO)
    assert received(graph) == [(n, c, False, None) for n, c in files]
    assert (graph.stats["attach"], graph.stats["uploadsession"]) == (3, 0)


def test_attachments_keep_their_order(graph: GraphServer, settings: Settings) -> None:
    """Exchange lists attachments added to a draft after those in its MIME: the files
    after the first one taken out are taken out too and added in order, so carol finds
    them as they were (one POST more per small file after the first large one; the
    ones before it, and inline images, stay in the MIME)."""
    files = [("a.txt", data(1000, seed=1)), ("big.bin", data(5_000_000, seed=2)), ("c.txt", data(1000, seed=3)),
             ("big2.bin", data(4_000_000, seed=4)), ("e.txt", data(1000, seed=5))]
    with open_outgoing(settings()) as s:
        s.send(mail(*files, inline=("logo@contoso.com", data(2000, seed=6))), ALICE, TO)
    assert [(n, c) for n, c, _, _ in received(graph)] == [("", data(2000, seed=6)), *files]  # the image has no name
    assert (graph.stats["create"], graph.stats["uploadsession"], graph.stats["attach"]) == (1, 2, 2)
    draft, taken = split_message(mail(*files), 3 * 1024 * 1024)
    assert [f.name for f in taken] == ["big.bin", "c.txt", "big2.bin", "e.txt"] and b"a.txt" in draft


def test_large_inline_image_keeps_its_content_id(graph: GraphServer, settings: Settings) -> None:
    """An inline image of 4 MB referenced by cid: uploaded with isInline and its contentId."""
    image = data(4 * 1024 * 1024)
    with open_outgoing(settings()) as s:
        s.send(mail(inline=("logo@contoso.com", image)), ALICE, TO)
    assert received(graph) == [("logo.png", image, True, "logo@contoso.com")]
    assert b"cid:logo@contoso.com" in graph.sent[0].raw


def test_envelope_rules_hold_for_large_messages(graph: GraphServer, settings: Settings) -> None:
    """An envelope-only recipient goes as Bcc (delivered, stripped from Sent Items); a
    header recipient the envelope leaves out is refused before any request."""
    raw = mail(("a.bin", data(5_000_000)))
    with open_outgoing(settings()) as s:
        s.send(raw, ALICE, [*TO, "erin@example.org"])
        assert graph.sent[0].recipients == ("carol@example.org", "erin@example.org")
        assert b"erin@example.org" not in graph.messages(ALICE, "sentitems")[0].raw
        requests = sum(graph.stats.values())
        with pytest.raises(PermanentFailure, match="names carol@example.org"):
            s.send(raw, ALICE, ["erin@example.org"])
    assert sum(graph.stats.values()) == requests and len(graph.sent) == 1


def test_a_failed_upload_leaves_no_draft_and_the_retry_sends_once(graph: GraphServer, settings: Settings) -> None:
    """A 500 mid-upload, then a range whose answer is lost (sent again, refused as out of
    place): each is a TemporaryFailure that deletes its draft; the retry sends once."""
    raw = mail(("a.bin", data(7_000_000)))
    with open_outgoing(settings()) as s:
        graph.fail("upload", 500, "InternalServerError", "Something went wrong.")
        with pytest.raises(TemporaryFailure, match="500 InternalServerError") as failed:
            s.send(raw, ALICE, TO)
        assert failed.value.in_doubt is False
        assert graph.messages(ALICE, "drafts") == [] and graph.sent == []
        graph.drop("upload")
        with pytest.raises(TemporaryFailure, match="lost its place"):
            s.send(raw, ALICE, TO)
        assert graph.messages(ALICE, "drafts") == [] and graph.sent == []
        s.send(raw, ALICE, TO)
    assert received(graph) == [("a.bin", data(7_000_000), False, None)]
    assert graph.messages(ALICE, "drafts") == [] and len(graph.messages(ALICE, "sentitems")) == 1


def test_throttling_mid_upload_waits_for_retry_after(graph: GraphServer, settings: Settings) -> None:
    """429 on upload ranges: a short Retry-After is waited for in the session; one longer
    than the session waits is a TemporaryFailure carrying it, with no draft left."""
    raw = mail(("a.bin", data(7_000_000)))
    with open_outgoing(settings()) as s:
        graph.throttle(burst=2, kinds={"upload"}, retry_after=0.01)
        s.send(raw, ALICE, TO)
        assert graph.stats["throttled"] == 2 and len(graph.sent) == 1
        graph.throttle(burst=1, kinds={"upload"}, retry_after=120)
        with pytest.raises(TemporaryFailure, match="429 TooManyRequests") as caught:
            s.send(raw, ALICE, TO)
    assert caught.value.retry_after == 120 and len(graph.sent) == 1
    assert graph.messages(ALICE, "drafts") == []


def test_the_final_send(graph: GraphServer, settings: Settings) -> None:
    """A 503 on send is waited out (the server says it did nothing); a send whose answer
    is lost is in doubt (Graph did send it) and its draft is left alone."""
    raw = mail(("a.bin", data(5_000_000)))
    with open_outgoing(settings()) as s:
        graph.throttle(burst=1, kinds={"send"}, status=503, retry_after=0.01)
        s.send(raw, ALICE, TO)
        assert len(graph.sent) == 1
        graph.drop("send")
        with pytest.raises(TemporaryFailure, match="may have acted on it") as caught:
            s.send(raw, ALICE, TO)
    assert caught.value.in_doubt is True and len(graph.sent) == 2
    assert graph.stats["delete"] == 0


def test_a_lost_answer_to_the_draft_leaves_no_second_draft(graph: GraphServer, settings: Settings) -> None:
    """The server saves the draft and the link drops before its answer: the draft is
    found by its tag and used, not saved again beside an orphan; a gateway's 504 before
    anything was saved is a plain TemporaryFailure, nothing left behind."""
    raw = mail(("a.bin", data(5_000_000)))
    graph.drop("create")
    with open_outgoing(settings()) as s:
        s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        assert (graph.stats["create"], graph.stats["send"]) == (1, 1) and len(graph.sent) == 1
        assert graph.messages(ALICE, "drafts") == []
        graph.fail("create", 504, "GatewayTimeout", "The gateway did not receive a response in time.")
        with pytest.raises(TemporaryFailure, match="saved no draft") as caught:
            s.send(raw, ALICE, TO)  # no key from a queue: the tag still finds this attempt's own draft
    assert caught.value.in_doubt is False and len(graph.sent) == 1 and graph.messages(ALICE, "drafts") == []


def test_the_draft_carries_its_tag_where_graph_filters_on_it(graph: GraphServer, settings: Settings) -> None:
    """The tag is a custom header of the draft's MIME, found with Graph's documented
    filter on a string extended property (PS_INTERNET_HEADERS), per mailbox and key."""
    key = draft_key(ALICE, "item-1")
    assert key != draft_key(ALICE, "item-2") and key != draft_key(SUPPORT, "item-1") and len(key) == 32
    with open_outgoing(settings()) as s:
        s.send(mail(("a.bin", data(5_000_000))), ALICE, TO, before_data=lambda: None, delivery_key="item-1")
    [copy] = graph.messages(ALICE, "sentitems")
    assert copy.raw.startswith(f"x-mailhost-draft: {key}\r\n".encode())
    assert TAG_PROPERTY == "String {00020386-0000-0000-C000-000000000046} Name x-mailhost-draft"


def test_an_unanswered_send_that_went_out_is_not_sent_again(graph: GraphServer, settings: Settings) -> None:
    """The send's answer is lost after Graph sent it (the draft moved to Sent Items): the
    next attempt at that queued message finds the sent copy by its tag and reports it
    sent, through the host's gate, sending nothing; another queued message with the
    same bytes is another message, and goes."""
    raw = mail(("a.bin", data(5_000_000)))
    gates: list[int] = []
    with open_outgoing(settings()) as s:
        graph.drop("send")
        with pytest.raises(TemporaryFailure, match="may have acted on it") as caught:
            s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        assert caught.value.in_doubt is True and len(graph.sent) == 1
        result = s.send(raw, ALICE, TO, before_data=lambda: gates.append(len(graph.sent)), delivery_key="item-1")
        assert result.response.startswith("sent already") and "earlier attempt" in result.response and gates == [1]
        assert len(graph.sent) == 1 and (graph.stats["create"], graph.stats["send"]) == (1, 1)
        s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-2")
    assert len(graph.sent) == 2 and graph.messages(ALICE, "drafts") == []


def test_a_draft_an_unanswered_send_left_is_sent_by_the_next_attempt(graph: GraphServer,
                                                                     settings: Settings) -> None:
    """A gateway's 504 to send, the server behind it having done nothing: in doubt, the
    draft stays (still in Drafts: not sent, as a sent draft moves to Sent Items). It was
    marked complete before its send, so the next attempt sends that draft, through the
    host's gate, uploading nothing again; Drafts is empty after."""
    raw = mail(("a.bin", data(5_000_000)))
    gates: list[int] = []
    with open_outgoing(settings()) as s:
        graph.fail("send", 504, "GatewayTimeout", "The gateway did not receive a response in time.")
        with pytest.raises(TemporaryFailure, match="504") as caught:
            s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        assert caught.value.in_doubt is True and graph.sent == [] and len(graph.messages(ALICE, "drafts")) == 1
        s.send(raw, ALICE, TO, before_data=lambda: gates.append(len(graph.sent)), delivery_key="item-1")
    assert received(graph) == [("a.bin", data(5_000_000), False, None)] and gates == [0]
    # stats count requests served: the 504 came from the gateway, the one send served is the retry's
    assert (graph.stats["create"], graph.stats["uploadsession"], graph.stats["patch"], graph.stats["send"]) \
        == (1, 1, 1, 1)
    assert graph.messages(ALICE, "drafts") == [] and len(graph.messages(ALICE, "sentitems")) == 1


def test_an_incomplete_draft_left_behind_is_replaced(graph: GraphServer, settings: Settings) -> None:
    """An upload fails and so does deleting the draft: it stays, tagged but never marked
    complete. The next attempt deletes it and sends the message through a new draft, once."""
    raw = mail(("a.bin", data(5_000_000)))
    with open_outgoing(settings()) as s:
        graph.fail("upload", 500, "InternalServerError", "Something went wrong.")
        graph.fail("delete", 500, "InternalServerError", "Something went wrong.")
        with pytest.raises(TemporaryFailure, match="500 InternalServerError"):
            s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        [left] = graph.messages(ALICE, "drafts")
        assert left.attachments == [] and graph.sent == []
        s.send(raw, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
    assert received(graph) == [("a.bin", data(5_000_000), False, None)]
    assert graph.stats["create"] == 2 and graph.messages(ALICE, "drafts") == []


def test_a_lost_answer_to_the_draft_never_picks_an_earlier_one(graph: GraphServer, settings: Settings) -> None:
    """An earlier attempt's draft got one of two files, and its DELETE failed twice: the
    next attempt's lost answer to saving its draft finds two tagged drafts, and goes on
    with its own, so carol gets each file once."""
    files = [("a.bin", data(5_000_000)), ("b.txt", data(1000, seed=2))]
    with open_outgoing(settings()) as s:
        graph.fail("attach", 500, "InternalServerError", "Something went wrong.")
        graph.fail("delete", 500, "InternalServerError", "Something went wrong.", count=2)
        with pytest.raises(TemporaryFailure, match="500 InternalServerError"):
            s.send(mail(*files), ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        graph.drop("create")
        s.send(mail(*files), ALICE, TO, before_data=lambda: None, delivery_key="item-1")
    assert received(graph) == [(n, c, False, None) for n, c in files]
    [left] = graph.messages(ALICE, "drafts")  # the one whose DELETE the server kept failing
    assert [a.name for a in left.attachments] == ["a.bin"]


def test_a_shared_mailbox_sends_large_messages_from_its_own_url(graph: GraphServer, settings: Settings) -> None:
    """From address = the shared mailbox: the draft, its lookup, its attachments and its
    send all go to /users/support@..., as sendMail does; nothing touches alice's mailbox."""
    transcript: list[str] = []
    raw = mail(("a.bin", data(5_000_000))).replace(f"Alice <{ALICE}>".encode(), f"Support <{SUPPORT}>".encode())
    scopes = ("Mail.ReadWrite.Shared", "Mail.Send.Shared")
    with open_outgoing(settings(scopes=scopes, from_address=f"Support <{SUPPORT}>",
                                transcript=transcript.append)) as s:
        s.send(raw, SUPPORT, TO, before_data=lambda: None, delivery_key="item-1")
    paths = [line.split()[2] for line in transcript if line.startswith("> ") and "/v1.0/" in line]
    assert paths and all(p.startswith(f"/v1.0/users/{SUPPORT}/") for p in paths)
    assert [(m.mailbox, m.caller) for m in graph.sent] == [(SUPPORT, ALICE)]
    assert len(graph.messages(SUPPORT, "sentitems")) == 1 and graph.messages(SUPPORT, "drafts") == []
    assert graph.messages(ALICE, "sentitems") == [] and graph.messages(ALICE, "drafts") == []


def test_a_large_message_from_an_alias_goes_through_the_users_mailbox(graph: GraphServer,
                                                                      settings: Settings) -> None:
    """From address = a proxy address of dana, which /users/{...} does not take: the
    lookup of earlier drafts is refused (404), and the draft, its upload and its send go
    through dana's mailbox, From as written."""
    dana = "dana@contoso.com"
    graph.add_user(dana, aliases=["sales@contoso.com"])
    raw = mail(("a.bin", data(5_000_000))).replace(f"Alice <{ALICE}>".encode(), b"Sales <sales@contoso.com>")
    with open_outgoing(settings(user=dana, username=dana, from_address="sales@contoso.com")) as s:
        s.send(raw, "sales@contoso.com", TO, before_data=lambda: None, delivery_key="item-1")
    assert received(graph) == [("a.bin", data(5_000_000), False, None)]
    [sent] = graph.sent
    assert (sent.mailbox, sent.caller) == (dana, dana) and b"From: Sales <sales@contoso.com>" in sent.raw
    assert graph.messages(dana, "drafts") == [] and len(graph.messages(dana, "sentitems")) == 1


def test_a_draft_left_for_the_message_as_it_was_is_made_again(graph: GraphServer, settings: Settings) -> None:
    """A gateway's 504 to send leaves a complete draft; then the admin changes the
    connection's subject prefix and From name, so the host's next attempt at that queued
    message brings other bytes. The old draft is deleted and the message goes once, as the
    connection now says, as a small message would (not as the draft an attempt left)."""
    first = mail(("a.bin", data(5_000_000))).replace(b"Subject: Files", b"Subject: [Old] Files")
    now = first.replace(b"Subject: [Old] Files", b"Subject: [New] Files").replace(b"Alice <", b"Alice Desk <")
    with open_outgoing(settings()) as s:
        graph.fail("send", 504, "GatewayTimeout", "The gateway did not receive a response in time.")
        with pytest.raises(TemporaryFailure, match="504"):
            s.send(first, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
        assert graph.sent == [] and len(graph.messages(ALICE, "drafts")) == 1
        s.send(now, ALICE, TO, before_data=lambda: None, delivery_key="item-1")
    [sent] = graph.sent
    head = sent.raw.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: [New] Files" in head and b"From: Alice Desk <" in head and b"[Old]" not in sent.raw
    assert received(graph) == [("a.bin", data(5_000_000), False, None)]
    assert graph.stats["create"] == 2 and graph.messages(ALICE, "drafts") == []


def test_gate_failing_deletes_the_draft(graph: GraphServer, settings: Settings) -> None:
    """The host's gate (the previous outcome not yet durable) raises: nothing is sent, no draft stays."""
    def gate() -> None:
        raise RuntimeError("store away")

    with open_outgoing(settings()) as s, pytest.raises(RuntimeError):
        s.send(mail(("a.bin", data(5_000_000))), ALICE, TO, before_data=gate)
    assert graph.sent == [] and graph.messages(ALICE, "drafts") == []


def test_over_the_mailbox_size_limit_is_permanent(graph: GraphServer, settings: Settings) -> None:
    """Exchange's maximum message size: refused for good, saying so, no draft left."""
    graph.max_message_bytes = 6_000_000
    with open_outgoing(settings()) as s, pytest.raises(PermanentFailure) as caught:
        s.send(mail(("a.bin", data(7_000_000))), ALICE, TO)
    assert "larger than mailbox alice@contoso.com may send (ErrorMessageSizeExceeded" in str(caught.value)
    assert "send fewer or smaller attachments" in str(caught.value)
    assert graph.sent == [] and graph.messages(ALICE, "drafts") == []


def test_without_mail_readwrite_a_large_message_is_refused(graph: GraphServer, settings: Settings) -> None:
    """Mail.Send alone sends with sendMail but cannot save the draft: 403, naming Mail.ReadWrite."""
    with open_outgoing(settings(scopes=("Mail.Send",))) as s, \
            pytest.raises(PermanentFailure, match="403 ErrorAccessDenied.*Mail.ReadWrite"):
        s.send(mail(("a.bin", data(5_000_000))), ALICE, TO)
    assert graph.sent == []


def test_s_mime_goes_whole_or_not_at_all(graph: GraphServer, settings: Settings) -> None:
    """A signed message over the limit cannot lose its attachments (the signature covers them)."""
    inner = mail(("a.bin", data(5_000_000)))
    head, _, body = inner.partition(b"\r\n\r\n")
    signed = (b'From: alice@contoso.com\r\nTo: carol@example.org\r\nMIME-Version: 1.0\r\nContent-Type: '
              b'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="s"\r\n\r\n'
              b"--s\r\n" + head.split(b"MIME-Version: 1.0\r\n")[1] + b"\r\n\r\n" + body + b"\r\n--s\r\n"
              b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n\r\nMIAG\r\n--s--\r\n")
    assert split_message(signed, 1000) == (signed, [])
    with open_outgoing(settings()) as s, pytest.raises(PermanentFailure, match="S/MIME message must go whole"):
        s.send(signed, ALICE, TO)
    assert graph.sent == []


def test_split_takes_out_only_the_attachment_byte_for_byte() -> None:
    """The rest is the message minus one contiguous run (the part and its delimiter line),
    still well-formed; the part comes out decoded. A multipart's only part stays."""
    big, small = data(5_000_000), data(1000, seed=2)
    raw = mail(("b.bin", small), ("a.bin", big))  # b.bin first: it keeps its place in the MIME
    rest, [part] = split_message(raw, 3 * 1024 * 1024)
    assert (part.name, part.content_type, part.content, part.is_inline) == ("a.bin", "application/octet-stream",
                                                                           big, False)
    head = next(i for i in range(len(rest)) if rest[i] != raw[i])
    assert raw[:head] + raw[len(raw) - len(rest) + head:] == rest
    assert b'filename="a.bin"' not in rest and len(raw) - len(rest) > len(big) * 4 // 3
    parsed = email.message_from_bytes(rest, policy=email.policy.default)
    assert not parsed.defects and [p.get_filename() for p in parsed.iter_attachments()] == ["b.bin"]
    only = (b'From: alice@contoso.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b'--b\r\nContent-Type: application/pdf; name="x.pdf"\r\n\r\n' + b"x" * 5000 + b"\r\n--b--\r\n")
    assert split_message(only, 100) == (only, [])
