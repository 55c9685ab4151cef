"""Brevitas' published model definitions (``tests/brevitas_example_models.py``) through the corpus' whole check, as their
users export them: FINN's BNN-PYNQ MLPs and the A2Q papers' ESPCN super-resolution models.

The ESPCN exports of an accumulator-aware quantizer saturate their weights (Brevitas writes the latent weights under
the normalised scale), which ``analyze`` names; their last convolution's output is shuffled (``DepthToSpace``, which
FINN has no layer for) before its quantizer, which ``lower`` moves in front of the shuffle
(:mod:`a2q_passes.finn_pixel_shuffle`): the shuffle then runs on the host at the output.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from scripts.corpus import BREVITAS_EXAMPLES, brevitas_entry, check
from tests.brevitas_example_models import EXAMPLES, export_example
from tests.cli_helpers import run_cli

SPECS = {spec.name: spec for spec in EXAMPLES}


@pytest.mark.parametrize("name, exporter", [("tfc_2w2a", "qcdq"), ("sfc_2w2a", "qonnx")])
def test_bnn_pynq_mlp_end_to_end(name, exporter, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_example(tmp_path, SPECS[name], exporter)
        result = check(brevitas_entry(path, BREVITAS_EXAMPLES[exporter], exporter, "fold"), tmp_path, allocate=True)
    assert result.status == "handled", (result.detail, result.notes)
    assert result.layers == 4 and result.tight == 4, (result.layers, result.tight)
    assert result.allocated == 4, result.notes


@pytest.mark.parametrize("exporter", ["qonnx", "qcdq_ts"])
def test_a2q_espcn_end_to_end_and_lowered_whole(exporter, tmp_path):
    spec = SPECS["quant_espcn_x2_w4a4_a2q_13b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_example(tmp_path, spec, exporter)
        entry = brevitas_entry(path, BREVITAS_EXAMPLES[exporter], exporter, "fold")
        assert entry.lower  # the Q/DQ export too: qonnx's QCDQToQuant converts it whole
        result = check(entry, tmp_path)
    # each layer's analysed range is the executed one; projected, verified, fine-tuned (QONNX), and lowered with
    # every MVAU's executed range inside its accDataType (the corpus check executes FINN's graph)
    assert result.layers == 4 and result.tight == 4, (result.layers, result.tight, result.detail)
    assert result.status == "handled", (result.detail, result.notes)
    if exporter == "qonnx":  # (the Q/DQ export clips the stored integers: nothing saturates, no Quant to train)
        assert result.finetuned, result.notes
        code, out, _ = run_cli("analyze", path, "--json")
        saturated = [w for w in json.loads(out)["warnings"] if "saturates" in w]
        assert code == 0 and len(saturated) >= 2, saturated  # the two A2Q hidden layers at least


def test_mobilenet_depthwise_layers_with_per_channel_scales_end_to_end(tmp_path):
    """Brevitas' MobileNet-v1 class (small): each depthwise Conv reads an activation with one scale per channel, the
    scales differing. Every layer is read (the depthwise ones were refused), its analysed range is what executes,
    and the model is projected, verified, fine-tuned, allocated and lowered (FINN's MoveMulPastDWConv, as
    finn-examples' MobileNet build runs it, moves the per-channel scale behind each depthwise Conv) with each
    MVAU/VVAU's executed range inside its accDataType."""
    from qonnx.core.modelwrapper import ModelWrapper

    spec = SPECS["mobilenet_v1_tiny_4b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_example(tmp_path, spec, "qonnx")
        model = ModelWrapper(str(path))
        depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                     and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
        scales = [model.get_initializer(model.find_producer(n.input[0]).input[1]) for n in depthwise]
        # per channel where the MobileNet class asks for it: before every depthwise Conv but that of the last stage
        assert len(depthwise) == 3 and [s.size > 1 and np.ptp(s) > 0 for s in scales] == [True, True, False], scales
        entry = replace(brevitas_entry(path, BREVITAS_EXAMPLES["qonnx"], "qonnx", "fold"), input_dtype=spec.input_dtype)
        result = check(entry, tmp_path, allocate=True)
    assert result.status == "handled", (result.detail, result.notes)
    assert result.layers == 8 and result.tight == 8 and result.allocated == 8, (result.tight, result.allocated)
    assert result.finetuned, result.notes


def test_mobilenet_qcdq_per_axis_dequantize_into_depthwise_layers_end_to_end(tmp_path):
    """The same MobileNet as Brevitas' QCDQ export writes it (TorchScript: dynamo refuses its quantized biases): the
    input of each depthwise Conv is a ``DequantizeLinear`` with a 1-D scale along axis 1 and uint8 zero points of 0.
    Every layer is read (the depthwise ones were refused), its analysed range is what executes, and the model is
    projected, verified, allocated and lowered (qonnx's QCDQToQuant makes the pair a per-channel Quant)."""
    from a2q_passes.model_io import load_model

    spec = SPECS["mobilenet_v1_tiny_4b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_example(tmp_path, spec, "qcdq_ts")
        model = load_model(path)  # Brevitas' Constant nodes as initializers
        per_axis = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "act_quant" in n.name
                    and model.get_initializer(n.input[1]).size > 1]
        assert len(per_axis) == 2 and all(np.ptp(model.get_initializer(n.input[1])) > 0 for n in per_axis)
        entry = replace(brevitas_entry(path, BREVITAS_EXAMPLES["qcdq_ts"], "qcdq_ts", "fold"), input_dtype=spec.input_dtype)
        assert entry.lower  # lower takes the file whole
        result = check(entry, tmp_path, allocate=True)
    assert result.status == "handled", (result.detail, result.notes)
    assert result.layers == 8 and result.tight == 8 and result.allocated == 8, (result.tight, result.allocated)


@pytest.mark.parametrize("name", ["cnv_1w1a", "cnv_2w2a"])
def test_bnn_pynq_cnv_lowers_with_every_mvau_holding_its_executed_range(name, tmp_path):
    """FINN's flagship CNV (BNN-PYNQ, 32 x 32 images; too large for the corpus' whole-model oracle): the binary one
    annotated at its own widths (XNOR-popcount MVAUs), the 2-bit one projected two bits below its widest layer with
    FINN's input ranges and verified; both lowered, equivalent to the QONNX model, with every MVAU's executed worst
    case (the oracle drives it through FINN's own node) inside its accDataType, of at most the target width."""
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    from tests.brevitas_example_models import ExampleSpec
    from tests.fuzz.real_files import MVAU_OPS, executed_range

    path = export_example(tmp_path, ExampleSpec("bnn_pynq", name, (1, 3, 32, 32)), "qonnx")
    widest = max(layer["bounds"]["exact"] for layer in json.loads(run_cli("analyze", path, "--json")[1])["layers"])
    target, written = tmp_path / "target.onnx", tmp_path / "hw.onnx"
    if name == "cnv_1w1a":
        assert run_cli("annotate", path, target)[0] == 0
    else:
        widest -= 2
        assert run_cli("project", path, target, "--acc-bits", widest, "--input-ranges", "finn")[0] == 0
        assert run_cli("verify", target)[0] == 0
    code, out, err = run_cli("lower", target, written, "--from-annotations", "--samples", "2")
    assert code == 0 and "equivalent" in out, (out + err)[-2000:]
    model = ModelWrapper(str(written))
    mvaus = [n for n in model.graph.node if n.op_type in MVAU_OPS]
    xnor = [n for n in mvaus if any(a.name == "binaryXnorMode" and a.i for a in n.attribute)]
    assert len(mvaus) == 9 and (len(xnor) == 8 if name == "cnv_1w1a" else not xnor)
    for node in mvaus:
        done = executed_range(model, node.name)
        acc = DataType[next(a.s.decode() for a in node.attribute if a.name == "accDataType")]
        assert acc.min() <= done.lo and done.hi <= acc.max() and acc.bitwidth() <= widest, (node.name, done, acc)
