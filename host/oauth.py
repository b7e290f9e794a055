"""OAuth2 credentials and their tokens: the Python API behind ``mailhost oauth``.

A *credential* is a client registration at a provider (``microsoft``, ``google``,
``oidc`` or one a plugin adds): client ID, client secret (encrypted), tenant, authority
or endpoints, scopes, flow, CA file. *Authorizing* it for a username runs the
provider's flow once with an admin and stores the tokens, encrypted, per username (an
app-only credential, ``--flow client-credentials``, has one token set for all
mailboxes). Connections then ask :meth:`OAuth2.access_token_for` for a token source:

- the stored access token is used until shortly before it expires, so a poll every
  minute costs no request to the provider;
- a renewal runs under a lease (taken by compare-and-set on the stored ciphertext, on
  SQLite and PostgreSQL alike), so two workers never spend the same refresh token, and
  the others keep using the still valid token meanwhile;
- a rotated refresh token is committed the moment it arrives;
- the expiry, the last renewal and the last error stay visible (``oauth show``);
- provider errors become one sentence naming the credential, the user and the fix
  (Microsoft's AADSTS7000222, an expired client secret, included).

The tokens of all usernames of a credential live in its ``tokens_enc`` column, one
Fernet ciphertext of a JSON object keyed by username; the credential's
``token_expires_at``, ``last_refresh_at`` and ``last_error`` summarise them for listings.
"""
from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from sqlalchemy import and_, delete, select, update

from .errors import (
    AuthenticationFailed,
    MailError,
    MailhostError,
    NotFound,
    PluginError,
    TemporaryFailure,
    TLSFailure,
    UsageError,
    ValidationError,
)
from .oauth_providers import (
    FLOWS,
    ClientConfig,
    Interaction,
    OAuthError,
    OAuthProvider,
    TokenSet,
)
from .plugins import broke_contract
from .secrets import redact, remember_secret
from .store import IncomingConnection, OAuthCredential, OutgoingConnection, utcnow

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

    from .app import Mailhost

__all__ = ["APP_ONLY", "CredentialSpec", "OAuth2", "TokenSource", "credential_dict"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The username under which app-only (client credentials) tokens are kept.
APP_ONLY: Final = ""
#: Renew this long before expiry (less for tokens that live shorter: half their life).
RENEW_BEFORE: Final = dt.timedelta(minutes=5)
#: How long a renewal may hold its lease; a holder that dies frees it after this.
LEASE: Final = dt.timedelta(seconds=90)
#: Never use a token this close to its expiry: the server may see it expired.
SKEW: Final = dt.timedelta(seconds=30)
_SECRET_ERRORS: Final = frozenset({"invalid_client", "client_secret_expired"})
#: The settings a credential's tokens are issued for, as `oauth edit` names them: tokens
#: issued under other values are another app's, or for something else.
_GRANT: Final = {"provider": "provider", "client_id": "client ID", "tenant": "tenant", "authority": "authority",
                 "token_endpoint": "token endpoint", "flow": "flow", "scopes": "scopes"}


@dataclass
class CredentialSpec:
    """Attributes of a credential as an admin gives them; ``None``: not given (the
    default on add, unchanged on edit); an empty string clears an optional one."""

    name: str | None = None
    provider: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    tenant: str | None = None
    authority: str | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    scopes: Sequence[str] | None = None
    flow: str | None = None
    ca_file: str | None = None


class OAuth2:
    """OAuth2 credentials, their authorizations and their tokens."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- credentials --------------------------------------------------------------------

    def providers(self) -> Mapping[str, OAuthProvider]:
        """The providers the plugins registered, by name."""
        return self.host.plugins.oauth_providers

    def provider(self, name: str) -> OAuthProvider:
        """The provider ``name``; a ValidationError lists the choices."""
        try:
            return self.providers()[name]
        except KeyError:
            raise ValidationError(
                f"no OAuth2 provider named {name!r} is installed and enabled; "
                f"choose one of: {', '.join(sorted(self.providers())) or 'none'}",
                field="provider",
            ) from None

    def list(self) -> list[OAuthCredential]:
        """Every credential, by name."""
        with self.host.session() as s:
            return list(s.scalars(select(OAuthCredential).order_by(OAuthCredential.name)))

    def get(self, name: str) -> OAuthCredential:
        """The credential ``name``, or NotFound naming it."""
        with self.host.session() as s:
            cred = s.scalar(select(OAuthCredential).where(OAuthCredential.name == name))
        if cred is None:
            raise NotFound(f"no OAuth2 credential named {name!r}: see `mailhost oauth list`")
        return cred

    def add(self, spec: CredentialSpec) -> OAuthCredential:
        """Validate and store a new credential (not yet authorized)."""
        name = (spec.name or "").strip()
        if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
            raise ValidationError(f"the credential name {spec.name!r} is not valid: use 1-200 printable characters",
                                  field="name")
        if not spec.provider:
            raise ValidationError(
                f"OAuth2 credential {name!r} needs a provider: give --provider, one of "
                f"{', '.join(sorted(self.providers())) or 'none installed'}", field="provider")
        with self.host.session() as s:
            if s.scalar(select(OAuthCredential.id).where(OAuthCredential.name == name)) is not None:
                raise ValidationError(
                    f"an OAuth2 credential named {name!r} already exists: choose another name or use "
                    "`mailhost oauth edit`", field="name")
        config = self._validate(dataclasses.replace(spec, name=name))
        with self.host.session() as s:
            cred = OAuthCredential(
                name=name, provider=config.provider, client_id=config.client_id,
                client_secret_enc=self.host.vault.encrypt(config.client_secret),
                tenant=config.tenant, authority=config.authority,
                authorization_endpoint=config.authorization_endpoint, token_endpoint=config.token_endpoint,
                scopes=list(config.scopes), flow=config.flow, ca_file=config.ca_file,
            )
            s.add(cred)
            s.flush()
            return cred

    def edit(self, name: str, spec: CredentialSpec) -> tuple[OAuthCredential, list[dict[str, Any]]]:
        """Change a credential; returns it and the authorizations whose tokens the change
        dropped (their JSON form, as they were; none when it kept the tokens).

        A new client secret keeps the tokens (and clears the errors the old secret
        caused): that is how an expired secret is replaced. Another provider, client ID,
        tenant, authority, token endpoint or flow means another app, and other scopes
        tokens for something else (Microsoft Graph instead of Exchange, say): either way
        the stored tokens go, and the next ones are issued for what the credential says now.

        The write is a compare-and-set on ``updated_at``: when another process wrote the
        credential since it was read (tokens stored by `oauth authorize` or a renewal,
        another edit), the edit is worked out again on what is stored now, so what it
        reports dropped is what its write dropped.
        """
        if spec.name is not None and not spec.name.strip():
            raise ValidationError(f"OAuth2 credential {name!r}: the new name is empty: give a name, "
                                  "or leave --name out", field="name")
        current = self.get(name)
        for _ in range(200):
            config, drop, new_secret = self._edited(name, current, spec)
            values: dict[str, Any] = {
                "name": config.name, "provider": config.provider, "client_id": config.client_id,
                "tenant": config.tenant, "authority": config.authority, "flow": config.flow,
                "authorization_endpoint": config.authorization_endpoint, "token_endpoint": config.token_endpoint,
                "scopes": list(config.scopes), "ca_file": config.ca_file,
            }
            if new_secret:
                values["client_secret_enc"] = self.host.vault.encrypt(config.client_secret)
            if drop:  # the tokens stored as of the read (the write checks it is still so) are for the old settings
                values.update(dict.fromkeys(("tokens_enc", "token_expires_at", "last_refresh_at", "last_error")))
            with self.host.session() as s:
                written = cast("CursorResult[Any]", s.execute(
                    update(OAuthCredential)
                    .where(OAuthCredential.id == current.id, OAuthCredential.updated_at == current.updated_at)
                    .values(**values).execution_options(synchronize_session=False))).rowcount
                # Written by someone else since it was read: again, on what is stored now.
                now = None if written else s.get(OAuthCredential, current.id)
            if written:
                break
            if now is None:
                raise NotFound(f"OAuth2 credential {name!r} was removed while it was being edited: see "
                               "`mailhost oauth list`")
            current = now
        else:
            raise MailhostError(f"OAuth2 credential {name!r} keeps changing under this edit: try again")
        if new_secret and not drop:
            def forget_secret_errors(state: dict[str, Any]) -> None:
                for entry in state.values():
                    if entry.get("error_kind") in _SECRET_ERRORS:
                        entry["last_error"] = entry["error_kind"] = None
            self._update(current.id, forget_secret_errors)
        dropped = credential_dict(current, self._state(current))["authorizations"] if drop else []
        return self.get(config.name), dropped

    def _edited(self, name: str, current: OAuthCredential, spec: CredentialSpec) -> tuple[ClientConfig, bool, bool]:
        """``current`` with ``spec`` applied and validated; whether that drops the
        tokens, and whether it brings a new client secret."""
        secret = self.host.vault.decrypt(current.client_secret_enc)
        if spec.provider and spec.provider != current.provider:
            users = self.used_by(current.id)
            if users:  # their host overrides and sign-in belong to the old provider
                raise ValidationError(
                    f"OAuth2 credential {name!r} is used by {', '.join(users)}: it cannot change provider "
                    "while in use; add a new credential for the other provider instead", field="provider")
            # Another provider: the old one's tenant, endpoints, scopes and flow mean nothing there.
            current_of = dict.fromkeys(("tenant", "authority", "authorization_endpoint", "token_endpoint", "flow"))
            scopes: Any = spec.scopes
        else:
            current_of = {k: getattr(current, k) for k in
                          ("tenant", "authority", "authorization_endpoint", "token_endpoint", "flow")}
            scopes = current.scopes if spec.scopes is None else spec.scopes
        merged = CredentialSpec(
            name=spec.name or current.name,
            provider=spec.provider or current.provider,
            client_id=spec.client_id or current.client_id,
            client_secret=secret if spec.client_secret is None else spec.client_secret,
            tenant=_given(spec.tenant, current_of["tenant"]),
            authority=_given(spec.authority, current_of["authority"]),
            authorization_endpoint=_given(spec.authorization_endpoint, current_of["authorization_endpoint"]),
            token_endpoint=_given(spec.token_endpoint, current_of["token_endpoint"]),
            scopes=scopes,
            flow=spec.flow or current_of["flow"],
            ca_file=_given(spec.ca_file, current.ca_file),
        )
        if merged.name != current.name:
            with self.host.session() as s:
                if s.scalar(select(OAuthCredential.id).where(OAuthCredential.name == merged.name)) is not None:
                    raise ValidationError(f"an OAuth2 credential named {merged.name!r} already exists: "
                                          "choose another name", field="name")
        config = self._validate(merged)
        # The stored tokens are not for what the credential says now.
        return config, bool(_changed(current, config)), config.client_secret != secret

    def remove(self, name: str) -> None:
        """Delete a credential and its tokens; refused while connections use it."""
        cred = self.get(name)
        users = self.used_by(cred.id)
        if users:
            raise ValidationError(
                f"OAuth2 credential {name!r} is used by {', '.join(users)}: change or remove "
                f"{'that connection' if len(users) == 1 else 'those connections'} first", field="name")
        with self.host.session() as s:
            s.execute(delete(OAuthCredential).where(OAuthCredential.id == cred.id))

    def used_by(self, credential_id: int) -> builtins.list[str]:
        """The connections that sign in with a credential: ``incoming connection NAME``, ..."""
        with self.host.session() as s:
            out = [f"incoming connection {n}" for n in s.scalars(
                select(IncomingConnection.name).where(IncomingConnection.oauth_credential_id == credential_id)
                .order_by(IncomingConnection.name))]
            out += [f"outgoing connection {n}" for n in s.scalars(
                select(OutgoingConnection.name).where(OutgoingConnection.oauth_credential_id == credential_id)
                .order_by(OutgoingConnection.name))]
        return out

    def as_dict(self, cred: OAuthCredential) -> dict[str, Any]:
        """The JSON form of a credential: settings, authorizations and their state; no secret."""
        return credential_dict(cred, self._state(cred), self.used_by(cred.id))

    def _validate(self, spec: CredentialSpec) -> ClientConfig:
        assert spec.name
        label = f"OAuth2 credential {spec.name!r}"
        provider = self.provider(str(spec.provider))
        from .connections import _check_ca_file, _on_the_wire, check_lengths  # one check for each, everywhere

        client_id = _on_the_wire((spec.client_id or "").strip(), "client ID", label)
        for what, value in (("tenant", spec.tenant), ("authority", spec.authority)):
            _on_the_wire((value or "").strip(), what, label)
        if not client_id:
            raise ValidationError(f"{label} needs the client (application) ID: give --client-id", field="client_id")
        flow = spec.flow or provider.flows[0]
        if flow not in FLOWS:
            raise ValidationError(f"{label}: flow {flow!r} is not valid; choose one of: {', '.join(FLOWS)}",
                                  field="flow")
        if flow not in provider.flows:
            raise ValidationError(f"{label}: {provider.name} does not offer the {flow} flow; it offers "
                                  f"{', '.join(provider.flows)}", field="flow")
        secret = spec.client_secret or None
        if secret is not None and (secret != secret.strip() or any(c in secret for c in "\r\n\0")):
            raise ValidationError(f"{label}: the client secret has a line break or surrounding blanks: "
                                  "give the secret's value alone", field="client_secret")
        if flow == "client-credentials" and not secret:
            raise ValidationError(f"{label}: the client credentials flow needs the client secret: give "
                                  "--client-secret-env VAR, --client-secret-file F or --client-secret-stdin",
                                  field="client_secret")
        scopes = tuple(dict.fromkeys(s for scope in (spec.scopes or ()) for s in scope.split() if s))
        ca_file = (spec.ca_file or "").strip() or None
        if ca_file:
            ca_file = _check_ca_file(ca_file, label)
        config = ClientConfig(
            name=spec.name, provider=provider.name, client_id=client_id, client_secret=secret,
            tenant=(spec.tenant or "").strip() or None, authority=(spec.authority or "").strip() or None,
            authorization_endpoint=(spec.authorization_endpoint or "").strip() or None,
            token_endpoint=(spec.token_endpoint or "").strip() or None,
            scopes=scopes, flow=flow, ca_file=ca_file,
        )
        if provider.configure is not None:
            try:
                configured = provider.configure(config)
            except ValueError as exc:
                raise ValidationError(f"{label}: {exc}", field="provider") from None
            config = self._checked(provider, "configure", configured, ClientConfig)
        check_lengths(OAuthCredential, {k: getattr(config, k) for k in (
            "client_id", "tenant", "authority", "authorization_endpoint", "token_endpoint", "ca_file")}, label)
        return config

    # -- authorization ------------------------------------------------------------------

    def authorize(self, name: str, username: str | None = None,
                  interaction: Interaction | None = None) -> dict[str, Any]:
        """Run the credential's flow once and store the tokens; returns the authorization
        as :meth:`as_dict` lists it (``identity`` says who signed in).

        ``username`` is the mailbox login the tokens are for (a connection's username);
        without it, who signed in. Client credentials need neither an admin nor a user.

        A sign-in may take minutes: its tokens are stored only if the credential still
        asks for what it asked for then (:func:`_changed`); else nothing is stored and a
        UsageError (NotFound once removed) says to authorize again.
        """
        cred = self.get(name)
        config = self._config(cred)
        provider = self.provider(cred.provider)
        app_only = cred.flow == "client-credentials"
        removed = NotFound(f"OAuth2 credential {name!r} was removed while signing in, so the tokens were not "
                           "stored: add it again with `mailhost oauth add` and authorize it")
        if interaction is None:
            interaction = Interaction(show=lambda line: log.warning("%s", line))
        try:
            tokens = provider.authorize(config, interaction, None if app_only else username)
        except OAuthError as exc:
            raise _failure(cred, username, exc, authorizing=True) from None
        tokens = self._checked(provider, "authorize", tokens, TokenSet)
        _remember(tokens)
        key = _key(cred, username or tokens.identity)
        if not key and not app_only:
            raise ValidationError(
                f"OAuth2 credential {name!r}: {cred.provider} did not say who signed in: give --username USER "
                "(the mailbox's login)", field="username")
        now = utcnow()

        def still(current: OAuthCredential) -> None:
            """The sign-in may take minutes: keep its tokens only for the credential it was for."""
            if current.created_at != cred.created_at:  # removed, and another added with its id
                raise removed
            if changed := _changed(cred, current):
                again = f"`mailhost oauth authorize {current.name}" + (
                    f" --username {username}`" if username and not app_only else "`")
                raise UsageError(
                    f"OAuth2 credential {current.name!r} changed while signing in (its {' and '.join(changed)} "
                    f"{'were' if len(changed) > 1 or changed == ['scopes'] else 'was'} edited), so the tokens were "
                    f"not stored: run {again} again")

        def store(state: dict[str, Any]) -> None:
            state[key] = {**_tokens_entry(tokens), "authorized_at": now.isoformat(), "last_refresh_at": None,
                          "refreshes": 0, "last_error": None, "error_kind": None, "lease": None}

        try:
            self._update(cred.id, store, check=still)
        except NotFound:
            raise removed from None
        status = self.status(cred.id, key)
        assert status is not None
        return status

    # -- tokens -------------------------------------------------------------------------

    def access_token_for(self, credential_id: int, username: str | None) -> TokenSource:
        """A token source for a connection (``ConnectionSettings.access_token``).

        The first call returns the stored access token, renewed only when due. A further
        call of the same source means the server refused the token it gave (revoked, or
        judged expired): it renews the token first. A plugin that retries a refused
        sign-in once therefore gets a new token without an admin.

        The source also says which credential it draws on and what the tokens are for
        (:class:`TokenSource`), so that a plugin can tell an admin which credential to
        fix when a server wants tokens for another resource.
        """
        return TokenSource(self, credential_id, username)

    def invalidate(self, credential_id: int, username: str | None, token: str) -> None:
        """Mark ``token`` as refused by a server, so the next request renews it and no
        request is handed it again (unless another worker has already replaced it)."""
        cred = self._get(credential_id)
        key = _key(cred, username)

        def mark(state: dict[str, dict[str, Any]]) -> None:
            entry = state.get(key)
            if entry is not None and entry.get("access_token") == token:
                entry["refresh_at"], entry["refused"] = utcnow().isoformat(), True

        self._update(credential_id, mark)

    def access_token(self, credential_id: int, username: str | None) -> str:
        """An access token for ``username`` valid for a while yet, renewed when due.

        Raises a :class:`~mailhost.errors.MailError` whose message names the credential,
        the user and the fix: AuthenticationFailed when an admin must act,
        TemporaryFailure when the provider could not be reached.
        """
        cred = self._get(credential_id)
        key = _key(cred, username)
        entry = self._state(cred).get(key)
        changed = False  # by an admin while this call renewed
        deadline = time.monotonic() + LEASE.total_seconds() + 5  # the holder's lease ends before
        while entry is None or _due(entry, utcnow()):
            if entry is None and key != APP_ONLY:
                raise AuthenticationFailed(
                    f"OAuth2 credential {cred.name!r} is not authorized for {username or 'this mailbox'}"
                    + (" (its tokens were dropped when the credential changed)" if changed else "")
                    + f": run `mailhost oauth authorize {cred.name}"
                    + (f" --username {username}`" if username else "`"))
            owner = f"{self.worker}:{uuid.uuid4().hex[:8]}"

            def claim(state: dict[str, dict[str, Any]], owner: str = owner,
                      key: str = key) -> tuple[str, dict[str, Any] | None]:
                if key != APP_ONLY and key not in state:  # dropped meanwhile: a poll never starts a sign-in
                    return "changed", None
                return _claim(state, key, owner, utcnow(), self.host.clock())

            outcome, entry = self._update(credential_id, claim)
            if outcome == "claimed":
                # The settings as they are now: an edit that changes them later drops the lease too.
                now_cred = self._get(credential_id)
                if _key(now_cred, username) != key:  # the flow changed: these tokens are kept elsewhere now
                    self._release(credential_id, key, owner)
                elif entry is not None and (token := self._renew(now_cred, key, entry)) is not None:
                    return token
                outcome = "changed"  # the grant was replaced or dropped meanwhile: what is stored now decides
            if outcome == "changed":
                cred = self._get(credential_id)
                key = _key(cred, username)
                entry, changed = self._state(cred).get(key), True
                continue
            if outcome == "busy":  # another worker renews it: use the old token while it lasts, unless refused
                if entry is not None and _usable(entry, utcnow()):
                    break
                if time.monotonic() > deadline:
                    raise TemporaryFailure(
                        f"OAuth2 credential {cred.name!r}: another worker has been renewing the token of "
                        f"{key or 'the app'} for too long: it will be retried")
                time.sleep(0.05)
        assert entry is not None
        return _token(entry)

    def _renew(self, cred: OAuthCredential, key: str, entry: Mapping[str, Any]) -> str | None:
        """Renew ``key``'s tokens while holding its lease; commit them (or the error).

        Returns None, keeping nothing, when the lease was lost meanwhile: an admin
        replaced the grant (`oauth authorize`) or dropped it (`oauth edit`), or the lease
        ran out and another worker took it. Its holder alone may write (a fencing token).
        """
        owner = entry["lease"]["owner"]
        provider = self.provider(cred.provider)
        old = TokenSet.from_dict(entry) if entry.get("access_token") else None
        if old is None and cred.flow != "client-credentials":  # never start a sign-in from a poll
            self._release(cred.id, key, owner)
            raise AuthenticationFailed(f"OAuth2 credential {cred.name!r} holds no token for {key or 'the app'}: "
                                       f"run `mailhost oauth authorize {cred.name}"
                                       + (f" --username {key}`" if key else "`"))
        try:
            if old is None:  # app-only: the first token
                fresh = self._checked(provider, "authorize", provider.authorize(
                    self._config(cred), Interaction(show=lambda line: None), None), TokenSet)
            else:
                fresh = self._checked(provider, "refresh", provider.refresh(self._config(cred), old), TokenSet)
        except OAuthError as exc:
            failure = _failure(cred, key, exc)
            if not self._record_failure(cred.id, key, owner, str(failure), exc.kind):
                return None  # about a grant that is gone
            if failure.temporary and _usable(entry, utcnow()):
                log.warning("%s; using the current access token until it expires", failure)
                return _token(entry)
            raise failure from None
        except Exception as exc:  # a provider's bug: recorded, the lease freed, raised as is
            said = str(exc) if isinstance(exc, PluginError) else self.host.plugins.unexpected(exc)
            self._record_failure(cred.id, key, owner, redact(said), type(exc).__name__)
            raise
        if old is not None and old.refresh_token and fresh.refresh_token is None:
            fresh = dataclasses.replace(fresh, refresh_token=old.refresh_token)
        _remember(fresh)
        now = utcnow()

        def store(state: dict[str, Any]) -> bool:
            slot = _leased(state, key, owner)
            if slot is None:
                return False
            slot.setdefault("authorized_at", now.isoformat())
            slot.update(_tokens_entry(fresh, identity=slot.get("identity")))
            slot.update(last_refresh_at=now.isoformat(), refreshes=int(slot.get("refreshes") or 0) + 1,
                        last_error=None, error_kind=None, lease=None, refused=None)
            return True

        if not self._update(cred.id, store):  # the rotated refresh token is durable from here on
            log.info("discarded a renewed OAuth2 token of %s for %s: the authorization changed meanwhile",
                     cred.name, key or "the app")
            return None
        log.info("renewed the OAuth2 token of %s for %s", cred.name, key or "the app")
        return fresh.access_token

    def _checked(self, provider: OAuthProvider, hook: str, answer: Any, kind: type[_T]) -> _T:
        """What a provider's ``hook`` returned, checked: a ``kind`` (a TokenSet from
        ``authorize`` and ``refresh``, a ClientConfig from ``configure``)."""
        if not isinstance(answer, kind):
            raise broke_contract(self.host.plugins.named(provider.plugin), "OAuth2 provider",
                                 f"its {provider.name} provider's {hook} returned {type(answer).__name__}, "
                                 f"not a mailhost.oauth_providers.{kind.__name__}")
        return answer

    def _release(self, credential_id: int, key: str, owner: str) -> None:
        """Free ``key``'s renewal lease if ``owner`` still holds it."""
        def release(state: dict[str, dict[str, Any]]) -> None:
            if (mine := _leased(state, key, owner)) is not None:
                mine["lease"] = None

        self._update(credential_id, release)

    def _record_failure(self, credential_id: int, key: str, owner: str, message: str, kind: str) -> bool:
        """Keep a renewal's error for `oauth show` and free the lease; False, keeping
        nothing, when the lease was lost meanwhile (see :meth:`_renew`)."""
        failed_at = utcnow().isoformat()

        def record(state: dict[str, dict[str, Any]]) -> bool:
            slot = _leased(state, key, owner)
            if slot is not None:
                slot.update(lease=None, last_error=message, error_kind=kind, failed_at=failed_at)
            return slot is not None

        return bool(self._update(credential_id, record))

    def status(self, credential_id: int, username: str | None) -> dict[str, Any] | None:
        """The state of one authorization: expiry, last renewal, last error; no token."""
        cred = self._get(credential_id)
        key = _key(cred, username)
        entry = self._state(cred).get(key)
        return _status(key, entry) if entry is not None else None

    def connection_status(self, conn: Any) -> dict[str, Any]:
        """What ``incoming show`` / ``outgoing show`` add for an OAuth2 connection."""
        if conn.oauth_credential_id is None:
            return {}
        status = self.status(conn.oauth_credential_id, conn.username) or {}
        return {
            "oauth_authorized": bool(status),
            "oauth_token_expires_at": status.get("expires_at"),
            "oauth_last_refresh_at": status.get("last_refresh_at"),
            "oauth_last_error": status.get("last_error") if status else
            "not authorized: run `mailhost oauth authorize`",
        }

    # -- the stored state ---------------------------------------------------------------

    def _get(self, credential_id: int) -> OAuthCredential:
        with self.host.session() as s:
            cred = s.get(OAuthCredential, credential_id)
        if cred is None:
            raise NotFound(f"the OAuth2 credential #{credential_id} no longer exists: pick another one")
        return cred

    def _config(self, cred: OAuthCredential) -> ClientConfig:
        return ClientConfig(
            name=cred.name, provider=cred.provider, client_id=cred.client_id,
            client_secret=self.host.vault.decrypt(cred.client_secret_enc), tenant=cred.tenant,
            authority=cred.authority, authorization_endpoint=cred.authorization_endpoint,
            token_endpoint=cred.token_endpoint, scopes=tuple(cred.scopes or ()), flow=cred.flow,
            ca_file=cred.ca_file,
        )

    def _state(self, cred: OAuthCredential) -> dict[str, dict[str, Any]]:
        return _decode(self.host.vault.decrypt_bytes(cred.tokens_enc))

    def _update(self, credential_id: int, change: Callable[[dict[str, dict[str, Any]]], Any],
                check: Callable[[OAuthCredential], None] | None = None) -> Any:
        """Apply ``change`` to the stored token state atomically; returns its result.

        Compare-and-set on the ciphertext: read, change, write only if nobody wrote in
        between, else again. No lock is held while a provider is asked. ``check`` is
        given the credential as read, and raises to write nothing; the write then also
        needs the rest of the row unchanged since (an edit may leave the tokens as they
        were: none), told by ``updated_at``, which every write of the row sets.
        """
        for _ in range(200):
            cred = self._get(credential_id)
            if check is not None:
                check(cred)
            state = self._state(cred)
            result = change(state)
            ciphertext = self.host.vault.encrypt(json.dumps(state, sort_keys=True)) if state else None
            same = (OAuthCredential.tokens_enc.is_(None) if cred.tokens_enc is None
                    else OAuthCredential.tokens_enc == cred.tokens_enc)
            if check is not None:
                same = and_(same, OAuthCredential.updated_at == cred.updated_at)
            with self.host.session() as s:
                written = cast("CursorResult[Any]", s.execute(
                    update(OAuthCredential).where(OAuthCredential.id == credential_id, same)
                    .values(tokens_enc=ciphertext, **_summary(state))
                    .execution_options(synchronize_session=False)
                )).rowcount
            if written:
                return result
            time.sleep(0.005)
        raise MailhostError(f"the tokens of OAuth2 credential {cred.name!r} keep changing under this worker: "
                            "try again")


class TokenSource:
    """``ConnectionSettings.access_token`` for a connection that signs in with an OAuth2
    credential: call it for an access token (see :meth:`OAuth2.access_token_for`).

    Plugins may read what it stands for, to name the credential in an error and check
    that its tokens suit their server: :attr:`credential` (the name), :attr:`provider`,
    :attr:`flow`, :attr:`app_only`, :attr:`scopes` (what the credential asks for) and
    :meth:`granted` (what the provider granted with the current token, when it said).
    None of them is a secret. They are read from the store when first asked for.
    """

    def __init__(self, oauth: OAuth2, credential_id: int, username: str | None) -> None:
        self._oauth = oauth
        self.credential_id = credential_id
        self.username = username
        self._handed: list[str] = []
        self._lock = threading.Lock()
        self._cred: OAuthCredential | None = None

    def __call__(self) -> str:
        with self._lock:
            if self._handed:
                self._oauth.invalidate(self.credential_id, self.username, self._handed[-1])
            self._handed[:] = [self._oauth.access_token(self.credential_id, self.username)]
            return self._handed[0]

    def __repr__(self) -> str:
        return f"<TokenSource credential #{self.credential_id} for {self.username or 'the app'}>"

    def _credential(self) -> OAuthCredential:
        if self._cred is None:
            self._cred = self._oauth._get(self.credential_id)
        return self._cred

    @property
    def credential(self) -> str:
        """The credential's name, as `mailhost oauth` commands take it."""
        return self._credential().name

    @property
    def provider(self) -> str:
        return self._credential().provider

    @property
    def flow(self) -> str:
        return self._credential().flow

    @property
    def app_only(self) -> bool:
        """Client credentials: the app's own permissions, for every mailbox."""
        return self.flow == "client-credentials"

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes the credential asks for (its ``--scope``, or the provider's defaults)."""
        return tuple(self._credential().scopes or ())

    def granted(self) -> tuple[str, ...]:
        """The scopes granted with the stored token, when the provider said; else ()."""
        cred = self._oauth._get(self.credential_id)
        entry = self._oauth._state(cred).get(_key(cred, self.username)) or {}
        return tuple(str(entry.get("scope") or "").split())


# ---------------------------------------------------------------------------------------
# The token state: {username: entry}, entry = tokens + bookkeeping
# ---------------------------------------------------------------------------------------


def _key(cred: OAuthCredential, username: str | None) -> str:
    """Where a username's tokens are kept: app-only tokens serve every mailbox; user names
    compare without case, as mail servers and identity providers compare them."""
    return APP_ONLY if cred.flow == "client-credentials" else (username or "").strip().lower()


def _decode(data: bytes | None) -> dict[str, dict[str, Any]]:
    if not data:
        return {}
    state = json.loads(data)
    for entry in state.values():
        for key in ("access_token", "refresh_token"):
            remember_secret(entry.get(key))
    return state


def _tokens_entry(tokens: TokenSet, identity: str | None = None) -> dict[str, Any]:
    entry = tokens.to_dict()
    entry["identity"] = tokens.identity or identity
    return entry


def _remember(tokens: TokenSet) -> None:
    remember_secret(tokens.access_token)
    remember_secret(tokens.refresh_token)


def _time(entry: Mapping[str, Any], key: str) -> dt.datetime | None:
    value = entry.get(key)
    return dt.datetime.fromisoformat(value) if value else None


def _due(entry: Mapping[str, Any], now: dt.datetime) -> bool:
    """Whether the entry's access token should be renewed now (or has none)."""
    expires, obtained = _time(entry, "expires_at"), _time(entry, "obtained_at")
    if not entry.get("access_token") or expires is None:
        return True
    before = min(RENEW_BEFORE, (expires - obtained) / 2) if obtained else RENEW_BEFORE
    renew_at = expires - before
    hint = _time(entry, "refresh_at")
    if hint is not None:
        renew_at = min(renew_at, hint)
    return now >= renew_at


def _usable(entry: Mapping[str, Any], now: dt.datetime) -> bool:
    """Whether the entry's access token may still be handed out while it is renewed: not
    once a server has refused it (:meth:`OAuth2.invalidate`), however long it would last."""
    expires = _time(entry, "expires_at")
    return (bool(entry.get("access_token")) and not entry.get("refused") and expires is not None
            and now < expires - SKEW)


def _token(entry: Mapping[str, Any]) -> str:
    return str(entry["access_token"])


def _claim(state: dict[str, dict[str, Any]], key: str, worker: str, now: dt.datetime,
           store_now: dt.datetime) -> tuple[str, dict[str, Any] | None]:
    """Take ``key``'s renewal lease. Returns the outcome and the entry as stored:
    "claimed", "busy" (another worker holds the lease) or "fresh" (another worker has
    renewed the token meanwhile).

    The lease goes by ``store_now``, the store's clock (:class:`mailhost.leases.StoreClock`),
    which all workers share: by its own clock, a worker whose clock runs behind wrote a
    lease that the others saw expired, and they renewed the token too. The token's
    times, stamped by the provider when it issued them, go by this machine's ``now``."""
    entry = state.get(key)
    if entry is not None and entry.get("access_token") and not _due(entry, now):
        return "fresh", dict(entry)
    lease = (entry or {}).get("lease") or {}
    if lease.get("until") and dt.datetime.fromisoformat(lease["until"]) > store_now:
        return "busy", dict(entry) if entry is not None else None
    entry = state.setdefault(key, {})
    entry["lease"] = {"owner": worker, "until": (store_now + LEASE).isoformat()}
    return "claimed", dict(entry)


def _leased(state: dict[str, dict[str, Any]], key: str, owner: str) -> dict[str, Any] | None:
    """``key``'s entry if ``owner`` still holds its lease, else None: a replaced or dropped
    grant has no lease, and an expired one may have another holder."""
    entry = state.get(key)
    return entry if entry is not None and (entry.get("lease") or {}).get("owner") == owner else None


def _summary(state: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The credential's columns: the next expiry, the last renewal, the newest error."""
    expiries = [t for e in state.values() if (t := _time(e, "expires_at"))]
    refreshes = [t for e in state.values() if (t := _time(e, "last_refresh_at"))]
    errors = sorted(((_time(e, "failed_at") or dt.datetime.min.replace(tzinfo=dt.timezone.utc), e["last_error"])
                     for e in state.values() if e.get("last_error")), key=lambda pair: pair[0])
    return {
        "token_expires_at": min(expiries) if expiries else None,
        "last_refresh_at": max(refreshes) if refreshes else None,
        "last_error": errors[-1][1] if errors else None,
    }


def _status(key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "username": key or None,
        "app_only": key == APP_ONLY,
        "identity": entry.get("identity"),
        "authorized_at": _time(entry, "authorized_at"),
        "expires_at": _time(entry, "expires_at"),
        "last_refresh_at": _time(entry, "last_refresh_at"),
        "refreshes": entry.get("refreshes") or 0,
        "refresh_token": bool(entry.get("refresh_token")),
        "scope": entry.get("scope") or None,
        "last_error": entry.get("last_error"),
    }


def credential_dict(cred: OAuthCredential, state: Mapping[str, Mapping[str, Any]] | None = None,
                    used_by: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON form of a credential; secrets (client secret, tokens) never appear."""
    return {
        "name": cred.name,
        "provider": cred.provider,
        "client_id": cred.client_id,
        "client_secret_set": cred.client_secret_enc is not None,
        "tenant": cred.tenant,
        "authority": cred.authority,
        "authorization_endpoint": cred.authorization_endpoint,
        "token_endpoint": cred.token_endpoint,
        "scopes": list(cred.scopes or ()),
        "flow": cred.flow,
        "ca_file": cred.ca_file,
        "token_expires_at": cred.token_expires_at,
        "last_refresh_at": cred.last_refresh_at,
        "last_error": cred.last_error,
        "authorizations": [_status(k, e) for k, e in sorted((state or {}).items()) if e.get("authorized_at")
                           or e.get("access_token")],
        "used_by": list(used_by),
    }


# ---------------------------------------------------------------------------------------
# Errors for admins
# ---------------------------------------------------------------------------------------


def _failure(cred: OAuthCredential, username: str | None, exc: OAuthError, authorizing: bool = False) -> MailError:
    """One sentence naming the credential, the user, what the provider said and the fix."""
    who = f"OAuth2 credential {cred.name!r}" + (f" for {username}" if username else "")
    # A provider may echo what it was sent (the refresh token, the client secret): the
    # sentence is shown, logged and kept in clear for `oauth show`.
    said = redact(" ".join(p for p in (exc.code, exc.description) if p) or exc.kind)
    authorize = f"`mailhost oauth authorize {cred.name}" + (f" --username {username}`" if username else "`")
    new_secret = f"`mailhost oauth edit {cred.name} --client-secret-stdin`"
    if exc.kind == "client_secret_expired":
        return AuthenticationFailed(
            f"{who}: the client secret has expired ({said}), so no token can be "
            f"{'issued' if authorizing else 'renewed'}: create a new client secret for application {cred.client_id} "
            f"and store it with {new_secret}")
    if exc.kind == "invalid_client":
        return AuthenticationFailed(
            f"{who}: {cred.provider} refused the client ID or secret ({said}): check client ID {cred.client_id} "
            f"and store the secret's value (not its ID) with {new_secret}")
    if exc.kind in ("invalid_grant", "interaction_required", "expired_token"):
        return AuthenticationFailed(
            f"{who}: the authorization was revoked or has expired ({said}): authorize again with {authorize}")
    if exc.kind == "tls":
        return TLSFailure(f"{who}: {exc.description}: if the provider uses a private CA, give its certificate "
                          f"with `mailhost oauth edit {cred.name} --ca-file PATH`")
    if exc.temporary:
        return TemporaryFailure(f"{who}: {cred.provider} could not issue a token now ({said}): it will be retried")
    if exc.kind in ("timeout", "redirect", "invalid_state", "access_denied"):
        return AuthenticationFailed(f"{who}: the sign-in did not complete ({said}): run {authorize} again")
    return AuthenticationFailed(f"{who}: {cred.provider} refused to issue a token ({said}): check the credential "
                                f"with `mailhost oauth show {cred.name}`")


def _changed(before: Any, after: Any) -> list[str]:
    """Which of the settings tokens are issued for (:data:`_GRANT`) differ between two
    credentials or client configs, as `oauth edit` names them; scopes in any order ask
    for nothing else."""
    return [label for attr, label in _GRANT.items()
            if (set(getattr(before, attr) or ()) != set(getattr(after, attr) or ()) if attr == "scopes"
                else getattr(before, attr) != getattr(after, attr))]


def _given(value: str | None, current: str | None) -> str | None:
    return current if value is None else value

