"""analyze's warning for weight quantizers that saturate many of the weights they are given.

Brevitas (0.13, QONNX and QCDQ exporters) writes an accumulator-aware weight quantizer (A2Q, A2Q+) as its latent
weights under the scale of the normalised weights, so the file's quantizer clips many of them: the file computes
other weights than the trained model, and the width the quantizer was trained for does not hold for the file. The
widths analyze reports are the file's; the warning says why they exceed the A2Q target. The saturated weights are
counted here by executing each weight ``Quant`` with qonnx and comparing with the unclipped ``w / s``.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_node, execute_onnx

from tests.brevitas_nets import NetSpec
from tests.cli_helpers import run_cli


def _executed_saturation(path) -> dict[str, tuple[int, int]]:
    """Per MAC with a weight Quant: (weights the executed Quant moves by more than a code and a half, weights)."""
    model = ModelWrapper(str(path))
    counts = {}
    for node in model.graph.node:
        quant = model.find_producer(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if quant is None or quant.op_type != "Quant" or model.get_initializer(quant.input[0]) is None:
            continue
        context = {name: model.get_initializer(name) for name in quant.input}
        execute_node(quant, context, model.graph, opset_version=model.model.opset_import[0].version)
        scale = context[quant.input[1]]
        moved = np.abs(context[quant.output[0]] - context[quant.input[0]]) / scale
        counts[node.name] = (int(np.count_nonzero(moved > 1.5)), int(moved.size))
    return counts


def _export(tmp_path, weight_quant: str | None, trained: bool):
    """A small Brevitas CNN (the corpus' ``cnn``) exported by ``export_qonnx``; ``trained``: its latent weights moved
    after the quantizers were built, as training moves them (A2Q's norm parameter then no longer equals their norm)."""
    import torch
    from brevitas.export import export_qonnx

    from tests.brevitas_nets import _CorpusNet

    spec = NetSpec("cnn", 4, 4, weight_quant=weight_quant, accumulator=10 if weight_quant else None)
    torch.manual_seed(0)
    net = _CorpusNet(spec)
    with torch.no_grad():
        if trained:
            for mac in (net.mac1, net.mac2, net.mac3):
                mac.weight.mul_(3.0)
        net.train()
        for _ in range(3):
            net(torch.randn(8, *spec.input_shape[1:]) * 2)
    net.eval()
    path = tmp_path / "net.onnx"
    sample = torch.randn(*spec.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(net, sample, str(path))
    with torch.no_grad():
        out = net(sample)
    return path, sample.numpy(), getattr(out, "value", out).numpy()


@pytest.mark.parametrize("weight_quant, trained, saturating", [
    ("Int8AccumulatorAwareWeightQuant", True, True), ("Int8AccumulatorAwareZeroCenterWeightQuant", True, True),
    ("Int8AccumulatorAwareWeightQuant", False, False), (None, True, False)])
def test_analyze_names_weight_quantizers_that_saturate(weight_quant, trained, saturating, tmp_path):
    path, sample, torch_out = _export(tmp_path, weight_quant, trained)
    executed = _executed_saturation(path)
    code, out, err = run_cli("analyze", path, "--json")
    assert code == 0, err
    reported = {}
    for warning in json.loads(out)["warnings"]:
        match = re.match(r"(\S+): its weight quantizer saturates (\d+) of (\d+) weights", warning)
        if match:
            reported[match.group(1)] = int(match.group(2))
    expected = {node: moved for node, (moved, size) in executed.items() if moved > 0.01 * size}
    assert reported == expected, (reported, executed)
    assert bool(expected) == saturating, executed
    # the claim of the warning: such a file computes another model than the torch one it was exported from (an
    # A2Q file that saturates nothing differs too, by the rounding of its weights: BENCHMARKS.md, Brevitas anchors)
    model = ModelWrapper(str(path))
    file_out = execute_onnx(model, {model.graph.input[0].name: sample})[model.graph.output[0].name]
    if saturating or weight_quant is None:
        assert np.allclose(file_out, torch_out, atol=1e-4) == (not saturating), np.abs(file_out - torch_out).max()
