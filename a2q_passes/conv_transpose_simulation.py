"""P-bit accumulation of a ``ConvTranspose`` on integer codes, in the order of its accumulator rows.

An output pixel of a transposed convolution sums the taps of one stride phase (``tap * dilation`` congruent to the
pixel's unpadded position modulo the stride), each times the input pixel it lands from; taps that land from outside
the input add nothing. The accumulator rows of :func:`a2q_passes.layers._conv_transpose_layout` are those taps per
(output channel, phase), input channel first, then the kernel taps in ascending order: the terms below come in that
order, so saturation and K-tiles meet the registers the static proof bounds.
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import NodeProto

from a2q_passes.graph_values import node_attr, node_str_attr
from a2q_passes.simulate import Accumulation, accumulate


def unsimulated_attributes(node: NodeProto) -> str | None:
    """Why the geometry below does not cover this node, or None (``auto_pad`` SAME_* and ``output_shape`` place
    the output by conventions onnxruntime and the ONNX specification have disagreed on)."""
    if node_str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "a ConvTranspose with auto_pad SAME_*; give explicit pads"
    if node_attr(node, "output_shape", None):
        return "a ConvTranspose with an output_shape attribute; give explicit pads and output_padding"
    return None


def conv_transpose_accumulate(codes: np.ndarray, weights: np.ndarray, node: NodeProto, bits: int, signed: bool,
                              mode: str, tile: int | None, outer: tuple[int, bool] | None) -> Accumulation:
    """Accumulators of ``node`` on integer ``codes`` ``(B, C_in, *spatial)`` with integer ``weights`` ``(C_in,
    C_out / group, *kernel)``, shaped as its output ``(B, C_out, *spatial_out)``."""
    kernel = weights.shape[2:]
    n = len(kernel)
    groups = int(node_attr(node, "group", 1))
    strides = list(node_attr(node, "strides", [1] * n))
    dilations = list(node_attr(node, "dilations", [1] * n))
    pads = [0] * 2 * n if node_str_attr(node, "auto_pad", "NOTSET") == "VALID" else list(node_attr(node, "pads", [0] * 2 * n))
    extra = list(node_attr(node, "output_padding", [0] * n))
    spatial = codes.shape[2:]
    out_spatial = [s * (size - 1) + e + (k - 1) * d + 1 - begin - end for s, size, e, k, d, begin, end
                   in zip(strides, spatial, extra, kernel, dilations, pads[:n], pads[n:])]
    c_in_g, per_group_out = weights.shape[0] // groups, weights.shape[1]
    channels_out = per_group_out * groups
    codes = codes.astype(np.int64)
    shape = (codes.shape[0], channels_out, *out_spatial)
    values, exact = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    overflow = np.zeros(shape, dtype=bool)
    for phase in itertools.product(*(range(s) for s in strides)):
        taps = [[t for t in range(k) if (t * d) % s == p] for k, d, s, p in zip(kernel, dilations, strides, phase)]
        # the outputs of this phase: unpadded position (o + pad) congruent to the phase modulo the stride
        window = tuple(slice((p - begin) % s, size, s) for p, begin, s, size in zip(phase, pads[:n], strides, out_spatial))
        positions = [np.arange(w.start, w.stop, w.step) for w in window]
        if any(not t for t in taps) or any(p.size == 0 for p in positions):
            continue  # a phase no tap reaches sums nothing: its outputs stay 0

        def term_at(k: int, taps: list[list[int]] = taps, positions: list[np.ndarray] = positions) -> np.ndarray:
            ci, *at = np.unravel_index(k, (c_in_g, *(len(t) for t in taps)))
            x = codes[:, ci::c_in_g]  # (B, groups, *spatial): input channel ci of every group
            inside = np.ones([1, 1] + [p.size for p in positions], dtype=bool)
            for axis, (tap_list, a, pos, begin, s, d, size) in enumerate(
                    zip(taps, at, positions, pads[:n], strides, dilations, spatial)):
                source = (pos + begin - tap_list[a] * d) // s  # exact: the phase makes the difference a multiple
                valid = (source >= 0) & (source < size)
                x = np.take(x, np.clip(source, 0, size - 1), axis=2 + axis)
                inside = inside & valid.reshape([1, 1] + [-1 if i == axis else 1 for i in range(n)])
            x = np.repeat(np.where(inside, x, 0), per_group_out, axis=1)  # (B, C_out, *phase outputs)
            w = weights[(slice(ci, None, c_in_g), slice(None), *(t[a] for t, a in zip(taps, at)))].reshape(-1)
            return x * w.reshape([1, channels_out] + [1] * n)

        acc = accumulate(term_at, c_in_g * int(np.prod([len(t) for t in taps])), bits, signed, mode, tile,
                         outer=outer)
        where = (slice(None), slice(None), *window)
        values[where], exact[where], overflow[where] = acc.values, acc.exact, acc.register_overflow
    return Accumulation(values, exact, overflow)
