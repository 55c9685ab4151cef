"""Keep the command line's own output clean: third-party warnings and log records are captured.

qonnx warns through ``warnings`` ("Assuming 4D input is NCHW") and FINN logs through module
loggers that have no handler ("standalone_thresholds are set to False ..."), so Python's
last-resort handler prints both between our tables. While a command runs, both are routed
to the root logger: shown on stderr only with ``--verbose``, appended to ``--log-file`` when
given, dropped otherwise. a2q's own warnings and log records are always shown.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import a2q_passes

_PACKAGE_DIR = str(Path(a2q_passes.__file__).resolve().parent)
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _OwnRecordsOnly(logging.Filter):
    """Passes records logged by a2q_passes, or warnings issued from its source files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "a2q_passes" or record.name.startswith("a2q_passes."):
            return True
        return record.name == "py.warnings" and _PACKAGE_DIR in record.getMessage()


@contextmanager
def captured_third_party_output(verbose: bool = False, log_file: Path | None = None) -> Iterator[None]:
    """Route warnings and log records for the duration of one command; restore everything after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stderr_handler = logging.StreamHandler(sys.stderr)
    stderr_handler.setFormatter(logging.Formatter(_FORMAT))
    if not verbose:
        stderr_handler.addFilter(_OwnRecordsOnly())
    handlers: list[logging.Handler] = [stderr_handler]
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s " + _FORMAT))
        handlers.append(file_handler)
    root.handlers = handlers
    root.setLevel(logging.DEBUG if verbose or log_file is not None else logging.WARNING)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
