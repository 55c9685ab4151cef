"""Loading and saving models: clear errors on bad files, atomic and byte-reproducible writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError

# Domains whose ops a2q understands or knows how to execute (qonnx / FINN custom ops).
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "onnx.brevitas")
KNOWN_DOMAIN_PREFIXES = ("qonnx.custom_op", "finn.custom_op")


def load_model(path: str | os.PathLike, allow_unknown_ops: bool = False) -> ModelWrapper:
    """Read an ONNX model, with an error naming the file and the fix when it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise A2QError(f"{path}: no such file")
    if not path.is_file():
        raise A2QError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise A2QError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err}); "
                       "is the file truncated or of another format?") from err
    if not proto.graph.node:
        raise A2QError(f"{path}: the ONNX graph has no nodes (empty or truncated file?)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise A2QError(f"{path}: invalid ONNX model: {first}") from err
    model = ModelWrapper(proto)
    _check_static_shapes(model, path)
    if not allow_unknown_ops:
        _check_known_ops(model, path)
    return model


def data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs fed at run time; exporters such as Brevitas' ``export_qonnx`` list initializers too."""
    constants = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in constants]


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


def model_bytes(model: ModelWrapper) -> bytes:
    """Deterministic serialisation: the same model always gives the same bytes."""
    return model.model.SerializeToString(deterministic=True)


def save_model(model: ModelWrapper, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the target folder, then rename (no partial output)."""
    atomic_write_bytes(Path(path), model_bytes(model))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise A2QError(f"{path}: output folder '{directory}' does not exist")
    if not os.access(directory, os.W_OK):
        raise A2QError(f"{path}: output folder '{directory}' is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())
