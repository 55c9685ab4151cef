"""Brevitas' own published model definitions (``brevitas_examples``), built untrained and exported as their users do.

FINN's end-to-end flows start from these: the BNN-PYNQ networks (TFC, SFC, LFC, CNV; ``bnn_pynq.models``), the
accumulator-aware ESPCN super-resolution models of the A2Q papers (``super_resolution.models``), and MobileNet-v1
(the ``imagenet_classification.models`` class, narrow and shallow). Their pretrained weights are downloaded by Brevitas, which this project never
does: each model is built with its initial weights (seeded), its activation quantizers calibrated on a few
training-mode forward passes of seeded data, as :func:`tests.brevitas_nets.build_corpus_net` does, then exported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExampleSpec:
    family: str  # "bnn_pynq", "super_resolution" or "mobilenet_v1" (Brevitas' MobileNet-v1 class, small)
    model: str  # the name Brevitas' model factory of that family takes
    input_shape: tuple[int, ...]
    # the first layer reads the float image (no input quantizer): the integer grid a user declares for it
    input_dtype: str | None = None

    @property
    def name(self) -> str:
        return self.model


# ESPCN is fully convolutional: a small image keeps the corpus' oracle (one-hot inputs per MAC input element) within
# memory; CNV's dense head fixes its input at 32 x 32, and the full MobileNet's final 7 x 7 pool 224 x 224, too large
# for it (one-hot inputs of MobileNet's first layer alone would take 90 GB): MobileNet runs in the small form below
EXAMPLES = [ExampleSpec("bnn_pynq", name, (1, 1, 28, 28)) for name in
            ("tfc_2w2a", "tfc_1w2a", "tfc_1w1a", "sfc_2w2a", "lfc_1w2a")] + [
    ExampleSpec("super_resolution", name, (1, 3, 8, 8)) for name in
    ("quant_espcn_x2_w8a8_base", "quant_espcn_x2_w4a4_base", "quant_espcn_x2_w8a8_a2q_16b",
     "quant_espcn_x2_w4a4_a2q_13b", "quant_espcn_x2_w4a4_a2q_plus_13b", "quant_espcn_x2_w8a8_a2q_plus_16b")] + [
    # the same MobileNet class, narrow and shallow (4 to 16 channels, 20 x 20 images, a 5 x 5 final pool of 4-bit
    # codes truncated to 8 bits as in the full model): small enough for the oracle,
    # with a per-channel activation scale before each depthwise convolution as in the full model
    ExampleSpec("mobilenet_v1", "mobilenet_v1_tiny_4b", (1, 3, 20, 20), "INT8")]


def build_example(spec: ExampleSpec) -> torch.nn.Module:
    if spec.family == "bnn_pynq":
        from brevitas_examples.bnn_pynq.models import model_with_cfg

        return model_with_cfg(spec.model, pretrained=False)[0]
    if spec.family == "super_resolution":
        from brevitas_examples.super_resolution.models import get_model_by_name

        return get_model_by_name(spec.model, pretrained=False)
    from brevitas_examples.imagenet_classification.models.mobilenetv1 import MobileNet

    return MobileNet(channels=[[4], [8], [8, 16]], first_stage_stride=False, act_bit_width=4, weight_bit_width=4,
                     avg_pool_kernel_size=5, num_classes=5, round_average_pool=False)  # as its 4-bit cfg


def export_example(folder: Path, spec: ExampleSpec, exporter: str, seed: int = 0) -> Path:
    """``spec`` built, calibrated and exported: ``exporter`` is ``qonnx`` (``export_qonnx``, as exported), ``qcdq``
    (``export_onnx_qcdq``), both with Brevitas' default torch exporter (dynamo under torch 2.13), or ``qcdq_ts``
    (``export_onnx_qcdq`` through the TorchScript exporter, which exports the quantized biases dynamo refuses)."""
    from brevitas.export import export_onnx_qcdq, export_qonnx

    torch.manual_seed(seed)
    net = build_example(spec)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(8, *spec.input_shape[1:]))
    net.eval()
    path = folder / f"brevitas_examples_{exporter}_{spec.name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "qonnx":
            export_qonnx(net, torch.rand(*spec.input_shape), str(path))
        else:
            export_onnx_qcdq(net, torch.rand(*spec.input_shape), str(path), dynamo=exporter == "qcdq")
    return path
