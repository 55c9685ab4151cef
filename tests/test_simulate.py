"""P-bit accumulator simulation against brute-force sequential accumulation with Python ints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a2q_passes.simulate import accumulate, accumulate_dot, accumulate_terms, exact_dot, saturate, wrap


def register_limits(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def sequential_accumulation(terms: list[int], bits: int, signed: bool, mode: str, tile: int | None) -> tuple[int, bool]:
    """One output, one Python-int addition at a time: (P-bit result, some register overflowed)."""
    lo, hi = register_limits(bits, signed)
    span = 2 ** bits
    overflowed = False

    def add(register: int, term: int) -> int:
        nonlocal overflowed
        total = register + term
        if total < lo or total > hi:
            overflowed = True
            total = (total - lo) % span + lo if mode == "wrap" else min(max(total, lo), hi)
        return total

    if mode == "wrap" and tile is None:  # one register, intermediate wrap-around cancels: only the end counts
        exact = sum(terms)
        return (exact - lo) % span + lo, not lo <= exact <= hi
    step = tile or len(terms)
    outer = 0
    for start in range(0, len(terms), step):
        inner = 0
        for term in terms[start:start + step]:
            inner = add(inner, term)
        outer = add(outer, inner) if tile else inner
    return outer, overflowed


@st.composite
def _cases(draw):
    bits = draw(st.integers(2, 12))
    signed = draw(st.booleans())
    mode = draw(st.sampled_from(["wrap", "saturate"]))
    K = draw(st.integers(1, 24))
    tile = draw(st.one_of(st.none(), st.integers(1, 30)))
    rows = draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from([3, 40, 2 ** bits]))
    low = 0 if draw(st.booleans()) else -magnitude
    terms = draw(st.lists(st.lists(st.integers(low, magnitude), min_size=K, max_size=K), min_size=rows, max_size=rows))
    return bits, signed, mode, tile, terms


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_accumulate_terms_matches_sequential_python_ints(case):
    bits, signed, mode, tile, terms = case
    result = accumulate_terms(np.array(terms), bits, signed, mode, tile)
    expected = [sequential_accumulation(row, bits, signed, mode, tile) for row in terms]
    assert result.values.tolist() == [value for value, _ in expected]
    assert result.register_overflow.tolist() == [flag for _, flag in expected]
    assert result.exact.tolist() == [sum(row) for row in terms]
    assert result.overflow_count == sum(value != sum(row) for (value, _), row in zip(expected, terms))


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 10), st.booleans(), st.sampled_from(["wrap", "saturate"]), st.one_of(st.none(), st.integers(1, 9)),
       st.integers(0, 2 ** 31 - 1))
def test_accumulate_dot_matches_per_output_brute_force(bits, signed, mode, tile, seed):
    rng = np.random.default_rng(seed)
    K, C = int(rng.integers(1, 20)), int(rng.integers(1, 5))
    x = rng.integers(-8, 16, size=(3, 2, K))
    q = rng.integers(-7, 8, size=(C, K))
    result = accumulate_dot(x, q, bits, signed, mode, tile)
    assert result.values.shape == (3, 2, C)
    for index in np.ndindex(3, 2, C):
        terms = [int(a) * int(b) for a, b in zip(x[index[:2]], q[index[2]])]
        value, flag = sequential_accumulation(terms, bits, signed, mode, tile)
        assert result.values[index] == value
        assert result.register_overflow[index] == flag
        assert result.exact[index] == sum(terms)


def test_vector_weights_give_one_output_per_input_row():
    x = np.array([[1, 2, 3], [4, 5, 6]])
    result = accumulate_dot(x, np.array([1, -1, 2]), bits=4, signed=True)
    assert result.exact.tolist() == [5, 11]
    assert result.values.tolist() == [5, 11 - 16]  # 11 wraps past INT4's 7
    assert result.overflowed.tolist() == [False, True]


def test_wrap_is_exact_modular_reduction_at_the_int64_edges():
    values = np.array([-(2 ** 62), -1, 0, 2 ** 62 - 1, 7, 8, -9])
    for bits in (1, 3, 4, 31, 62):
        for signed in (True, False):
            lo, _ = register_limits(bits, signed)
            expected = [(int(v) - lo) % 2 ** bits + lo for v in values]
            assert wrap(values, bits, signed).tolist() == expected


def test_saturate_clamps_to_unsigned_and_signed_ranges():
    values = np.array([-20, -8, 0, 7, 8, 20])
    assert saturate(values, 4, True).tolist() == [-8, -8, 0, 7, 7, 7]
    assert saturate(values, 4, False).tolist() == [0, 0, 0, 7, 8, 15]


def test_tiles_hide_overflow_only_under_wrap_around():
    terms = np.array([[7, 7, -7, -7]])  # exact sum 0 fits INT4; the tile sums 14 and -14 do not
    wrapped = accumulate_terms(terms, 4, True, "wrap", tile=2)
    assert wrapped.values.tolist() == [0] and wrapped.register_overflow.tolist() == [True]
    saturated = accumulate_terms(terms, 4, True, "saturate", tile=2)
    # tile 1 saturates at 7, tile 2 at -8; 7 + -8 = -1 != 0
    assert saturated.values.tolist() == [-1] and saturated.overflowed.tolist() == [True]
    untiled = accumulate_terms(terms, 4, True, "saturate")
    # 7, 7 (clamped from 14), 0, -7: clamping at the first overflow loses 7
    assert untiled.values.tolist() == [-7]


def test_exact_dot_switches_to_int64_beyond_float64_precision():
    x = np.array([[2 ** 40, 2 ** 40 - 1]])
    q = np.array([[2 ** 12 + 1, -(2 ** 12) - 3]])
    expected = (2 ** 40) * (2 ** 12 + 1) + (2 ** 40 - 1) * (-(2 ** 12) - 3)
    assert exact_dot(x, q).tolist() == [[expected]]


def test_rejects_non_integers_too_wide_values_and_bad_settings():
    with pytest.raises(ValueError, match="integers"):
        accumulate_dot(np.array([[0.5, 1.0]]), np.array([1, 1]), 8, True)
    with pytest.raises(ValueError, match="2\\^62"):
        exact_dot(np.array([[2 ** 40]]), np.array([[2 ** 30]]))
    with pytest.raises(ValueError, match="mode"):
        accumulate_terms(np.array([[1]]), 8, True, "round")
    with pytest.raises(ValueError, match="between 1 and 62"):
        accumulate_terms(np.array([[1]]), 63, True)
    with pytest.raises(ValueError, match="tile"):
        accumulate_terms(np.array([[1]]), 8, True, tile=0)


def test_general_form_sums_the_terms_when_no_exact_sum_is_given():
    rng = np.random.default_rng(3)
    terms = rng.integers(-50, 50, size=(5, 7))
    given = accumulate(lambda k: terms[:, k], 7, 6, True, "saturate", 3, exact=terms.sum(axis=1))
    summed = accumulate(lambda k: terms[:, k], 7, 6, True, "saturate", 3)
    assert summed.exact.tolist() == terms.sum(axis=1).tolist()
    assert summed.values.tolist() == given.values.tolist() == [
        sequential_accumulation(row.tolist(), 6, True, "saturate", 3)[0] for row in terms]
