"""``a2q analyze`` as a user runs it: output formats, plots, and every kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.brevitas_nets import build_net
from tests.cli_helpers import digest, run_a2q


@pytest.fixture(scope="module")
def conv_net(tmp_path_factory):
    return build_net(tmp_path_factory.mktemp("net"), "conv", 4, 4)


def test_table_json_plot(conv_net, tmp_path):
    table = run_a2q("analyze", conv_net.path)
    assert table.returncode == 0, table.stderr
    for node in ("Conv_0", "Conv_1"):
        assert node in table.stdout
    out = run_a2q("analyze", conv_net.path, "--json", "--per-channel", "--plot", tmp_path / "w.png")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    layer = data["layers"][0]
    for key in ("node", "op_type", "K", "channels", "input_dtype", "weight_dtype", "bounds", "acc_min", "acc_max", "status"):
        assert key in layer
    assert set(layer["bounds"]) >= {"datatype", "l1", "exact"} and layer["status"] == "ok"
    assert len(layer["per_channel"]["exact"]) == layer["channels"]
    png = (tmp_path / "w.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # same input, same bytes
    run_a2q("analyze", conv_net.path, "--plot", tmp_path / "w2.png")
    assert (tmp_path / "w2.png").read_bytes() == png


def _expect_error(result, *fragments, code=1):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_missing_file(tmp_path):
    _expect_error(run_a2q("analyze", tmp_path / "nope.onnx"), "nope.onnx", "no such file")


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a protobuf at all\n" * 10)
    _expect_error(run_a2q("analyze", bad), "notes.onnx", "not a readable ONNX model")


def test_truncated(conv_net, tmp_path):
    cut = tmp_path / "cut.onnx"
    data = conv_net.path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    before = digest(cut)
    result = run_a2q("analyze", cut)
    assert result.returncode == 1 and "cut.onnx" in result.stderr
    assert digest(cut) == before


def test_no_quantized_layer_prints_empty_report(tmp_path):
    w = onnx.numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=[w])
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph), path)
    result = run_a2q("analyze", path, "--json")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert [layer["status"] for layer in data["layers"]] == ["weights not quantized"]
    assert "no quantized MAC layer" in result.stderr


def _edit(conv_net, tmp_path, name, edit):
    model = onnx.load(conv_net.path)
    edit(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _weight_quant(model):
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next(n for n in model.graph.node if n.output[0] == conv.input[1])


def test_non_constant_weight_scale(conv_net, tmp_path):
    def edit(model):
        quant = _weight_quant(model)
        scale = next(i for i in model.graph.initializer if i.name == quant.input[1])
        model.graph.initializer.remove(scale)
        for vi in [v for v in model.graph.value_info if v.name == scale.name]:
            model.graph.value_info.remove(vi)
        model.graph.input.append(helper.make_tensor_value_info(scale.name, TensorProto.FLOAT, list(scale.dims)))

    path = _edit(conv_net, tmp_path, "dynscale.onnx", edit)
    before = digest(path)
    _expect_error(run_a2q("analyze", path), "non-constant scale", _weight_quant(onnx.load(path)).name, code=3)
    assert digest(path) == before


def test_non_integer_weight_zero_point(conv_net, tmp_path):
    """A Quant weight zero point is read (tests/test_corpus.py); one that is not an integer leaves no integer
    weights, and is refused by name."""
    def edit(model):
        quant = _weight_quant(model)
        zp = next(i for i in model.graph.initializer if i.name == quant.input[2])
        zp.CopyFrom(onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), zp.name))

    _expect_error(run_a2q("analyze", _edit(conv_net, tmp_path, "zp.onnx", edit)), "non-integer weight zero point", code=3)


def test_dynamic_shape(conv_net, tmp_path):
    def edit(model):
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"

    _expect_error(run_a2q("analyze", _edit(conv_net, tmp_path, "dyn.onnx", edit)), "dynamic shape", "make_dynamic_shape_fixed")


def test_unknown_custom_op(conv_net, tmp_path):
    def edit(model):
        second_conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
        act = next(n for n in model.graph.node if n.output[0] == second_conv.input[0])
        act.op_type, act.domain = "FancyAct", "com.example.ops"
        model.opset_import.append(helper.make_opsetid("com.example.ops", 1))

    path = _edit(conv_net, tmp_path, "custom.onnx", edit)
    _expect_error(run_a2q("analyze", path), "FancyAct", "com.example.ops", "--allow-unknown-ops")
    # allowed: the layer behind it is reported as unquantized input, the rest analysed
    result = run_a2q("analyze", path, "--allow-unknown-ops", "--json")
    statuses = [layer["status"] for layer in json.loads(result.stdout)["layers"]]
    assert statuses[0] == "ok" and statuses[1].startswith("input not quantized")


def test_bad_input_dtype_option(conv_net):
    _expect_error(run_a2q("analyze", conv_net.path, "--input-dtype", "FLOAT32"), "FLOAT32", "not an integer")


def test_annotate_records_widths_that_verify_uses(conv_net, tmp_path):
    out = tmp_path / "annotated.onnx"
    result = run_a2q("annotate", conv_net.path, out)
    assert result.returncode == 0, result.stderr
    analysis = json.loads(run_a2q("analyze", conv_net.path, "--json").stdout)
    for layer in analysis["layers"]:
        assert f"{layer['node']}: {layer['acc_dtype']}" in result.stdout
    assert run_a2q("verify", out).returncode == 0  # exactly the minimal widths: overflow impossible
    _expect_error(run_a2q("annotate", conv_net.path, conv_net.path), "--in-place")
