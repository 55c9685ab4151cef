"""Block-wise (per-group) weight quantization: opset-21 ``DequantizeLinear`` with ``block_size``.

Files come from onnxruntime's own ``MatMulNBitsQuantizer`` (``QuantFormat.QDQ``: int4 / uint4 with
per-block zero points, and its channel-wise variant behind a Transpose), from ``quantize_static`` with its
``BlockSize`` option (int8 / int4 / uint4) and from hand-built opset-21
graphs (int8 with zero points, int4 behind a Transpose with a short last block). Each block of each
output is its own integer accumulator (blocks have different scales). The tests EXECUTE the graph with
onnxruntime on inputs that are zero outside one block and at the worst-case codes inside it: the output
divided by the input and block scales is that block's integer sum. Its extremes over every block and
output must be exactly the analysed range, and after ``project`` they must fit the target.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import certify_layer
from qonnx.core.modelwrapper import ModelWrapper

X_SCALE = 0.05  # int8 activations, zero point 0: codes [-128, 127]
X_LO, X_HI = -128, 127


def _float_model(K: int, N: int, seed: int = 0) -> onnx.ModelProto:
    """x -> QuantizeLinear/DequantizeLinear (int8) -> MatMul with float weights (K, N)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="Qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="DQx"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(np.float32(X_SCALE), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
             numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def ort_blockwise(symmetric: bool, block: int = 16, channel_wise: bool = False, K: int = 64, N: int = 6) -> onnx.ModelProto:
    quantizer = MatMulNBitsQuantizer(_float_model(K, N), block_size=block, is_symmetric=symmetric,
                                     quant_format=QuantFormat.QDQ, channel_wised_quantize=channel_wise)
    quantizer.process()
    return quantizer.model.model


def hand_built(storage: int, K: int, N: int, block: int, zero_point: bool, transposed: bool,
               axis_along_k: bool = True, seed: int = 1) -> onnx.ModelProto:
    """An opset-21 graph: integer weight codes -> block-wise DequantizeLinear (-> Transpose) -> MatMul."""
    rng = np.random.default_rng(seed)
    np_type = helper.tensor_dtype_to_np_dtype(storage)
    lo, hi = {TensorProto.INT8: (-128, 127), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}[storage]
    shape = (N, K) if transposed else (K, N)
    axis = (1 if transposed else 0) if axis_along_k else (0 if transposed else 1)
    codes = rng.integers(lo, hi + 1, size=shape)
    s_shape = list(shape)
    s_shape[axis] = -(-shape[axis] // block)
    scale = rng.uniform(0.01, 0.1, size=s_shape).astype(np.float32)
    inits = [numpy_helper.from_array(np.asarray(codes).astype(np_type), "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.float32(X_SCALE), "xs"), numpy_helper.from_array(np.int8(0), "xz")]
    dq_inputs = ["wq", "ws"]
    if zero_point:
        inits.append(numpy_helper.from_array(rng.integers(lo, hi + 1, size=s_shape).astype(np_type), "wz"))
        dq_inputs.append("wz")
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="Qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="DQx"),
             helper.make_node("DequantizeLinear", dq_inputs, ["wd"], name="DQw", axis=axis, block_size=block)]
    if transposed:
        nodes.append(helper.make_node("Transpose", ["wd"], ["wt"], name="T", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["xd", "wt" if transposed else "wd"], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime without graph rewrites: 1.32 fuses an int8 block-wise DequantizeLinear + MatMul into
    MatMulIntegerToFloat, which then rejects the block scales; unfused, each op runs as ONNX defines it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (*model.graph.input, *model.graph.output):  # any batch size
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantize_static_blockwise(weight_type: QuantType, tmp_path, K: int = 64, N: int = 6) -> onnx.ModelProto:
    """onnxruntime's quantize_static with its opset-21 block-wise option (extra_options BlockSize; blocks along
    axis 0, the MatMul's K, when per_channel is off) and symmetric int8 activations."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "float.onnx")

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.normal(size=(1, K)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(tmp_path / "float.onnx", tmp_path / "static.onnx", Calibration(), quant_format=QuantFormat.QDQ,
                    weight_type=weight_type, activation_type=QuantType.QInt8, per_channel=False,
                    extra_options={"BlockSize": 16, "ActivationSymmetric": True})
    return onnx.load(tmp_path / "static.onnx")


def _mac_weights_and_scales(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, int]:
    """The MatMul's executed weights (K, N), each weight's block scale in that layout, and the block length.

    The weights come from onnxruntime executing the graph; the scale layout from the ONNX definition
    of the block-wise DequantizeLinear (element i along ``axis`` uses entry ``i // block_size``).
    """
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name != "DQx")
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_empty_tensor_value_info(mm.input[1]))
    session = _session(probe)
    K = next(i for i in model.graph.input if i.name == "x").type.tensor_type.shape.dim[1].dim_value
    weights = session.run([mm.input[1]], {"x": np.zeros((1, K), np.float32)})[0].astype(np.float64)
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    block, axis = attrs["block_size"], attrs.get("axis", 1)
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq.input[1])).astype(np.float64)
    stored_shape = weights.shape if mm.input[1] == dq.output[0] else weights.T.shape
    full = np.repeat(scale, block, axis=axis).take(np.arange(stored_shape[axis]), axis=axis)
    if mm.input[1] != dq.output[0]:  # behind a Transpose
        full = full.T
    changes = np.flatnonzero(np.any(full[1:] != full[:-1], axis=1))  # along K: where a new block scale starts
    run = int(changes[0]) + 1 if changes.size else K
    return weights, full, run


def executed_block_extremes(model: onnx.ModelProto, span: int | None = None) -> tuple[int, int]:
    """Min and max over every output and weight block of the block's integer sum, from onnxruntime EXECUTING
    the model on each block's worst-case codes (zero codes elsewhere). ``span``: runs of that many terms
    (a divisor of the block length) in place of whole blocks."""
    weights, scales, run = _mac_weights_and_scales(model)
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    dq_x = next(n for n in model.graph.node if mm.input[0] in n.output)
    x_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq_x.input[1])))
    x_zero = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq_x.input[2]))
    assert x_zero.dtype == np.int8 and int(x_zero) == 0  # int8 codes [-128, 127], real 0 = code 0
    if span is not None:
        assert run % span == 0
        run = span
    K, N = weights.shape
    q = np.rint(weights / scales)
    assert np.allclose(q * scales, weights, rtol=1e-5, atol=1e-7)
    drives, picks = [], []
    for start in range(0, K, run):
        for n in range(N):
            for want_max in (True, False):
                codes = np.zeros(K)
                positive = q[start:start + run, n] > 0
                codes[start:start + run] = np.where(positive == want_max, X_HI, X_LO)
                drives.append(codes * x_scale)
                picks.append((n, scales[start, n]))
    probe = onnx.ModelProto.FromString(model.SerializeToString())  # the MatMul's own output, before any output QDQ
    probe.graph.output.append(helper.make_empty_tensor_value_info(mm.output[0]))
    y = _session(probe).run([mm.output[0]], {"x": np.asarray(drives, np.float32)})[0].astype(np.float64)
    sums = np.asarray([y[i, n] / (x_scale * s) for i, (n, s) in enumerate(picks)])
    assert np.allclose(sums, np.rint(sums), atol=1e-2), "block sums must be integers"
    sums = np.rint(sums).astype(np.int64)
    return int(sums.min()), int(sums.max())


def _fits(lo: int, hi: int, bits: int) -> bool:
    return hi <= (1 << bits) - 1 if lo >= 0 else (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1)


CASES = {
    "ort int4 symmetric": lambda tmp: (ort_blockwise(True), "fold"),
    "ort uint4 block zero points": lambda tmp: (ort_blockwise(False), "subtract"),
    "ort channel-wise behind Transpose": lambda tmp: (ort_blockwise(True, channel_wise=True), "fold"),
    "quantize_static int8 BlockSize": lambda tmp: (quantize_static_blockwise(QuantType.QInt8, tmp), "fold"),
    "quantize_static int4 BlockSize": lambda tmp: (quantize_static_blockwise(QuantType.QInt4, tmp), "fold"),
    "quantize_static uint4 BlockSize": lambda tmp: (quantize_static_blockwise(QuantType.QUInt4, tmp), "subtract"),
    "int8 with zero points": lambda tmp: (hand_built(TensorProto.INT8, 32, 5, 8, True, False), "subtract"),
    "int4 behind Transpose, short last block": lambda tmp: (hand_built(TensorProto.INT4, 40, 5, 16, False, True), "fold"),
    "uint4 with zero points": lambda tmp: (hand_built(TensorProto.UINT4, 32, 4, 16, True, False), "subtract"),
    "uint4 with zero points, short last block": lambda tmp: (hand_built(TensorProto.UINT4, 40, 4, 16, True, False),
                                                             "subtract"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_range_is_the_executed_one_and_project_fits(case, tmp_path, a2q):
    model, zero_point = CASES[case](tmp_path)
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    lo, hi = executed_block_extremes(model)
    layer = next(r for r in analyze_model(ModelWrapper(str(path)), zero_point=zero_point).layers)
    assert layer.status == "ok", layer.status
    assert (layer.acc_min, layer.acc_max) == (lo, hi)  # sound and tight: the worst cases execute
    cert = certify_layer(ModelWrapper(str(path)), layer.node, zero_point=zero_point)
    assert (cert.acc_min, cert.acc_max) == (lo, hi)

    target = layer.bounds["exact"] - 2
    out = tmp_path / "out.onnx"
    run = a2q("project", path, out, "--acc-bits", target, "--zero-point", zero_point)
    assert run.returncode == 0, run.stderr
    projected = onnx.load(out)
    p_lo, p_hi = executed_block_extremes(projected)
    assert _fits(p_lo, p_hi, target) and not _fits(lo, hi, target)
    before = {i.name: (i.data_type, list(i.dims)) for i in model.graph.initializer}
    assert {i.name: (i.data_type, list(i.dims)) for i in projected.graph.initializer} == before  # same block-wise form
    assert [n.attribute for n in projected.graph.node] == [n.attribute for n in model.graph.node]
    assert a2q("verify", out, "--zero-point", zero_point).returncode == 0


@pytest.mark.parametrize("mode", ["wrap", "saturate"])
@pytest.mark.parametrize("case", ["ort uint4 block zero points", "quantize_static int8 BlockSize",
                                  "int4 behind Transpose, short last block", "uint4 with zero points, short last block"])
def test_data_simulation_accumulates_each_block_on_its_own(case, mode, tmp_path):
    """``verify --data``'s simulation against each (sample, output, block) sum of the executed weights' integers
    (onnxruntime) times the input codes, added one at a time, two bits below the exact width: overflow counts and
    every output (the error of each block scaled by its own scale)."""
    from a2q_passes.data_simulation import simulate_model
    from a2q_passes.verification import verify_model
    from tests.test_simulate import sequential_accumulation

    model, zero_point = CASES[case](tmp_path)
    weights, scales, run = _mac_weights_and_scales(model)
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    dq_x = next(n for n in model.graph.node if mm.input[0] in n.output)
    x_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq_x.input[1])))
    q = np.rint(weights / scales).astype(np.int64)
    K, N = weights.shape
    rng = np.random.default_rng(2)
    # each output's largest sums (the codes following its weights' signs), then random codes
    codes = np.concatenate([np.where(q.T > 0, X_HI, X_LO), rng.choice([X_LO, X_HI], size=(3, K)) * (rng.random((3, K)) < 0.8)])
    samples = codes.shape[0]
    probe = onnx.ModelProto.FromString(model.SerializeToString())  # the MatMul's own output, before any output QDQ
    if mm.output[0] not in [o.name for o in probe.graph.output]:
        probe.graph.output.append(helper.make_empty_tensor_value_info(mm.output[0]))
    wrapped = ModelWrapper(probe)
    bits = int(analyze_model(wrapped, zero_point=zero_point).layers[0].bounds["exact"]) - 2
    result = simulate_model(wrapped, (codes * np.float32(x_scale)).astype(np.float32), bits, mode,
                            zero_point=zero_point)
    signed = verify_model(wrapped, bits, mode, zero_point=zero_point).layers[0].signed
    overflows = 0
    for sample, n in itertools.product(range(samples), range(N)):
        change = 0.0
        for start in range(0, K, run):
            terms = [int(codes[sample, k]) * int(q[k, n]) for k in range(start, min(start + run, K))]
            sim, _ = sequential_accumulation(terms, bits, signed, mode, None)
            overflows += sim != sum(terms)
            change += (sim - sum(terms)) * scales[start, n] * x_scale
        expected = result.exact_outputs[mm.output[0]][sample, n] + change
        assert result.outputs[mm.output[0]][sample, n] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert overflows > 0 and result.overflows == {mm.name: overflows}
    assert result.accumulations == {mm.name: samples * N * -(-K // run)}


def test_tiles_within_blocks(tmp_path, a2q):
    """project --tile T on block-wise weights: tiles of T within each block fit P, each block's sum the outer width."""
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(ort_blockwise(True), path)
    inner_bits = executed_block_extremes(onnx.load(path), span=4)
    inner_bits = max(inner_bits[1].bit_length(), (-inner_bits[0] - 1).bit_length())  # one bit below the need
    run = a2q("project", path, out, "--acc-bits", inner_bits, "--tile", 4, "--outer-bits", inner_bits + 1)
    assert run.returncode == 0, run.stderr
    projected = onnx.load(out)
    assert _fits(*executed_block_extremes(projected, span=4), inner_bits)
    assert _fits(*executed_block_extremes(projected), inner_bits + 1)
    assert a2q("verify", out).returncode == 0


def test_blocks_along_the_output_axis_give_each_product_its_own_scale(tmp_path):
    """Blocks along N: every weight of an accumulation has its own scale, so each product is its own
    one-term integer sum (K = 1), which the executed worst cases reach exactly."""
    path = tmp_path / "in.onnx"
    model = hand_built(TensorProto.INT4, 16, 8, 4, False, False, axis_along_k=False)
    onnx.save(model, path)
    layer = analyze_model(ModelWrapper(str(path))).layers[0]
    assert (layer.status, layer.K) == ("ok", 1)
    assert (layer.acc_min, layer.acc_max) == executed_block_extremes(model)
    cert = certify_layer(ModelWrapper(str(path)), "fc")
    assert (cert.acc_min, cert.acc_max) == (layer.acc_min, layer.acc_max)


def test_conv_blocks_along_input_channels_are_refused_by_name(tmp_path, a2q):
    """A Conv's accumulation interleaves input channels and kernel taps; its block-wise split is not read."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="Qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="DQx"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="DQw", axis=1, block_size=2),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(rng.integers(-128, 128, (3, 4, 3, 3)).astype(np.int8), "wq"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, (3, 2, 3, 3)).astype(np.float32), "ws"),
             numpy_helper.from_array(np.float32(X_SCALE), "xs"), numpy_helper.from_array(np.int8(0), "xz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    layer = analyze_model(ModelWrapper(str(path))).layers[0]
    assert layer.status.startswith("unsupported") and "split its accumulation" in layer.status
    run = a2q("project", path, tmp_path / "out.onnx", "--acc-bits", 12)
    assert run.returncode == 1 and "conv" in run.stderr
    assert not (tmp_path / "out.onnx").exists()
