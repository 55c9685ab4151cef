"""MACs in qonnx's and FINN's own domains that a2q does not read: never passed over.

Regression: Brevitas' QONNX export of ``QuantLSTM`` writes a ``QuantLSTMCell`` node in qonnx's domain, an op qonnx
does not define; a2q loaded the file, found only the ``QuantLinear`` behind it, and ``verify`` said "no overflow
possible in any checked layer" (exit 0) with the cell's accumulators never read. FINN's ``XnorPopcountMatMul`` (its
binary MatMul, after ``ConvertBipolarMatMulToXnorPopcount``) was passed over the same way; it is now read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.cli_helpers import digest, run_cli


def _brevitas_lstm(path):
    """QuantIdentity -> QuantLSTM -> QuantIdentity -> QuantLinear, exported by Brevitas' QONNX TorchScript exporter."""
    import brevitas.nn as qnn
    import torch
    from brevitas.export import export_qonnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(return_quant_tensor=True)
            self.lstm = qnn.QuantLSTM(8, 6, batch_first=True, return_quant_tensor=True)
            self.out = qnn.QuantIdentity(return_quant_tensor=True)
            self.fc = qnn.QuantLinear(6, 3, bias=False)

        def forward(self, x):
            return self.fc(self.out(self.lstm(self.inp(x))[0]))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(Net().eval(), torch.randn(1, 5, 8), export_path=str(path), dynamo=False)


def test_brevitas_quant_lstm_is_refused_and_never_passed_over(tmp_path):
    """The file is refused at load, naming the node and the op (project writes nothing); with --allow-unknown-ops
    (analyze, verify) the cell is an unsupported layer, so both exit 3 naming it."""
    path = tmp_path / "lstm.onnx"
    _brevitas_lstm(path)
    cells = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantLSTMCell"]
    assert len(cells) == 1  # the precondition: Brevitas wrote the cell as one node
    before = digest(path)

    code, out, err = run_cli("analyze", path)
    assert code == 1 and cells[0] in err and "QuantLSTMCell" in err and "qonnx does not define" in err, err
    for command in (("analyze",), ("verify", "--acc-bits", "32")):
        code, out, err = run_cli(command[0], path, *command[1:], "--allow-unknown-ops")
        assert code == 3 and cells[0] in out + err, (command, code, out, err)
    out_path = tmp_path / "out.onnx"
    code, out, err = run_cli("project", path, out_path, "--acc-bits", "16")
    assert code == 1 and cells[0] in err and not out_path.exists(), (code, err)
    assert digest(path) == before


def test_finn_streamlined_binary_mlp_is_read_as_xnor_popcounts(tmp_path):
    """FINN's streamlining of the zoo's TFC-w1a1 (the model FINN's build saves as step_streamline.onnx) multiplies
    with qonnx's XnorPopcountMatMul: each is read as the count it is, its range exactly the one qonnx executes on
    every weight column and its complement; verify passes at the width of K and fails one bit below, naming the
    layer that needs it, without touching the file. Before, the layers were passed over (then refused by name)."""
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    from scripts.corpus import FINN_STAGES, Entry, _finn_stage_models, check
    from tests.fuzz.real_files import executed_range

    source = cleanup_model(ModelWrapper(str(Path(__file__).parent / "data" / "TFC_1W1A.onnx")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (_, model), (_, hw) = _finn_stage_models(source, ["step_streamline", "step_convert_to_hw"], tmp_path / "finn")
    path = tmp_path / "step_streamline.onnx"
    model.save(str(path))
    hw.save(str(tmp_path / "step_convert_to_hw.onnx"))
    xnor = [n.name for n in model.graph.node if n.op_type == "XnorPopcountMatMul"]
    assert len(xnor) == 4  # the precondition: FINN made every MatMul an xnor popcount
    before = digest(path)

    code, out, err = run_cli("analyze", path, "--json", "--per-channel")
    layers = {layer["node"]: layer for layer in json.loads(out)["layers"]}
    assert code == 0 and set(layers) == set(xnor), (code, err)
    for name in xnor:
        executed = executed_range(model, name)
        assert layers[name]["status"] == "ok"
        assert (layers[name]["per_channel"]["acc_min"], layers[name]["per_channel"]["acc_max"]) == (
            executed.acc_min.tolist(), executed.acc_max.tolist()), name
    assert executed_range(model, xnor[0]).hi == 784  # K = 28 x 28 input bits: 10 unsigned bits
    code, out, err = run_cli("verify", path, "--acc-bits", "10")
    assert code == 0, err
    code, out, err = run_cli("verify", path, "--acc-bits", "9")
    assert code == 3 and xnor[0] in err and not any(name in err for name in xnor[1:]), err
    assert digest(path) == before
    # a multi-stage datapath of 16-term tiles: a tile counts up to 16 matches (qonnx executes the first layer on an
    # input whose first 16 bits are those of a weight column and whose others are not: 16), so 4 inner bits fail and
    # 5 pass; before, the tiles of a popcount were not checked and the self-check caught the simulation (exit 4)
    weights = model.get_initializer(model.graph.node[[n.name for n in model.graph.node].index(xnor[0])].input[1])
    column = weights[:, 0]
    witness = np.where(np.arange(len(column)) < 16, column, 1 - column).astype(np.float32)[None]
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("XnorPopcountMatMul", ["x", "w"], ["y"], domain="qonnx.custom_op.general")], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, len(column)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights.shape[1]])],
        [numpy_helper.from_array(weights, "w")]), opset_imports=[helper.make_opsetid("", 13),
                                                                  helper.make_opsetid("qonnx.custom_op.general", 1)])
    probe = ModelWrapper(probe)
    probe.set_tensor_datatype("x", DataType["BINARY"])
    assert execute_onnx(probe, {"x": witness})["y"][0, 0] == 16
    for stage in (path, tmp_path / "step_convert_to_hw.onnx"):  # and FINN's xnor MVAUs alike
        code, out, err = run_cli("verify", stage, "--acc-bits", "4", "--tile", "16", "--outer-bits", "10")
        assert code == 3 and "partial sum within a tile reaches [0, 16]" in out, (stage.name, code, err)
        code, out, err = run_cli("verify", stage, "--acc-bits", "5", "--tile", "16", "--outer-bits", "10")
        assert code == 0, (stage.name, code, err)
    # the corpus' whole check: every range against qonnx's execution, and `verify --data`'s overflow counts against
    # the counts the whole file executes to
    result = check(Entry(path.stem, FINN_STAGES["step_streamline"], path), tmp_path / "check")
    assert result.status == "handled" and result.tight == 4 and result.simulated > 0, (result.detail, result.notes)


def test_xnor_popcount_of_an_input_that_is_not_binary_is_not_read(tmp_path):
    """qonnx's XnorPopcountMatMul counts matching bits only for inputs of 0 and 1: one reading an INT2 input is no
    count, so it is not read and verify does not pass it."""
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 2, (64, 4)).astype(np.float32)
    node = helper.make_node("XnorPopcountMatMul", ["x", "w"], ["y"], name="xnor", domain="qonnx.custom_op.general")
    graph = helper.make_graph([node], "bnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(weights, "w")])
    graph.quantization_annotation.append(onnx.TensorAnnotation(tensor_name="x", quant_parameter_tensor_names=[
        onnx.StringStringEntryProto(key="finn_datatype", value="INT2")]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("qonnx.custom_op.general", 1)])
    path = tmp_path / "xnor.onnx"
    onnx.save(model, str(path))
    code, out, err = run_cli("analyze", path, "--json")
    (layer,) = json.loads(out)["layers"]
    assert layer["status"].startswith("input not quantized: a 0/1 input is counted"), layer
    code, out, err = run_cli("verify", path, "--acc-bits", "16")
    assert code == 3 and "xnor" in err, (code, out, err)


def test_finn_attention_layer_is_an_unsupported_layer(tmp_path):
    """finn-plus' ScaledDotProductAttention HW layer (and its HLS variant) multiplies two pairs of activations into
    its AccQKMatMul and AccAVMatMul accumulators: reported unsupported, naming the node, and never verified."""
    for op, domain in (("ScaledDotProductAttention", "finn.custom_op.fpgadataflow"),
                       ("ScaledDotProductAttention_hls", "finn.custom_op.fpgadataflow.hls")):
        node = helper.make_node(op, ["q", "k", "v"], ["y"], name="sdpa", domain=domain, QKDim=4, QLen=3, VDim=4,
                                KVLen=3, QType="INT8", KType="INT8", VType="INT8", OType="INT8")
        graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(t, TensorProto.FLOAT, [3, 4])
                                                        for t in "qkv"],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
        for t in "qkv":
            graph.quantization_annotation.append(onnx.TensorAnnotation(tensor_name=t, quant_parameter_tensor_names=[
                onnx.StringStringEntryProto(key="finn_datatype", value="INT8")]))
        path = tmp_path / f"{op}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)]),
                  str(path))
        code, out, err = run_cli("analyze", path)
        assert code == 3 and f"{op} is a MAC a2q does not read" in out + err, (op, code, out, err)
        code, out, err = run_cli("verify", path, "--acc-bits", "32")
        assert code == 3 and "sdpa" in err, (op, code, out, err)


def test_xnor_popcount_over_image_windows_is_simulated_on_data(tmp_path):
    """A binary CNN after FINN's streamlining counts matches over Im2Col windows: its XnorPopcountMatMul reads a 4-D
    (N, H, W, taps) input. verify --data simulates it over the leading axes (before, it stopped with a traceback,
    "cannot reshape array of size 115200 into shape (1,1152)", on Brevitas' CNV-w1a1), and the corpus check finds
    its counts those qonnx executes."""
    from scripts.corpus import FINN_STAGES, Entry, check

    rng = np.random.default_rng(0)
    weights = rng.integers(0, 2, (9, 3)).astype(np.float32)
    node = helper.make_node("XnorPopcountMatMul", ["x", "w"], ["y"], name="xnor", domain="qonnx.custom_op.general")
    graph = helper.make_graph([node], "bcnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 3])],
                              [numpy_helper.from_array(weights, "w")])
    graph.quantization_annotation.append(onnx.TensorAnnotation(tensor_name="x", quant_parameter_tensor_names=[
        onnx.StringStringEntryProto(key="finn_datatype", value="BINARY")]))
    path = tmp_path / "xnor_windows.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                      helper.make_opsetid("qonnx.custom_op.general", 1)]), str(path))
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 2, (8, 4, 4, 9)).astype(np.float32))
    code, out, err = run_cli("verify", path, "--acc-bits", "3", "--data", tmp_path / "x.npz", "--json")
    assert code == 3 and "Traceback" not in err, err
    (layer,) = json.loads(out)["layers"]
    # every output of every window counted (8 samples x 4 x 4 windows x 3 channels), some past 3 bits
    assert layer["data_accumulations"] == 8 * 16 * 3 and layer["data_overflows"] > 0 and not layer["data_note"], layer
    result = check(Entry(path.stem, FINN_STAGES["step_streamline"], path, input_dtype="BINARY"), tmp_path / "check")
    assert result.status == "handled" and result.tight == 1 and result.simulated > 0, (result.detail, result.notes)
