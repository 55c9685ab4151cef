"""PyTorch's own quantization-aware training (``torch.ao.quantization``, eager mode), exported as PyTorch writes it.

``prepare_qat`` puts ``FakeQuantize`` modules on the weights and activations; after a few seeded training-mode
passes (observers calibrate the scales) the observers are frozen and the model goes through
``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``). Each fake quantizer becomes a
QuantizeLinear/DequantizeLinear pair on float weights or activations, and the exporter shares equal parameters (the
all-zero zero points of two layers with the same channel count) through ``Identity`` nodes. The dynamo exporter
cannot export these models (torch 2.13: ``fused_moving_avg_obs_fake_quant``/``torch.export`` errors), and ONNX
allows only 8-bit ranges, so these are the files PyTorch's QAT users have.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QatSpec:
    kind: str  # "cnn" (Conv, depthwise Conv, Linear) or "mlp" (three Linear)
    per_channel: bool = True  # weights per output channel (symmetric) or per tensor (symmetric)
    reduce_range: bool = False  # activations in [0, 127], as fbgemm's reduce_range
    constant_folding: bool = True  # torch.onnx.export(do_constant_folding=...)

    @property
    def name(self) -> str:
        return (f"torch_qat_{self.kind}_{'pc' if self.per_channel else 'pt'}"
                f"{'_reduce_range' if self.reduce_range else ''}{'' if self.constant_folding else '_nofold'}")


def _net(kind: str):
    import torch.ao.quantization as tq
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            if kind == "cnn":
                self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(8 * 8 * 8, 10))
            else:
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 32),
                                          nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return self.dequant(self.body(self.quant(x)))

    return Net()


def export_torch_qat(folder: Path, spec: QatSpec, seed: int = 0) -> Path:
    """Train-mode passes on seeded data, observers frozen, the TorchScript export; returns the file's path."""
    import torch
    import torch.ao.quantization as tq

    torch.manual_seed(seed)
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                    quant_max=127 if spec.reduce_range else 255, dtype=torch.quint8)
    observer = tq.MovingAveragePerChannelMinMaxObserver if spec.per_channel else tq.MovingAverageMinMaxObserver
    weight = tq.FakeQuantize.with_args(observer=observer, quant_min=-128, quant_max=127, dtype=torch.qint8,
                                       qscheme=torch.per_channel_symmetric if spec.per_channel
                                       else torch.per_tensor_symmetric)
    model = _net(spec.kind).train()
    model.qconfig = tq.QConfig(activation=act, weight=weight)
    tq.prepare_qat(model, inplace=True)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 8, 8))
    model.eval().apply(tq.disable_observer)
    path = folder / f"{spec.name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), opset_version=13, dynamo=False,
                          do_constant_folding=spec.constant_folding)
    return path
