"""Exact accumulator ranges of integer weights over a box of input codes: rows, convolutions, tiles."""

from __future__ import annotations

import functools
import itertools

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.certificate.execution import CannotCertify, node_attr, node_label
from a2q_passes.certificate.shapes import inferred_shapes
from a2q_passes.model_io import CHANNELS_LAST_DOMAIN

_INT64_SAFE = 1 << 62


def _exact(w: np.ndarray, *codes: int) -> np.ndarray:
    """``w`` as int64, or as Python ints when a sum of ``w.size`` products with ``codes`` could overflow int64."""
    bound = int(np.max(np.abs(w), initial=0)) * max(*(abs(c) for c in codes), 1) * max(w.size, 1)
    return w.astype(object if bound >= _INT64_SAFE else np.int64)


def _term_extremes(w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest value of each product ``w_i * x_i`` over the codes ``[lo, hi]``."""
    return np.minimum(w * lo, w * hi), np.maximum(w * lo, w * hi)


def _spatial_pads(node: NodeProto, sizes: list[int] | None, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> tuple[list[int], list[int]] | None:
    """Begin/end padding per spatial dim (``None``: ``SAME`` padding of an unknown input size)."""
    n = len(kernel)
    auto_pad = node_attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(node_attr(node, "pads", [0] * 2 * n))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if sizes is None:
        return None
    total = [max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
             for size, k, s, d in zip(sizes, kernel, strides, dilations)]
    small = [t // 2 for t in total]
    begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
    return begin, [t - b for t, b in zip(total, begin)]


def _outer(per_dim: tuple[tuple[bool, ...], ...]) -> np.ndarray:
    """Flattened kernel mask from one boolean tuple per spatial dim (their outer AND)."""
    return functools.reduce(np.logical_and.outer, [np.asarray(d, dtype=bool) for d in per_dim]).reshape(-1)


def _input_sizes(model: ModelWrapper, tensor: str, channels_last: bool = False) -> list[int] | None:
    """The spatial sizes of a Conv input, ``(N, C, *sizes)`` or, ``channels_last``, ``(N, *sizes, C)``."""
    shape = model.get_tensor_shape(tensor)
    if shape is None:
        shape = inferred_shapes(model).get_tensor_shape(tensor)
    sizes = None if shape is None or len(shape) < 3 else (shape[1:-1] if channels_last else shape[2:])
    return None if sizes is None or not all(sizes) else [int(d) for d in sizes]


def _conv_masks(model: ModelWrapper, node: NodeProto, kernel: list[int]) -> np.ndarray:
    """Every distinct set of in-bounds taps over the output positions, as ``(patterns, prod(kernel))`` booleans."""
    n = len(kernel)
    strides = list(node_attr(node, "strides", [1] * n))
    dilations = list(node_attr(node, "dilations", [1] * n))
    # onnxruntime's com.microsoft QLinearConv (attribute) and qonnx's channels-last Conv (domain) read NHWC data
    channels_last = bool(node_attr(node, "channels_last", 0)) or node.domain == CHANNELS_LAST_DOMAIN
    sizes = _input_sizes(model, node.input[0], channels_last)
    pads = _spatial_pads(node, sizes, kernel, strides, dilations)
    if pads is None or sizes is None:
        raise CannotCertify(f"{node_label(node)} pads with a code outside the input codes, and its input size is unknown")
    per_dim = []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, *pads):
        outputs = (size + b + e - d * (k - 1) - 1) // s + 1
        per_dim.append(sorted({tuple(0 <= o * s - b + j * d < size for j in range(k)) for o in range(max(outputs, 0))}))
    if not all(per_dim):
        raise CannotCertify(f"{node_label(node)} has no output position for its input size {sizes}")
    return np.asarray([_outer(combo) for combo in itertools.product(*per_dim)], dtype=bool)


def conv_ranges(model: ModelWrapper, node: NodeProto, w: np.ndarray, lo: int, hi: int,
                pad: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    kernel = list(w.shape[2:])
    w = _exact(w, lo, hi, pad)
    t_min, t_max = _term_extremes(w, lo, hi)
    channels = w.shape[0]
    t_min = t_min.sum(axis=1).reshape(channels, -1)  # per channel and kernel position, over input channels
    t_max = t_max.sum(axis=1).reshape(channels, -1)
    has_pads = node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "", "VALID") or any(node_attr(node, "pads", []))
    if not has_pads or lo <= pad <= hi:  # a padding tap is then one more point of the input box
        return t_min.sum(axis=1), t_max.sum(axis=1), None
    masks = _conv_masks(model, node, kernel)
    padded = w.sum(axis=1).reshape(channels, -1) * pad
    inside, outside = masks.T.astype(w.dtype), (~masks).T.astype(w.dtype)
    acc_min = (t_min.dot(inside) + padded.dot(outside)).min(axis=1)
    acc_max = (t_max.dot(inside) + padded.dot(outside)).max(axis=1)
    return acc_min, acc_max, pad


def conv_transpose_ranges(node: NodeProto, w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output sums the taps of one stride phase; taps falling outside the input add nothing.

    A missing tap adds what a tap holding code 0 adds, so the input box widened to hold 0 covers
    every border output (exactly when such a border exists, safely when none does).
    """
    lo, hi = min(lo, 0), max(hi, 0)
    groups = int(node_attr(node, "group", 1))
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides = list(node_attr(node, "strides", [1] * n))
    dilations = list(node_attr(node, "dilations", [1] * n))
    t_min, t_max = _term_extremes(_exact(w, lo, hi), lo, hi)
    c_in, c_out_g = w.shape[0], w.shape[1]
    per_group = (groups, c_in // groups, c_out_g, -1)
    t_min = t_min.reshape(per_group).sum(axis=1).reshape(groups * c_out_g, -1)
    t_max = t_max.reshape(per_group).sum(axis=1).reshape(groups * c_out_g, -1)
    per_dim = [[tuple((j * d) % s == p for j in range(k)) for p in range(s)]
               for k, s, d in zip(kernel, strides, dilations)]
    masks = np.asarray([_outer(combo) for combo in itertools.product(*per_dim)], dtype=bool)
    masks = masks[masks.any(axis=1)].T.astype(t_min.dtype)
    return t_min.dot(masks).min(axis=1), t_max.dot(masks).max(axis=1)


def row_ranges(rows: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    acc_min, acc_max = bounds.exact_accumulator_range(rows, bounds.IntRange(lo, hi))
    return np.asarray(acc_min), np.asarray(acc_max)


def masked_row_ranges(rows: np.ndarray, lo: int, hi: int, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(C, K)`` of which each accumulation sums only the inputs of one mask ``(patterns, K)``; the others
    hold code 0 (pixel padding's inserted zeros) and add nothing."""
    if not lo <= 0 <= hi:
        raise CannotCertify(f"inputs that hold the inserted zeros need code 0 among the codes [{lo}, {hi}]")
    t_min, t_max = _term_extremes(_exact(rows, lo, hi), lo, hi)
    chosen = masks.T.astype(t_min.dtype)
    return t_min.dot(chosen).min(axis=1), t_max.dot(chosen).max(axis=1)


def accumulations(rows: np.ndarray, blocks: np.ndarray | None, node: NodeProto) -> list[np.ndarray]:
    """The integer accumulations of MAC rows ``(C, K)``: the rows, or with block-wise weight scales each block's
    terms of every row (in K order), since blocks with different scales are added only after scaling."""
    if blocks is None or np.all(blocks == blocks[:, :1]):
        return [rows]
    # number each row's blocks 0, 1, ... by their scale entry (rows use different entries)
    order = np.argsort(blocks, axis=1, kind="stable")
    ordered = np.take_along_axis(blocks, order, axis=1)
    rank = np.concatenate([np.zeros((rows.shape[0], 1), np.int64),
                           np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1)], axis=1)
    local = np.empty_like(rank)
    np.put_along_axis(local, order, rank, axis=1)
    parts = []
    for number in np.unique(local):
        inside = local == number
        count = inside.sum(axis=1)
        if not np.all(count == count[0]):
            raise CannotCertify(f"{node_label(node)}: weight block {number} holds a different number of terms per output")
        parts.append(rows[inside].reshape(rows.shape[0], int(count[0])))
    return parts


def stage_ranges(parts: list[np.ndarray], lo: int, hi: int, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Extremes of every partial sum within a K-tile of ``tile`` terms and of every running sum of tile results.

    Each term ``w x`` ranges over ``[min(w lo, w hi), max(w lo, w hi)]`` independently of the others, so a
    sum of consecutive terms reaches the sum of their extremes.
    """
    x = bounds.IntRange(lo, hi)
    tile_lo, tile_hi, run_lo, run_hi = [], [], [], []
    for part in parts:
        t_lo, t_hi = bounds.partial_sum_range(part, x, tile)
        tile_lo.append(int(np.min(t_lo, initial=0)))
        tile_hi.append(int(np.max(t_hi, initial=0)))
        totals = [row_ranges(part[:, s:s + tile], lo, hi) for s in range(0, part.shape[1], tile)]
        running_lo = np.cumsum(np.stack([t[0] for t in totals]).astype(object), axis=0)
        running_hi = np.cumsum(np.stack([t[1] for t in totals]).astype(object), axis=0)
        run_lo.append(int(running_lo.min()))
        run_hi.append(int(running_hi.max()))
    return (min(tile_lo), max(tile_hi)), (min(run_lo), max(run_hi))
