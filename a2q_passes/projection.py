"""Make a layer's integer weights fit a chosen accumulator width: pure numpy, no ONNX.

Every function works on one layer in its integer view (see :mod:`a2q_passes.bounds`):
``v`` is a float ``(rows, K)`` array of *unrounded* weights in integer units (float weight
divided by its scale; one row per output channel), ``x`` the integer input range, ``acc_bits``
the target width P and ``weight_range`` the weight quantizer's integer range. A method returns
integer weights inside ``weight_range`` whose exact accumulator range fits P bits under the
project convention (:func:`bounds.fits`: ``UINT P`` when ``acc_min >= 0``, else ``INT P``),
applied to the whole layer because a layer has one accumulator type: every row must fit
``INT P`` unless no row of the plain-rounded layer reaches below 0 (then ``UINT P``).

Rows whose plain rounding (round-half-even, clipped: what a qonnx ``Quant`` with ``ROUND``
does) already fits come back exactly as plain rounding gives them; only the others are
projected. Every result is checked with :func:`bounds.exact_accumulator_range` before it is
returned. Bias is added after the accumulator and is not part of any bound here.

Methods:

- ``a2q``: Euclidean projection onto the A2Q l1 ball (Duchi et al. 2008), round toward zero.
- ``a2q+``: zero-centre, project onto the A2Q+ l1 ball, round keeping the row sum exactly 0;
  rows where that is not reachable fall back to ``exact``.
- ``exact``: projection onto the exact accumulator-range constraint itself (two linear
  constraints in the positive / negative weight mass), then the best rounding that keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from a2q_passes import bounds, kernels
from a2q_passes.bounds import IntRange
from a2q_passes.errors import A2QError
from a2q_passes.row_blocks import in_order, rows_per_block

MIN_ACC_BITS, MAX_ACC_BITS = 2, 64
ROUND = "round"  # row_method of rows left as plain rounding


class InfeasibleTarget(A2QError, ValueError):
    """The accumulator width cannot hold even one non-zero weight of this layer (or is out of range)."""

    def __init__(self, message: str, acc_bits: int, min_acc_bits: int) -> None:
        super().__init__(message)
        self.acc_bits = acc_bits
        self.min_acc_bits = min_acc_bits


@dataclass(frozen=True)
class ProjectionResult:
    """Integer weights of one layer after a projection method, with what happened per row.

    ``row_method[c]`` is ``"round"`` for rows left as plain rounding, otherwise the name of the
    method that produced the row (``a2q+`` reports ``"exact"`` for its fallback rows).
    """

    # integers (rows, K): the built-in methods store them in weight_dtype(weight_range) (an int8 layer's take 1 byte
    # a weight, not 8); a plugin may return any integer type
    weights: np.ndarray
    touched: np.ndarray  # bool (rows,): plain rounding did not fit, the row was projected
    row_method: np.ndarray  # str (rows,)
    acc_limits: tuple[int, int]  # the layer's accumulator range: INT P, or UINT P when no row goes below 0

    def rows_using(self, name: str) -> np.ndarray:
        """Boolean mask of the rows produced by method ``name``."""
        return self.row_method == name


# ----------------------------------------------------------------------------- targets


def accumulator_is_signed(q: np.ndarray, x: IntRange) -> bool:
    """Whether a layer with integer weights ``q`` needs a signed accumulator (some row reaches below 0).

    FINN's ``accDataType`` is one per layer, so the UINT/INT choice of :func:`bounds.fits` is
    made for the whole layer: rows that are each non-negative on their own but sit next to a
    signed row must fit the signed range.
    """
    acc_min, _ = integer_row_ranges(q, x)
    return bool((acc_min < 0).any())


def layer_accumulator_limits(q: np.ndarray, x: IntRange, acc_bits: int) -> tuple[int, int]:
    """``(acc_min, acc_max)`` a ``acc_bits`` accumulator of this layer holds (``UINT P`` or ``INT P``)."""
    return bounds.accumulator_limits(acc_bits, signed=accumulator_is_signed(q, x))


def min_feasible_acc_bits(x: IntRange, weight_range: IntRange, signed_accumulator: bool = True) -> int:
    """Smallest P at which a row holding a single non-zero weight (+1 or -1) fits.

    Below it every row would have to be all zeros. With ``signed_accumulator`` (any layer
    with mixed-sign weights) the row must fit ``INT P``; otherwise (a layer whose rows are
    all non-negative) ``UINT P``. Never less than :data:`MIN_ACC_BITS`.
    """
    ranges = []
    if weight_range.hi >= 1:  # q = +1: the accumulator is x itself
        ranges.append((x.lo, x.hi))
    if weight_range.lo <= -1:  # q = -1: the accumulator is -x
        ranges.append((-x.hi, -x.lo))
    if signed_accumulator:
        widths = [bounds.signed_accumulator_width(lo, hi) for lo, hi in ranges]
    else:
        widths = [bounds.unsigned_accumulator_width(hi) for lo, hi in ranges if lo >= 0]
    return max([MIN_ACC_BITS, *([min(widths)] if widths else [])])


def check_target(x: IntRange, acc_bits: int, weight_range: IntRange, signed_accumulator: bool = True) -> None:
    """Raise :class:`InfeasibleTarget` unless ``acc_bits`` is a usable target for this layer."""
    if weight_range.lo > 0 or weight_range.hi < 0:
        raise ValueError(f"weight range [{weight_range.lo}, {weight_range.hi}] must contain 0 (weight zero points are 0)")
    smallest = min_feasible_acc_bits(x, weight_range, signed_accumulator)
    if isinstance(acc_bits, bool) or not isinstance(acc_bits, (int, np.integer)) or acc_bits > MAX_ACC_BITS:
        raise InfeasibleTarget(
            f"accumulator target {acc_bits!r} is not supported: use an integer from {smallest} to {MAX_ACC_BITS} bits",
            acc_bits, smallest)
    if acc_bits < smallest:
        kind = "INT" if signed_accumulator else "UINT"
        raise InfeasibleTarget(
            f"a {acc_bits}-bit accumulator ({kind}) is infeasible for inputs in [{x.lo}, {x.hi}] and weights in "
            f"[{weight_range.lo}, {weight_range.hi}]: not even a single +-1 weight fits; "
            f"the smallest feasible target is {smallest} bits",
            int(acc_bits), smallest)


# ----------------------------------------------------------------------------- rounding and checks


def weight_dtype(weight_range: IntRange) -> np.dtype:
    """The narrowest signed integer type holding every weight of ``weight_range``: what projected weights are kept in.

    Signed for unsigned ranges too (uint8 codes take int16), as the int64 it replaces: no consumer meets an unsigned
    type it did not meet before. Arithmetic that could leave the type (sums, products with input codes) is done in
    int64 by every consumer (the kernels per element, the reductions with an int64 or int32 accumulator).
    """
    return bounds.smallest_signed_type(weight_range.lo, weight_range.hi)


def plain_round(v: np.ndarray, weight_range: IntRange) -> np.ndarray:
    """Round half to even and clip, as the ``Quant`` op does (``round(clip(v))`` = ``clip(round(v))``), in
    :func:`weight_dtype`. ``v`` holds no NaN (the methods refuse it, :func:`_as_rows`): it has no integer."""
    v = np.asarray(v)
    rows = v.reshape(1, -1) if v.ndim < 2 else v
    q = np.empty(rows.shape, dtype=weight_dtype(weight_range))
    # a block of rows at a time: the int64/float64 temporaries stay bounded (each element is rounded on its own)
    step = rows_per_block(rows.shape[-1])
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        if block.dtype.kind in "iu":  # integers round to themselves (np.rint would give float16 for int8)
            info = np.iinfo(block.dtype)  # stored codes whose type lies inside the range (int8 codes) need no clip
            inside = weight_range.lo <= info.min and info.max <= weight_range.hi
            q[start:start + step] = block if inside else np.clip(block.astype(np.int64), weight_range.lo,
                                                                 weight_range.hi)
            continue
        if block.dtype == np.float64 and block.flags.c_contiguous and kernels.wanted(block.size):
            rounded = kernels.plain_round(block, weight_range.lo, weight_range.hi)
            if rounded is not None:  # None: a NaN; numpy's cast below takes it as numpy always did
                q[start:start + step] = rounded
                continue
        rounded = np.rint(block)
        np.clip(rounded, weight_range.lo, weight_range.hi, out=rounded)
        q[start:start + step] = rounded
    return q.reshape(v.shape)


def integer_row_ranges(q: np.ndarray, x: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bounds.exact_accumulator_range` of integer rows, its sums compiled for large int64 blocks."""
    if q.dtype == np.int64 and q.ndim == 2 and kernels.wanted(q.size):
        return bounds.range_from_sums(*kernels.positive_negative_sums(q), x)
    return bounds.exact_accumulator_range(q, x)


def rows_within(q: np.ndarray, x: IntRange, limits: tuple[int, int]) -> np.ndarray:
    """Per row, whether the exact accumulator range of ``q`` lies inside ``limits`` (exact integers)."""
    acc_min, acc_max = integer_row_ranges(q, x)
    return np.asarray((acc_min >= limits[0]) & (acc_max <= limits[1]), dtype=bool)


def _as_rows(v: np.ndarray, keep_integers: bool = False) -> np.ndarray:
    """``v`` as ``(rows, K)`` float64 rows, refusing NaN and infinity. ``keep_integers``: an integer array stays in
    its own type (no whole-layer float64 copy), for callers that convert a block of rows at a time."""
    arr = np.asarray(v)
    if not (keep_integers and arr.dtype.kind in "iu"):
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"expected weights of shape (rows, K), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError("weights contain NaN or infinity")
    return arr


# ----------------------------------------------------------------------------- real-valued projections


def project_l1_ball(v: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``v`` onto ``{w : ||w||_1 <= radius}`` (Duchi et al. 2008).

    Sort ``|v|`` descending into ``u``; ``rho = max{j : u_j > (cumsum(u)_j - r) / j}``;
    ``theta = (cumsum(u)_rho - r) / rho``; ``w = sign(v) * max(|v| - theta, 0)``. Rows already
    inside the ball are returned unchanged; a radius <= 0 gives zeros.
    """
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    rows, K = v.shape
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (rows,))
    u = -np.sort(-np.abs(v), axis=1)
    cssum = np.cumsum(u, axis=1)
    j = np.arange(1, K + 1)
    candidate = (cssum - radius[:, None]) / j
    rho = np.maximum((u > candidate).sum(axis=1), 1)  # the condition holds exactly for j <= rho
    theta = candidate[np.arange(rows), rho - 1]
    inside = cssum[:, -1] <= radius
    theta = np.where(inside, 0.0, theta)
    w = np.sign(v) * np.maximum(np.abs(v) - theta[:, None], 0.0)
    return np.where((radius <= 0)[:, None], 0.0, w)


def _last_true(predicate: Callable[[np.ndarray], np.ndarray], rows: int, K: int) -> np.ndarray:
    """Per row, the largest index j in [0, K) with ``predicate(j)`` true (-1 if none).

    ``predicate`` maps a ``(rows,)`` index array to booleans and must be true-then-false in j:
    a binary search vectorised over rows (log2 K steps of O(rows) work).
    """
    lo = np.full(rows, -1, dtype=np.int64)
    hi = np.full(rows, K, dtype=np.int64)
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        ok = predicate(np.minimum(mid, K - 1))  # mid >= 0 while the interval is open
        lo = np.where(open_ & ok, mid, lo)
        hi = np.where(open_ & ~ok, mid, hi)


class _SortedRows:
    """Rows sorted ascending with prefix sums: the masses beyond a per-row threshold in O(log K).

    For thresholds ``U >= L`` the vector ``v - clip(v, L, U)`` has positive mass
    ``Pm(U) = sum max(v - U, 0)`` and negative mass ``Nm(L) = sum max(L - v, 0)``.
    """

    def __init__(self, v: np.ndarray) -> None:
        self.values = np.sort(v, axis=1)
        self.rows, self.K = v.shape
        self.prefix = np.zeros((self.rows, self.K + 1))
        np.cumsum(self.values, axis=1, out=self.prefix[:, 1:])
        self._r = np.arange(self.rows)

    def _count_le(self, t: np.ndarray) -> np.ndarray:
        return _last_true(lambda j: self.values[self._r, j] <= t, self.rows, self.K) + 1

    def _count_lt(self, t: np.ndarray) -> np.ndarray:
        return _last_true(lambda j: self.values[self._r, j] < t, self.rows, self.K) + 1

    def upper(self, U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Pm(U), #{v > U})``."""
        below = self._count_le(U)
        count = self.K - below
        return self.prefix[:, -1] - self.prefix[self._r, below] - count * U, count

    def lower(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Nm(L), #{v < L})``."""
        count = self._count_lt(L)
        return count * L - self.prefix[self._r, count], count

    def upper_threshold(self, mass: np.ndarray) -> np.ndarray:
        """The U with ``Pm(U) = mass`` (``max v`` for mass <= 0): exact, from the sorted breakpoints."""
        K, r, total = self.K, self._r, self.prefix[:, -1]

        def mass_at(j: np.ndarray) -> np.ndarray:  # Pm at the j-th smallest value
            return total - self.prefix[r, j + 1] - (K - j - 1) * self.values[r, j]

        j = _last_true(lambda j: mass_at(j) >= mass, self.rows, K)  # U lies in [v_(j), v_(j+1)]
        count = K - j - 1
        above = total - self.prefix[r, j + 1]
        U = (above - mass) / np.maximum(count, 1)
        return np.where(mass <= 0, self.values[:, -1], U)

    def lower_threshold(self, mass: np.ndarray) -> np.ndarray:
        """The L with ``Nm(L) = mass`` (``min v`` for mass <= 0)."""
        r = self._r

        def mass_at(i: np.ndarray) -> np.ndarray:  # Nm at the i-th smallest value (increasing in i)
            return i * self.values[r, i] - self.prefix[r, i]

        count = _last_true(lambda i: mass_at(i) <= mass, self.rows, self.K) + 1  # values below L
        L = (mass + self.prefix[r, count]) / np.maximum(count, 1)
        return np.where(mass <= 0, self.values[:, 0], L)


class _LevelRows:
    """Rows of integers from a narrow range as per-row counts of each value: :class:`_SortedRows`'s masses, equal to the bit.

    Every prefix sum of integer values below 2^53 is exact in float64, in any order, so the sums of the values
    below each level (from the counts) are exactly the sorted rows' prefix sums at that level's first position;
    and the masses ``Pm``/``Nm`` at every position of a run of equal sorted values are one integer, so searching
    the levels finds the thresholds the sorted positions give. Built in O(K) per row (a histogram, no sort),
    each lookup is O(1) per row instead of a binary search.
    """

    def __init__(self, counts: np.ndarray, lo: int) -> None:
        """``counts[r, i]``: how many values of row r equal ``lo + i`` (every row holds K > 0 values)."""
        self.rows, n_levels = counts.shape
        self.K = int(counts[0].sum()) if self.rows else 0
        self.lo, self.n_levels = lo, n_levels
        self._r = np.arange(self.rows)
        present = counts > 0  # every row holds K > 0 values: its smallest and largest are the first and last present
        self.row_min = (lo + np.argmax(present, axis=1)).astype(np.float64)
        self.row_max = (lo + n_levels - 1 - np.argmax(present[:, ::-1], axis=1)).astype(np.float64)
        # count_below[:, i] / sum_below[:, i]: how many values, and their sum, lie below lo + i (i = 0..n_levels)
        self.count_below = np.zeros((self.rows, n_levels + 1), dtype=np.int64)
        np.cumsum(counts, axis=1, out=self.count_below[:, 1:])
        sums = np.zeros((self.rows, n_levels + 1), dtype=np.int64)
        np.cumsum(counts * np.arange(lo, lo + n_levels), axis=1, out=sums[:, 1:])
        self.sum_below = sums.astype(np.float64)
        self.total = self.sum_below[:, -1]

    def _index(self, level: np.ndarray) -> np.ndarray:
        """``level - lo`` as an index into ``count_below`` (clipped to it; NaN, which no value compares with, to 0)."""
        # fmax takes 0 over NaN; fmin/fmax on a few hundred rows cost a fraction of np.clip's dispatch
        return np.fmin(np.fmax(level - self.lo, 0), self.n_levels).astype(np.intp)

    def upper(self, U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Pm(U), #{v > U})``."""
        below = self._index(np.floor(U) + 1)  # integers <= U are those below floor(U) + 1
        count = self.K - self.count_below[self._r, below]
        return self.total - self.sum_below[self._r, below] - count * U, count

    def lower(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Nm(L), #{v < L})``."""
        below = self._index(np.ceil(L))  # integers < L are those below ceil(L)
        count = self.count_below[self._r, below]
        return count * L - self.sum_below[self._r, below], count

    def upper_threshold(self, mass: np.ndarray) -> np.ndarray:
        """The U with ``Pm(U) = mass`` (``max v`` for mass <= 0)."""
        # Pm at the levels lo - 1, ..., lo + n_levels - 1 (non-increasing): the last level where it reaches mass
        # has the counts of the last sorted position :class:`_SortedRows` finds (lo - 1: none, all values above)
        level = np.arange(self.lo - 1, self.lo + self.n_levels)
        above = self.total[:, None] - self.sum_below
        count_above = self.K - self.count_below
        pm = above - count_above * level
        i = np.maximum(np.count_nonzero(pm >= mass[:, None], axis=1) - 1, 0)
        U = (above[self._r, i] - mass) / np.maximum(count_above[self._r, i], 1)
        return np.where(mass <= 0, self.row_max, U)

    def lower_threshold(self, mass: np.ndarray) -> np.ndarray:
        """The L with ``Nm(L) = mass`` (``min v`` for mass <= 0)."""
        # Nm at the levels lo, ..., lo + n_levels - 1 (non-decreasing): the values up to the last level where it
        # stays within mass are those below L
        level = np.arange(self.lo, self.lo + self.n_levels)
        nm = self.count_below[:, :-1] * level - self.sum_below[:, :-1]
        below = np.count_nonzero(nm <= mass[:, None], axis=1)
        L = (mass + self.sum_below[self._r, below]) / np.maximum(self.count_below[self._r, below], 1)
        return np.where(mass <= 0, self.row_min, L)


def _rows_by_value(v: np.ndarray) -> _SortedRows | _LevelRows:
    """:class:`_LevelRows` for rows of integers spanning fewer levels than K (no larger than the rows themselves) whose
    sums stay exact in float64 (the stored codes of an 8-bit layer), else :class:`_SortedRows`; both answer alike."""
    rows, K = v.shape
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    n_levels = hi - lo + 1
    if not v.size or n_levels > K or K * max(abs(lo), abs(hi) + 1) >= 2.0 ** 53:
        return _SortedRows(v)
    counts = _level_counts(v, int(lo), int(n_levels))
    return _SortedRows(v) if counts is None else _LevelRows(counts, int(lo))


def _level_counts(v: np.ndarray, lo: int, n_levels: int) -> np.ndarray | None:
    """Per row, how many values equal each of ``lo .. lo + n_levels - 1`` (values known to lie there); ``None``
    if some value is no integer."""
    if kernels.wanted(v.size):
        return kernels.level_counts(v, lo, n_levels)
    levels = v.astype(np.int64)
    if not np.array_equal(levels, v):
        return None
    rows = v.shape[0]
    levels -= lo
    levels += (np.arange(rows) * n_levels)[:, None]  # one bin per (row, value)
    return np.bincount(levels.ravel(), minlength=rows * n_levels).reshape(rows, n_levels)


def _ray_root(s: _SortedRows | _LevelRows, du: float, dl: float, target: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Smallest mu >= 0 with ``G(mu) = du Pm(mu du) - dl Nm(mu dl) <= target`` (rows in ``active``).

    G is continuous, non-increasing and piecewise linear (slope ``-(du^2 #P + dl^2 #N)``).
    Newton steps on the current linear piece, interleaved with bisection, keep a bracket
    ``G(a) > target >= G(b)``; a Newton point on the same piece as ``a`` is the exact root.
    Rows that do not settle on a piece end at ``b``, the feasible side of the bracket.
    """

    def evaluate(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pm, kp = s.upper(mu * du)
        nm, kn = s.lower(mu * dl)
        return du * pm - dl * nm, kp, kn

    rows = s.rows
    a, b = np.zeros(rows), np.ones(rows)
    for _ in range(2100):  # doubling up to the float range
        g_b = evaluate(b)[0]
        grow = active & (g_b > target)
        if not grow.any():
            break
        a, b = np.where(grow, b, a), np.where(grow, 2 * b, b)
    g_a, kp_a, kn_a = evaluate(a)
    done = ~active | (g_a <= target)
    mu = np.where(done, 0.0, b)
    for step in range(400):
        if done.all():
            break
        slope = du * du * kp_a + dl * dl * kn_a
        newton = a + (g_a - target) / np.where(slope > 0, slope, np.inf)
        use_newton = (step % 2 == 0) & (newton > a) & (newton < b)
        m = np.where(use_newton, newton, 0.5 * (a + b))
        g_m, kp_m, kn_m = evaluate(m)
        hit = ~done & ((g_m == target) | (use_newton & (kp_m == kp_a) & (kn_m == kn_a)))
        mu = np.where(hit, m, mu)
        done |= hit
        above = g_m > target
        a = np.where(above, m, a)
        b = np.where(above, b, m)
        g_a = np.where(above, g_m, g_a)
        kp_a, kn_a = np.where(above, kp_m, kp_a), np.where(above, kn_m, kn_a)
        collapsed = ~done & (b - a <= 4 * np.finfo(float).eps * np.maximum(b, 1e-300))
        mu = np.where(collapsed, b, mu)
        done |= collapsed
    return np.where(done, mu, b)


def _accumulator_extremes(w: np.ndarray, x: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """Float ``(acc_min, acc_max)`` of real rows (the exact integer version is in bounds)."""
    if w.dtype == np.float64 and w.flags.c_contiguous and kernels.wanted(w.size):
        return kernels.accumulator_extremes(w, x.lo, x.hi)  # numpy sums C-ordered rows pairwise: the kernel too
    pos = np.maximum(w, 0.0).sum(axis=1)
    neg = pos - w.sum(axis=1)
    return x.lo * pos - x.hi * neg, x.hi * pos - x.lo * neg


def project_accumulator_range(v: np.ndarray, x: IntRange, acc_min: float, acc_max: float) -> np.ndarray:
    """Euclidean projection of each row onto ``{w : acc_min <= sum_i w_i x_i <= acc_max for all x in [lo, hi]^K}``.

    With ``P``/``N`` the positive / |negative| mass of ``w``, the constraint is
    ``hi P - lo N <= acc_max`` (c1) and ``lo P - hi N >= acc_min`` (c2); both are convex in
    ``w``. From the KKT conditions the projection is ``w = v - clip(v, L, U)`` (the zone
    ``[L, U]`` collapses to 0, values above / below shift by U / L) with
    ``(U, L) = mu (hi, lo) + nu (-lo, -hi)``, ``mu, nu >= 0``. The code tries c1 alone
    (ray ``nu = 0``), c2 alone (``mu = 0``), and otherwise makes both tight: the 2x2 linear
    system gives the masses and the sorted rows give U and L exactly. For inputs containing
    0 the zone contains 0, so this only shrinks weights toward zero (for unsigned inputs
    the positive and negative parts decouple; for a symmetric range it is the l1 ball).
    Needs ``acc_min <= 0 <= acc_max`` (w = 0 feasible). The result is within float
    rounding of the exact projection and is scaled toward 0 if rounding left it outside.
    """
    if not acc_min <= 0 <= acc_max:
        raise ValueError(f"accumulator limits [{acc_min}, {acc_max}] must contain 0")
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    lo, hi = float(x.lo), float(x.hi)
    A, B = float(acc_max), float(acc_min)
    rows = v.shape[0]
    if rows == 0 or v.shape[1] == 0:
        return v.copy()
    tol = 1e-12 * (abs(A) + abs(B) + 1.0)
    c2_min, c1_max = _accumulator_extremes(v, x)
    viol1, viol2 = c1_max > A + tol, c2_min < B - tol
    need = viol1 | viol2
    if not need.any():
        return v.copy()
    s = _rows_by_value(v[need])
    viol1, viol2 = viol1[need], viol2[need]

    def extremes_at(U: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pm, nm = s.upper(U)[0], s.lower(L)[0]
        return lo * pm - hi * nm, hi * pm - lo * nm

    mu = _ray_root(s, hi, lo, np.full(s.rows, A), viol1)
    U1, L1 = mu * hi, mu * lo
    ok1 = viol1 & (extremes_at(U1, L1)[0] >= B - tol)
    nu = _ray_root(s, -lo, -hi, np.full(s.rows, -B), viol2 & ~ok1)
    U2, L2 = -nu * lo, -nu * hi
    ok2 = ~ok1 & viol2 & (extremes_at(U2, L2)[1] <= A + tol)
    both = ~ok1 & ~ok2
    det = hi * hi - lo * lo
    if det == 0:  # |lo| = |hi|: parallel constraints, the violated one alone is the answer (up to float noise)
        ok1, ok2 = ok1 | (both & viol1), ok2 | (both & ~viol1)
        both[:] = False
    Ub, Lb = np.zeros(s.rows), np.zeros(s.rows)
    if both.any():
        pos_mass = (A * hi - lo * B) / det
        neg_mass = (lo * A - hi * B) / det
        Ub, Lb = s.upper_threshold(np.full(s.rows, pos_mass)), s.lower_threshold(np.full(s.rows, neg_mass))
    U_need = np.where(ok1, U1, np.where(ok2, U2, Ub))
    L_need = np.where(ok1, L1, np.where(ok2, L2, Lb))
    U, L = np.zeros(rows), np.zeros(rows)
    U[need], L[need] = U_need, L_need
    if kernels.wanted(v.size):
        w = kernels.shrink_rows(v, L, U)
    else:
        w = np.clip(v, L[:, None], np.maximum(L, U)[:, None])
        np.subtract(v, w, out=w)
    # Float rounding can leave w a hair outside; C is convex and contains 0, so scaling fixes it.
    c2w, c1w = _accumulator_extremes(w, x)
    scale = np.minimum(1.0, np.minimum(np.where(c1w > A, A / np.where(c1w > 0, c1w, 1), 1.0),
                                       np.where(c2w < B, B / np.where(c2w < 0, c2w, -1), 1.0)))
    if (scale < 1.0).any():  # rare: the other rows are left as they are (times 1)
        w *= scale[:, None]
    return w


# ----------------------------------------------------------------------------- integer rounding


@dataclass
class _RoundUpCandidates:
    """A real row ``w`` as its truncation plus the optional unit round-ups (away from zero).

    Rounding up weight i moves ``|q_i|`` from ``floor|w_i|`` to ``ceil|w_i|`` and lowers the
    squared error by ``benefit_i = 2 frac_i - 1``. Candidates are sorted by benefit,
    positive weights first: sorted positions ``[0, n_pos)`` hold the positive ones and
    ``[n_pos, n_pos + n_neg)`` the negative ones; ``gain`` holds prefix sums of benefits.
    """

    trunc: np.ndarray
    order: np.ndarray
    gain: np.ndarray  # (rows, most candidates in a row + 1)
    n_pos: np.ndarray
    n_neg: np.ndarray
    n_neg_beneficial: np.ndarray

    @classmethod
    def of(cls, w: np.ndarray) -> "_RoundUpCandidates":
        if kernels.wanted(w.size):  # the same arrays (order: only its first `width` columns, all that is read)
            return cls(*kernels.round_up_candidates(w))
        # in-place passes over preallocated arrays: a block of rows is passed over some ten times here
        trunc = np.trunc(w)
        benefit = np.subtract(w, trunc)
        np.abs(benefit, out=benefit)
        benefit *= 2.0
        benefit -= 1.0  # exactly -1 where w is an integer: no round-up to choose there
        candidate = np.greater(benefit, -1.0)
        positive_w = np.greater(w, 0)
        positive = np.logical_and(positive_w, candidate)
        n_pos = np.count_nonzero(positive, axis=1)
        # Sort key: positive candidates in (3, 5), negative ones in (-1, 1), the rest last.
        key = np.add(benefit, 4.0, where=positive, out=benefit.copy())
        np.copyto(key, -8.0, where=~candidate)
        np.negative(key, out=key)
        # stable: ties (common: a uniform threshold leaves every weight the same fraction) go in index order on
        # every CPU; numpy's default (SIMD) sort orders equal keys by its own rules, so outputs differed by machine
        order = np.argsort(key, axis=1, kind="stable")
        n_candidates = np.count_nonzero(candidate, axis=1)
        # gain is read up to n_pos + n_neg only: the candidates, sorted first (most weights of a projected row are 0)
        width = int(n_candidates.max(initial=0))
        gain = np.zeros((w.shape[0], width + 1))
        np.cumsum(np.take_along_axis(benefit, order[:, :width], axis=1), axis=1, out=gain[:, 1:])
        return cls(trunc.astype(np.int64), order, gain, n_pos, n_candidates - n_pos,
                   np.count_nonzero((benefit > 0) & ~positive_w, axis=1))

    def choose(self, a_max: np.ndarray,
               b_bounds: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best ``(a, b)``: round up the a best positive and b best negative candidates.

        ``b_bounds(a)`` gives, for the grid ``a = 0..max(a_max)`` (shape (rows, n)), the allowed
        ``[b_min, b_max]`` and a feasibility mask. Returns ``(a, b, ok)``; ``ok`` is False
        where no choice is allowed.
        """
        rows = self.trunc.shape[0]
        a_max = np.minimum(a_max, self.n_pos)
        a = np.broadcast_to(np.arange(max(int(a_max.max(initial=-1)), 0) + 1), (rows, max(int(a_max.max(initial=-1)), 0) + 1))
        b_min, b_max, feasible = b_bounds(a)
        b_min, b_max = np.maximum(b_min, 0), np.minimum(b_max, self.n_neg[:, None])
        feasible = feasible & (a <= a_max[:, None]) & (b_min <= b_max)
        b = np.clip(self.n_neg_beneficial[:, None], b_min, np.maximum(b_min, b_max))  # the gain is concave in b
        start = self.n_pos[:, None]
        value = (np.take_along_axis(self.gain, a, axis=1) + np.take_along_axis(self.gain, np.minimum(start + b, self.gain.shape[1] - 1), axis=1)
                 - np.take_along_axis(self.gain, start, axis=1))
        best = np.argmax(np.where(feasible, value, -np.inf), axis=1)
        r = np.arange(rows)
        return a[r, best], b[r, best], feasible[r, best]

    def apply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The truncation with the first ``a`` positive and ``b`` negative candidates (sorted order) rounded up.

        Only the chosen positions are visited (few: most weights of a projected row are 0, no candidate). A row
        without a valid choice (``ok`` False from :meth:`choose`, discarded by every caller) may ask for more
        round-ups than it has candidates: it gets all of them.
        """
        q = self.trunc.copy()
        for count, start, step in ((np.minimum(a, self.n_pos), 0, 1), (np.minimum(b, self.n_neg), self.n_pos, -1)):
            count = np.asarray(count, dtype=np.int64)
            rows = np.repeat(np.arange(count.size), count)
            # sorted positions start, start + 1, ..., start + count - 1 of each row
            first = np.cumsum(count) - count
            positions = np.arange(rows.size) - np.repeat(first, count) + np.broadcast_to(start, count.shape)[rows]
            q[rows, self.order[rows, positions]] += step
        return q


def _slack(limit: int, value: np.ndarray, cap: int, upper: bool) -> np.ndarray:
    """``limit - value`` (or ``value - limit``) exactly, clipped to ``[-cap, cap]`` as int64."""
    value = np.asarray(value).astype(object)
    diff = (limit - value) if upper else (value - limit)
    return np.clip(diff, -cap, cap).astype(np.int64)


def _round_rows_within(w: np.ndarray, x: IntRange, acc_min: int, acc_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer rows near ``w`` (each weight ``floor`` or ``ceil`` of it) inside the accumulator limits.

    Starting from truncation toward zero, choose how many positive (a) and negative (b)
    weights to round up: a positive round-up moves ``(acc_max, acc_min)`` by ``(hi, lo)``,
    a negative one by ``(-lo, -hi)``. For each a the best b is the unconstrained best
    clamped into its allowed interval (the gain is concave); the best a wins. All the
    feasibility arithmetic is exact integers. Returns ``(q, ok)``.
    """
    cand = _RoundUpCandidates.of(w)
    lo, hi = x.lo, x.hi
    cap = (w.shape[1] + 1) * (abs(lo) + abs(hi) + 1)
    low_min, low_max = integer_row_ranges(cand.trunc, x)
    slack_max = _slack(acc_max, low_max, cap, upper=True)
    slack_min = _slack(acc_min, low_min, cap, upper=False)
    # c1: hi a - lo b <= slack_max ; c2: -lo a + hi b <= slack_min
    constraints = ((hi, -lo, slack_max), (-lo, hi, slack_min))
    a_max = cand.n_pos.copy()
    for ca, cb, slack in constraints:
        if ca > 0 and cb >= 0:
            a_max = np.minimum(a_max, slack // ca)

    def b_bounds(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b_min = np.zeros(a.shape, dtype=np.int64)
        b_max = np.broadcast_to(cand.n_neg[:, None], a.shape).copy()
        feasible = np.ones(a.shape, dtype=bool)
        for ca, cb, slack in constraints:
            rhs = slack[:, None] - ca * a
            if cb > 0:
                b_max = np.minimum(b_max, rhs // cb)
            elif cb < 0:
                b_min = np.maximum(b_min, -(rhs // -cb))
            else:
                feasible &= rhs >= 0
        return b_min, b_max, feasible

    a, b, ok = cand.choose(a_max, b_bounds)
    return cand.apply(a, b), ok


def _round_within(w: np.ndarray, x: IntRange, acc_min: int, acc_max: int) -> np.ndarray:
    """:func:`_round_rows_within` for every row; a row with no valid rounding is scaled toward 0 and retried.

    The real feasible set is convex and contains 0, so halving keeps ``w`` feasible, and once
    every ``|w_i| < 1`` the all-truncated row (zeros) is valid: the loop always ends.
    """
    q, ok = _round_rows_within(w, x, acc_min, acc_max)  # rows are rounded independently: all at once first
    pending = np.flatnonzero(~ok)
    w = w[pending]  # a copy of the rows still without a rounding (``w`` itself is left as it is)
    while pending.size:
        w *= 0.5
        q_p, ok = _round_rows_within(w, x, acc_min, acc_max)
        q[pending[ok]] = q_p[ok]
        pending, w = pending[~ok], w[~ok]
    return q


# ----------------------------------------------------------------------------- methods

Limits = tuple[int, int]


def _run(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange, name: str,
         project_rows: Callable[[np.ndarray, Limits], tuple[np.ndarray, np.ndarray | str]]) -> ProjectionResult:
    """Plain-round, project the rows outside the layer's accumulator range (in blocks), verify.

    ``project_rows(v_block, limits)`` returns integer rows and the per-row method name. A
    row still outside the range afterwards is redone with ``exact``, which is feasible by
    construction; if even that fails it is a bug and raises.
    """
    v = _as_rows(v, keep_integers=True)  # integer rows (stored codes) become float64 a block at a time, below
    q = plain_round(v, weight_range)
    acc_min, acc_max = integer_row_ranges(q, x)
    signed = bool((acc_min < 0).any())  # as accumulator_is_signed, reusing the range
    valid = not isinstance(acc_bits, bool) and isinstance(acc_bits, (int, np.integer)) \
        and MIN_ACC_BITS <= acc_bits <= MAX_ACC_BITS
    limits = bounds.accumulator_limits(int(acc_bits), signed=signed) if valid else (0, 0)
    touched = ~np.asarray((acc_min >= limits[0]) & (acc_max <= limits[1]), dtype=bool)
    try:
        check_target(x, acc_bits, weight_range, signed)
    except InfeasibleTarget:
        if not valid or touched.any():  # rows that already fit need no +-1 weight to (a layer of zero weights)
            raise
    row_method = np.full(v.shape[0], ROUND, dtype=object)
    idx, step = np.flatnonzero(touched), rows_per_block(v.shape[1])

    def project_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray | str, np.ndarray]:
        q_block, methods = project_rows(np.asarray(v[block], dtype=np.float64), limits)
        return q_block, methods, block[~rows_within(q_block, x, limits)]  # checked while the block is in cache

    outside = []  # per block, the projected rows still outside the limits
    blocks = [idx[start:start + step] for start in range(0, idx.size, step)]
    for block, (q_block, methods, block_outside) in zip(blocks, in_order(project_block, blocks)):
        row_method[block] = methods
        _store(q, block, q_block, weight_range, name)
        outside.append(block_outside)
    over = np.concatenate(outside) if outside else idx
    if over.size:
        _store(q, over, _exact_rows(q[over].astype(np.float64), x, limits, weight_range), weight_range, "exact")
        row_method[over] = "exact"
        if not rows_within(q[over], x, limits).all():
            raise RuntimeError(f"internal error: projection method {name!r} left rows "
                               f"{over.tolist()} outside a {acc_bits}-bit accumulator")
    return ProjectionResult(q, touched, row_method.astype(str), limits)


def _store(q: np.ndarray, rows: np.ndarray, q_rows: np.ndarray, weight_range: IntRange, name: str) -> None:
    """``q[rows] = q_rows`` after checking ``q_rows`` lies in ``weight_range``: ``q``'s narrow type would wrap a value
    outside it around to one inside, which the contract check (:func:`methods.project_weights`) could not see."""
    if q_rows.size and (int(q_rows.min()) < weight_range.lo or int(q_rows.max()) > weight_range.hi):
        raise RuntimeError(f"internal error: projection method {name!r} left weights outside "
                           f"[{weight_range.lo}, {weight_range.hi}]")
    q[rows] = q_rows


def project_a2q(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange) -> ProjectionResult:
    """A2Q: project onto the l1 ball ``||q||_1 <= (2^(P-1) - 1) 2^(signed(x) - N)``, round toward zero.

    ``(N, signed)`` is :func:`bounds.integer_format` of ``x``: the narrowest N-bit integer
    type holding the range (e.g. ``[-10, 245]`` -> signed, 9 bits). The clipped weights are
    projected (the ball holds 0, so the result stays inside ``weight_range``).
    """
    def rows(v_block: np.ndarray, limits: Limits) -> tuple[np.ndarray, str]:
        radius = bounds.max_l1_norm(acc_bits, *bounds.integer_format(x))
        w = project_l1_ball(np.clip(v_block, weight_range.lo, weight_range.hi), radius)
        return np.trunc(w).astype(np.int64), "a2q"

    return _run(v, x, acc_bits, weight_range, "a2q", rows)


def project_a2q_plus(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange) -> ProjectionResult:
    """A2Q+: zero-sum rows with ``||q||_1 <= (2^P - 2) / (hi - lo)``; other rows fall back to ``exact``.

    Each clipped row is zero-centred and projected onto ``{sum w = 0, ||w||_1 <= T}``: for a
    zero-sum vector that is the pair of budgets ``pos, neg <= T / 2``, whose projection keeps
    the two masses equal, so it is the exact Euclidean projection onto that set. The integer
    row rounds each weight down or up (toward / away from zero) so that both masses reach the
    same value ``m <= floor(T / 2)`` with the largest error reduction. Rows fall back to
    ``exact`` (reported as ``"exact"``) where no such rounding exists (clipping to
    ``weight_range`` broke the zero sum, e.g. unsigned weights), where it leaves only zeros,
    and in layers with an unsigned accumulator (a non-zero zero-sum row reaches below 0) or a
    constant input (no zero-centred bound).
    """
    def rows(v_block: np.ndarray, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
        if x.hi == x.lo or limits[0] == 0:
            return _exact_rows(v_block, x, limits, weight_range), np.full(v_block.shape[0], "exact", dtype=object)
        radius = bounds.max_l1_norm_zero_centered(acc_bits, x)
        clipped = np.clip(v_block, weight_range.lo, weight_range.hi)
        centred = clipped - clipped.mean(axis=1, keepdims=True)
        w = project_accumulator_range(centred, bounds.BINARY, -radius / 2, radius / 2)
        w = np.clip(w, weight_range.lo, weight_range.hi)
        cand = _RoundUpCandidates.of(w)
        pos_low = np.where(cand.trunc > 0, cand.trunc, 0).sum(axis=1)
        neg_low = -np.where(cand.trunc < 0, cand.trunc, 0).sum(axis=1)

        def b_bounds(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            b = a + (pos_low - neg_low)[:, None]  # equal masses: sum q = 0
            return b, b, np.ones(a.shape, dtype=bool)

        a, b, ok = cand.choose(radius // 2 - pos_low, b_bounds)
        q = cand.apply(a, b)
        ok &= (q.sum(axis=1) == 0) & (q != 0).any(axis=1)
        if not ok.all():
            q[~ok] = _exact_rows(v_block[~ok], x, limits, weight_range)
        return q, np.where(ok, "a2q+", "exact").astype(object)

    return _run(v, x, acc_bits, weight_range, "a2q+", rows)


def _exact_rows(v_block: np.ndarray, x: IntRange, limits: Limits, weight_range: IntRange) -> np.ndarray:
    """The ``exact`` method on a block of rows (no plain-rounding shortcut)."""
    w = project_accumulator_range(np.clip(v_block, weight_range.lo, weight_range.hi), x, *limits)
    if not x.lo <= 0 <= x.hi:  # only then can the projection leave weight_range
        w = np.clip(w, weight_range.lo, weight_range.hi)
    return _round_within(w, x, *limits)


def project_exact(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange) -> ProjectionResult:
    """Project onto the exact accumulator range itself, then round using the room it leaves.

    The layer's accumulator is ``INT P`` (``UINT P`` if every plain-rounded row is
    non-negative, as FINN would choose). Computes the Euclidean projection of each clipped
    row onto ``limits[0] <= acc_min`` and ``acc_max <= limits[1]``
    (:func:`project_accumulator_range`: exact for input ranges holding 0, where it never
    leaves ``weight_range``; for ranges on one side of 0 it ignores ``weight_range`` and is
    clipped afterwards, a feasible near-projection), then picks for every weight ``floor`` or
    ``ceil`` of its magnitude so that the integer row fits and the squared error is the
    smallest among such roundings. Rows with no valid rounding (possible only off-zero
    input ranges) are scaled toward 0 until one exists.
    """
    return _run(v, x, acc_bits, weight_range, "exact",
                lambda v_block, limits: (_exact_rows(v_block, x, limits, weight_range), "exact"))


# ----------------------------------------------------------------------------- parts and stages

# project(v, x, acc_bits, weight_range) -> ProjectionResult: a method with its contract checked (methods.project_weights)
Project = Callable[[np.ndarray, IntRange, int, IntRange], ProjectionResult]
# rows of v, columns of v, and the integer range the weights there may hold
Part = tuple[np.ndarray, slice, IntRange]


def project_in_parts(v: np.ndarray, x: IntRange, acc_bits: int, parts: list[Part], project: Project,
                     signed: bool | None = None) -> ProjectionResult:
    """Project each part of ``v`` (a block of rows and columns, each its own accumulation) to ``acc_bits`` on its own.

    The parts must cover ``v``. The layer has one INT/UINT accumulator type (signed when some part's plain
    rounding reaches below 0, or as ``signed`` says): a part whose rows never go below 0 in a signed layer
    must fit INT P's non-negative half, which is exactly UINT (P - 1).
    """
    v = _as_rows(v)
    plain = [plain_round(v[rows][:, cols], weight_range) for rows, cols, weight_range in parts]
    if signed is None:
        signed = any(accumulator_is_signed(p, x) for p in plain)
    # every part's weights are checked inside its range (project_weights): their common narrow type holds them all
    weights = np.zeros(v.shape, dtype=np.result_type(np.int8, *(weight_dtype(wr) for _, _, wr in parts)))
    touched = np.zeros(v.shape[0], dtype=bool)
    row_method = np.full(v.shape[0], ROUND, dtype=object)
    for (rows, cols, weight_range), part_plain in zip(parts, plain):
        bits = acc_bits - 1 if signed and not accumulator_is_signed(part_plain, x) else acc_bits
        result = project(v[rows][:, cols], x, bits, weight_range)
        weights[rows, cols] = result.weights
        touched[rows] |= result.touched
        row_method[rows] = np.where(result.touched, result.row_method, row_method[rows])
    return ProjectionResult(weights, touched, row_method.astype(str), bounds.accumulator_limits(acc_bits, signed))


def _stage_limits(q: np.ndarray, x: IntRange, bits: int) -> tuple[int, int]:
    return bounds.accumulator_limits(bits, signed=accumulator_is_signed(q, x))


def project_multistage(v: np.ndarray, x: IntRange, groups: list[tuple[np.ndarray, IntRange]], tile: int,
                       inner_bits: int, outer_bits: int | None, project: Project) -> ProjectionResult:
    """Fit a multi-stage (tiled) datapath: each K-tile of ``tile`` terms to ``inner_bits``, their sum to ``outer_bits``.

    ``groups``: rows and the weight range they may hold (one group unless weight zero points differ per
    channel). Without ``outer_bits`` only the tiles are constrained (the outer width is then whatever
    the projected tiles need). With it, the whole rows are projected to the outer budget first, and each
    tile of that integer result is projected to the inner budget.

    Why the order is sound (input codes ``[lo, hi]`` with ``lo <= 0 <= hi``, required here):

    1. Every term ``q x`` then ranges over ``[min(q lo, q hi), max(q lo, q hi)]``, an interval holding 0
       whose ends grow in ``|q|`` (for a fixed sign of q). So a sum of terms has extremes that only move
       away from 0 when some ``|q_i|`` grows, and only toward 0 (or stay) when weights shrink toward 0.
    2. Because every term's interval holds 0, the extremes of the partial sums within a tile are those of
       the tile's full sum, and the extremes of the running sums of tile results are those of the whole
       row: constraining tile sums and row sums constrains every register of the datapath.
    3. The ``exact`` and ``a2q`` projections of an integer row only shrink weights toward 0 (the constraint
       set is closed under shrinking magnitudes, so the Euclidean projection never grows ``|q_i|`` or flips
       a sign; rounding then picks ``floor``/``ceil`` of a magnitude at most the integer ``|q_i|``), so by 1.
       projecting the tiles of a row that fits the outer budget keeps it inside that budget.

    Methods without property 3 (``a2q+`` zero-centres, plugins may do anything) are checked: a row whose
    outer range no longer fits has its tiles projected again with ``exact`` from the outer-stage row.
    Both stages are checked exactly before returning; a failure is a bug and raises.
    """
    if not x.lo <= 0 <= x.hi:
        raise A2QError(f"a multi-stage projection needs input codes that include 0 (the layer's are [{x.lo}, {x.hi}]): "
                       "then every partial sum's extremes are those of its tile's or row's full sum")
    if tile < 1:
        raise A2QError(f"--tile must be at least 1 term, got {tile}")
    v = _as_rows(v)
    K = v.shape[1]
    whole_rows = [(rows, slice(None), weight_range) for rows, weight_range in groups]
    tiles = [(rows, slice(s, s + tile), weight_range) for s in range(0, K, tile) for rows, weight_range in groups]
    start = v
    if outer_bits is not None:
        outer = project_in_parts(v, x, outer_bits, whole_rows, project)
        start = outer.weights.astype(np.float64)
    inner = project_in_parts(start, x, inner_bits, tiles, project)
    q, touched, row_method = inner.weights, inner.touched, inner.row_method.astype(object)
    signed = inner.acc_limits[0] < 0  # the inner accumulator type the tiles were projected for
    if outer_bits is not None:
        touched |= outer.touched
        row_method = np.where(inner.touched, row_method, outer.row_method).astype(object)
        over = np.flatnonzero(~rows_within(q, x, _stage_limits(outer.weights, x, outer_bits)))
        if over.size:  # a method that is not magnitude-shrinking grew a row past the outer budget: redo its tiles
            redo = [(np.flatnonzero(np.isin(over, rows)), cols, weight_range) for rows, cols, weight_range in tiles]
            q[over] = project_in_parts(start[over], x, inner_bits, [p for p in redo if p[0].size], project_exact,
                                       signed=signed).weights
            row_method[over] = "exact"
    inner_min, inner_max, outer_min, outer_max = bounds.tile_stage_ranges(q, x, tile)
    inner_range = (int(np.min(inner_min, initial=0)), int(np.max(inner_max, initial=0)))
    outer_range = (int(np.min(outer_min, initial=0)), int(np.max(outer_max, initial=0)))
    if not bounds.fits(*inner_range, inner_bits) or (outer_bits is not None and not bounds.fits(*outer_range, outer_bits)):
        raise RuntimeError(f"internal error: multi-stage projection left tiles in {inner_range} (asked {inner_bits} "
                           f"bits) and running sums in {outer_range} (asked {outer_bits} bits)")
    return ProjectionResult(q, touched, row_method.astype(str), bounds.accumulator_limits(inner_bits, signed))
