"""Run the ``a2q`` command line as a user would: in a subprocess, or in-process through its entry point."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path


def run_a2q(*args: str | Path) -> subprocess.CompletedProcess:
    """``a2q ARGS`` through the console script's entry point in this process, as :func:`run_cli`, returned as a
    finished process: the CLI's imports (FINN's builder, about 5 s) load once per test worker, not once per command.
    :func:`run_a2q_process` where a test needs the command's own process (what it prints at import, its signals)."""
    code, out, err = run_cli(*args)
    return subprocess.CompletedProcess(["a2q", *map(str, args)], code, out, err)


def run_a2q_process(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m a2q_passes ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "a2q_passes", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """``a2q ARGS`` in this process through ``a2q_passes.cli.main`` (the console script): (exit code, stdout, stderr)."""
    from a2q_passes.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["a2q", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
