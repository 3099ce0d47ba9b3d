"""Users' names (projects, runs, media keys, artifacts) as paths that stay below a root."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^\w.@+=-]+")


def path_component(name: str) -> str:
    """A path component from a project or run name: no separators, no leading dot."""
    return _UNSAFE.sub("_", name).lstrip(".") or "_"


def relative_path(name: str) -> str:
    """A user's name (a media key, an artifact name) as a relative path that stays below
    its root: "/" kept as directories, each part a `path_component`."""
    return "/".join(path_component(part) for part in name.split("/"))
