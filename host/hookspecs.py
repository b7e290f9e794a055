"""The hook specifications: the one readable contract between mailhost and its plugins.

A plugin is a module (or object) with functions marked ``@mailhost.hookimpl`` whose
names and argument names match the specs below; it is found through an entry point in
the group ``mailhost``::

    # setup.cfg of a plugin
    [options.entry_points]
    mailhost =
        imap = mailhost_imap

Registration hooks (``register_*``) follow the callback pattern: the plugin calls
``register(...)`` once per thing it provides and the host owns the resulting registry
and settles conflicts. A plugin implements only the hooks it needs; the host's own
behaviour (the mark-seen / delete / move / keep actions) is registered through these
same hooks by ``mailhost.builtin``.

Every hook is documented in ``docs/plugin_hooks.md`` and exercised by a test named after
it (``tests/test_hookspecs.py`` checks both).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .certificates import Certificate, Decryption
    from .oauth_providers import OAuthProvider
    from .protocols import AfterDownloadAction, HostOverride, ProtocolProvider

PROJECT = "mailhost"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------
# Connection protocols
# ---------------------------------------------------------------------------------------


@hookspec
def register_protocols(register: Callable[[ProtocolProvider], None]) -> None:
    """Register the protocols this plugin provides.

    Called once per process when plugins are loaded. Call ``register(provider)`` for
    each :class:`~mailhost.protocols.ProtocolProvider`. A protocol is known by its
    direction and name (``incoming``/``imap``); one plugin may register a name in both
    directions (Microsoft Graph does). When two plugins register the same direction and
    name, the one chosen in the config file (``[plugins.protocols] imap = "NAME"``)
    wins, else the one whose plugin name sorts first; the other is reported by
    ``mailhost plugins list``. A provider's settings of its own are declared in its
    ``options`` (:class:`~mailhost.protocols.ProviderOption`), checked here: a bad
    declaration fails the plugin, naming the option.
    """


@hookspec
def register_host_overrides(register: Callable[[HostOverride], None]) -> None:
    """Register predefined hosts per provider and protocol.

    Call ``register(override)`` for each :class:`~mailhost.protocols.HostOverride`
    (the seeds' "Override default host setting" dropdown: Microsoft 365 global, US
    Government, China, ...). A connection picks one with ``--host-override NAME``.
    """


@hookspec
def register_oauth_providers(register: Callable[[OAuthProvider], None]) -> None:
    """Register OAuth2 providers: identity platforms credentials can sign in with.

    Call ``register(provider)`` for each :class:`~mailhost.oauth_providers.OAuthProvider`:
    its name (``mailhost oauth add --provider NAME``), the flows it offers, and
    ``authorize(config, interaction, username)`` / ``refresh(config, tokens)``, which
    return a :class:`~mailhost.oauth_providers.TokenSet` or raise
    :class:`~mailhost.oauth_providers.OAuthError`. The host stores the tokens encrypted
    and decides when to renew them. Built in: ``microsoft``, ``google``, ``oidc``. Two
    plugins registering one name are settled like protocols.
    """


# ---------------------------------------------------------------------------------------
# The incoming pipeline
# ---------------------------------------------------------------------------------------


@hookspec
def register_after_download_actions(register: Callable[[AfterDownloadAction], None]) -> None:
    """Register actions that run on the server after messages are stored.

    Call ``register(action)`` for each :class:`~mailhost.protocols.AfterDownloadAction`.
    The host runs an action only after the batch it applies to is committed to the
    incoming queue; after a crash it may run again for the same messages, so an action
    must be idempotent. Built in: ``mark-seen``, ``delete``, ``move``, ``keep``.
    """


@hookspec(firstresult=True)
def decrypt_message(raw: bytes, certificates: Sequence[Certificate]) -> Decryption | None:
    """Decrypt an encrypted message with one of the connection's certificates.

    Called at ingest for each stored message of a connection that has certificates.
    Return ``None`` if the message is not in a format this plugin handles, so the next
    implementation is asked; return a :class:`~mailhost.certificates.Decryption` (with
    ``raw=None`` and an ``error`` when it is yours but cannot be decrypted). The first
    non-``None`` result wins. The original bytes are always kept as downloaded.
    """


@hookspec
def message_stored(connection: str, item_id: int, message_id: str | None, raw: bytes) -> None:
    """Called after a downloaded message is committed to the incoming queue.

    ``connection`` is the incoming connection's name and ``item_id`` the queue item's
    id. Runs in the downloading process before the after-download action; an exception
    here is logged and does not stop the download (the message is already safe).
    """


# ---------------------------------------------------------------------------------------
# The outgoing pipeline
# ---------------------------------------------------------------------------------------


@hookspec
def message_sent(
    connection: str, item_id: int, message_id: str | None, recipients: Sequence[str]
) -> None:
    """Called after an outgoing message was accepted by the server.

    ``connection`` is the outgoing connection that delivered it (the default one when
    the message fell back to it) and ``recipients`` the addresses the server accepted.
    An exception here is logged; the message stays sent.
    """
