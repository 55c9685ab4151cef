"""Compiled (numba) versions of the exact method's per-row steps, for large blocks of rows only.

:mod:`a2q_passes.projection` asks :func:`wanted` for each block it works on: blocks of at least
:data:`MIN_ELEMENTS` weights (the row blocks of a large layer) use the kernels of :mod:`a2q_passes._compiled`,
smaller ones the numpy code. Both give the same bits (tests/test_kernels.py compares them on random rows with
ties, zero rows and rows that already fit). The threshold keeps numba out of small models' runs: importing it
costs about half a second and compiling the kernels on a cold cache several seconds, more than the numpy code
spends on a bundled model. numba is imported on the first large block only.

numba caches compiled kernels beside their source, or elsewhere where the package is installed read-only
(:mod:`a2q_passes.numba_cache`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from a2q_passes.numba_cache import choose_cache_folder

# Smallest block (weights) handed to the compiled kernels. The projection's row blocks hold about 2^20 weights
# (row_blocks.rows_per_block), so a layer of at least this many weights uses them; the bundled models' largest
# layer holds 75264.
MIN_ELEMENTS = 1 << 18

_compiled: ModuleType | None = None


def wanted(elements: int) -> bool:
    """Whether a block of ``elements`` weights goes to the compiled kernels."""
    return elements >= MIN_ELEMENTS


def compiled() -> ModuleType:
    """:mod:`a2q_passes._compiled`, imported (with numba) on first use, its cache folder set where numba can write."""
    global _compiled
    if _compiled is None:
        choose_cache_folder()
        from a2q_passes import _compiled as module
        _compiled = module
    return _compiled


def round_up_candidates(w: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`a2q_passes._compiled.round_up_candidates` on float64 rows."""
    return compiled().round_up_candidates(np.ascontiguousarray(w, dtype=np.float64))


def level_counts(v: np.ndarray, lo: int, n_levels: int) -> np.ndarray | None:
    """Per row, how many values of ``v`` equal each of ``lo .. lo + n_levels - 1``; ``None`` if one is no integer."""
    counts, integers = compiled().level_counts(np.ascontiguousarray(v, dtype=np.float64), lo, n_levels)
    return counts if integers else None


def positive_negative_sums(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of int64 weights, ``(sum of positive, sum of |negative|)``, as :func:`bounds.positive_negative_sums`."""
    pos, total = compiled().positive_and_total_sums(np.ascontiguousarray(q, dtype=np.int64))
    return pos, pos - total


def plain_round(v: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """:func:`projection.plain_round` of C-ordered float64 rows; ``None`` where a value is NaN."""
    q, finite = compiled().plain_round(v, float(lo), float(hi))
    return q if finite else None


def contract_rows(v: np.ndarray, q: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...] | None:
    """Per row: the plain rounding's ``(sum of positive, sum of |negative|)``, ``q``'s, and whether ``q`` differs
    from that rounding (``methods._contract_rows``'s figures, no rounded copy); ``None`` where ``v`` holds a NaN."""
    plain_pos, plain_total, q_pos, q_total, differs, finite = compiled().contract_rows(
        np.ascontiguousarray(v, dtype=np.float64), np.ascontiguousarray(q), float(lo), float(hi))
    return (plain_pos, plain_pos - plain_total, q_pos, q_pos - q_total, differs) if finite else None


def change_sums(before: np.ndarray, after: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``projection_stats.projection_stats``'s five sums of squares (float64, exact integers) and its three counts
    (zeros before, zeros after, rows changed) where ``v`` holds small integers, else ``None``."""
    if before.shape[1] > 1 << 20:
        return None
    squares, counts, exact = compiled().change_sums(before, np.ascontiguousarray(after, dtype=np.int64),
                                                     np.ascontiguousarray(v, dtype=np.float64))
    return (squares.astype(np.float64), counts) if exact else None


def accumulator_extremes(w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``projection._accumulator_extremes`` of float64 rows (its float sums in numpy's pairwise order)."""
    return compiled().accumulator_extremes(np.ascontiguousarray(w, dtype=np.float64), float(lo), float(hi))


def shrink_rows(v: np.ndarray, L: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``v - np.clip(v, L[:, None], np.maximum(L, U)[:, None])`` of float64 rows, as numpy computes it."""
    return compiled().shrink_rows(np.ascontiguousarray(v, dtype=np.float64), np.asarray(L, dtype=np.float64),
                                  np.asarray(U, dtype=np.float64))
