"""A short atheris run over the frame decoder (the long one is `make fuzz`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parents[1] / "fuzz" / "decode_frames.py"


def test_frame_decoder_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    """Coverage-guided random frames: only ProtocolError, and round trips hold."""
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "-max_total_time=15",
            "-seed=20261122",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
