"""`trackd service install`: the systemd units of this repository, pointed at this installation.

The unit files live once, in the top-level `systemd/` directory; wheels carry a
copy inside the package (see `force-include` in pyproject.toml). Installing
only rewrites `ExecStart=` to this environment's absolute `trackd` path, since
systemd does not search PATH.
"""

from __future__ import annotations

import os
import sysconfig
from importlib.resources import files
from pathlib import Path

_PLACEHOLDER = "ExecStart=/usr/bin/trackd serve"
UNITS = {"user": "trackd.service", "system": "trackd@.service"}


def executable() -> Path:
    """The `trackd` script of the environment this code runs in."""
    return Path(sysconfig.get_path("scripts")) / "trackd"


def _template(name: str) -> str:
    packaged = files("trackd").joinpath("systemd", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "systemd" / name
    return checkout.read_text(encoding="utf-8")


def render(scope: str) -> str:
    text = _template(UNITS[scope])
    return text.replace(_PLACEHOLDER, f"ExecStart={executable()} serve")


def destination(scope: str) -> Path:
    if scope == "user":
        config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
        return Path(config) / "systemd" / "user" / UNITS["user"]
    return Path("/etc/systemd/system") / UNITS["system"]


def install(scope: str) -> Path:
    path = destination(scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(scope), encoding="utf-8")
    return path
