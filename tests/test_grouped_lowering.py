"""``a2q lower`` of grouped (not depthwise) convolutions: FINN has no grouped MVAU, so a2q lowers each as a dense MVAU
with block-diagonal weights (``finn_quant_forms.GroupedConvAsDense``).

Expected values come from brute-force worst-case sums of the lowered MVAU's own weights, from torch's grouped
convolution (the dense block-diagonal weights must compute it) and from executing both graphs with qonnx.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.registry import getCustomOp
from torch import nn

from a2q_passes.finn_accumulators import iterate_mac_nodes
from a2q_passes.finn_quant_forms import GroupedConvAsDense
from a2q_passes.metadata import recorded_accumulators
from tests.cli_helpers import run_cli
from tests.test_finn_flow import _brute_force_range, _conv, _input_quant, _mac_rows, _relu, export_net

torch.set_num_threads(1)


class GroupedCNN(nn.Module):
    """conv -> grouped 3x3 (2 groups) -> depth multiplier 2 (group = input channels, twice the output channels)."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.inp = _input_quant()
        self.conv1, self.relu1 = _conv(3, 8, 3, padding=1), _relu()
        self.grouped, self.relu2 = _conv(8, 8, 3, groups=2, stride=2), _relu()
        self.multiplier = _conv(8, 16, 3, groups=8)

    def forward(self, x):
        return self.multiplier(self.relu2(self.grouped(self.relu1(self.conv1(self.inp(x))))))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    torch.manual_seed(0)
    model = export_net(GroupedCNN(), folder / "grouped.onnx")
    return model, folder


def test_block_diagonal_weights_compute_the_grouped_convolution():
    rng = np.random.default_rng(0)
    for groups, c_in, c_out in ((2, 8, 6), (4, 4, 8), (3, 6, 3)):
        w = rng.integers(-8, 8, size=(c_out, c_in // groups, 3, 3)).astype(np.float32)
        # integer inputs: every sum is exact in float32, so the two convolutions agree to the bit on any CPU's kernels
        # (on float inputs onnxruntime and torch differed in the last bit on one)
        x = rng.integers(-8, 8, size=(1, c_in, 7, 7)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=groups, kernel_shape=[3, 3])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, list(x.shape))],
                                  [helper.make_tensor_value_info("y", 1, [1, c_out, 5, 5])],
                                  [numpy_helper.from_array(w, "w")])
        model = ModelWrapper(helper.make_model(graph))
        dense, changed = GroupedConvAsDense().apply(model)
        assert changed and dense.get_initializer("w").shape == (c_out, c_in, 3, 3)
        assert [a.i for a in dense.graph.node[0].attribute if a.name == "group"] == [1]
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=groups).numpy()
        got = execute_onnx(dense, {"x": x})["y"]
        assert np.array_equal(got, expected)
        assert np.count_nonzero(dense.get_initializer("w")) == np.count_nonzero(w)


def test_grouped_convs_lower_to_dense_mvaus_within_their_projected_widths(grouped, tmp_path):
    model, folder = grouped
    projected = tmp_path / "p.onnx"
    widths = {"Conv_0": 13, "Conv_1": 11, "Conv_2": 10}
    code, out, err = run_cli("project", folder / "grouped.onnx", projected,
                             *[a for name, bits in widths.items() for a in ("--layer", f"{name}={bits}")])
    assert code == 0, out + err
    hw_path = tmp_path / "hw.onnx"
    code, out, err = run_cli("lower", projected, hw_path)  # the widths project recorded
    assert code == 0, out + err
    hw = ModelWrapper(str(hw_path))
    nodes = list(iterate_mac_nodes(hw))
    assert [n.op_type for n in nodes] == ["MVAU"] * 3  # no grouped layer left out, none made a VVAU
    record = recorded_accumulators(hw)
    assert [record[n.name]["qonnx_node"] for n in nodes] == list(widths)  # each mapped to its own layer
    for node, (qonnx_node, target) in zip(nodes, widths.items()):
        inst = getCustomOp(node)
        rows = _mac_rows(hw, node)
        idt, adt = DataType[inst.get_nodeattr("inputDataType")], DataType[inst.get_nodeattr("accDataType")]
        lo, hi = _brute_force_range(rows, int(idt.min()), int(idt.max()))
        assert adt.min() <= lo and hi <= adt.max() and adt.bitwidth() <= target, (qonnx_node, lo, hi, adt)
        assert record[node.name]["target_bits"] == target
    # the grouped layer: each output channel reads one group's 4 input channels (of 8) at every tap
    rows = _mac_rows(hw, nodes[1])
    assert rows.shape == (8, 72) and all(np.count_nonzero(row) <= 36 for row in rows)
    # and the lowered graph computes what the projected QONNX graph computes
    q = ModelWrapper(str(projected))
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ref = execute_onnx(q, {q.graph.input[0].name: x})[q.graph.output[0].name]
    got = execute_onnx(hw, {hw.graph.input[0].name: x})[hw.graph.output[0].name]
    assert np.max(np.abs(ref - got)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


def test_grouped_conv_with_weights_it_cannot_rewrite_is_refused_by_name(grouped, tmp_path):
    """A scale per weight (not per output channel) would need a block-diagonal scale too: refused, naming the
    Conv and why, before FINN's steps (whose LowerConvsToMatMul fails with "cannot reshape array")."""
    model, _ = grouped
    model = ModelWrapper(model.model.SerializeToString())
    conv = next(n for n in model.graph.node if n.name == "Conv_1")
    quant = model.find_producer(conv.input[1])
    weights = model.get_initializer(quant.input[0])
    scale = model.get_initializer(quant.input[1])
    model.set_initializer(quant.input[1], np.broadcast_to(scale, weights.shape).copy())  # same values, full shape
    path, out = tmp_path / "per_weight.onnx", tmp_path / "hw.onnx"
    model.save(str(path))
    code, _, message = run_cli("lower", path, out, "--acc-bits", 16)
    assert code == 1 and "grouped Conv 'Conv_1'" in message and "scale per weight" in message, message
    assert "reshape" not in message and not out.exists()
