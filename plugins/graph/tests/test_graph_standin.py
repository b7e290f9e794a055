"""The Graph stand-in speaks the documented wire format (raw HTTP, no plugin code)."""
from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest
from graph_helpers import ALICE, message

from tests.servers.graph import GraphServer


@pytest.fixture
def http(graph: GraphServer) -> Iterator[httpx.Client]:
    """A client for alice's mailbox with a delegated token, verified TLS."""
    token = graph.issue_token(ALICE)
    with httpx.Client(base_url=graph.base_url, verify=ssl.create_default_context(cafile=graph.ca_file),
                      headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def test_delta_round_shapes(graph: GraphServer, http: httpx.Client) -> None:
    """nextLink pages with $skiptoken, then a deltaLink with $deltatoken; removals as @removed."""
    ids = graph.deliver_many(ALICE, [message(i) for i in range(5)])
    url = "/users/alice@contoso.com/mailFolders/inbox/messages/delta?$select=subject,isRead"
    pages, seen = [], []
    while True:
        r = http.get(url, headers={"Prefer": 'odata.maxpagesize=2, IdType="ImmutableId"'})
        assert r.status_code == 200 and r.headers["Preference-Applied"] == "odata.maxpagesize=2"
        page = r.json()
        assert page["@odata.context"].endswith("$metadata#Collection(message)")
        assert not ("@odata.nextLink" in page and "@odata.deltaLink" in page)
        pages.append(page)
        seen += [v["id"] for v in page["value"]]
        assert all(set(v) == {"@odata.type", "@odata.etag", "id", "subject", "isRead"} for v in page["value"])
        if "@odata.nextLink" not in page:
            break
        assert "$skiptoken=" in page["@odata.nextLink"]
        url = page["@odata.nextLink"]
    assert seen == ids and len(pages) == 3 and "$deltatoken=" in pages[-1]["@odata.deltaLink"]
    graph.purge_message(ALICE, ids[0])
    http.patch(f"/users/alice@contoso.com/messages/{ids[1]}", json={"isRead": True},
               headers={"Prefer": 'IdType="ImmutableId"'})
    changes = http.get(pages[-1]["@odata.deltaLink"], headers={"Prefer": 'IdType="ImmutableId"'}).json()["value"]
    assert {"id": ids[0], "@removed": {"reason": "deleted"}, "@odata.type": "#microsoft.graph.message"} in changes
    assert [c["isRead"] for c in changes if c["id"] == ids[1]] == [True]


def test_stale_delta_token_is_410_with_location(graph: GraphServer, http: httpx.Client) -> None:
    """An expired delta token: 410 Gone, SyncStateNotFound, and where to start again."""
    r = http.get("/users/alice@contoso.com/mailFolders/inbox/messages/delta")
    graph.expire_delta_tokens()
    gone = http.get(r.json()["@odata.deltaLink"])
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "SyncStateNotFound"
    assert gone.headers["Location"].endswith("$deltatoken=")
    assert http.get(gone.headers["Location"]).status_code == 200  # an empty token starts a new round


def test_batch_rules(graph: GraphServer, http: httpx.Client) -> None:
    """At most 20 requests, unique ids; dependsOn fails with 424 after a failure; binary bodies in base64."""
    [mid] = graph.deliver_many(ALICE, [message(1)])
    too_many = [{"id": str(i), "method": "GET", "url": "/me/mailFolders/inbox"} for i in range(21)]
    assert http.post("/$batch", json={"requests": too_many}).status_code == 400
    twice = [{"id": "1", "method": "GET", "url": "/me/mailFolders/inbox"}] * 2
    assert http.post("/$batch", json={"requests": twice}).status_code == 400
    answer = http.post("/$batch", json={"requests": [
        {"id": "a", "method": "GET", "url": f"/me/messages/{mid}/$value"},
        {"id": "b", "method": "GET", "url": "/me/messages/AAMkmissing"},
        {"id": "c", "dependsOn": ["b"], "method": "PATCH", "url": f"/me/messages/{mid}",
         "body": {"isRead": True}, "headers": {"Content-Type": "application/json"}},
        {"id": "d", "method": "PATCH", "url": f"/me/messages/{mid}", "body": {"isRead": True}},
    ]})
    assert answer.status_code == 200
    by_id = {r["id"]: r for r in answer.json()["responses"]}
    assert base64.b64decode(by_id["a"]["body"]) == message(1)
    assert (by_id["b"]["status"], by_id["b"]["body"]["error"]["code"]) == (404, "ErrorItemNotFound")
    assert by_id["c"]["status"] == 424 and by_id["d"]["status"] == 400  # a body needs a Content-Type


def test_auth_and_throttling_answers(graph: GraphServer, http: httpx.Client) -> None:
    """401 with WWW-Authenticate; 429 with Retry-After and Graph's error body."""
    anonymous = httpx.get(graph.base_url + "/me/mailFolders/inbox", verify=ssl.create_default_context(cafile=graph.ca_file))
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer ")
    assert anonymous.json()["error"]["code"] == "InvalidAuthenticationToken"
    expired = graph.issue_token(ALICE, expires_in=-5)
    r = http.get("/me/mailFolders/inbox", headers={"Authorization": f"Bearer {expired}"})
    assert (r.status_code, r.json()["error"]["message"]) == (401, "Lifetime validation failed, the token is expired.")
    graph.throttle(burst=1, retry_after=2)
    r = http.get("/me/mailFolders/inbox")
    assert (r.status_code, r.headers["Retry-After"], r.json()["error"]["code"]) == (429, "2", "TooManyRequests")


def test_mailbox_concurrency_limit(pki: object) -> None:
    """A fifth request at once to one mailbox is throttled: ApplicationThrottled."""
    with GraphServer(pki, service_time=0.3) as graph:  # type: ignore[arg-type]
        graph.add_user(ALICE)
        token = graph.issue_token(ALICE)
        statuses: list[int] = []
        together = threading.Barrier(6)

        def get() -> None:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(verify=ssl.create_default_context(cafile=graph.ca_file), headers=headers) as c:
                c.post(graph.base_url + "/$batch", json={"requests": []})  # connected: no handshake in the race
                together.wait()
                r = c.get(graph.base_url + "/users/alice@contoso.com/mailFolders/inbox")
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["error"]["message"] == "Application is over its MailboxConcurrency limit."

        threads = [threading.Thread(target=get) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(statuses) == [200] * 4 + [429] * 2


def test_send_mail_mime_answers(graph: GraphServer, http: httpx.Client) -> None:
    """202 for base64 MIME; 400 ErrorMimeContentInvalidBase64String for anything else."""
    raw = b"From: alice@contoso.com\r\nTo: carol@example.org\r\nSubject: hi\r\n\r\nhi\r\n"
    ok = http.post("/me/sendMail", content=base64.b64encode(raw), headers={"Content-Type": "text/plain"})
    assert (ok.status_code, ok.content) == (202, b"")
    bad = http.post("/me/sendMail", content=raw, headers={"Content-Type": "text/plain"})
    assert bad.status_code == 400
    assert bad.json()["error"] == {**bad.json()["error"], "code": "ErrorMimeContentInvalidBase64String",
                                   "message": "Invalid base64 string for MIME content."}
    assert [s.raw for s in graph.sent] == [raw]


def test_folders_by_name_and_create(graph: GraphServer, http: httpx.Client) -> None:
    """$filter on displayName; creating an existing name is 409 ErrorFolderExists."""
    created = http.post("/me/mailFolders", json={"displayName": "Tickets"})
    assert created.status_code == 201 and created.json()["totalItemCount"] == 0
    again = http.post("/me/mailFolders", json={"displayName": "Tickets"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "ErrorFolderExists")
    found = http.get("/me/mailFolders", params={"$filter": "displayName eq 'tickets'"}).json()["value"]
    assert [f["id"] for f in found] == [created.json()["id"]]
    child = http.post(f"/me/mailFolders/{created.json()['id']}/childFolders", json={"displayName": "Level 1"})
    assert child.json()["parentFolderId"] == created.json()["id"]


def test_any_request_over_4_mb_is_413(graph: GraphServer, http: httpx.Client) -> None:
    """A 5 MB message in one sendMail is over Graph's 4 MB request limit: 413 with Graph's
    body, nothing sent; the limit is the request's, so creating a draft is refused alike."""
    raw = message(1, size=5 * 1024 * 1024, to="carol@example.org")
    for path in ("/users/alice@contoso.com/sendMail", "/users/alice@contoso.com/messages"):
        r = http.post(path, content=base64.b64encode(raw), headers={"Content-Type": "text/plain"})
        assert r.status_code == 413 and r.reason_phrase == "Request Entity Too Large"
        error = r.json()["error"]
        assert (error["code"], error["message"]) == ("BadRequest", "The maximum request length supported is 4MB.")
    assert graph.sent == [] and graph.messages(ALICE, "sentitems") == []


def test_draft_upload_session_and_send(graph: GraphServer, http: httpx.Client) -> None:
    """A MIME draft, a large attachment in ranges through its pre-authenticated upload URL,
    a small one POSTed, then send: 201s, nextExpectedRanges, Location, 202, Sent Items."""
    me = "/users/alice@contoso.com"
    raw = message(1, to="carol@example.org").replace(b"From: Sender 1 <sender1@example.org>",
                                                    b"From: alice@contoso.com\r\nBcc: erin@example.org")
    draft = http.post(f"{me}/messages", content=base64.b64encode(raw), headers={"Content-Type": "text/plain"})
    assert draft.status_code == 201 and draft.json()["isDraft"] is True
    mid = draft.json()["id"]
    assert [m.raw for m in graph.messages(ALICE, "drafts")] == [raw]
    small = http.post(f"{me}/messages/{mid}/attachments/createUploadSession",
                      json={"AttachmentItem": {"attachmentType": "file", "name": "a.txt", "size": 10}})
    assert (small.status_code, small.json()["error"]["code"]) == (400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
    big = bytes(range(256)) * (13 * 1024)  # 3.25 MiB
    created = http.post(f"{me}/messages/{mid}/attachments/createUploadSession", json={"AttachmentItem": {
        "attachmentType": "file", "name": "plan.pdf", "size": len(big), "contentType": "application/pdf",
        "isInline": True, "contentId": "plan"}})
    assert created.status_code == 201 and created.json()["nextExpectedRanges"] == ["0-"]
    url = created.json()["uploadUrl"]
    assert "/AttachmentSessions('" in url and "authtoken=" in url
    with httpx.Client(verify=ssl.create_default_context(cafile=graph.ca_file)) as bare:
        def put(start: int, end: int, **headers: str) -> httpx.Response:
            return bare.put(url, content=big[start:end + 1], headers={
                "Content-Type": "application/octet-stream", "Content-Range": f"bytes {start}-{end}/{len(big)}",
                **headers})
        assert put(0, 99, Authorization="Bearer x").status_code == 400  # the URL carries its own token
        first = put(0, 2 * 1024 * 1024 - 1)
        assert first.status_code == 200 and first.json()["nextExpectedRanges"] == [str(2 * 1024 * 1024)]
        assert put(0, 99).status_code == 416  # overlaps what it has
        last = put(2 * 1024 * 1024, len(big) - 1)
        assert last.status_code == 201 and "/Attachments('" in last.headers["Location"]
    posted = http.post(f"{me}/messages/{mid}/attachments", json={
        "@odata.type": "#microsoft.graph.fileAttachment", "name": "note.txt", "contentType": "text/plain",
        "contentBytes": base64.b64encode(b"hello\r\n").decode()})
    assert posted.status_code == 201 and posted.json()["size"] == 7
    sent = http.post(f"{me}/messages/{mid}/send")
    assert sent.status_code == 202 and not sent.content
    [mail] = graph.sent
    assert set(mail.recipients) == {"carol@example.org", "erin@example.org"}
    assert [(a.name, a.content_type, a.content, a.is_inline, a.content_id) for a in mail.attachments] == [
        ("plan.pdf", "application/pdf", big, True, "plan"), ("note.txt", "text/plain", b"hello\r\n", False, None)]
    assert graph.messages(ALICE, "drafts") == []
    [copy] = graph.messages(ALICE, "sentitems")
    assert b"Bcc" not in copy.raw and b"plan.pdf" in copy.raw


def test_messages_filtered_on_a_custom_header_property(graph: GraphServer, http: httpx.Client) -> None:
    """The documented filter on a string extended property finds messages by a custom
    header (PS_INTERNET_HEADERS), in every folder but the hidden ones: the name in the id
    case-sensitive, the value not; any other filter is 400 ErrorInvalidUrlQueryFilter."""
    tagged = b"X-Tag: Blue\r\n" + message(1)
    kept, drafted = graph.deliver(ALICE, tagged), graph.deliver(ALICE, tagged, "drafts")
    graph.deliver(ALICE, message(2))
    gone = graph.deliver(ALICE, tagged)
    http.delete(f"/users/alice@contoso.com/messages/{gone}", headers={"Prefer": 'IdType="ImmutableId"'})

    def found(name: str, value: str, folder: str = "") -> list[str]:
        where = (f"singleValueExtendedProperties/Any(ep: ep/id eq 'String {{00020386-0000-0000-C000-000000000046}} "
                 f"Name {name}' and ep/value eq '{value}')")
        r = http.get(f"/users/alice@contoso.com{folder}/messages", params={"$filter": where, "$select": "id"},
                     headers={"Prefer": 'IdType="ImmutableId"'})
        assert r.status_code == 200
        return [m["id"] for m in r.json()["value"]]

    assert found("X-Tag", "blue") == [kept, drafted]
    assert found("X-Tag", "blue", "/mailFolders/drafts") == [drafted]
    assert found("x-tag", "blue") == [] and found("X-Tag", "red") == []
    bad = http.get("/users/alice@contoso.com/messages", params={"$filter": "subject eq 'message 1'"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "ErrorInvalidUrlQueryFilter"


def test_an_extended_property_set_with_patch(graph: GraphServer, http: httpx.Client) -> None:
    """PATCH with singleValueExtendedProperties sets one; $filter finds it and $expand
    shows it, on the messages that have it only."""
    prop = "String {00020329-0000-0000-C000-000000000046} Name color"
    ids = graph.deliver_many(ALICE, [message(1), message(2)])
    prefer = {"Prefer": 'IdType="ImmutableId"'}
    r = http.patch(f"/users/alice@contoso.com/messages/{ids[0]}", headers=prefer,
                   json={"singleValueExtendedProperties": [{"id": prop, "value": "Blue"}]})
    assert r.status_code == 200
    where = f"singleValueExtendedProperties/Any(ep: ep/id eq '{prop}' and ep/value eq 'blue')"
    expand = f"singleValueExtendedProperties($filter=id eq '{prop}')"
    listed = http.get("/users/alice@contoso.com/mailFolders/inbox/messages", headers=prefer,
                      params={"$select": "id", "$expand": expand}).json()["value"]
    assert [m.get("singleValueExtendedProperties") for m in listed] == [[{"id": prop, "value": "Blue"}], None]
    found = http.get("/users/alice@contoso.com/messages", headers=prefer, params={"$filter": where}).json()["value"]
    assert [m["id"] for m in found] == [ids[0]]
