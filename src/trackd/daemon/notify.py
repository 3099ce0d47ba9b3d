"""The systemd notify protocol, spoken directly (no libsystemd, no extra dependency).

Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a datagram socket path, or
an abstract one starting with "@") and, with `WatchdogSec=`, `WATCHDOG_USEC`.
The daemon sends READY=1 once its sockets are bound and the WAL recovered,
WATCHDOG=1 at half the watchdog interval, STATUS= lines with the ingest rate
and the worst sink lag, and STOPPING=1 when it begins to shut down. Outside
systemd every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds: float | None = int(usec) / 1e6 if watched else None
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        # systemd going away (or never listening) must not stop the daemon
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(fields).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self, status: str) -> None:
        self.send("WATCHDOG=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining sinks")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
