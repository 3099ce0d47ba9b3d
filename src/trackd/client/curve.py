"""CURVE on the client side: encrypt to a daemon that listens beyond loopback
(and the one other option a socket to the daemon may need, for an IPv6 address).

A daemon on a non-loopback tcp:// endpoint must have CURVE keys (`trackd keys
generate`); its clients, and the CLI, then need its public key, given as
`TRACKD_CURVE_SERVER_KEY` (the Z85 text `keys generate` prints). Each client
process makes a throwaway keypair of its own: the server key is what proves the
daemon is the right one, and without it the handshake fails and nothing is sent.
"""

from __future__ import annotations

import os

from trackd import paths

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any

ENV = "TRACKD_CURVE_SERVER_KEY"


def prepare(socket: Any, address: str) -> None:
    """Ready `socket` to connect to the daemon at `address`: IPv6 enabled for an IPv6
    one (ZeroMQ refuses `tcp://[::1]:PORT` otherwise), and a CURVE client of the daemon if
    a server key is configured."""
    import zmq

    if paths.uses_ipv6(address):
        socket.setsockopt(zmq.IPV6, 1)
    server_key = os.environ.get(ENV)
    if not server_key:
        return
    public, secret = zmq.curve_keypair()
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
