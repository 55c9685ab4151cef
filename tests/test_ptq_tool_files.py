"""Files of four more quantizers, as they write them: TensorFlow Lite's converter through tf2onnx
(``tests/data/tflite``), Intel's NNCF, AMD Quark and PyTorch's PT2E through the dynamo exporter
(``tests/data/ptq_tools``); see each folder's README.

Each file goes through the corpus' whole check (``scripts.corpus.check``: analyze against the oracle that executes
worst-case inputs through the file's own quantizers, verify --data against the executed accumulators, project,
verify, allocate and lower, each output executed again). Before: the oracle could not run a file whose batch is
symbolic (tf2onnx), nor one with repeated value_info entries (Quark); every command refused Quark's graph listed
out of topological order; NNCF's per-channel activation scale in front of a MaxPool into a depthwise Conv was
refused; ``lower`` refused TFLite's int8 codes moved by layout ops between QuantizeLinear and DequantizeLinear; the
16-bit TFLite file (invalid ONNX) was read by analyze, while verify and project blamed the analysis; and NNCF's and
Quark's residual nets, whose input quantizer reads the channels-last graph input before tf2onnx's Transpose, came out
of FINN's lowering with a global pool reading NCHW data as NHWC (its execution failed; the error blamed the inputs);
and the dynamo exporter's per-tensor Q/DQ of a PT2E model carry an ``axis`` on which qonnx's QCDQToQuant fails, so
``lower`` refused them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from scripts.corpus import Entry, _lowers_as_quant, _run, check

DATA = Path(__file__).resolve().parent / "data"
FILES = sorted([*(DATA / "tflite").glob("*.onnx"), *(DATA / "ptq_tools").glob("*.onnx")])
# what each file gives: handled, or refused with these words in the reason
REFUSED = {
    "tflite_conv1d_int8": "not lowered: Unsqueeze_0",  # TFLite's 1-D conv; read, projected and verified
    "tflite_pools_int8": "Concat",  # a Concat of two scaled inputs: FINN's streamlining leaves it float
    "tflite_hardswish_bn_int8": "No Op registered for HardSwish with domain_version of 13",
    "tflite_mlp_a16w8": "which ONNX's DequantizeLinear takes at no opset",
    "tflite_mlp_dynamic": "weights not quantized",
    "quark_residual_depthwise_xint8": "outputs differ",  # FINN's thresholds round the exact ties up
    "pt2e_cnn_x86": "adds 'relu_1' (from Relu 'node_relu_1') and 'relu'",  # the X86 quantizer leaves the Add's inputs float
}
# lowered whole to FINN HW layers
LOWERED = {"tflite_cnn_int8", "tflite_residual_int8", "nncf_tf2onnx_cnn_performance", "nncf_residual_depthwise_mixed",
           "nncf_tf2onnx_residual_gap_performance", "quark_tf2onnx_mlp_a8w8", "quark_tf2onnx_residual_gap_xint8",
           "pt2e_cnn_xnnpack_pc", "pt2e_mlp_xnnpack_pt"}


def test_every_file_is_committed():
    assert len(FILES) == 19 and set(REFUSED) | LOWERED <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_end_to_end(path, tmp_path):
    entry = Entry(path.stem, path.parent.name, path, lower=_lowers_as_quant(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(entry, tmp_path, allocate=True)
    if path.stem in REFUSED:
        assert result.status == "refused" and REFUSED[path.stem] in result.detail, (result.status, result.detail)
    else:
        assert result.status == "handled", (result.detail, result.notes)
    if path.stem in LOWERED:
        assert entry.lower and result.status == "handled", (result.detail, result.notes)
    if result.layers and path.stem != "tflite_pools_int8":  # its MatMul after the Concat: sound, not tight
        assert result.tight == result.layers, (result.tight, result.layers)


def _run_model(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    return execute_onnx(model, {model.graph.input[0].name: x})[model.graph.output[0].name]


@pytest.mark.parametrize("name", ["tflite_cnn_int8", "tflite_residual_int8", "tflite_pools_int8", "tflite_conv1d_int8"])
def test_dequantize_moves_in_front_of_the_layout_ops(name):
    """tf2onnx moves TFLite's int8 codes with Transpose/Squeeze/Reshape/Concat between QuantizeLinear and
    DequantizeLinear; the rewrite dequantizes first: every DequantizeLinear then reads a QuantizeLinear or stored
    integers, and the graph computes the same outputs bit for bit."""
    from a2q_passes.finn_quant_forms import dequantize_before_layout_ops
    from a2q_passes.model_io import load_model

    model = load_model(DATA / "tflite" / f"{name}.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 1
    before = ModelWrapper(model.model.SerializeToString()).transform(InferShapes())
    after = dequantize_before_layout_ops(ModelWrapper(model.model.SerializeToString())).transform(InferShapes())
    onnx.checker.check_model(after.model)
    for dq in [n for n in after.graph.node if n.op_type == "DequantizeLinear"]:
        producer = after.find_producer(dq.input[0])
        assert producer is None or producer.op_type == "QuantizeLinear", (dq.name, producer.op_type)
    moved = sum(n.op_type == "DequantizeLinear" and (p := before.find_producer(n.input[0])) is not None
                and p.op_type != "QuantizeLinear" for n in before.graph.node)
    assert moved > 0
    rng = np.random.default_rng(0)
    shape = [1, *[d.dim_value for d in dims[1:]]]
    for _ in range(8):
        x = (rng.normal(size=shape) * 3).astype(np.float32)
        assert np.array_equal(_run_model(before, x), _run_model(after, x))


def test_a_graph_listed_out_of_order_is_read_as_sorted(tmp_path):
    """Quark lists a node before the node whose output it reads; the checker refuses that, onnxruntime sorts it
    itself. Every command sorts it in memory: analyze reports what it reports for the sorted file, and project writes
    a valid, sorted model."""
    from a2q_passes.model_io import sort_topologically

    source = DATA / "ptq_tools" / "quark_tf2onnx_residual_gap_xint8.onnx"
    proto = onnx.load(str(source))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(proto)
    assert sort_topologically(proto.graph) and not sort_topologically(proto.graph)
    onnx.checker.check_model(proto)
    sorted_path = tmp_path / "sorted.onnx"
    onnx.save(proto, str(sorted_path))
    reports = [_run("analyze", path, "--json", "--per-channel") for path in (source, sorted_path)]
    assert reports[0][0] == 0 and reports[0][1] == reports[1][1].replace(str(sorted_path), str(source))
    out = tmp_path / "p.onnx"
    code, _, err = _run("project", source, out, "--acc-bits", 18)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)))
