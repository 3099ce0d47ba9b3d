"""Asking the daemon something over its control socket (used by the CLI and `resume`)."""

from __future__ import annotations

from typing import Any

import msgpack

from trackd import paths
from trackd.client.curve import prepare


class DaemonUnreachable(RuntimeError):
    """No daemon answered on the control socket in time."""


def request(
    command: str,
    *,
    endpoint: str | None = None,
    runtime_dir: str | None = None,
    timeout: float = 2.0,
    **arguments: Any,
) -> Any:
    import zmq

    address = paths.endpoints(endpoint, runtime_dir).control
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    prepare(socket, address)
    try:
        socket.connect(address)
        socket.send(msgpack.packb({"cmd": command, **arguments}))
        if not socket.poll(int(timeout * 1000)):
            raise DaemonUnreachable(f"no trackd daemon answered at {address}")
        reply = msgpack.unpackb(socket.recv())
    finally:
        socket.close()
    if isinstance(reply, dict) and "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["result"]
