"""The real-file corpus (``scripts/corpus.py``) in its quick form: one file per producer class, written by the
real producer (Brevitas' two exporters, onnxruntime's four formats and its graph optimizer's output, FINN's HW
graph), each run through
``analyze``/``project``/``verify`` (and ``lower`` and ``finetune`` for QONNX) and checked against the oracle that executes worst-case
inputs through the graph's own quantizers. The full corpus (``python -m scripts.corpus --out DIR``) is a script.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from qonnx.core.modelwrapper import ModelWrapper

from scripts.corpus import (BREVITAS_EXAMPLES, COMMITTED_QUANTIZERS, EXPORTERS, FINN_STAGES, GRAPH_PTQ, ORT_FORMATS,
                            ORT_OPTIMIZED, QKERAS, TF2ONNX_ORT, TORCH_QAT, _run, brevitas_entry, check, generate)
from tests.fuzz.oracle import width
from tests.fuzz.real_files import executed_range


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), quick=True)


def test_quick_corpus_has_no_failed_file_and_the_oracle_agrees(corpus, tmp_path):
    entries, rejected = corpus
    assert rejected == []
    producers = {e.producer for e in entries}
    assert producers == set(EXPORTERS.values()) | set(ORT_FORMATS.values()) | set(GRAPH_PTQ.values()) | {
        FINN_STAGES["step_convert_to_hw"], ORT_OPTIMIZED, TORCH_QAT, QKERAS, TF2ONNX_ORT, BREVITAS_EXAMPLES["qonnx"],
        *COMMITTED_QUANTIZERS.values()}
    results = [check(entry, tmp_path) for entry in entries]
    assert [(r.entry.name, r.detail) for r in results if r.status != "handled"] == []
    # every layer's executed worst case is the analysed range, not merely inside it; regression (found by the
    # corpus): the FINN HW graph of the residual net reads a MatMul FINN left unlowered through Shuffle ->
    # DuplicateStreams -> ElementwiseMul, once "not on an integer grid"
    assert all(r.tight == r.layers > 0 for r in results), [(r.entry.name, r.tight, r.layers) for r in results]
    # step 5: finetune ran on every quick file with QONNX Quant nodes (refusals are notes): outputs verified, in P
    quant_files = [r for r in results if r.entry.producer in (EXPORTERS["qonnx"], GRAPH_PTQ["qonnx"], QKERAS)]
    assert quant_files and all(r.finetuned for r in quant_files), [(r.entry.name, r.notes) for r in quant_files]
    # step 7: verify --data compared with the executed accumulators on every file with float MAC layers (QONNX, Q/DQ)
    float_macs = [r for r in results if r.entry.producer in (*EXPORTERS.values(), ORT_FORMATS["QDQ"], TORCH_QAT)]
    assert float_macs and all(r.simulated for r in float_macs), [(r.entry.name, r.simulated) for r in float_macs]


def test_oracle_sees_a_projection_that_breaks_its_promise(corpus, tmp_path):
    """The check can fail: a projected QOperator layer whose weights are set back to the extreme codes no longer
    fits P when executed (the comparison ``scripts.corpus`` makes for every promised layer)."""
    entry = next(e for e in corpus[0] if e.name.startswith("ort_QOperator"))
    out, bits = tmp_path / "p.onnx", 14
    assert _run("project", entry.path, out, "--acc-bits", bits)[0] == 0
    model = ModelWrapper(str(out))
    node = next(n for n in model.graph.node if n.op_type == "QLinearMatMul")
    fitted = executed_range(model, node.name)
    assert width(fitted.lo, fitted.hi) <= bits
    weights = model.get_initializer(node.input[3])
    model.set_initializer(node.input[3], np.where(weights >= 0, np.iinfo(weights.dtype).max,
                                                  np.iinfo(weights.dtype).min).astype(weights.dtype))
    broken = executed_range(model, node.name)
    assert width(broken.lo, broken.hi) > bits


def test_channels_last_lowering_is_refused_by_name(tmp_path):
    """Found by the corpus: ``lower`` (and ``allocate``, which lowers for its cost model) of qonnx's channels-last
    form failed inside FINN's LowerConvsToMatMul ("cannot reshape array"), or on a depthwise file named its Convs
    grouped (the (O, kh, kw, I) weights read as OIHW); it now names the form and the way forward."""
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec("depthwise", 4, 4, per_channel=True), "qonnx")
    last = tmp_path / "last.onnx"
    ModelWrapper(str(path)).transform(ConvertToChannelsLastAndClean()).save(str(last))
    out = tmp_path / "hw.onnx"
    code, _, err = _run("lower", last, out, "--acc-bits", 16)
    assert code == 1 and "channels-last form" in err and "'Conv_0'" in err and "grouped" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_oracle_reads_gemm_alpha(alpha, tmp_path):
    """Gemm scales its product by ``alpha``: the oracle took a Gemm with alpha = 0.5 for one whose integer sums are
    half as large (analysed range not tight). The integer accumulator is the sum of code products whatever alpha is;
    the analysed, executed and brute-force ranges now agree."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).integers(-127, 128, size=(8, 16)).astype(np.int8)  # transB: (N, K)
    nodes = [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["adq"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], axis=0),
             helper.make_node("Gemm", ["adq", "wdq"], ["y"], name="gm", alpha=alpha, transB=1)]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "as"), numpy_helper.from_array(np.array(0, np.uint8), "az"),
             numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.linspace(0.01, 0.02, 8).astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(8, np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    path = tmp_path / "alpha.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code, out, _ = _run("analyze", path, "--json", "--per-channel")
    (layer,) = json.loads(out)["layers"]
    executed = executed_range(ModelWrapper(str(path)), "gm")
    brute_max = np.where(w > 0, w.astype(np.int64) * 255, 0).sum(axis=1)
    assert executed.acc_max.tolist() == layer["per_channel"]["acc_max"] == brute_max.tolist()


def test_batched_conv_lowering_is_refused_by_name(tmp_path):
    """Found by running qonnx's own transformations on the corpus: a Brevitas CNN set to batch 4 (qonnx
    ``ChangeBatchSize(4)``) is analysed, projected and verified, but FINN's sliding-window layers take one image at a
    time: ``lower`` failed only when executing FINN's graph ("cannot reshape array of size 1600 into shape
    (1,10,10,4)"), with a hint to check qonnx execution, which works. It now names the layers and the batch."""
    from qonnx.transformation.change_batchsize import ChangeBatchSize

    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec("cnn", 4, 4, signed_act=True), "qonnx")
        ModelWrapper(str(path)).transform(ChangeBatchSize(4)).save(str(tmp_path / "batch4.onnx"))
    out = tmp_path / "hw.onnx"
    code, _, err = _run("lower", tmp_path / "batch4.onnx", out, "--acc-bits", 16)
    assert code == 1 and "Conv 'Conv_0' (batch 4)" in err and "ChangeBatchSize(1)" in err, err
    assert not out.exists()
    assert _run("verify", tmp_path / "batch4.onnx", "--acc-bits", 16)[0] == 0


@pytest.mark.parametrize("rounding", ["ROUND", "FLOOR", "CEIL", "UP", "DOWN", "HALF_UP", "HALF_DOWN"])
def test_quant_weight_zero_points_in_every_rounding_mode(rounding, tmp_path):
    """A QONNX Quant with a zero point per output channel (unsigned 4-bit codes, real weight (code - z) * s): read,
    projected under --zero-point subtract and written back in every qonnx rounding mode, each range equal to the one
    the oracle executes through qonnx's own Quant, before and after projection. UP (away from 0) makes code 0 only
    of an exact 0, which float32 cannot always store (here channel 3, s = 0.08, z = 15): project refuses it by name
    (it exited 4, its write check failing)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from scripts.corpus import Entry

    rng = np.random.default_rng(0)
    q = "qonnx.custom_op.general"
    s, z = np.linspace(0.05, 0.1, 6).astype(np.float32), np.array([3, 8, 0, 15, 7, 9], np.float32)
    w = (rng.integers(0, 16, size=(12, 6)) - z + rng.uniform(-0.4, 0.4, size=(12, 6))) * s
    inits = {"w": w.astype(np.float32), "ws": s.reshape(1, 6), "wz": z.reshape(1, 6), "wb": np.float32(4),
             "xs": np.float32(0.5), "xz": np.float32(0), "xb": np.float32(4)}
    nodes = [helper.make_node("Quant", ["x", "xs", "xz", "xb"], ["xq"], domain=q, signed=0, narrow=0),
             helper.make_node("Quant", ["w", "ws", "wz", "wb"], ["wq"], domain=q, signed=0, narrow=0, rounding_mode=rounding),
             helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    path = tmp_path / "zp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(q, 1)]), str(path))
    result = check(Entry(path.stem, "hand-built QONNX", path, zero_point="subtract"), tmp_path)
    if rounding == "UP":
        assert result.status == "refused" and result.tight == 1 and "'mm' rounds its weights UP" in result.detail
    else:
        assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 1, 1)


def test_oracle_is_exact_beyond_float32_integers(tmp_path):
    """Found by the corpus: int16 QDQ accumulators reach 2^32, where the oracle's float32 products (the zero point
    times the weight sums, the MAC itself) rounded by a few units and made exact analyses look unsound. The executed
    range now equals the analysed one per channel (both against the brute force over the file's own codes)."""
    import json

    import onnx
    from onnx import numpy_helper

    from tests.ort_models import matmul_conv, quantize

    float_path, path = tmp_path / "float.onnx", tmp_path / "int16.onnx"
    quantize(float_path, path, matmul_conv(float_path), "QDQ", "QInt16", "QInt16")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    w, zero = inits["W1_quantized"].astype(np.int64), int(inits["x_zero_point"])
    assert zero != 0
    code, out, _ = _run("analyze", path, "--json", "--per-channel")
    layer = next(layer for layer in json.loads(out)["layers"] if layer["node"] == "mm")
    executed = executed_range(ModelWrapper(str(path)), "mm")
    brute_max = np.where(w > 0, w * 32767, w * -32768).sum(axis=0)
    assert executed.acc_max.tolist() == layer["per_channel"]["acc_max"] == brute_max.tolist()
    assert executed.hi >= 1 << 31



@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_1d_convolutions_are_lowered_and_3d_ones_refused_by_name(kind, tmp_path):
    """Brevitas' QuantConv1d, strided and dilated QuantConvTranspose1d (read as 2-D only before: "could not read
    this layer (ValueError: not enough values to unpack)") and QuantConv3d with a depthwise layer: every layer
    read, projected and executed within P, each range tight (the oracle attacks an interior output of every stride
    phase). FINN's flow lowers 1-D convolutions (through its 1-D step, qonnx's Change3DTo4DTensors) and 2-D ones
    only: the 1-D net is lowered whole, its ConvTranspose1d too (made 2-D with the rest, then pixel padding, a
    sliding window and an MVAU; before, Change3DTo4DTensors refused the graph for it and `lower` named it), every
    MVAU executed within its accDataType by the oracle, also where the weights come through Q/DQ nodes
    (``export_weight_q_node=True``, converted to Quant nodes for FINN); the 3-D net is refused by name instead of
    qonnx's "list index out of range"."""
    from scripts.corpus import EXPORTERS, Entry
    from tests.brevitas_nets import NetSpec, build_corpus_net

    spec = NetSpec(kind, 4, 4, signed_act=kind == "conv1d", per_channel=kind == "conv1d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcdq, qonnx, qcdq_wq = (build_corpus_net(tmp_path, spec, exporter)
                                for exporter in ("qcdq_ts", "qonnx", "qcdq_ts_wq"))
    # the QCDQ file with weights as stored Quant-like Q/DQ: lowered where its net is 1-D, else refused by name
    result = check(Entry(qcdq.stem, EXPORTERS["qcdq_ts"], qcdq, lower=kind == "conv1d"), tmp_path)
    assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 3, 3)
    for path, exporter in ((qonnx, "qonnx"), (qcdq_wq, "qcdq_ts_wq")):
        result = check(Entry(path.stem, EXPORTERS[exporter], path, lower=True), tmp_path)
        if kind == "conv1d":
            assert (result.status, result.detail, result.tight) == ("handled", "", 3), (exporter, result)
        else:
            assert result.status == "refused" and result.tight == 3, (exporter, result)
            assert all(text in result.detail for text in ("FINN lowers only 1-D and 2-D convolutions", "(3-D)"))


def test_a_1d_net_finn_lowers_is_lowered_within_its_widths(tmp_path):
    """Brevitas' QuantConv1d with a depthwise QuantConv1d, through the QONNX exporter and as QCDQ with weight Q/DQ
    nodes: `lower` (FINN's 1-D step) lowers both, and the real-file oracle executes every MVAU/VVAU of the result
    within the accDataType it was given (step 4 of the corpus), where `lower` refused 1-D convolutions before."""
    from scripts.corpus import Entry
    from tests.brevitas_nets import NetSpec, build_corpus_net

    spec = NetSpec("conv1d_dw", 4, 4)
    for exporter in ("qonnx", "qcdq_ts_wq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = build_corpus_net(tmp_path, spec, exporter)
        result = check(Entry(path.stem, EXPORTERS[exporter], path, lower=True), tmp_path)
        assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 3, 3), (exporter, result)


def test_onnxruntime_files_lower_takes_are_lowered_and_the_others_refused_by_name(tmp_path):
    """The corpus asks `lower` of an onnxruntime file what it does: its symmetric uint8 QDQ file (zero point 128,
    int8 for FINN) and its default asymmetric one (activation zero points as thresholds) are lowered, every MVAU/VVAU
    executed within its accDataType; its int4 one (Q/DQ nodes qonnx's QCDQToQuant leaves) is refused by name before
    FINN's steps. Before, every onnxruntime file was expected to be refused, and the symmetric ones failed the
    corpus once `lower` took them."""
    from scripts.corpus import ORT_WITH_OPTIONS, Entry, _lowers_as_quant
    from tests.ort_models import matmul_conv, quantize

    # (matmul_conv: the residual net's float thresholds can meet exact ties, which `lower` reports as a difference;
    # tests/test_finn_quant_forms.py covers that)
    for name, types, extra, lowered in (("symmetric", ("QInt8", "QUInt8"), {"ActivationSymmetric": True}, True),
                                        ("default", ("QInt8", "QUInt8"), {}, True),
                                        ("int4", ("QInt4", "QUInt4"), {}, False)):
        float_path, path = tmp_path / f"float_{name}.onnx", tmp_path / f"ort_QDQ_matmul_conv_{name}.onnx"
        shape = matmul_conv(float_path, opset=21 if name == "int4" else 13)
        quantize(float_path, path, shape, "QDQ", *types, True, extra_options=extra)
        assert _lowers_as_quant(path) == lowered
        result = check(Entry(path.stem, ORT_WITH_OPTIONS, path, lower=lowered), tmp_path)
        assert result.status == "handled" and result.detail == "", (name, result)
        assert ("lower refused by name" in result.notes) != lowered, (name, result.notes)


def test_finn_dataflow_partition_is_reported_not_passed_over(tmp_path):
    """FINN's step_create_dataflow_partition moves the HW layers into a child model file behind a
    StreamingDataflowPartition node; the parent graph holds none of them. The partition is reported (verify
    fails naming it and the file), and the child file itself verifies."""
    from a2q_passes.finn_runtime import ensure_finn_importable

    ensure_finn_importable()
    from finn.transformation.fpgadataflow.create_dataflow_partition import CreateDataflowPartition

    mlp = Path(__file__).resolve().parents[1] / "models" / "digits_mlp_w4a4.onnx"
    assert _run("lower", mlp, tmp_path / "hw.onnx", "--acc-bits", 18)[0] == 0  # its MVAUs fit 18 bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parent = ModelWrapper(str(tmp_path / "hw.onnx")).transform(
            CreateDataflowPartition(partition_model_dir=str(tmp_path)))
    parent.save(str(tmp_path / "parent.onnx"))
    (partition,) = [n for n in parent.graph.node if n.op_type == "StreamingDataflowPartition"]
    child = next(a.s.decode() for a in partition.attribute if a.name == "model")
    partition.domain = "finn.custom_op.general"  # where old FINN kept it: read as the same partition
    parent.save(str(tmp_path / "parent_old_finn.onnx"))
    for name in ("parent.onnx", "parent_old_finn.onnx"):
        code, out, err = _run("verify", tmp_path / name, "--acc-bits", 32, "--json")
        (layer,) = json.loads(out)["layers"]
        assert code == 3 and partition.name in err and layer["proof"] == "unknown" and child in layer["status"], (
            name, out, err)
    code, out, err = _run("verify", child, "--acc-bits", 32)
    assert code == 0, err


def test_qonnx_channels_last_convolutions(tmp_path):
    """qonnx's ConvertToChannelsLastAndClean puts each Conv in its channels-last domain (NHWC data, OIHW weights):
    read, projected and executed within P with every range tight, and `verify --data` simulates every layer (it
    once died with an internal error: the simulator convolved the NHWC data as NCHW); exact at 32 bits."""
    from scripts.corpus import CHANNELS_LAST, channels_last_files
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = build_corpus_net(tmp_path, NetSpec("cnn", 4, 4, signed_act=True), "qonnx")
    (entry,), rejected = channels_last_files(tmp_path, [source])
    assert rejected == [] and entry.producer == CHANNELS_LAST
    result = check(entry, tmp_path)
    assert (result.status, result.detail, result.layers, result.tight) == ("handled", "", 3, 3)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(4, 4, 8, 8)).astype(np.float32))
    code, out, err = _run("verify", entry.path, "--acc-bits", 32, "--data", tmp_path / "x.npz", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert all(v["data_note"] == "" and v["data_accumulations"] > 0 and v["data_overflows"] == 0
               for v in report["layers"]), report["layers"]
    assert report["data"]["max_abs_output_deviation"] == 0


def test_qonnx_channels_last_with_zero_points(tmp_path):
    """qonnx's channels-last form of a Brevitas net with ShiftedUint8 weights and activations: every range equals the
    executed one under fold (the oracle used to add the activation zero point's padded taps in NCHW order to an NHWC
    output, a broadcasting error, once these weights were read), and project under subtract fits P."""
    from scripts.corpus import CHANNELS_LAST, Entry, channels_last_files
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = build_corpus_net(tmp_path, NetSpec("cnn", 4, 4, signed_act=True, shifted=True), "qonnx")
    (entry,), _ = channels_last_files(tmp_path, [source])
    assert entry.zero_point == "subtract"  # as the corpus projects its ShiftedUint8 source
    subtract = check(entry, tmp_path)
    assert (subtract.status, subtract.detail, subtract.tight) == ("handled", "", 3)
    fold = check(Entry(entry.name, CHANNELS_LAST, entry.path, zero_point="fold"), tmp_path)
    assert fold.status == "refused" and fold.tight == fold.layers == 3 and "--zero-point subtract" in fold.detail


@pytest.mark.parametrize("exporter,per_channel", [("qcdq_ts", False), ("qonnx", False), ("qonnx", True)])
def test_brevitas_shifted_weights_under_both_zero_point_conventions(exporter, per_channel, tmp_path):
    """Brevitas' ShiftedUint8 quantizers give weights and activations zero points. Both exports' ranges equal the
    executed ones under both conventions (fold: the raw codes, the oracle adding each weight's zero point back;
    subtract: code - zero point); project needs subtract, and says so under fold. The QONNX export's weight zero
    points (a Quant's zero point, per tensor or per channel) were refused ("reads zero points from DequantizeLinear
    only"); they are read as DequantizeLinear's are. FINN refuses such a QONNX model itself; `lower` gives it the
    activation zero points as thresholds and the weights as their codes q - z (before, it refused the file by name),
    and the lowered MVAUs hold their executed worst case."""
    from scripts.corpus import EXPORTERS, Entry
    from tests.brevitas_nets import NetSpec, build_corpus_net

    spec = NetSpec("mlp", 8, 8, signed_act=True, per_channel=per_channel, shifted=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, spec, exporter)
    fold = check(Entry(path.stem, EXPORTERS[exporter], path, zero_point="fold"), tmp_path)
    assert fold.status == "refused" and fold.tight == fold.layers == 3 and "--zero-point subtract" in fold.detail
    subtract = check(Entry(path.stem, EXPORTERS[exporter], path, zero_point="subtract"), tmp_path)
    assert (subtract.status, subtract.detail, subtract.tight) == ("handled", "", 3)
    if exporter == "qonnx":
        lowered = check(Entry(path.stem, EXPORTERS[exporter], path, zero_point="subtract", lower=True), tmp_path)
        assert (lowered.status, lowered.detail) == ("handled", ""), lowered


def test_allocate_step_proves_the_map_and_sees_an_unprojected_output(corpus, tmp_path, monkeypatch):
    """Step 6 (``--allocate``): allocate's map on a QONNX file is proven by project, verify and the oracle; with a
    ``project --widths-json`` that writes the input back unchanged, the check fails the file."""
    import shutil

    import scripts.corpus as corpus_script

    entry = next(e for e in corpus[0] if e.producer == EXPORTERS["qonnx"])
    (tmp_path / "honest").mkdir()
    honest = check(entry, tmp_path / "honest", allocate=True)
    assert honest.status == "handled" and honest.allocated > 0, (honest.detail, honest.notes)
    # an onnxruntime QDQ file: allocated under --cost acc-bits (no FINN), its map proven the same way
    qdq = next(e for e in corpus[0] if e.producer == ORT_FORMATS["QDQ"] and e.zero_point == "fold")
    (tmp_path / "qdq").mkdir()
    allocated = check(qdq, tmp_path / "qdq", allocate=True)
    assert allocated.status == "handled" and allocated.allocated > 0, (qdq.name, allocated.detail, allocated.notes)
    real = corpus_script._run

    def unprojected(*args):
        if args[0] == "project" and "--widths-json" in args:
            shutil.copy(args[1], args[2])
            return 0, "", ""
        return real(*args)

    monkeypatch.setattr(corpus_script, "_run", unprojected)
    (tmp_path / "sabotaged").mkdir()
    sabotaged = check(entry, tmp_path / "sabotaged", allocate=True)
    assert sabotaged.status == "FAILED" and "allocated" in sabotaged.detail, sabotaged.detail


@pytest.mark.parametrize("exporter", ["qonnx", "qcdq_dynamo"])
def test_brevitas_per_channel_activation_into_a_depthwise_conv_through_the_corpus_check(exporter, tmp_path):
    """A Brevitas net whose depthwise Conv reads a ``QuantReLU`` with one scale per channel (``scaling_per_output_channel``
    with ``per_channel_broadcastable_shape``, as Brevitas' MobileNet-v1 writes it), exported as QONNX (a ``Quant``
    with a (1, 8, 1, 1) scale) and as Brevitas' default QCDQ (a ``DequantizeLinear`` with a 1-D scale along axis 1):
    every layer read, each analysed range the executed one, projected, verified, allocated and lowered."""
    from a2q_passes.model_io import load_model
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec("depthwise_pc", 4, 4), exporter)
        model = load_model(path)
        depthwise = next(n for n in model.graph.node if n.op_type == "Conv" and n.attribute and
                         any(a.name == "group" and a.i == 8 for a in n.attribute))
        scale = model.get_initializer(model.find_producer(depthwise.input[0]).input[1])
        assert scale.size == 8 and np.ptp(scale) > 0, scale  # one scale per channel, differing
        result = check(brevitas_entry(path, EXPORTERS[exporter], exporter, "fold"), tmp_path, allocate=True)
    assert result.entry.lower and result.status == "handled", (result.detail, result.notes)
    assert result.layers == 3 and result.tight == 3 and result.allocated == 3, (result.tight, result.allocated)


def test_oracle_reads_codes_a_qlinear_op_outputs_and_runs_four_bit_weights(tmp_path):
    """onnxruntime's attention block with int4 weights and uint8 activations, saved by its optimizer at level ``all``:
    the attention MatMuls become ``QLinearMatMul`` nodes whose uint8 output the last MatMul reads through a
    ``DequantizeLinear``. The corpus check (found by ``scripts.fuzz_ort``, seed 6) failed in the oracle, not in a2q:
    it fed that cut source float32 ("Unexpected input data type ... expected: (tensor(uint8))"), and then ran the
    int4 weights' ``DequantizeLinear`` in onnxruntime, whose Python binding takes no 4-bit array."""
    from scripts.corpus import ORT_OPTIMIZED, Entry
    from tests.ort_models import attention, optimized, quantize

    float_path, path, saved = tmp_path / "float.onnx", tmp_path / "qdq.onnx", tmp_path / "ort_attention_int4_all.onnx"
    quantize(float_path, path, attention(float_path, opset=21), "QDQ", "QInt4", act="QUInt8", per_channel=False)
    optimized(path, saved, "all")
    graph = onnx.load(str(saved)).graph
    qlinear = {n.output[0] for n in graph.node if n.op_type == "QLinearMatMul"}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in qlinear for n in graph.node)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in graph.initializer)
    result = check(Entry(saved.stem, ORT_OPTIMIZED, saved), tmp_path)
    assert result.status == "handled" and result.simulated > 0, (result.detail, result.notes)


def test_oracle_reads_an_attention_operand_whose_codes_are_transposed(tmp_path):
    """onnxruntime's optimizer moves the Transpose of attention's k between its QuantizeLinear and DequantizeLinear
    (int16 QDQ, level ``extended``): the oracle follows the codes through that move to the quantizer it frees, so the
    file is checked (before: "unchecked: operand ... is dequantized from codes no QuantizeLinear computes",
    three of 150 files of ``scripts.fuzz_ort --seed 7``)."""
    from scripts.corpus import ORT_OPTIMIZED, Entry
    from tests.ort_models import attention, optimized, quantize

    float_path, path, saved = tmp_path / "float.onnx", tmp_path / "qdq.onnx", tmp_path / "ort_attention_int16_ext.onnx"
    quantize(float_path, path, attention(float_path, opset=21), "QDQ", "QInt16", act="QInt16", per_channel=False)
    optimized(path, saved, "extended")
    graph = onnx.load(str(saved)).graph
    moved = {n.output[0] for n in graph.node if n.op_type == "Transpose"}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in moved for n in graph.node)  # codes transposed
    result = check(Entry(saved.stem, ORT_OPTIMIZED, saved), tmp_path)
    assert result.status == "handled" and result.layers == result.tight, (result.status, result.detail, result.tight)


def test_brevitas_scaled_dot_product_attention_through_the_corpus_check(tmp_path):
    """Brevitas' QuantScaledDotProductAttention after three QuantLinear projections, exported as QONNX by the dynamo
    exporter: every layer read, the scores and the weighted sum (two products of activations) within their analysed
    ranges, projected, simulated and fine-tuned. Before, the oracle stopped ("both operands read the same graph
    input": the export lists its shared quantizer constants as graph inputs) and fine-tuning refused the file (the
    torch bridge had no ``Where``, which masks the scores)."""
    import brevitas.nn as qnn
    import torch
    from brevitas.export import export_qonnx

    from scripts.corpus import Entry

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity()
            self.q, self.k, self.v = (qnn.QuantLinear(8, 8, bias=False) for _ in range(3))
            self.attention = qnn.QuantScaledDotProductAttention()

        def forward(self, x):
            x = self.inp(x)
            return self.attention(self.q(x), self.k(x), self.v(x))

    torch.manual_seed(0)
    path = tmp_path / "brevitas_sdpa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(Attention().eval(), torch.randn(1, 5, 8), export_path=str(path), dynamo=True)
    graph = onnx.load(str(path)).graph
    assert {"Where", "Softmax"} <= {n.op_type for n in graph.node}
    assert {i.name for i in graph.input} & {i.name for i in graph.initializer}  # constants listed as inputs
    # not lowered: `lower` refuses products of two activations by name
    result = check(Entry(path.stem, EXPORTERS["qonnx"], path, lower=False), tmp_path)
    assert result.status == "handled" and result.layers == 5 and result.tight == 5, (result.detail, result.notes)
    assert result.notes == [], result.notes  # fine-tuning ran (a refusal would be noted)


@pytest.mark.parametrize("kind, exporter", [("upsample", "qcdq_ts"), ("classifier", "qcdq_ts")])
def test_brevitas_upsampling_and_flattened_classifier_through_the_corpus_check(kind, exporter, tmp_path):
    """``nn.Upsample`` between convolutions (a nearest ``Resize``, which the oracle traces as a selection of source
    codes) and ``torch.flatten`` into a ``QuantLinear`` with its own input quantizer (a ``Flatten`` read by the
    quantizer in Brevitas' QCDQ export): every layer read within its executed worst case, projected, verified and
    lowered whole (before: `lower` left the ``Resize`` and the ``Flatten`` float nodes, and the oracle could not read
    the upsampled layer). The layer behind the upsampling is conservative: taps repeated from one source pixel
    cannot take opposite extremes."""
    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_corpus_net(tmp_path, NetSpec(kind, 4, 4, signed_act=kind == "classifier"), exporter)
        result = check(brevitas_entry(path, EXPORTERS[exporter], exporter, "fold"), tmp_path)
    assert result.entry.lower and result.status == "handled", (result.detail, result.notes)
    assert result.layers == 3 and result.tight == (2 if kind == "upsample" else 3), result.tight
