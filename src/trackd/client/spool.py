"""A client's overflow file: the frames the daemon has not acknowledged yet.

One file per client session, `SPOOL_DIR/<session>.spool`, in the protocol's
record format. The owning process holds an exclusive `flock` on it for as long
as it lives; the daemon ingests only spools it can lock, that is, those whose
writer has finished or died. The file is created under a hidden name, locked,
and only then renamed into place, so the daemon never sees it unlocked while
its writer is still alive.
"""

from __future__ import annotations

import fcntl
import os

from trackd.protocol import HEADER_BYTES, SPOOL_SUFFIX, frame_record


class Spool:
    def __init__(self, directory: str, session: str) -> None:
        # 0700: a spool holds a run's config and metrics, like the daemon's WAL. The data
        # directory above it is the daemon's; created here first, it is made 0700 as well.
        parent = os.path.dirname(os.path.abspath(directory))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{session}{SPOOL_SUFFIX}")
        hidden = os.path.join(directory, f".{session}.tmp")
        self._fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(hidden, self.path)
        self._size = 0

    def append(self, frames: list[bytes]) -> list[int]:
        """Write frames as records; return the offset of each frame's payload."""
        chunks, offsets = [], []
        offset = self._size
        for frame in frames:
            chunks.append(frame_record(frame))
            offsets.append(offset + HEADER_BYTES)
            offset += HEADER_BYTES + len(frame)
        data = memoryview(b"".join(chunks))
        position = self._size
        while data:
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written
        self._size = offset
        return offsets

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def clear(self) -> None:
        """Everything in the file has been acknowledged: start it over."""
        os.ftruncate(self._fd, 0)
        self._size = 0

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        """Make the contents durable and hand the file to the daemon; remove it if empty."""
        if self._size == 0:
            os.unlink(self.path)
        else:
            os.fsync(self._fd)
        os.close(self._fd)

    def detach(self) -> None:
        """In a forked child: let go of the parent's file without touching its lock or contents."""
        os.close(self._fd)

    def __len__(self) -> int:
        return self._size
