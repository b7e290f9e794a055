"""Fixtures for the host's own tests: the in-tree test plugin, in process and installed."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhost import Mailhost
from mailhost.plugins import PluginHost

from .testplugin import install_testplugin


@pytest.fixture
def testplugin() -> object:
    """The in-tree test plugin module."""
    from .testplugin import mailhost_testplugin

    return mailhost_testplugin


@pytest.fixture
def tmh(home: Path, testplugin: object) -> Iterator[Mailhost]:
    """An installation whose plugins are the builtin ones and the test plugin."""
    host = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    yield host
    host.close()


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess in which the test plugin is an installed distribution."""
    site = install_testplugin(tmp_path / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MAILHOST_TESTPLUGIN_EVENTS": str(tmp_path / "events.jsonl"),
            "MAILHOST_TESTPLUGIN_OUTBOX": str(tmp_path / "outbox")}


@pytest.fixture
def tmh_factory(testplugin: object):
    """Reopen an installation with the test plugin loaded in process."""
    opened: list[Mailhost] = []

    def make(host: Mailhost) -> Mailhost:
        h = Mailhost.open(host.config.path, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
        opened.append(h)
        return h

    yield make
    for h in opened:
        h.close()
