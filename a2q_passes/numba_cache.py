"""Where numba caches the compiled kernels (:mod:`a2q_passes.kernels`, :mod:`a2q_passes.adversarial_kernels`,
:mod:`a2q_passes.certificate.kernels`, :mod:`a2q_passes.sum_kernels`): beside the package (``__pycache__``), or,
where the package is installed read-only, in ``$NUMBA_CACHE_DIR`` if set, else in a folder of this user's in the
temporary directory.

:func:`choose_cache_folder` must run before numba is first imported: numba reads the folder once, at import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def choose_cache_folder() -> None:
    """Set ``NUMBA_CACHE_DIR`` to a writable folder of this user's where the package folder is read-only."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    folder = Path(__file__).parent / "__pycache__"
    existing = folder if folder.exists() else folder.parent  # numba creates __pycache__ if it can
    if not os.access(existing, os.W_OK | os.X_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"a2q-numba-cache-{os.getuid()}")
