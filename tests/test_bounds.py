"""The bound math against brute force: exact range is reached, safe and minimal; l1-type bounds are safe."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a2q_passes import bounds
from a2q_passes.bounds import IntRange


def fits_signed(value: int, bits: int) -> bool:
    return -(1 << (bits - 1)) <= value <= (1 << (bits - 1)) - 1


def fits_acc(lo: int, hi: int, bits: int) -> bool:
    """Independent restatement of the accumulator convention: UINT if lo >= 0, else two's complement."""
    if lo >= 0:
        return hi <= (1 << bits) - 1
    return fits_signed(lo, bits) and fits_signed(hi, bits)


@st.composite
def input_ranges(draw):
    kind = draw(st.sampled_from(["signed", "unsigned", "narrow_signed", "narrow_unsigned", "bipolar", "binary", "zp"]))
    n = draw(st.integers(1, 16))
    if kind == "bipolar":
        return bounds.BIPOLAR
    if kind == "binary":
        return bounds.BINARY
    if kind == "zp":
        n = draw(st.integers(2, 8))
        z = draw(st.integers(0, (1 << n) - 1))
        return bounds.integer_range(n, False).shifted(z)
    n = max(n, 2)
    return bounds.integer_range(n, kind.endswith("signed") and not kind.endswith("unsigned"), kind.startswith("narrow"))


@st.composite
def weight_matrices(draw, max_k=64):
    m = draw(st.integers(1, 8))
    lo, hi = -(1 << (m - 1)), (1 << (m - 1)) - 1
    if m == 1:
        lo, hi = -1, 1
    rows = draw(st.integers(1, 4))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi + 1, size=(rows, k))
    sparsity = draw(st.floats(0, 0.9))
    q[rng.random(q.shape) < sparsity] = 0
    return q, m


def brute_dot(q_row, x_row) -> int:
    return sum(int(a) * int(b) for a, b in zip(q_row, x_row))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(weight_matrices(), input_ranges())
def test_exact_range_is_reached_safe_and_minimal(qm, x):
    q, _ = qm
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    x_for_min, x_for_max = bounds.adversarial_inputs(q, x)
    for c in range(q.shape[0]):
        hi_val, lo_val = brute_dot(q[c], x_for_max[c]), brute_dot(q[c], x_for_min[c])
        assert (hi_val, lo_val) == (int(acc_max[c]), int(acc_min[c]))
        width = int(bounds.accumulator_width(int(acc_min[c]), int(acc_max[c])))
        assert fits_acc(lo_val, hi_val, width)
        if width > 1:
            assert not fits_acc(lo_val, hi_val, width - 1)
        assert bool(bounds.fits(acc_min[c], acc_max[c], width))
        if width > 1:
            assert not bool(bounds.fits(acc_min[c], acc_max[c], width - 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(-4, 0), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_exact_range_equals_exhaustive_enumeration(rows, k, lo, hi, seed):
    """Every input vector of a small box: the enumeration's extremes are the exact range."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-7, 8, size=(rows, k))
    x = IntRange(lo, hi)
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    values = np.array([[brute_dot(q[c], xs) for c in range(rows)] for xs in itertools.product(range(lo, hi + 1), repeat=k)])
    assert list(values.min(axis=0)) == list(acc_min) and list(values.max(axis=0)) == list(acc_max)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 100_000), st.integers(2, 8), st.integers(2, 8), st.booleans(), st.integers(0, 2**32 - 1))
def test_large_k_adversarial(k, n, m, signed_x, seed):
    """K up to 1e5: the adversarial input reaches the exact range and the width is minimal."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-(1 << (m - 1)), 1 << (m - 1), size=(1, k))
    x = bounds.integer_range(n, signed_x)
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    x_for_min, x_for_max = bounds.adversarial_inputs(q, x)
    hi_val = int(np.dot(q[0].astype(object), x_for_max[0].astype(object)))
    lo_val = int(np.dot(q[0].astype(object), x_for_min[0].astype(object)))
    assert (lo_val, hi_val) == (int(acc_min[0]), int(acc_max[0]))
    width = int(bounds.accumulator_width(lo_val, hi_val))
    assert fits_acc(lo_val, hi_val, width) and (width == 1 or not fits_acc(lo_val, hi_val, width - 1))


@settings(max_examples=300, deadline=None)
@given(weight_matrices(max_k=200), input_ranges())
def test_l1_and_datatype_bounds_are_safe(qm, x):
    q, m = qm
    n, signed = bounds.integer_format(x)
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    signed_exact = bounds.signed_accumulator_width(acc_min, acc_max)
    l1 = np.abs(q).sum(axis=1)
    l1_bits = bounds.l1_bound_bits(l1, n, signed)
    assert np.all(signed_exact <= l1_bits)
    dt_bits = bounds.datatype_bound_bits(q.shape[1], n, signed, m)
    assert np.all(l1_bits <= dt_bits)
    zero_sum = q.sum(axis=1) == 0
    if zero_sum.any() and x.hi > x.lo:
        zc = bounds.zero_centered_bound_bits(l1, x)
        assert np.all(signed_exact[zero_sum] <= zc[zero_sum])


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40), st.integers(1, 16), st.booleans())
def test_max_l1_norm_is_the_inverse_of_the_l1_bound(p, n, signed):
    budget = bounds.max_l1_norm(p, n, signed)
    assert bounds.l1_bound_bits(budget, n, signed) <= p
    assert bounds.l1_bound_bits(budget + 1, n, signed) > p
    # the paper's real-valued budget, floored
    assert budget == math.floor((2 ** (p - 1) - 1) * 2.0 ** (int(signed) - n))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40), st.integers(2, 12), st.integers(0, 4))
def test_zero_centered_inverse(p, n, z):
    x = bounds.integer_range(n, False).shifted(min(z, (1 << n) - 1))
    budget = bounds.max_l1_norm_zero_centered(p, x)
    assert bounds.zero_centered_bound_bits(budget, x) <= p
    assert bounds.zero_centered_bound_bits(budget + 1, x) > p


def test_zero_centered_vector_reaches_its_bound_tightly():
    """A zero-sum vector with l1 = 2t and unsigned N-bit inputs spans exactly [-t(2^N-1), t(2^N-1)]."""
    x = bounds.integer_range(4, False)
    q = np.array([[3, -3, 2, -2]])
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    assert (int(acc_min[0]), int(acc_max[0])) == (-5 * 15, 5 * 15)
    assert bounds.signed_accumulator_width(acc_min, acc_max)[0] == bounds.zero_centered_bound_bits(10, x)


@pytest.mark.parametrize("e", [1, 2, 23, 24, 31, 32, 52, 53, 62, 63, 64, 100])
def test_ceil_log2_exact_near_powers_of_two(e):
    for n in (2**e - 1, 2**e, 2**e + 1):
        assert bounds.ceil_log2(n) == (n - 1).bit_length()
        arr = np.array([n], dtype=object if n >= 2**62 else np.int64)
        assert int(bounds.ceil_log2(arr)[0]) == (n - 1).bit_length()


def test_float_log2_would_be_wrong_but_ours_is_not():
    """FINN's float32 log2 sized 2^32 + 1 as 32 bits; it needs 33 (unsigned)."""
    acc_max = 2**32 + 1 - 1  # needs 33 bits unsigned: 2^32 > 2^32 - 1
    assert math.ceil(np.log2(np.float32(acc_max + 1))) == 32
    assert bounds.unsigned_accumulator_width(acc_max) == 33


def test_huge_products_switch_to_python_ints():
    q = np.full((1, 4), 2**30, dtype=np.int64)
    x = IntRange(-(2**31), 2**31 - 1)
    acc_min, acc_max = bounds.exact_accumulator_range(q, x)
    assert int(acc_max[0]) == 4 * 2**30 * (2**31 - 1) and int(acc_min[0]) == -4 * 2**61
    assert bounds.signed_accumulator_width(int(acc_min[0]), int(acc_max[0])) == 64


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(-3, 0), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_partial_sum_range_matches_brute_force(k, tile, lo, hi, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(-5, 6, size=(2, k))
    x = IntRange(lo, hi)
    got_min, got_max = bounds.partial_sum_range(q, x, tile)
    for c in range(2):
        best_lo, best_hi = 0, 0
        first = True
        for xs in itertools.product((lo, hi), repeat=k):
            for start in range(0, k, tile):
                s = 0
                for i in range(start, min(start + tile, k)):
                    s += int(q[c, i]) * xs[i]
                    best_lo, best_hi = (s, s) if first else (min(best_lo, s), max(best_hi, s))
                    first = False
        assert (int(got_min[c]), int(got_max[c])) == (best_lo, best_hi)


def test_integer_range_and_format():
    assert bounds.integer_range(4, True) == IntRange(-8, 7)
    assert bounds.integer_range(4, True, narrow=True) == IntRange(-7, 7)
    assert bounds.integer_range(4, False, narrow=True) == IntRange(0, 14)
    assert bounds.integer_format(IntRange(-10, 245)) == (9, True)
    assert bounds.integer_format(IntRange(0, 255)) == (8, False)
    with pytest.raises(ValueError):
        bounds.max_l1_norm(65, 4, False)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64])
def test_positive_negative_sums_match_python_ints_in_every_layout(dtype):
    """Each storage type and memory layout the readers hand over, at the type's extremes, against Python ints.

    600 terms span several of the narrow column path's slabs (at most 255 int8 rows each) and whole rows of
    the type's minimum (-128 for int8, whose ``abs`` wraps) and maximum reach every sum's limit.
    """
    info = np.iinfo(dtype)
    low, high = (-(1 << 40), 1 << 40) if dtype == np.int64 else (int(info.min), int(info.max))
    rng = np.random.default_rng(0)
    stored = rng.integers(low, high, size=(600, 37), endpoint=True).astype(dtype)  # [K, channels], as MatMul stores it
    stored[:, 0], stored[:, 1], stored[::2, 2] = low, high, low
    views = {"rows are stored columns": stored.T, "stored rows": np.ascontiguousarray(stored.T),
             "strided": stored.T[::3, ::2], "wide rows": np.ascontiguousarray(stored.T)[:, :7]}
    for (label, rows), block_bytes in itertools.product(views.items(), (1 << 12, 1 << 30)):  # many blocks, or one
        pos, neg = bounds.positive_negative_sums(rows, block_bytes=block_bytes)
        for row, p, n in zip(rows.tolist(), pos.tolist(), neg.tolist()):
            assert (p, n) == (sum(v for v in row if v > 0), -sum(v for v in row if v < 0)), (dtype, label)
        assert pos.dtype == neg.dtype == np.int64


def test_narrowest_integers_narrows_and_never_widens():
    """int64 values come back in the smallest type holding them; an array already at least that narrow is returned
    as it is (numpy's smallest type for -3..100 is int16, wider than the int8 that holds them)."""
    wide = np.array([[-3, 100], [7, 0]], dtype=np.int64)
    assert bounds.narrowest_integers(wide).dtype == np.int16
    assert bounds.narrowest_integers(np.array([0, 200], dtype=np.int64)).dtype == np.uint8
    narrow = wide.astype(np.int8)
    assert bounds.narrowest_integers(narrow) is narrow
    np.testing.assert_array_equal(bounds.narrowest_integers(wide), wide)
