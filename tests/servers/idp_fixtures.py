"""pytest plugin: the local identity provider and mail servers that check its tokens.

Enable with ``pytest_plugins = ["tests.servers.idp_fixtures"]`` in the root conftest.py.

Fixtures
--------
``idp``               a started :class:`~.idp.IdentityProvider` (HTTPS on 127.0.0.1, the
                      session PKI), stopped after the test
``oauth_dovecot``     ``make(idp, mechanisms=("xoauth2", "oauthbearer"), shared=())`` ->
                      a started Dovecot whose ``oauth2`` passdb validates tokens by RFC
                      7662 introspection at ``idp``; ``shared`` lists shared mailboxes a
                      delegate's token may open (one passdb each, see :mod:`.idp`)
``oauth_smtp``        ``make(idp, mode="starttls")`` -> an :class:`OAuthSmtpServer` that
                      takes AUTH XOAUTH2 and OAUTHBEARER, checked by introspection too
``browser``           ``open(url)``: what a user's browser does with an authorization URL
                      (follow the provider's redirect to the loopback listener)
"""
from __future__ import annotations

import asyncio
import base64
import html
import json
import re
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult

from .certs import Pki
from .dovecot import Dovecot
from .fixtures import require_dovecot
from .idp import IdentityProvider
from .smtpd import SmtpServer

__all__ = ["OAuthSmtpServer", "browser", "dovecot_oauth2_config", "idp", "oauth_dovecot", "oauth_smtp"]


@pytest.fixture
def idp(pki: Pki) -> Iterator[IdentityProvider]:
    """A started identity provider (tenant ``mailhost-test``), stopped after the test."""
    with IdentityProvider(pki) as provider:
        yield provider


# ---------------------------------------------------------------------------------------
# Dovecot with an oauth2 passdb
# ---------------------------------------------------------------------------------------


def dovecot_oauth2_config(dovecot: Dovecot, idp: IdentityProvider,
                          mechanisms: Iterable[str] = ("xoauth2", "oauthbearer"), shared: Iterable[str] = ()) -> str:
    """Write the passdb files into ``dovecot``'s folder; returns the text for ``extra_config``.

    Dovecot 2.3's ``oauth2`` passdb (PasswordDatabase/oauth2 in its wiki): introspection
    by POST (``introspection_mode = post``) with the mail server's own credentials in
    the URL, TLS verified against the provider's CA, the SASL user compared with
    ``username``, and ``active`` required to be ``true``.
    """
    folder = dovecot.workdir
    ca = folder / "idp-ca.pem"
    shutil.copy(idp.ca_file, ca)
    ca.chmod(0o644)
    url = idp.add_resource_server(f"dovecot-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex)

    def conf(name: str, introspection_url: str) -> str:
        path = folder / name
        path.write_text(
            f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
            f"tls_ca_cert_file = {ca}\nusername_attribute = username\n"
            "active_attribute = active\nactive_value = true\ntimeout_msecs = 10000\n"
        )
        path.chmod(0o644)
        return str(path)

    mechs = " ".join(mechanisms)
    text = [f"auth_mechanisms = plain login {mechs}"]
    text.append(f"passdb {{\n  driver = oauth2\n  mechanisms = {mechs}\n  args = {conf('oauth2.conf.ext', url)}\n}}")
    for i, mailbox in enumerate(shared):
        shared_url = url + "?" + urllib.parse.urlencode({"as": mailbox.lower()})
        text.append(f"passdb {{\n  driver = oauth2\n  mechanisms = {mechs}\n"
                    f"  args = {conf(f'oauth2-shared-{i}.conf.ext', shared_url)}\n}}")
    return "\n".join(text) + "\n"


@pytest.fixture
def oauth_dovecot(pki: Pki) -> Iterator[Callable[..., Dovecot]]:
    """``make(idp, mechanisms=..., shared=(), users=...)``: a started Dovecot whose XOAUTH2
    and OAUTHBEARER logins are checked at ``idp``; users default to none (add them with
    ``add_user``: the token decides, their password is never used)."""
    require_dovecot()
    created: list[Dovecot] = []

    def make(idp: IdentityProvider, mechanisms: Iterable[str] = ("xoauth2", "oauthbearer"),
             shared: Iterable[str] = (), users: dict[str, str] | None = None) -> Dovecot:
        server = Dovecot(pki, users=users or {}, master_users={})
        created.append(server)
        server.extra_config = dovecot_oauth2_config(server, idp, mechanisms, shared)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in created:
            server.cleanup()


# ---------------------------------------------------------------------------------------
# An SMTP server that takes XOAUTH2 and OAUTHBEARER
# ---------------------------------------------------------------------------------------


class OAuthSmtpServer(SmtpServer):
    """The kit's SMTP server, signing in with XOAUTH2 / OAUTHBEARER only (``mechanisms``:
    those EHLO offers; ``used``: the mechanism of each AUTH).

    Each token is checked by RFC 7662 introspection at the identity provider, as a
    resource server (HTTP Basic). A failed XOAUTH2 exchange ends the way Gmail and
    Exchange end it: a ``334`` challenge carrying the JSON error, the client's empty
    line, then ``535``. ``auth_attempts`` records ``(user, ok)``; an accepted message's
    ``auth_login`` is the SASL user.
    """

    def __init__(self, mode: str, idp: IdentityProvider, *, mechanisms: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER"),
                 **kwargs: Any) -> None:
        super().__init__(mode, **kwargs)
        self.idp = idp
        self.mechanisms = mechanisms  # what EHLO offers after AUTH
        self.used: list[str] = []  # the mechanism of each AUTH, in order
        self._introspection_url = idp.add_resource_server(f"smtp-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex)

    def start(self) -> OAuthSmtpServer:
        super().start()
        handler = self._controller.handler  # type: ignore[union-attr]
        # aiosmtpd looks up auth_<MECHANISM> and handle_<COMMAND> on the handler for each
        # new connection, so these take effect for every client session.
        handler.auth_XOAUTH2 = self._xoauth2
        handler.auth_OAUTHBEARER = self._oauthbearer
        handler.handle_EHLO = self._ehlo
        return self

    async def _ehlo(self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [f"250-AUTH {' '.join(self.mechanisms)}" if r.startswith("250-AUTH ") else r for r in responses]

    def introspect(self, token: str) -> dict[str, Any]:
        """Ask the provider about ``token`` (RFC 7662 §2.1)."""
        parts = urllib.parse.urlsplit(self._introspection_url)
        url = parts._replace(netloc=f"{parts.hostname}:{parts.port}").geturl()
        request = urllib.request.Request(url, data=urllib.parse.urlencode({"token": token}).encode(), method="POST")
        credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        context = ssl.create_default_context(cafile=self.idp.ca_file)
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.loads(response.read())

    async def _check(self, server: SMTP, user: str, token: str) -> AuthResult:
        answer = await asyncio.get_running_loop().run_in_executor(None, self.introspect, token)
        ok = bool(answer.get("active")) and str(answer.get("username", "")).lower() == user.lower()
        with self._lock:
            self._auth_attempts.append((user, ok))
        if ok:
            return AuthResult(success=True, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.example/"})
        await server.challenge_auth(error)  # the client answers with an empty line (XOAUTH2) or ^A
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")

    async def _initial(self, server: SMTP, args: list[str]) -> str | None:
        if len(args) == 2:
            try:
                return base64.b64decode(args[1], validate=True).decode("utf-8")
            except ValueError:
                return None
        blob = await server.challenge_auth("")
        return blob.decode("utf-8") if isinstance(blob, bytes) else None

    async def _xoauth2(self, server: SMTP, args: list[str]) -> AuthResult:
        self.used.append("XOAUTH2")
        text = await self._initial(server, args)
        fields = dict(kv.split("=", 1) for kv in (text or "").split("\x01") if "=" in kv)
        user, auth = fields.get("user", ""), fields.get("auth", "")
        if not user or not auth.startswith("Bearer "):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Malformed XOAUTH2 response")
        return await self._check(server, user, auth[7:])

    async def _oauthbearer(self, server: SMTP, args: list[str]) -> AuthResult:
        self.used.append("OAUTHBEARER")
        text = await self._initial(server, args)
        gs2, _, rest = (text or "").partition("\x01")
        user = next((p[2:] for p in gs2.split(",") if p.startswith("a=")), "")
        user = user.replace("=2C", ",").replace("=3D", "=")
        fields = dict(kv.split("=", 1) for kv in rest.split("\x01") if "=" in kv)
        auth = fields.get("auth", "")
        if not user or not auth.startswith("Bearer "):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Malformed OAUTHBEARER response")
        return await self._check(server, user, auth[7:])


@pytest.fixture
def oauth_smtp(pki: Pki) -> Iterator[Callable[..., OAuthSmtpServer]]:
    """``make(idp, mode="starttls", **kwargs)``: a started :class:`OAuthSmtpServer`."""
    created: list[OAuthSmtpServer] = []

    def make(idp: IdentityProvider, mode: str = "starttls", **kwargs: Any) -> OAuthSmtpServer:
        server = OAuthSmtpServer(mode, idp, pki=pki, **kwargs)
        created.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in created:
            server.cleanup()


# ---------------------------------------------------------------------------------------
# The user's browser
# ---------------------------------------------------------------------------------------


@pytest.fixture
def browser(pki: Pki) -> Callable[[str], bool]:
    """``open(url)``: sign in at the provider (which answers at once) and deliver its
    answer to mailhost's loopback listener, as a browser would: follow the redirect, or
    submit the form of ``response_mode=form_post``."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    def open_url(url: str) -> bool:
        context = ssl.create_default_context(cafile=pki.ca_file)
        opener = urllib.request.build_opener(NoRedirect(), urllib.request.HTTPSHandler(context=context))
        try:
            with opener.open(url, timeout=10) as response:  # response_mode=form_post: a form to submit
                page = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:  # the 302 to the redirect URI, not followed
            location = exc.headers.get("Location")
            if exc.code != 302 or not location:
                raise
            with urllib.request.urlopen(location, timeout=10) as response:  # http://127.0.0.1:PORT/?code=...
                response.read()
            return True
        action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))
        fields = {html.unescape(k): html.unescape(v)
                  for k, v in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)"', page)}
        with urllib.request.urlopen(action, data=urllib.parse.urlencode(fields).encode(), timeout=10) as response:
            response.read()
        return True

    return open_url
