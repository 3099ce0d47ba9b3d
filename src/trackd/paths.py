"""Where trackd keeps its sockets and data.

The client, the daemon and every CLI command must agree on these without
talking to each other, so they all resolve them here, from the same two
settings (`TRACKD_RUNTIME_DIR` / `TRACKD_ENDPOINT`, `TRACKD_DATA_DIR`): a
flag or argument, else the environment, else the default config file (the
daemon's own, `$XDG_CONFIG_HOME/trackd/config.toml`, so that a client finds
a daemon configured there), else the platform's default. The client imports
this module, so it uses `os` alone (no pathlib, no dataclasses: each costs
milliseconds of `import trackd`), and `tomllib` only once a file is there.
"""

from __future__ import annotations

import os


def config_file() -> str:
    """The default config file: the daemon's when `trackd serve` is given no `--config`."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "trackd", "config.toml")


def _configured(key: str) -> str | None:
    """`key` in the default config file, if it is there and says so."""
    try:
        with open(config_file(), "rb") as handle:
            import tomllib

            value = tomllib.load(handle).get(key)
    except (OSError, ValueError):  # no file, or not TOML: the daemon says so when it reads it
        return None
    return value if isinstance(value, str) and value else None


def runtime_dir(override: str | os.PathLike[str] | None = None, *, from_file: bool = True) -> str:
    """The 0700 directory holding the ipc:// sockets."""
    if override:
        return os.path.expanduser(override)
    if env := os.environ.get("TRACKD_RUNTIME_DIR"):
        return os.path.expanduser(env)
    if from_file and (configured := _configured("runtime_dir")):
        return os.path.expanduser(configured)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "trackd")
    return f"/tmp/trackd-{os.getuid()}"


def data_dir(override: str | os.PathLike[str] | None = None, *, from_file: bool = True) -> str:
    """The WAL, spools, cursors and the default JSONL sink live here."""
    if override:
        return os.path.expanduser(override)
    if env := os.environ.get("TRACKD_DATA_DIR"):
        return os.path.expanduser(env)
    if from_file and (configured := _configured("data_dir")):
        return os.path.expanduser(configured)
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "trackd")


def spool_dir(data: str | os.PathLike[str]) -> str:
    return os.path.join(data, "spool")


def uses_ipv6(address: str) -> bool:
    """Whether a socket for `address` needs ZeroMQ's IPv6 option: for `tcp://[HOST]:PORT`
    alone, a literal IPv6 address, so that a name such as localhost resolves as it always
    has, to the same address for the daemon and its clients."""
    return address.startswith("tcp://[")


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
    """`tcp://HOST:PORT` puts ingest on PORT, stream on PORT+1, control on PORT+2. The
    config file's endpoint counts only where neither setting was given otherwise."""
    endpoint = endpoint or os.environ.get("TRACKD_ENDPOINT") or None
    if not endpoint and not runtime and not os.environ.get("TRACKD_RUNTIME_DIR"):
        endpoint = _configured("endpoint")
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
