"""pytest plugin: fixtures for the test-server kit.

Enable with ``pytest_plugins = ["tests.servers.fixtures"]`` in the root
conftest.py (or ``pytest -p tests.servers.fixtures``).

Fixtures
--------
``pki`` (session)            throwaway CAs + localhost certs (:class:`~.certs.Pki`)
``dovecot`` (session)        one running :class:`~.dovecot.Dovecot` for the session
``mailbox`` (function)       a fresh unique user in ``dovecot`` -> ``Mailbox(user, password)``
``dovecot_factory``          ``make(**Dovecot kwargs) -> started Dovecot`` (e.g.
                             ``starttls=False``, ``untrusted=True``); stopped after the test
``smtp_server``              ``make(mode="plain", **SmtpServer kwargs) -> started SmtpServer``
                             (TLS modes use ``pki``); stopped after the test
``smtp_process``             ``make(mode="plain", args=[...]) -> SmtpServerProcess`` with a
                             spool dir under ``tmp_path``; killed after the test

Without ``/usr/sbin/dovecot`` the Dovecot fixtures skip -- except when the
environment says ``CI=true`` (or 1/yes), where they FAIL: CI must never
silently skip the IMAP/POP3 tests.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, NamedTuple

import pytest

from .certs import Pki, make_pki
from .dovecot import Dovecot, dovecot_missing_reason
from .smtpd import SmtpServer, SmtpServerProcess

__all__ = [
    "Mailbox",
    "in_ci",
    "require_dovecot",
    "pki",
    "dovecot",
    "mailbox",
    "dovecot_factory",
    "smtp_server",
    "smtp_process",
]


class Mailbox(NamedTuple):
    """A user in the session Dovecot; unpacks as ``user, password``."""

    user: str
    password: str


def in_ci() -> bool:
    """True when env ``CI`` is true/1/yes (GitHub Actions, GitLab, ... set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_dovecot() -> None:
    """Skip (locally) or fail (``CI=true``) when Dovecot is not installed."""
    reason = dovecot_missing_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(
            f"{reason}. CI=true: the Dovecot-backed tests must run in CI, not be skipped "
            "-- install dovecot-imapd and dovecot-pop3d in the CI image.",
            pytrace=False,
        )
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Trusted + untrusted CA with localhost server certs (PEM files)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    """The session's Dovecot (STARTTLS + implicit TLS, users alice/bob,
    master user master/master-pw). Prefer ``mailbox`` for isolation."""
    require_dovecot()
    server = Dovecot(pki)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    """A brand-new user (empty INBOX) in the session Dovecot, usable at once."""
    user, password = dovecot.new_user("t")
    return Mailbox(user, password)


@pytest.fixture
def dovecot_factory(pki: Pki) -> Iterator[Callable[..., Dovecot]]:
    """``make(**kwargs)`` starts an extra Dovecot (kwargs as for
    :class:`Dovecot`, ``pki`` defaults to the session PKI)."""
    require_dovecot()
    created: list[Dovecot] = []

    def make(**kwargs: Any) -> Dovecot:
        kwargs.setdefault("pki", pki)
        server = Dovecot(**kwargs)
        created.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in created:
            server.cleanup()


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[Callable[..., SmtpServer]]:
    """``make(mode="plain", **kwargs)`` starts an :class:`SmtpServer`
    (``pki`` defaults to the session PKI)."""
    created: list[SmtpServer] = []

    def make(mode: str = "plain", **kwargs: Any) -> SmtpServer:
        if "cert_file" not in kwargs:
            kwargs.setdefault("pki", pki)
        server = SmtpServer(mode, **kwargs)
        created.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in created:
            server.cleanup()


@pytest.fixture
def smtp_process(
    tmp_path: Any, pki: Pki
) -> Iterator[Callable[..., SmtpServerProcess]]:
    """``make(mode="plain", args=[...])`` runs ``python -m tests.servers.smtpd``
    in a child process spooling to ``tmp_path/"spool-N"`` (TLS modes get
    ``--cert/--key`` of the session PKI). SIGKILLed after the test if still
    running."""
    created: list[SmtpServerProcess] = []

    def make(mode: str = "plain", args: list[str] | None = None, **kwargs: Any) -> SmtpServerProcess:
        extra = list(args or [])
        if mode != "plain" and "--cert" not in extra:
            extra += ["--cert", pki.cert_file, "--key", pki.key_file, "--ca", pki.ca_file]
        spool = kwargs.pop("spool_dir", None) or tmp_path / f"spool-{len(created)}"
        proc = SmtpServerProcess(mode, spool, args=extra, **kwargs)
        created.append(proc)
        proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in created:
            proc.kill()
