"""Fixtures of the Graph plugin's tests: the Graph stand-in with two users and a shared
mailbox, and session settings that sign in to it."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from graph_helpers import ALICE, BOB, SUPPORT, Settings
from mailhost.protocols import ConnectionSettings
from mailhost.secrets import forget_secrets

from tests.servers.graph import GraphServer, graph_server  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _forget_test_tokens() -> Iterator[None]:
    """Some tokens here are plain words ("expired", "opaque", "token"), and every token a
    session uses is redacted process-wide from then on: forget them after each test, so
    that later tests' messages keep those words."""
    yield
    forget_secrets()


@pytest.fixture
def graph(graph_server: GraphServer) -> GraphServer:  # noqa: F811
    """The stand-in with users alice and bob and the shared mailbox support (alice has
    Full Access and Send As on it, bob has no rights)."""
    graph_server.add_user(ALICE)
    graph_server.add_user(BOB)
    graph_server.add_shared_mailbox(SUPPORT)
    graph_server.grant(SUPPORT, ALICE, full_access=True, send_as=True)
    return graph_server


@pytest.fixture
def settings(graph: GraphServer) -> Settings:
    """``settings(scopes=..., **changes)``: alice's mailbox on the stand-in, with a
    delegated token for ``scopes`` (by default Mail.ReadWrite and Mail.Send)."""

    def make(scopes: tuple[str, ...] = ("Mail.ReadWrite", "Mail.Send"), user: str | None = ALICE,
             **changes: Any) -> ConnectionSettings:
        token = graph.issue_token(user, scopes=scopes)
        values: dict[str, Any] = {
            "name": "desk", "protocol": "graph", "host": "127.0.0.1", "port": graph.port,
            "username": ALICE, "ca_file": graph.ca_file, "timeout": 10.0, "access_token": lambda: token,
        }
        values.update(changes)
        return ConnectionSettings(**values)

    return make
