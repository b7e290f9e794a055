"""The test identity provider itself: discovery, grants, errors, introspection, revocation."""
from __future__ import annotations

import base64
import hashlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.servers.idp import IdentityProvider


def _call(idp: IdentityProvider, url: str, form: dict[str, str] | None = None,
          basic: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode() if form is not None else None)
    if basic:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(basic).encode()).decode())
    context = ssl.create_default_context(cafile=idp.ca_file)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _token(idp: IdentityProvider, **form: str) -> tuple[int, dict[str, Any]]:
    return _call(idp, idp.endpoint("token"), form)


def test_discovery_has_the_microsoft_v2_shape(idp: IdentityProvider) -> None:
    """Discovery lives below /{tenant}/v2.0 and names every endpoint, as msal expects."""
    status, config = _call(idp, f"{idp.issuer()}/.well-known/openid-configuration")
    assert status == 200 and config["issuer"] == idp.issuer()
    assert config["token_endpoint"] == idp.endpoint("token")
    assert config["device_authorization_endpoint"] == idp.endpoint("devicecode")
    assert config["introspection_endpoint"] == idp.endpoint("introspect")
    assert _call(idp, config["jwks_uri"])[1]["keys"][0]["alg"] == "RS256"


def test_client_secret_errors_look_like_microsoft(idp: IdentityProvider) -> None:
    """A wrong secret is AADSTS7000215 and an expired one AADSTS7000222, both 401 invalid_client."""
    idp.add_client("app", "right")
    form = {"grant_type": "client_credentials", "client_id": "app", "scope": "x/.default"}
    status, body = _token(idp, **form, client_secret="wrong")
    assert (status, body["error"], body["error_codes"]) == (401, "invalid_client", [7000215])
    idp.expire_secret("app")
    status, body = _token(idp, **form, client_secret="right")
    assert (status, body["error_codes"]) == (401, [7000222])
    assert body["error_description"].startswith(
        "AADSTS7000222: The provided client secret keys for app 'app' are expired")


def test_refresh_tokens_rotate_and_a_replay_revokes_the_grant(idp: IdentityProvider) -> None:
    """Each refresh gives a new refresh token; reusing an old one fails and kills the grant."""
    idp.add_client("app", public=True)
    idp.add_user("alice@example.org")
    status, flow = _call(idp, idp.endpoint("devicecode"), {"client_id": "app", "scope": "offline_access mail"})
    idp.approve_device(flow["user_code"])
    _, first = _token(idp, grant_type="urn:ietf:params:oauth:grant-type:device_code", client_id="app",
                      device_code=flow["device_code"])
    _, second = _token(idp, grant_type="refresh_token", client_id="app", refresh_token=first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"] and idp.is_active(second["access_token"])
    status, replay = _token(idp, grant_type="refresh_token", client_id="app", refresh_token=first["refresh_token"])
    assert (status, replay["error"]) == (400, "invalid_grant")
    assert not idp.is_active(second["access_token"])  # the whole grant is revoked


def test_authorization_code_needs_the_pkce_verifier(idp: IdentityProvider) -> None:
    """The code is redeemed only with the verifier of its challenge (RFC 7636)."""
    idp.add_client("app", "secret")
    idp.add_user("alice@example.org")
    verifier = "v" * 43
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    location = idp._authorize(idp.tenant, {"client_id": "app", "redirect_uri": "http://127.0.0.1:1/",
                                           "scope": "openid offline_access mail", "code_challenge": challenge,
                                           "code_challenge_method": "S256", "state": "s"})
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["code"]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "http://127.0.0.1:1/",
            "client_id": "app", "client_secret": "secret"}
    assert _token(idp, **form, code_verifier="w" * 43)[1]["error"] == "invalid_grant"
    location = idp._authorize(idp.tenant, {"client_id": "app", "redirect_uri": "http://127.0.0.1:1/",
                                           "scope": "openid offline_access mail", "code_challenge": challenge,
                                           "code_challenge_method": "S256", "state": "s"})
    form["code"] = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["code"]
    status, tokens = _token(idp, **form, code_verifier=verifier)
    assert status == 200 and {"access_token", "refresh_token", "id_token"} <= set(tokens)


def test_introspection_answers_resource_servers_only(idp: IdentityProvider) -> None:
    """RFC 7662: the caller authenticates; a token is active until it expires or is revoked."""
    idp.add_client("app", "secret")
    _, tokens = _token(idp, grant_type="client_credentials", client_id="app", client_secret="secret",
                       scope="x/.default")
    url = idp.add_resource_server("imap", "rs-secret")
    bare = idp.endpoint("introspect")
    assert _call(idp, bare, {"token": tokens["access_token"]})[0] == 401
    status, answer = _call(idp, bare, {"token": tokens["access_token"]}, basic=("imap", "rs-secret"))
    assert status == 200 and answer["active"] is True and answer["client_id"] == "app"
    assert url.startswith("https://imap:rs-secret@")
    idp.advance(idp.access_token_lifetime + 1)
    assert _call(idp, bare, {"token": tokens["access_token"]}, basic=("imap", "rs-secret"))[1] == {"active": False}


def test_revocation_ends_a_grant(idp: IdentityProvider) -> None:
    """RFC 7009: revoking a refresh token ends its access tokens and refreshes."""
    idp.add_client("app", public=True)
    idp.add_user("alice@example.org")
    _, flow = _call(idp, idp.endpoint("devicecode"), {"client_id": "app", "scope": "offline_access mail"})
    idp.approve_device(flow["user_code"], "alice@example.org")
    _, tokens = _token(idp, grant_type="urn:ietf:params:oauth:grant-type:device_code", client_id="app",
                       device_code=flow["device_code"])
    assert _call(idp, idp.endpoint("revoke"), {"token": tokens["refresh_token"], "client_id": "app"})[0] == 200
    assert not idp.is_active(tokens["access_token"])
    status, body = _token(idp, grant_type="refresh_token", client_id="app", refresh_token=tokens["refresh_token"])
    assert (status, body["error_codes"]) == (400, [50173])


@pytest.mark.parametrize("mailbox, active", [("shared@example.org", True), ("other@example.org", False)])
def test_introspection_as_a_shared_mailbox(idp: IdentityProvider, mailbox: str, active: bool) -> None:
    """?as=MAILBOX is active only when the token's user may open MAILBOX."""
    idp.add_client("app", public=True)
    idp.add_user("alice@example.org", {"shared@example.org"})
    _, flow = _call(idp, idp.endpoint("devicecode"), {"client_id": "app", "scope": "mail"})
    idp.approve_device(flow["user_code"], "alice@example.org")
    _, tokens = _token(idp, grant_type="urn:ietf:params:oauth:grant-type:device_code", client_id="app",
                       device_code=flow["device_code"])
    answer = idp.introspect(tokens["access_token"], as_mailbox=mailbox)
    assert answer["active"] is active and (not active or answer["username"] == mailbox)
