"""Loading and saving models: clear errors on bad files, external data kept external, atomic and byte-reproducible
writes (the tensors themselves: :mod:`a2q_passes.tensor_store`; the write itself: :mod:`a2q_passes.output_files`)."""

from __future__ import annotations

import glob
import graphlib
import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_preferred_qonnx_opset

from a2q_passes.errors import A2QError
from a2q_passes.output_files import atomic_write_bytes, check_folder, remove_stale_temporaries, write_temporary
from a2q_passes.tensor_store import attach_external_data, is_streamed, point_external, stored_bytes, tensor_value

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
# at a time, memory-mapped, through :func:`a2q_passes.tensor_store.initializer_value`); smaller ones (scales, zero points,
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
    # both run (`|`): the file on disk is then not what is checked
    changed = declare_custom_domains(proto) | sort_topologically(proto.graph)
    try:
        if (external or path.stat().st_size >= CHECK_BY_PATH_BYTES) and not changed:
            # by path: the checker reads the graph itself, checks each external tensor's file, and
            # is not bound by protobuf's 2 GB limit on one serialised model
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise A2QError(f"{path}: invalid ONNX model: {first}") from err
    attach_external_data(proto, path, STREAM_MIN_BYTES if stream else None)
    _constants_as_initializers(proto)
    _check_value_info(proto, path)
    _check_node_names(proto, path)
    _check_accumulator_record(proto, path)
    _check_parameter_values(proto, path)
    _check_quantizer_types(proto, path)
    return proto


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Sort the nodes topologically where the file lists one before a node it reads (in memory; returns whether
    it did). Why: ONNX asks for that order, and the checker and qonnx's executor rely on it, but AMD Quark's
    quantizer writes some graphs out of it, which onnxruntime runs anyway (it sorts them itself). The sort is
    deterministic, and changes no value. A graph with a cycle is left to the checker to name."""
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    if all(producer.get(name, -1) < index for index, node in enumerate(graph.node) for name in node.input if name):
        return False
    needs = {index: {producer[name] for name in node.input if name in producer} for index, node in enumerate(graph.node)}
    try:
        order = list(graphlib.TopologicalSorter(needs).static_order())
    except graphlib.CycleError:
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for node, index in zip(nodes, order):
        node.CopyFrom(graph.node[index])
    graph.ClearField("node")
    graph.node.extend(nodes)
    return True


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
            stored = int(length) if length is not None and length.isdigit() else stored_bytes(tensor)
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
            # (old FINN kept its dataflow partition among its general ops; it is a fpgadataflow op now)
            fpgadataflow = backend == "fpgadataflow" or node.op_type == "StreamingDataflowPartition"
            node.domain = "finn.custom_op.fpgadataflow" if fpgadataflow else QONNX_GENERAL_DOMAIN
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
    """A tensor described twice, differently (the checker lets it pass), makes qonnx's shape and datatype lookups fail;
    a value_info entry that only repeats another is dropped, in memory, as is one without a shape (its tensor is
    not a scalar: its rank is unknown).

    An initializer described as another type or shape than it holds (the checker lets it pass too) gets its entry
    corrected to what it holds, in memory: the initializer is what executes (onnxruntime runs such a file), and
    ONNX's shape inference, which ``lower`` and the certificate run, stops at the contradiction.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    seen: dict[str, onnx.TypeProto] = {}
    kept = []  # value_info without the entries that only repeat an earlier one (a graph output kept in value_info)
    for position, info in enumerate([*graph.input, *graph.output, *graph.value_info]):
        in_value_info = position >= len(graph.input) + len(graph.output)
        if in_value_info and info.type.WhichOneof("value") == "tensor_type" and not info.type.tensor_type.HasField(
                "shape"):
            continue  # no shape at all (older QKeras converters): qonnx and FINN would read it as rank 0
        if info.name in seen:
            if in_value_info and info.type == seen[info.name]:
                continue
            raise A2QError(f"{path}: tensor '{info.name}' has more than one ValueInfo entry (graph inputs, outputs "
                           "and value_info together), and they differ; remove the wrong one from graph.value_info")
        seen[info.name] = info.type
        if in_value_info:
            kept.append(info)
        tensor, described = initializers.get(info.name), info.type.tensor_type
        if tensor is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in described.shape.dim]
        if described.elem_type not in (0, tensor.data_type) or described.HasField("shape") and (
                len(dims) != len(tensor.dims) or any(d is not None and d != t for d, t in zip(dims, tensor.dims))):
            info.type.CopyFrom(helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
    if len(kept) < len(graph.value_info):
        kept = [onnx.ValueInfoProto.FromString(info.SerializeToString()) for info in kept]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _check_node_names(proto: onnx.ModelProto, path: Path) -> None:
    """Two nodes of one name (the checker lets it pass): a2q names each layer by its node's name (its first output
    where it has none), in reports, in --layer/--skip/--widths-json and in the widths it records."""
    seen: set[str] = set()
    for node in proto.graph.node:
        label = node.name or node.output[0]
        if label in seen:
            raise A2QError(f"{path}: more than one node is named '{label}' (a node without a name goes by its first "
                           "output); a2q names layers by node name: give every node its own name, e.g. with qonnx's "
                           "GiveUniqueNodeNames")
        seen.add(label)


def _check_accumulator_record(proto: onnx.ModelProto, path: Path) -> None:
    """The record a2q keeps in ``metadata_props`` must be one it wrote: project, verify and lower read widths from it."""
    from a2q_passes.metadata import ACCUMULATORS_KEY, parse_record, record_error

    for entry in proto.metadata_props:
        if entry.key == ACCUMULATORS_KEY:
            try:
                parse_record(entry.value)
            except ValueError as err:
                raise record_error(ACCUMULATORS_KEY, err, str(path)) from err


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


def _check_quantizer_types(proto: onnx.ModelProto, path: Path) -> None:
    """An ONNX QuantizeLinear/DequantizeLinear whose stored codes or zero point have a type its version of the op
    does not take (tf2onnx writes int16 ones at opset 13; ONNX allows them from opset 21) is refused by name: the
    checker lets it pass, onnxruntime refuses to load the file, and a2q's own checks, which execute the graph's
    quantizers, could not run it either. The types come from ONNX's own operator schemas."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        return
    types = {tensor.name: tensor.data_type for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        for name, formal in zip(node.input, onnx.defs.get_schema(node.op_type, version, "").inputs):
            if name not in types or _takes(node.op_type, version, formal.name, types[name]):
                continue
            stored = onnx.TensorProto.DataType.Name(types[name]).lower()
            later = next((v for v in range(version + 1, onnx.defs.onnx_opset_version() + 1)
                          if _takes(node.op_type, v, formal.name, types[name])), None)
            since = f"from opset {later} on" if later else "at no opset"
            raise A2QError(f"{path}: node '{node.name or node.output[0]}' ({node.op_type}) reads '{name}' as {stored}, "
                           f"which ONNX's {node.op_type} takes {since}, and the model imports opset {version}: "
                           "onnxruntime refuses to load it. Re-export the model at an opset that takes that type, "
                           "or with 8-bit codes")


def _takes(op_type: str, version: int, formal: str, data_type: int) -> bool:
    """Whether ONNX's ``op_type`` at ``version`` takes a tensor of ``data_type`` as its input named ``formal``."""
    schema = onnx.defs.get_schema(op_type, version, "")
    wanted = next((i.type_str for i in schema.inputs if i.name == formal), None)
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}.get(wanted, {wanted})
    return f"tensor({onnx.TensorProto.DataType.Name(data_type).lower()})" in allowed


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


# what to do about an op a2q cannot read the grid through (only the reading commands take the option: a command that
# rewrites or lowers the model promises every layer of it)
_UNKNOWN_OP_FIX = ("Replace it; `a2q analyze` and `a2q verify` read the model anyway with --allow-unknown-ops, "
                   "reporting the layers behind such an op as unquantized")


def _check_known_ops(model: ModelWrapper, path: Path) -> None:
    for node in model.graph.node:
        domain = node.domain or ""
        if _undefined_qonnx_op(node):
            raise A2QError(
                f"{path}: node '{node.name or node.output[0]}' is op '{node.op_type}' of domain '{domain}', which "
                "qonnx does not define (Brevitas' QONNX export of QuantLSTM writes QuantLSTMCell): a2q cannot tell "
                f"what it computes or whether it accumulates. {_UNKNOWN_OP_FIX}"
            )
        if domain in KNOWN_DOMAINS or domain.startswith(KNOWN_DOMAIN_PREFIXES):
            continue
        raise A2QError(
            f"{path}: node '{node.name or node.output[0]}' is op '{node.op_type}' from unknown domain '{domain}'; "
            f"a2q cannot tell how it changes the integer grid. {_UNKNOWN_OP_FIX}"
        )


def _undefined_qonnx_op(node: onnx.NodeProto) -> bool:
    """Whether ``node`` claims qonnx's (or old Brevitas') domain with an op qonnx's registry does not hold."""
    from qonnx.custom_op.registry import get_supported_versions

    if not (node.domain.startswith("qonnx.custom_op") or node.domain == BREVITAS_DOMAIN):
        return False
    try:
        get_supported_versions(node.domain, node.op_type)
    except KeyError:
        return True
    return False


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
    directory = check_folder(path)
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
            point_external(tensor, Path(staging.name), offset, length)
            external.append(tensor)
            position = offset + length

    temporaries = []
    try:
        temporaries.append(write_temporary(staging, directory, write_data))
        data_path = data_file_path(path, digest.hexdigest()[:16])
        for tensor in external:
            next(entry for entry in tensor.external_data if entry.key == "location").value = data_path.name
        temporaries.append(write_temporary(path, directory, lambda handle: handle.write(model_bytes(out))))
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


