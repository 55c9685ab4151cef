"""The oracle (``oracle.py``) for files the fuzzer did not generate: what it needs read from the graph itself.

The oracle executes each MAC layer's activation cut and weight quantizers with qonnx; it only needs, per
layer, the scales (and activation zero point) that turn executed float tensors back into integers. The
generator records those for its own graphs; for real files (Brevitas, onnxruntime, FINN, the model zoo)
this module reads them from the graph's own quantizer nodes: the first ``Quant``/``BipolarQuant``/
``DequantizeLinear``/``MultiThreshold``/``Trunc`` above the MAC input (through data-movement ops and scalar
``Mul``/``Add`` constants) and above the weight. The weight scale is put into the MAC's layout by executing
the ops between the weight quantizer and the MAC on the scale itself.

Integer ops the oracle's float MAC cannot run (onnxruntime's ``QLinearConv``/``QLinearMatMul``/``QGemm``/
``ConvInteger``/``MatMulInteger``, FINN's ``MVAU``/``VVAU``) are cut out into a one-layer model whose input
takes every code of the op's input type (its storage type, or FINN's ``inputDataType``) and whose MAC is the
float op ONNX defines them by, on ``w - w_zp`` (``subtract``) or the raw codes (``fold``).

None of this uses the project's readers: a layer this module cannot describe is reported with the reason.
"""

from __future__ import annotations

import copy

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.fold_constants import FoldConstants
from qonnx.transformation.infer_shapes import InferShapes

from tests.fuzz.generate import OPSET, QONNX_DOMAIN, Case, LayerInfo
from tests.fuzz.oracle import (FINN_WINDOW_OPS, INTEGER_ELEM, INTEGER_MACS, SELECTING_OPS, ExecutedRange, _ancestors,
                               _infer_shapes, _node, _subgraph, execute, layer_range)

FLOAT_MACS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# integer MAC ops (ONNX's, and com.microsoft QGemm, channels-last QLinearConv and the dynamic quantizer's fused MatMuls)
# whose accumulators the oracle reads from a whole file's executed
# tensors (property (j))
DATA_INTEGER_MACS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
                     "DynamicQuantizeMatMul")
# onnxruntime contrib ops that multiply-accumulate, as its graph optimizer and MatMulNBitsQuantizer write them: the
# oracle cannot execute them, but a reader that passes one over silently has missed a layer
CONTRIB_MACS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "FusedConv", "FusedGemm",
                "FusedMatMul", "NhwcConv", "NhwcFusedConv", "QAttention", "Attention")
# MACs in qonnx's domain: FINN's binary MatMul, and the LSTM cell of Brevitas' QONNX export (qonnx defines no such op)
QONNX_MACS = ("XnorPopcountMatMul", "QuantLSTMCell")
FINN_ATTENTION = ("ScaledDotProductAttention", "ScaledDotProductAttention_hls")  # two products of activations
MVAU_OPS = ("MVAU", "MVAU_hls", "MVAU_rtl", "MatrixVectorActivation")
VVAU_OPS = ("VVAU", "VVAU_hls", "VVAU_rtl", "VectorVectorActivation")
# ops that move or select codes without changing their grid
PASS_THROUGH = ("Relu", "MaxPool", "Pad", "Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Im2Col",
                "Clip", *SELECTING_OPS)
WEIGHT_QUANTIZERS = ("Quant", "IntQuant", "BipolarQuant", "DequantizeLinear")
WEIGHT_MOVES = ("Transpose", "Reshape", "Identity", "Clip", "Flatten", "Squeeze", "Unsqueeze")
# never folded into constants: the oracle reads the weight quantizers themselves
QUANTIZER_OPS = ["Quant", "IntQuant", "BipolarQuant", "QuantizeLinear", "DequantizeLinear", "Clip", "MultiThreshold", "Trunc"]


class Undescribed(Exception):
    """A layer whose integer grid this module cannot read from the graph (the reason names the node)."""


def file_model(path) -> ModelWrapper:
    """A real file as qonnx reads it, less what qonnx's lookups trip over and every tool runs anyway: a value_info
    entry repeating another (AMD Quark writes such) dropped, nodes listed out of topological order (Quark again)
    sorted."""
    import onnx

    from a2q_passes.model_io import sort_topologically

    proto = onnx.load(str(path))
    seen, kept = {vi.name for vi in (*proto.graph.input, *proto.graph.output)}, []
    for vi in proto.graph.value_info:
        if vi.name not in seen:
            seen.add(vi.name)
            kept.append(vi)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    sort_topologically(proto.graph)
    return ModelWrapper(proto)


def _const(model: ModelWrapper, name: str) -> np.ndarray | None:
    """An initializer, or a tensor computed from constants alone (executed: PyTorch's exporter shares equal
    parameters through Identity nodes)."""
    if not name:
        return None
    value = model.get_initializer(name)
    if value is None and model.find_producer(name) is not None and not _reads_activations(model, name):
        kept: list = []
        _ancestors(model, name, kept)
        value = execute(_subgraph(model, kept, [], [name], 1), {})[name]
    return value


def _scalar(model: ModelWrapper, name: str, what: str) -> float:
    value = _const(model, name)
    if value is None or np.asarray(value).size != 1:
        raise Undescribed(f"{what} {name!r} is not one constant")
    return float(np.asarray(value).reshape(()))


def _attr(node, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def activation_grid(model: ModelWrapper, tensor: str) -> tuple[float, int]:
    """(scale, zero point) of ``tensor``'s codes: the quantizer above it, then the scalar Mul/Add on the way."""
    return _activation_source(model, tensor)[:2]


def _activation_source(model: ModelWrapper, tensor: str) -> tuple[float, int, object]:
    """:func:`activation_grid` and the node it read the grid from (``None``: an integer graph input)."""
    ops, channels_kept = [], True  # only ops that keep each value in its channel since the MAC
    while True:
        producer = model.find_producer(tensor)
        if producer is None:
            dtype = model.get_tensor_datatype(tensor)
            elem = model.get_tensor_valueinfo(tensor).type.tensor_type.elem_type
            if not dtype.is_integer() and elem not in INTEGER_ELEM:
                raise Undescribed(f"{tensor!r} is a float graph input")
            scale, zero = 1.0, 0
            break
        op = producer.op_type
        if op in PASS_THROUGH or op == "Concat":
            tensor = producer.input[0]
            channels_kept = channels_kept and op in ("MaxPool", "Identity")
            continue
        if op in ("Mul", "Add") and _const(model, producer.input[1]) is not None:
            ops.append((op, _scalar(model, producer.input[1], f"{producer.name} constant")))
            tensor = producer.input[0]
            continue
        quantizer = op in ("Quant", "IntQuant", "DequantizeLinear")
        per_channel = _const(model, producer.input[1]) if quantizer and channels_kept and not ops else None
        if per_channel is not None and np.size(per_channel) > 1:
            # one scale per channel, into the MAC directly (MobileNet-v1's depthwise convolutions) or through a
            # MaxPool (NNCF's placement): the codes are
            # the executed input divided by the scale broadcast as the quantizer broadcasts it (a
            # DequantizeLinear's 1-D scale along its axis attribute)
            scale = np.asarray(per_channel, dtype=np.float64)
            if op == "DequantizeLinear":
                rank = len(model.get_tensor_shape(tensor) or with_shapes(model).get_tensor_shape(tensor))
                axis = int(_attr(producer, "axis", 1)) % rank
                scale = scale.reshape([scale.size if a == axis else 1 for a in range(rank)])
            if not (np.all(scale > 0) or np.all(scale < 0)):
                raise Undescribed(f"{producer.name}: per-channel scales of both signs")
            has_zero = len(producer.input) > 2 and producer.input[2]
            zeros = np.unique(_const(model, producer.input[2])) if has_zero else np.zeros(1)
            if zeros.size != 1:
                raise Undescribed(f"{producer.name}: per-channel zero points")
            zero = round(float(zeros[0]))
        elif op in ("Quant", "IntQuant", "DequantizeLinear"):
            scale = _scalar(model, producer.input[1], f"{producer.name} scale")
            zero = round(_scalar(model, producer.input[2], "zero point")) if len(producer.input) > 2 and producer.input[2] else 0
        elif op == "BipolarQuant":
            scale, zero = _scalar(model, producer.input[1], f"{producer.name} scale"), 0
        elif op == "MultiThreshold":  # values out_scale * k + out_bias: the MAC sees them as they are
            scale, zero = float(_attr(producer, "out_scale", 1.0)), 0
            ops.append(("Add", float(_attr(producer, "out_bias", 0.0))))
        elif op == "QuantAvgPool2d":  # FINN's average pool: the (shifted) sum of integer codes, an integer
            scale, zero = 1.0, 0
        elif op == "Trunc":  # qonnx Trunc v2: codes on the output scale's grid, zero point on the input's
            scale = _scalar(model, producer.input[4], f"{producer.name} output scale")
            zero = round(_scalar(model, producer.input[2], "zero point") * _scalar(model, producer.input[1], "scale") / scale)
        elif model.get_tensor_datatype(tensor).is_integer():  # a FINN HW layer's thresholded output, as annotated
            scale, zero = 1.0, 0
        else:
            raise Undescribed(f"{tensor!r} comes from {op} {producer.name!r}")
        break
    for op, value in reversed(ops):  # from the quantizer down to the MAC
        if op == "Mul":
            scale *= value
        elif not np.isclose(value / scale, round(value / scale), rtol=0, atol=1e-6):
            raise Undescribed(f"an Add of {value} is not a whole number of steps {scale}")
    return scale, zero, producer


def weight_scale(model: ModelWrapper, mac, parameter: int = 1) -> np.ndarray:
    """The weight quantizer's scale broadcast to the weight as the MAC consumes it (executed through the moves);
    ``parameter`` 2: its zero point (0 where it has none)."""
    tensor = mac.input[1]
    moves, factor = [], None  # factor: a constant Mul right after the quantizer (qonnx's ExtractQuantScaleZeroPt)
    while True:
        producer = model.find_producer(tensor)
        if producer is None:
            weights = _const(model, tensor)
            if weights is None or not np.array_equal(weights, np.round(weights)):
                raise Undescribed(f"weight {tensor!r} is neither quantized nor integer")
            return np.full(1, 1.0 if parameter == 1 else 0.0, np.float32)  # FINN: integer weights, the scale behind
        if producer.op_type in WEIGHT_QUANTIZERS:
            break
        before = model.find_producer(producer.input[0])
        if (producer.op_type == "Mul" and factor is None and _const(model, producer.input[1]) is not None
                and before is not None and before.op_type in ("Quant", "IntQuant")):
            factor, grid_out = np.asarray(_const(model, producer.input[1]), np.float32), producer.output[0]
            tensor = producer.input[0]
            continue
        if producer.op_type not in WEIGHT_MOVES or factor is not None:
            raise Undescribed(f"weight {mac.input[1]!r} comes from {producer.op_type} {producer.name!r}")
        moves.append(producer)
        tensor = producer.input[0]
    kept: list = []
    _ancestors(model, producer.output[0], kept)
    codes = execute(_subgraph(model, kept, [], [producer.output[0]], 1), {})[producer.output[0]]
    given = len(producer.input) > parameter and producer.input[parameter]
    scale = np.asarray(_const(model, producer.input[parameter]) if given else 0.0, dtype=np.float32)
    if producer.op_type == "DequantizeLinear" and scale.ndim == 1 and scale.size > 1:
        axis = _attr(producer, "axis", 1) % codes.ndim
        scale = scale.reshape([-1 if d == axis else 1 for d in range(codes.ndim)])
    if factor is None:
        grid_out, shape = producer.output[0], codes.shape
    else:  # the products lie on the quantizer's step times the factor; the zero point stays in codes
        shape = np.broadcast_shapes(codes.shape, factor.shape)
        scale = scale * factor if parameter == 1 else scale
    image = np.broadcast_to(scale, shape).astype(np.float32)
    if not moves:
        return image
    return execute(_subgraph(model, moves, [grid_out], [mac.input[1]], shape[0]), {grid_out: image})[mac.input[1]]


def describe_layer(model: ModelWrapper, name: str) -> LayerInfo:
    """The oracle's description of float MAC node ``name`` (raises :class:`Undescribed`)."""
    mac = _node(model, name)
    scale, zero = activation_grid(model, mac.input[0])
    weight_zero = weight_scale(model, mac, parameter=2)  # under fold the MAC multiplies codes, zero point included
    return LayerInfo(name, mac.op_type, weight_scale(model, mac), scale, zero,
                     weight_zero_point=weight_zero if np.any(weight_zero != 0) else None)


def _integer_layer_model(model: ModelWrapper, mac, zero_point: str) -> tuple[ModelWrapper, LayerInfo, dict]:
    """The one-layer float model an integer MAC op is defined by, its LayerInfo and the source's code range."""
    float_op, x_zp_input, w_input, wz_input = INTEGER_MACS[mac.op_type]
    w = _const(model, mac.input[w_input])
    if w is None and float_op == "MatMul":
        return _integer_act_x_act_model(model, mac, zero_point)
    w = np.asarray(w)
    if w is None or w.dtype.kind not in "iu":
        raise Undescribed(f"{mac.name}: weight {mac.input[w_input]!r} is not an integer constant")
    wz_name = mac.input[wz_input] if len(mac.input) > wz_input else ""
    wz = np.asarray(_const(model, wz_name) if wz_name else np.zeros(1, w.dtype)).astype(np.int64)
    trans_b = bool(_attr(mac, "transB", 0))
    channel_axis = 0 if float_op == "Conv" or (float_op == "Gemm" and trans_b) else 1
    shape = [-1 if d == channel_axis else 1 for d in range(w.ndim)]
    q = w.astype(np.int64) - (wz.reshape(shape) if wz.size > 1 else wz.reshape(())) if zero_point == "subtract" else w
    lo, hi, zero = _integer_codes(model, mac, 0, x_zp_input, zero_point)
    attrs = {a.name: helper.get_attribute_value(a) for a in mac.attribute
             if a.name in ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad", "transA", "transB")}
    x_shape = [1] + list(model.get_tensor_shape(mac.input[0]))[1:]
    if _attr(mac, "channels_last", 0):  # onnxruntime's com.microsoft QLinearConv reads NHWC; ONNX's Conv NCHW
        x_shape = [1, x_shape[-1], *x_shape[1:-1]]
    # the MAC reads t = codes - zero point (the oracle adds the zero point back under fold, padded taps included)
    layer = _one_layer([helper.make_node(float_op, ["t", "w"], ["acc"], name=mac.name, **attrs)], x_shape, q)
    return layer, LayerInfo(mac.name, float_op, np.ones(1, np.float32), 1.0, zero), {"t": (lo - zero, hi - zero)}


def _integer_data_info(model: ModelWrapper, mac) -> LayerInfo:
    """An integer op for property (j): its codes are the executed integer tensors themselves (scale 1), read with
    their executed zero points by ``oracle.data_accumulators``."""
    act_x_act = _const(model, mac.input[INTEGER_MACS[mac.op_type][2]]) is None
    return LayerInfo(mac.name, mac.op_type, None if act_x_act else np.ones(1, np.float32), 1.0,
                     operand_scale=1.0 if act_x_act else None, act_x_act=act_x_act)


def _integer_codes(model: ModelWrapper, mac, data: int, zp_input: int, zero_point: str) -> tuple[int, int, int]:
    """``(lo, hi, zero)``: the codes of the integer operand at input ``data`` (its storage type) and the zero point
    at input ``zp_input`` the MAC subtracts (0 under subtract with a run-time zero point: then the codes are the
    differences themselves)."""
    if zp_input < 0:  # uint8 codes with a zero point chosen per run
        return (-255, 255, 0) if zero_point == "subtract" else (0, 255, 0)
    name = mac.input[data]
    zp_name = mac.input[zp_input] if len(mac.input) > zp_input else ""
    zp = _const(model, zp_name) if zp_name else None
    dynamic = bool(zp_name) and zp is None  # DynamicQuantizeLinear: a zero point computed per run
    elem = model.get_tensor_valueinfo(name).type.tensor_type.elem_type if model.get_tensor_valueinfo(name) else None
    info = np.iinfo(np.dtype(zp.dtype if zp is not None else INTEGER_ELEM.get(elem, np.uint8)))
    if dynamic and zero_point == "subtract":  # x - z with both in the storage range, z chosen per run
        return int(info.min) - int(info.max), int(info.max) - int(info.min), 0
    return int(info.min), int(info.max), 0 if zp is None or dynamic else int(np.asarray(zp).reshape(()))


def _integer_act_x_act_model(model: ModelWrapper, mac, zero_point: str) -> tuple[ModelWrapper, LayerInfo, dict]:
    """A QLinearMatMul/MatMulInteger of two integer activations as ``MatMul(t, u)``, each input taking every code
    of its operand's storage type (less its zero point)."""
    _, a_zp, b, b_zp = INTEGER_MACS[mac.op_type]
    (a_lo, a_hi, az), (b_lo, b_hi, bz) = (_integer_codes(model, mac, 0, a_zp, zero_point),
                                          _integer_codes(model, mac, b, b_zp, zero_point))
    shapes = [[1] + list(model.get_tensor_shape(mac.input[i]))[1:] for i in (0, b)]
    graph = helper.make_graph([helper.make_node("MatMul", ["t", "u"], ["acc"], name=mac.name)], "layer",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
                               zip("tu", shapes)], [helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)])
    layer = _infer_shapes(ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])))
    info = LayerInfo(mac.name, "MatMul", None, 1.0, az, 1.0, bz, act_x_act=True)
    return layer, info, {"t": (a_lo - az, a_hi - az), "u": (b_lo - bz, b_hi - bz)}


def _reads_activations(model: ModelWrapper, tensor: str) -> bool:
    """Whether ``tensor`` is computed from a graph input (not from constants alone)."""
    kept: list = []
    _ancestors(model, tensor, kept)
    inputs = {vi.name for vi in model.graph.input} - {init.name for init in model.graph.initializer}
    return tensor in inputs or any(t in inputs for n in kept for t in n.input)


def _act_x_act_model(model: ModelWrapper, mac) -> tuple[ModelWrapper, LayerInfo, dict]:
    """A float MatMul of two quantized activations, each operand's quantizer reading a fresh graph input of its own:
    the operands then reach their extremes independently, as the analysis assumes (attention's q and k are
    both computed from one input)."""
    model = ModelWrapper(copy.deepcopy(model.model))
    grids, freed = [], []
    for i, tensor in enumerate(mac.input[:2]):
        scale, zero, node = _activation_source(model, tensor)
        grids += [scale, zero]
        if node is None:  # an integer graph input: already a source of its own
            continue
        quantizer = node
        if node.op_type == "DequantizeLinear":  # QDQ: free the QuantizeLinear's float input (Clips kept)
            upstream = model.find_producer(node.input[0])
            while upstream is not None and upstream.op_type in WEIGHT_MOVES:  # Clip, and moves of the codes
                upstream = model.find_producer(upstream.input[0])
            if upstream is None or upstream.op_type != "QuantizeLinear":
                raise Undescribed(f"{mac.name}: operand {tensor!r} is dequantized from codes no QuantizeLinear computes")
            quantizer = upstream
        if any(quantizer is other for other in freed):
            raise Undescribed(f"{mac.name}: both operands come from quantizer {quantizer.name!r}")
        source = f"oracle_operand_{i}"
        model.graph.input.append(helper.make_tensor_value_info(
            source, TensorProto.FLOAT, list(model.get_tensor_shape(quantizer.input[0]))))
        quantizer.input[0] = source
        freed.append(quantizer)
    info = LayerInfo(mac.name, "MatMul", None, grids[0], grids[1], grids[2], grids[3], act_x_act=True)
    return model, info, {}


def _one_layer(nodes: list, x_shape: list[int], weights: np.ndarray) -> ModelWrapper:
    """``nodes`` alone, reading graph input ``t`` and the constant weights ``w``."""
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("t", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(weights, np.float32), "w")])
    return _infer_shapes(ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])))


def _pixel_padding_chain(model: ModelWrapper, mac) -> list:
    """The FINN nodes from an ``FMPadding_Pixel`` to the MVAU's input (padding, sliding window), copied as the
    abstract ops that execute in Python; empty where the MVAU reads no pixel-padded input."""
    chain, tensor = [], mac.input[0]
    while (producer := model.find_producer(tensor)) is not None:
        node = copy.deepcopy(producer)
        for suffix in ("_hls", "_rtl"):
            node.op_type, node.domain = node.op_type.removesuffix(suffix), "finn.custom_op.fpgadataflow"
        if node.op_type not in FINN_WINDOW_OPS:
            return []
        chain.insert(0, node)
        if node.op_type == "FMPadding_Pixel":
            return chain
        tensor = producer.input[0]
    return []


def _finn_layer_model(model: ModelWrapper, mac) -> tuple[ModelWrapper, LayerInfo, dict]:
    """An MVAU as MatMul, a VVAU as one depthwise window (every window tap free): inputs of ``inputDataType``.
    An MVAU reading a window over pixel-padded input (a lowered ConvTranspose) keeps that padding and window in
    front of its MatMul, so the inserted zeros stay zeros: the input codes are those of the pixels."""
    dtype = DataType[_attr(mac, "inputDataType", b"").decode() if isinstance(_attr(mac, "inputDataType", ""), bytes)
                     else _attr(mac, "inputDataType", "")]
    if _attr(mac, "binaryXnorMode", 0):
        raise Undescribed(f"{mac.name}: binaryXnorMode counts matches, not products")
    w = np.asarray(model.get_initializer(mac.input[1]), dtype=np.float32)
    chain = _pixel_padding_chain(model, mac) if mac.op_type in MVAU_OPS else []
    if chain:
        x_shape = list(model.get_tensor_shape(chain[0].input[0]))
        chain[0].input[0] = "t"
        node = helper.make_node("MatMul", [chain[-1].output[0], "w"], ["acc"], name=mac.name)
        layer = _one_layer([*chain, node], x_shape, w)
        for tensor in (n.output[0] for n in chain):
            layer.set_tensor_shape(tensor, list(model.get_tensor_shape(tensor)))
        return layer, LayerInfo(mac.name, "MatMul", np.ones(1, np.float32), 1.0, 0), \
            {"t": (int(dtype.min()), int(dtype.max()))}
    if mac.op_type in MVAU_OPS:
        x_shape, node = [1, w.shape[0]], helper.make_node("MatMul", ["t", "w"], ["acc"], name=mac.name)
    else:
        channels, k = w.shape[0], list(w.shape[2:])
        x_shape = [1, channels, *k]
        node = helper.make_node("Conv", ["t", "w"], ["acc"], name=mac.name, group=channels, kernel_shape=k)
    layer = _one_layer([node], x_shape, w)
    op = "MatMul" if mac.op_type in MVAU_OPS else "Conv"
    return layer, LayerInfo(mac.name, op, np.ones(1, np.float32), 1.0, 0), {"t": (int(dtype.min()), int(dtype.max()))}


def is_mac(node) -> bool:
    return node.op_type in FLOAT_MACS or node.op_type in INTEGER_MACS or node.op_type in MVAU_OPS + VVAU_OPS + \
        FINN_ATTENTION or \
        (node.domain == "com.microsoft" and node.op_type in CONTRIB_MACS) or \
        (node.domain in ("qonnx.custom_op.general", "onnx.brevitas") and node.op_type in QONNX_MACS)


def with_shapes(model: ModelWrapper) -> ModelWrapper:
    """Every tensor's shape: qonnx's shape inference, or, where it cannot run (onnxruntime's ``com.microsoft``
    ops), onnxruntime executing the file on zeros with every tensor as an output."""
    import onnxruntime as ort

    model = ModelWrapper(copy.deepcopy(model.model))
    for node in model.graph.node:  # old Brevitas exports: qonnx's own cleanup moves these ops to its domain too
        if node.domain == "onnx.brevitas":
            node.domain = QONNX_DOMAIN
    if QONNX_DOMAIN not in model.get_opset_imports():
        model.model.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    # a value_info without a shape (qonnx's QKeras converter writes them) reads as rank 0 in qonnx: drop it
    shapeless = [vi for vi in model.graph.value_info if not vi.type.tensor_type.HasField("shape")]
    for vi in shapeless:
        model.graph.value_info.remove(vi)
    # a batch left symbolic (tf2onnx, dynamic-axes exports) reads as 0 in qonnx, whose executor runs only the
    # declared shape: one sample at a time
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value and model.get_initializer(vi.name) is None:
            dims[0].Clear()
            dims[0].dim_value = 1
    if all(model.get_tensor_shape(t) is not None for n in model.graph.node for t in n.output if t):
        return model  # shaped already (a lowered FINN graph: qonnx cannot infer the shape of FINN's HW Reshape)
    try:  # constant shape computations folded (Brevitas' old Flatten exports: Shape -> Gather -> ... -> Reshape)
        model = model.transform(InferShapes()).transform(FoldConstants(exclude_op_types=QUANTIZER_OPS))
        model = model.transform(InferShapes())
    except Exception:  # noqa: BLE001 - an op qonnx cannot infer: onnxruntime below
        pass
    if all(model.get_tensor_shape(t) is not None for n in model.graph.node for t in n.output if t):
        return model
    proto = copy.deepcopy(model.model)
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_empty_tensor_value_info(t) for n in proto.graph.node for t in n.output
                              if t and t not in known)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim],
                             helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in session.get_inputs()
            for i in [model.get_tensor_valueinfo(i.name)]}
    # onnxruntime's Python binding returns no 4-bit or 2-bit tensor (a QuantizeLinear's int4 codes): those
    # elementwise outputs take their input's shape
    sub_byte = {o.name: SUB_BYTE_TYPES[o.type] for o in session.get_outputs() if o.type in SUB_BYTE_TYPES}
    fetched = [o.name for o in session.get_outputs() if o.name not in sub_byte]
    values = dict(zip(fetched, session.run(fetched, feed)))
    for name, value in values.items():
        if name not in known and model.get_initializer(name) is None:
            model.set_tensor_shape(name, list(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype))
    for name, elem_type in sub_byte.items():
        producer = model.find_producer(name)
        if producer.op_type in ("QuantizeLinear", "Cast", "Identity") and producer.input[0] in values:
            model.set_tensor_shape(name, list(values[producer.input[0]].shape), elem_type)
    return model


SUB_BYTE_TYPES = {"tensor(int4)": TensorProto.INT4, "tensor(uint4)": TensorProto.UINT4,
                  "tensor(int2)": TensorProto.INT2, "tensor(uint2)": TensorProto.UINT2}


def standard_data_ops(model: ModelWrapper) -> ModelWrapper:
    """A copy with FINN's specialised layers as the HW layers they implement, and its HW data-movement layers as the
    standard ops they are defined by (``convert_to_hw`` made them from these): ``Shuffle`` = Reshape -> Transpose -> Reshape, ``DuplicateStreams`` = one Identity per output,
    ``ElementwiseMul`` = Mul, FINN's ``Reshape`` = Reshape. Their own attributes fix the batch to 1; the standard ops run any batch."""
    model = ModelWrapper(copy.deepcopy(model.model))
    for node in model.graph.node:  # SpecializeLayers picks an implementation (X_hls, X_rtl) of the HW layer X
        for backend in ("hls", "rtl"):
            if node.domain == f"finn.custom_op.fpgadataflow.{backend}" and node.op_type.endswith(f"_{backend}"):
                node.domain, node.op_type = "finn.custom_op.fpgadataflow", node.op_type[:-len(backend) - 1]
    for index, node in reversed(list(enumerate(model.graph.node))):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shuffle":
            if attrs["perm"][0] != 0:
                raise Undescribed(f"{node.name}: Shuffle moves the batch axis")
            shapes = [f"{node.name}_in_shape", f"{node.name}_out_shape"]
            model.set_initializer(shapes[0], np.array([-1, *attrs["transpose_in_shape"][1:]], np.int64))
            model.set_initializer(shapes[1], np.array([-1, *attrs["out_shape"][1:]], np.int64))
            standard = [helper.make_node("Reshape", [node.input[0], shapes[0]], [f"{node.name}_in"]),
                        helper.make_node("Transpose", [f"{node.name}_in"], [f"{node.name}_moved"], perm=attrs["perm"]),
                        helper.make_node("Reshape", [f"{node.name}_moved", shapes[1]], [node.output[0]], name=node.name)]
        elif node.op_type == "DuplicateStreams":
            standard = [helper.make_node("Identity", [node.input[0]], [out]) for out in node.output]
        elif node.op_type == "ElementwiseMul":
            standard = [helper.make_node("Mul", list(node.input), list(node.output), name=node.name)]
        elif node.op_type == "Reshape" and node.domain.startswith("finn."):
            model.set_initializer(f"{node.name}_out_shape", np.array([-1, *attrs["out_shape"][1:]], np.int64))
            standard = [helper.make_node("Reshape", [node.input[0], f"{node.name}_out_shape"], list(node.output),
                                         name=node.name)]
        else:
            continue
        model.graph.node.remove(node)
        for offset, new in enumerate(standard):
            model.graph.node.insert(index + offset, new)
    return model


def _xnor_popcount_range(model: ModelWrapper, mac, seed: int) -> ExecutedRange:
    """qonnx's XnorPopcountMatMul executed alone on 0/1 inputs (the only ones it counts) with the weights of ``mac``
    (one, or FINN's MVAU in binaryXnorMode, which executes the same function): each weight column, its complement
    (every bit matching, none matching) and random bits; the node's output is its accumulator."""
    weights = model.get_initializer(mac.input[1])
    if weights is None:
        raise Undescribed(f"{mac.name}: weights are not an initializer")
    columns = weights.T.astype(np.float32)
    x = np.concatenate([columns, 1 - columns, np.random.default_rng(seed).integers(0, 2, (16, weights.shape[0]))])
    node = helper.make_node("XnorPopcountMatMul", ["x", "w"], ["acc"], domain=QONNX_DOMAIN)
    graph = helper.make_graph([node], "xnor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights.astype(np.float32), "w")])
    layer = _infer_shapes(ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                                               helper.make_opsetid(QONNX_DOMAIN, 1)])))
    layer.set_tensor_datatype("x", DataType["BINARY"])
    acc = np.round(execute(layer, {"x": x.astype(np.float32)})["acc"]).astype(np.int64)
    return ExecutedRange(acc.min(axis=0), acc.max(axis=0))


def executed_range(model: ModelWrapper, name: str, zero_point: str = "fold", seed: int = 0) -> ExecutedRange:
    """Executed worst-case accumulator range of MAC node ``name`` of a real file (raises :class:`Undescribed`)."""
    model = with_shapes(standard_data_ops(model))
    mac = _node(model, name)
    if mac.op_type == "XnorPopcountMatMul" or (mac.op_type in MVAU_OPS and _attr(mac, "binaryXnorMode", 0)):
        return _xnor_popcount_range(model, mac, seed)  # (an MVAU's (MW, MH) weights: a MatMul's)
    if mac.op_type in INTEGER_MACS:
        layer, info, ranges = _integer_layer_model(model, mac, zero_point)
    elif mac.op_type in MVAU_OPS + VVAU_OPS:
        layer, info, ranges = _finn_layer_model(model, mac)
    elif mac.op_type == "MatMul" and _reads_activations(model, mac.input[1]):
        layer, info, ranges = _act_x_act_model(model, mac)
    else:
        layer, info, ranges = model, describe_layer(model, name), {}
    return layer_range(layer, Case(layer, [info], zero_point, source_ranges=ranges), info, seed)


def mac_inputs_outside_their_types(model: ModelWrapper, samples: int = 4, seed: int = 0) -> list[str]:
    """Each MVAU/VVAU of FINN graph ``model`` whose input, as the whole graph executes, holds a value its
    ``inputDataType`` does not (``NODE: value V outside TYPE``). :func:`executed_range` drives a FINN layer over its
    ``inputDataType``: this checks that type against what reaches the layer (FINN derives it from its own annotations,
    e.g. a Concat typed as its first input). Inputs: every integer-annotated graph input over its type, float ones
    from a hundredth to a hundred times unit scale, so that every input quantizer reaches both ends of its range."""
    from qonnx.core.onnx_exec import execute_onnx

    rng = np.random.default_rng(seed)
    macs = [n for n in model.graph.node if n.op_type in MVAU_OPS + VVAU_OPS]
    found: dict[str, str] = {}
    for sample in range(samples if macs else 0):
        feed = {}
        for vi in model.graph.input:
            if model.get_initializer(vi.name) is not None:
                continue
            shape, dt = model.get_tensor_shape(vi.name), model.get_tensor_datatype(vi.name)
            if dt.is_integer():
                values = rng.integers(int(dt.min()), int(dt.max()) + 1, size=shape)
                values = np.where(values == 0, 1, values) if dt == DataType["BIPOLAR"] else values
            else:
                values = rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 2, size=shape)
            feed[vi.name] = values.astype(np.float32)
        context = execute_onnx(model, feed, return_full_exec_context=True)
        for node in macs:
            dt = DataType[_attr(node, "inputDataType", b"FLOAT32").decode()]
            bad = next((v for v in np.unique(context[node.input[0]]) if not dt.allowed(v)), None)
            if bad is not None and node.name not in found:
                found[node.name] = f"{node.name}: input value {bad:g} outside its inputDataType {dt.name}"
    return list(found.values())


def simulation_case(model: ModelWrapper, names: list[str], zero_point: str = "fold",
                    input_dtype: str | None = None) -> Case:
    """A :class:`Case` of the layers of ``names`` that ``verify --data`` simulates and the oracle describes (float
    weight layers, float MatMuls of two activations, integer MAC ops, FINN's MVAU/VVAU) for property (j) on a real file: the
    whole file then runs on data; ``input_dtype``: the user's claim for every float graph input."""
    model = with_shapes(standard_data_ops(model))
    infos = []
    for name in names:
        mac = _node(model, name)
        try:
            if mac.op_type == "MatMul" and _reads_activations(model, mac.input[1]):
                infos.append(_act_x_act_model(model, mac)[1])
            elif mac.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and mac.domain == "":
                infos.append(describe_layer(model, name))
            elif mac.op_type in DATA_INTEGER_MACS and mac.domain in ("", "ai.onnx", "com.microsoft"):
                infos.append(_integer_data_info(model, mac))
            elif mac.op_type in ("MVAU", "VVAU", "XnorPopcountMatMul"):  # FINN's, qonnx's: integer (or 0/1) codes
                infos.append(LayerInfo(name, mac.op_type, np.ones(1, np.float32), 1.0))
        except Undescribed:
            continue  # not claimed either way
    sources = [vi.name for vi in model.graph.input if model.get_initializer(vi.name) is None]
    return Case(model, infos, zero_point, input_dtypes=[f"{s}={input_dtype}" for s in sources] if input_dtype else [])
