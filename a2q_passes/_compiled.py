"""numba kernels behind :mod:`a2q_passes.kernels` (import that module, not this one: it sets numba's cache folder first).

Each kernel reproduces one numpy step of :mod:`a2q_passes.projection` bit for bit: the same float operations on
each element (``+``, ``*``, ``trunc``, ``rint`` are IEEE-exact alike in numpy and here), float sums in numpy's order
(sequential prefix sums as ``cumsum``; row sums in numpy's pairwise order, written out below), integers counted
exactly, and sorts stable, so ties go in index order as numpy's ``kind="stable"`` puts them. Editing this file
makes numba recompile every kernel in it once (its cache is keyed by the file's time stamp).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def round_up_candidates(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(trunc, order, gain, n_pos, n_neg, n_neg_beneficial)`` of ``projection._RoundUpCandidates.of``.

    ``order`` holds only the first ``width`` sorted positions of each row (``width``: the most candidates in a
    row), which is all that is ever read: the positive candidates by descending sort key, then the negative
    ones, then the other weights in index order, each group in stable order of the numpy key.
    """
    rows, K = w.shape
    trunc = np.empty((rows, K), dtype=np.int64)
    benefit = np.empty((rows, K))
    n_pos = np.zeros(rows, dtype=np.int64)
    n_candidates = np.zeros(rows, dtype=np.int64)
    n_neg_beneficial = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        positives = candidates = negatives_beneficial = 0  # scalars: array slots would stay in memory
        for i in range(K):
            t = np.trunc(w[r, i])
            trunc[r, i] = np.int64(t)
            b = np.abs(w[r, i] - t) * 2.0 - 1.0  # exactly -1 where w is an integer: no round-up to choose
            benefit[r, i] = b
            candidates += b > -1.0
            positives += b > -1.0 and w[r, i] > 0
            negatives_beneficial += b > 0 and not w[r, i] > 0
        n_pos[r], n_candidates[r], n_neg_beneficial[r] = positives, candidates, negatives_beneficial
    width = 0
    for r in range(rows):
        width = max(width, n_candidates[r])
    order = np.empty((rows, width), dtype=np.int64)
    gain = np.zeros((rows, width + 1))
    positions = np.empty(K, dtype=np.int64)  # positive candidates from the front, negative ones from the back
    keys = np.empty(K)
    ranks, scratch = np.empty(K, dtype=np.int64), np.empty(K, dtype=np.int64)
    for r in range(rows):
        front, back = 0, K
        for i in range(K):
            b = benefit[r, i]
            if b > -1.0:
                if w[r, i] > 0:  # keys as numpy's: positives in [-5, -3), negatives in (-1, 1), the rest 8
                    positions[front], keys[front] = i, -(b + 4.0)
                    front += 1
                else:
                    back -= 1
                    positions[back], keys[back] = i, -b
        for j in range((K - back) // 2):  # the negative candidates back in index order (a loop: slices compile slowly)
            early, late = back + j, K - 1 - j
            positions[early], positions[late] = positions[late], positions[early]
            keys[early], keys[late] = keys[late], keys[early]
        filled = 0
        for first, last in ((0, front), (back, K)):
            ranked = _stable_argsort(keys[first:last], ranks, scratch)
            for j in range(last - first):
                order[r, filled + j] = positions[first + ranked[j]]
            filled += last - first
        i = 0
        while filled < width:  # the other weights (key 8, all tied) follow in index order
            if not benefit[r, i] > -1.0:
                order[r, filled] = i
                filled += 1
            i += 1
        total = 0.0
        for j in range(width):
            total += benefit[r, order[r, j]]
            gain[r, j + 1] = total
    return trunc, order, gain, n_pos, n_candidates - n_pos, n_neg_beneficial


@numba.njit(cache=True, nogil=True)
def _stable_argsort(keys: np.ndarray, ranks: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """The positions of ``keys`` (finite) in ascending order, equal keys in index order (as numpy's stable sort):
    a bottom-up merge sort taking from the left run on ties, in ``ranks``/``scratch`` (at least ``len(keys)`` long;
    the result is a view of one of them). Written out because numba's own sorts take 20 s to compile."""
    n = keys.size
    source, target = ranks[:n], scratch[:n]
    for i in range(n):
        source[i] = i
    width = 1
    while width < n:
        for low in range(0, n, 2 * width):
            middle, high = min(low + width, n), min(low + 2 * width, n)
            i, j = low, middle
            for k in range(low, high):
                if j < high and (i >= middle or keys[source[j]] < keys[source[i]]):
                    target[k] = source[j]
                    j += 1
                else:
                    target[k] = source[i]
                    i += 1
        source, target = target, source
        width *= 2
    return source


@numba.njit(cache=True, nogil=True)
def level_counts(v: np.ndarray, lo: int, n_levels: int) -> tuple[np.ndarray, bool]:
    """Per row, how many values equal ``lo + i`` (``(rows, n_levels)`` int64), and whether every value is an integer.

    The caller knows every value lies in ``[lo, lo + n_levels)``; a value that is no integer stops the count
    (``False``: the counts are then meaningless).
    """
    rows, K = v.shape
    counts = np.zeros((rows, n_levels), dtype=np.int64)
    for r in range(rows):
        for i in range(K):
            level = np.int64(v[r, i])  # toward zero, as numpy's astype(int64)
            if level != v[r, i]:
                return counts, False
            counts[r, level - lo] += 1
    return counts, True


@numba.njit(cache=True, nogil=True)
def positive_and_total_sums(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of int64 weights, the sum of the positive ones and the sum of all (int64; exact while no sum leaves
    int64, which :func:`bounds.positive_negative_sums`'s int64 path assumes too)."""
    rows, K = q.shape
    pos = np.zeros(rows, dtype=np.int64)
    total = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        p = 0
        t = 0
        for i in range(K):
            value = q[r, i]
            t += value
            if value > 0:
                p += value
        pos[r] = p
        total[r] = t
    return pos, total


@numba.njit(cache=True, nogil=True)
def plain_round(v: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, bool]:
    """``projection.plain_round`` of float rows (round half to even, then clip to ``[lo, hi]``) as int64;
    ``False`` (and a meaningless array) where a value is NaN, which numpy's cast turns into a value of its own."""
    rows, K = v.shape
    q = np.empty((rows, K), dtype=np.int64)
    for r in range(rows):
        for i in range(K):
            value = v[r, i]
            if value != value:
                return q, False
            q[r, i] = np.int64(min(max(np.rint(value), lo), hi))
    return q, True


@numba.njit(cache=True, nogil=True)
def contract_rows(v: np.ndarray, q: np.ndarray, lo: float,
                  hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Per row, the positive and total sums of the plain rounding of ``v`` (as :func:`plain_round`, never
    stored) and of ``q``, and whether ``q`` differs from that rounding; ``False`` where ``v`` holds a NaN."""
    rows, K = v.shape
    plain_pos = np.zeros(rows, dtype=np.int64)
    plain_total = np.zeros(rows, dtype=np.int64)
    q_pos = np.zeros(rows, dtype=np.int64)
    q_total = np.zeros(rows, dtype=np.int64)
    differs = np.zeros(rows, dtype=np.bool_)
    for r in range(rows):
        p_pos, p_total, m_pos, m_total, changed = 0, 0, 0, 0, False  # scalars: array slots would stay in memory
        for i in range(K):
            value = v[r, i]
            if value != value:
                return plain_pos, plain_total, q_pos, q_total, differs, False
            rounded = np.int64(min(max(np.rint(value), lo), hi))
            mine = np.int64(q[r, i])
            p_total += rounded
            p_pos += max(rounded, 0)
            m_total += mine
            m_pos += max(mine, 0)
            changed |= mine != rounded
        plain_pos[r], plain_total[r], q_pos[r], q_total[r], differs[r] = p_pos, p_total, m_pos, m_total, changed
    return plain_pos, plain_total, q_pos, q_total, differs, True


@numba.njit(cache=True, nogil=True)
def change_sums(before: np.ndarray, after: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """For ``projection_stats.projection_stats`` when ``v`` holds integers: the five sums of squares (change, before,
    before - v, after - v, v) as exact int64 integers, then zeros before, zeros after and rows changed.

    ``False`` (the caller then sums in float64) where a value of ``v`` is no integer, a magnitude exceeds 2^20 or
    a sum reaches 2^53: below that every float64 sum of these squares, in any order, is this exact integer. With
    K <= 2^20 (the caller's part) a row adds less than 2^62, so checking the sums once per row keeps them in int64.
    """
    rows, K = before.shape
    most = 1 << 20
    squares = np.zeros(5, dtype=np.int64)
    counts = np.zeros(3, dtype=np.int64)
    for r in range(rows):
        change = norm_b = to_v_b = to_v_a = norm_v = 0  # scalars: array slots would stay in memory
        zeros_b = zeros_a = 0
        changed = False
        for i in range(K):
            if not abs(v[r, i]) <= most:  # NaN too
                return squares, counts, False
            w = np.int64(v[r, i])
            if w != v[r, i]:
                return squares, counts, False
            b = np.int64(before[r, i])
            a = np.int64(after[r, i])
            if abs(b) > most or abs(a) > most:
                return squares, counts, False
            change += (a - b) * (a - b)
            norm_b += b * b
            to_v_b += (b - w) * (b - w)
            to_v_a += (a - w) * (a - w)
            norm_v += w * w
            zeros_b += b == 0
            zeros_a += a == 0
            changed |= a != b
        for j, row_sum in enumerate((change, norm_b, to_v_b, to_v_a, norm_v)):
            squares[j] += row_sum
            if squares[j] >= 1 << 53:
                return squares, counts, False
        counts[0] += zeros_b
        counts[1] += zeros_a
        counts[2] += changed
    return squares, counts, True


# numpy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src, ``pairwise_sum``), which ``ndarray.sum``
# applies to each C-ordered row of a float64 array reduced over its last axis: 8 running sums over blocks of up to
# 128 values, halves (cut at a multiple of 8) above that. tests/test_kernels.py checks it against ndarray.sum.
_PAIRWISE_BLOCK = 128


@numba.njit(cache=True, nogil=True)
def _pairwise_sums(a: np.ndarray, n: int) -> tuple[float, float]:
    """numpy's pairwise sums of ``max(a[:n], 0)`` and of ``a[:n]``, both in one walk over the same halves.

    numpy recurses; numba's cache cannot hold a recursive function (it crashes loading one), so the halves are
    walked with an explicit stack: frame f sums ``a[start[f]:start[f] + size[f]]``, its left half's sums waiting
    in ``left_pos[f]``/``left_all[f]`` while the right half is summed.
    """
    start = np.zeros(64, dtype=np.int64)
    size = np.zeros(64, dtype=np.int64)
    stage = np.zeros(64, dtype=np.int64)  # 0: sum the left half next, 1: the right half, 2: add the two
    left_pos = np.zeros(64)
    left_all = np.zeros(64)
    size[0] = n
    top = 0
    pos = total = 0.0  # the sums the frame just finished hands to its parent
    while top >= 0:
        m = size[top]
        if m <= _PAIRWISE_BLOCK:
            pos, total = _block_sums(a, start[top], m)
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if stage[top] == 0:
            stage[top] = 1
            start[top + 1], size[top + 1], stage[top + 1] = start[top], half, 0
            top += 1
        elif stage[top] == 1:
            left_pos[top], left_all[top] = pos, total
            stage[top] = 2
            start[top + 1], size[top + 1], stage[top + 1] = start[top] + half, m - half, 0
            top += 1
        else:
            pos, total = left_pos[top] + pos, left_all[top] + total
            top -= 1
    return pos, total


@numba.njit(cache=True, nogil=True)
def _block_sums(a: np.ndarray, start: int, n: int) -> tuple[float, float]:
    """numpy's pairwise sums of ``max(x, 0)`` and of ``x`` over at most 128 values ``x = a[start:start + n]``:
    sequential below 8, else 8 running sums each (scalars: an array of them would be allocated per block)."""
    if n < 8:
        pos = total = 0.0
        for i in range(start, start + n):
            pos += _positive_part(a[i])
            total += a[i]
        return pos, total
    t0, t1, t2, t3, t4, t5, t6, t7 = a[start], a[start + 1], a[start + 2], a[start + 3], a[start + 4], \
        a[start + 5], a[start + 6], a[start + 7]
    p0, p1, p2, p3 = _positive_part(t0), _positive_part(t1), _positive_part(t2), _positive_part(t3)
    p4, p5, p6, p7 = _positive_part(t4), _positive_part(t5), _positive_part(t6), _positive_part(t7)
    i = start + 8
    stop = start + n - n % 8
    while i < stop:
        x0, x1, x2, x3, x4, x5, x6, x7 = a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]
        t0 += x0
        t1 += x1
        t2 += x2
        t3 += x3
        t4 += x4
        t5 += x5
        t6 += x6
        t7 += x7
        p0 += _positive_part(x0)
        p1 += _positive_part(x1)
        p2 += _positive_part(x2)
        p3 += _positive_part(x3)
        p4 += _positive_part(x4)
        p5 += _positive_part(x5)
        p6 += _positive_part(x6)
        p7 += _positive_part(x7)
        i += 8
    pos = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    total = ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7))
    while i < start + n:
        pos += _positive_part(a[i])
        total += a[i]
        i += 1
    return pos, total


@numba.njit(cache=True, nogil=True)
def _positive_part(value: float) -> float:
    """``np.maximum(value, 0.0)``: ``value`` where it is >= 0, else 0 (the rows hold no NaN: plain rounding
    refuses them before any projection)."""
    if not value >= 0.0:
        return 0.0
    return value


@numba.njit(cache=True, nogil=True)
def accumulator_extremes(w: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """``projection._accumulator_extremes`` of C-ordered float64 rows, its sums in numpy's order."""
    rows = w.shape[0]
    acc_min = np.empty(rows)
    acc_max = np.empty(rows)
    for r in range(rows):
        pos, total = _pairwise_sums(w[r], w.shape[1])
        neg = pos - total
        acc_min[r] = lo * pos - hi * neg
        acc_max[r] = hi * pos - lo * neg
    return acc_min, acc_max


@numba.njit(cache=True, nogil=True)
def shrink_rows(v: np.ndarray, L: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``v - np.clip(v, L, np.maximum(L, U))`` per row, with numpy's scalar rules: ``maximum(a, b)`` is a where
    ``a >= b`` or a is NaN, else b; clip is ``min(max(v, low), high)`` where ``max``/``min`` keep a NaN first operand
    and otherwise take the first operand only where it is strictly beyond the second."""
    rows, K = v.shape
    w = np.empty((rows, K))
    for r in range(rows):
        low = L[r]
        high = L[r] if (L[r] >= U[r] or L[r] != L[r]) else U[r]
        for i in range(K):
            value = v[r, i]
            clipped = value if (value != value or value > low) else low
            clipped = clipped if (clipped != clipped or clipped < high) else high
            w[r, i] = value - clipped
    return w
