"""Loading and saving models: clear errors on bad files, atomic and byte-reproducible writes."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_preferred_qonnx_opset

from a2q_passes.errors import A2QError

# Domains whose ops a2q understands or knows how to execute (qonnx / FINN custom ops).
BREVITAS_DOMAIN = "onnx.brevitas"
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", BREVITAS_DOMAIN)
KNOWN_DOMAIN_PREFIXES = ("qonnx.custom_op", "finn.custom_op")
QONNX_GENERAL_DOMAIN = "qonnx.custom_op.general"
# Old names of qonnx's general ops (Quant, MultiThreshold, ...) in files written before the
# split from FINN; qonnx's ModelWrapper renames them on load (temporary_fix_oldstyle_domain).
LEGACY_GENERAL_DOMAINS = ("finn", "finn.custom_op.general")
# Quantizer ops whose input 1 is a scale: zero makes qonnx divide by zero.
_SCALED_QUANTIZERS = {"Quant": 1, "BipolarQuant": 1, "Trunc": 1, "QuantizeLinear": 1, "DequantizeLinear": 1}


def load_model(path: str | os.PathLike, allow_unknown_ops: bool = False) -> ModelWrapper:
    """Read an ONNX model, with an error naming the file and the fix when it cannot be used.

    Files of FINN, the QONNX model zoo and QKeras converters that use qonnx/FINN custom-op
    domains without declaring them get the missing ``opset_import`` entries (in memory), and the
    legacy ``finn.custom_op.general`` domain becomes qonnx's, as qonnx does itself; every other
    defect the ONNX checker finds is still an error.
    """
    return wrap_model(read_model_proto(path), path, allow_unknown_ops)


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The checked ``ModelProto`` of :func:`load_model`, before qonnx's ``ModelWrapper`` adds value_info."""
    path = Path(path)
    if not path.exists():
        raise A2QError(f"{path}: no such file")
    if not path.is_file():
        raise A2QError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise A2QError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err}); "
                       "is the file truncated or of another format?") from err
    if not proto.graph.node:
        raise A2QError(f"{path}: the ONNX graph has no nodes (empty or truncated file?)")
    _load_external_data(proto, path)
    declare_custom_domains(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise A2QError(f"{path}: invalid ONNX model: {first}") from err
    _check_value_info(proto, path)
    _check_parameter_values(proto, path)
    return proto


def wrap_model(proto: onnx.ModelProto, path: str | os.PathLike, allow_unknown_ops: bool = False) -> ModelWrapper:
    """``proto`` (from :func:`read_model_proto`) as a ``ModelWrapper``, after the checks that need one."""
    path = Path(path)
    model = ModelWrapper(proto)
    _check_static_shapes(model, path)
    if not allow_unknown_ops:
        _check_known_ops(model, path)
    return model


def data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs fed at run time; exporters such as Brevitas' ``export_qonnx`` list initializers too."""
    constants = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in constants]


def cast_float64_initializers(model: ModelWrapper, what: str = "model") -> list[tuple[str, float]]:
    """Store every float64 (double) initializer as float32, in place; returns ``(name, max relative change)``.

    Why: exporters such as QKeras' write double scales next to float32 activations. qonnx executes
    its own ops in numpy and tolerates that, but onnxruntime (standard ops) refuses a Mul of
    float and double, and FINN's conversion and HW layers compute in float32 anyway. A value
    float32 cannot hold (overflow to Inf) is refused instead, naming the tensor.
    """
    cast = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.DOUBLE:
            continue
        values = numpy_helper.to_array(tensor)
        single = values.astype(np.float32)
        if not np.all(np.isfinite(single[np.isfinite(values)])):
            raise A2QError(f"{what}: float64 initializer '{tensor.name}' has values beyond float32's range, which "
                           "FINN and onnxruntime compute in; rescale it or re-export the model in float32")
        change = np.abs(single.astype(np.float64) - values) / np.maximum(np.abs(values), np.finfo(np.float64).tiny)
        tensor.CopyFrom(numpy_helper.from_array(single, tensor.name))
        cast.append((tensor.name, float(np.max(change, initial=0.0))))
    for info in model.graph.value_info:  # a double annotation of a cast tensor would contradict it
        if info.name in {name for name, _ in cast} and info.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return cast


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read tensors stored next to the model; a missing or short data file names the tensor and the file."""
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "?")
        try:
            load_external_data_for_tensor(tensor, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise A2QError(
                f"{path}: initializer '{tensor.name}' is stored in the external data file '{location}', which "
                f"cannot be read ({str(err).strip().splitlines()[0]}); keep that file, complete, next to the "
                "model (or save the model with its data inline)") from err


def declare_custom_domains(proto: onnx.ModelProto) -> None:
    """Map legacy FINN domains to qonnx's and declare every qonnx/FINN custom domain the graph uses.

    The version added is the one qonnx itself falls back to for an undeclared domain
    (``get_preferred_qonnx_opset``), so execution semantics do not change.
    """
    for node in proto.graph.node:
        if node.domain in LEGACY_GENERAL_DOMAINS:
            backend = next((a.s.decode() for a in node.attribute if a.name == "backend"), None)
            node.domain = "finn.custom_op.fpgadataflow" if backend == "fpgadataflow" else QONNX_GENERAL_DOMAIN
    declared = {opset.domain for opset in proto.opset_import}
    used = {node.domain for node in proto.graph.node}
    for opset in proto.opset_import:  # a legacy import nothing uses any more becomes qonnx's
        if opset.domain in LEGACY_GENERAL_DOMAINS and opset.domain not in used and QONNX_GENERAL_DOMAIN not in declared:
            opset.domain = QONNX_GENERAL_DOMAIN
            declared.add(QONNX_GENERAL_DOMAIN)
    for domain in sorted(used - declared):
        # onnx.brevitas: old Brevitas exports (the QONNX model zoo's TFC); qonnx's registry aliases it to its own ops
        if domain.startswith(KNOWN_DOMAIN_PREFIXES) or domain == BREVITAS_DOMAIN:
            proto.opset_import.append(onnx.helper.make_opsetid(domain, get_preferred_qonnx_opset()))


def _check_value_info(proto: onnx.ModelProto, path: Path) -> None:
    """A tensor described twice (the checker lets it pass) makes qonnx's shape and datatype lookups fail."""
    graph = proto.graph
    seen: set[str] = set()
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.name in seen:
            raise A2QError(f"{path}: tensor '{info.name}' has more than one ValueInfo entry (graph inputs, outputs "
                           "and value_info together); remove the duplicate from graph.value_info")
        seen.add(info.name)


# Ops whose float parameters become integers or accumulate: NaN/Inf there has no integer meaning.
# Elsewhere non-finite constants can be legitimate (an attention mask of -inf; a threshold of
# -inf in a MultiThreshold is always passed).
_NUMERIC_PARAMETER_OPS = {"Quant", "BipolarQuant", "Trunc", "QuantizeLinear", "DequantizeLinear",
                          "Conv", "ConvTranspose", "Gemm", "MatMul"}


def _check_parameter_values(proto: onnx.ModelProto, path: Path) -> None:
    """NaN/Inf in a quantizer's or MAC layer's float parameter, or a zero quantizer scale, has no integer grid."""
    graph = proto.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type in _NUMERIC_PARAMETER_OPS:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
    for tensor in graph.initializer:
        users = consumers.get(tensor.name)
        if not users or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                 onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64)
        if not np.all(np.isfinite(values)):
            names = ", ".join(f"'{n.name or n.output[0]}' ({n.op_type})" for n in users)
            raise A2QError(f"{path}: initializer '{tensor.name}' (input of {names}) contains NaN or Inf; "
                           "re-export the model from a checkpoint with finite weights and scales")
        for node in users:
            index = _SCALED_QUANTIZERS.get(node.op_type)
            if index is not None and len(node.input) > index and node.input[index] == tensor.name and np.any(values == 0):
                raise A2QError(f"{path}: node '{node.name or node.output[0]}' ({node.op_type}) has a zero in its "
                               f"scale '{tensor.name}'; a quantizer scale must be non-zero (re-calibrate or "
                               "re-export the model)")


def _check_static_shapes(model: ModelWrapper, path: Path) -> None:
    for inp in data_inputs(model.graph):
        dims = inp.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value") and i > 0]
        if dynamic:
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise A2QError(
                f"{path}: graph input '{inp.name}' has a dynamic shape {shape}; only the batch dimension may be "
                "dynamic. Fix the shape first, e.g. `python -m onnxruntime.tools.make_dynamic_shape_fixed "
                f"--input_name {inp.name} --input_shape 1,... IN.onnx OUT.onnx`"
            )


def _check_known_ops(model: ModelWrapper, path: Path) -> None:
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in KNOWN_DOMAINS or domain.startswith(KNOWN_DOMAIN_PREFIXES):
            continue
        raise A2QError(
            f"{path}: node '{node.name or node.output[0]}' is op '{node.op_type}' from unknown domain '{domain}'; "
            "a2q cannot tell how it changes the integer grid. Replace it, or pass --allow-unknown-ops to treat "
            "layers behind it as unquantized"
        )


def model_bytes(model: ModelWrapper | onnx.ModelProto) -> bytes:
    """Deterministic serialisation: the same model always gives the same bytes."""
    proto = model.model if isinstance(model, ModelWrapper) else model
    return proto.SerializeToString(deterministic=True)


def save_model(model: ModelWrapper | onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the target folder, then rename (no partial output)."""
    atomic_write_bytes(Path(path), model_bytes(model))


# ---------------------------------------------------------------------------------------------
# Output paths


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
        _check_folder(path, what)
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


def _check_folder(path: Path, what: str = "output") -> Path:
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
    directory = _check_folder(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` left by writers that no longer run; returns what was removed."""
    directory = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(_TMP_PATTERN.format(name=re.escape(path.name)))
    removed = []
    for candidate in directory.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match is not None and not _pid_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _pid_alive(pid: int) -> bool:
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
