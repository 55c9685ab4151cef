"""Executing the graph's own constant subgraphs, and reading integers from what they compute."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.read_only_model import ReadOnlyModel
from a2q_passes.tensor_store import is_streamed, tensor_value

LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
WEIGHT_QUANTIZERS = ("Quant", "IntQuant", "BipolarQuant", "Trunc", "DequantizeLinear")
# Ops the certificate executes on constants (nothing else may feed a weight quantizer); Div and Mul: the scale qonnx's
# ExtractQuantScaleZeroPt moves out of a weight Quant (Quant(w / s, 1, 0, b) * s)
_CONSTANT_OPS = (*LAYOUT_OPS, *WEIGHT_QUANTIZERS, "QuantizeLinear", "Clip", "Constant", "Cast", "Div", "Mul")
# |value / scale - q| allowed: float32 q * s / s lands within a few ulps (2^-24 |q| each) of q
_INTEGER_TOLERANCE, _RELATIVE_TOLERANCE = 1e-3, 2.0 ** -16
# tensors from this many values up are checked by the compiled kernel: below it, importing numba (and compiling
# once, cached on disk) takes longer than the numpy check
_KERNEL_VALUES = 1 << 22
# domains of the ops onnxruntime executes itself (the certificate's fallback for constant subgraphs qonnx cannot run)
_ONNXRUNTIME_DOMAINS = ("", "ai.onnx", "com.microsoft")


class CannotCertify(Exception):
    """The certificate cannot derive this layer's integer view from graph semantics alone."""


def node_label(node: NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def node_attr(node: NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def execute_constants(model: ModelWrapper, targets: list[str], overrides: Mapping[str, np.ndarray] | None = None,
                      clip_as_identity: bool = False) -> dict[str, np.ndarray]:
    """Values of ``targets``, computed by executing their constant subgraph with qonnx.

    ``overrides`` replace tensors (their producers are not executed); ``clip_as_identity`` passes
    values through ``Clip`` nodes unchanged (used to carry a scale through the weight path).
    """
    overrides = dict(overrides or {})
    initializers = initializer_table(model)
    chosen: dict[str, NodeProto] = {}
    used: set[str] = set()
    stack, seen = list(targets), set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in overrides or name in initializers:
            used.add(name)
            continue
        node = model.find_producer(name)
        if node is None:
            raise CannotCertify(f"'{name}' is not a constant (a graph input)")
        if node.op_type not in _CONSTANT_OPS:
            raise CannotCertify(f"'{name}' is computed by {node_label(node)}, which the certificate does not execute")
        chosen[node.output[0]] = node
        stack.extend(node.input)

    def stored(name: str) -> np.ndarray:
        return overrides[name] if name in overrides else tensor_value(initializers[name])

    if not chosen:
        return {name: stored(name) for name in targets}
    nodes = []
    for node in _in_execution_order(model, chosen, targets):
        if clip_as_identity and node.op_type == "Clip":
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        nodes.append(node)
    # a streamed tensor enters as a graph input fed its memory-mapped values: inlined, it would be copied into the
    # proto, through shape inference's serialisation and back out of the proto before anything executes
    feeds = {name: tensor_value(initializers[name]) for name in sorted(used)
             if name not in overrides and _fed(initializers[name])}
    inits = [_inline(initializers[name]) for name in sorted(used) if name not in overrides and name not in feeds]
    inits += [numpy_helper.from_array(np.asarray(value), name) for name, value in overrides.items() if name in used]
    inputs = [helper.make_tensor_value_info(name, initializers[name].data_type, value.shape)
              for name, value in feeds.items()]
    graph = helper.make_graph(nodes, "certificate_constants", inputs, [], inits)
    sub = ModelWrapper(qonnx_make_model(graph, opset_imports=list(model.model.opset_import)))
    sub = sub.transform(InferShapes())
    try:
        context = execute_onnx(sub, feeds, return_full_exec_context=True)
    except Exception as err:  # the graph's own kernels decide what is valid; say which subgraph failed
        if not all(n.domain in _ONNXRUNTIME_DOMAINS for n in nodes):
            raise CannotCertify(f"executing the constant subgraph of {targets} failed ({type(err).__name__}: {err})") from err
        # qonnx runs node by node and hands tensors to onnxruntime as numpy arrays, which fails for
        # int4/uint4 (ml_dtypes), and it needs every shape inferred, which ONNX cannot for onnxruntime's contrib
        # QuantizeLinear/DequantizeLinear; onnxruntime runs the whole subgraph, its own ops included
        context = _execute_with_onnxruntime(sub, targets, f"{type(err).__name__}: {err}", feeds)
    # a target that is itself constant is not in the execution context of the nodes computing the others
    return {name: np.asarray(context[name]) if name in chosen else stored(name) for name in targets}


def initializer_table(model: ModelWrapper) -> Mapping[str, TensorProto]:
    """The graph's initializers by name: a read-only model's table, built once (collecting them per call is
    quadratic in depth), else collected here."""
    if isinstance(model, ReadOnlyModel):
        return model.initializers
    return {init.name: init for init in model.graph.initializer}


def _in_execution_order(model: ModelWrapper, chosen: Mapping[str, NodeProto], targets: list[str]) -> list[NodeProto]:
    """The ``chosen`` nodes (by first output) with every producer before its consumers: a depth-first walk from
    ``targets``, not a scan of the whole graph per call (quadratic in depth)."""
    order: list[NodeProto] = []
    placed: set[str] = set()
    stack = [(name, False) for name in reversed(targets)]
    while stack:
        name, inputs_placed = stack.pop()
        producer = model.find_producer(name) if name else None
        if producer is None or producer.output[0] not in chosen or producer.output[0] in placed:
            continue
        if inputs_placed:
            placed.add(producer.output[0])
            order.append(producer)
            continue
        stack.append((name, True))
        stack.extend((n, False) for n in reversed(producer.input))
    return order


def _fed(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is streamed and of a type numpy holds natively (int4/uint4 and the like go inline: their
    ml_dtypes arrays cannot be fed to onnxruntime)."""
    return is_streamed(tensor) and tensor.data_type not in (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2,
                                                             TensorProto.UINT2) and \
        helper.tensor_dtype_to_np_dtype(tensor.data_type).kind in "biuf"


def _inline(tensor: TensorProto) -> TensorProto:
    """``tensor`` with its data in the proto: qonnx and onnxruntime execute a subgraph of inline tensors only."""
    return numpy_helper.from_array(tensor_value(tensor), tensor.name) if is_streamed(tensor) else tensor


def _execute_with_onnxruntime(sub: ModelWrapper, targets: list[str], first_error: str,
                              feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``targets`` from one onnxruntime session on the constant subgraph ``sub`` (standard ONNX and
    onnxruntime's com.microsoft ops), whose graph inputs take ``feeds``."""
    import onnxruntime as ort

    initializers = {init.name: numpy_helper.to_array(init) for init in sub.graph.initializer}
    initializers.update(feeds)
    computed = [t for t in dict.fromkeys(targets) if t not in initializers]
    proto = ModelWrapper(sub.model.SerializeToString())
    for name in computed:  # onnxruntime types an output whose type ONNX's shape inference could not give
        proto.graph.output.append(sub.get_tensor_valueinfo(name) or ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(proto.model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = dict(zip(computed, session.run(computed, dict(feeds))))
    except Exception as err:
        raise CannotCertify(f"executing the constant subgraph of {targets} failed ({first_error}; onnxruntime: "
                            f"{type(err).__name__}: {err})") from err
    return {**initializers, **values}


def _relative_tolerance(dtype: np.dtype) -> float:
    """How far from an integer a quotient of ``dtype`` values may be, relative to it: float16 and bfloat16 values
    (a float16 graph's ``DequantizeLinear`` output) carry half a unit in their last place, and the quotient by the
    scale about as much again; float32 and wider, :data:`_RELATIVE_TOLERANCE`."""
    if dtype.name in ("float16", "bfloat16"):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return _RELATIVE_TOLERANCE


def as_integers(values: np.ndarray, what: str, block: int = 1 << 16, divisor: np.ndarray | None = None) -> np.ndarray:
    """``values`` (divided by ``divisor``, broadcast to their shape) as integers, each within the tolerance of one.

    Checked a block of leading-axis slices at a time: the float64 quotient of a large weight tensor is never
    held whole, only the int64 result (each element's quotient is the same float64 division either way);
    blocks of about 2^16 values keep the half-dozen passes over each in cache. A tensor of at least
    ``_KERNEL_VALUES`` values is checked by the compiled kernel of :mod:`a2q_passes.certificate.kernels` (the
    same float64 operations in one pass), whose result has the narrowest integer type holding it (an int8
    layer's integers take 1 byte each, not 8); where it finds a problem, the blocks below name it.
    """
    values = np.asarray(values)
    shape = values.shape
    relative = _relative_tolerance(values.dtype)
    if values.ndim and values.size and values.size >= _KERNEL_VALUES and values.flags.c_contiguous \
            and relative == _RELATIVE_TOLERANCE:
        from a2q_passes.certificate.kernels import integer_quotients

        fast = integer_quotients(values, divisor, _INTEGER_TOLERANCE, _RELATIVE_TOLERANCE)
        if fast is not None:  # else the check below names what is wrong
            return fast
    values = values.reshape(1, -1) if values.ndim == 0 else values
    divisor = None if divisor is None else np.broadcast_to(np.asarray(divisor), shape).reshape(values.shape)
    out = np.empty(values.shape, dtype=np.int64)
    step = max(1, block // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, values.shape[0], step):
        chunk = values[start:start + step].astype(np.float64)
        if divisor is not None:
            chunk /= divisor[start:start + step]
        rounded = np.rint(chunk)
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, refused below
            off = np.abs(np.subtract(chunk, rounded, out=chunk), out=chunk)
        # within the absolute tolerance is within the allowance (the relative part is >= 0): the per-element
        # allowance is computed only when some element needs it; NaN and infinities (offset NaN, never <= anything)
        # fail both comparisons, and rint keeps them, so the rounded values tell which complaint applies
        if not np.all(off <= _INTEGER_TOLERANCE) and not np.all(
                off <= np.abs(rounded) * relative + _INTEGER_TOLERANCE):
            if not np.all(np.isfinite(rounded)):
                raise CannotCertify(f"{what} holds NaN or infinite values")
            raise CannotCertify(f"{what} is not integer (off by up to {float(off.max()):.3g})")
        if relative != _RELATIVE_TOLERANCE and rounded.size and np.abs(rounded).max() * relative + _INTEGER_TOLERANCE >= 0.5:
            raise CannotCertify(f"{what}: {values.dtype} values cannot tell integers as large as "
                                f"{int(np.abs(rounded).max())} apart (their precision); use float32 for this tensor")
        out[start:start + step] = rounded
    return out.reshape(shape)


def uniform_value(value: np.ndarray, what: str) -> float:
    """The single value of a per-tensor parameter (all elements equal)."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size == 0 or not np.all(flat == flat[0]):
        raise CannotCertify(f"{what} is not one per-tensor value")
    if not np.isfinite(flat[0]):
        raise CannotCertify(f"{what} is not finite")
    return float(flat[0])


def reads_graph_input(model: ModelWrapper, tensor: str) -> bool:
    """Whether executing ``tensor`` needs a graph input (else it is a constant the graph computes)."""
    initializers = initializer_table(model).keys()
    inputs = {vi.name for vi in model.graph.input} - initializers
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name in inputs:
            return True
        if not name or name in seen or name in initializers:
            continue
        seen.add(name)
        producer = model.find_producer(name)
        stack.extend(producer.input if producer is not None else ())
    return False
