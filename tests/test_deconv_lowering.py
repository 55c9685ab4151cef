"""``ConvTranspose`` in ``a2q lower`` (:mod:`a2q_passes.finn_deconv`, :mod:`a2q_passes.pixel_padding`).

FINN lowers a transposed convolution to pixel padding, a sliding window and an MVAU whose row holds the whole
kernel; the inserted zeros leave one stride phase's taps in each sum, the range a2q sizes a ``ConvTranspose`` for.
Each lowered model is executed against the QONNX model, and each MVAU's worst case is driven through FINN's own
padding and window layers by the oracle (tests/fuzz), which must reach the analysed range exactly and stay inside the
``accDataType``. Before, every ``ConvTranspose`` stayed a float node (2-D) or stopped FINN's 1-D step (1-D).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from a2q_passes.analysis import analyze_model
from a2q_passes.certificate import certify_layer
from tests.cli_helpers import run_a2q
from tests.fuzz.real_files import executed_range
from tests.test_zero_point_lowering import _assert_holds_worst_case

QONNX = "qonnx.custom_op.general"


def _deconv_model(path, kernel: list[int], size: list[int], seed: int = 0, **attrs) -> None:
    """Quant(uint4) -> ConvTranspose (int4 weights, 3 -> 4 channels, ``attrs``) -> Quant(int4) -> Relu ->
    Quant(uint4) -> Conv 1 x 1 (int4), saved to ``path``; 1-D where ``kernel`` has one entry."""
    rng = np.random.default_rng(seed)
    quant = {"domain": QONNX, "narrow": 0, "rounding_mode": "ROUND"}
    ones = [1] * len(kernel)
    nodes = [helper.make_node("Quant", ["x", "s_in", "z", "b4"], ["xq"], signed=0, **quant),
             helper.make_node("Quant", ["w1", "s_w", "z", "b4"], ["w1q"], signed=1, **quant),
             helper.make_node("ConvTranspose", ["xq", "w1q"], ["d"], name="deconv", kernel_shape=kernel, **attrs),
             helper.make_node("Quant", ["d", "s_a", "z", "b4"], ["a"], signed=1, **quant),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Quant", ["r", "s_a", "z", "b4"], ["rq"], signed=0, **quant),
             helper.make_node("Quant", ["w2", "s_w", "z", "b4"], ["w2q"], signed=1, **quant),
             helper.make_node("Conv", ["rq", "w2q"], ["y"], name="head", kernel_shape=ones)]
    values = {"s_in": 1 / 15, "z": 0, "b4": 4, "s_w": 0.05, "s_a": 0.23,
              "w1": rng.integers(-8, 8, size=(3, 4, *kernel)) * 0.05,
              "w2": rng.integers(-8, 8, size=(2, 4, *ones)) * 0.05}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in values.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                                helper.make_opsetid(QONNX, 1)]))
    model.transform(InferShapes()).save(str(path))


# (kernel, input size, ConvTranspose attributes): FINN's InferPixelPaddingDeconv pads by kernel[0] and pads[0] on all
# four sides, which computed other shapes or values for a non-square kernel, unequal pads or output_padding
CASES = {
    "k2_s2": ([2, 2], [5, 5], dict(strides=[2, 2])),
    "k3_s2_same": ([3, 3], [4, 4], dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "k4_s2_p1": ([4, 4], [4, 4], dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "k3x2_s2x1_asymmetric": ([3, 2], [4, 5], dict(strides=[2, 1], pads=[1, 0, 0, 1])),
    "k3_s2_dilated": ([3, 3], [4, 4], dict(strides=[2, 2], dilations=[2, 2])),
    "k3_s3_1d": ([3], [6], dict(strides=[3], pads=[1, 0], output_padding=[1])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_transpose_is_lowered_to_an_mvau_sized_per_stride_phase(case, tmp_path):
    """Lowered whole (exit 0, nothing unlowered, equal outputs), the ConvTranspose an MVAU behind FMPadding_Pixel
    and mapped back to it; the reader, the certificate and the oracle (worst cases driven through FINN's own
    padding and window layers) all give the MVAU the ConvTranspose's per-phase range, the oracle reaching it
    exactly; its accDataType holds it and is never wider than FINN's own pick from the whole kernel row."""
    kernel, size, attrs = CASES[case]
    source, out = tmp_path / "deconv.onnx", tmp_path / "hw.onnx"
    _deconv_model(source, kernel, size, **attrs)
    result = run_a2q("lower", str(source), str(out), "--json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    report = json.loads(result.stdout)
    assert report["equivalence"]["within_tolerance"] and report["equivalence"]["samples"] > 0
    assert not [n for n in report["lowering"]["unlowered"] if n["blocking"]], report["lowering"]["unlowered"]
    assert report["lowering"]["hw_op_counts"].get("FMPadding_Pixel") == 1
    deconv = next(layer for layer in report["layers"] if layer["qonnx_node"] == "deconv")
    assert DataType[deconv["acc_dtype"]].bitwidth() <= DataType[deconv["finn_acc_dtype"]].bitwidth(), deconv

    lowered = ModelWrapper(str(out))
    qonnx_range = analyze_model(ModelWrapper(str(source)), input_ranges="finn").by_node()["deconv"]
    hw_range = analyze_model(lowered).by_node()[deconv["node"]]
    certificate = certify_layer(lowered, deconv["node"])
    executed = executed_range(lowered, deconv["node"], "fold")
    ranges = {(qonnx_range.acc_min, qonnx_range.acc_max), (hw_range.acc_min, hw_range.acc_max),
              (certificate.acc_min, certificate.acc_max), (int(executed.lo), int(executed.hi)),
              (deconv["acc_min"], deconv["acc_max"])}
    assert len(ranges) == 1, ranges
    assert _assert_holds_worst_case(lowered) == 2


def test_projected_conv_transpose_keeps_its_width_in_the_mvau(tmp_path):
    """`a2q project --acc-bits P --input-ranges finn` then `a2q lower --from-annotations`: the MVAU FINN makes of the
    ConvTranspose gets P, two bits below what FINN's MinimizeAccumulatorWidth picks from its whole kernel row (four
    phases of one tap each), and holds its executed worst case. An MVAU sized from its row could not meet P."""
    source, projected, out = tmp_path / "deconv.onnx", tmp_path / "p.onnx", tmp_path / "hw.onnx"
    _deconv_model(source, [2, 2], [5, 5], seed=3, strides=[2, 2])
    exact = analyze_model(ModelWrapper(str(source)), input_ranges="finn").by_node()["deconv"]
    bits = DataType[exact.acc_dtype].bitwidth() - 1
    result = run_a2q("project", str(source), str(projected), "--acc-bits", str(bits), "--input-ranges", "finn")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    result = run_a2q("lower", str(projected), str(out), "--from-annotations", "--json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    deconv = next(layer for layer in json.loads(result.stdout)["layers"] if layer["qonnx_node"] == "deconv")
    assert deconv["target_bits"] == bits and DataType[deconv["acc_dtype"]].bitwidth() <= bits, deconv
    assert DataType[deconv["finn_acc_dtype"]].bitwidth() >= bits + 2, deconv
    assert _assert_holds_worst_case(ModelWrapper(str(out))) == 2


@pytest.mark.parametrize("attrs,why", [
    (dict(group=3), "grouped"),
    (dict(strides=[2, 2], pads=[2, 2, 2, 2]), "pads wider than dilation"),
    (dict(strides=[2, 2], auto_pad="SAME_UPPER"), "auto_pad SAME"),
], ids=["grouped", "pads_past_the_kernel", "same_padding"])
def test_conv_transposes_finn_cannot_compute_are_refused_by_name(attrs, why, tmp_path):
    """What FINN's InferPixelPaddingDeconv skips (group > 1) or computes wrongly (pads beyond the kernel's reach,
    SAME padding taken as a Conv's) is refused before FINN's steps, naming the layer; nothing is written."""
    source, out = tmp_path / "deconv.onnx", tmp_path / "hw.onnx"
    if "group" in attrs:
        _grouped(source)
    else:
        _deconv_model(source, [2, 2], [4, 4], **attrs)
    result = run_a2q("lower", str(source), str(out))
    message = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and not out.exists(), message[-1500:]
    assert "ConvTranspose 'deconv'" in message and why in message, message[-1500:]


def _grouped(path) -> None:
    """The model of :func:`_deconv_model` with a depthwise (group 3) ConvTranspose of 3 channels."""
    _deconv_model(path, [2, 2], [4, 4], strides=[2, 2])
    model = ModelWrapper(str(path))
    deconv = model.get_node_from_name("deconv")
    deconv.attribute.append(helper.make_attribute("group", 3))
    model.set_initializer("w1", model.get_initializer("w1")[:, :1])
    model.set_initializer("w2", model.get_initializer("w2")[:, :3])
    model.graph.value_info.clear()
    model.transform(InferShapes()).save(str(path))


def test_finn_build_steps_take_a_conv_transpose(tmp_path):
    """FINN's own builder with the a2q steps: step_a2q_conv_transposes makes the ConvTranspose pixel padding, a
    sliding window and an MVAU before step_convert_to_hw (FINN's builder has no step for it: a float ConvTranspose
    stopped the dataflow partition). Every step runs, and the MVAU's accDataType is the per-phase width, narrower
    than its whole kernel row needs, and holds the brute-force range of every tap pattern the padding leaves."""
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.finn_accumulators import iterate_mac_nodes
    from a2q_passes.finn_runtime import run_estimate_build
    from a2q_passes.finn_steps import with_a2q_steps
    from tests.test_finn_flow import _brute_force_range, _mac_rows

    source = tmp_path / "deconv.onnx"
    _deconv_model(source, [2, 2], [5, 5], seed=3, strides=[2, 2])
    exact = analyze_model(ModelWrapper(str(source)), input_ranges="finn").by_node()["deconv"]
    bits = DataType[exact.acc_dtype].bitwidth()
    steps = with_a2q_steps(acc_bits=bits)
    result = run_estimate_build(source, tmp_path / "build", "xczu3eg-sbva484-1-e", steps=steps)
    assert result.steps_completed == [s if isinstance(s, str) else s.__name__ for s in steps]
    final = ModelWrapper(str(result.final_model))
    assert [n for n in final.graph.node if n.op_type.startswith("FMPadding_Pixel")]
    deconv = next(node for node in iterate_mac_nodes(final) if node.op_type.startswith("MVAU")
                  and getCustomOp(node).get_nodeattr("MW") == 4 * 3)  # the whole 2 x 2 x 3 kernel row
    inst = getCustomOp(deconv)
    adt, idt = DataType[inst.get_nodeattr("accDataType")], DataType[inst.get_nodeattr("inputDataType")]
    rows = _mac_rows(final, deconv)  # (channels, 12): the row the MVAU holds, one tap per phase of each (kh, kw)
    phases = [rows[:, [k * 3 + c for c in range(3)]] for k in range(4)]
    ranges = [_brute_force_range(phase, int(idt.min()), int(idt.max())) for phase in phases]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= bits, (adt.name, lo, hi)
    assert _brute_force_range(rows, int(idt.min()), int(idt.max()))[1] > adt.max()  # the whole row would not fit


def test_finn_build_steps_take_a_1d_conv_transpose_through_finns_1d_step(tmp_path):
    """A 1-D model's FINN build lists FINN's custom 1-D step_pre_streamline, whose Change3DTo4DTensors skips a graph
    holding a ConvTranspose: FINN's streamlining then stopped on an IndexError. with_a2q_steps puts
    step_a2q_pre_streamline in its place, every step runs, and each MVAU holds its executed worst case."""
    from finn.builder.custom_step_library.conv1d import step_pre_streamline
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.finn_accumulators import iterate_mac_nodes
    from a2q_passes.finn_runtime import estimate_only_steps, run_estimate_build
    from a2q_passes.finn_steps import step_a2q_pre_streamline, with_a2q_steps

    kernel, size, attrs = CASES["k3_s3_1d"]
    source = tmp_path / "deconv1d.onnx"
    _deconv_model(source, kernel, size, seed=5, **attrs)
    finn_steps = estimate_only_steps()
    at = finn_steps.index("step_tidy_up") + 1
    steps = with_a2q_steps([*finn_steps[:at], step_pre_streamline, *finn_steps[at:]], acc_bits=12)
    assert step_a2q_pre_streamline in steps and step_pre_streamline not in steps
    result = run_estimate_build(source, tmp_path / "build", "xczu3eg-sbva484-1-e", steps=steps)
    assert result.steps_completed == [s if isinstance(s, str) else s.__name__ for s in steps]
    final = ModelWrapper(str(result.final_model))
    assert [n for n in final.graph.node if n.op_type.startswith("FMPadding_Pixel")]
    mvaus = [node for node in iterate_mac_nodes(final) if node.op_type.startswith("MVAU")]
    assert len(mvaus) == 2
    for node in mvaus:
        adt = DataType[getCustomOp(node).get_nodeattr("accDataType")]
        executed = executed_range(final, node.name)
        assert adt.min() <= executed.lo and executed.hi <= adt.max() and adt.bitwidth() <= 12, (node.name, adt.name)


def test_conv_transpose_defaults_are_written_out(tmp_path):
    """FINN's InferPixelPaddingDeconv reads group, pads, strides and kernel_shape without defaults ("'NoneType'
    object has no attribute 'i'" on a ConvTranspose that leaves them out, as ONNX allows): the preparation writes
    each out at its ONNX default, output_padding too, and the model computes the same."""
    from qonnx.core.onnx_exec import execute_onnx

    from a2q_passes.finn_quant_forms import WindowDefaultAttributes

    _deconv_model(tmp_path / "deconv.onnx", [2, 2], [4, 4], strides=[2, 2])
    model = ModelWrapper(str(tmp_path / "deconv.onnx"))
    deconv = model.get_node_from_name("deconv")
    del deconv.attribute[:]
    deconv.attribute.append(helper.make_attribute("strides", [2, 2]))
    filled = ModelWrapper(model.model.SerializeToString()).transform(WindowDefaultAttributes())
    attrs = {a.name: helper.get_attribute_value(a) for a in filled.get_node_from_name("deconv").attribute}
    assert attrs == {"strides": [2, 2], "kernel_shape": [2, 2], "dilations": [1, 1], "group": 1, "pads": [0, 0, 0, 0],
                     "output_padding": [0, 0]}
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(execute_onnx(model, {"x": x})["y"], execute_onnx(filled, {"x": x})["y"])


@pytest.mark.parametrize("case", ["k2_s2", "k3_s2_same"])
def test_data_simulation_of_the_pixel_padded_mvau(case, tmp_path):
    """`verify --data` simulates the MVAU FINN makes of a ConvTranspose (before, "not simulated"): on data the MVAU
    multiplies its whole kernel rows, the inserted zeros adding nothing, so its P-bit sums are each stride phase's.
    Its exact accumulators come from FINN's own execution of the node (the oracle); wrapped to P they give the
    overflow count `verify --data` reports."""
    from a2q_passes.data_simulation import simulate_model
    from tests.fuzz.oracle import data_accumulators
    from tests.fuzz.real_files import simulation_case

    kernel, size, attrs = CASES[case]
    source, out = tmp_path / "deconv.onnx", tmp_path / "hw.onnx"
    _deconv_model(source, kernel, size, **attrs)
    assert run_a2q("lower", str(source), str(out)).returncode == 0
    lowered = ModelWrapper(str(out))
    node = next(n.name for n in lowered.graph.node if n.op_type == "MVAU" and
                lowered.find_producer(lowered.find_producer(lowered.find_producer(n.input[0]).input[0]).input[0])
                .op_type == "FMPadding_Pixel")
    x = np.random.default_rng(8).uniform(0, 1, size=(24, 3, *size)).astype(np.float32)
    x[0] = 1.0  # every input code at its largest
    exact = data_accumulators(lowered, simulation_case(lowered, [node]), {lowered.graph.input[0].name: x})[node]
    width = max(int(exact.max()).bit_length(), int(-exact.min() - 1).bit_length()) + 1  # signed: the sums reach both signs
    bits = width - 1
    wrapped = (exact + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1)
    assert np.any(wrapped != exact) and not np.all(wrapped != exact)
    result = simulate_model(lowered, x, {node: bits})
    assert not result.skipped, result.skipped
    assert result.accumulations[node] == exact.size
    assert result.overflows[node] == int(np.count_nonzero(wrapped != exact))
    assert simulate_model(lowered, x, {node: width}).overflows[node] == 0
    # tiles would split the MVAU's K inputs, which its rows (a phase's taps) do not hold: named, not simulated
    assert "pixel-padded" in simulate_model(lowered, x, {node: width}, tile=2).skipped[node]


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnxruntime_qdq_conv_transpose_is_lowered(per_channel, tmp_path):
    """onnxruntime's QDQ file of a strided ConvTranspose with padding and output padding (uint8 activations with
    zero points, int8 weights, its bias stored as int32 codes behind a DequantizeLinear) through the corpus' whole
    check: read, projected, simulated and lowered, every MVAU executed within its accDataType. Before, `lower`
    stopped in FINN's conversion ("cannot reshape array of size 1 into shape (1,4,1,1)": qonnx's
    ExtractBiasFromConv reshaped the zero point of the bias' quantizer, which was folded for Conv and Gemm only)."""
    import onnx

    from scripts.corpus import ORT_FORMATS, Entry, check
    from tests.ort_models import quantize

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], name="deconv", strides=[2, 2],
                              pads=[1, 1, 1, 1], output_padding=[1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    inits = [numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "float.onnx"))
    path = tmp_path / "ort_deconv.onnx"
    quantize(tmp_path / "float.onnx", path, [1, 3, 5, 5], "QDQ", "QInt8", act="QUInt8", per_channel=per_channel)
    assert any(i.name.startswith("B") and i.data_type == TensorProto.INT32 for i in onnx.load(str(path)).graph.initializer)
    result = check(Entry(path.stem, ORT_FORMATS["QDQ"], path, lower=True, zero_point="subtract"), tmp_path / "check")
    assert result.status == "handled" and result.tight == 1 and result.notes == [], (result.detail, result.notes)
