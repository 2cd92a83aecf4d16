"""The installed package works from any directory, not only from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_generated_protos_import_outside_the_repository(tmp_path: Path) -> None:
    # The editable install maps packages found when it ran; the generated `healthplane.v1`
    # must have been among them, or `healthplane prober` fails everywhere but the repo root.
    done = subprocess.run(
        [sys.executable, "-c", "import healthplane.v1.prober_pb2_grpc, prober.link; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
