"""DESIGN's layering, checked on the source: who may import whom (issue 12 §4)."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

import trackd
from conftest import Daemon

SRC = Path(trackd.__file__).parent


def imported(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_daemon_takes_nothing_from_the_client_package() -> None:
    for path in sorted((SRC / "daemon").glob("*.py")):
        names = imported(path)
        assert "trackd.__version__" not in names, path.name
        assert not {name for name in names if name.startswith("trackd.client")}, path.name


def test_the_run_and_the_registry_do_not_import_each_other() -> None:
    assert not {n for n in imported(SRC / "client" / "run.py") if "registry" in n}
    assert not {n for n in imported(SRC / "client" / "registry.py") if "client.run" in n}


def test_status_reports_the_installed_version(daemon: Daemon) -> None:
    assert daemon.start().status()["version"] == version("trackd")
