"""Compiled (numba) worst-case simulation of large layers: one pass over the stored integer weights.

:func:`count_adversarial_overflows` accumulates, for every accumulation row of integer weights ``q``, the two
worst-case input vectors of :func:`a2q_passes.bounds.adversarial_inputs` (``x_i = lo if q_i > 0 else hi`` and
its mirror) in the P-bit accumulator of :func:`a2q_passes.simulate.accumulate`: term by term in K order, each
register wrapping (two's complement or modulo 2^P) or saturating after every addition, tiles of ``tile`` terms
summed into the outer accumulator. It counts the results that differ from the exact sums and the outputs
where some register left its range, as ``accumulate_terms`` over the same terms does, without building the
inputs, the terms or any int64 copy of the weights (some 40 bytes per weight in numpy).

numba is imported only here, and this module only for layers of at least
``verification._ADVERSARIAL_KERNEL_TERMS`` terms: its import and first compilation (cached on disk) would
slow down every small model. The numpy path stays the reference (``tests/test_verify.py`` compares both).
"""

from __future__ import annotations

from a2q_passes.numba_cache import choose_cache_folder

choose_cache_folder()  # before numba's import, which reads the cache folder once

import numba  # noqa: E402
import numpy as np  # noqa: E402

_WRAP, _SATURATE = 0, 1


@numba.njit(cache=True, inline="always")
def _outside(total: int, bits: int, signed: bool) -> bool:
    """Whether ``total`` lies outside the P-bit accumulator's range."""
    if signed:
        return total < -(1 << (bits - 1)) or total > (1 << (bits - 1)) - 1
    return total < 0 or total > (1 << bits) - 1


@numba.njit(cache=True, inline="always")
def _add(register: int, term: int, bits: int, signed: bool, mode: int) -> tuple[int, bool]:
    """``register + term`` in the P-bit accumulator, and whether the exact sum left its range."""
    total = register + term
    if not _outside(total, bits, signed):
        return total, False
    if mode == _SATURATE:
        if total < 0 and signed:
            return -(1 << (bits - 1)), True
        if total < 0:
            return 0, True
        return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1, True
    low_bits = total & ((1 << bits) - 1)  # two's complement bit pattern of the low P bits
    if signed and low_bits >= 1 << (bits - 1):
        low_bits -= 1 << bits
    return low_bits, True


@numba.njit(cache=True, inline="always")
def _term(weight: int, minimising: bool, lo: int, hi: int, xnor: bool) -> int:
    """The worst-case term of one weight: the input code ``bounds.adversarial_inputs`` puts against it, times it
    (binary xnor layers count matches instead)."""
    x = (lo if weight > 0 else hi) if minimising else (hi if weight > 0 else lo)
    if xnor:
        return 1 if x == weight else 0
    return x * weight


@numba.njit(cache=True)
def _rows_kernel(rows, lo, hi, xnor, bits, signed, outer_bits, outer_signed, mode, tile, tiled):  # pragma: no cover
    """Rows stored as rows ``(C, K)``: each row's two cases, term by term along the row."""
    overflows = register_overflows = 0
    for c in range(rows.shape[0]):
        for case in range(2):
            exact = result = partial = 0
            overflow = False
            if mode == _WRAP and not tiled:  # one register, whose intermediate wrap-around cancels
                for k in range(rows.shape[1]):
                    exact += _term(np.int64(rows[c, k]), case == 0, lo, hi, xnor)
                outside = _outside(exact, bits, signed)
                overflows += outside
                register_overflows += outside
                continue
            for k in range(rows.shape[1]):
                term = _term(np.int64(rows[c, k]), case == 0, lo, hi, xnor)
                exact += term
                partial, out = _add(partial, term, bits, signed, mode)
                overflow |= out
                if tiled and ((k + 1) % tile == 0 or k + 1 == rows.shape[1]):
                    result, out = _add(result, partial, outer_bits, outer_signed, mode)
                    overflow |= out
                    partial = 0
            if not tiled:
                result = partial
            overflows += result != exact
            register_overflows += overflow
    return overflows, register_overflows


@numba.njit(cache=True)
def _columns_kernel(stored, lo, hi, xnor, bits, signed, outer_bits, outer_signed, mode, tile, tiled):  # pragma: no cover
    """Rows stored as columns (``stored`` is ``(K, C)``, MatMul's layout): the stored rows in memory order, every
    output's registers advanced one term at a time."""
    K, C = stored.shape
    exact = np.zeros((2, C), dtype=np.int64)
    result = np.zeros((2, C), dtype=np.int64)
    partial = np.zeros((2, C), dtype=np.int64)
    overflow = np.zeros((2, C), dtype=np.bool_)
    if mode == _WRAP and not tiled:  # one register, whose intermediate wrap-around cancels
        for k in range(K):
            for case in range(2):
                for c in range(C):
                    exact[case, c] += _term(np.int64(stored[k, c]), case == 0, lo, hi, xnor)
        outside = 0
        for case in range(2):
            for c in range(C):
                outside += _outside(exact[case, c], bits, signed)
        return outside, outside
    for k in range(K):
        close_tile = tiled and ((k + 1) % tile == 0 or k + 1 == K)
        for case in range(2):
            for c in range(C):
                term = _term(np.int64(stored[k, c]), case == 0, lo, hi, xnor)
                exact[case, c] += term
                register, out = _add(partial[case, c], term, bits, signed, mode)
                if close_tile:
                    total, out_outer = _add(result[case, c], register, outer_bits, outer_signed, mode)
                    result[case, c] = total
                    out |= out_outer
                    register = 0
                partial[case, c] = register
                overflow[case, c] |= out
    overflows = register_overflows = 0
    for case in range(2):
        for c in range(C):
            final = result[case, c] if tiled else partial[case, c]
            overflows += final != exact[case, c]
            register_overflows += overflow[case, c]
    return overflows, register_overflows


def count_adversarial_overflows(rows: np.ndarray, lo: int, hi: int, xnor: bool, bits: int, signed: bool,
                                mode: str, tile: int | None, outer: tuple[int, bool] | None) -> tuple[int, int]:
    """``(results differing from the exact sum, outputs with a register overflow)`` over both worst cases of
    every row of the integer ``rows`` ``(C, K)``, each term of which, and every partial sum, the caller has
    bounded below 2^62 in magnitude; ``bits`` (and ``outer``'s) at most 62."""
    outer_bits, outer_signed = outer if outer is not None else (bits, signed)
    args = (int(lo), int(hi), bool(xnor), int(bits), bool(signed), int(outer_bits), bool(outer_signed),
            _SATURATE if mode == "saturate" else _WRAP, int(tile or rows.shape[1] or 1), tile is not None)
    if rows.T.flags.c_contiguous and not rows.flags.c_contiguous:
        counts = _columns_kernel(rows.T, *args)
    else:
        counts = _rows_kernel(np.ascontiguousarray(rows), *args)
    return int(counts[0]), int(counts[1])
