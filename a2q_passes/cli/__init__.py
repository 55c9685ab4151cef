"""The `a2q` command line: ONNX in, ONNX (or a report) out. Each command only composes passes.

Exit codes: 0 success; 1 bad input (message names the file/node and the fix); 2 usage error;
3 finished, but some layer could not be handled or a check failed (report still printed);
4 internal check failed, or an unexpected internal error (a bug: no partial file is left).

Every output path is checked before any work; files are written atomically (a temporary in the
target folder, renamed), and the temporaries of runs killed with SIGKILL are removed by the next
write of the same output.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from a2q_passes import __version__, progress
from a2q_passes.cli.examples import finish_help, help_paragraphs
from a2q_passes.cli.third_party_output import captured_third_party_output
from a2q_passes.errors import A2QError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=help_paragraphs(__doc__),
                  pretty_exceptions_enable=False)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"a2q-passes {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the a2q-passes version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also show qonnx/FINN warnings and log messages (hidden by default)."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", dir_okay=False,
                                            help="Append qonnx/FINN warnings and log messages to this file."),
) -> None:
    """Accumulator-aware quantization passes over QONNX, FINN-ONNX and QDQ ONNX models.

    Put global options before the command, e.g. `a2q --verbose lower IN.onnx OUT.onnx`.
    """
    try:
        ctx.with_resource(captured_third_party_output(verbose, log_file))
    except OSError as err:
        raise A2QError(f"--log-file {log_file}: cannot open it for appending ({err.strerror}); "
                       "give a path in an existing, writable folder") from err
    # imported here, when a command runs: --version and --help need no model reader (onnx, qonnx)
    from a2q_passes.tensor_store import scratch_space

    ctx.with_resource(scratch_space())  # tensors the command spills to disk go when it ends, however it ends
    ctx.with_resource(progress.shown())  # per-layer bars on large models, where stderr is a terminal

# Importing a command module registers its command on ``app``.
from a2q_passes.cli import allocate, analyze, annotate, finetune, lower, project, verify  # noqa: E402,F401

finish_help(app)


TRACEBACK_ENV = "A2Q_TRACEBACK"  # set to 1 to see the Python traceback of an internal error


def _terminate(signum: int, _frame) -> None:
    # SystemExit unwinds like an exception, so an atomic write in progress removes its temporary
    # file and spilled tensors are removed (SIGINT already arrives as KeyboardInterrupt; click
    # reports it as "Aborted!").
    raise SystemExit(128 + signum)


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal running the command closed
        signal.signal(signum, _terminate)
    try:
        app()  # standalone mode: click reports usage errors itself (exit 2)
    except A2QError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except Exception as err:  # a bug: say where, without a traceback unless asked for
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        frame = traceback.extract_tb(err.__traceback__)[-1]
        err_console.print(f"[bold red]internal error[/] (a bug in a2q; please report it): {type(err).__name__}: {err} "
                          f"at {Path(frame.filename).name}:{frame.lineno}. No partial file was left. Set "
                          f"{TRACEBACK_ENV}=1 for the traceback.", highlight=False, soft_wrap=True)
        sys.exit(4)
