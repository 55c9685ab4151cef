"""Executed worst-case accumulators of a model's MAC layers, by qonnx execution only.

For each MAC layer the generator marked as integer (``LayerInfo.integer``), the graph is cut at the
float tensors entering the layer's activation quantizers (or at the integer graph inputs feeding it),
so every op between the quantizers and the MAC (Relu, MaxPool, Pad, Reshape, Transpose, Concat) is
really executed. Adversarial inputs are built per output channel and position: an index-tracing run of
the cut graph (quantizers and Relu replaced by Identity) tells which source element feeds which MAC
input element, and an executed Jacobian of the integer MAC tells each tap's weight; every tap is then
pushed to the extreme that maximises (or minimises) that output. Random inputs are added.

The executed accumulator is computed in the integer domain from executed tensors only:

    t = X / s_x        (the MAC input minus its zero point: integers, padded taps are 0)
    q = W / s_w        (the executed weight quantizer output over its scale: integers)
    acc = MAC(t, q) + z * MAC(1, q)     under the fold convention (the MAC sees raw codes t + z,
                                        and a Conv's padded taps carry the code z of real 0)
    acc = MAC(t, q)                     under the subtract convention

where ``MAC(., q)`` is the layer's own ONNX node (without bias) executed by qonnx on the integers.
None of this reads the project's own readers.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from tests.fuzz.generate import OPSET, Case, LayerInfo

# MultiThreshold, Trunc: FINN's and Brevitas' activation quantizers in real files (tests/fuzz/real_files.py)
QUANTIZERS = ("Quant", "IntQuant", "BipolarQuant", "QuantizeLinear", "MultiThreshold", "Trunc")
# Clip: Brevitas' QCDQ integer Clip between QuantizeLinear and DequantizeLinear (executed, so the cut
# starts at the quantizer's float input and never feeds the Clip's output codes directly)
# Mul/Div/Add/Sub by one constant: FINN's scale and offset after a MultiThreshold, and the scale and zero point
# qonnx's ExtractQuantScaleZeroPt moves out of a Quant (only with a scalar constant operand)
# FINN's own padding and sliding-window layers (a lowered ConvTranspose's MVAU reads through them); each
# executes one image at a time
FINN_WINDOW_OPS = ("FMPadding_Pixel", "FMPadding", "ConvolutionInputGenerator")
# ops that select or repeat elements (nearest Resize, Slice, ...): their output's index trace is a copy of source indices
SELECTING_OPS = ("Resize", "Upsample", "Slice", "Gather", "Split", "DepthToSpace", "SpaceToDepth")
GRID_OPS = ("Relu", "MaxPool", "Pad", "Transpose", "Reshape", "Flatten", "Concat", "DequantizeLinear", "Identity",
            "Clip", "Im2Col", "Squeeze", "Unsqueeze", "Mul", "Div", "Add", "Sub", "QuantAvgPool2d",
            *FINN_WINDOW_OPS, *SELECTING_OPS)
# ops that sum several source elements into one: traced by influence (AveragePool), not by index
POOLING_OPS = ("QuantAvgPool2d",)
# ops between a Relu and a quantizer that only move its values (executed with it, see _relu_source)
RELU_PASS_THROUGH = ("MaxPool", "Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze")
SCALAR_OPS = ("Mul", "Div", "Add", "Sub")
FLOAT_EXTREME = 1.0e5  # saturates every generated quantizer (|x / scale| far beyond 2^8 + |zero point|)
# integer tensor types that hold codes (a graph input, a QLinear op's output; 4-bit types have no numpy dtype)
INTEGER_ELEM = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
                TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}
EXACT_FLOAT32 = 1 << 24
# integer op -> (float op it is defined by, data zero point input, weight input, weight zero point input)
# (com.microsoft's DynamicQuantizeMatMul quantizes its float data itself, as DynamicQuantizeLinear does: -1)
INTEGER_MACS = {"QLinearConv": ("Conv", 2, 3, 5), "QLinearMatMul": ("MatMul", 2, 3, 5), "QGemm": ("Gemm", 2, 3, 5),
                "ConvInteger": ("Conv", 2, 1, 3), "MatMulInteger": ("MatMul", 2, 1, 3),
                "DynamicQuantizeMatMul": ("MatMul", -1, 1, 3), "MatMulIntegerToFloat": ("MatMul", 4, 1, 5)}
MATMULS_TO_FLOAT = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")
RANDOM_SAMPLES = 8


class OracleError(Exception):
    """The executed tensors do not sit on the grid the generator built (a fuzzer bug, not a tool bug)."""


@dataclass
class ExecutedRange:
    """Per output channel, the smallest and largest executed accumulator value."""

    acc_min: np.ndarray
    acc_max: np.ndarray

    @property
    def lo(self) -> int:
        return int(self.acc_min.min())

    @property
    def hi(self) -> int:
        return int(self.acc_max.max())


def width(lo: int, hi: int) -> int:
    """Smallest accumulator holding [lo, hi]: unsigned when lo >= 0, else two's complement."""
    if lo >= 0:
        return max(int(hi).bit_length(), 1)
    return max((-int(lo) - 1).bit_length(), max(int(hi), 0).bit_length()) + 1  # bit_length() of -2 is 2


def fits(lo: int, hi: int, bits: int, signed: bool) -> bool:
    if signed:
        return -(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1
    return 0 <= lo and hi <= (1 << bits) - 1


# --------------------------------------------------------------------------- graph surgery


def _node(model: ModelWrapper, name: str):
    """The node a report calls ``name``: its name, or its first output when it has none (FINN's converted graphs)."""
    return next(n for n in model.graph.node if (n.name or n.output[0]) == name)


SUB_BYTE = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2)  # no numpy type ORT takes


def execute(model: ModelWrapper, feed: dict) -> dict:
    """qonnx execution; a graph with 4-bit tensors runs whole in onnxruntime (qonnx runs one node at a time and
    hands onnxruntime numpy int4 arrays, which its Python binding rejects), and so does one with onnxruntime's own
    com.microsoft ops (qonnx needs every shape, which ONNX's shape inference cannot give them), without graph
    rewrites: onnxruntime fuses Q/DQ groups into integer kernels that, on CPUs without VNNI, saturate pairs of
    products in int16, which is not what the graph defines."""
    if any(_exact_only_in_reference(n) for n in model.graph.node):
        return _execute_by_node(model, feed)
    typed = [i.data_type for i in model.graph.initializer]
    typed += [v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)]
    if not any(t in SUB_BYTE for t in typed) and all(n.domain != "com.microsoft" for n in model.graph.node):
        return execute_onnx(model, feed)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _exact_only_in_reference(node) -> bool:
    """ONNX's integer MAC ops and onnxruntime's com.microsoft ones: its uint8 x int8 kernels saturate pairs of
    products in int16 on CPUs without VNNI, so they run in ONNX's reference implementation (QGemm: :func:`_qgemm`,
    the dynamic quantizer's fused MatMuls: :func:`_matmul_to_float`)."""
    return (node.op_type in INTEGER_MACS and node.domain in ("", "ai.onnx")) or \
        (node.op_type in ("QGemm", "QLinearConv", *MATMULS_TO_FLOAT) and node.domain == "com.microsoft")


def _dynamic_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` quantized by ONNX's reference ``DynamicQuantizeLinear`` (what com.microsoft's DynamicQuantizeMatMul does
    to its float input): uint8 codes, scale, zero point."""
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_empty_tensor_value_info(n) for n in ("y", "s", "z")])
    return tuple(ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).run(
        None, {"x": np.asarray(x, np.float32)}))


def _matmul_to_float(node, values: dict) -> np.ndarray:
    """onnxruntime's com.microsoft MatMulIntegerToFloat (A, B, s_a, s_b, z_a, z_b, bias) and DynamicQuantizeMatMul
    (A float, B, s_b, z_b, bias) by their contract, in int64: ``(A - z_a) @ (B - z_b)`` times ``s_a * s_b`` in
    float32, plus the bias."""
    def get(i):
        return np.asarray(values[node.input[i]]) if len(node.input) > i and node.input[i] else None

    if node.op_type == "DynamicQuantizeMatMul":
        a, s_a, z_a = _dynamic_codes(get(0))
        s_b, z_b, bias = get(2), get(3), get(4)
    else:
        a, s_b, z_b, bias = get(0), get(3), get(5), get(6)
        s_a, z_a = get(2), get(4) if get(4) is not None else np.zeros(1, np.int64)
    b = get(1).astype(np.int64) - (z_b.astype(np.int64).reshape(-1) if z_b is not None else 0)
    acc = np.matmul(a.astype(np.int64) - int(np.asarray(z_a).reshape(-1)[0]), b)
    y = acc.astype(np.float32) * (np.float32(np.asarray(s_a).reshape(-1)[0]) * s_b.astype(np.float32).reshape(-1))
    return y if bias is None else y + bias.astype(np.float32)


def _channels_last(node) -> bool:
    """onnxruntime's com.microsoft QLinearConv with ``channels_last``: NHWC data (its weights stay OIHW)."""
    return node.domain == "com.microsoft" and any(a.name == "channels_last" and a.i for a in node.attribute)


def _qgemm(node, values: dict) -> np.ndarray:
    """onnxruntime's com.microsoft QGemm by its contract, in int64: ``C + (A - z_a)(B - z_b)``, times
    ``alpha * s_a * s_b`` (over ``s_y``) in float32, then (with ``y_zero_point``) rounded half to even, shifted and
    saturated."""
    def get(i):
        return np.asarray(values[node.input[i]]) if len(node.input) > i and node.input[i] else None

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    a, b = get(0).astype(np.int64), get(3).astype(np.int64)
    a, b = (a.T if attrs.get("transA") else a), (b.T if attrs.get("transB") else b)
    acc = (a - (get(2).reshape(-1)[0] if get(2) is not None else 0)) @ (b - (get(5).reshape(-1) if get(5) is not None else 0))
    acc = acc + (get(6) if get(6) is not None else 0)
    scale = np.float32(attrs.get("alpha", 1.0)) * np.float32(get(1).reshape(-1)[0]) * get(4).astype(np.float32).reshape(-1)
    if get(7) is not None:
        scale = scale / np.float32(get(7).reshape(-1)[0])
    y = acc.astype(np.float32) * scale
    if get(8) is None:
        return y
    info = np.iinfo(get(8).dtype)
    return np.clip(np.rint(y) + float(get(8).reshape(-1)[0]), info.min, info.max).astype(get(8).dtype)


def _execute_by_node(model: ModelWrapper, feed: dict) -> dict:
    """The graph one node at a time: ONNX's integer MAC ops and nodes reading 4-bit tensors in ONNX's reference
    implementation, every other node (onnxruntime's com.microsoft QLinearAdd and the like included) in onnxruntime."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values.update(feed)
    for node in model.graph.node:
        inputs = [n for n in dict.fromkeys(node.input) if n]
        outputs = [o for o in node.output if o]
        graph = helper.make_graph([node], "node", [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(np.asarray(values[n]).dtype), None) for n in inputs],
            [helper.make_empty_tensor_value_info(o) for o in outputs])
        single = helper.make_model(graph, opset_imports=list(model.model.opset_import))
        single.ir_version = min(model.model.ir_version or 10, 10)
        feeds = {n: np.asarray(values[n]) for n in inputs}
        if node.op_type == "QGemm":
            results = [_qgemm(node, values)]
        elif node.op_type in MATMULS_TO_FLOAT:
            results = [_matmul_to_float(node, values)]
        elif node.op_type == "QLinearConv" and node.domain == "com.microsoft":  # ONNX's QLinearConv, NCHW
            from onnx.reference import ReferenceEvaluator

            onnx_node = helper.make_node("QLinearConv", list(node.input), outputs, **{
                a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "channels_last"})
            graph.node[0].CopyFrom(onnx_node)
            single = helper.make_model(graph, opset_imports=[o for o in model.model.opset_import if o.domain != "com.microsoft"])
            x = feeds[node.input[0]]
            nhwc = _channels_last(node)
            if nhwc:
                feeds = {**feeds, node.input[0]: np.moveaxis(x, -1, 1)}
            (y,) = ReferenceEvaluator(single).run(outputs, feeds)
            results = [np.moveaxis(y, 1, -1) if nhwc else y]
        elif _exact_only_in_reference(node) or any(  # 4-bit arrays: onnxruntime's Python binding takes none
                helper.np_dtype_to_tensor_dtype(v.dtype) in SUB_BYTE for v in feeds.values()):
            results = ReferenceEvaluator(single).run(outputs, feeds)
        else:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
            results = session.run(outputs, feeds)
        values.update(zip(outputs, results))
    return {o.name: values[o.name] for o in model.graph.output}


def _is_constant(model: ModelWrapper, tensor: str) -> bool:
    return model.get_initializer(tensor) is not None


def _act_chain(model: ModelWrapper, tensor: str, kept: list, sources: list[str]) -> None:
    """Collect the ops from the activation sources to ``tensor``; sources are quantizer inputs or graph inputs."""
    producer = model.find_producer(tensor)
    if producer is None:
        if tensor not in sources:
            sources.append(tensor)
        return
    if any(producer is node for node in kept):  # reached again (a Concat of slices of one tensor)
        return
    scalar = producer.op_type not in SCALAR_OPS or (
        _is_constant(model, producer.input[1]) and model.get_initializer(producer.input[1]).size == 1)
    if producer.op_type in QUANTIZERS:
        kept.append(producer)
        sources.append(_relu_source(model, producer.input[0], kept))
    elif producer.op_type in GRID_OPS and scalar:
        kept.append(producer)
        data_inputs = producer.input if producer.op_type == "Concat" else producer.input[:1]
        for t in data_inputs:
            if not _is_constant(model, t):
                _act_chain(model, t, kept, sources)
    else:
        sources.append(tensor)  # a float tensor from another layer: no integer grid


def _relu_source(model: ModelWrapper, tensor: str, kept: list) -> str:
    """Where the cut starts above a quantizer's input: above a Relu or a Clip from 0 (and the shape ops between
    them) where one feeds it, so it runs and the quantizer sees the reals >= 0 it can see in the graph, else the
    input."""
    path, producer = [], model.find_producer(tensor)
    while producer is not None and producer.op_type in RELU_PASS_THROUGH:
        path.append(producer)
        producer = model.find_producer(producer.input[0])
    if producer is None or not (producer.op_type == "Relu" or _clip_from_zero(model, producer)):
        return tensor
    kept.extend(path + [producer])
    return producer.input[0]


def _clip_from_zero(model: ModelWrapper, node) -> bool:
    """A Clip whose lower bound (an initializer, or the attribute of opset < 11) is >= 0, as ReLU6 exports."""
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1 and node.input[1]:
        low = model.get_initializer(node.input[1])
    else:
        low = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "min"), None)
    return low is not None and np.size(low) == 1 and float(np.asarray(low).reshape(-1)[0]) >= 0


def _ancestors(model: ModelWrapper, tensor: str, kept: list) -> None:
    producer = model.find_producer(tensor)
    if producer is None or producer in kept:
        return
    kept.append(producer)
    for t in producer.input:
        if t:
            _ancestors(model, t, kept)


def _subgraph(model: ModelWrapper, nodes: list, inputs: list[str], outputs: list[str], batch: int,
              float_inputs: bool = False) -> ModelWrapper:
    """A copy of ``model`` with only ``nodes``, the given inputs (batch ``batch``) and outputs."""
    proto = copy.deepcopy(model.model)
    graph = proto.graph
    keep = {id(n) for n in nodes}
    order = [i for i, n in enumerate(model.graph.node) if id(n) in keep]
    new_nodes = [copy.deepcopy(model.graph.node[i]) for i in order]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.input[:]
    for name in inputs:
        shape = [batch] + list(model.get_tensor_shape(name))[1:]
        vi = model.get_tensor_valueinfo(name)
        elem = TensorProto.FLOAT if float_inputs or vi is None else vi.type.tensor_type.elem_type
        graph.input.append(helper.make_tensor_value_info(name, elem, shape))
    del graph.output[:]
    for name in outputs:
        as_input = next((vi for vi in graph.input if vi.name == name), None)
        graph.output.append(copy.deepcopy(as_input) if as_input is not None
                            else helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    del graph.value_info[:]
    used = {t for n in new_nodes for t in n.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    sub = ModelWrapper(proto)
    if float_inputs:
        for name in inputs:
            sub.set_tensor_datatype(name, DataType["FLOAT32"])
    return _infer_shapes(sub)


def _infer_shapes(model: ModelWrapper) -> ModelWrapper:
    """Shape inference, with the inferred shapes moved onto the graph outputs (declared without a shape)."""
    model = model.transform(InferShapes())
    for out in model.graph.output:
        vi = next((v for v in model.graph.value_info if v.name == out.name), None)
        if vi is not None:
            out.CopyFrom(vi)
            model.graph.value_info.remove(vi)
    return model


def _trace_model(model: ModelWrapper, chain: list, sources: list[str], x_name: str, batch: int = 1) -> ModelWrapper:
    """The activation chain with quantizers, Relu, Clip and DequantizeLinear replaced by Identity (index tracing),
    and FINN's QuantAvgPool2d by the AveragePool it sums like (influence tracing); a Resize writes 0 (no source)
    where it extrapolates."""
    replaced = []
    for n in chain:
        if n.op_type == "Resize":
            n = copy.deepcopy(n)
            for a in n.attribute:
                if a.name == "extrapolation_value":
                    a.f = 0.0
            replaced.append(n)
        elif n.op_type in QUANTIZERS + SCALAR_OPS + ("Relu", "Clip", "DequantizeLinear"):
            replaced.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
        elif n.op_type == "QuantAvgPool2d":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("data_layout", b"NCHW") not in (b"NCHW", "NCHW"):
                raise OracleError(f"{n.name}: QuantAvgPool2d with data_layout {attrs['data_layout']}")
            replaced.append(helper.make_node("AveragePool", [n.input[0]], [n.output[0]], name=n.name,
                                             kernel_shape=[attrs["kernel"]] * 2, strides=[attrs["stride"]] * 2))
        else:
            replaced.append(copy.deepcopy(n))
    graph = helper.make_graph(
        [n for n in (replaced[i] for i in _topological(model, chain))], "trace",
        [helper.make_tensor_value_info(s, TensorProto.FLOAT, [batch] + list(model.get_tensor_shape(s))[1:]) for s in sources],
        [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(model.get_initializer(t), t)
                     for n in chain for t in n.input if t and _is_constant(model, t)],
    )
    # the chain's own nodes, as the file's opset defines them (the dynamo exporter's opset-20 Reshape has allowzero)
    opset = max([OPSET] + [o.version for o in model.model.opset_import if o.domain in ("", "ai.onnx")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    trace = ModelWrapper(proto)
    for n in trace.graph.node:  # qonnx's Im2Col reads its input's FINN datatype annotation
        for t in n.input:
            if t and not _is_constant(trace, t):
                trace.set_tensor_datatype(t, DataType["FLOAT32"])
    return _infer_shapes(trace)


def _execute_chain(model: ModelWrapper, chain: list, sources: list[str], output: str, feed: dict,
                   batch: int) -> np.ndarray:
    """The activation cut executed on a batch; one sample at a time through an op that fixes the batch size:
    qonnx's Im2Col (its ``input_shape`` attribute; FINN's lowered convolutions) or a Reshape to a constant leading
    dimension (exporters write the batch of 1 they traced)."""
    if not any(_fixes_batch(model, n) for n in chain):
        return execute(_subgraph(model, chain, sources, [output], batch), feed)[output]
    single = _subgraph(model, chain, sources, [output], 1)
    return np.concatenate([execute(single, {s: v[i:i + 1] for s, v in feed.items()})[output] for i in range(batch)])


def _fixes_batch(model: ModelWrapper, node) -> bool:
    if node.op_type in ("Im2Col", *FINN_WINDOW_OPS):
        return True
    shape = model.get_initializer(node.input[1]) if node.op_type == "Reshape" else None
    return shape is not None and shape.size > 0 and int(shape.reshape(-1)[0]) not in (0, -1)


def _topological(model: ModelWrapper, chain: list) -> list[int]:
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    return sorted(range(len(chain)), key=lambda i: index[id(chain[i])])


def _mac_model(mac, q: np.ndarray, sample_shape: tuple[int, ...], batch: int) -> ModelWrapper:
    """The MAC node alone (no bias, ``transA`` folded into the input, no Gemm ``alpha``: it scales the product, not
    the integer sums), integer weights ``q`` as constants."""
    attrs = {a.name: helper.get_attribute_value(a) for a in mac.attribute if a.name not in ("transA", "alpha")}
    node = helper.make_node(mac.op_type, ["x", "w"], ["y"], domain=mac.domain, **attrs)  # a custom domain kept
    graph = helper.make_graph([node], "mac", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *sample_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(q.astype(np.float32), "w")])
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(mac.domain, 1)] if mac.domain else [])
    return _infer_shapes(ModelWrapper(helper.make_model(graph, opset_imports=opsets)))


def _run_mac(mac, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    model = _mac_model(mac, q, x.shape[1:], x.shape[0])
    return execute_onnx(model, {"x": x.astype(np.float32)})["y"]


# --------------------------------------------------------------------------- sources


@dataclass
class SourceDomain:
    """Values a cut-graph source may take: float (saturate the quantizer) or an integer datatype."""

    lo: float
    hi: float
    integer: bool
    dtype: np.dtype
    allowed: tuple[int, ...] | None = None  # for BIPOLAR-like sets that are not intervals

    def random(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.allowed is not None:
            return rng.choice(self.allowed, size=shape).astype(self.dtype)
        if self.integer:
            return rng.integers(int(self.lo), int(self.hi) + 1, size=shape).astype(self.dtype)
        magnitude = 10.0 ** rng.uniform(-2, 3, size=shape)
        return (rng.choice([-1.0, 1.0], size=shape) * magnitude * rng.integers(0, 2, size=shape)).astype(self.dtype)


def _domain(model: ModelWrapper, case: Case, name: str) -> SourceDomain:
    if name in case.source_ranges:
        lo, hi = case.source_ranges[name]
        return SourceDomain(lo, hi, True, np.dtype(np.float32))
    vi = model.get_tensor_valueinfo(name)
    if vi is not None and vi.type.tensor_type.elem_type in INTEGER_ELEM:  # codes, e.g. a QLinear op's output
        info = np.iinfo(INTEGER_ELEM[vi.type.tensor_type.elem_type])
        return SourceDomain(info.min, info.max, True, np.dtype(info.dtype))
    dtype_name = next((spec.split("=", 1)[1] for spec in case.input_dtypes if spec.split("=", 1)[0] == name), None)
    dt = DataType[dtype_name] if dtype_name else model.get_tensor_datatype(name)
    if dt.is_integer():
        allowed = (-1, 1) if dt.name == "BIPOLAR" else None
        return SourceDomain(float(dt.min()), float(dt.max()), True, np.dtype(np.float32), allowed)
    return SourceDomain(-FLOAT_EXTREME, FLOAT_EXTREME, False, np.dtype(np.float32))


# --------------------------------------------------------------------------- executed ranges


def _integers(values: np.ndarray, scale, what: str, node: str) -> np.ndarray:
    t = values.astype(np.float64) / np.asarray(scale, dtype=np.float64)
    r = np.round(t)
    if not np.allclose(t, r, rtol=1e-6, atol=1e-3):  # rtol: float32 rounding of 16-bit codes times a scale
        raise OracleError(f"{node}: executed {what} is not on the generated grid (max deviation {np.abs(t - r).max():.3g})")
    return r


def _channel_axis(mac, out_shape: tuple[int, ...]) -> int:
    """Output channels (per sample): axis 0 of a Conv's (C, H, W); the last axis of a MatMul's (..., C) (FINN's
    lowered convolutions: Im2Col -> MatMul on NHWC)."""
    channels_last = mac.domain == "qonnx.custom_op.channels_last"  # qonnx's NHWC Conv
    return len(out_shape) - 1 if mac.op_type in ("MatMul", "Gemm") or channels_last else 0


def _targets(out_shape: tuple[int, ...], rng: np.random.Generator, channel_axis: int = 0) -> list[int]:
    """Flat output elements (per sample) to attack: corners, the centre and every position one step from it (an
    interior output of each stride phase up to stride 3, for 1-D and 3-D layers too: a phase per dimension) and one
    random position of every channel."""
    flat = np.moveaxis(np.arange(int(np.prod(out_shape))).reshape(out_shape), channel_axis, 0)
    channels = flat.shape[0]
    spatial = flat.shape[1:]
    per = int(np.prod(spatial)) if spatial else 1
    if spatial:
        centre = [d // 2 for d in spatial]
        centres = {int(np.ravel_multi_index([min(max(c + o, 0), d - 1) for c, o, d in zip(centre, step, spatial)],
                                            spatial)) for step in itertools.product((-1, 0, 1), repeat=len(spatial))}
        corners = {int(np.ravel_multi_index(corner, spatial))
                   for corner in itertools.product(*[(0, d - 1) for d in spatial])}
        positions = sorted(corners | centres | {int(rng.integers(per))})
    else:
        positions = [0]
    by_channel = flat.reshape(channels, -1)
    return [int(by_channel[c, p]) for c in range(channels) for p in positions]


def executed_ranges(model: ModelWrapper, case: Case, seed: int = 0) -> dict[str, ExecutedRange]:
    """Executed worst-case accumulator range per integer MAC layer of ``model`` (see the module docstring)."""
    return {info.node: layer_range(model, case, info, seed) for info in case.layers if info.integer}


def _run_matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A lone ONNX MatMul node executed by qonnx on two integer-valued float32 tensors."""
    node = helper.make_node("MatMul", ["x", "y"], ["z"])
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
                                                 helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape))],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = _infer_shapes(ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])))
    return execute_onnx(model, {"x": x.astype(np.float32), "y": y.astype(np.float32)})["z"]


def act_x_act_range(model: ModelWrapper, case: Case, info: LayerInfo, seed: int = 0) -> ExecutedRange:
    """Executed range of an activation x activation MatMul (one range for every output).

    Every source of each operand is pushed to one end of its domain at once (four corners), plus
    random samples; the quantizers and transposes run in qonnx, and the MatMul node runs alone on
    the executed codes (over the scale, plus the zero point under fold: the MAC sees raw codes).
    """
    rng = np.random.default_rng(seed)
    mac = _node(model, info.node)
    nodes, groups = [], []
    # data inputs only: exporters also list initializers (shared quantizer scales) as graph inputs
    inputs = {vi.name for vi in model.graph.input} - {init.name for init in model.graph.initializer}
    for tensor in mac.input[:2]:
        kept: list = []
        _ancestors(model, tensor, kept)
        nodes += [n for n in kept if n not in nodes]
        groups.append(sorted({t for n in kept for t in n.input if t in inputs} | ({tensor} & inputs)))
    sources = sorted(set(groups[0]) | set(groups[1]))
    if set(groups[0]) & set(groups[1]):
        raise OracleError(f"{info.node}: both operands read the same graph input")
    domains = {s: _domain(model, case, s) for s in sources}
    shapes = {s: list(model.get_tensor_shape(s))[1:] for s in sources}
    feed = {s: [] for s in sources}
    for ends in itertools.product((0, 1), repeat=2):
        for group, end in zip(groups, ends):
            for s in group:
                d = domains[s]
                value = (min(d.allowed), max(d.allowed))[end] if d.allowed is not None else (d.lo, d.hi)[end]
                feed[s].append(np.full([1] + shapes[s], value))
    for s in sources:
        feed[s] = np.concatenate(feed[s] + [domains[s].random(rng, [RANDOM_SAMPLES] + shapes[s])]).astype(domains[s].dtype)
    batch = 4 + RANDOM_SAMPLES
    # operands read straight from graph inputs leave no node to execute before the MatMul
    executed = execute(_subgraph(model, nodes, sources, list(mac.input[:2]), batch), feed) if nodes else feed
    codes = []
    for tensor, scale, zero in ((mac.input[0], info.act_scale, info.act_zero_point),
                                (mac.input[1], info.operand_scale, info.operand_zero_point)):
        t = _integers(executed[tensor], scale, "operand", info.node)
        codes.append(t + zero if case.zero_point == "fold" else t)
    k = codes[0].shape[-1]
    if k * np.abs(codes[0]).max(initial=0) * max(np.abs(codes[1]).max(initial=0), 1) >= EXACT_FLOAT32:
        # 16-bit codes: a float32 MatMul would round; the integer product is exact
        acc = np.matmul(codes[0].astype(np.int64), codes[1].astype(np.int64))
    else:
        acc = np.round(_run_matmul(codes[0], codes[1])).astype(np.int64)
    return ExecutedRange(np.array([acc.min()]), np.array([acc.max()]))


HOLDERS = ("Constant", "Identity", "Cast")


def random_data(model: ModelWrapper, case: Case, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``samples`` random values of each graph input, from its domain (float inputs: spread far past every
    quantizer's range; integer ones: their datatype's values)."""
    rng = np.random.default_rng(seed)
    batch = _declared_batch(model)
    samples = -(-samples // batch) * batch  # whole batches: qonnx executes the batch the graph declares
    return {vi.name: _domain(model, case, vi.name).random(rng, [samples, *model.get_tensor_shape(vi.name)[1:]])
            for vi in model.graph.input if model.get_initializer(vi.name) is None}  # older files list weights too


def _declared_batch(model: ModelWrapper) -> int:
    sources = [vi.name for vi in model.graph.input if model.get_initializer(vi.name) is None]
    shape = model.get_tensor_shape(sources[0]) if sources else None
    return max(int(shape[0]), 1) if shape else 1


def data_accumulators(model: ModelWrapper, case: Case, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact accumulators (int64, ``(samples, *outputs)``) of each integer MAC layer when the whole model runs on
    ``inputs`` (the batch the graph declares at a time: exporters fix it in Reshapes), read from the executed MAC
    inputs as the worst cases are."""
    infos = [info for info in case.layers if info.integer]
    if not infos:
        return {}
    model = constants_folded(model)
    macs = {info.node: _node(model, info.node) for info in infos}
    probe = ModelWrapper(copy.deepcopy(model.model))
    read = {t for info in infos for t in _executed_operands(model, info, macs[info.node])}
    for name in sorted(read - {o.name for o in probe.graph.output} - set(inputs)):
        declared = next((vi for vi in probe.graph.value_info if vi.name == name), None)
        if declared is not None:  # a tensor is declared once: as an output now
            probe.graph.value_info.remove(declared)
            probe.graph.output.append(declared)
        else:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, probe.get_tensor_shape(name)))
    samples, batch = next(iter(inputs.values())).shape[0], _declared_batch(model)
    runs = []
    for start in range(0, samples, batch):
        feed = {name: values[start:start + batch] for name, values in inputs.items()}
        runs.append({**feed, **execute(probe, feed)})
    accumulators = {}
    for info in infos:
        mac = macs[info.node]
        if mac.op_type in ("MVAU", "VVAU", "XnorPopcountMatMul"):
            accumulators[info.node] = np.concatenate([_finn_accumulators(model, mac, run) for run in runs])
            continue
        if mac.op_type in INTEGER_MACS:  # each run its own zero point (DynamicQuantizeLinear)
            accumulators[info.node] = np.concatenate([_integer_op_accumulators(model, case.zero_point, mac, run)
                                                      for run in runs])
            continue
        executed = [np.concatenate([run[t] for run in runs], axis=1 if _trans_a(mac) and t == mac.input[0] else 0)
                    for t in mac.input[:2 if info.act_x_act else 1]]
        if info.act_x_act:  # the codes of both operands (plus the zero points under fold), multiplied in int64
            codes = [_integers(x, scale, "operand", info.node).astype(np.int64) + (zero if case.zero_point == "fold" else 0)
                     for x, scale, zero in zip(executed, (info.act_scale, info.operand_scale),
                                               (info.act_zero_point, info.operand_zero_point))]
            accumulators[info.node] = np.matmul(*codes)
        else:
            accumulators[info.node] = _IntegerMac.of(model, case, info, mac).accumulators(executed[0])
    return accumulators


def _finn_accumulators(model: ModelWrapper, mac, run: dict[str, np.ndarray]) -> np.ndarray:
    """A FINN MVAU/VVAU's exact accumulators on one run's executed input: FINN's own execution of the node without
    its thresholds (``noActivation`` 1), whose float32 products of small codes are exact below 2^24; qonnx's
    XnorPopcountMatMul's output (qonnx's execution), which is its count."""
    from qonnx.custom_op.registry import getCustomOp

    node = copy.deepcopy(mac)
    for attribute in node.attribute:
        if attribute.name == "noActivation":
            attribute.i = 1
    del node.input[2:]
    weights = model.get_initializer(mac.input[1])
    x = run[mac.input[0]]
    if np.abs(weights).sum() * max(np.abs(x).max(initial=0), 1) >= EXACT_FLOAT32:
        raise OracleError(f"{mac.name}: accumulators beyond float32's integers")
    vectors = next((list(a.ints) for a in mac.attribute if a.name == "numInputVectors"), [1])
    mh = next((a.i for a in mac.attribute if a.name == "MH"), 0)
    shape = (*x.shape[:-1], weights.shape[1]) if mac.op_type == "XnorPopcountMatMul" else (len(x), *vectors[1:], mh)
    context = {mac.input[0]: x.astype(np.float32), mac.input[1]: weights,
               node.output[0]: np.zeros(shape, np.float32)}  # the node's output shape
    getCustomOp(node).execute_node(context, model.graph)
    return np.rint(context[node.output[0]]).astype(np.int64)


def _executed_operands(model: ModelWrapper, info: LayerInfo, mac) -> list[str]:
    """The tensors of ``mac`` whose executed values give its accumulators: the MAC inputs, and an integer op's
    operands and zero points that are not constants."""
    if mac.op_type not in INTEGER_MACS:
        return list(mac.input[:2 if info.act_x_act else 1])
    _, x_zp, w, w_zp = INTEGER_MACS[mac.op_type]
    used = [0] + ([x_zp] if x_zp >= 0 else []) + ([w, w_zp] if info.act_x_act else [])
    return [mac.input[i] for i in used if len(mac.input) > i and mac.input[i] and model.get_initializer(mac.input[i]) is None]


def _executed_codes(model: ModelWrapper, mac, run: dict[str, np.ndarray], data: int, zp_input: int) -> tuple[np.ndarray, int]:
    """An integer op's executed codes at input ``data`` (int64) and their zero point (one per tensor; 0 if absent;
    ``zp_input`` -1: the op quantizes its float input itself, as DynamicQuantizeLinear does)."""
    if zp_input < 0:
        codes, _, zero = _dynamic_codes(run[mac.input[data]])
        return codes.astype(np.int64), int(zero)
    name = mac.input[zp_input] if len(mac.input) > zp_input else ""
    zero = run[name] if name in run else model.get_initializer(name) if name else 0
    return run[mac.input[data]].astype(np.int64), int(np.asarray(zero).reshape(-1)[0])


def _integer_op_accumulators(model: ModelWrapper, zero_point: str, mac, run: dict[str, np.ndarray]) -> np.ndarray:
    """Exact accumulators of an ONNX integer MAC op on one run's executed tensors: the float op ONNX defines it by
    on ``code - z``, times the weights less their zero point (subtract) or the raw weights plus ``z`` times every
    weight of the output's kernel (fold: the MAC sums raw codes, padded taps holding z)."""
    float_op, x_zp, w_input, w_zp = INTEGER_MACS[mac.op_type]
    x, zero = _executed_codes(model, mac, run, 0, x_zp)
    if _channels_last(mac):  # counted, not placed: the accumulators stay channels-first
        x = np.moveaxis(x, -1, 1)
    weights = model.get_initializer(mac.input[w_input])
    if weights is None:  # two activations
        b, b_zero = _executed_codes(model, mac, run, w_input, w_zp)
        return np.matmul(x - zero, b - b_zero) if zero_point == "subtract" else np.matmul(x, b)
    q = weights.astype(np.int64)
    w_zero = model.get_initializer(mac.input[w_zp]) if len(mac.input) > w_zp and mac.input[w_zp] else None
    trans_b = any(a.name == "transB" and a.i for a in mac.attribute)
    if zero_point == "subtract" and w_zero is not None:  # one per tensor, or per output channel (Conv, Gemm transB: 0)
        axis = 0 if float_op == "Conv" or trans_b else 1
        q = q - np.asarray(w_zero, np.int64).reshape([-1 if d == axis else 1 for d in range(q.ndim)])
    attrs = {a.name: helper.get_attribute_value(a) for a in mac.attribute
             if a.name in ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad", "transB")}
    twin = helper.make_node(float_op, ["t", "w"], ["acc"], name=mac.name, **attrs)
    info = LayerInfo(mac.name, float_op, np.ones(1, np.float32), 1.0, zero if zero_point == "fold" else 0)
    sample_shape = tuple(x.shape[1:])
    out_shape = tuple(_run_mac(twin, q, np.zeros((1, *sample_shape), np.float32)).shape[1:])
    return _IntegerMac(twin, info, zero_point, q, sample_shape, out_shape).accumulators((x - zero).astype(np.float32))


def constants_folded(model: ModelWrapper) -> ModelWrapper:
    """``model`` with each ``Constant``, and each ``Identity``/``Cast`` of constants, executed into an initializer:
    the forms PyTorch's exporters give weights and quantizer parameters. The rest of the oracle reads initializers."""
    def foldable(node) -> bool:
        return node.op_type in HOLDERS and all(model.get_initializer(t) is not None for t in node.input if t)

    if not any(foldable(n) for n in model.graph.node):
        return model
    from onnx.reference import ReferenceEvaluator  # ONNX's own reference implementation of each op

    model = ModelWrapper(copy.deepcopy(model.model))
    while (node := next((n for n in model.graph.node if foldable(n)), None)) is not None:
        (value,) = ReferenceEvaluator(node).run(None, {t: model.get_initializer(t) for t in node.input if t})
        model.graph.node.remove(node)
        model.set_initializer(node.output[0], np.asarray(value))
    return model


def tile_ranges(model: ModelWrapper, case: Case, info: LayerInfo, tile: int,
                seed: int = 0) -> tuple[list[ExecutedRange], list[ExecutedRange]]:
    """A multi-stage datapath's executed registers: each K-tile's partial sum (``tile`` consecutive terms of the
    layer's K order: ``(C_in / group, *kernel)`` for a Conv, the summed axis of a MatMul/Gemm weight) and each running
    sum of whole tiles, every one the layer's own MAC executed with the weights outside it set to 0 (the
    adversarial inputs then attack that sum alone)."""
    k = _k_terms(model, info)
    starts = range(0, k, tile)
    tiles = [layer_range(model, case, info, seed, np.arange(start, min(start + tile, k))) for start in starts]
    running = [layer_range(model, case, info, seed, np.arange(min(start + tile, k))) for start in starts]
    return tiles, running


def _k_terms(model: ModelWrapper, info: LayerInfo) -> int:
    """How many terms one output of the MAC sums (its weight's K axis)."""
    mac = _node(model, info.node)
    shape = model.get_tensor_shape(mac.input[1]) or list(constants_folded(model).get_initializer(mac.input[1]).shape)
    if mac.op_type == "Conv":
        return int(np.prod(shape[1:]))
    trans_b = any(a.name == "transB" and a.i for a in mac.attribute)
    return int(shape[1] if trans_b else shape[0])


def _keep_terms(mac, q: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """``q`` with every weight outside the K positions ``terms`` set to 0 (K order as in :func:`tile_ranges`)."""
    kept = np.zeros_like(q)
    if mac.op_type == "Conv":
        flat, out = q.reshape(q.shape[0], -1), kept.reshape(q.shape[0], -1)
        out[:, terms] = flat[:, terms]
    elif any(a.name == "transB" and a.i for a in mac.attribute):
        kept[:, terms] = q[:, terms]
    else:
        kept[terms] = q[terms]
    return kept


@dataclass
class _IntegerMac:
    """A layer's MAC node on its executed integer weights: what turns an executed MAC input into accumulators."""

    mac: object
    info: LayerInfo
    zero_point: str  # the case's convention
    q: np.ndarray  # the executed integer weights (raw codes under the fold convention)
    sample_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @classmethod
    def of(cls, model: ModelWrapper, case: Case, info: LayerInfo, mac, terms: np.ndarray | None = None) -> "_IntegerMac":
        """The executed integer weights (the weight quantizer's constant subgraph); ``terms``: only these K positions
        of the sum."""
        weight = model.get_initializer(mac.input[1])
        if weight is None:
            weight_nodes = []
            _ancestors(model, mac.input[1], weight_nodes)
            weight = execute(_subgraph(model, weight_nodes, [], [mac.input[1]], 1), {})[mac.input[1]]
        q = _integers(weight, info.weight_scale, "weight", info.node)
        if info.weight_zero_point is not None and case.zero_point == "fold":
            q = q + np.round(info.weight_zero_point)  # the raw codes
        if terms is not None:
            q = _keep_terms(mac, q, terms)
        x_shape = tuple(model.get_tensor_shape(mac.input[0]))
        sample_shape = (x_shape[0],) if _trans_a(mac) else tuple(x_shape[1:])
        out_shape = _run_mac(mac, q, np.zeros((1,) + sample_shape, dtype=np.float32)).shape[1:]
        return cls(mac, info, case.zero_point, q, sample_shape, tuple(out_shape))

    @functools.cached_property
    def jac(self) -> np.ndarray:
        """``(inputs, outputs)`` per sample: the weight of every tap, by executing the MAC on one-hot inputs."""
        n_in = int(np.prod(self.sample_shape))
        jac = _run_mac(self.mac, self.q, np.eye(n_in, dtype=np.float32).reshape((n_in,) + self.sample_shape))
        return jac.reshape(n_in, -1)

    def accumulators(self, x: np.ndarray) -> np.ndarray:
        """Exact integer accumulators (int64, ``(batch, *out_shape)``) of the MAC on its executed input ``x``."""
        mac, info, q = self.mac, self.info, self.q
        if _trans_a(mac):
            x = x.T
        t = _integers(x, info.act_scale, "activation", info.node)
        # every tap of an output is a weight: the sum of all |weights| bounds it without the Jacobian
        reach = max(np.abs(t).max(initial=0), 1)
        if np.abs(q).sum() * reach < EXACT_FLOAT32 or np.abs(self.jac).sum(axis=0).max(initial=0) * reach < EXACT_FLOAT32:
            acc = _run_mac(mac, q, t).astype(np.float64)
        else:  # beyond float32's integers (16-bit codes): the executed MAC's taps (its Jacobian), summed in int64
            jac = self.jac
            if np.abs(jac).max(initial=0) >= EXACT_FLOAT32:
                raise OracleError(f"{info.node}: weights too large for exact float32 execution")
            taps = np.round(jac).astype(np.int64)
            acc = (t.reshape(t.shape[0], -1).astype(np.int64) @ taps).reshape((t.shape[0],) + self.out_shape)
            acc = acc.astype(np.float64)
        if self.zero_point == "fold" and info.act_zero_point:
            if mac.op_type == "Conv":  # padded taps carry the zero-point code: the whole kernel counts
                shape = [1] * acc.ndim
                shape[1 + _channel_axis(mac, self.out_shape)] = -1  # the output channels (last in qonnx's NHWC Conv)
                ones = q.reshape(q.shape[0], -1).sum(axis=1).reshape(shape)
            else:
                ones = _run_mac(mac, q, np.ones((1,) + self.sample_shape, dtype=np.float32))
            acc = acc + info.act_zero_point * ones.astype(np.float64)  # float32 * z would round beyond 2^24
        return np.round(acc).astype(np.int64)


def _trans_a(mac) -> bool:
    return any(a.name == "transA" and a.i for a in mac.attribute)


def layer_range(model: ModelWrapper, case: Case, info: LayerInfo, seed: int = 0,
                terms: np.ndarray | None = None) -> ExecutedRange:
    """``terms``: only these K positions of the sum (see :func:`tile_ranges`)."""
    model = constants_folded(model)
    if info.act_x_act:
        return act_x_act_range(model, case, info, seed)
    rng = np.random.default_rng(seed)
    mac = _node(model, info.node)
    chain, sources = [], []
    _act_chain(model, mac.input[0], chain, sources)
    domains = [_domain(model, case, s) for s in sources]
    sizes = [int(np.prod(model.get_tensor_shape(s)[1:])) for s in sources]
    trans_a = _trans_a(mac)

    # 1. index tracing: which source element (1-based over all sources, 0 = padding) feeds each MAC input element
    offsets = np.cumsum([0] + sizes)
    feed = {s: (np.arange(n) + 1 + offsets[i]).astype(np.float32).reshape([1] + list(model.get_tensor_shape(s))[1:])
            for i, (s, n) in enumerate(zip(sources, sizes))}
    if chain:
        index = execute(_trace_model(model, chain, sources, mac.input[0]), feed)[mac.input[0]]
    else:
        index = feed[sources[0]]
    index = (index.T if trans_a else index)[0].reshape(-1).astype(np.int64)
    influence = None
    if any(n.op_type in POOLING_OPS for n in chain):  # (source element, MAC input element): how much one feeds the other
        one_hot = np.eye(int(offsets[-1]), dtype=np.float32)
        feed = {s: one_hot[:, offsets[i]:offsets[i + 1]].reshape([-1] + list(model.get_tensor_shape(s))[1:])
                for i, s in enumerate(sources)}
        traced = execute(_trace_model(model, chain, sources, mac.input[0], int(offsets[-1])), feed)[mac.input[0]]
        influence = traced.reshape(int(offsets[-1]), -1).astype(np.float64)

    # 2. the executed integer weights and the MAC's Jacobian
    integer_mac = _IntegerMac.of(model, case, info, mac, terms)
    jac, out_shape = integer_mac.jac, integer_mac.out_shape

    # 3. adversarial and random inputs for the sources
    total = int(offsets[-1])
    lo = np.concatenate([np.full(n, d.lo) for d, n in zip(domains, sizes)])
    hi = np.concatenate([np.full(n, d.hi) for d, n in zip(domains, sizes)])
    signs = np.unique(np.sign(np.asarray(info.act_scale, dtype=np.float64)))  # per-channel scales: of one sign
    if signs.size != 1:
        raise OracleError(f"{info.node}: activation scales of both signs")
    direction = float(signs[0])
    samples = []
    axis = _channel_axis(mac, out_shape)
    for o in _targets(out_shape, rng, axis):
        taps = np.nonzero(jac[:, o])[0]
        for sense in (1.0, -1.0):
            x = lo.copy()
            if influence is not None:  # each source to the end its summed effect on output o asks for
                effect = influence[:, taps] @ jac[taps, o]
                x = np.where(np.sign(effect) * sense * direction > 0, hi, lo)
                samples.append(x)
                continue
            src = index[taps]
            want_high = np.sign(jac[taps, o]) * sense * direction > 0
            keep = src > 0
            x[src[keep] - 1] = np.where(want_high[keep], hi[src[keep] - 1], lo[src[keep] - 1])
            samples.append(x)
    batch_inputs = np.stack(samples) if samples else np.zeros((0, total))
    feed = {}
    for i, (s, d) in enumerate(zip(sources, domains)):
        shape = list(model.get_tensor_shape(s))[1:]
        adversarial = batch_inputs[:, offsets[i]:offsets[i + 1]].reshape([-1] + shape)
        if d.allowed is not None:
            adversarial = np.where(adversarial > 0, max(d.allowed), min(d.allowed))
        feed[s] = np.concatenate([adversarial, d.random(rng, [RANDOM_SAMPLES] + shape)]).astype(d.dtype)
    batch = next(iter(feed.values())).shape[0]

    # 4. execute the activation cut on the batch, then the integer MAC on its executed input
    if chain:
        x = _execute_chain(model, chain, sources, mac.input[0], feed, batch)
    else:  # the MAC reads a graph input directly
        x = feed[mac.input[0]].astype(np.float32)
    acc = integer_mac.accumulators(x)
    per_channel = np.moveaxis(acc, 1 + axis, 0).reshape(acc.shape[1 + axis], -1)
    return ExecutedRange(per_channel.min(axis=1), per_channel.max(axis=1))
