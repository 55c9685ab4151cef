"""User data files: the arrays of an ``.npz`` archive (``numpy.savez``), with errors that say what to write instead."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from a2q_passes.errors import A2QError


def read_npz(path: str | Path, expected: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive at ``path``, by name. ``expected`` says what the archive should hold (e.g.
    "an array 'x' of inputs"); it completes the errors for a missing file, a file that is no ``.npz`` archive (a
    single ``.npy`` array, text) and one that cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise A2QError(f"{path}: no such data file (expected an .npz archive with {expected})")
    advice = f"save {expected} with numpy.savez(path, name=array, ...)"
    if not zipfile.is_zipfile(path):
        raise A2QError(f"{path}: not a readable .npz archive (no zip of .npy arrays: a single .npy array or another "
                       f"file); {advice}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise A2QError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err}); {advice}") from err
