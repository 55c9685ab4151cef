"""Accumulator bounds for one quantized MAC layer: pure numpy and Python ints, no ONNX.

Every layer is seen in its integer view: per output channel ``acc = sum_i q_i * x_i`` with
integer weights ``q`` (a ``(channels, K)`` array) and integer input codes ``x`` inside an
:class:`IntRange`. Scales and bias stay outside the accumulator (bias is added after it in
FINN and Brevitas), so none of the bounds here includes a bias.

All widths are computed with integer arithmetic (``int.bit_length`` and exact shifts):
FINN once sized an accumulator with float32 ``log2`` and got 32 bits where 33 were needed.

Accumulator convention (the one FINN uses): a range with ``acc_min >= 0`` lives in an
unsigned ``UINT P`` accumulator, anything else in two's-complement ``INT P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Products above this magnitude switch to Python ints (object arrays) so nothing wraps.
_INT64_SAFE = 1 << 62


@dataclass(frozen=True)
class IntRange:
    """The closed integer interval ``[lo, hi]`` an input code can take."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"empty integer range [{self.lo}, {self.hi}]")

    @property
    def signed(self) -> bool:
        return self.lo < 0

    @property
    def magnitude(self) -> int:
        """Largest ``|x|`` in the range."""
        return max(abs(self.lo), abs(self.hi))

    def shifted(self, offset: int) -> "IntRange":
        """The range of ``x - offset`` (an integer kernel that subtracts a zero point)."""
        return IntRange(self.lo - offset, self.hi - offset)


def integer_range(bitwidth: int, signed: bool, narrow: bool = False) -> IntRange:
    """Range of an ``bitwidth``-bit integer code (the ``Quant`` op's ``min_int``/``max_int``)."""
    if bitwidth < 1:
        raise ValueError(f"bit width must be >= 1, got {bitwidth}")
    if signed:
        lo, hi = -(1 << (bitwidth - 1)), (1 << (bitwidth - 1)) - 1
        if narrow:
            lo += 1
    else:
        lo, hi = 0, (1 << bitwidth) - 1
        if narrow:
            hi -= 1
    return IntRange(lo, hi)


BIPOLAR = IntRange(-1, 1)  # {-1, +1}: the extremes of a linear form over it equal the box's
BINARY = IntRange(0, 1)


def ceil_log2(n: np.ndarray | int) -> np.ndarray | int:
    """Exact ``ceil(log2(n))`` for integers ``n >= 1`` (scalar or array, int64 or object)."""
    if isinstance(n, (int, np.integer)):
        n = int(n)
        if n < 1:
            raise ValueError(f"ceil_log2 needs n >= 1, got {n}")
        return (n - 1).bit_length()
    arr = np.asarray(n)
    if arr.size and (arr < 1).any():
        raise ValueError("ceil_log2 needs every n >= 1")
    if arr.dtype == object:
        return np.array([(int(v) - 1).bit_length() for v in arr.ravel()], dtype=np.int64).reshape(arr.shape)
    m = arr.astype(np.int64) - 1
    if not m.size or m.max() < 1 << 53:
        # every such m is exact in float64, where frexp's exponent is its bit length (0 for 0): one pass, not 25
        return np.frexp(m.astype(np.float64))[1].astype(np.int64)
    bits = np.zeros(m.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):  # vectorised bit_length by binary search
        big = m >= (np.int64(1) << shift)
        m = np.where(big, m >> shift, m)
        bits += np.where(big, shift, 0)
    return bits + (m > 0)


def signed_width_for_magnitude(magnitude: np.ndarray | int) -> np.ndarray | int:
    """Smallest P with ``magnitude <= 2^(P-1) - 1``: the paper's ``ceil(alpha + phi(alpha) + 1)``.

    ``alpha + phi(alpha) = log2(2^alpha + 1)`` with ``2^alpha = magnitude``, so the float
    formula reduces to ``ceil_log2(magnitude + 1) + 1``, computed here exactly.
    """
    return ceil_log2(_plus(magnitude, 1)) + 1


def _plus(a: np.ndarray | int, b: int) -> np.ndarray | int:
    return a + b if isinstance(a, (int, np.integer)) else np.asarray(a) + b


def integer_format(r: IntRange) -> tuple[int, bool]:
    """``(N, signed)`` of the narrowest N-bit integer type holding ``r`` (the paper's N and signed(x)).

    Any range inside an N-bit type has ``max|x| <= 2^(N - signed)``, which is all the
    data-type and l1 bounds rely on, so they stay safe for zero-point-shifted ranges too.
    """
    if r.lo >= 0:
        return max(r.hi.bit_length(), 1), False
    return max((-r.lo - 1).bit_length(), r.hi.bit_length()) + 1, True


def _input_magnitude_exponent(input_bits: int, input_signed: bool) -> int:
    # A2Q writes max|x| as 2^(N - signed(x)): 2^(N-1) for signed inputs, 2^N > 2^N - 1 for unsigned.
    return input_bits - int(input_signed)


def datatype_bound_bits(K: int, input_bits: int, input_signed: bool, weight_bits: int, weight_signed: bool = True) -> int:
    """Data-type bound (A2Q): ``alpha = log2(K) + N + M - 1 - signed(x)``; depends on widths only.

    The paper assumes signed weights (``max|q| = 2^(M-1)``); unsigned weights get ``2^M``.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    shift = _input_magnitude_exponent(input_bits, input_signed) + _input_magnitude_exponent(weight_bits, weight_signed)
    return signed_width_for_magnitude(int(K) << shift)


def l1_bound_bits(l1_norm: np.ndarray | int, input_bits: int, input_signed: bool) -> np.ndarray | int:
    """A2Q l1-norm bound: ``alpha = log2(||q||_1) + N - signed(x)``, per channel."""
    shift = _input_magnitude_exponent(input_bits, input_signed)
    if isinstance(l1_norm, (int, np.integer)):
        return signed_width_for_magnitude(int(l1_norm) << shift)
    return signed_width_for_magnitude(_scale_exact(np.asarray(l1_norm), 1 << shift))


def max_l1_norm(acc_bits: int, input_bits: int, input_signed: bool) -> int:
    """Inverse of :func:`l1_bound_bits`: the largest integer l1 norm that fits ``acc_bits``.

    ``||q||_1 <= (2^(P-1) - 1) * 2^(signed(x) - N)``, floored to an integer.
    """
    _check_acc_bits(acc_bits)
    return ((1 << (acc_bits - 1)) - 1) >> _input_magnitude_exponent(input_bits, input_signed)


def zero_centered_bound_bits(l1_norm: np.ndarray | int, x: IntRange) -> np.ndarray | int:
    """A2Q+ bound for channels whose weights sum to zero: ``P = ceil(log2(||q||_1 (hi-lo) + 2))``.

    With ``sum q = 0`` the accumulator is ``sum q_i (x_i - c)`` for any c, so only the
    width of the input range matters, not its sign. Valid only for zero-sum channels.
    """
    span = x.hi - x.lo
    if isinstance(l1_norm, (int, np.integer)):
        return ceil_log2(int(l1_norm) * span + 2)
    return ceil_log2(_scale_exact(np.asarray(l1_norm), span) + 2)


def max_l1_norm_zero_centered(acc_bits: int, x: IntRange) -> int:
    """Inverse of :func:`zero_centered_bound_bits`: ``||q||_1 <= (2^P - 2) / (hi - lo)``."""
    _check_acc_bits(acc_bits)
    span = x.hi - x.lo
    if span == 0:
        raise ValueError("zero-centred bound needs a non-degenerate input range")
    return ((1 << acc_bits) - 2) // span


def _check_acc_bits(acc_bits: int) -> None:
    if not 1 <= acc_bits <= 64:
        raise ValueError(f"accumulator width must be between 1 and 64 bits, got {acc_bits}")


def as_integer_weights(q: np.ndarray) -> np.ndarray:
    """Weights as a 2-D int64 array ``(channels, K)``; rejects non-integer values."""
    arr = np.asarray(q)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"expected integer weights of shape (channels, K), got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError("weights are not integers")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"unsupported weight dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def narrowest_integers(q: np.ndarray) -> np.ndarray:
    """Integer array ``q`` in the narrowest integer type holding all its values; ``q`` itself where that type is no
    narrower than its own (an int8 array of -3..100 stays int8: numpy's smallest type for both ends is int16)."""
    if not q.size:
        return q
    narrowest = np.result_type(np.min_scalar_type(int(q.min())), np.min_scalar_type(int(q.max())))
    return q if narrowest.itemsize >= q.dtype.itemsize else q.astype(narrowest)


def smallest_signed_type(lo: int, hi: int) -> np.dtype:
    """The narrowest signed integer type (8 to 64 bits) holding ``[lo, hi]``."""
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise ValueError(f"[{lo}, {hi}] does not fit int64")


def positive_negative_sums(q: np.ndarray, block_bytes: int = 1 << 19,
                           compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the sum of positive weights and the sum of ``|negative|`` weights (int64).

    One pass over the weights in their own (stored) integer type, in memory order, a cache-sized
    block at a time: an int8 layer is never copied to a wider array, and rows stored as columns
    (the transposed view of a ``[K, channels]`` tensor) are summed down the stored rows rather than
    gathered across them. Types of up to 32 bits use :func:`_narrow_row_sums`; 64-bit integers
    (weights already widened by the caller) are summed in int64, which, for weights from storage
    types of at most 32 bits and K < 2^31 terms, cannot overflow. ``compiled``: 8-bit weights go to
    :mod:`a2q_passes.sum_kernels` (imports numba) instead, with the same results.
    """
    arr = np.asarray(q)
    if arr.dtype.kind not in "iu" or arr.ndim != 2:
        arr = as_integer_weights(arr)
    columns = stored_as_columns(arr)
    if columns or arr.dtype.itemsize <= 4:
        sums = None
        if compiled and arr.itemsize == 1:
            from a2q_passes.sum_kernels import magnitude_and_value_sums

            sums = magnitude_and_value_sums(arr)  # None where the kernels do not apply
        if sums is None:
            # rows stored as columns are summed down the stored rows, in memory order: gathering each row across
            # them is several times slower
            sums = _column_sums(arr.T, block_bytes) if columns else _narrow_row_sums(arr, block_bytes)
        l1, total = sums
        pos = (l1 + total) // 2  # sum |q| + sum q = 2 * (sum of the positive q)
        return pos, l1 - pos
    pos = np.empty(arr.shape[0], dtype=np.int64)
    total = np.empty(arr.shape[0], dtype=np.int64)
    step = max(1, block_bytes // max(arr.shape[1] * arr.itemsize, 1))
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        np.maximum(block, 0).sum(axis=1, dtype=np.int64, out=pos[start:start + step])
        block.sum(axis=1, dtype=np.int64, out=total[start:start + step])
    return pos, pos - total  # sum q = pos - neg


def stored_as_columns(a: np.ndarray) -> bool:
    """Whether a 2-D array is the transposed view of a C-ordered one: its rows are stored as columns, as the rows
    of MatMul weights ``[K, channels]`` are. Reading such rows one at a time strides across memory."""
    return a.ndim == 2 and a.T.flags.c_contiguous and not a.flags.c_contiguous


def _narrow_row_sums(arr: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sum |q|, sum q)`` per row of a 2-D array of integers of at most 32 bits, as int64.

    Rows stored as C-ordered rows (the caller sends rows stored as columns to :func:`_column_sums`):
    each block of rows is reduced in int32 when
    no row can reach 2^31 (both sums are at most K times the type's largest magnitude: an int8
    row of fewer than 2^24 terms), else in int64 (a 32-bit type then needs K < 2^32). ``|q|`` is
    taken in the weights' own type and read as the unsigned type of the same width: the one value
    whose ``abs`` wraps, the type's minimum (-128 for int8), reads as its magnitude (128) there.
    """
    rows, K = arr.shape
    signed = arr.dtype.kind == "i"
    info = np.iinfo(arr.dtype)
    acc = np.int32 if K * max(-int(info.min), int(info.max)) < 1 << 31 else np.int64
    magnitude_type = np.dtype(f"u{arr.itemsize}")
    l1, total = np.empty(rows, dtype=acc), np.empty(rows, dtype=acc)
    step = max(1, block_bytes // max(K * arr.itemsize, 1))
    for start in range(0, rows, step):
        block = arr[start:start + step]
        block.sum(axis=1, dtype=acc, out=total[start:start + step])
        if signed:
            np.abs(block).view(magnitude_type).sum(axis=1, dtype=acc, out=l1[start:start + step])
    total = total.astype(np.int64)
    return (l1.astype(np.int64) if signed else total), total


def _column_sums(stored: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sum |q|, sum q)`` down each column of a C-contiguous ``(K, columns)`` integer array, as int64.

    The stored rows are read in memory order, a slab at a time. A slab of 8- or 16-bit integers is
    widened to twice its width and summed down the slab in that type (numpy adds whole rows
    there, with no cast per element); a slab holds few enough rows that neither sum can leave the
    wider type (int8: at most 255 rows of magnitude <= 128 stay below 2^15). Wider types are summed
    with numpy's casting reduction into int64.
    """
    K, columns = stored.shape
    signed = stored.dtype.kind == "i"
    l1, total = np.zeros(columns, dtype=np.int64), np.zeros(columns, dtype=np.int64)
    if stored.itemsize > 2:
        step = max(1, block_bytes // max(columns * stored.itemsize, 1))
        for start in range(0, K, step):
            block = stored[start:start + step]
            total += block.sum(axis=0, dtype=np.int64)
            if signed:
                l1 += np.abs(block.astype(np.int64, copy=False)).sum(axis=0)
        return (l1 if signed else total), total
    info = np.iinfo(stored.dtype)
    wide = np.dtype(f"{stored.dtype.kind}{2 * stored.itemsize}")
    most_rows = int(np.iinfo(wide).max) // max(-int(info.min), int(info.max))
    step = max(1, min(most_rows, block_bytes // max(columns * wide.itemsize, 1)))
    slab = np.empty((min(step, K), columns), dtype=wide)
    partial = np.empty(columns, dtype=wide)
    for start in range(0, K, step):
        block = slab[:min(step, K - start)]
        np.copyto(block, stored[start:start + step])
        total += np.add.reduce(block, axis=0, out=partial)
        if signed:
            l1 += np.add.reduce(np.abs(block, out=block), axis=0, out=partial)
    return (l1 if signed else total), total


def exact_accumulator_range(q: np.ndarray, x: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel ``(acc_min, acc_max)`` of ``sum_i q_i x_i`` over the input box.

    ``acc_max = sum_i max(q_i lo, q_i hi) = hi * pos - lo * neg`` and
    ``acc_min = lo * pos - hi * neg`` (``pos``/``neg``: sums of positive / |negative| weights).
    Returned as int64 arrays, or object arrays of Python ints if int64 could overflow.
    """
    pos, neg = positive_negative_sums(q)
    return range_from_sums(pos, neg, x)


def product_range(a: IntRange, b: IntRange) -> IntRange:
    """Range of one product ``x * y`` with ``x`` in ``a`` and ``y`` in ``b``: its extremes are corner products.

    ``x * y`` is linear in each factor for the other fixed, so both extremes sit at corners of the box.
    """
    corners = (a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)
    return IntRange(min(corners), max(corners))


def act_x_act_range(K: int, a: IntRange, b: IntRange) -> tuple[int, int]:
    """Exact ``(acc_min, acc_max)`` of ``sum_{k<K} x_k * y_k`` for an activation x activation MatMul.

    Each output element of ``A @ B`` sums K products of distinct elements ``x_k = A[i, k]`` (codes
    in ``a``) and ``y_k = B[k, j]`` (codes in ``b``); every term ranges independently over
    :func:`product_range`, so the sum's extremes are ``K`` times the smallest and largest corner
    product, each reached by putting every ``x_k`` and every ``y_k`` on the same corner. (When both
    operands are views of one tensor, e.g. ``X @ X^T``, the terms are not independent: the range
    is then a safe bound, not necessarily reached.) Python ints: no width limit.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    p = product_range(a, b)
    return int(K) * p.lo, int(K) * p.hi


def range_from_sums(pos: np.ndarray, neg: np.ndarray, x: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """``(acc_min, acc_max)`` per row from :func:`positive_negative_sums` (see :func:`exact_accumulator_range`)."""
    big = max(int(pos.max(initial=0)), int(neg.max(initial=0))) * max(x.magnitude, 1) * 2
    if big >= _INT64_SAFE:
        pos, neg = pos.astype(object), neg.astype(object)
    acc_max = x.hi * pos - x.lo * neg
    acc_min = x.lo * pos - x.hi * neg
    return acc_min, acc_max


def _scale_exact(values: np.ndarray, factor: int) -> np.ndarray:
    values = values.astype(np.int64) if values.dtype != object else values
    if values.size and int(np.max(np.abs(values))) * factor >= _INT64_SAFE:
        values = values.astype(object)
    return values * factor


def signed_accumulator_width(acc_min: np.ndarray | int, acc_max: np.ndarray | int) -> np.ndarray | int:
    """Smallest two's-complement width holding ``[acc_min, acc_max]``."""
    if isinstance(acc_min, (int, np.integer)):
        return ceil_log2(max(-int(acc_min), int(acc_max) + 1, 1)) + 1
    need = np.maximum(np.maximum(-np.asarray(acc_min), np.asarray(acc_max) + 1), 1)
    return ceil_log2(need) + 1


def unsigned_accumulator_width(acc_max: np.ndarray | int) -> np.ndarray | int:
    """Smallest unsigned width holding ``[0, acc_max]`` (at least 1 bit)."""
    if isinstance(acc_max, (int, np.integer)):
        return max(ceil_log2(int(acc_max) + 1), 1)
    return np.maximum(ceil_log2(np.asarray(acc_max) + 1), 1)


def accumulator_width(acc_min: np.ndarray | int, acc_max: np.ndarray | int) -> np.ndarray | int:
    """Minimal accumulator width: ``UINT`` when ``acc_min >= 0`` (as FINN does), else ``INT``."""
    if isinstance(acc_min, (int, np.integer)):
        if acc_min >= 0:
            return unsigned_accumulator_width(acc_max)
        return signed_accumulator_width(acc_min, acc_max)
    acc_min, acc_max = np.asarray(acc_min), np.asarray(acc_max)
    # np.where evaluates both branches for every channel: a channel entirely below 0 (acc_max < 0)
    # takes the signed branch, but its unsigned width must still be computable, so clamp it at 0.
    unsigned = unsigned_accumulator_width(np.maximum(acc_max, 0))
    return np.where(acc_min >= 0, unsigned, signed_accumulator_width(acc_min, acc_max))


def accumulator_datatype_name(acc_min: int, acc_max: int) -> str:
    """qonnx DataType name of the minimal accumulator, e.g. ``INT13`` or ``UINT12``."""
    width = accumulator_width(int(acc_min), int(acc_max))
    return f"UINT{width}" if acc_min >= 0 else f"INT{width}"


def accumulator_limits(acc_bits: int, signed: bool = True) -> tuple[int, int]:
    """Representable range of a ``acc_bits``-bit accumulator."""
    _check_acc_bits(acc_bits)
    if signed:
        return -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    return 0, (1 << acc_bits) - 1


def fits(acc_min: np.ndarray | int, acc_max: np.ndarray | int, acc_bits: int) -> np.ndarray | bool:
    """Whether ``[acc_min, acc_max]`` fits a ``acc_bits`` accumulator (unsigned if ``acc_min >= 0``)."""
    return accumulator_width(acc_min, acc_max) <= acc_bits


def adversarial_inputs(q: np.ndarray, x: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """Inputs reaching the exact extremes: ``x_max_in[c]`` gives ``acc_max[c]``, ``x_min_in[c]`` ``acc_min[c]``.

    ``x_i = hi if q_i > 0 else lo`` maximises channel c; the mirror choice minimises it.
    Shapes are ``(channels, K)``: one worst-case input vector per channel.
    """
    q = as_integer_weights(q)
    x_for_max = np.where(q > 0, x.hi, x.lo).astype(np.int64)
    x_for_min = np.where(q > 0, x.lo, x.hi).astype(np.int64)
    return x_for_min, x_for_max


def partial_sum_range(q: np.ndarray, x: IntRange, tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel extremes over every running partial sum (saturating / tiled accumulation).

    With ``tile=T`` the sum restarts every T terms (each stage of a multi-stage datapath
    holds one tile); without it, all prefixes of the full sum are covered. Each term's
    extremes are ``max/min(q_i lo, q_i hi)``; the worst prefix is the extreme of their
    cumulative sums.
    """
    q = as_integer_weights(q)
    lo_term = np.minimum(q * x.lo, q * x.hi)
    hi_term = np.maximum(q * x.lo, q * x.hi)
    channels, K = q.shape
    tile = K if tile is None or tile <= 0 else min(tile, K)
    pad = (-K) % tile
    if pad:
        lo_term = np.pad(lo_term, ((0, 0), (0, pad)))
        hi_term = np.pad(hi_term, ((0, 0), (0, pad)))
    lo_cum = np.cumsum(lo_term.reshape(channels, -1, tile), axis=2)
    hi_cum = np.cumsum(hi_term.reshape(channels, -1, tile), axis=2)
    return lo_cum.min(axis=(1, 2)), hi_cum.max(axis=(1, 2))


def tile_stage_ranges(q: np.ndarray, x: IntRange, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the two stages of a multi-stage (tiled) datapath over the input box ``x``.

    Terms are taken in K order; each tile of ``tile`` consecutive terms is summed in an inner accumulator
    and the tile results, in order, in an outer one. Returns ``(inner_min, inner_max, outer_min, outer_max)``:
    the extremes of every partial sum within a tile, and of every running sum of tile results (the last of
    which is the full sum). Each tile's result ranges over its own exact range independently of the others,
    so the running sums' extremes are the cumulative sums of the tiles' extremes.
    """
    inner_min, inner_max = partial_sum_range(q, x, tile)
    q = as_integer_weights(q)
    totals = [exact_accumulator_range(q[:, s:s + tile], x) for s in range(0, q.shape[1], tile)]
    running_min = np.cumsum(np.stack([t[0] for t in totals]), axis=0)
    running_max = np.cumsum(np.stack([t[1] for t in totals]), axis=0)
    return inner_min, inner_max, running_min.min(axis=0), running_max.max(axis=0)
