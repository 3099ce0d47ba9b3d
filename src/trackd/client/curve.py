"""CURVE on the client side: encrypt to a daemon that listens beyond loopback.

A daemon on a non-loopback tcp:// endpoint must have CURVE keys (`trackd keys
generate`); its clients, and the CLI, then need its public key, given as
`TRACKD_CURVE_SERVER_KEY` (the Z85 text `keys generate` prints). Each client
process makes a throwaway keypair of its own: the server key is what proves the
daemon is the right one, and without it the handshake fails and nothing is sent.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any

ENV = "TRACKD_CURVE_SERVER_KEY"


def secure(socket: Any) -> None:
    """Make `socket` a CURVE client of the daemon if a server key is configured."""
    server_key = os.environ.get(ENV)
    if not server_key:
        return
    import zmq

    public, secret = zmq.curve_keypair()
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
