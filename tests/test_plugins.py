"""Plugin loading: discovery, allow and deny lists, failures, strict mode, conflicts, and
what a start-up imports."""
from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.errors import PluginError
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction

from .helpers import run_cli
from .testplugin import make_dist


def _plugins(home: Path, env: dict[str, str]) -> dict[str, dict]:
    out = run_cli("plugins", "list", "--json", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    return {p["name"]: p for p in json.loads(out.stdout)}


def test_plugins_list_reports_installed_plugin(home: Path, plugin_env: dict[str, str]) -> None:
    """An installed plugin is listed with distribution, version, state, hooks and protocols."""
    p = _plugins(home, plugin_env)["testplugin"]
    assert p["distribution"] == "mailhost-testplugin"
    assert p["version"] == "0.1.0"
    assert p["state"] == "enabled"
    assert "register_protocols" in p["hooks"]
    assert p["protocols"] == ["incoming/dir", "outgoing/dir"]
    assert p["host_overrides"] == ["test/dir/local"]


def test_plugin_that_raises_on_import_is_reported_not_fatal(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """A plugin raising on import is listed as failed with its error; the others run."""
    site = make_dist(tmp_path / "broken", "mailhost-broken", {"broken": "mailhost_broken"},
                     {"mailhost_broken": "raise RuntimeError('boom at import')\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    plugins = _plugins(home, env)
    assert plugins["broken"]["state"] == "failed"
    assert "boom at import" in plugins["broken"]["error"]
    assert plugins["testplugin"]["state"] == "enabled"


def test_plugin_that_exits_on_import_or_register_is_reported_not_fatal(
        home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """A plugin raising SystemExit at import, or in a register hook, is listed as failed
    with its message; the host and the other plugins run on."""
    site = make_dist(tmp_path / "quitter", "mailhost-quitter", {"quitter": "mailhost_quitter", "late": "mailhost_late"},
                     {"mailhost_quitter": "raise SystemExit('plugin gave up')\n",
                      "mailhost_late": "from mailhost import hookimpl\n@hookimpl\n"
                                       "def register_protocols(register):\n    raise SystemExit(3)\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    plugins = _plugins(home, env)
    assert plugins["quitter"]["state"] == "failed"
    assert plugins["quitter"]["error"] == "import failed: SystemExit: plugin gave up"
    assert plugins["late"]["state"] == "failed" and "SystemExit: 3" in plugins["late"]["error"]
    assert plugins["testplugin"]["state"] == "enabled"


def test_disabled_plugin_is_never_imported(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """A plugin disabled in the config file is listed as disabled and never imported."""
    marker = tmp_path / "imported"
    site = make_dist(tmp_path / "spy", "mailhost-spy", {"spy": "mailhost_spy"},
                     {"mailhost_spy": f"open({str(marker)!r}, 'w').close()\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    assert _plugins(home, env)["spy"]["state"] == "enabled"
    assert marker.exists()
    marker.unlink()
    out = run_cli("plugins", "disable", "spy", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert _plugins(home, env)["spy"]["state"] == "disabled"
    assert not marker.exists()
    assert 'disabled = ["spy"]' in (home / "mailhost.toml").read_text()
    run_cli("plugins", "enable", "spy", env=env, cwd=home)
    assert _plugins(home, env)["spy"]["state"] == "enabled"


def test_allowlist_environment_variable(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """MAILHOST_LOAD_PLUGINS loads only the plugins it names."""
    site = make_dist(tmp_path / "other", "mailhost-other", {"other": "mailhost_other"}, {"mailhost_other": ""})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}", "MAILHOST_LOAD_PLUGINS": "other"}
    plugins = _plugins(home, env)
    assert plugins["other"]["state"] == "enabled"
    assert plugins["testplugin"]["state"] == "disabled"


def test_allowlist_typo_is_named(home: Path, plugin_env: dict[str, str]) -> None:
    """A name in MAILHOST_LOAD_PLUGINS that no plugin has is said, not silently dropped;
    strict mode makes it an error."""
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugn"}
    out = run_cli("plugins", "list", env=env, cwd=home)
    assert out.returncode == 0 and "$MAILHOST_LOAD_PLUGINS names testplugn, which no installed plugin" in out.stderr
    out = run_cli("plugins", "list", env={**env, "MAILHOST_STRICT_PLUGINS": "1"}, cwd=home)
    assert out.returncode != 0 and "names testplugn" in out.stderr


@pytest.mark.parametrize("edit, where", [
    (("disabled = []", 'disabled = ["testplugn"]'), "[plugins] disabled"),
    (("disabled = []", 'disabled = []\n\n[plugins.protocols]\ndir = "testplugn"'), "[plugins.protocols]"),
])
def test_denylist_and_choice_typos_are_named(home: Path, plugin_env: dict[str, str], edit: tuple[str, str],
                                             where: str) -> None:
    """A plugin name in [plugins] disabled or [plugins.protocols] that no plugin has is
    said, like one in the allowlist: a typo there leaves running the plugin the admin
    meant to stop (or to choose)."""
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace(*edit))
    out = run_cli("plugins", "list", env=plugin_env, cwd=home)
    assert out.returncode == 0 and f"{where} names testplugn, which no installed plugin" in out.stderr, out.stderr
    out = run_cli("plugins", "list", env={**plugin_env, "MAILHOST_STRICT_PLUGINS": "1"}, cwd=home)
    assert out.returncode != 0 and "names testplugn" in out.stderr


def test_config_allowlist(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """[plugins] enabled = [...] in the config file is an allowlist."""
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace("enabled = []", 'enabled = ["testplugin"]'))
    site = make_dist(tmp_path / "other", "mailhost-other", {"other": "mailhost_other"}, {"mailhost_other": ""})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    plugins = _plugins(home, env)
    assert plugins["testplugin"]["state"] == "enabled"
    assert plugins["other"]["state"] == "disabled"


def test_strict_mode_fails(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """MAILHOST_STRICT_PLUGINS=1 turns a failed plugin into an error naming it."""
    site = make_dist(tmp_path / "broken", "mailhost-broken", {"broken": "mailhost_broken"},
                     {"mailhost_broken": "import no_such_module_anywhere\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}", "MAILHOST_STRICT_PLUGINS": "1"}
    out = run_cli("plugins", "list", env=env, cwd=home)
    assert out.returncode == 1
    assert "plugin broken" in out.stderr and "no_such_module_anywhere" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


_TYPO = '''
from mailhost import hookimpl

@hookimpl
def register_protocol(register):  # misspelt: the spec is register_protocols
    pass
'''

_WRONG_ARGS = '''
from mailhost import hookimpl

@hookimpl
def message_stored(connection, item, raw):  # "item" is not an argument of the spec
    pass
'''


def test_hook_typo_is_caught() -> None:
    """A hook implementation with no matching spec marks the plugin failed."""
    import types

    mod = types.ModuleType("typo")
    exec(_TYPO, mod.__dict__)
    host = PluginHost(only=[], extra=[("typo", mod)])
    assert host.plugins["typo"].state == "failed"
    assert "register_protocol" in (host.plugins["typo"].error or "")


def test_hook_with_wrong_arguments_is_caught() -> None:
    """A hook implementation whose arguments do not match its spec marks the plugin failed."""
    import types

    mod = types.ModuleType("wrongargs")
    exec(_WRONG_ARGS, mod.__dict__)
    host = PluginHost(only=[], extra=[("wrongargs", mod)])
    assert host.plugins["wrongargs"].state == "failed"
    assert "item" in (host.plugins["wrongargs"].error or "")
    with pytest.raises(PluginError, match="wrongargs"):
        PluginHost(only=[], extra=[("wrongargs", mod)], strict=True)


def test_register_hook_that_raises_fails_alone(testplugin: object) -> None:
    """A plugin whose register_protocols raises is failed; the others' registrations stand."""
    import types

    mod = types.ModuleType("raiser")
    exec("from mailhost import hookimpl\n@hookimpl\ndef register_protocols(register):\n    raise ValueError('nope')\n",
         mod.__dict__)
    host = PluginHost(only=[], extra=[("testplugin", testplugin), ("raiser", mod)])
    assert host.plugins["raiser"].state == "failed"
    assert (Direction.INCOMING, "dir") in host.protocols


def test_protocol_conflict_rule(testplugin: object) -> None:
    """Two plugins with one protocol: the first by name wins unless the config chooses."""
    import types

    clone = types.ModuleType("aaa_clone")
    exec("from tests.testplugin.mailhost_testplugin import register_protocols\n", clone.__dict__)
    host = PluginHost(only=[], extra=[("testplugin", testplugin), ("aaa", clone)])
    assert host.protocols[(Direction.INCOMING, "dir")].plugin == "aaa"
    assert any("also provided by aaa" in n for n in host.plugins["testplugin"].notes)
    chosen = PluginHost(only=[], extra=[("testplugin", testplugin), ("aaa", clone)],
                        protocol_choices={"dir": "testplugin"})
    assert chosen.protocols[(Direction.INCOMING, "dir")].plugin == "testplugin"


def test_plugins_enable_unknown_name(home: Path, plugin_env: dict[str, str]) -> None:
    """Enabling a plugin that is not installed is a one-sentence error, exit 2."""
    before = (home / "mailhost.toml").read_text()
    out = run_cli("plugins", "enable", "nosuch", env=plugin_env, cwd=home)
    assert out.returncode == 2
    assert "no plugin named 'nosuch'" in out.stderr
    assert (home / "mailhost.toml").read_text() == before


def test_missing_protocol_says_why_and_what_to_do(home: Path, tmp_path: Path) -> None:
    """Asked for a protocol it cannot use, the host says whether its plugin is disabled
    (by the config or $MAILHOST_LOAD_PLUGINS) or failed, and what brings it back;
    never a distribution that does not provide it."""
    def add(direction: str, protocol: str, env: dict[str, str] | None = None) -> str:
        out = run_cli(direction, "add", "x", "--protocol", protocol, "--host", "h.example.org", env=env, cwd=home)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
        return out.stderr

    only_imap = add("outgoing", "smtp", env={"MAILHOST_LOAD_PLUGINS": "imap"})
    assert "$MAILHOST_LOAD_PLUGINS leaves out its plugin smtp; add smtp there" in only_imap
    assert "mailhost-imap" not in only_imap
    assert run_cli("plugins", "disable", "pop3", cwd=home).returncode == 0
    assert "its plugin pop3 is disabled in the config file; `mailhost plugins enable pop3`" in add("incoming", "pop3")
    site = make_dist(tmp_path / "broken", "mailhost-exchange", {"exchange": "mailhost_exchange"},
                     {"mailhost_exchange": "raise ImportError('no exchangelib')\n"})
    failed = add("incoming", "exchange", env={"PYTHONPATH": str(site)})
    assert "its plugin exchange failed to load (import failed: ImportError: no exchangelib)" in failed
    unknown = add("incoming", "nosuch")  # pop3 is disabled above
    assert "no incoming protocol named 'nosuch' is available; choose one of: graph, imap (" in unknown


def test_bundled_builtin_actions_registered_through_hooks() -> None:
    """The built-in after-download actions come from the builtin plugin, through the hook."""
    host = PluginHost(only=[])
    assert {a.name for a in host.actions.values()} >= {"mark-seen", "delete", "move", "keep"}
    assert all(host.actions[n].plugin == "builtin" for n in ("mark-seen", "delete", "move", "keep"))


# ---------------------------------------------------------------------------------------
# Start-up: a command imports what it uses (the import time of a short `mailhost fetch`
# is most of its run). asyncio is not listed: SQLAlchemy itself imports it.
# ---------------------------------------------------------------------------------------

#: Loaded by no pass of an IMAP connection: the other commands' subsystems, the other
#: protocols' sessions and client libraries, the heavy halves of the built-in plugins.
NOT_FOR_AN_IMAP_FETCH = (
    "mailhost.cli.admin", "mailhost.cli.certs", "mailhost.cli.delivery", "mailhost.cli.oauth",
    "mailhost.cli.service", "mailhost.outgoing", "mailhost.certs", "mailhost.oauth",
    "mailhost.oauth_flows", "mailhost.smime_cms", "mailhost.web", "mailhost.service",
    "mailhost_graph.client", "mailhost_pop3._session", "mailhost_smtp._session", "mailhost_imap.diagnose",
    "cryptography.x509", "asn1crypto", "httpx", "jinja2", "requests", "msal", "http.server", "smtplib",
    "poplib", "tomlkit", "sqlalchemy.dialects.postgresql", "alembic",
)


def _modules_after(code: str, cwd: Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def _among(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in loaded))


def test_fetch_imports_only_what_it_needs(home: Path) -> None:
    """`mailhost fetch NAME` of an IMAP connection loads the fetch command, the store and
    the IMAP session, and nothing of the other commands, protocols or certificates."""
    with socket.socket() as sock:  # a port nobody listens on: the pass fails at connect
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = Mailhost.open(home / "mailhost.toml")
    host.connections.add(Direction.INCOMING, ConnectionSpec(
        name="box", protocol="imap", host="127.0.0.1", port=port, encryption="none", username="u", password="p"))
    host.close()
    code = "from mailhost.cli import main\ntry:\n    main(['fetch', 'box'])\nexcept SystemExit:\n    pass"
    loaded = _modules_after(code, home)
    assert {"mailhost.cli.incoming", "mailhost.incoming", "mailhost_imap.session", "mailhost_graph"} <= loaded
    assert _among(loaded, NOT_FOR_AN_IMAP_FETCH) == []


def test_plugin_packages_import_light(home: Path) -> None:
    """Importing mailhost and the protocol plugins (as every start-up does, to register
    them) loads neither the store nor a protocol's client library."""
    loaded = _modules_after("import mailhost, mailhost_imap, mailhost_pop3, mailhost_smtp, mailhost_graph", home)
    assert _among(loaded, ("sqlalchemy", "imapclient", *NOT_FOR_AN_IMAP_FETCH)) == []


def test_lazy_commands_are_all_mapped() -> None:
    """Every command is in COMMAND_MODULES with every module that defines a part of it,
    so that the lazy group finds it; `mailhost --help` lists them all."""
    from mailhost import cli

    for module in {m for modules in cli.COMMAND_MODULES.values() for m in modules}:
        importlib.import_module(f"mailhost.cli.{module}")
    assert set(cli.cli.commands) == set(cli.COMMAND_MODULES)

    def defined_in(command: object) -> set[str]:
        callback = getattr(command, "callback", None)
        found = {callback.__module__.rsplit(".", 1)[-1]} if callback else set()
        for sub in getattr(command, "commands", {}).values():
            found |= defined_in(sub)
        return found

    for name, command in cli.cli.commands.items():
        assert defined_in(command) <= set(cli.COMMAND_MODULES[name]), name
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(cli.COMMAND_MODULES)


def test_disabling_the_last_allowed_plugin_loads_no_other(home: Path, plugin_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """`plugins disable X` with X alone in [plugins] enabled leaves every other plugin off:
    the allowlist never becomes the empty list, which means "all"."""
    config = home / "mailhost.toml"
    config.write_text(config.read_text().replace("enabled = []", 'enabled = ["testplugin"]'))
    site = make_dist(tmp_path / "other", "mailhost-other", {"other": "mailhost_other"}, {"mailhost_other": ""})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    out = run_cli("plugins", "disable", "testplugin", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert "no installed plugin is loaded until you enable one" in out.stderr
    plugins = _plugins(home, env)
    assert plugins["testplugin"]["state"] == "disabled"
    assert plugins["other"]["state"] == "disabled"
    assert run_cli("plugins", "enable", "other", env=env, cwd=home).returncode == 0
    plugins = _plugins(home, env)
    assert plugins["other"]["state"] == "enabled" and plugins["testplugin"]["state"] == "disabled"


def test_enabling_the_builtin_plugin_is_a_no_op(home: Path, plugin_env: dict[str, str]) -> None:
    """`plugins enable builtin` succeeds without touching the config (it is always on);
    disabling it is refused with the fix."""
    before = (home / "mailhost.toml").read_text()
    out = run_cli("plugins", "enable", "builtin", env=plugin_env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert "always enabled" in out.stderr
    out = run_cli("plugins", "disable", "builtin", env=plugin_env, cwd=home)
    assert out.returncode == 2 and "cannot be disabled" in out.stderr
    assert (home / "mailhost.toml").read_text() == before


def _module(name: str, source: str) -> object:
    import types

    module = types.ModuleType(name)
    exec(source, module.__dict__)
    return module


@pytest.mark.parametrize("hook, registered, expect", [
    ("register_protocols",
     "ProtocolProvider(name='wp', direction='incoming', open=lambda s: None, after_download=('mark-seen'))",
     "after_download is a tuple of action names, the default first, such as ('mark-seen', 'delete'), not 'mark-seen'"),
    ("register_protocols", "ProtocolProvider(name='wp', direction='inbound', open=lambda s: None)",
     "direction 'inbound' is not Direction.INCOMING or Direction.OUTGOING"),
    ("register_protocols", "ProtocolProvider(name='wp', direction=Direction.INCOMING, open=lambda s: None)",
     "an incoming protocol lists the after-download actions it supports in after_download"),
    ("register_protocols",
     "ProtocolProvider(name='wp', direction=Direction.INCOMING, open='wp.session:open', after_download=('keep',))",
     "open is a callable (give lazy('package.module:name')), not 'wp.session:open'"),
    ("register_protocols",
     "ProtocolProvider(name='wp', direction=Direction.OUTGOING, open=lambda s: None, attributes='host')",
     "attributes is a set of names, such as frozenset({'host', 'username'}), not 'host'"),
    ("register_after_download_actions", "{'name': 'wrong'}",
     "registered {'name': 'wrong'} in register_after_download_actions, which takes AfterDownloadAction objects"),
    ("register_after_download_actions", "AfterDownloadAction('wrong', None)",
     "after-download action 'wrong': apply is a callable (session, refs, argument), not None"),
    ("register_after_download_actions",
     "ProtocolProvider(name='wp', direction=Direction.OUTGOING, open=lambda s: None)",
     "registered ProtocolProvider(name='wp'"),
    ("register_host_overrides", "('example', 'imap', 'eu', 'imap.eu.example.com')",
     "in register_host_overrides, which takes HostOverride objects"),
    ("register_oauth_providers", "'example'", "in register_oauth_providers, which takes OAuthProvider objects"),
])
def test_a_wrong_registration_fails_the_plugin_alone(testplugin: object, hook: str, registered: str,
                                                      expect: str) -> None:
    """What a plugin registers is checked when it registers: a protocol with a direction
    given as text works, and a wrong value (a direction that is neither, an action list
    written as one string, an object of another kind) fails that plugin with a sentence
    naming the field, never the host (a text direction used to crash every command) and
    never silently (an object of another kind used to be dropped)."""
    module = _module("wrong", "from mailhost import *\nfrom mailhost import hookimpl\n"
                              f"@hookimpl\ndef {hook}(register):\n    register({registered})\n")
    host = PluginHost(only=[], extra=[("testplugin", testplugin), ("wrong", module)])
    assert host.plugins["wrong"].state == "failed"
    assert expect in (host.plugins["wrong"].error or ""), host.plugins["wrong"].error
    assert host.plugins["testplugin"].state == "enabled" and (Direction.INCOMING, "dir") in host.protocols
    assert not any(p.plugin == "wrong" for p in host.protocols.values())
    with pytest.raises(PluginError, match="plugin wrong"):
        PluginHost(only=[], extra=[("wrong", module)], strict=True)


def test_a_protocol_with_a_text_direction_is_listed(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """`plugins list` works with a plugin whose protocol says direction="incoming" (it took
    every command down with an AttributeError), and the protocol is usable."""
    site = make_dist(tmp_path / "textdir", "mailhost-textdir", {"textdir": "mailhost_textdir"}, {
        "mailhost_textdir": "from mailhost import ProtocolProvider, hookimpl\n"
                            "@hookimpl\ndef register_protocols(register):\n"
                            "    register(ProtocolProvider(name='textdir', direction='incoming', open=print,\n"
                            "                              after_download=('keep',)))\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    assert _plugins(home, env)["textdir"]["protocols"] == ["incoming/textdir"]


def test_a_hook_without_its_marker_fails_the_plugin(home: Path, plugin_env: dict[str, str], tmp_path: Path) -> None:
    """A plugin that defines a hook without @hookimpl is failed with the fix: pluggy
    passes over such a function, and the plugin was listed enabled, providing nothing."""
    site = make_dist(tmp_path / "nomark", "mailhost-nomark", {"nomark": "mailhost_nomark"}, {
        "mailhost_nomark": "from mailhost import AfterDownloadAction\n"
                           "def register_after_download_actions(register):\n"
                           "    register(AfterDownloadAction('nomark', print))\n"})
    env = {**plugin_env, "PYTHONPATH": f"{site}:{plugin_env['PYTHONPATH']}"}
    nomark = _plugins(home, env)["nomark"]
    assert nomark["state"] == "failed"
    assert nomark["error"] == ("defines register_after_download_actions without @mailhost.hookimpl, so mailhost would "
                               "never call it: mark it with @hookimpl (from mailhost import hookimpl)")


def test_a_hook_typo_names_the_hook_meant() -> None:
    """A misspelt hook name is failed with the spelling it was close to."""
    host = PluginHost(only=[], extra=[("typo", _module("typo", _TYPO))])
    assert "(register_protocol: did you mean register_protocols?)" in (host.plugins["typo"].error or "")


def test_plugin_edits_in_a_folder_this_user_cannot_write_are_one_sentence(home: Path,
                                                                           plugin_env: dict[str, str]) -> None:
    """mailhost runs as a service account that may read its config but not write its
    folder: `plugins disable` says which folder to make writable (exit 2), instead of an
    unexpected PermissionError to report, and the config stays as it was."""
    config = home / "mailhost.toml"
    before, files = config.read_text(), sorted(home.iterdir())
    home.chmod(0o555)
    try:
        out = run_cli("plugins", "disable", "testplugin", env=plugin_env, cwd=home, obey_permissions=True)
    finally:
        home.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert f"cannot write the config file {config} (Permission denied)" in out.stderr, out.stderr
    assert "make that folder writable for this user" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert config.read_text() == before and sorted(home.iterdir()) == files
