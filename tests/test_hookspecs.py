"""Meta-tests that keep the hook contract, its docs and its tests honest (as datasette does)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import mailhost
from mailhost import hookspecs

ROOT = Path(__file__).parent.parent
HOOKS = sorted(name for name, f in vars(hookspecs).items()
               if inspect.isfunction(f) and hasattr(f, "mailhost_spec"))


def test_there_are_hooks() -> None:
    """The spec file defines the four extension points and the pipeline events."""
    assert {"register_protocols", "register_host_overrides", "register_after_download_actions",
            "decrypt_message", "message_stored", "message_sent"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    """Every hook has a section in docs/plugin_hooks.md and a docstring."""
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    assert f"\n## {hook}\n" in docs
    assert (getattr(hookspecs, hook).__doc__ or "").strip()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    """Every hook is exercised by a test named after it."""
    pattern = re.compile(rf"def test_{hook}\b")
    sources = [p.read_text() for p in [*ROOT.glob("tests/**/test_*.py"), *ROOT.glob("plugins/*/tests/test_*.py")]]
    assert any(pattern.search(s) for s in sources), f"no test named test_{hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_test_plugin_implements_every_hook(hook: str) -> None:
    """The in-tree test plugin implements every hook."""
    from tests.testplugin import mailhost_testplugin

    assert hasattr(getattr(mailhost_testplugin, hook, None), "mailhost_impl")


def test_public_api() -> None:
    """The package's public names are exactly its sorted __all__."""
    assert mailhost.__all__ == sorted(mailhost.__all__)
    for name in mailhost.__all__:
        assert getattr(mailhost, name) is not None


def test_register_protocols(tmh) -> None:
    """Protocols registered through the hook are found by direction and name."""
    from mailhost.protocols import Direction

    provider = tmh.plugins.protocol(Direction.INCOMING, "dir")
    assert provider.plugin == "testplugin" and provider.direction is Direction.INCOMING
    assert tmh.plugins.protocol_names(Direction.OUTGOING) == ["dir"]


def test_register_host_overrides(tmh) -> None:
    """Host overrides registered through the hook are listed and usable by connections."""
    from mailhost.connections import ConnectionSpec
    from mailhost.protocols import Direction

    [override] = [o for o in tmh.plugins.host_overrides if o.provider == "test"]
    assert (override.provider, override.protocol, override.name, override.host) == ("test", "dir", "local", "localhost")
    conn = tmh.connections.add(Direction.OUTGOING, ConnectionSpec(name="o", protocol="dir", host_override="local"))
    assert conn.host == "localhost"
