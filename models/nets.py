"""Model architectures, each buildable as a float torch model or a Brevitas quantized model.

Both variants use the same module names, so a float state_dict loads into any quantized variant
(`load_float_weights`), including one rebuilt with Brevitas's accumulator-aware quantizers:

    build_model("fmnist_cnn", 4, 4, weight_quant=Int8AccumulatorAwareZeroCenterWeightQuant,
                accumulator_bit_width=14)

Quantized variants: 8-bit unsigned `QuantIdentity` on the [0, 1] input (scale 1/255, so 8-bit
images pass unchanged), unsigned `QuantReLU` activations, per-channel weight quantization, float
biases. Every activation quantizer returns a QuantTensor, so each MAC layer knows its input bit width
and sign (Brevitas's A2Q / A2Q+ quantizers need both).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import brevitas.nn as qnn
import torch
from brevitas.core.restrict_val import RestrictValueType
from brevitas.core.scaling import ScalingImplType
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
from torch import nn

IO_BIT_WIDTH = 8  # ESPCN's first/last layer weights, network input and SR output


class UintActQuant(Uint8ActPerTensorFloat):
    """Unsigned per-tensor activation quantizer; the bit width is given per layer.

    The scale is learned in the log domain after `collect_stats_steps` training steps of
    percentile statistics (Brevitas's default of 300 is longer than a digits epoch budget).
    """

    bit_width = None
    restrict_scaling_type = RestrictValueType.LOG_FP
    collect_stats_steps = 30


class UnitIntervalQuant(Uint8ActPerTensorFloat):
    """Fixed 8-bit unsigned quantizer of [0, 1]: scale 1/255, for network inputs and SR outputs."""

    scaling_impl_type = ScalingImplType.CONST
    scaling_init = 1.0


@dataclass(frozen=True)
class LayerFactory:
    """Builds float torch layers (weight_bit_width None) or Brevitas layers with identical names.

    `weight_quant_kwargs` are passed to every *constrainable* MAC layer's weight quantizer
    (as Brevitas `weight_<key>=value`), e.g. accumulator_bit_width for the A2Q quantizers.
    """

    weight_bit_width: int | None
    act_bit_width: int | None
    weight_quant: type = Int8WeightPerChannelFloat
    weight_quant_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def quantized(self) -> bool:
        return self.weight_bit_width is not None

    def _weight_args(self, weight_bit_width: int | None, weight_quant: type | None) -> dict[str, Any]:
        """Weight quantizer kwargs; an explicit `weight_quant` marks a fixed (unconstrained) IO layer."""
        if weight_quant is not None:
            return {"weight_quant": weight_quant, "weight_bit_width": weight_bit_width or self.weight_bit_width}
        extra = {f"weight_{key}": value for key, value in self.weight_quant_kwargs}
        return {"weight_quant": self.weight_quant, "weight_bit_width": weight_bit_width or self.weight_bit_width,
                **extra}

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
             groups: int = 1, bias: bool = True, weight_bit_width: int | None = None,
             weight_quant: type | None = None) -> nn.Module:
        if not self.quantized:
            return nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=bias)
        return qnn.QuantConv2d(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=bias,
                               **self._weight_args(weight_bit_width, weight_quant))

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        if not self.quantized:
            return nn.Linear(in_features, out_features)
        return qnn.QuantLinear(in_features, out_features, bias=True, **self._weight_args(None, None))

    def relu(self) -> nn.Module:
        if not self.quantized:
            return nn.ReLU()
        return qnn.QuantReLU(act_quant=UintActQuant, bit_width=self.act_bit_width, return_quant_tensor=True)

    def input_quant(self) -> nn.Module:
        if not self.quantized:
            return nn.Identity()
        return qnn.QuantIdentity(act_quant=UnitIntervalQuant, bit_width=IO_BIT_WIDTH, return_quant_tensor=True)

    def output_quant(self) -> nn.Module:
        """[0, 1] image output: 8-bit with scale 1/255 (Relu + Quant in the graph), or a float clamp."""
        if not self.quantized:
            return nn.Hardtanh(0.0, 1.0)
        return qnn.QuantReLU(act_quant=UnitIntervalQuant, bit_width=IO_BIT_WIDTH, return_quant_tensor=False)


def _digits_cnn(f: LayerFactory) -> nn.Module:
    # 8x8 -> conv3x3 pad1 -> pool -> 4x4 -> conv3x3 valid (K=144) -> 2x2 -> pool -> 1x1 -> fc
    return nn.Sequential(OrderedDict(
        input_quant=f.input_quant(),
        conv1=f.conv(1, 16, 3, padding=1), relu1=f.relu(), pool1=nn.MaxPool2d(2),
        conv2=f.conv(16, 32, 3), relu2=f.relu(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=f.linear(32, 10),
    ))


def _digits_mlp(f: LayerFactory) -> nn.Module:
    return nn.Sequential(OrderedDict(
        input_quant=f.input_quant(), flatten=nn.Flatten(),
        fc1=f.linear(64, 64), relu1=f.relu(),
        fc2=f.linear(64, 32), relu2=f.relu(),
        fc3=f.linear(32, 10),
    ))


class DigitsResDW(nn.Module):
    """conv -> max-pool -> [depthwise 3x3 -> pointwise 1x1] + skip -> conv 4x4 -> fc.

    One `add_quant` QuantReLU instance is both the branch's activation and the skip's re-quantizer
    (a no-op ReLU there: the skip is non-negative), so both Add inputs share one scale and the sum
    stays on one integer grid; `relu_add` re-quantizes the (one bit wider) sum to act_bit_width.
    """

    def __init__(self, f: LayerFactory) -> None:
        super().__init__()
        self.input_quant = f.input_quant()
        self.conv1, self.relu1, self.pool1 = f.conv(1, 16, 3, padding=1), f.relu(), nn.MaxPool2d(2)
        self.dwconv, self.relu_dw = f.conv(16, 16, 3, padding=1, groups=16), f.relu()  # K=9
        self.pwconv = f.conv(16, 16, 1)
        self.add_quant = f.relu()
        self.relu_add = f.relu()
        self.conv3, self.relu3 = f.conv(16, 32, 4), f.relu()  # 4x4 valid -> 1x1, K=256
        self.flatten, self.fc = nn.Flatten(), f.linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.pool1(self.relu1(self.conv1(self.input_quant(x))))
        branch = self.pwconv(self.relu_dw(self.dwconv(skip)))
        x = self.relu_add(self.add_quant(skip) + self.add_quant(branch))
        return self.fc(self.flatten(self.relu3(self.conv3(x))))


def _fmnist_cnn(f: LayerFactory) -> nn.Module:
    # 28 -> conv pad1 -> pool 14 -> conv pad1 (K=144) -> pool 7 -> conv (K=288) 5 -> conv (K=576) 3 -> pool 1
    return nn.Sequential(OrderedDict(
        input_quant=f.input_quant(),
        conv1=f.conv(1, 16, 3, padding=1), relu1=f.relu(), pool1=nn.MaxPool2d(2),
        conv2=f.conv(16, 32, 3, padding=1), relu2=f.relu(), pool2=nn.MaxPool2d(2),
        conv3=f.conv(32, 64, 3), relu3=f.relu(),
        conv4=f.conv(64, 64, 3), relu4=f.relu(), pool4=nn.MaxPool2d(3),
        flatten=nn.Flatten(), fc=f.linear(64, 10),
    ))


def _fmnist_mlp(f: LayerFactory) -> nn.Module:
    return nn.Sequential(OrderedDict(
        input_quant=f.input_quant(), flatten=nn.Flatten(),
        fc1=f.linear(784, 96), relu1=f.relu(),
        fc2=f.linear(96, 64), relu2=f.relu(),
        fc3=f.linear(64, 10),
    ))


def _espcn_x2(f: LayerFactory) -> nn.Module:
    """ESPCN x2 on luminance, after Brevitas's FINN-friendly QuantESPCN without BatchNorm.

    First and last convs have fixed 8-bit weights (outside the accumulator constraint, as in
    Brevitas's A2Q experiments); the last is per-tensor and bias-free because FINN cannot move
    per-channel scales or biases through DepthToSpace.
    """
    model = nn.Sequential(OrderedDict(
        input_quant=f.input_quant(),
        conv1=f.conv(1, 64, 5, padding=2, weight_bit_width=IO_BIT_WIDTH, weight_quant=Int8WeightPerChannelFloat),
        relu1=f.relu(),
        conv2=f.conv(64, 32, 3, padding=1), relu2=f.relu(),  # K=576
        conv3=f.conv(32, 32, 3, padding=1), relu3=f.relu(),  # K=288
        conv4=f.conv(32, 4, 3, padding=1, bias=False, weight_bit_width=IO_BIT_WIDTH,
                     weight_quant=Int8WeightPerTensorFloat),
        pixel_shuffle=nn.PixelShuffle(2),
        output_quant=f.output_quant(),
    ))
    if not f.quantized:  # quantized models always receive trained float weights instead
        _init_bilinear_path(model)
    return model


@torch.no_grad()
def _init_bilinear_path(espcn: nn.Module) -> None:
    """Start the float ESPCN as bilinear x2 upscaling carried by channel 0 (a residual-style init).

    Channel 0 of conv1..conv3 passes the input through (ReLU keeps it: the input is >= 0); conv4's
    four sub-pixel outputs take bilinear taps of it. The other channels keep their random init and
    learn the correction; seen to reach a higher PSNR in half the epochs of a plain init.
    """
    for conv in (espcn.conv1, espcn.conv2, espcn.conv3):
        centre = conv.kernel_size[0] // 2
        conv.weight[0].zero_()
        conv.weight[0, 0, centre, centre] = 1.0
        conv.bias[0] = 0.0
    espcn.conv4.weight.zero_()
    # sub-pixel r of LR pixel i sits at i - 1/4 (r=0) or i + 1/4 (r=1): weights 3/4 on i, 1/4 on the neighbour
    taps = {0: {0: 0.25, 1: 0.75}, 1: {1: 0.75, 2: 0.25}}
    for r, row_taps in taps.items():
        for c, col_taps in taps.items():
            for a, wa in row_taps.items():
                for b, wb in col_taps.items():
                    espcn.conv4.weight[2 * r + c, 0, a, b] = wa * wb


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[LayerFactory], nn.Module]
    dataset: str  # a models.data dataset name
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample


MODELS: dict[str, ModelSpec] = {
    "digits_cnn": ModelSpec(_digits_cnn, "digits", (1, 8, 8)),
    "digits_mlp": ModelSpec(_digits_mlp, "digits", (1, 8, 8)),
    "digits_resdw": ModelSpec(DigitsResDW, "digits", (1, 8, 8)),
    "fmnist_cnn": ModelSpec(_fmnist_cnn, "fashion_mnist", (1, 28, 28)),
    "fmnist_mlp": ModelSpec(_fmnist_mlp, "fashion_mnist", (1, 28, 28)),
    "espcn_x2": ModelSpec(_espcn_x2, "sr", (1, 32, 32)),
}


def build_model(name: str, weight_bit_width: int | None = 4, act_bit_width: int | None = 4,
                weight_quant: type = Int8WeightPerChannelFloat, **weight_quant_kwargs: Any) -> nn.Module:
    """Build model `name`; weight_bit_width=None gives the float model (same module names).

    weight_quant: Brevitas weight quantizer class for the constrainable MAC layers (all of them,
    except ESPCN's fixed 8-bit first/last layer). weight_quant_kwargs go to those quantizers,
    e.g. accumulator_bit_width=14 for Int8AccumulatorAware(ZeroCenter)WeightQuant.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    if (weight_bit_width is None) != (act_bit_width is None):
        raise ValueError(f"{name}: give both weight_bit_width and act_bit_width, or neither (float model)")
    factory = LayerFactory(weight_bit_width, act_bit_width, weight_quant, tuple(sorted(weight_quant_kwargs.items())))
    return MODELS[name].build(factory)


def load_float_weights(model: nn.Module, checkpoint: Path | str | dict[str, torch.Tensor]) -> nn.Module:
    """Load a float checkpoint (weights, biases) into a float or quantized model of the same architecture.

    Quantizer state absent from the float checkpoint is initialised by Brevitas from the loaded
    weights (weight scales, A2Q norms) or from statistics during the first training steps
    (activation scales). Any float weight the model does not expect is an error.
    """
    state = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has tensors the model lacks: {result.unexpected_keys}")
    missing_float = [k for k in result.missing_keys if k.endswith((".weight", ".bias")) and "_quant" not in k]
    if missing_float:
        raise ValueError(f"checkpoint lacks weights the model needs: {missing_float}")
    return model
