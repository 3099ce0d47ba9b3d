"""Where trackd keeps its sockets and data.

The client, the daemon and every CLI command must agree on these without
talking to each other, so they all resolve them here, from the same two
settings (`TRACKD_RUNTIME_DIR` / `TRACKD_ENDPOINT`, `TRACKD_DATA_DIR`).
The client imports this module, so it uses `os` alone (no pathlib, no
dataclasses: each costs milliseconds of `import trackd`).
"""

from __future__ import annotations

import os


def runtime_dir(override: str | os.PathLike[str] | None = None) -> str:
    """The 0700 directory holding the ipc:// sockets."""
    if override:
        return os.path.expanduser(override)
    if env := os.environ.get("TRACKD_RUNTIME_DIR"):
        return os.path.expanduser(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "trackd")
    return f"/tmp/trackd-{os.getuid()}"


def data_dir(override: str | os.PathLike[str] | None = None) -> str:
    """The WAL, spools, cursors and the default JSONL sink live here."""
    if override:
        return os.path.expanduser(override)
    if env := os.environ.get("TRACKD_DATA_DIR"):
        return os.path.expanduser(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "trackd")


def spool_dir(data: str | os.PathLike[str]) -> str:
    return os.path.join(data, "spool")


class Endpoints:
    """The daemon's three sockets, as ZeroMQ addresses."""

    __slots__ = ("control", "ingest", "stream")

    def __init__(self, ingest: str, stream: str, control: str) -> None:
        self.ingest = ingest
        self.stream = stream
        self.control = control


def endpoints(
    endpoint: str | None = None, runtime: str | os.PathLike[str] | None = None
) -> Endpoints:
    """`tcp://HOST:PORT` puts ingest on PORT, stream on PORT+1, control on PORT+2."""
    endpoint = endpoint or os.environ.get("TRACKD_ENDPOINT") or None
    if endpoint:
        host, _, port_text = endpoint.removeprefix("tcp://").rpartition(":")
        if not endpoint.startswith("tcp://") or not host or not port_text.isdigit():
            raise ValueError(f"endpoint: expected tcp://HOST:PORT, got {endpoint!r}")
        port = int(port_text)
        return Endpoints(
            ingest=f"tcp://{host}:{port}",
            stream=f"tcp://{host}:{port + 1}",
            control=f"tcp://{host}:{port + 2}",
        )
    base = runtime_dir(runtime)
    return Endpoints(
        ingest=f"ipc://{os.path.join(base, 'ingest.sock')}",
        stream=f"ipc://{os.path.join(base, 'stream.sock')}",
        control=f"ipc://{os.path.join(base, 'control.sock')}",
    )
