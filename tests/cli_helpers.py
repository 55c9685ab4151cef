"""Run the ``a2q`` command line in a subprocess, as a user would."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def run_a2q(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "a2q_passes", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
