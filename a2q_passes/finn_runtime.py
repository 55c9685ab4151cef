"""Using finn-plus 1.6.1 as a library, outside its ``finn`` launcher, without Vivado.

finn-plus expects to be started through ``run_finn.py`` (``finn build ...``), which sets up
global settings, a build directory and the Vivado simulation interface before any FINN
module is used. Three things break when FINN is imported from plain Python instead:

1. ``finn.util.settings.get_settings()`` raises unless settings were initialised;
   ``initialize_dummy_settings()`` is FINN's own entry point for this case. It resolves the
   build directory relative to the *current working directory* unless ``FINN_BUILD_DIR`` is
   set, so we point that at a temporary folder first (never litter the caller's cwd).
2. ``finn.builder.build_dataflow_steps`` runs ``from finn.xsi import SimEngine`` at import.
   ``finn.xsi`` binds ``SimEngine`` lazily: its module ``__getattr__`` calls
   ``ensure_available()``, which reads ``XILINX_VIVADO`` and raises ``OSError`` when it is
   unset. The builder only uses ``SimEngine`` in a type annotation (the rtlsim pre-hook of
   ``verify_step``), so binding a placeholder class as a plain module attribute satisfies
   the import; ``__getattr__`` is then never consulted for that name. The placeholder
   raises on use, so an RTL simulation request fails loudly instead of silently.
   With ``XILINX_VIVADO`` set we leave FINN's own loader alone.
3. ``simulation_build`` (imported by the builder) needs ``psutil``; checked up front for a
   clear message.

Everything here is idempotent and happens inside the project, never in user code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import pkgutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a2q_passes.errors import A2QError

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

_READY = False

# FINN's own estimate-only step list (finn.builder.build_dataflow_config.estimate_only_dataflow_steps).
ESTIMATE_REPORT_FILES = (
    "estimate_layer_resources.json",
    "estimate_network_performance.json",
    "op_and_param_counts.json",
    "estimate_layer_cycles.json",
)


class FinnUnavailableError(A2QError):
    """FINN cannot be used in this environment (missing package or dependency)."""


class FinnBuildError(A2QError):
    """A FINN dataflow build did not complete the requested steps."""


class _SimEngineUnavailable:
    """Stands in for ``finn_xsi.sim_engine.SimEngine`` when Vivado is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise FinnUnavailableError(
            "RTL simulation (finn.xsi.SimEngine) needs Vivado (XILINX_VIVADO) and the finn_xsi "
            "extension; a2q-passes only uses FINN's numpy execution and analytical estimates."
        )


def ensure_finn_importable() -> None:
    """Make ``finn`` (including ``finn.builder``) importable and usable; safe to call repeatedly."""
    global _READY
    if _READY:
        return
    for package in ("finn", "psutil"):
        if importlib.util.find_spec(package) is None:
            raise FinnUnavailableError(
                f"python package {package!r} is missing; run `make setup` "
                "(finn-plus==1.6.1 is installed with --no-deps, its runtime deps from requirements.txt)"
            )

    import finn.xsi
    import finn.util.settings as finn_settings

    if finn_settings._SETTINGS is None:  # noqa: SLF001 - FINN exposes no public "is initialised" check
        build_dir = Path(os.environ.setdefault("FINN_BUILD_DIR", str(Path(tempfile.gettempdir()) / "a2q_finn_build")))
        build_dir.mkdir(parents=True, exist_ok=True)
        finn_settings.initialize_dummy_settings()

    if "SimEngine" not in vars(finn.xsi) and not os.environ.get("XILINX_VIVADO"):
        finn.xsi.SimEngine = _SimEngineUnavailable  # type: ignore[attr-defined]
    _READY = True


@functools.cache
def register_finn_hw_ops() -> None:
    """Import every module of FINN's HW layer package. finn-plus registers some layers (its ``Reshape``,
    ``Squeeze``, ``Split``, ...) only when their module is imported (``register_custom_op``), which its own
    transformations do before writing them; a graph holding them is executable only after that."""
    ensure_finn_importable()
    import finn.custom_op.fpgadataflow as hw

    for module in pkgutil.iter_modules(hw.__path__):
        if not module.ispkg:  # hls/ and rtl/ hold the specialised variants, registered by the package itself
            try:
                importlib.import_module(f"{hw.__name__}.{module.name}")
            except ImportError:  # a layer needing an optional dependency: not registered, as in FINN without it
                continue


def as_generic_hw_layers(model: ModelWrapper) -> ModelWrapper:
    """A copy of ``model`` in which each of FINN's specialised HW layers (domain ``...fpgadataflow.hls`` or ``.rtl``,
    op ``X_hls``/``X_rtl``) is the HW layer ``X`` it was specialised from, with the same inputs and attributes.

    Why: FINN's ``SpecializeLayers`` only picks an implementation; the HLS/RTL classes subclass the HW layer and
    compute what it computes, but execute only in cppsim/rtlsim (Vivado), while the HW layer executes in Python.
    Used to execute (scoring, ``verify --data``): no width and no guarantee is read from the outputs. A layer whose
    HW layer FINN does not register is left as it is."""
    from finn.custom_op.fpgadataflow import custom_op as hw_layers
    from qonnx.core.modelwrapper import ModelWrapper

    from a2q_passes.finn_accumulators import HW_DOMAIN_PREFIX

    register_finn_hw_ops()
    generic_model = ModelWrapper(model.model.SerializeToString())
    for node in generic_model.graph.node:
        for backend in ("hls", "rtl"):
            generic = node.op_type[:-len(backend) - 1]
            if (node.domain == f"{HW_DOMAIN_PREFIX}.{backend}" and node.op_type.endswith(f"_{backend}")
                    and generic in hw_layers):
                node.domain, node.op_type = HW_DOMAIN_PREFIX, generic
    return generic_model


def _written_since(path: Path, started: float) -> bool:
    # 1 s of slack for file systems with coarse timestamps
    return path.is_file() and path.stat().st_mtime >= started - 1.0


def _first_error(log_path: Path, exc: BaseException | None) -> str:
    """FINN's own error line from the build log (FINN logs, then returns -1), else the exception."""
    if log_path.is_file():
        for line in log_path.read_text(errors="replace").splitlines():
            if "ERROR:" in line:
                return line.split("ERROR:", 1)[1].strip()
    return repr(exc) if exc is not None else "no error recorded"


def known_fpga_parts() -> dict[str, str]:
    """Board name -> FPGA part, from FINN's part maps (``finn.util.basic.part_map``)."""
    ensure_finn_importable()
    from finn.util.basic import part_map

    return dict(part_map)


def validate_fpgapart(fpgapart: str) -> str:
    """The FPGA part for ``fpgapart`` (a part FINN knows, or a board name from its part map)."""
    parts = known_fpga_parts()
    if fpgapart in parts.values():
        return fpgapart
    if fpgapart in parts:
        return parts[fpgapart]
    examples = ", ".join(f"{part} ({board})" for board, part in list(parts.items())[:6])
    raise A2QError(
        f"unknown FPGA part {fpgapart!r}. Use a part FINN knows, e.g. {examples}, "
        f"or a board name: {', '.join(parts)}")


@dataclass
class EstimateBuildResult:
    """Outcome of :func:`run_estimate_build`."""

    output_dir: Path
    steps_completed: list[str]
    reports: dict[str, Any] = field(default_factory=dict)
    final_model: Path | None = None


def estimate_only_steps() -> list[str]:
    """FINN's own estimate-only step list (ends with ``step_generate_estimate_reports``)."""
    ensure_finn_importable()
    from finn.builder.build_dataflow_config import estimate_only_dataflow_steps

    return list(estimate_only_dataflow_steps)


def run_estimate_build(
    model_path: str | Path,
    output_dir: str | Path,
    fpgapart: str,
    target_fps: int | None = None,
    steps: Sequence[str | Callable] | None = None,
    synth_clk_period_ns: float = 10.0,
) -> EstimateBuildResult:
    """Run FINN's real ``build_dataflow_cfg`` with an estimate-only step list and check its outputs.

    How the return code is handled: FINN ends every build with ``exit_buildflow``, which writes
    ``metadata_builder.json`` using ``get_vivado_root()``. Without ``XILINX_VIVADO`` that call
    raises ``Exception("Environment variable XILINX_VIVADO must be set ...")``: after a
    successful build it does so *after* every step has run and every report is on disk (the
    call sits outside FINN's try block, seen with finn-plus 1.6.1); after a failed step FINN's
    handler logs the error and calls it with ``-1``, which raises the same way (under pytest
    FINN re-raises the step's own exception instead). With Vivado installed FINN would return
    0 or -1. Neither the return code nor that exception says whether our steps ran, so we judge
    the build by what it produced in this call: every requested step must have written its
    intermediate model (``save_intermediate_models=True``, files newer than the start of the
    call) and every estimate report must exist and parse. Anything missing raises
    :class:`FinnBuildError` naming the step and FINN's logged error.
    FINN also redirects ``sys.stdout``/``sys.stderr``, the root logger and warnings
    (``logging.captureWarnings``) for the build; we restore them afterwards so the caller's
    process is left as it was.
    """
    ensure_finn_importable()
    from finn.builder.build_dataflow import build_dataflow_cfg
    from finn.builder.build_dataflow_config import DataflowBuildConfig, DataflowOutputType

    steps = list(steps) if steps is not None else estimate_only_steps()
    # FINN names each intermediate model after the step function (a name, or a callable's __name__)
    step_names = [step if isinstance(step, str) else step.__name__ for step in steps]
    output_dir = Path(output_dir)
    cfg = DataflowBuildConfig(
        output_dir=str(output_dir),
        fpga_part=validate_fpgapart(fpgapart),
        synth_clk_period_ns=synth_clk_period_ns,
        target_fps=target_fps,
        steps=steps,
        generate_outputs=[DataflowOutputType.ESTIMATE_REPORTS],
        save_intermediate_models=True,
    )
    saved_streams, saved_showwarning = (sys.stdout, sys.stderr), warnings.showwarning
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    build_exception: BaseException | None = None
    started = time.time()
    try:
        build_dataflow_cfg(str(model_path), cfg)
    except Exception as exc:  # judged below by the artefacts, see docstring
        build_exception = exc
    finally:
        sys.stdout, sys.stderr = saved_streams
        warnings.showwarning = saved_showwarning
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)

    intermediate = output_dir / "intermediate_models"
    completed = [name for name in step_names if _written_since(intermediate / f"{name}.onnx", started)]
    log_path = output_dir / "build_dataflow.log"
    missing_steps = [name for name in step_names if name not in completed]
    if missing_steps:
        raise FinnBuildError(
            f"FINN build of {model_path} stopped in step {missing_steps[0]!r} "
            f"(completed: {completed or 'none'}): {_first_error(log_path, build_exception)} (log: {log_path})"
        ) from build_exception
    reports: dict[str, Any] = {}
    if "step_generate_estimate_reports" in step_names:
        report_dir = output_dir / "report"
        for name in ESTIMATE_REPORT_FILES:
            path = report_dir / name
            if not _written_since(path, started):
                raise FinnBuildError(f"FINN build of {model_path} ran all steps but wrote no {path}; see {log_path}")
            reports[name] = json.loads(path.read_text())
    return EstimateBuildResult(
        output_dir=output_dir,
        steps_completed=completed,
        reports=reports,
        final_model=intermediate / f"{step_names[-1]}.onnx",
    )
