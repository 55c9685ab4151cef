"""Loading and saving models: clear errors on bad files, atomic and byte-reproducible writes."""

from __future__ import annotations

import atexit
import glob
import hashlib
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.datatype import BaseDataType, DataType
from qonnx.util.basic import get_by_name, get_preferred_qonnx_opset

from a2q_passes.errors import A2QError

# Domains whose ops a2q understands or knows how to execute (qonnx / FINN custom ops).
BREVITAS_DOMAIN = "onnx.brevitas"
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", BREVITAS_DOMAIN)
KNOWN_DOMAIN_PREFIXES = ("qonnx.custom_op", "finn.custom_op")
QONNX_GENERAL_DOMAIN = "qonnx.custom_op.general"
# qonnx's ConvertToChannelsLastAndClean: Conv / MaxPool / BatchNormalization on NHWC data (Conv weights stay OIHW)
CHANNELS_LAST_DOMAIN = "qonnx.custom_op.channels_last"
# Old names of qonnx's general ops (Quant, MultiThreshold, ...) in files written before the
# split from FINN; qonnx's ModelWrapper renames them on load (temporary_fix_oldstyle_domain).
LEGACY_GENERAL_DOMAINS = ("finn", "finn.custom_op.general")
# Quantizer ops whose input 1 is a scale: zero makes qonnx divide by zero.
_SCALED_QUANTIZERS = {"Quant": 1, "BipolarQuant": 1, "Trunc": 1, "QuantizeLinear": 1, "DequantizeLinear": 1}
# External initializers at least this large stay in their data file while a command runs (read one
# at a time, memory-mapped, through :func:`initializer_value`); smaller ones (scales, zero points,
# biases) are read into the graph, where qonnx's own functions find them.
STREAM_MIN_BYTES = 1 << 20
# A file this large is checked by path: the in-memory check serialises the whole proto again.
CHECK_BY_PATH_BYTES = 1 << 30
# Offsets of tensors in the external data files this tool writes are multiples of this (memory-mappable pages).
EXTERNAL_ALIGNMENT = 4096
# Protobuf serialises no message of 2 GiB or more: the most one whole model in memory may take.
# Commands that need the whole model in one proto refuse larger ones (:func:`check_whole_model_fits`).
PROTO_LIMIT_BYTES = (1 << 31) - 1
# When ``save_model`` is asked to keep external data, inline initializers this large go to the data file
# (onnx.save's own default threshold).
EXTERNAL_MIN_BYTES = 1024


def load_model(path: str | os.PathLike, allow_unknown_ops: bool = False, stream: bool = True) -> ModelWrapper:
    """Read an ONNX model, with an error naming the file and the fix when it cannot be used.

    Files of FINN, the QONNX model zoo and QKeras converters that use qonnx/FINN custom-op
    domains without declaring them get the missing ``opset_import`` entries (in memory), and the
    legacy ``finn.custom_op.general`` domain becomes qonnx's, as qonnx does itself; every other
    defect the ONNX checker finds is still an error.

    ``stream``: large external initializers stay in their data file (see :data:`STREAM_MIN_BYTES`);
    ``False`` reads every tensor into the graph, for commands that execute the whole model.
    """
    return wrap_model(read_model_proto(path, stream), path, allow_unknown_ops)


def read_model_proto(path: str | os.PathLike, stream: bool = True) -> onnx.ModelProto:
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
    external = any(uses_external_data(tensor) for tensor in proto.graph.initializer)
    _EXTERNAL_BY_FILE[_file_identity(path)] = external
    declared = declare_custom_domains(proto)
    try:
        if (external or path.stat().st_size >= CHECK_BY_PATH_BYTES) and not declared:
            # by path: the checker reads the graph itself, checks each external tensor's file, and
            # is not bound by protobuf's 2 GB limit on one serialised model
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise A2QError(f"{path}: invalid ONNX model: {first}") from err
    _attach_external_data(proto, path, STREAM_MIN_BYTES if stream else None)
    _constants_as_initializers(proto)
    _check_value_info(proto, path)
    _check_parameter_values(proto, path)
    return proto


def _constants_as_initializers(proto: onnx.ModelProto) -> None:
    """Move the tensor of each top-level ``Constant`` node into an initializer of the same name.

    Why: exporters write weights and quantizer parameters as ``Constant`` nodes too (PyTorch's exporters without
    constant folding, tf2onnx); ``project`` rewrites weights by storing their initializer, which a tensor a node
    produces cannot be. The values, and so what the graph computes, are unchanged. A ``Constant`` that is a graph
    output or shares an initializer's name, or whose value is given by another attribute (``value_float``, ...), stays.
    """
    graph = proto.graph
    taken = {info.name for info in graph.output} | {tensor.name for tensor in graph.initializer}
    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or value is None or node.output[0] in taken:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def check_whole_model_fits(path: str | os.PathLike, use: str, advice: str) -> None:
    """Refuse, before any work, a model too large for one in-memory ``ModelProto`` (protobuf's 2 GiB limit).

    For commands that need the whole model in one proto (``use`` says why, e.g. FINN's
    transformations or the torch bridge; ``advice`` what to do instead): past the limit, the first
    ``SerializeToString`` or in-memory check would fail deep inside them. Reads only the graph.
    """
    path = Path(path)
    if not path.is_file():
        return  # read_model_proto names what is wrong with it
    size = whole_model_bytes(path)
    if size >= PROTO_LIMIT_BYTES:
        raise A2QError(f"{path}: {size / 1e9:.2f} GB with its external data, over protobuf's 2 GiB limit on one "
                       f"ONNX model in memory; {use}. {advice}")


def whole_model_bytes(path: str | os.PathLike) -> int:
    """An upper bound on the bytes of the model at ``path`` read into one proto: the file plus the external
    tensors' data, and a few bytes per tensor for the field that then holds it (reads the graph only)."""
    path = Path(path)
    size = path.stat().st_size
    if size >= PROTO_LIMIT_BYTES:  # no proto to parse: the file alone is over the limit
        return size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return size  # read_model_proto names the defect
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            length = next((entry.value for entry in tensor.external_data if entry.key == "length"), None)
            stored = int(length) if length is not None and length.isdigit() else _stored_bytes(tensor)
            size += (stored or 0) + 16
    return size


def wrap_model(proto: onnx.ModelProto, path: str | os.PathLike, allow_unknown_ops: bool = False) -> ModelWrapper:
    """``proto`` (from :func:`read_model_proto`) as a ``ModelWrapper``, after the checks that need one."""
    path = Path(path)
    _describe_initializers(proto)
    # qonnx's own pass for the same ValueInfo looks up every node's every tensor in a fresh list of all
    # ValueInfos: quadratic in the graph's size (seconds for a 32-layer transformer), and nothing left to add
    model = ModelWrapper(proto, fix_missing_initializer_valueinfo=False)
    _check_static_shapes(model, path)
    if not allow_unknown_ops:
        _check_known_ops(model, path)
    return model


def _describe_initializers(proto: onnx.ModelProto) -> None:
    """Give every initializer a node reads a ValueInfo from its dims, in the order qonnx's ``ModelWrapper`` would.

    qonnx adds the same entries itself, but from each initializer's value: a full copy of every
    weight, and impossible for one still in its data file.
    """
    graph = proto.graph
    described = {info.name for info in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        for name in node.input:
            tensor = initializers.get(name)
            if tensor is not None and name not in described:
                graph.value_info.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
                described.add(name)


class ReadOnlyModel(ModelWrapper):
    """A wrapped model for reading only: producers, initializers and ValueInfo shapes come from dicts built once.

    qonnx's ``find_producer``, ``get_tensor_shape`` and this module's :func:`initializer_proto` scan the whole
    graph on every lookup: an analysis that looks up every layer's tensors is then quadratic in the graph's
    size (seconds for a 12-layer transformer, minutes for 32). Each lookup here answers what the scan would
    (the first producer, the first initializer of a name; a name described twice is left to qonnx, which
    refuses it). Nothing may change the graph while the view is in use: it is built for one analysis.
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__(proto, fix_missing_initializer_valueinfo=False)  # the proto was wrapped (and fixed) before
        graph = proto.graph
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.output:
                self.producers.setdefault(name, node)
        self.initializers: dict[str, onnx.TensorProto] = {}
        for tensor in graph.initializer:
            self.initializers.setdefault(tensor.name, tensor)
        infos = [*graph.input, *graph.output, *graph.value_info]
        self.infos = {info.name: info for info in infos}
        self.described_twice = len(self.infos) != len(infos)
        self.named: dict[str, onnx.NodeProto] = {}  # by name, or first output where unnamed, as reports name layers
        for node in graph.node:
            self.named.setdefault(node.name or node.output[0], node)
        self.annotations = {a.tensor_name: a for a in graph.quantization_annotation}
        self.annotated_twice = len(self.annotations) != len(graph.quantization_annotation)

    def find_producer(self, tensor_name: str) -> onnx.NodeProto | None:
        return self.producers.get(tensor_name)

    def get_tensor_shape(self, tensor_name: str, fix_missing_init_shape: bool = False) -> list[int] | None:
        info = self.infos.get(tensor_name)
        if info is None and tensor_name not in self.initializers and not self.described_twice:
            return None
        if info is None or fix_missing_init_shape or self.described_twice:
            return super().get_tensor_shape(tensor_name, fix_missing_init_shape)
        return [dim.dim_value for dim in info.type.tensor_type.shape.dim]

    def get_tensor_datatype(self, tensor_name: str) -> BaseDataType:
        """qonnx's answer (its annotation, else FLOAT16 or FLOAT32 from the ValueInfo) from the tables; qonnx's own
        where it would read an initializer or refuse a name described twice."""
        info = self.infos.get(tensor_name)
        if self.annotated_twice or self.described_twice or (info is None and tensor_name in self.initializers):
            return super().get_tensor_datatype(tensor_name)
        annotation = self.annotations.get(tensor_name)
        entry = None if annotation is None else get_by_name(annotation.quant_parameter_tensor_names,
                                                             "finn_datatype", "key")
        if entry is not None:
            return DataType[entry.value]
        float16 = info is not None and info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        return DataType["FLOAT16" if float16 else "FLOAT32"]


def with_inferred_shapes(model: ModelWrapper) -> ReadOnlyModel:
    """A read-only copy of ``model`` with ONNX shape inference's ValueInfo for every tensor it can shape.

    qonnx's ``InferShapes`` (which first swaps qonnx/FINN custom ops for shape-compatible standard ones)
    runs only where the graph has such ops: it wraps its result in a ``ModelWrapper``, whose set-up looks up
    every tensor in a fresh list of all ValueInfos (quadratic in the graph). Without custom ops its swap
    does nothing, and ONNX's inference on the graph is the whole of it.
    """
    from qonnx.custom_op.registry import is_custom_op

    if any(is_custom_op(node.domain) for node in model.graph.node):
        from qonnx.transformation.infer_shapes import InferShapes

        copy = ModelWrapper(model.model.SerializeToString(), fix_missing_initializer_valueinfo=False)
        return ReadOnlyModel(copy.transform(InferShapes(), cleanup=False).model)
    inferred = onnx.shape_inference.infer_shapes(model.model)
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        _add_onnxruntime_shapes(inferred)
    return ReadOnlyModel(inferred)


def _add_onnxruntime_shapes(proto: onnx.ModelProto) -> None:
    """Add the ValueInfo onnxruntime infers for the tensors ONNX's inference left untyped, in place.

    ONNX's inference knows no onnxruntime contrib op (com.microsoft QGemm, QLinearAdd, ...), so nothing after
    one gets a shape; onnxruntime types every tensor when it builds a session (no run). Models with tensors
    in external data are left as they are: the session would load all of them.
    """
    graph = proto.graph
    if any(is_streamed(t) or uses_external_data(t) for t in graph.initializer):
        return
    known = {vi.name for vi in (*graph.input, *graph.value_info, *graph.output)} | {t.name for t in graph.initializer}
    missing = list(dict.fromkeys(t for node in graph.node for t in node.output if t and t not in known))
    if not missing:
        return
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as it is
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a graph onnxruntime cannot build keeps ONNX's shapes only
        return
    for out in session.get_outputs():
        if out.name in missing and out.type.startswith("tensor(") and out.shape is not None:
            elem = onnx.TensorProto.DataType.Value(out.type[len("tensor("):-1].upper())
            graph.value_info.append(helper.make_tensor_value_info(out.name, elem, out.shape))


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


def _attach_external_data(proto: onnx.ModelProto, path: Path, stream_min_bytes: int | None) -> None:
    """Read external tensors smaller than ``stream_min_bytes`` (all with ``None``); point the others at their file.

    A streamed tensor keeps its ``external_data`` entries, with ``location`` made absolute: onnx's own
    readers refuse an absolute location, so a reader that bypasses :func:`initializer_value` fails
    loudly instead of reading a file relative to the working folder. A missing, short or outside
    data file names the tensor and the file.
    """
    folder = path.parent.resolve()
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "?")
        data_file = (folder / location).resolve()
        try:
            if not data_file.is_relative_to(folder):
                raise ValueError("the location leaves the model's folder")
            size = data_file.stat().st_size
            offset = int(entries.get("offset", 0))
            length = int(entries.get("length", size - offset))
            expected = _stored_bytes(tensor)
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"bytes {offset}..{offset + length} requested, the file has {size}")
            if expected is not None and expected != length:
                raise ValueError(f"{length} bytes stored, the tensor's shape and type need {expected}")
            if stream_min_bytes is None or length < stream_min_bytes:
                load_external_data_for_tensor(tensor, str(folder))
                continue
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise A2QError(
                f"{path}: initializer '{tensor.name}' is stored in the external data file '{location}', which "
                f"cannot be read ({str(err).strip().splitlines()[0]}); keep that file, complete, next to the "
                "model (or save the model with its data inline)") from err
        _point_external(tensor, data_file, offset, length)


def _point_external(tensor: onnx.TensorProto, data_file: Path, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference to ``length`` bytes at ``offset`` of ``data_file`` (an absolute path)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(data_file)), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the raw data of ``tensor`` takes (``None`` for types whose size this does not know)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# ---------------------------------------------------------------------------------------------
# The one accessor for initializer values: every reader (layers, certificate, verification) and
# every writer of weights goes through it, so a streamed tensor is read one at a time.


def initializer_proto(model: ModelWrapper | onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    if isinstance(model, ReadOnlyModel):
        return model.initializers.get(name)
    graph = model.graph if isinstance(model, (ModelWrapper, onnx.ModelProto)) else model
    return next((tensor for tensor in graph.initializer if tensor.name == name), None)


def is_streamed(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` still lives in a data file (see :func:`_attach_external_data`)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of ``tensor``; a streamed one memory-mapped read-only from its data file (no copy)."""
    if not is_streamed(tensor):
        return numpy_helper.to_array(tensor)
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(entries["offset"]), int(entries["length"])
    with open(entries["location"], "rb") as handle:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(handle.fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or dtype.kind not in "biuf":
        # packed or exotic storage: let onnx unpack a copy of this one tensor
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = mapped[offset - start:offset - start + length]
        return numpy_helper.to_array(inline)
    count = length // dtype.itemsize
    return np.frombuffer(mapped, dtype=dtype.newbyteorder("<"), count=count, offset=offset - start).reshape(tuple(tensor.dims))


def initializer_value(model: ModelWrapper | onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of initializer ``name`` (``None`` if there is none); streamed tensors are memory-mapped, read-only."""
    tensor = initializer_proto(model, name)
    return None if tensor is None else tensor_value(tensor)


def initializer_shape(model: ModelWrapper | onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    """The shape of initializer ``name`` without reading its values."""
    tensor = initializer_proto(model, name)
    return None if tensor is None else tuple(int(d) for d in tensor.dims)


def check_in_memory(model: ModelWrapper | onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` of a model in memory; raises ``onnx.checker.ValidationError``.

    Streamed tensors are checked as graph inputs of their type and shape: the checker would look
    for their data files relative to the working folder (a proto has no folder of its own). Their
    data were checked against that type and shape when read (:func:`_attach_external_data`) or
    written from an array of it (:func:`set_initializer_value`).
    """
    proto = model.model if isinstance(model, ModelWrapper) else model
    if any(is_streamed(tensor) for tensor in proto.graph.initializer):
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)  # the streamed tensors' data are not in it: a small copy
        del graph.initializer[:]
        listed = {info.name for info in graph.input}
        for tensor in proto.graph.initializer:
            if not is_streamed(tensor):
                graph.initializer.append(tensor)
            elif tensor.name not in listed:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        checked = onnx.ModelProto()
        checked.CopyFrom(proto)
        checked.graph.CopyFrom(graph)
        proto = checked
    onnx.checker.check_model(proto)


def set_initializer_value(model: ModelWrapper, name: str, value: np.ndarray) -> None:
    """Store ``value`` as initializer ``name``; a streamed tensor stays streamed (spilled to a scratch file).

    Why spill: ``project`` rewrites every layer of a model that may not fit in memory; each new
    tensor goes to disk as soon as it is made and is copied into the output's data file on save.
    """
    tensor = initializer_proto(model, name)
    if tensor is None or not is_streamed(tensor):
        model.set_initializer(name, value)
        return
    value = np.ascontiguousarray(value)
    if tuple(value.shape) != tuple(tensor.dims):
        raise ValueError(f"initializer '{name}': new shape {value.shape} differs from the stored {tuple(tensor.dims)}")
    spilled = numpy_helper.from_array(value, name) if value.dtype.kind not in "biuf" else None
    handle = tempfile.NamedTemporaryFile(dir=_scratch_folder(), suffix=".bin", delete=False)
    with handle:
        if spilled is None:
            value.astype(value.dtype.newbyteorder("<"), copy=False).tofile(handle)
            data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        else:
            handle.write(spilled.raw_data)
            data_type = spilled.data_type
    tensor.data_type = data_type
    _point_external(tensor, Path(handle.name), 0, Path(handle.name).stat().st_size)


# ``a2q-tensors-<pid>-<random>`` in the temporary folder: the pid tells a later run whether its owner still runs.
_SCRATCH_PREFIX = "a2q-tensors-"
_SCRATCH: list[Path] = []  # the scratch folder of this process, made at its first spill


def _scratch_folder() -> Path:
    """A private folder for spilled tensors, removed by :func:`remove_scratch` (see :func:`scratch_space`)."""
    if not _SCRATCH:
        remove_stale_scratch()
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")))
    return _SCRATCH[0]


def remove_scratch() -> None:
    """Delete this process's spilled tensors; a tensor still pointing there can no longer be read."""
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


atexit.register(remove_scratch)  # library use outside scratch_space: removed when the interpreter exits


@contextmanager
def scratch_space() -> Iterator[None]:
    """Run a command: the tensors it spills are removed when the block ends, however it ends.

    An exception, Ctrl-C (``KeyboardInterrupt``) and SIGTERM (the CLI raises ``SystemExit`` for it)
    all unwind through here; a run killed with SIGKILL leaves its folder to :func:`remove_stale_scratch`.
    """
    try:
        yield
    finally:
        remove_scratch()


def remove_stale_scratch() -> list[Path]:
    """Delete the scratch folders of processes that no longer run; returns what was removed."""
    pattern = re.compile(rf"{re.escape(_SCRATCH_PREFIX)}(\d+)-[^-]+")
    removed = []
    for candidate in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*"):
        match = pattern.fullmatch(candidate.name)
        if match is not None and candidate.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def declare_custom_domains(proto: onnx.ModelProto) -> bool:
    """Map legacy FINN domains to qonnx's and declare every qonnx/FINN custom domain the graph uses.

    The version added is the one qonnx itself falls back to for an undeclared domain
    (``get_preferred_qonnx_opset``), so execution semantics do not change. Returns whether
    anything changed.
    """
    before = ([node.domain for node in proto.graph.node], [(o.domain, o.version) for o in proto.opset_import])
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
    return before != ([node.domain for node in proto.graph.node], [(o.domain, o.version) for o in proto.opset_import])


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
        values = tensor_value(tensor)
        if not _all_finite(values):
            names = ", ".join(f"'{n.name or n.output[0]}' ({n.op_type})" for n in users)
            raise A2QError(f"{path}: initializer '{tensor.name}' (input of {names}) contains NaN or Inf; "
                           "re-export the model from a checkpoint with finite weights and scales")
        for node in users:
            index = _SCALED_QUANTIZERS.get(node.op_type)
            if index is not None and len(node.input) > index and node.input[index] == tensor.name and np.any(values == 0):
                raise A2QError(f"{path}: node '{node.name or node.output[0]}' ({node.op_type}) has a zero in its "
                               f"scale '{tensor.name}'; a quantizer scale must be non-zero (re-calibrate or "
                               "re-export the model)")


def _all_finite(values: np.ndarray, block: int = 1 << 22) -> bool:
    """``np.isfinite(values).all()`` in blocks: a memory-mapped weight is checked without a full-size temporary."""
    flat = values.reshape(-1)
    return all(np.isfinite(flat[start:start + block]).all() for start in range(0, flat.size, block))


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


def save_model(model: ModelWrapper | onnx.ModelProto, path: str | os.PathLike, keep_external: bool = False) -> None:
    """Write atomically: a temporary file in the target folder, then rename (no partial output).

    A model with streamed initializers (or any model with ``keep_external``: a command that read
    a model with external data into memory) is written with its large tensors in a data file
    beside it, ``PATH.<digest>.data`` (:func:`data_file_path`), see :func:`save_with_external_data`.
    """
    proto = model.model if isinstance(model, ModelWrapper) else model
    if keep_external or any(is_streamed(tensor) for tensor in proto.graph.initializer):
        save_with_external_data(proto, Path(path))
    else:
        atomic_write_bytes(Path(path), model_bytes(proto))


# Whether each model file :func:`read_model_proto` read stores initializers externally, by the file's
# identity: the commands that write a model ask again when they save (``keep_external``), and the
# graph (megabytes for a large model) need not be parsed a second time for it.
_EXTERNAL_BY_FILE: dict[tuple[int, int, int, int], bool] = {}


def _file_identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """Device, inode, size and modification time: a file replaced or rewritten since has another."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` stores some initializer in an external data file (reads the graph only,
    unless :func:`read_model_proto` read this file, unchanged since)."""
    known = _EXTERNAL_BY_FILE.get(_file_identity(path))
    if known is not None:
        return known
    return bool(referenced_data_files(path))


def referenced_data_files(path: str | os.PathLike) -> set[Path]:
    """The external data files the model at ``path`` reads, as paths beside it (reads the graph only)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    return {path.with_name(entry.value) for tensor in proto.graph.initializer if uses_external_data(tensor)
            for entry in tensor.external_data if entry.key == "location"}


# ``OUT.onnx.<16 hex digits>.data``: the data file of model ``OUT.onnx``, named by a digest of its bytes.
_DATA_PATTERN = r"{name}\.[0-9a-f]{{16}}\.data"


def data_file_path(path: Path, digest: str) -> Path:
    """The data file this tool writes beside model ``path`` for data of ``digest``: ``PATH.<digest>.data``."""
    return path.with_name(f"{path.name}.{digest}.data")


def save_with_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto`` and its large tensors' data file, tensor by tensor, so that a kill at any point
    leaves the old pair or the new pair on disk, never a model with the other's data.

    Streamed tensors and inline ones of at least :data:`EXTERNAL_MIN_BYTES` go to the data file in
    graph order, each at an offset aligned to :data:`EXTERNAL_ALIGNMENT`. Why this order of steps:
    two renames are never atomic together, so the pair is switched by the model's rename alone.

    1. The data goes to a temporary, then is renamed to ``PATH.<digest>.data``, named by a digest of
       its bytes (:func:`data_file_path`): a name no previous model at ``PATH`` reads, unless that
       model reads the very same bytes. The same model gives the same bytes and names (reruns are
       byte-identical).
    2. The model, naming that file, goes to a temporary, then is renamed over ``PATH``: the switch.
    3. Only then are the data files of earlier models at ``PATH`` removed: those of this tool's naming
       (and the ``PATH.data`` of earlier versions) that the replaced model read, and orphans of writes
       killed between 1 and 2 or 2 and 3 that the tensors being written do not stream from. A data
       file belongs to the model at ``PATH``: a copy of that model file sharing it loses it.

    Reading a streamed tensor from a file being replaced (``--in-place``) is safe: its bytes are
    copied before step 1, and a removed file lives while it is mapped.
    """
    directory = _check_folder(path)
    staging = path.with_name(path.name + ".data")  # the data temporary's name: its final name is not known yet
    for target in (path, staging):
        remove_stale_temporaries(target)
    replaced = _data_files_read_by(path)
    reading = {Path(entry.value).resolve() for tensor in proto.graph.initializer if is_streamed(tensor)
               for entry in tensor.external_data if entry.key == "location"}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    # names the data file; sha256: the fastest of hashlib's on CPUs with SHA instructions (2x blake2b)
    digest = hashlib.sha256()
    external: list[onnx.TensorProto] = []

    def write_data(handle: BinaryIO) -> None:
        position = 0
        for tensor in out.graph.initializer:
            if not is_streamed(tensor) and len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            padding = b"\0" * (-position % EXTERNAL_ALIGNMENT)
            handle.write(padding)
            digest.update(padding)
            offset = position + len(padding)
            length = _copy_tensor_bytes(tensor, handle, digest)
            _point_external(tensor, Path(staging.name), offset, length)
            external.append(tensor)
            position = offset + length

    temporaries = []
    try:
        temporaries.append(_write_temporary(staging, directory, write_data))
        data_path = data_file_path(path, digest.hexdigest()[:16])
        for tensor in external:
            next(entry for entry in tensor.external_data if entry.key == "location").value = data_path.name
        temporaries.append(_write_temporary(path, directory, lambda handle: handle.write(model_bytes(out))))
        existed = data_path.exists()
        os.replace(temporaries[0], data_path)
        _fsync_folder(directory)  # the data's rename reaches the disk before the model's
        try:
            os.replace(temporaries[1], path)
        except BaseException:
            if not existed:  # read by no model
                data_path.unlink(missing_ok=True)
            raise
        _fsync_folder(directory)
    except BaseException:
        for tmp in temporaries:
            Path(tmp).unlink(missing_ok=True)
        raise
    pattern = re.compile(_DATA_PATTERN.format(name=re.escape(path.name)))
    earlier = [p for p in directory.glob(f"{glob.escape(path.name)}.*.data") if pattern.fullmatch(p.name)]
    for old in [*earlier, staging] if staging.is_file() else earlier:
        key = old.resolve()
        if key != data_path.resolve() and (key in replaced or (old != staging and key not in reading)):
            old.unlink(missing_ok=True)


# A model file at most this large is read to see which data files it names before it is replaced; a larger
# one holds its tensors inline (reading it would cost its size in memory).
_REPLACED_GRAPH_MAX_BYTES = 1 << 26


def _data_files_read_by(path: Path) -> set[Path]:
    """The data files (resolved) of the model now at ``path``; none for a missing, unreadable or large file."""
    try:
        if not path.is_file() or path.stat().st_size > _REPLACED_GRAPH_MAX_BYTES:
            return set()
        return {data.resolve() for data in referenced_data_files(path)}
    except (DecodeError, ValueError, RuntimeError, OSError):
        return set()


def _fsync_folder(directory: Path) -> None:
    """Make the renames in ``directory`` durable, in order (a power cut could otherwise reorder them)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_tensor_bytes(tensor: onnx.TensorProto, handle: BinaryIO, digest: "hashlib._Hash",
                       block: int = 1 << 26) -> int:
    """Append the stored bytes of ``tensor`` to ``handle`` and ``digest``: a streamed one in blocks from its file.

    Returns the number of bytes written.
    """
    if not is_streamed(tensor):
        data = tensor.raw_data
        handle.write(data)
        digest.update(data)
        tensor.ClearField("raw_data")
        return len(data)
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(entries["offset"]), int(entries["length"])
    with open(entries["location"], "rb") as source:
        source.seek(offset)
        left = length
        while left > 0:
            chunk = source.read(min(block, left))
            if not chunk:
                raise A2QError(f"initializer '{tensor.name}': its data file {entries['location']} ended early")
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return length


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
    tmp = _write_temporary(path, directory, lambda handle: handle.write(data))
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_temporary(path: Path, directory: Path, write: Callable[[BinaryIO], object]) -> str:
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
