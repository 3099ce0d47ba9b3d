"""A real `mlflow server` for tests: sqlite store (or a PostgreSQL database and N workers),
loopback, started and SIGKILLed by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import free_port, wait_for


class MlflowServer:
    """`mlflow server` with an sqlite store, or `backend_store_uri` (e.g. a database of
    helpers/postgres.py) and `workers` uvicorn workers; started, SIGKILLed and restarted by
    PID."""

    def __init__(self, root: Path, backend_store_uri: str | None = None, workers: int = 1) -> None:
        self.root = root
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.workers = workers
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "server.log"

    def start(self) -> None:
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--workers", str(self.workers)),
            *("--backend-store-uri", self.backend_store_uri),
            *("--artifacts-destination", str(self.root / "artifacts")),
        ]
        # the job runner would start a dozen huey consumers nothing here needs
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._answers, timeout=120, interval=0.2)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def kill(self) -> None:
        """SIGKILL the server and its worker: the process group of the PID started here."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
