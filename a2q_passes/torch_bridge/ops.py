"""Per-op converters: one function per ONNX / QONNX op type, each mapping torch inputs to outputs.

Every converter takes the parsed node (:class:`OnnxNode`) and its input tensors (``None`` for an
omitted optional input) and returns one tensor or a tuple of tensors, following the ONNX
operator specification (and qonnx's ``execute_node`` for the custom ops) closely enough that
the forward pass matches ``qonnx.core.onnx_exec.execute_onnx`` to float rounding.

Quantizers round with a straight-through estimator (identity gradient through the rounding,
zero gradient where the value was clipped), so gradients reach the float weights and, if they
are parameters, the scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from a2q_passes.bounds import integer_range
from a2q_passes.graph_values import auto_pads

ConverterOutput = Tensor | tuple[Tensor, ...]
Converter = Callable[["OnnxNode", list[Tensor | None]], ConverterOutput]

# Custom ops live in these domains (qonnx's own and the older FINN one).
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")
_ONNX_DOMAINS = ("", "ai.onnx")
# qonnx's channels-last wrappers (ConvertToChannelsLastAndClean) of these standard ops
CHANNELS_LAST_DOMAIN = "qonnx.custom_op.channels_last"
_CHANNELS_LAST_OPS = ("BatchNormalization", "Conv", "MaxPool")

_ONNX_CONVERTERS: dict[str, Converter] = {}
_QONNX_CONVERTERS: dict[str, Converter] = {}


@dataclass(frozen=True)
class OnnxNode:
    """The parts of an ONNX node a converter needs, with attributes decoded to Python values."""

    index: int  # position in the original graph, identifies unnamed nodes
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    opset: int = 13  # version of the default ONNX domain the model imports

    @classmethod
    def from_proto(cls, index: int, node: onnx.NodeProto, opset: int) -> "OnnxNode":
        attrs = {a.name: _decode_attribute(a) for a in node.attribute}
        return cls(index, node.name, node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs, opset)

    @property
    def key(self) -> str:
        """The node's name, or a stand-in for unnamed nodes (FINN leaves many nodes unnamed)."""
        return self.name if self.name else f"#{self.index}:{self.op_type}"

    @property
    def label(self) -> str:
        shown = f"'{self.name}'" if self.name else f"#{self.index} (unnamed)"
        return f"node {shown} of type {self.op_type}"

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def _decode_attribute(attribute: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def converter_for(node: OnnxNode) -> Converter:
    """The converter of ``node``; a clear error when the op (or its domain) is not supported."""
    if node.domain in _ONNX_DOMAINS:
        table = _ONNX_CONVERTERS
    elif node.domain in QONNX_DOMAINS:
        table = _QONNX_CONVERTERS
    elif node.domain == CHANNELS_LAST_DOMAIN:
        if node.op_type not in _CHANNELS_LAST_OPS:
            raise NotImplementedError(f"{node.label} (domain '{node.domain}') is not supported by the torch bridge; "
                                      f"supported: {', '.join(_CHANNELS_LAST_OPS)}")
        return _channels_last(_ONNX_CONVERTERS[node.op_type])
    else:
        raise NotImplementedError(f"{node.label}: op domain '{node.domain}' is not supported by the torch bridge")
    if node.op_type not in table:
        raise NotImplementedError(
            f"{node.label} (domain '{node.domain or 'ai.onnx'}') is not supported by the torch bridge; "
            f"supported: {', '.join(sorted(table))}"
        )
    return table[node.op_type]


def _channels_last(convert: Converter) -> Converter:
    """qonnx's channels-last form of ``convert``'s op: the data (and a Conv's weights) stored with the channels
    last, run channels first and the output put back, as qonnx's ``ChannelsLastWrappedOp`` executes it."""

    def run(node: OnnxNode, inputs: list[Tensor | None]) -> ConverterOutput:
        ndim = inputs[0].dim()
        first, last = (0, ndim - 1, *range(1, ndim - 1)), (0, *range(2, ndim), 1)
        moved = [inputs[0].permute(first), *inputs[1:]]
        if node.op_type == "Conv":
            moved[1] = inputs[1].permute(first)
        return convert(node, moved).permute(last)

    return run


def supported_ops() -> dict[str, list[str]]:
    """Supported op types, by domain group."""
    return {"onnx": sorted(_ONNX_CONVERTERS), "qonnx": sorted(_QONNX_CONVERTERS),
            "qonnx channels-last": list(_CHANNELS_LAST_OPS)}


def _register(table: dict[str, Converter], *op_types: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            table[op_type] = fn
        return fn

    return register


def onnx_op(*op_types: str) -> Callable[[Converter], Converter]:
    return _register(_ONNX_CONVERTERS, *op_types)


def qonnx_op(*op_types: str) -> Callable[[Converter], Converter]:
    return _register(_QONNX_CONVERTERS, *op_types)


def torch_dtype(onnx_elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type."""
    return torch.from_numpy(np.zeros(0, dtype=onnx.helper.tensor_dtype_to_np_dtype(onnx_elem_type))).dtype


def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _const_int(t: Tensor, what: str, node: OnnxNode) -> int:
    if t.numel() != 1 or float(t) != int(float(t)):
        raise ValueError(f"{node.label}: {what} must be a single integer, got {t.tolist()}")
    return int(float(t))


# ---------------------------------------------------------------- quantizers (qonnx custom ops)

_ROUNDING: dict[str, Callable[[Tensor], Tensor]] = {
    "ROUND": torch.round,  # half to even, like np.round
    "HALF_EVEN": torch.round,
    "CEIL": torch.ceil,
    "FLOOR": torch.floor,
    "UP": lambda x: torch.sign(x) * torch.ceil(torch.abs(x)),
    "DOWN": torch.trunc,
    "HALF_UP": lambda x: torch.sign(x) * torch.floor(torch.abs(x) + 0.5),
    "HALF_DOWN": lambda x: torch.sign(x) * torch.ceil(torch.abs(x) - 0.5),
}


def round_ste(x: Tensor, rounding_mode: str) -> Tensor:
    """``rounding_mode`` rounding (qonnx's names) in the forward pass, identity gradient."""
    mode = rounding_mode.upper()
    if mode not in _ROUNDING:
        raise ValueError(f"unknown rounding mode '{rounding_mode}'; qonnx knows {', '.join(_ROUNDING)}")
    return x + (_ROUNDING[mode](x) - x).detach()


def _bipolar_ste(x: Tensor) -> Tensor:
    """+1 where ``x >= 0`` else -1 (qonnx's convention at 0), identity gradient."""
    return x + (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - x).detach()


def quant_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, bit_width: int, signed: bool, narrow: bool, rounding_mode: str
) -> Tensor:
    """The integer codes of qonnx's ``Quant``: ``round(clip(x / s + z, min_int, max_int))``.

    Same operation order as ``qonnx.custom_op.general.intquant.int_quant`` (clip, then round),
    including its 1-bit signed special case (bipolar codes). Float-valued, STE gradients.
    """
    y = x / scale + zero_point
    if bit_width == 1 and signed:
        return _bipolar_ste(y)
    codes = integer_range(bit_width, signed, narrow)
    return round_ste(torch.clamp(y, codes.lo, codes.hi), rounding_mode)


def int_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, bit_width: int, signed: bool, narrow: bool, rounding_mode: str
) -> Tensor:
    """qonnx ``Quant``: ``(round(clip(x / s + z, min_int, max_int)) - z) * s``."""
    return (quant_codes(x, scale, zero_point, bit_width, signed, narrow, rounding_mode) - zero_point) * scale


def quant_attributes(node: OnnxNode) -> tuple[bool, bool, str]:
    """``(signed, narrow, rounding_mode)`` of a ``Quant`` node with qonnx's defaults."""
    return bool(node.attr("signed", 1)), bool(node.attr("narrow", 0)), str(node.attr("rounding_mode", "ROUND"))


@qonnx_op("Quant", "IntQuant")
def _quant(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, scale, zero_point, bit_width = inputs
    signed, narrow, rounding_mode = quant_attributes(node)
    y = int_quant(x, scale, zero_point, _const_int(bit_width, "bit width", node), signed, narrow, rounding_mode)
    # qonnx's executor stores every Quant output as float32, also one computed in float64 from float64 scales (as
    # qonnx's QKeras converter writes them): the MACs behind it multiply float32 values
    return y if y.dtype == torch.float32 else y.to(torch.float32)


@qonnx_op("BipolarQuant")
def _bipolar_quant(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, scale = inputs
    return _bipolar_ste(x) * scale


@qonnx_op("Trunc")
def _trunc(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    # qonnx's Trunc_v1 has 5 inputs, Trunc_v2 adds the output scale (6 inputs).
    rounding_mode = str(node.attr("rounding_mode", "FLOOR"))
    if len(inputs) == 5:
        x, scale, zero_point, in_bits, out_bits = inputs
        y = round_ste(x / scale + zero_point, "ROUND") / 2.0 ** (in_bits - out_bits)
        return (round_ste(y, rounding_mode) - zero_point) * scale
    x, scale, zero_point, _in_bits, out_scale, out_bits = inputs
    y = round_ste(x / scale + zero_point, "ROUND")
    trunc_scale = 2.0 ** torch.round(torch.log2(out_scale / scale)).detach()
    codes = integer_range(_const_int(out_bits, "output bit width", node), bool(node.attr("signed", 1)),
                          bool(node.attr("narrow", 0)))
    y = round_ste(torch.clamp(y / trunc_scale, codes.lo, codes.hi), rounding_mode)
    return (y - zero_point / trunc_scale) * out_scale


@qonnx_op("Im2Col")
def _im2col(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    """qonnx's Im2Col (LowerConvsToMatMul): NHWC patches, each ordered (kh, kw, C), padded with ``pad_value``.

    qonnx's own execution is exact for batch 1 only (it reorders across samples); this is its batch-1 result for
    every sample of a batch.
    """
    x = inputs[0]
    k_h, k_w = (int(k) for k in node.attr("kernel_size"))
    stride = tuple(int(s) for s in node.attr("stride"))
    dilation = tuple(int(d) for d in node.attr("dilations", [1, 1]))
    top, left, bottom, right = (int(p) for p in node.attr("pad_amount", [0, 0, 0, 0]))
    n, h, w, c = x.shape
    padded = F.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom), value=float(node.attr("pad_value", 0)))
    columns = F.unfold(padded, (k_h, k_w), dilation=dilation, stride=stride)  # (N, C * kh * kw, L), C outermost
    out_h = (h + top + bottom - dilation[0] * (k_h - 1) - 1) // stride[0] + 1
    out_w = (w + left + right - dilation[1] * (k_w - 1) - 1) // stride[1] + 1
    columns = columns.reshape(n, c, k_h * k_w, out_h * out_w).permute(0, 3, 2, 1)
    return columns.reshape(n, out_h, out_w, k_h * k_w * c)


_DEFAULT_LAYOUT_BY_RANK = {2: "NC", 3: "NWC", 4: "NCHW"}


@qonnx_op("MultiThreshold")
def _multithreshold(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    """Count of thresholds ``<= x`` per channel, times ``out_scale`` plus ``out_bias``.

    Gradient: that of a linear ramp from the first to the last threshold of each channel
    (slope = one step per mean threshold spacing), zero outside it or with a single threshold.
    """
    x, thresholds = inputs
    layout = node.attr("data_layout", "") or _DEFAULT_LAYOUT_BY_RANK.get(x.dim(), "")
    channel_dim = layout.index("C") if "C" in layout else 1
    thresholds = thresholds.detach().to(x.dtype)
    x_last = x.movedim(channel_dim, -1)  # channels last so (C, B) thresholds broadcast per channel
    if thresholds.shape[0] not in (1, x_last.shape[-1]):
        raise ValueError(f"{node.label}: {thresholds.shape[0]} threshold rows for {x_last.shape[-1]} channels")
    count = (x_last.unsqueeze(-1) >= thresholds).sum(dim=-1).to(x.dtype)
    steps = thresholds.shape[1]
    if steps > 1:
        t_min, t_max = thresholds.min(dim=1).values, thresholds.max(dim=1).values
        spacing = (t_max - t_min) / (steps - 1)
        usable = torch.isfinite(spacing) & (spacing > 0)
        ramp = torch.clamp((x_last - t_min) / torch.where(usable, spacing, 1.0) + 0.5, 0.0, float(steps))
        ramp = torch.where(usable, ramp, torch.zeros_like(ramp))
        count = ramp + (count - ramp).detach()
    out = count.movedim(-1, channel_dim)
    return float(node.attr("out_scale", 1.0)) * out + float(node.attr("out_bias", 0.0))


# ---------------------------------------------------------------- padding helpers


def _spatial_pads(
    node: OnnxNode, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Explicit ``[b1, ..., bn, e1, ..., en]`` pads from ``pads`` / ``auto_pad``."""
    n = len(spatial)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(node.attr("pads", [0] * (2 * n)))
    try:
        begins, ends = auto_pads(auto_pad, list(spatial), list(kernel), list(strides), list(dilations))
    except ValueError as err:
        raise ValueError(f"{node.label}: {err}") from None
    return begins + ends


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1, ..., bn, e1, ..., en]`` (outermost first) to F.pad's innermost-first pairs."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]


def _pool_geometry(node: OnnxNode, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    return kernel, strides, dilations, _spatial_pads(node, x.shape[2:], kernel, strides, dilations)


def _drop_windows_in_end_padding(
    y: Tensor, spatial: Sequence[int], pads: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int],
) -> Tensor:
    """With ceil_mode, onnxruntime drops a last window that would start in the end padding.

    Torch only sees the already padded input, so it keeps such windows; crop them here.
    """
    n = len(spatial)
    for axis in range(n):
        size, begin = spatial[axis], pads[axis]
        span = (kernel[axis] - 1) * dilations[axis] + 1
        out = math.ceil((size + begin + pads[n + axis] - span) / strides[axis]) + 1
        if (out - 1) * strides[axis] >= size + begin:
            out -= 1
        y = y.narrow(2 + axis, 0, min(out, y.shape[2 + axis]))
    return y


# ---------------------------------------------------------------- MAC ops

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@onnx_op("Conv")
def _conv(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, w, b = (inputs + [None])[:3]
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    if any(pads):
        x = F.pad(x, _torch_pad(pads))
    return _CONV[n](x, w, b, stride=strides, dilation=dilations, groups=int(node.attr("group", 1)))


@onnx_op("ConvTranspose")
def _conv_transpose(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, w, b = (inputs + [None])[:3]
    kernel = list(w.shape[2:])
    n = len(kernel)
    if node.attr("output_shape") is not None or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID", ""):
        raise NotImplementedError(f"{node.label}: output_shape / SAME auto_pad are not supported; give explicit pads")
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    pads = list(node.attr("pads", [0] * (2 * n))) if node.attr("auto_pad", "NOTSET") != "VALID" else [0] * (2 * n)
    output_padding = list(node.attr("output_padding", [0] * n))
    y = _CONV_TRANSPOSE[n](x, w, None, stride=strides, groups=int(node.attr("group", 1)), dilation=dilations)
    # Torch pads symmetrically only: take the unpadded result, then crop / extend each spatial axis.
    for axis in range(n):
        begin, end, extra = pads[axis], pads[n + axis], output_padding[axis]
        if extra > end:
            widths = [0, 0] * (n - 1 - axis) + [0, extra - end]
            y = F.pad(y, widths)
        full = y.shape[2 + axis]
        length = full - begin - max(end - extra, 0)
        y = y.narrow(2 + axis, begin, length)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


@onnx_op("Gemm")
def _gemm(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    a, b, c = (inputs + [None])[:3]
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    y = float(node.attr("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(node.attr("beta", 1.0)) * c
    return y


@onnx_op("MatMul")
def _matmul(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return torch.matmul(inputs[0], inputs[1])


# ---------------------------------------------------------------- elementwise


@onnx_op("Add")
def _add(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return inputs[0] + inputs[1]


@onnx_op("Sub")
def _sub(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return inputs[0] - inputs[1]


@onnx_op("Mul")
def _mul(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return inputs[0] * inputs[1]


@onnx_op("Div")
def _div(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    a, b = inputs
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


@onnx_op("Where")
def _where(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    # Brevitas' QuantScaledDotProductAttention export masks its scores with one
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


@onnx_op("Pow")
def _pow(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    # ONNX: the result has the base's type (the QONNX model zoo's TFC normalises its input with one)
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


@onnx_op("Relu")
def _relu(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return torch.relu(inputs[0])


@onnx_op("LeakyRelu")
def _leaky_relu(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return F.leaky_relu(inputs[0], float(node.attr("alpha", 0.01)))


@onnx_op("Sigmoid")
def _sigmoid(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return torch.sigmoid(inputs[0])


@onnx_op("Tanh")
def _tanh(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return torch.tanh(inputs[0])


@onnx_op("Clip")
def _clip(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, low, high = (inputs + [None, None])[:3]
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


@onnx_op("Identity")
def _identity(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return inputs[0]


def _per_axis(t: Tensor, x: Tensor, axis: int) -> Tensor:
    """Broadcast a per-axis QDQ parameter (scalar or 1-D) along ``axis`` of ``x``."""
    if t.ndim == 0 or x.ndim == 0:
        return t
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return t.reshape(shape)


@onnx_op("QuantizeLinear")
def _quantize_linear(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    """``saturate(round_half_even(x / s) + z)`` over the zero point's integer type; float codes, STE rounding."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.uint8)
    info = torch.iinfo(zero_point.dtype)
    axis = int(node.attr("axis", 1))
    y = x / _per_axis(scale, x, axis) + _per_axis(zero_point.to(x.dtype), x, axis)
    return torch.clamp(round_ste(y, "ROUND"), info.min, info.max)


@onnx_op("DequantizeLinear")
def _dequantize_linear(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    """``(x - z) * s``, per tensor or per axis."""
    x, scale = inputs[0], inputs[1]
    x = x.to(scale.dtype)
    axis = int(node.attr("axis", 1))
    zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if zero_point is not None:
        x = x - _per_axis(zero_point.to(scale.dtype), x, axis)
    return x * _per_axis(scale, x, axis)


@onnx_op("Cast")
def _cast(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return inputs[0].to(torch_dtype(int(node.attr("to"))))


@onnx_op("Constant")
def _constant(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    for attr_name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if attr_name in node.attrs:
            value = np.asarray(node.attrs[attr_name])
            if value.dtype == np.float64:
                value = value.astype(np.float32)  # value_float(s) are float32 in ONNX
            return torch.from_numpy(np.array(value))
    raise NotImplementedError(f"{node.label}: only numeric Constant values are supported")


@onnx_op("BatchNormalization")
def _batch_norm(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    if node.attr("training_mode", 0):
        raise NotImplementedError(f"{node.label}: training_mode=1 BatchNormalization is not supported")
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(node.attr("epsilon", 1e-5)))


@onnx_op("Softmax")
def _softmax(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    if node.opset >= 13:
        return torch.softmax(x, dim=int(node.attr("axis", -1)))
    axis = int(node.attr("axis", 1)) % x.dim()  # before opset 13: softmax of the 2-D coercion
    return torch.softmax(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


# ---------------------------------------------------------------- pooling

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@onnx_op("MaxPool")
def _max_pool(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise NotImplementedError(f"{node.label}: the Indices output of MaxPool is not supported")
    kernel, strides, dilations, pads = _pool_geometry(node, x)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    padded = F.pad(x, _torch_pad(pads), value=-math.inf) if any(pads) else x
    y = _MAX_POOL[len(kernel)](padded, kernel, strides, padding=0, dilation=dilations, ceil_mode=ceil_mode)
    return _drop_windows_in_end_padding(y, x.shape[2:], pads, kernel, strides, dilations) if ceil_mode else y


@onnx_op("AveragePool")
def _average_pool(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise NotImplementedError(f"{node.label}: dilated AveragePool is not supported")
    pool = _AVG_POOL[len(kernel)]
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if not any(pads):
        return pool(x, kernel, strides, padding=0, ceil_mode=ceil_mode)
    padded = F.pad(x, _torch_pad(pads))
    y = pool(padded, kernel, strides, padding=0, ceil_mode=ceil_mode)
    if not node.attr("count_include_pad", 0):
        # Exclude padding from the divisor: divide by the share of real cells in each window.
        real = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
        y = y / pool(real, kernel, strides, padding=0, ceil_mode=ceil_mode)
    return _drop_windows_in_end_padding(y, x.shape[2:], pads, kernel, strides, dilations) if ceil_mode else y


@onnx_op("GlobalAveragePool")
def _global_average_pool(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@onnx_op("GlobalMaxPool")
def _global_max_pool(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


_REDUCERS: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "ReduceMean": lambda x, dims, keep: x.mean(dim=dims, keepdim=keep),
    "ReduceSum": lambda x, dims, keep: x.sum(dim=dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: x.amax(dim=dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: x.amin(dim=dims, keepdim=keep),
}


@onnx_op(*_REDUCERS)
def _reduce(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return _REDUCERS[node.op_type](x, tuple(a % x.dim() for a in axes), bool(node.attr("keepdims", 1)))


# ---------------------------------------------------------------- shape / layout


@onnx_op("Flatten")
def _flatten(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    axis = int(node.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@onnx_op("Reshape")
def _reshape(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x, shape = inputs
    target = _ints(shape)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@onnx_op("Transpose")
def _transpose(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    return x.permute(list(node.attr("perm", reversed(range(x.dim())))))


@onnx_op("Concat")
def _concat(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=int(node.attr("axis")))


def _axes(node: OnnxNode, inputs: list[Tensor | None], position: int) -> list[int] | None:
    """Axes from the attribute (old opsets) or from input ``position`` (opset 13+)."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(inputs) > position and inputs[position] is not None:
        return _ints(inputs[position])
    return None


@onnx_op("Squeeze")
def _squeeze(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


@onnx_op("Unsqueeze")
def _unsqueeze(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    axes = _axes(node, inputs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@onnx_op("Shape")
def _shape(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    dims = list(inputs[0].shape)[node.attr("start", 0) : node.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=inputs[0].device)


@onnx_op("Gather")
def _gather(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    data, indices = inputs
    axis = int(node.attr("axis", 0)) % data.dim()
    flat = torch.remainder(indices.reshape(-1).long(), data.shape[axis])  # ONNX allows negative indices
    picked = torch.index_select(data, axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))  # a scalar index: 0-d


@onnx_op("DepthToSpace")
def _depth_to_space(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    block = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    depth = c // (block * block)
    if node.attr("mode", "DCR") == "CRD":
        y = x.reshape(n, depth, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, block, block, depth, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, depth, h * block, w * block)


@onnx_op("SpaceToDepth")
def _space_to_depth(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    block = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@onnx_op("Pad")
def _pad(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"{node.label}: Pad mode '{mode}' is not supported")
    if node.opset < 11:
        pads, value = list(node.attr("pads")), float(node.attr("value", 0.0))
    else:
        pads = _ints(inputs[1])
        value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        if axes is not None:  # opset 18: pads only for the listed axes
            full = [0] * (2 * x.dim())
            for i, axis in enumerate(a % x.dim() for a in axes):
                full[axis], full[x.dim() + axis] = pads[i], pads[len(axes) + i]
            pads = full
    widths = _torch_pad(pads)
    while widths and not any(widths[-2:]):  # torch's non-constant modes pad only trailing axes
        widths = widths[:-2]
    if not widths:
        return x
    if mode == "constant":
        return F.pad(x, widths, value=value)
    return F.pad(x, widths, mode=_PAD_MODES[mode])


def _nearest_indices(in_size: int, out_size: int, scale: float, transform: str, nearest_mode: str) -> np.ndarray:
    """Source index of every output position along one axis (ONNX Resize, nearest), in float32 like ORT."""
    o = np.arange(out_size, dtype=np.float32)
    s = np.float32(scale)
    if transform == "half_pixel":
        x = (o + np.float32(0.5)) / s - np.float32(0.5)
    elif transform == "pytorch_half_pixel":
        x = (o + np.float32(0.5)) / s - np.float32(0.5) if out_size > 1 else np.zeros_like(o)
    elif transform == "align_corners":
        x = o * np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.zeros_like(o)
    elif transform == "asymmetric":
        x = o / s
    elif transform == "tf_half_pixel_for_nn":
        x = (o + np.float32(0.5)) / s
    else:
        raise NotImplementedError(f"coordinate_transformation_mode '{transform}' is not supported")
    rounders = {
        "round_prefer_floor": lambda v: np.ceil(v - np.float32(0.5)),
        "round_prefer_ceil": lambda v: np.floor(v + np.float32(0.5)),
        "floor": np.floor,
        "ceil": np.ceil,
    }
    if nearest_mode not in rounders:
        raise NotImplementedError(f"nearest_mode '{nearest_mode}' is not supported")
    return np.clip(rounders[nearest_mode](x), 0, in_size - 1).astype(np.int64)


@onnx_op("Resize", "Upsample")
def _resize(node: OnnxNode, inputs: list[Tensor | None]) -> Tensor:
    x = inputs[0]
    if node.attr("mode", "nearest") != "nearest":
        raise NotImplementedError(f"{node.label}: only mode='nearest' is supported, got '{node.attr('mode')}'")
    if node.op_type == "Upsample" or node.opset < 11:  # Upsample and Resize-10: scales, asymmetric + floor
        scales_t = inputs[1] if len(inputs) > 1 else None
        scales = [float(s) for s in node.attr("scales", [])] if scales_t is None else scales_t.tolist()
        sizes, transform, nearest_mode = None, "asymmetric", "floor"
    else:
        scales_t, sizes_t = (inputs + [None, None, None])[2:4]
        scales = scales_t.tolist() if scales_t is not None and scales_t.numel() else None
        sizes = _ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
        transform = node.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
        if sizes is not None and node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise NotImplementedError(f"{node.label}: keep_aspect_ratio_policy other than 'stretch' is not supported")
        axes = node.attr("axes")
        if axes is not None:  # opset 18: scales / sizes only for the listed axes
            full_scales, full_sizes = [1.0] * x.dim(), list(x.shape)
            for i, axis in enumerate(a % x.dim() for a in axes):
                if scales is not None:
                    full_scales[axis] = scales[i]
                if sizes is not None:
                    full_sizes[axis] = sizes[i]
            scales, sizes = (full_scales if scales is not None else None), (full_sizes if sizes is not None else None)
    if sizes is None:
        sizes = [int(np.floor(np.float32(d) * np.float32(s))) for d, s in zip(x.shape, scales)]
        axis_scales = scales
    else:
        axis_scales = [o / i for o, i in zip(sizes, x.shape)]
    for axis, (in_size, out_size, scale) in enumerate(zip(x.shape, sizes, axis_scales)):
        if out_size == in_size and scale == 1.0:
            continue
        index = _nearest_indices(in_size, out_size, scale, transform, nearest_mode)
        x = torch.index_select(x, axis, torch.from_numpy(index).to(x.device))
    return x
