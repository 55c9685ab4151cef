"""Integer dot products accumulated in a P-bit accumulator: pure numpy, no ONNX.

Semantics (one output = one dot product of K integer terms, taken in the order of the K axis):

- ``mode="wrap"``: two's-complement (or unsigned modulo) wrap-around. Addition modulo 2^P is
  associative, so only the final sum matters: the result is the exact sum wrapped once.
- ``mode="saturate"``: the running sum is clamped to the accumulator range after every
  addition, so every prefix matters and the K terms are added one at a time, in order.
- ``tile=T`` (multi-stage datapath): each tile of T consecutive terms is accumulated in its own
  P-bit accumulator (wrapping or saturating), then the tile results are added, in order, into
  a P-bit accumulator of the same kind. Under wrap-around the *result* cannot change with
  tiling (it is still the exact sum modulo 2^P), but the registers that overflow on the way do.

Every accumulation also reports ``register_overflow``: whether some accumulator register left
the P-bit range on the way (for untiled wrap-around only the final sum counts, as
intermediate wrap-around cancels). That is what a static proof over the same registers
(:func:`a2q_passes.bounds.partial_sum_range`) rules out.

The accumulator is unsigned (``[0, 2^P - 1]``) when ``signed=False``; callers choose it from the
layer's static range (unsigned when ``acc_min >= 0``, the FINN convention in :mod:`bounds`).
Exact sums are int64; they are computed in float32 / float64 BLAS while every partial sum stays
below 2^24 / 2^53, where those types hold integers exactly, and nothing may exceed 2^62.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from a2q_passes.bounds import accumulator_limits

MODES = ("wrap", "saturate")
MAX_SIMULATED_BITS = 62  # keeps every register sum (P-bit value + one term) inside int64
_FLOAT32_EXACT = 1 << 24
_FLOAT64_EXACT = 1 << 53
_INT64_SAFE = 1 << 62


@dataclass
class Accumulation:
    """P-bit results next to the exact sums; arrays share the output shape."""

    values: np.ndarray  # int64: what the P-bit accumulator holds at the end
    exact: np.ndarray  # int64: the exact dot products
    register_overflow: np.ndarray  # bool: some accumulator register left the P-bit range

    @property
    def overflowed(self) -> np.ndarray:
        """Outputs whose P-bit result differs from the exact sum."""
        return self.values != self.exact

    @property
    def overflow_count(self) -> int:
        return 0 if self.values is self.exact else int(np.count_nonzero(self.overflowed))

    @property
    def register_overflow_count(self) -> int:
        return int(np.count_nonzero(self.register_overflow))


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_SIMULATED_BITS:
        raise ValueError(f"simulated accumulator width must be between 1 and {MAX_SIMULATED_BITS} bits, got {bits}")


def _check_mode(mode: str, tile: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of terms, got {tile}")


def wrap(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """``values`` reduced modulo 2^bits into the accumulator range (exact, any int64 input)."""
    _check_bits(bits)
    mask = np.uint64((1 << bits) - 1)
    low_bits = np.asarray(values, dtype=np.int64).view(np.uint64) & mask  # two's complement bit pattern
    if not signed:
        return low_bits.view(np.int64)
    negative = (low_bits & np.uint64(1 << (bits - 1))) != 0
    return np.where(negative, (low_bits | ~mask).view(np.int64), low_bits.view(np.int64))


def saturate(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """``values`` clamped into the accumulator range."""
    _check_bits(bits)
    lo, hi = accumulator_limits(bits, signed)
    return np.clip(np.asarray(values, dtype=np.int64), lo, hi)


def _integer_array(a: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{what} must hold integers")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} has unsupported dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _max_abs(a: np.ndarray) -> int:
    return int(np.abs(a).max()) if a.size else 0


def exact_dot(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact ``x @ q.T`` for integer ``x`` ``(..., K)`` and ``q`` ``(C, K)``, as int64 ``(..., C)``."""
    x, q = _integer_array(x, "inputs"), _integer_array(q, "weights")
    bound = _max_abs(x) * int(np.abs(q).sum(axis=1).max(initial=0))  # bounds every partial sum
    dtype = exact_float_dtype(bound)
    if dtype is not None:
        return (x.astype(dtype) @ q.T.astype(dtype)).astype(np.int64)
    if bound >= _INT64_SAFE:
        raise ValueError(f"dot products may reach {bound} >= 2^62; too wide to simulate in int64")
    return x @ q.T


def exact_float_dtype(bound: int) -> type | None:
    """A float type in which integer sums whose partial sums stay within ``bound`` are exact, if any.

    Every partial sum of a direct (GEMM-style) dot product is then an exactly representable
    integer, so BLAS or a direct convolution gives the exact result in any summation order.
    """
    if bound < _FLOAT32_EXACT:
        return np.float32
    if bound < _FLOAT64_EXACT:
        return np.float64
    return None


def accumulate_terms(terms: np.ndarray, bits: int, signed: bool, mode: str = "wrap",
                     tile: int | None = None, outer: tuple[int, bool] | None = None) -> Accumulation:
    """Accumulate the integer ``terms`` along their last axis (K) in a ``bits``-bit accumulator.

    ``outer`` (with ``tile``): ``(bits, signed)`` of the accumulator that sums the tile results, when it
    differs from the tiles' own."""
    terms = _integer_array(terms, "terms")
    if terms.size and float(np.abs(terms.astype(np.float64)).sum(axis=-1).max()) >= _INT64_SAFE:
        raise ValueError("partial sums may reach 2^62; too wide to simulate in int64")
    return accumulate(lambda k: terms[..., k], terms.shape[-1], bits, signed, mode, tile, exact=terms.sum(axis=-1),
                      outer=outer)


def accumulate_dot(x: np.ndarray, q: np.ndarray, bits: int, signed: bool, mode: str = "wrap",
                   tile: int | None = None, outer: tuple[int, bool] | None = None) -> Accumulation:
    """Dot products of codes ``x`` ``(..., K)`` with weights ``q`` ``(C, K)`` (or ``(K,)``) in ``bits`` bits.

    Outputs have shape ``(..., C)`` (``(...)`` for 1-D ``q``). Wrap-around without tiles costs one
    matrix product; saturating or tiled accumulation loops over K, vectorised over all outputs.
    """
    q = _integer_array(q, "weights")
    vector = q.ndim == 1
    q2 = q[None, :] if vector else q
    x = _integer_array(x, "inputs")
    if x.shape[-1] != q2.shape[1]:
        raise ValueError(f"inputs have K={x.shape[-1]} terms but weights have K={q2.shape[1]}")
    result = accumulate(lambda k: x[..., k, None] * q2[:, k], q2.shape[1], bits, signed, mode, tile,
                        exact=exact_dot(x, q2), outer=outer)
    if vector:
        return Accumulation(result.values[..., 0], result.exact[..., 0], result.register_overflow[..., 0])
    return result


def accumulate(term_at: Callable[[int], np.ndarray], K: int, bits: int, signed: bool, mode: str = "wrap",
               tile: int | None = None, exact: np.ndarray | None = None,
               outer: tuple[int, bool] | None = None) -> Accumulation:
    """The general form: ``term_at(k)`` gives the k-th int64 term of every output (broadcastable to the outputs).

    ``exact`` (the exact sums, which fix the output shape) saves summing the terms here. The
    caller guarantees every partial sum stays below 2^62 in magnitude. ``outer``: ``(bits, signed)`` of
    the accumulator summing the tile results (default: the tiles' own).
    """
    _check_bits(bits)
    _check_mode(mode, tile)
    lo, hi = accumulator_limits(bits, signed)
    if exact is None:
        exact = sum((term_at(k) for k in range(1, K)), start=np.asarray(term_at(0), dtype=np.int64))
    exact = np.asarray(exact, dtype=np.int64)
    if mode == "wrap" and tile is None:
        if exact.size == 0 or (exact.min() >= lo and exact.max() <= hi):
            return Accumulation(exact, exact, np.zeros(exact.shape, dtype=bool))
        return Accumulation(wrap(exact, bits, signed), exact, (exact < lo) | (exact > hi))
    overflow = np.zeros(exact.shape, dtype=bool)

    def adder(bits: int, signed: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        lo, hi = accumulator_limits(bits, signed)

        def add(register: np.ndarray, term: np.ndarray) -> np.ndarray:
            total = register + term
            overflow[...] |= (total < lo) | (total > hi)
            return wrap(total, bits, signed) if mode == "wrap" else np.clip(total, lo, hi)

        return add

    if outer is not None:
        _check_bits(outer[0])
    add_inner = adder(bits, signed)
    add_outer = add_inner if outer is None else adder(*outer)
    step = K if tile is None else tile
    result = np.zeros(exact.shape, dtype=np.int64)
    for start in range(0, K, step):
        partial = np.zeros(exact.shape, dtype=np.int64)
        for k in range(start, min(start + step, K)):
            partial = add_inner(partial, term_at(k))
        result = partial if tile is None else add_outer(result, partial)
    return Accumulation(result, exact, overflow)

