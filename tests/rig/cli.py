"""``python -m filter …`` as an admin runs it: a subprocess in the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one mailgate command; its exit status, stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "filter", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
