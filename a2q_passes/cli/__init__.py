"""The ``a2q`` command line: ONNX in, ONNX (or a report) out. Each command only composes passes.

Exit codes: 0 success; 1 bad input (message names the file/node and the fix); 2 usage error;
3 finished, but some layer could not be handled or a check failed (report still printed);
4 internal check failed (a bug: nothing was written).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from a2q_passes.errors import A2QError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Accumulator-aware quantization passes over QONNX, FINN-ONNX and QDQ ONNX models."""

# Importing a command module registers its command on ``app``.
from a2q_passes.cli import allocate, analyze, annotate, finetune, lower, project, verify  # noqa: E402,F401


def main() -> None:
    try:
        app()  # standalone mode: click reports usage errors itself (exit 2)
    except A2QError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
