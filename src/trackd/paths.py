"""Where trackd keeps its sockets and data.

The client, the daemon and every CLI command must agree on these without
talking to each other, so they all resolve them here, from the same two
settings (`TRACKD_RUNTIME_DIR` / `TRACKD_ENDPOINT`, `TRACKD_DATA_DIR`).
Standard library only: the client imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def runtime_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The 0700 directory holding the ipc:// sockets."""
    if override:
        return Path(override).expanduser()
    if env := os.environ.get("TRACKD_RUNTIME_DIR"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "trackd"
    return Path(f"/tmp/trackd-{os.getuid()}")


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The WAL, spools, cursors and the default JSONL sink live here."""
    if override:
        return Path(override).expanduser()
    if env := os.environ.get("TRACKD_DATA_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "trackd"


def spool_dir(data: Path) -> Path:
    return data / "spool"


@dataclass(frozen=True)
class Endpoints:
    """The daemon's three sockets, as ZeroMQ addresses."""

    ingest: str
    stream: str
    control: str


def endpoints(
    endpoint: str | None = None, runtime: str | os.PathLike[str] | None = None
) -> Endpoints:
    """`tcp://HOST:PORT` puts ingest on PORT, stream on PORT+1, control on PORT+2."""
    endpoint = endpoint or os.environ.get("TRACKD_ENDPOINT") or None
    if endpoint:
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"endpoint: expected tcp://HOST:PORT, got {endpoint!r}")
        host, _, port_text = endpoint[len("tcp://") :].rpartition(":")
        if not host or not port_text.isdigit():
            raise ValueError(f"endpoint: expected tcp://HOST:PORT, got {endpoint!r}")
        port = int(port_text)
        return Endpoints(
            ingest=f"tcp://{host}:{port}",
            stream=f"tcp://{host}:{port + 1}",
            control=f"tcp://{host}:{port + 2}",
        )
    base = runtime_dir(runtime)
    return Endpoints(
        ingest=f"ipc://{base / 'ingest.sock'}",
        stream=f"ipc://{base / 'stream.sock'}",
        control=f"ipc://{base / 'control.sock'}",
    )
