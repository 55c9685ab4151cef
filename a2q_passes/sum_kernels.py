"""Compiled (numba) per-row ``(sum |q|, sum q)`` of 8-bit weights: one pass over the stored bytes.

:func:`a2q_passes.bounds.positive_negative_sums` sums 8-bit weights in numpy with two widening reductions and an
``abs`` per block (about 2.5 GB/s on the benchmark machine); these loops read each byte once (4-10 GB/s). Importing numba and loading the cached kernels costs about 0.7 s, so ``analyze`` asks for them only
on models with at least ``analysis.COMPILED_SUMS_MIN_WEIGHTS`` weights, where the saving is larger.
The numpy path stays the reference (``tests/test_analysis_streamed_sums.py`` compares both).
"""

from __future__ import annotations

from a2q_passes.numba_cache import choose_cache_folder

choose_cache_folder()  # before numba's import, which reads the cache folder once

import numba  # noqa: E402
import numpy as np  # noqa: E402

# the column kernel sums in int32 arrays: K terms of magnitude <= 128 (int8) stay below 2^31 while K < 2^24, of
# magnitude <= 255 (uint8) while K < 2^23 (numba types the row kernel's running sums int64, but both obey the limit)
MAX_TERMS = {np.dtype(np.int8): 1 << 24, np.dtype(np.uint8): 1 << 23}


@numba.njit(cache=True, nogil=True)
def _row_sums(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum |q|, sum q)`` of every C-ordered row of 8-bit integers, as int64."""
    rows, K = q.shape
    l1, total = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    for r in range(rows):
        magnitude = np.int32(0)
        value_sum = np.int32(0)
        for i in range(K):
            v = np.int32(q[r, i])
            value_sum += v
            magnitude += abs(v)
        l1[r], total[r] = magnitude, value_sum
    return l1, total


@numba.njit(cache=True, nogil=True)
def _column_sums(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum |q|, sum q)`` down every column of a C-ordered ``(K, columns)`` array of 8-bit integers, as int64."""
    K, columns = stored.shape
    magnitude = np.zeros(columns, dtype=np.int32)
    value_sum = np.zeros(columns, dtype=np.int32)
    for k in range(K):  # memory order: whole stored rows
        for c in range(columns):
            v = np.int32(stored[k, c])
            value_sum[c] += v
            magnitude[c] += abs(v)
    return magnitude.astype(np.int64), value_sum.astype(np.int64)


def magnitude_and_value_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row of a 2-D int8/uint8 array, ``(sum |q|, sum q)`` as int64; ``None`` where these kernels do not apply
    (another type, K at or past its type's :data:`MAX_TERMS`, or rows neither C-ordered nor stored as C-ordered
    columns)."""
    if rows.dtype not in MAX_TERMS or rows.shape[1] >= MAX_TERMS[rows.dtype]:
        return None
    if rows.flags.c_contiguous:
        return _row_sums(rows)
    if rows.T.flags.c_contiguous:
        return _column_sums(rows.T)
    return None
