"""Which taps of a FINN MVAU hold input pixels, where the MVAU reads a sliding window over a pixel-padded image.

FINN lowers a ``ConvTranspose`` (:mod:`a2q_passes.finn_deconv`) to ``FMPadding_Pixel`` (``stride - 1`` zeros
between input pixels), ``FMPadding`` (zeros around the border), a sliding window (``ConvolutionInputGenerator``
or qonnx ``Im2Col``) and an MVAU. The MVAU's row holds the whole kernel, but at each output position only the taps
that land on input pixels hold a code; the others multiply the inserted zeros and add nothing. The accumulator
therefore ranges over the sums of those taps only, one set per stride phase: the range a2q sizes the
``ConvTranspose`` for. This module gives those sets from the nodes' attributes, as boolean masks over the MVAU's
``K`` inputs (FINN's ``(kh, kw, channel)`` order).
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import node_attr

_WINDOW_OPS = ("ConvolutionInputGenerator", "Im2Col")


def _base_op(node: NodeProto) -> str:
    """The op type without FINN's ``_hls`` / ``_rtl`` backend suffix."""
    for suffix in ("_hls", "_rtl"):
        if node.op_type.endswith(suffix):
            return node.op_type[: -len(suffix)]
    return node.op_type


def pixel_padding_masks(model: ModelWrapper, mac: NodeProto) -> np.ndarray | None:
    """``(patterns, K)`` booleans: for every distinct output position, the MVAU inputs that hold an input pixel;
    ``None`` where the MVAU does not read a window over an ``FMPadding_Pixel`` output.

    Only maximal patterns are kept: a border position's taps are a subset of an inner position's of the same
    phase, and with code 0 among the input codes a subset's sums lie within the full set's.
    """
    window = model.find_producer(mac.input[0])
    if window is None or _base_op(window) not in _WINDOW_OPS:
        return None
    source = model.find_producer(window.input[0])
    border = [0, 0, 0, 0]
    if source is not None and _base_op(source) == "FMPadding":
        border = list(node_attr(source, "Padding"))
        source = model.find_producer(source.input[0])
    if source is None or _base_op(source) != "FMPadding_Pixel":
        return None
    (height, width), (stride_h, stride_w) = node_attr(source, "ImgDim"), node_attr(source, "Stride")
    pixels = np.zeros(((height - 1) * stride_h + 1, (width - 1) * stride_w + 1), dtype=bool)
    pixels[::stride_h, ::stride_w] = True
    if _base_op(window) == "Im2Col":
        kernel, step, dilation = (list(node_attr(window, name, default)) for name, default in
                                  (("kernel_size", None), ("stride", [1, 1]), ("dilations", [1, 1])))
        border = [b + p for b, p in zip(border, node_attr(window, "pad_amount", [0, 0, 0, 0]))]
        channels = int(model.get_tensor_shape(window.input[0])[-1])
    else:
        kernel, step, dilation = (list(node_attr(window, name)) for name in ("ConvKernelDim", "Stride", "Dilation"))
        channels = int(node_attr(window, "IFMChannels"))
    pixels = np.pad(pixels, ((border[0], border[2]), (border[1], border[3])))
    outputs = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(pixels.shape, kernel, step, dilation)]
    taps_h = np.arange(kernel[0]) * dilation[0]
    taps_w = np.arange(kernel[1]) * dilation[1]
    patterns = {pixels[np.ix_(oy * step[0] + taps_h, ox * step[1] + taps_w)].tobytes()
                for oy, ox in itertools.product(range(outputs[0]), range(outputs[1]))}
    masks = np.asarray([np.frombuffer(p, dtype=bool) for p in sorted(patterns)])
    maximal = masks[[not any(np.all(other >= mask) and np.any(other > mask) for other in masks) for mask in masks]]
    return np.repeat(maximal, channels, axis=1)  # (kh, kw) taps -> (kh, kw, channel) inputs
