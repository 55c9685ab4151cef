"""How much a projection changed a layer's integer weights: relative l2 changes, distances to the unrounded weights,
sparsity and rows touched, summed a block of rows at a time (no whole-layer float64 copies)."""

from __future__ import annotations

import numpy as np

from a2q_passes import kernels
from a2q_passes.row_blocks import in_order, rows_per_block


def projection_stats(before: np.ndarray, after: np.ndarray, v: np.ndarray) -> dict[str, float | int]:
    """How much a projection changed a layer.

    ``rel_l2_change = ||after - before|| / ||before||`` on the integer weights (0 when nothing
    changed, inf if ``before`` is all zeros and ``after`` is not); ``rel_l2_to_float_*`` is the
    distance of each integer tensor to the unrounded ``v`` relative to ``||v||``; sparsity is
    the fraction of zeros; ``rows_touched`` counts rows that differ.
    """
    before, after, v = np.atleast_2d(before), np.atleast_2d(after), np.atleast_2d(v)
    if before.shape != after.shape or before.shape != v.shape:
        raise ValueError(f"shapes differ: before {before.shape}, after {after.shape}, v {v.shape}")

    def relative(num: float, den: float) -> float:
        return 0.0 if num == 0 else (num / den if den > 0 else float("inf"))

    exact = _compiled_change_sums(before, after, v) if kernels.wanted(before.size) else None
    if exact is not None:  # v holds small integers: every sum is an exact integer, as _change_sums's float64 ones
        squares, (zeros_before, zeros_after, rows_touched) = exact[0], map(int, exact[1])
    else:
        squares, zeros_before, zeros_after, rows_touched = _change_sums(before, after, v)
    change, norm_before, to_float_before, to_float_after, norm_v = np.sqrt(squares)
    return {
        "rel_l2_change": relative(float(change), float(norm_before)),
        "rel_l2_to_float_before": relative(float(to_float_before), float(norm_v)),
        "rel_l2_to_float_after": relative(float(to_float_after), float(norm_v)),
        "sparsity_before": zeros_before / before.size if before.size else 0.0,
        "sparsity_after": zeros_after / after.size if after.size else 0.0,
        "rows_touched": rows_touched,
        "rows": int(before.shape[0]),
    }


def _compiled_change_sums(before: np.ndarray, after: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`kernels.change_sums` a block of rows at a time: only one block of ``v`` is copied to float64 (``v`` may
    hold a layer's stored integer codes). ``None`` where a block's is, or where a total reaches 2^53 (below it the
    float64 totals of these exact integer sums are exact too)."""
    squares, counts = np.zeros(5), np.zeros(3, dtype=np.int64)
    step = rows_per_block(before.shape[1])

    def block_sums(start: int) -> tuple[np.ndarray, np.ndarray] | None:
        return kernels.change_sums(before[start:start + step], after[start:start + step], v[start:start + step])

    # blocks on projection_threads threads, added in order (exact integers either way)
    for block in in_order(block_sums, list(range(0, before.shape[0], step))):
        if block is None:
            return None
        squares += block[0]
        counts += block[1]
        if squares.max() >= 2.0 ** 53:
            return None
    return squares, counts


def _change_sums(before: np.ndarray, after: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """:func:`projection_stats`'s five sums of squares (change, before, before - v, after - v, v), zeros before,
    zeros after and rows changed, summed a block of rows at a time (no whole-tensor float64 copies).

    The integer ones are sums of squares of integers, exact in float64 below 2^53 (an int8 layer of 10^9 weights
    stays below 2^46), so they equal a whole-tensor norm's; the distances to v may differ from one in the last bits.
    """
    squares = np.zeros(5)
    zeros_before = zeros_after = rows_touched = 0
    step = rows_per_block(before.shape[1])
    for start in range(0, before.shape[0], step):
        # integers below 2^53: exact; C order so that ravel is a view (a transposed layer's rows are strided)
        b = before[start:start + step].astype(np.float64, order="C").ravel()
        a = after[start:start + step].astype(np.float64, order="C").ravel()
        w = np.asarray(v[start:start + step], dtype=np.float64).ravel()
        zeros_before += b.size - int(np.count_nonzero(b))
        zeros_after += a.size - int(np.count_nonzero(a))
        change = a - b
        rows_touched += int(np.count_nonzero(np.any(change.reshape(-1, before.shape[1]) != 0, axis=1))) if b.size else 0
        squares[0] += float(np.dot(change, change))
        squares[1] += float(np.dot(b, b))
        squares[4] += float(np.dot(w, w))
        # the distances to v in place: b and a are not needed any more
        for i, d in ((2, np.subtract(b, w, out=b)), (3, np.subtract(a, w, out=a))):
            squares[i] += float(np.dot(d, d))
    return squares, zeros_before, zeros_after, rows_touched
