"""A private PostgreSQL server for tests and benchmarks: MLflow's recommended shared backend.

    with Postgres() as server:
        uri = server.create_database("mlflow")  # postgresql+psycopg2://trackd@127.0.0.1:PORT/mlflow

Debian's `postgresql` package puts `initdb`, `postgres` and `pg_ctl` under
/usr/lib/postgresql/VERSION/bin, off the PATH; `.ci/run` installs the package
where they are missing. PostgreSQL refuses to run as root, so under root the
cluster belongs to `nobody`; its data directory and its unix socket live in a
private temporary directory (made under /tmp, which `nobody` can traverse, unlike
pytest's 0700 tmp dirs), it listens on a free port of 127.0.0.1 only, and trusts
every local connection: nothing else can reach it. The postmaster is started
here, so its PID is ours: `stop()` asks `pg_ctl stop` on its own data directory
for a fast shutdown, kills that PID if it does not go, and removes the directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

USER = "trackd"  # the database superuser made by initdb (not an OS account)
UNPRIVILEGED = "nobody"  # the OS account the cluster runs as when this process is root
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def postgres_bin() -> Path | None:
    """The directory holding `initdb`, `postgres` and `pg_ctl`: the PATH's, else Debian's
    newest /usr/lib/postgresql/VERSION/bin; None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).parent] if found else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda path: _version(path.parent.name), reverse=True)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
            return directory
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Postgres:
    """One PostgreSQL cluster in a temporary directory, started and stopped by PID."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = settings or {}  # `postgres -c NAME=VALUE`, e.g. max_connections
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.root: Path | None = None
        self._bin: Path | None = None
        self._account: dict[str, Any] = {}

    def start(self) -> Postgres:
        self._bin = postgres_bin()
        if self._bin is None:
            raise RuntimeError(
                "PostgreSQL is not installed (no initdb/pg_ctl on the PATH or under"
                " /usr/lib/postgresql/*/bin): apt-get install -y postgresql"
            )
        self.root = Path(tempfile.mkdtemp(prefix="trackd-postgres-", dir="/tmp"))
        if os.geteuid() == 0:  # postgres will not run as root
            account = pwd.getpwnam(UNPRIVILEGED)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._account = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        data = self.root / "data"
        self._run(
            "initdb", "--pgdata", str(data), "--username", USER, "--auth", "trust",
            "--encoding", "UTF8", "--no-sync",
        )  # fmt: skip
        log = (self.root / "postgres.log").open("ab")
        options = [
            *("-D", str(data), "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root)),
            *(item for name, value in self.settings.items() for item in ("-c", f"{name}={value}")),
        ]
        with log:
            self.process = subprocess.Popen(
                [str(self._bin / "postgres"), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                **self._account,
            )
        self._wait_ready()
        return self

    def create_database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URI (what `mlflow server
        --backend-store-uri` takes), naming the psycopg2 driver (the `test` extra's
        psycopg2-binary): SQLAlchemy 2.1 would pick psycopg 3 for a bare `postgresql://`."""
        if not _NAME.match(name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        self._sql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Fast shutdown through `pg_ctl stop` on this cluster's data directory (which
        signals the PID started here); SIGKILL of that PID if it is still there; the
        directory removed."""
        if self.process is not None and self.process.poll() is None:
            assert self.root is not None
            with_pg_ctl = ("stop", "--pgdata", str(self.root / "data"), "--mode", "fast")
            try:
                self._run("pg_ctl", *with_pg_ctl, "--wait", "--timeout", "30")
                self.process.wait(10)
            except (subprocess.SubprocessError, OSError):
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _sql(self, statement: str) -> None:
        """One statement through `psql` on the unix socket (no driver needed here)."""
        assert self.root is not None
        self._run(
            "psql", "--host", str(self.root), "--port", str(self.port), "--username", USER,
            "--dbname", "postgres", "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1",
            "--command", statement,
        )  # fmt: skip

    def _wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self._log()}")
            ready = subprocess.run(
                [self._tool("pg_isready"), "--host", "127.0.0.1", "--port", str(self.port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout}s:\n{self._log()}")
            time.sleep(0.1)

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [self._tool(tool), *args], capture_output=True, cwd=self.root, check=False,
            timeout=120, **self._account,
        )  # fmt: skip
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"{tool} {' '.join(args[:2])} failed:\n{output[-3000:]}")

    def _tool(self, name: str) -> str:
        assert self._bin is not None
        return str(self._bin / name if (self._bin / name).is_file() else name)

    def _log(self) -> str:
        assert self.root is not None
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
