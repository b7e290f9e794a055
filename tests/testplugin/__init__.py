"""The in-tree test plugin and a way to install fake distributions for tests.

:func:`make_dist` writes a distribution's metadata (``*.dist-info`` with entry points)
and modules into a folder; putting that folder on ``sys.path`` (or ``PYTHONPATH`` for a
subprocess) makes the plugin discoverable exactly as an installed one is.
"""
from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).parent


def make_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None,
              version: str = "0.1.0") -> Path:
    """Create distribution ``dist`` under ``root`` with ``mailhost`` entry points and modules."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mailhost]\n{eps}\n")
    (info / "top_level.txt").write_text("\n".join(t.split(":")[0].split(".")[0] for t in entry_points.values()) + "\n")
    (info / "RECORD").write_text("")
    for name, source in (modules or {}).items():
        (root / f"{name}.py").write_text(source)
    return root


def install_testplugin(root: Path) -> Path:
    """The in-tree test plugin as distribution ``mailhost-testplugin`` (entry point ``testplugin``)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "mailhost_testplugin.py", root / "mailhost_testplugin.py")
    return make_dist(root, "mailhost-testplugin", {"testplugin": "mailhost_testplugin"})
