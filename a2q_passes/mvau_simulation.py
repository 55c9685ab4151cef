"""Data simulation of FINN's ``MVAU`` nodes (what ``a2q lower`` and FINN's ``InferQuantizedMatrixVectorActivation``
write), as FINN's Python execution of the node defines it: ``acc = x @ W`` on the integer input codes, then, where
the node thresholds (``noActivation`` 0), ``multithreshold(acc, T) * out_scale + out_bias``.

The accumulator is a plain dot product per output channel (the rows of a ``transpose`` layout); an output whose
P-bit accumulator differs from the exact one is recomputed from the P-bit value through the node's own
thresholds (qonnx's ``multithreshold``, which FINN's execution calls).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import get_constant, node_attr, node_str_attr
from a2q_passes.integer_op_simulation import NotRequantizable
from a2q_passes.layers import MacLayer

SIMULATED_MVAU = "MVAU"  # FINN's generic HW layer; MVAU_hls/MVAU_rtl execute only in C++ or RTL simulation


def unsimulated_mvau(layer: MacLayer, node: NodeProto) -> str | None:
    """Why the FINN ``MVAU``/``VVAU`` ``node`` is not simulated on data, or None."""
    if node.op_type != SIMULATED_MVAU:
        return (f"data simulation of FINN {node.op_type} nodes is not implemented (the static proof and adversarial "
                "simulation still apply)")
    if layer.binary_xnor or (node_str_attr(node, "inputDataType", "") == "BIPOLAR"
                             and node_str_attr(node, "weightDataType", "") == "BIPOLAR"):
        return "an MVAU in binary xnor-popcount mode (its codes are not the accumulated values)"
    if layer.layout.kind != "transpose":
        return "an MVAU reading pixel-padded input (its accumulator rows are stride phases of a window)"
    return None


class MvauActivation:
    """The thresholds an ``MVAU`` applies to its accumulators (FINN's ``execute_node``)."""

    def __init__(self, model: ModelWrapper, node: NodeProto) -> None:
        thresholds = get_constant(model, node.input[2]) if len(node.input) > 2 else None
        if thresholds is None:
            raise NotRequantizable(f"its thresholds '{node.input[2] if len(node.input) > 2 else ''}' are not a "
                                   "constant, so an overflowed accumulator could not be thresholded")
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        bipolar = node_str_attr(node, "outputDataType", "") == "BIPOLAR"
        self.out_scale, self.out_bias = (2.0, -1.0) if bipolar else (1.0, float(node_attr(node, "ActVal", 0)))

    def output(self, acc: np.ndarray, channel_axis: int) -> np.ndarray:
        """The node's output for accumulators ``acc`` (channels last, as FINN's NHWC data)."""
        from qonnx.custom_op.general.multithreshold import multithreshold

        values = acc.astype(np.float32)
        if values.ndim == 4:  # FINN thresholds NCHW
            return multithreshold(values.transpose(0, 3, 1, 2), self.thresholds, self.out_scale,
                                  self.out_bias).transpose(0, 2, 3, 1)
        return multithreshold(values, self.thresholds, self.out_scale, self.out_bias)
