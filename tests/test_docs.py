"""The generated CLI reference matches the CLI."""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .helpers import run_cli
from .testplugin import make_dist

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    """docs/cli.md is what docs/cli_reference.py makes of the CLI today."""
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _example_blocks(heading: str) -> list[tuple[str, str]]:
    """The fenced blocks (language, text) of one section of docs/plugin_hooks.md."""
    text = (ROOT / "docs" / "plugin_hooks.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


def test_the_complete_plugin_example_works(home: Path, tmp_path: Path) -> None:
    """The Maildir plugin of docs/plugin_hooks.md, built from the page as a third party
    would, is listed with its option, downloads, leaves out trashed mail until its option
    says otherwise, runs its own action, and is disabled and enabled again, by the page's
    own commands."""
    blocks = _example_blocks("A complete plugin: a Maildir protocol and a flag action")
    site = tmp_path / "site"
    files = {body.split("\n", 1)[0][2:]: body for lang, body in blocks
             if lang in ("python", "ini", "toml") and body.startswith("# ")}
    assert {"pyproject.toml", "setup.cfg", "mailhost_maildir/__init__.py", "mailhost_maildir/session.py"} <= set(files)
    for name in ("mailhost_maildir/__init__.py", "mailhost_maildir/session.py"):
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(files[name])
    setup = configparser.ConfigParser()
    setup.read_string(files["setup.cfg"])
    points = dict(line.split(" = ") for line in setup["options.entry_points"]["mailhost"].split("\n") if line)
    make_dist(site, setup["metadata"]["name"], points, version=setup["metadata"]["version"])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}

    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)

    def deliver(unique: str) -> None:
        (maildir / "new" / unique).write_bytes(f"Subject: {unique}\r\nMessage-ID: <{unique}@x>\r\n\r\nhi\r\n".encode())

    deliver("1700000000.A.host")
    deliver("1700000001.B.host")
    # read and trashed by a mail client: skip_trashed (on by default) leaves it out
    (maildir / "cur" / "1699999999.T.host:2,ST").write_bytes(b"Subject: 1699999999.T.host\r\n\r\ntrash\r\n")
    [commands] = [body for lang, body in blocks if lang == "sh"]
    fetches = 0
    for line in commands.splitlines():
        args = shlex.split(line.split("  #")[0].replace("/var/mail/support/Maildir", str(maildir)))
        if args[0] == "pip":  # installed above
            continue
        assert args[0] == "mailhost", line
        if args[1:3] == ["fetch", "local"] and fetches == 1:
            deliver("1700000002.C.host")
        done = run_cli(*args[1:], env=env, cwd=home)
        assert done.returncode == 0, (line, done.stderr)
        if args[1:3] == ["plugins", "list"]:
            assert re.search(r"maildir +mailhost-maildir +0\.1\.0 +enabled +incoming/maildir, flag", done.stdout)
        if args[1:3] == ["plugins", "options"]:
            assert re.search(r"incoming/maildir +skip_trashed +bool +yes +no +- +- +- +leave out messages", done.stdout)
        if args[1:3] == ["incoming", "show"]:
            assert re.search(r"^options +skip_trashed=no$", done.stdout, flags=re.M), done.stdout
        if args[1:3] == ["fetch", "local"]:
            fetches += 1
            names = sorted(p.name for p in (maildir / "cur").iterdir())
            assert names == (["1699999999.T.host:2,ST", "1700000000.A.host:2,S", "1700000001.B.host:2,S"]
                             if fetches == 1 else
                             ["1699999999.T.host:2,FST", "1700000000.A.host:2,S", "1700000001.B.host:2,S",
                              "1700000002.C.host:2,F"]), names
        if args[1:] == ["plugins", "disable", "maildir"]:
            failed = run_cli("fetch", "local", env=env, cwd=home)
            assert failed.returncode == 1 and "no incoming protocol named 'maildir'" in failed.stderr, failed.stderr
    assert fetches == 2
    queue = json.loads(run_cli("queue", "incoming", "--json", env=env, cwd=home).stdout)
    assert sorted(i["subject"] for i in queue) == ["1699999999.T.host", "1700000000.A.host", "1700000001.B.host",
                                                   "1700000002.C.host"]
    listed = json.loads(run_cli("plugins", "list", "--json", env=env, cwd=home).stdout)
    assert [p["state"] for p in listed if p["name"] == "maildir"] == ["enabled"]


def test_the_protocol_options_example_registers() -> None:
    """The option declarations shown in the register_protocols section register as they are."""
    import types

    from mailhost.plugins import PluginHost
    from mailhost.protocols import Direction

    [example] = [body for lang, body in _example_blocks("register_protocols")
                 if lang == "python" and "ProviderOption(" in body]
    module = types.ModuleType("mailhost_jmap")
    exec(example, module.__dict__)
    host = PluginHost(only=[], extra=[("jmap", module)], strict=True)
    provider = host.protocol(Direction.INCOMING, "jmap")
    assert [o.describe() for o in provider.options] == [
        "account_id (str, required)", "region (str, one of eu/us, default \"eu\")", "batch_size (int, from 1 to 500, default 50)",
        "include_spam (bool, default false)"]


def test_the_plugin_mistakes_fail_as_the_page_says() -> None:
    """Each mistake of "When a plugin is wrong" fails its plugin with the sentence the
    page gives after it (the parts around "..."), strictly too."""
    import types

    import pytest

    from mailhost.errors import PluginError
    from mailhost.plugins import PluginHost

    [example] = [body for lang, body in _example_blocks("When a plugin is wrong") if lang == "python"]
    header, *mistakes = example.split("\n\n\n")
    assert len(mistakes) == 4
    for mistake in mistakes:
        code, _, said = mistake.strip().rpartition("\n# ")
        module = types.ModuleType("mailhost_wrong")
        exec(f"{header}\n{code}\n", module.__dict__)
        host = PluginHost(only=[], extra=[("wrong", module)])
        error = host.plugins["wrong"].error or ""
        assert host.plugins["wrong"].state == "failed" and all(part.strip() in error for part in said.split("...")), (
            said, error)
        with pytest.raises(PluginError, match="plugin wrong"):
            PluginHost(only=[], extra=[("wrong", module)], strict=True)
