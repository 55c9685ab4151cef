"""A signed quantizer of a Relu's output never gives a code below that of real 0.

Brevitas' graph-mode PTQ (and hand-built nets with a signed ``QuantIdentity`` after ``nn.ReLU``) put a signed
quantizer right after each ReLU; onnxruntime's QDQ does the same with int8 activations. Its negative codes never
occur, so the exact range of the next layer is about one bit narrower than the quantizer's type suggests.

Every test runs the whole graph, Relu included, with qonnx's executor (or onnxruntime for QDQ) on every vertex of
a box of real inputs far past the quantizer's clamp on both sides, and compares the executed accumulators with the
analysed range (equal: the range is exact) and, after ``project`` to one bit below the signed-range width, with the
promised width.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, load_model_from_string, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes import bounds
from a2q_passes.analysis import analyze_model
from a2q_passes.certificate.input_codes import InputCodes
from a2q_passes.input_grids import GridResolver
from a2q_passes.transforms.project import ProjectToAccumulator
from tests.test_verify import QONNX_DOMAIN

X_SCALE, W_SCALE = 0.5, 0.25  # powers of two: float execution of small integers is exact
REALS = 1000.0  # far past every clamp below


def real_vertices(k: int) -> np.ndarray:
    """Every input of k reals each -REALS or +REALS: a Relu and a monotone quantizer map them to the extreme codes."""
    return np.array(list(itertools.product((-REALS, REALS), repeat=k)), dtype=np.float32)


def _const(name: str, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qonnx_model(q: np.ndarray, bits: int, zero_point: int, between: str = "", scale: float = X_SCALE,
                rounding: str = "ROUND", narrow: bool = False, before: str = "Relu", clip_low: float = 0.0) -> ModelWrapper:
    """x -> ``before`` (Relu; Add of 1; Clip from ``clip_low`` to 100, as ReLU6 exports) -> [between] -> signed
    Quant -> MatMul(Quant(W)) with integer weights ``q`` (K, C)."""
    k = q.shape[0]
    inputs = {"Add": ["x", "offset"], "Clip": ["x", "clip_low", "clip_high"]}.get(before, ["x"])
    nodes = [helper.make_node(before, inputs, ["r"], name="act")]
    act = "r"
    if between == "Reshape":
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["b"], name="between"))
        act = "b"
    elif between == "Identity":
        nodes.append(helper.make_node("Identity", ["r"], ["b"], name="between"))
        act = "b"
    nodes += [
        helper.make_node("Quant", [act, "sx", "zx", "bx"], ["qx"], name="qx", domain=QONNX_DOMAIN, signed=1,
                         narrow=int(narrow), rounding_mode=rounding),
        helper.make_node("Quant", ["w", "sw", "zw", "bw"], ["qw"], name="qw", domain=QONNX_DOMAIN, signed=1,
                         narrow=1, rounding_mode="ROUND"),
        helper.make_node("MatMul", ["qx", "qw"], ["y"], name="mm"),
    ]
    inits = [_const("sx", scale), _const("zx", zero_point), _const("bx", bits), _const("w", q * W_SCALE),
             _const("sw", np.full((1, q.shape[1]), W_SCALE)), _const("zw", 0.0), _const("bw", 8.0),
             _const("shape", [1, k], np.int64), _const("offset", 1.0), _const("clip_low", clip_low),
             _const("clip_high", 100.0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    proto.ir_version = 10
    return ModelWrapper(proto).transform(InferShapes())


def executed_qonnx(model: ModelWrapper, x_scale: float = X_SCALE, zero_point: int = 0) -> np.ndarray:
    """Per input vertex and channel, the accumulator of raw codes (``fold``: the MAC sees ``code``, real
    ``(code - z) s``), from executing the whole graph one sample at a time."""
    k = model.get_tensor_shape("x")[1]
    q = np.rint(execute_onnx(model, {"x": np.zeros((1, k), np.float32)}, return_full_exec_context=True)["qw"] / W_SCALE)
    rows = []
    for x in real_vertices(k):
        y = execute_onnx(model, {"x": x[None]})["y"].astype(np.float64) / (x_scale * W_SCALE)
        rows.append(np.rint(y)[0] + zero_point * q.sum(axis=0))
    return np.array(rows, dtype=np.int64)


Q = np.array([[3, -2, 0], [-1, 5, -7], [2, 2, 1], [-4, 0, 6]])


@pytest.mark.parametrize("bits,zero_point,between,rounding,narrow", [
    (4, 0, "", "ROUND", False),
    (4, 0, "Reshape", "FLOOR", True),
    (3, 2, "Identity", "CEIL", False),
    (5, -3, "", "HALF_DOWN", False),
    (4, 9, "", "ROUND", False),  # the code of real 0 lies above the codes: every code is the top one
])
@pytest.mark.parametrize("before", ["Relu", "Clip"])
def test_analysis_is_exact_and_project_keeps_its_promise(bits, zero_point, between, rounding, narrow, before):
    model = qonnx_model(Q, bits, zero_point, between, rounding=rounding, narrow=narrow, before=before)
    executed = executed_qonnx(model, zero_point=zero_point)
    report = analyze_model(model, zero_point="fold", per_channel=True).layers[0]
    assert report.status == "ok"
    assert (report.acc_min, report.acc_max) == (int(executed.min()), int(executed.max()))
    assert report.per_channel["acc_min"] == executed.min(axis=0).tolist()
    assert report.per_channel["acc_max"] == executed.max(axis=0).tolist()
    target = report.bounds["exact"] - 1
    projection = ProjectToAccumulator(target, zero_point="fold")
    projected = model.transform(projection)  # its ensures runs the independent certificate on the output
    after = executed_qonnx(projected, zero_point=zero_point)
    assert bounds.fits(int(after.min()), int(after.max()), target)


def test_the_signed_range_alone_would_cost_a_bit():
    model = qonnx_model(Q, 4, 0)
    relu_aware = analyze_model(model).layers[0].bounds["exact"]
    model.graph.node[0].op_type = "Identity"  # the same graph without the Relu: negative codes occur
    executed = executed_qonnx(model)
    plain = analyze_model(model).layers[0]
    assert (plain.acc_min, plain.acc_max) == (int(executed.min()), int(executed.max()))
    assert plain.bounds["exact"] == relu_aware + 1


@pytest.mark.parametrize("between,before", [("", "Relu"), ("Reshape", "Relu"), ("", "Clip")])
def test_the_fuzz_oracle_executes_the_relu_in_front_of_the_quantizer(between, before):
    # the independent oracle of the fuzzer and the corpus cuts the graph above the Relu or Clip (the Reshape there
    # fixes the batch at 1, as exporters write it: the cut then runs one sample at a time)
    from tests.fuzz.real_files import executed_range

    model = qonnx_model(Q, 4, 0, between, before=before)
    oracle = executed_range(model, "mm")
    executed = executed_qonnx(model)
    assert (oracle.lo, oracle.hi) == (int(executed.min()), int(executed.max()))
    report = analyze_model(model).layers[0]
    assert (report.acc_min, report.acc_max) == (oracle.lo, oracle.hi)


@pytest.mark.parametrize("before,scale,clip_low", [("Sigmoid", X_SCALE, 0.0), ("Add", X_SCALE, 0.0),
                                                   ("Relu", -X_SCALE, 0.0), ("Clip", X_SCALE, -1.0)])
def test_other_inputs_keep_the_quantizers_whole_range(before, scale, clip_low):
    # a Sigmoid's output is >= 0 too, but nothing here reads that; an Add of a Relu is not known >= 0; a negative
    # scale turns reals >= 0 into codes <= z; a Clip from -1 lets negative reals through: the codes read stay the
    # quantizer's own, and hold what executes
    model = qonnx_model(Q, 4, 0, scale=scale, before=before, clip_low=clip_low)
    grid, reason = GridResolver(model).resolve("qx")
    assert reason == "" and grid.range == bounds.IntRange(-8, 7)
    executed = executed_qonnx(model, x_scale=scale)
    report = analyze_model(model).layers[0]
    assert report.acc_min <= executed.min() and executed.max() <= report.acc_max


@pytest.mark.parametrize("zero_point,between,expected", [
    (0, "", (0, 7, "UINT3")),  # lower's rewrite makes it FINN's unsigned 3-bit Quant
    (2, "", (-16, 15, "INT5")),  # a zero point: codes q - z = [-10, 5] as lower makes them, in their INT5
    (0, "Identity", (-8, 7, "INT4")),  # not right after the Relu: not rewritten either
])
def test_finn_ranges_hold_the_datatype_finn_sizes_for(zero_point, between, expected):
    model = qonnx_model(Q, 4, zero_point, between)
    grid, _ = GridResolver(model, input_ranges="finn").resolve("qx")
    assert (grid.range.lo, grid.range.hi, grid.dtype) == expected
    certificate = InputCodes(model, None, input_ranges="finn").grid("qx")
    assert (certificate.lo, certificate.hi) == expected[:2]


@pytest.mark.parametrize("between", ["", "Reshape"])
def test_certificate_reads_the_same_codes_by_executing_the_quantizer(between):
    model = qonnx_model(Q, 4, 2, between)
    grid = InputCodes(model, None).grid("qx")
    assert (grid.lo, grid.hi, grid.zero) == (2, 7, 2)
    model.graph.node[0].op_type = "Identity"
    grid = InputCodes(model, None).grid("qx")
    assert (grid.lo, grid.hi) == (-8, 7)


# --------------------------------------------------------------------------- QDQ (onnxruntime)


def qdq_model(q: np.ndarray, zero_point: int, clip: tuple[int, int] | None, before: str = "Relu") -> bytes:
    """x -> ``before`` (Relu, or a float Clip from 0 to 100) -> QuantizeLinear(int8) -> [integer Clip] ->
    DequantizeLinear -> MatMul(DequantizeLinear(int8 W))."""
    k = q.shape[0]
    nodes = [helper.make_node(before, ["x", "flo", "fhi"] if before == "Clip" else ["x"], ["r"], name="act"),
             helper.make_node("QuantizeLinear", ["r", "sx", "zx"], ["c"], name="qx")]
    codes = "c"
    if clip is not None:
        nodes.append(helper.make_node("Clip", ["c", "clo", "chi"], ["cc"], name="clip"))
        codes = "cc"
    nodes += [helper.make_node("DequantizeLinear", [codes, "sx", "zx"], ["dx"], name="dqx"),
              helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"], name="dqw"),
              helper.make_node("MatMul", ["dx", "w"], ["y"], name="mm")]
    inits = [_const("sx", X_SCALE), _const("zx", zero_point, np.int8), _const("wq", q, np.int8),
             _const("sw", W_SCALE), _const("clo", (clip or (0, 0))[0], np.int8),
             _const("chi", (clip or (0, 0))[1], np.int8), _const("flo", 0.0), _const("fhi", 100.0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, q.shape[1]])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return proto.SerializeToString()


@pytest.mark.parametrize("zero_point,clip,before", [(0, None, "Relu"), (-5, None, "Relu"), (0, (-8, 7), "Relu"),
                                                   (3, (-8, 7), "Relu"), (-20, (-8, 7), "Relu"), (0, None, "Clip")])
def test_qdq_after_relu_is_exact(zero_point, clip, before):
    data = qdq_model(Q, zero_point, clip, before)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    executed = []
    for x in real_vertices(Q.shape[0]):
        y = session.run(None, {"x": x[None]})[0].astype(np.float64) / (X_SCALE * W_SCALE)
        executed.append(np.rint(y)[0] + zero_point * Q.sum(axis=0))  # fold: the MAC sees the raw codes
    executed = np.array(executed, dtype=np.int64)
    model = ModelWrapper(load_model_from_string(data))
    report = analyze_model(model, zero_point="fold").layers[0]
    assert report.status == "ok"
    assert (report.acc_min, report.acc_max) == (int(executed.min()), int(executed.max()))
    grid = InputCodes(model, None).grid("dx")
    reader, _ = GridResolver(model).resolve("dx")
    assert (grid.lo, grid.hi) == (reader.range.lo, reader.range.hi)
