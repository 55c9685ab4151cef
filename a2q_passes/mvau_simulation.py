"""Data simulation of FINN's ``MVAU`` and ``VVAU`` nodes (what ``a2q lower`` and FINN's ``convert_to_hw`` write), and
of qonnx's ``XnorPopcountMatMul`` (FINN's streamlining of a binary MatMul: an xnor-popcount MVAU whose output is its
count), as FINN's Python execution of the nodes defines them: ``acc = x @ W`` on the integer input codes (a
``VVAU``: each channel's window taps times its own kernel; an xnor-popcount ``MVAU``: the count of input bits equal
to their weight bits), then, where the node thresholds (``noActivation`` 0),
``multithreshold(acc, T) * out_scale + out_bias``.

An output whose P-bit accumulator differs from the exact one is recomputed from the P-bit value through the node's
own thresholds (qonnx's ``multithreshold``, which FINN's execution calls).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import get_constant, node_attr, node_str_attr
from a2q_passes.integer_op_simulation import NotRequantizable
from a2q_passes.layers import XNOR_POPCOUNT, MacLayer, RowLayout

SIMULATED_MVAU = "MVAU"  # FINN's generic HW layers; the _hls/_rtl variants execute only in C++ or RTL simulation
SIMULATED_VVAU = "VVAU"
PIXEL_PADDED = "gather"  # the row layout of an MVAU over pixel-padded input (one row per channel and tap pattern)


def unsimulated_mvau(layer: MacLayer, node: NodeProto, tiled: bool = False) -> str | None:
    """Why the FINN ``MVAU``/``VVAU`` ``node`` is not simulated on data (``tiled``: in a multi-stage datapath), or
    None."""
    if node.op_type not in (SIMULATED_MVAU, SIMULATED_VVAU, XNOR_POPCOUNT):
        return (f"data simulation of FINN {node.op_type} nodes is not implemented (the static proof and adversarial "
                "simulation still apply)")
    if layer.binary_xnor and node.op_type not in (SIMULATED_MVAU, XNOR_POPCOUNT):
        return f"a {node.op_type} in binary xnor-popcount mode"
    if not layer.binary_xnor and (node_str_attr(node, "inputDataType", "") == "BIPOLAR"
                                  and node_str_attr(node, "weightDataType", "") == "BIPOLAR"):
        # FINN executes it as xnor-popcount of (x + 1) / 2, which the layer's +-1 products do not describe
        return f"a {node.op_type} of BIPOLAR inputs and weights without binaryXnorMode"
    if layer.layout.kind == PIXEL_PADDED and tiled:
        return ("a multi-stage datapath of an MVAU reading pixel-padded input (its accumulator rows hold a stride "
                "phase's taps, not the MVAU's K inputs its tiles would split)")
    return None


def mvau_rows(model: ModelWrapper, layer: MacLayer, rows: np.ndarray) -> np.ndarray:
    """The integer rows a FINN node multiplies its input by: the reader's ``rows``, except over pixel-padded input,
    where those are an MVAU's stride phases' taps (:mod:`a2q_passes.pixel_padding`) and the MVAU multiplies its
    whole ``(MH, MW)`` rows; the inserted zeros add nothing, so each partial sum on data is its phase's, in order."""
    if layer.layout.kind != PIXEL_PADDED:
        return rows
    return dataclasses.replace(layer, layout=RowLayout("transpose", layer.layout.shape)).integer_rows(model)


def vvau_interleave(model: ModelWrapper, node: NodeProto) -> int:
    """How many channels a ``VVAU``'s input interleaves per window tap (FINN's execution: all of them behind an
    ``Im2Col`` or generic ``ConvolutionInputGenerator``, else its ``PE``)."""
    producer = model.find_producer(node.input[0])
    if producer is not None and producer.op_type in ("Im2Col", "ConvolutionInputGenerator"):
        return int(node_attr(node, "Channels", 1))
    return int(node_attr(node, "PE", 1))


def vvau_taps(codes: np.ndarray, taps: int, channels: int, interleave: int) -> np.ndarray:
    """A ``VVAU``'s input ``(B, H, W, C * taps)`` as ``(B, H, W, taps, C)``, untangled as FINN's execution does
    (``interleave`` channels per tap): tap ``t`` of channel ``c`` is then element ``t * C + c``."""
    b, h, w = codes.shape[:3]
    untangled = codes.reshape(b, h, w, channels // interleave, taps, interleave).transpose(0, 1, 2, 4, 3, 5)
    return untangled.reshape(b, h, w, taps, channels)


class MvauActivation:
    """The thresholds an ``MVAU``/``VVAU`` applies to its accumulators (FINN's ``execute_node``)."""

    def __init__(self, model: ModelWrapper, node: NodeProto) -> None:
        thresholds = get_constant(model, node.input[2]) if len(node.input) > 2 else None
        if thresholds is None:
            raise NotRequantizable(f"its thresholds '{node.input[2] if len(node.input) > 2 else ''}' are not a "
                                   "constant, so an overflowed accumulator could not be thresholded")
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        bipolar = node_str_attr(node, "outputDataType", "") == "BIPOLAR"
        self.out_scale, self.out_bias = (2.0, -1.0) if bipolar else (1.0, float(node_attr(node, "ActVal", 0)))

    def output(self, acc: np.ndarray, channel_axis: int, context: dict[str, np.ndarray]) -> np.ndarray:
        """The node's output for accumulators ``acc`` (channels last, as FINN's NHWC data); its thresholds are
        constants, so the run's ``context`` (the requantizing ops' interface) is not read."""
        from qonnx.custom_op.general.multithreshold import multithreshold

        values = acc.astype(np.float32)
        if values.ndim == 4:  # FINN thresholds NCHW
            return multithreshold(values.transpose(0, 3, 1, 2), self.thresholds, self.out_scale,
                                  self.out_bias).transpose(0, 2, 3, 1)
        return multithreshold(values, self.thresholds, self.out_scale, self.out_bias)
