"""Brevitas' graph-mode post-training quantization of float nets, exported as Brevitas writes it.

This is the flow of ``brevitas_examples`` (``imagenet_classification/ptq/ptq_common.py``, Brevitas' PTQ
benchmark for torchvision models): ``preprocess_for_quantize`` traces the float model with torch.fx,
``quantize_model`` swaps its layers for quantized ones through one of Brevitas' graph backends (``fx``:
``brevitas.graph.quantize.quantize``; ``layerwise``: ``layerwise_quantize``; ``flexml``), ``calibrate`` sets the
activation scales from seeded random batches, and ``export_qonnx`` / ``export_onnx_qcdq`` write the file. Unlike
hand-built Brevitas nets (``tests/brevitas_nets.py``), the quantizers sit where the backend puts them: a signed
input quantizer of the next layer right after each ReLU, biases quantized by ``Int32Bias`` with per-channel scales.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

# quantize_model's arguments the specs do not vary (brevitas_examples' defaults for an integer PTQ run)
_BASE = dict(bias_bit_width=None, act_quant_percentile=99.999, act_quant_type="sym", scale_factor_type="float_scale",
             quant_format="int", weight_quant_granularity="per_channel")

# short names of quantize_model options in file names
_TAGS = {("weight_quant_granularity", "per_tensor"): "pt", ("scale_factor_type", "po2_scale"): "po2",
         ("act_quant_type", "asym"): "asymact", ("weight_quant_type", "asym"): "asymw",
         ("weight_param_method", "mse"): "mse", ("bias_bit_width", 32): "bias32"}


@dataclass(frozen=True)
class GraphPtqSpec:
    kind: str  # "mlp" (three Linear) or "residual" (Conv/BN/ReLU, a residual Add, a depthwise Conv, Linear)
    backend: str  # "fx", "layerwise" or "flexml"
    weight_bits: int
    act_bits: int
    options: tuple[tuple[str, object], ...] = ()  # further quantize_model arguments
    exporter: str = "qonnx"  # "qonnx" or "qcdq"

    @property
    def name(self) -> str:
        extra = "".join(f"_{_TAGS.get((key, value), f'{key}-{value}')}" for key, value in self.options)
        return f"brevitas_graph_ptq_{self.exporter}_{self.kind}_{self.backend}_w{self.weight_bits}a{self.act_bits}{extra}"

    @property
    def asymmetric_weights(self) -> bool:
        return dict(self.options).get("weight_quant_type") == "asym"


def _net(kind: str):
    import torch
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(20, 32), nn.Linear(32, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(torch.relu(self.l0(x)))))

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.b0(self.c0(x)))
            y = y + torch.relu(self.b1(self.c1(y)))
            return self.fc(torch.flatten(self.pool(torch.relu(self.dw(y))), 1))

    return (Mlp, (1, 20)) if kind == "mlp" else (Residual, (1, 3, 8, 8))


def export_graph_ptq(folder: Path, spec: GraphPtqSpec, seed: int = 0) -> Path:
    """Quantize the seeded float net of ``spec`` with Brevitas' graph PTQ and export it to ``folder``."""
    import torch
    from brevitas.export import export_onnx_qcdq, export_qonnx
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import calibrate, quantize_model

    net, shape = _net(spec.kind)
    torch.manual_seed(seed)
    model = net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = preprocess_for_quantize(model, equalize_iters=0)
        quantized = quantize_model(model, backend=spec.backend, weight_bit_width=spec.weight_bits,
                                   act_bit_width=spec.act_bits, **{**_BASE, **dict(spec.options)})
        calibrate([(torch.randn(*shape), torch.zeros(1)) for _ in range(8)], quantized)
        quantized.eval()
        path = folder / f"{spec.name}.onnx"
        with torch.no_grad():
            (export_qonnx if spec.exporter == "qonnx" else export_onnx_qcdq)(
                quantized, torch.randn(*shape), export_path=str(path))
    return path
