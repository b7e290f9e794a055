"""The distributions as users get them: every sdist and wheel built from the checkout the
way ``python -m build`` does (the sdist first, the wheel from it), and installed."""
from __future__ import annotations

import email
import email.message
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: distribution -> (its folder, its import package, the folder that package is kept in)
DISTRIBUTIONS: dict[str, tuple[Path, str, Path]] = {
    "mailhost": (ROOT, "mailhost", ROOT / "host"),
    **{
        f"mailhost-{cfg.parent.name}": (cfg.parent, f"mailhost_{cfg.parent.name}", cfg.parent / f"mailhost_{cfg.parent.name}")
        for cfg in sorted((ROOT / "plugins").glob("*/setup.cfg"))
    },
}

#: The builds run in a copy of the checkout (:func:`built`); these tests still share one
#: pytest-xdist worker, which builds once for all of them.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("packaging")]


@dataclass
class Built:
    """One distribution's sdist and wheel, and what building them printed."""

    sdist: Path
    wheel: Path
    output: str

    def sdist_names(self) -> list[str]:
        """The sdist's members, without its top folder (``mailhost-0.1.0/``)."""
        with tarfile.open(self.sdist) as tar:
            return [m.name.partition("/")[2] for m in tar.getmembers() if m.isfile()]

    def wheel_names(self) -> list[str]:
        """The wheel's members."""
        with zipfile.ZipFile(self.wheel) as whl:
            return whl.namelist()

    def wheel_text(self, suffix: str) -> str:
        """The text of the one wheel member whose name ends with ``suffix``."""
        with zipfile.ZipFile(self.wheel) as whl:
            (name,) = [n for n in whl.namelist() if n.endswith(suffix)]
            return whl.read(name).decode()

    def metadata(self) -> email.message.Message:
        """The wheel's core metadata."""
        return email.message_from_string(self.wheel_text(".dist-info/METADATA"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Every distribution, built with this venv's setuptools (no isolation: no download).

    From a copy of the checkout: setuptools writes ``*.egg-info`` and its release tree
    (``mailhost-0.1.0/``) into the folder it builds, and a build in the checkout itself
    met another process there once in a CI run (its release tree lost a file mid-build)."""
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]", "out"))
    result: dict[str, Built] = {}
    for name, (folder, _, _) in DISTRIBUTIONS.items():
        done = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out / name),
             str(source / folder.relative_to(ROOT))],
            capture_output=True, text=True, check=False, timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (sdist,) = (out / name).glob("*.tar.gz")
        (wheel,) = (out / name).glob("*.whl")
        result[name] = Built(sdist, wheel, done.stdout + done.stderr)
    return result


def _shipped_sources(package_dir: Path) -> set[str]:
    """Every file of a package folder that belongs in the wheel, relative to it."""
    return {
        p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_wheels_hold_every_file_of_their_package(built: dict[str, Built]) -> None:
    """Each wheel holds its package folder whole: the host's migrations (env.py,
    script.py.mako, every version), web templates and py.typed, and each plugin's files."""
    for name, (_, package, package_dir) in DISTRIBUTIONS.items():
        in_wheel = {n.partition("/")[2] for n in built[name].wheel_names() if n.startswith(f"{package}/")}
        assert in_wheel == _shipped_sources(package_dir), name
    host = set(built["mailhost"].wheel_names())
    assert {"mailhost/migrations/env.py", "mailhost/migrations/script.py.mako",
            "mailhost/templates/base.html", "mailhost/py.typed"} <= host
    versions = {f"mailhost/migrations/versions/{p.name}" for p in (ROOT / "host/migrations/versions").glob("*.py")}
    assert versions and versions <= host


def test_every_package_is_marked_typed(built: dict[str, Built]) -> None:
    """The host and every plugin ship py.typed: their annotations reach type checkers."""
    for name, (_, package, _) in DISTRIBUTIONS.items():
        assert f"{package}/py.typed" in built[name].wheel_names(), name


def test_sdists_ship_no_tests_or_local_state(built: dict[str, Built]) -> None:
    """An sdist holds the sources and metadata, never tests, benchmarks, bytecode, a
    venv, a store, a key or a config."""
    for name, dist in built.items():
        names = dist.sdist_names()
        assert {"PKG-INFO", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"} <= set(names), name
        stray = [n for n in names if n.split("/")[0] in ("tests", "bench", "docs", ".venv", ".ci")
                 or "__pycache__" in n or n.endswith((".pyc", ".db", ".key", ".toml.bak"))
                 or n.endswith("mailhost.toml")]
        assert stray == [], name


def test_every_distribution_ships_the_license(built: dict[str, Built]) -> None:
    """Each sdist and wheel carries the MIT license text (a plugin's folder holds a copy
    of the repository's LICENSE: setuptools takes no file from outside the project), and
    the wheel's metadata names it."""
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the mailhost authors" in text
    for name, dist in built.items():
        assert "LICENSE" in dist.sdist_names(), name
        assert dist.wheel_text(".dist-info/licenses/LICENSE") == text, name
        assert dist.metadata().get_all("License-File") == ["LICENSE"], name


def test_build_warns_nothing(built: dict[str, Built]) -> None:
    """setuptools has nothing to warn about in any setup.cfg."""
    for name, dist in built.items():
        warnings = [line for line in dist.output.splitlines() if "WARNING" in line or "Warning:" in line]
        assert warnings == [], (name, warnings)


def test_metadata(built: dict[str, Built]) -> None:
    """Names, one version, Python 3.11+, the MIT license, the README as Markdown, and the
    entry points: the ``mailhost`` command, and one ``mailhost`` entry point per plugin."""
    version = built["mailhost"].metadata()["Version"]
    for name, (_, package, _) in DISTRIBUTIONS.items():
        meta = built[name].metadata()
        assert (meta["Name"], meta["Version"], meta["Requires-Python"]) == (name, version, ">=3.11")
        assert meta["License"] == "MIT" and meta["Description-Content-Type"] == "text/markdown"
        assert meta.get_payload().startswith(f"# {name}")
        entry_points = built[name].wheel_text(".dist-info/entry_points.txt")
        if name == "mailhost":
            assert "[console_scripts]\nmailhost = mailhost.cli:main" in entry_points
        else:
            assert f"[mailhost]\n{package.removeprefix('mailhost_')} = {package}" in entry_points
            assert "mailhost>=0.1" in meta.get_all("Requires-Dist"), name


# A Markdown link's target, inline (``[text](target)``) or a reference (``[label]: target``).
_LINK_TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def test_long_descriptions_have_no_relative_links(built: dict[str, Built]) -> None:
    """Each README is its distribution's page on PyPI, which has no repository to resolve
    ``docs/cli.md`` or ``../../README.md`` against: every link is absolute (or an anchor)."""
    for name, dist in built.items():
        targets = [a or b for a, b in _LINK_TARGET.findall(dist.metadata().get_payload())]
        relative = [t for t in targets if not t.startswith(("https://", "http://", "mailto:", "#"))]
        assert relative == [], (name, relative)


def _venv_with(tmp_path: Path, wheels: list[Path]) -> Path:
    """A fresh venv holding ``wheels`` (installed by pip, not editable) and, for the
    third-party dependencies, this venv's, without any of its mailhost distributions."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-index", *map(str, wheels)], check=True, capture_output=True)
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("mailhost", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(f"{deps}\n")
    return venv


def test_host_with_one_plugin_names_what_to_install(built: dict[str, Built], tmp_path: Path) -> None:
    """Installed with only mailhost-imap, the host runs from the wheels and, asked for
    another protocol, says it is not installed and which distribution brings it."""
    venv = _venv_with(tmp_path, [built["mailhost"].wheel, built["mailhost-imap"].wheel])
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILHOST_", "PYTHONPATH"))}
    env["PW"] = "secret"

    def mailhost(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "mailhost"), *args], capture_output=True, text=True,
                              cwd=home, env=env, check=False, timeout=120)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mailhost; print(mailhost.__file__)"],
                           capture_output=True, text=True, cwd=home, env=env, check=True).stdout
    assert where.startswith(str(venv)), where
    assert mailhost("init").returncode == 0  # runs the migrations shipped in the wheel
    listed = mailhost("plugins", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"name": "imap"' in listed.stdout and '"pop3"' not in listed.stdout
    ok = mailhost("incoming", "add", "desk", "--protocol", "imap", "--host", "imap.example.org",
                  "--username", "u", "--password-env", "PW")
    assert ok.returncode == 0, ok.stderr
    for direction, protocol, dist in (("incoming", "pop3", "mailhost-pop3"), ("incoming", "graph", "mailhost-graph"),
                                      ("outgoing", "smtp", "mailhost-smtp")):
        refused = mailhost(direction, "add", "x", "--protocol", protocol, "--host", "h.example.org")
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert f"no {direction} protocol named '{protocol}' is installed" in refused.stderr
        assert f"pip install {dist}" in refused.stderr and "mailhost-imap" not in refused.stderr
        assert "Traceback" not in refused.stderr
