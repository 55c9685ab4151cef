"""Tiny seeded Brevitas networks exported to QONNX, for the analysis tests.

Integer weights and input ranges are taken from Brevitas itself (``quant_weight().int()``,
the activation quantizer's bit width and signedness), independently of the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import brevitas.nn as qnn
import brevitas.quant
import numpy as np
import torch
from brevitas.export import export_qonnx
from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat,
                            ShiftedUint8ActPerTensorFloat, ShiftedUint8WeightPerChannelFloat,
                            ShiftedUint8WeightPerTensorFloat, Uint8ActPerTensorFloat)
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model


@dataclass
class ExportedNet:
    module: torch.nn.Module
    model: ModelWrapper
    path: Path
    input_shape: tuple[int, ...]
    # per MAC module in graph order: (integer weights as (channels, K), input lo, input hi)
    expected: list[tuple[np.ndarray, int, int]]


def _act_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


class _Net(torch.nn.Module):
    def __init__(self, kind: str, wbits: int, abits: int, signed_act: bool, per_channel: bool):
        super().__init__()
        wq = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
        aq = Int8ActPerTensorFloat if signed_act else Uint8ActPerTensorFloat
        self.kind = kind
        self.inp = qnn.QuantIdentity(act_quant=aq, bit_width=abits, return_quant_tensor=True)
        if kind == "conv":
            self.mac1 = qnn.QuantConv2d(2, 6, 3, weight_quant=wq, weight_bit_width=wbits, bias=True)
            self.mac2 = qnn.QuantConv2d(6, 6, 3, groups=3, weight_quant=wq, weight_bit_width=wbits, bias=False)
        else:
            self.mac1 = qnn.QuantLinear(20, 12, weight_quant=wq, weight_bit_width=wbits, bias=True)
            self.mac2 = qnn.QuantLinear(12, 5, weight_quant=wq, weight_bit_width=wbits, bias=False)
        # signed activations between layers: an identity quantizer, unsigned ones: QuantReLU
        self.act = (qnn.QuantIdentity(act_quant=aq, bit_width=abits, return_quant_tensor=True) if signed_act
                    else qnn.QuantReLU(bit_width=abits, return_quant_tensor=True))

    def forward(self, x):
        return self.mac2(self.act(self.mac1(self.inp(x))))

    def macs(self):
        return [self.mac1, self.mac2]


def _calibrated_net(kind: str, wbits: int, abits: int, signed_act: bool, per_channel: bool,
                    seed: int) -> tuple[_Net, tuple[int, ...]]:
    torch.manual_seed(seed)
    net = _Net(kind, wbits, abits, signed_act, per_channel)
    shape = (1, 2, 6, 6) if kind == "conv" else (1, 20)
    with torch.no_grad():  # calibrate activation scales on some data
        net.train()
        for _ in range(3):
            net(torch.randn(8, *shape[1:]) * 2)
    net.eval()
    return net, shape


def build_net(tmp_path: Path, kind: str = "conv", wbits: int = 4, abits: int = 4, signed_act: bool = False,
              per_channel: bool = True, seed: int = 0) -> ExportedNet:
    net, shape = _calibrated_net(kind, wbits, abits, signed_act, per_channel, seed)
    path = tmp_path / f"{kind}_w{wbits}a{abits}{'s' if signed_act else 'u'}{'pc' if per_channel else 'pt'}.onnx"
    export_qonnx(net, torch.randn(*shape), str(path))
    model = cleanup_model(ModelWrapper(str(path)))
    model.save(str(path))
    return ExportedNet(net, model, path, shape, _expected(net, abits, signed_act))


def build_qcdq_net(tmp_path: Path, kind: str = "conv", wbits: int = 4, abits: int = 4, signed_act: bool = False,
                   per_channel: bool = True, dynamo: bool = True, seed: int = 0) -> ExportedNet:
    """The same network exported with ``export_onnx_qcdq`` (QuantizeLinear -> Clip -> DequantizeLinear),
    by torch's dynamo exporter or the TorchScript one; the file is used as exported (no cleanup)."""
    from brevitas.export import export_onnx_qcdq

    net, shape = _calibrated_net(kind, wbits, abits, signed_act, per_channel, seed)
    path = tmp_path / f"qcdq_{kind}_w{wbits}a{abits}{'s' if signed_act else 'u'}{'_dynamo' if dynamo else '_ts'}.onnx"
    export_onnx_qcdq(net, torch.randn(*shape), str(path), dynamo=dynamo)
    return ExportedNet(net, ModelWrapper(str(path)), path, shape, _expected(net, abits, signed_act))


def _expected(net: _Net, abits: int, signed_act: bool) -> list[tuple[np.ndarray, int, int]]:
    expected = []
    for mac, quant in zip(net.macs(), (net.inp, net.act)):
        q = mac.quant_weight().int().detach().numpy().astype(np.int64)
        expected.append((q.reshape(q.shape[0], -1), *_act_range(abits, signed_act)))
    return expected


# --------------------------------------------------------------------------- the corpus' varied nets

CORPUS_KINDS = ("mlp", "cnn", "depthwise", "depthwise_pc", "grouped", "convtranspose", "residual", "avgpool",
                "avgpool_floor", "conv1d", "conv1d_dw", "conv3d", "attention")
# spatial dimensions of a kind's convolutions: conv1d (Conv1d, strided and dilated ConvTranspose1d, Conv1d), conv1d_dw
# (Conv1d, depthwise Conv1d, Conv1d: what FINN's 1-D flow lowers) and conv3d (Conv3d, depthwise Conv3d, Conv3d); the
# others are 2-D
_SPATIAL = {"conv1d": 1, "conv1d_dw": 1, "conv3d": 3}


@dataclass(frozen=True)
class NetSpec:
    """One small Brevitas network of the corpus (``scripts/corpus.py``): its structure and quantizers."""

    kind: str
    wbits: int = 4
    abits: int = 4
    signed_act: bool = False
    per_channel: bool = True
    narrow: bool = False  # narrow-range weights and activations ([-2^(n-1)+1, 2^(n-1)-1])
    shifted: bool = False  # asymmetric unsigned weights and activations with zero points (Brevitas' ShiftedUint8*)
    # a brevitas.quant weight quantizer class by name in place of the Int8Weight*Float ones, e.g. the accumulator-aware
    # Int8AccumulatorAwareWeightQuant (A2Q), whose l1 budget is set for ``accumulator`` bits; and an activation one
    weight_quant: str | None = None
    act_quant: str | None = None
    accumulator: int | None = None

    @property
    def name(self) -> str:
        return (f"{self.kind}_w{self.wbits}a{self.abits}{'s' if self.signed_act else 'u'}"
                f"{'pc' if self.per_channel else 'pt'}{'_narrow' if self.narrow else ''}"
                f"{'_shifted' if self.shifted else ''}{'_' + self.weight_quant if self.weight_quant else ''}"
                f"{'_' + self.act_quant if self.act_quant else ''}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "mlp":
            return (1, 24)
        if self.kind == "attention":
            return (1, 5, 16)
        return (1, 4) + (8,) * _SPATIAL.get(self.kind, 2) if self.kind != "conv3d" else (1, 4, 4, 4, 4)


class _CorpusNet(torch.nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        wq = Int8WeightPerChannelFloat if spec.per_channel else Int8WeightPerTensorFloat
        aq = Int8ActPerTensorFloat if spec.signed_act else Uint8ActPerTensorFloat
        if spec.shifted:
            wq = ShiftedUint8WeightPerChannelFloat if spec.per_channel else ShiftedUint8WeightPerTensorFloat
            aq = ShiftedUint8ActPerTensorFloat
        if spec.weight_quant:
            wq = getattr(brevitas.quant, spec.weight_quant)
        if spec.act_quant:
            aq = getattr(brevitas.quant, spec.act_quant)
        weight = dict(weight_quant=wq, weight_bit_width=spec.wbits, weight_narrow_range=spec.narrow)
        if spec.accumulator is not None:
            weight["weight_accumulator_bit_width"] = spec.accumulator

        def act(channels: int | None = None):  # signed activations: identity quantizers; unsigned ones: QuantReLU
            # channels: one scale per channel, as Brevitas' MobileNet-v1 quantizes each depthwise Conv's input
            per_channel = {} if channels is None else dict(
                per_channel_broadcastable_shape=(1, channels, 1, 1), scaling_stats_permute_dims=(1, 0, 2, 3),
                scaling_per_output_channel=True)
            if spec.signed_act:
                return qnn.QuantIdentity(act_quant=aq, bit_width=spec.abits, narrow_range=spec.narrow,
                                         return_quant_tensor=True, **per_channel)
            return qnn.QuantReLU(bit_width=spec.abits, return_quant_tensor=True, **per_channel)

        self.kind = spec.kind
        self.inp = qnn.QuantIdentity(act_quant=aq, bit_width=spec.abits, narrow_range=spec.narrow and spec.signed_act,
                                     return_quant_tensor=True)
        self.act1, self.act2 = act(8 if spec.kind == "depthwise_pc" else None), act()
        if spec.kind == "mlp":
            self.mac1 = qnn.QuantLinear(24, 16, bias=True, **weight)
            self.mac2 = qnn.QuantLinear(16, 8, bias=False, **weight)
            self.mac3 = qnn.QuantLinear(8, 4, bias=True, **weight)
            return
        if spec.kind == "attention":  # QuantMultiheadAttention: q/k/v projection, Q.K^T, softmax(.).V, output
            self.mha = qnn.QuantMultiheadAttention(16, 2, batch_first=True, **weight)
            return
        if spec.kind in _SPATIAL:
            conv = getattr(qnn, f"QuantConv{_SPATIAL[spec.kind]}d")
            self.mac1 = conv(4, 8, 3, padding=1, bias=True, **weight)
            self.mac2 = (qnn.QuantConvTranspose1d(8, 4, 3, stride=2, dilation=2, bias=False, **weight)
                         if spec.kind == "conv1d" else conv(8, 8, 3, padding=1, groups=8, bias=False, **weight))
            self.mac3 = conv(4 if spec.kind == "conv1d" else 8, 4, 1, bias=True, **weight)
            return
        self.mac1 = qnn.QuantConv2d(4, 8, 3, padding=1, bias=True, **weight)
        if spec.kind in ("depthwise", "depthwise_pc"):
            self.mac2 = qnn.QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, **weight)
        elif spec.kind == "grouped":
            self.mac2 = qnn.QuantConv2d(8, 8, 3, stride=2, groups=2, bias=False, **weight)
        elif spec.kind == "convtranspose":
            self.mac2 = qnn.QuantConvTranspose2d(8, 4, 2, stride=2, bias=False, **weight)
        elif spec.kind == "upsample":  # max-pool, then nn.Upsample back to the size (a nearest Resize)
            self.mac2 = qnn.QuantConv2d(8, 8, 3, padding=1, bias=False, **weight)
            self.pool, self.up = torch.nn.MaxPool2d(2), torch.nn.Upsample(scale_factor=2, mode="nearest")
        elif spec.kind == "classifier":  # flatten into a QuantLinear with its own input quantizer (the QCDQ Flatten)
            self.mac2 = qnn.QuantConv2d(8, 8, 3, stride=2, bias=False, **weight)
            self.mac3 = qnn.QuantLinear(8 * 3 * 3, 4, bias=True, input_quant=aq, input_bit_width=spec.abits, **weight)
            return
        else:  # cnn, residual (mac2's output added to mac1's), avgpool (TruncAvgPool2d before mac3)
            self.mac2 = qnn.QuantConv2d(8, 8, 3, padding=1, bias=False, **weight)
        if spec.kind.startswith("avgpool"):  # Brevitas' default rounding, or FLOOR (the only Trunc FINN converts)
            rounding = {"float_to_int_impl_type": "FLOOR"} if spec.kind == "avgpool_floor" else {}
            self.pool = qnn.TruncAvgPool2d(kernel_size=2, stride=2, bit_width=spec.abits + 2, return_quant_tensor=True,
                                           **rounding)
        if spec.kind == "residual":
            self.add_quant = act()
        self.mac3 = qnn.QuantConv2d(4 if spec.kind == "convtranspose" else 8, 4, 1, bias=True, **weight)

    def forward(self, x):
        if self.kind == "attention":
            h = self.inp(x).value
            return self.mha(h, h, h, need_weights=False)[0]
        h = self.act1(self.mac1(self.inp(x)))
        if self.kind == "mlp":
            return self.mac3(self.act2(self.mac2(h)))
        if self.kind == "residual":
            h = self.act2(self.add_quant(h) + self.add_quant(self.mac2(h)))
        elif self.kind == "upsample":
            h = self.act2(self.mac2(self.up(self.pool(h))))
        else:
            h = self.act2(self.mac2(h))
        if self.kind == "classifier":
            return self.mac3(torch.flatten(torch.relu(h.value if hasattr(h, "value") else h), 1))
        if self.kind.startswith("avgpool"):
            h = self.pool(h)
        return self.mac3(h)


def build_corpus_net(folder: Path, spec: NetSpec, exporter: str, seed: int = 0) -> Path:
    """``spec`` calibrated on seeded data and exported by Brevitas: ``exporter`` is ``qonnx`` (``export_qonnx``,
    then qonnx's cleanup as FINN's flow runs it), ``qcdq_ts`` or ``qcdq_dynamo`` (``export_onnx_qcdq``, as exported),
    or ``qcdq_ts_wq`` (``export_onnx_qcdq(..., export_weight_q_node=True)``: float weights through their own
    QuantizeLinear, Clip and DequantizeLinear)."""
    from brevitas.export import export_onnx_qcdq

    torch.manual_seed(seed)
    net = _CorpusNet(spec)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(8, *spec.input_shape[1:]) * 2)
    net.eval()
    path = folder / f"brevitas_{exporter}_{spec.name}.onnx"
    sample = torch.randn(*spec.input_shape)
    if exporter == "qonnx":
        export_qonnx(net, sample, str(path))
        cleanup_model(ModelWrapper(str(path))).save(str(path))
    elif exporter == "qcdq_ts_wq":
        export_onnx_qcdq(net, sample, str(path), dynamo=False, export_weight_q_node=True)
    else:
        export_onnx_qcdq(net, sample, str(path), dynamo=exporter == "qcdq_dynamo")
    return path
