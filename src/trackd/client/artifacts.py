"""The client side of artifacts: a content-addressed store under DATA_DIR/artifacts."""

from __future__ import annotations

import os

CHUNK = 1 << 20


def store_artifact(source: str, data_dir: str) -> tuple[str, str, int]:
    """Put `source` in the store; return (its stored path, its sha256, its size).

    The file is read once, in 1 MiB chunks (never whole: artifacts can be gigabytes),
    to name it by its digest; the same content logged twice is stored once.
    """
    import hashlib

    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    name = digest.hexdigest()
    stored = os.path.join(data_dir, "artifacts", name[:2], name)
    if not os.path.exists(stored):
        os.makedirs(os.path.dirname(stored), exist_ok=True)
        partial = f"{stored}.{os.getpid()}.partial"
        try:
            os.link(source, partial)
        except OSError:  # another filesystem, or links not allowed: stream a copy
            import shutil

            shutil.copyfile(source, partial)
        os.replace(partial, stored)
    return stored, name, size


def store_bytes(data: bytes, data_dir: str) -> tuple[str, str, int]:
    """Put encoded bytes (a PNG, a GIF, a table's JSON) in the same store as `store_artifact`."""
    import hashlib

    name = hashlib.sha256(data).hexdigest()
    stored = os.path.join(data_dir, "artifacts", name[:2], name)
    if not os.path.exists(stored):
        os.makedirs(os.path.dirname(stored), exist_ok=True)
        partial = f"{stored}.{os.getpid()}.partial"
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, stored)
    return stored, name, len(data)
