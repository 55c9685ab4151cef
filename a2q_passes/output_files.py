"""Files a2q writes: every output path checked before any work, every write atomic (a temporary in the
target folder, then a rename), temporaries of killed runs removed."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from a2q_passes.errors import A2QError




def check_output_paths(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                       inputs: Sequence[str | os.PathLike] = (), in_place: bool = False,
                       in_place_option: str | None = None) -> None:
    """Refuse, before any work is done, every output a later write would fail on.

    ``outputs``: ``(what, path)`` pairs, e.g. ``("OUT.onnx", out)``, ``("--plot", png)``; ``None``
    paths (options not given) are skipped. An output may not be a folder, must have an existing,
    writable parent folder, may not be named twice, and may not be one of ``inputs``. Only the
    first output (the model) may overwrite an input, and only with ``in_place`` (the user gave
    ``in_place_option``, the command's flag that allows it).
    """
    seen: dict[Path, str] = {}
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for index, (what, raw) in enumerate(outputs):
        if raw is None:
            continue
        path = Path(raw)
        if path.is_dir():
            raise A2QError(f"{what} {path}: is a folder; give a file name inside it, e.g. {path / _example_name(what)}")
        check_folder(path, what)
        key = path.resolve()
        if key in seen:
            raise A2QError(f"{what} {path}: the same file is also given as {seen[key]}; choose different paths")
        seen[key] = what
        if key in resolved_inputs and not (in_place and index == 0):
            fix = f"pass {in_place_option} to overwrite the input" if in_place_option and index == 0 else \
                "choose another output"
            raise A2QError(f"{what} {path}: output path equals the input path; {fix}")


def _example_name(what: str) -> str:
    return {"--plot": "plot.png", "--report-json": "report.json"}.get(what, "out.onnx")


def check_folder(path: Path, what: str = "output") -> Path:
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise A2QError(f"{what} {path}: '{directory}' is a file, not a folder; choose an output inside a folder")
    if not directory.is_dir():
        raise A2QError(f"{what} {path}: output folder '{directory}' does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise A2QError(f"{what} {path}: output folder '{directory}' is not writable")
    return directory


# ---------------------------------------------------------------------------------------------
# Atomic writes

# ``.{name}.{pid}.{random}.tmp``: the pid tells a later write whether the writer is still alive.
_TMP_PATTERN = r"\.{name}\.(\d+)\.[^.]+\.tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the target folder, then rename (never a partial ``path``).

    The temporary name carries the writer's pid; temporaries of ``path`` whose writer is dead (a
    run killed with SIGKILL, or a power cut) are removed first. SIGINT/SIGTERM during the write
    unwind through the ``except`` below (the CLI turns SIGTERM into ``SystemExit``).
    """
    path = Path(path)
    if path.is_dir():
        raise A2QError(f"{path}: is a folder; give a file name")
    directory = check_folder(path)
    remove_stale_temporaries(path)
    tmp = write_temporary(path, directory, lambda handle: handle.write(data))
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_temporary(path: Path, directory: Path, write: Callable[[BinaryIO], object]) -> str:
    """Fill a pid-named temporary of ``path`` in ``directory`` with ``write``, synced to disk; returns its name.

    The caller renames it into place; on any error here it is removed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` left by writers that no longer run; returns what was removed."""
    directory = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(_TMP_PATTERN.format(name=re.escape(path.name)))
    removed = []
    for candidate in directory.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match is not None and not pid_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())
