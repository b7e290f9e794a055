"""Fixtures of the Graph plugin's tests: the Graph stand-in with two users and a shared
mailbox, and session settings that sign in to it."""
from __future__ import annotations

from typing import Any

import pytest
from graph_helpers import ALICE, BOB, SUPPORT, Settings
from mailhost.protocols import ConnectionSettings

from tests.servers.graph import GraphServer, graph_server  # noqa: F401  (fixture)


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
