"""Resource report of a lowered Brevitas CNN: FINN's estimators plus explicit accumulator-dependent bits.

Expected bit counts are built from the Brevitas modules (channels, activation bits) and from
brute-force worst-case accumulator values, not from the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qonnx.core.datatype import DataType
from qonnx.custom_op.registry import getCustomOp
from rich.console import Console
from rich.table import Table

from a2q_passes.errors import A2QError
from a2q_passes.finn_accumulators import iterate_mac_nodes, set_accumulator_datatypes
from a2q_passes.finn_flow import lower_to_finn_hw
from a2q_passes.resources import plot_resources, render_table, resource_report
from tests.test_finn_flow import ACT_BITS, ResidualCNN, _brute_force_range, _mac_rows, export_net

PART = "xczu3eg-sbva484-1-e"  # Ultra96


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    torch.manual_seed(0)
    net = ResidualCNN()
    model = export_net(net, tmp_path_factory.mktemp("res") / "cnn.onnx")
    hw, _ = lower_to_finn_hw(model)
    return net, set_accumulator_datatypes(hw)


def _exact_bits(hw, node) -> tuple[int, bool]:
    """Minimal accumulator width of a node from brute-force worst-case sums, and its signedness."""
    idt = DataType[getCustomOp(node).get_nodeattr("inputDataType")]
    lo, hi = _brute_force_range(_mac_rows(hw, node), int(idt.min()), int(idt.max()))
    for bits in range(1, 64):
        dt = DataType[f"{'INT' if lo < 0 else 'UINT'}{bits}"]
        if dt.min() <= lo and hi <= dt.max():
            return bits, lo < 0
    raise AssertionError("no width found")


def test_report_counts_threshold_and_register_bits(lowered):
    net, hw = lowered
    report = resource_report(hw, PART)
    json.dumps(report)  # JSON-serialisable as promised
    layers = {layer["node"]: layer for layer in report["layers"]}
    assert sorted(layers) == sorted(n.name for n in iterate_mac_nodes(hw))
    thresholded_channels = sorted(m.out_channels for m in net.thresholded_convs())
    assert sorted(layer["channels"] for layer in layers.values() if layer["has_thresholds"]) == thresholded_channels
    n_thresholds = 2**ACT_BITS - 1  # a QuantReLU with B output bits -> 2^B - 1 thresholds per channel
    for node in iterate_mac_nodes(hw):
        layer = layers[node.name]
        bits, _ = _exact_bits(hw, node)
        pe = getCustomOp(node).get_nodeattr("PE")
        assert layer["holds_exact_range"]
        assert layer["target"]["acc_register_bits"] == pe * bits
        assert layer["int32"]["acc_register_bits"] == pe * 32
        if layer["has_thresholds"]:
            # thresholds span [acc_min, acc_max + 1]: one bit wider than the accumulator (FINN's rule)
            assert layer["target"]["threshold_storage_bits"] == layer["channels"] * n_thresholds * (bits + 1)
            assert layer["int32"]["threshold_storage_bits"] == layer["channels"] * n_thresholds * 33
            assert layer["target"]["comparator_bits"] == pe * n_thresholds * (bits + 1)
        else:
            assert layer["target"]["threshold_storage_bits"] == 0
        # FINN's LUT model never grows when the accumulator shrinks
        assert layer["target"]["LUT"] <= layer["int32"]["LUT"]
        assert layer["op_type"].endswith("_hls")
    totals = report["totals"]
    assert report["ratio_int32_over_target"]["threshold_storage_bits"] == pytest.approx(
        totals["int32"]["threshold_storage_bits"] / totals["target"]["threshold_storage_bits"], abs=1e-4)
    assert report["ratio_int32_over_target"]["accumulator_dependent_bits"] > 2


def test_narrower_accumulator_means_smaller_threshold_storage(lowered):
    _, hw = lowered
    exact = {n.name: _exact_bits(hw, n)[0] for n in iterate_mac_nodes(hw)}
    tight = resource_report(hw, PART, acc_widths=exact)
    loose = resource_report(hw, PART, acc_widths={name: bits + 4 for name, bits in exact.items()})
    for t, l in zip(tight["layers"], loose["layers"]):
        assert t["target"]["acc_register_bits"] < l["target"]["acc_register_bits"]
        if t["has_thresholds"]:
            assert t["target"]["threshold_storage_bits"] < l["target"]["threshold_storage_bits"]
    assert tight["totals"]["target"]["threshold_storage_bits"] < loose["totals"]["target"]["threshold_storage_bits"]
    # a width below the exact range is estimated but flagged
    name = next(iter(exact))
    unsafe = resource_report(hw, PART, acc_widths={name: exact[name] - 1})
    flags = {layer["node"]: layer["holds_exact_range"] for layer in unsafe["layers"]}
    assert flags[name] is False and all(v for k, v in flags.items() if k != name)


def test_unknown_part_and_node_names_are_clear_errors(lowered):
    _, hw = lowered
    with pytest.raises(A2QError, match=r"unknown FPGA part 'xc-not-a-part'.*xczu3eg-sbva484-1-e"):
        resource_report(hw, "xc-not-a-part")
    with pytest.raises(A2QError, match="acc_widths names nodes that are not MVAU/VVAU"):
        resource_report(hw, PART, acc_widths={"no_such_node": 8})
    assert resource_report(hw, "Pynq-Z1")["fpgapart"] == "xc7z020clg400-1"  # board names map to parts


def test_table_and_plot(lowered, tmp_path):
    _, hw = lowered
    report = resource_report(hw, PART)
    table = render_table(report)
    assert isinstance(table, Table) and table.row_count == len(report["layers"]) + 1
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert all(layer["node"] in text for layer in report["layers"])
    png = plot_resources(report, tmp_path / "resources.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert np.isfinite(report["ratio_int32_over_target"]["LUT"])


class _SigmoidBetweenMacs(torch.nn.Module):
    """A float Sigmoid between two quantized layers: finn-plus makes it a ``PWPolyF`` HW layer, which its
    SpecializeLayers implements on Versal parts only."""

    input_shape = (3, 6, 6)

    def __init__(self) -> None:
        import brevitas.nn as qnn

        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(3, 4, 3, weight_bit_width=4, bias=False)
        self.mid = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(4 * 4 * 4, 5, weight_bit_width=4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mid(torch.sigmoid(self.conv(self.inp(x)))).flatten(1))


def test_a_hw_layer_the_part_cannot_implement_leaves_the_mac_report(tmp_path, a2q):
    """Found by probing Brevitas layers: `report` (and `lower --fpgapart` and `allocate --cost bits`, which cost
    with it) stopped with an internal error, FINN's SpecializeLayers refusing the PWPolyF of a float Sigmoid on a non-Versal part; each
    MVAU's estimate reads that node alone, so the report now covers every MAC and nothing else is specialised."""
    hw, _ = lower_to_finn_hw(export_net(_SigmoidBetweenMacs(), tmp_path / "sigmoid.onnx"))
    assert "PWPolyF" in {node.op_type for node in hw.graph.node}
    hw = set_accumulator_datatypes(hw)
    hw.save(str(tmp_path / "hw.onnx"))
    done = a2q("report", tmp_path / "hw.onnx", "--fpgapart", PART, "--json")
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout)["layers"]
    assert sorted(layer["node"] for layer in layers) == sorted(n.name for n in iterate_mac_nodes(hw))
    assert len(layers) == 2 and all(layer["target"]["LUT"] > 0 for layer in layers)
