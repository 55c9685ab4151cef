"""Projection methods against brute force: every result fits, stays in range, leaves fitting rows alone.

The oracle never uses the code under test: accumulator extremes come from the adversarial
inputs ``x_i = hi if q_i > 0 else lo`` (and the mirror) evaluated with Python ints, checked on
tiny rows against all ``2^K`` corner inputs; reference projections come from scipy.
"""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from a2q_passes import projection, projection_stats
from a2q_passes.bounds import IntRange
from a2q_passes.projection import InfeasibleTarget

METHODS = {"a2q": projection.project_a2q, "a2q+": projection.project_a2q_plus, "exact": projection.project_exact}


# ----------------------------------------------------------------------------- brute-force oracle


def brute_row_extremes(q: np.ndarray, x: IntRange) -> list[tuple[int, int]]:
    """Per row (min, max) of the integer dot product, from the adversarial inputs, in Python ints."""
    out = []
    for row in np.asarray(q):
        row = [int(c) for c in row]
        high = sum(c * (x.hi if c > 0 else x.lo) for c in row)
        low = sum(c * (x.lo if c > 0 else x.hi) for c in row)
        out.append((low, high))
    return out


def brute_layer_extremes(q: np.ndarray, x: IntRange) -> tuple[int, int]:
    ext = brute_row_extremes(q, x)
    return min(lo for lo, _ in ext), max(hi for _, hi in ext)


def in_accumulator(lo: int, hi: int, bits: int) -> bool:
    """The project convention restated: UINT P if lo >= 0, else two's-complement INT P."""
    if lo >= 0:
        return hi <= (1 << bits) - 1
    return -(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1


def brute_width(q: np.ndarray, x: IntRange) -> int:
    lo, hi = brute_layer_extremes(q, x)
    return next(b for b in range(1, 200) if in_accumulator(lo, hi, b))


def narrowest_signed(wr: IntRange) -> np.dtype:
    """The smallest of int8..int64 holding ``wr``: a whole-layer result in a wider type (int64) is a copy 2-8 times
    the size of the layer's weights that the methods no longer make."""
    return np.dtype(next(t for t in (np.int8, np.int16, np.int32, np.int64)
                         if np.iinfo(t).min <= wr.lo and wr.hi <= np.iinfo(t).max))


def plain(v: np.ndarray, wr: IntRange) -> np.ndarray:
    return np.clip(np.round(v), wr.lo, wr.hi).astype(np.int64)


def rel_change(q: np.ndarray, q0: np.ndarray) -> float:
    return float(np.linalg.norm(q - q0) / np.linalg.norm(q0))


def test_adversarial_oracle_matches_all_corner_inputs():
    rng = np.random.default_rng(0)
    for x in (IntRange(0, 15), IntRange(-8, 7), IntRange(-3, 12), IntRange(2, 9), IntRange(-1, 1)):
        q = rng.integers(-4, 5, size=(5, 7))
        for row, (lo, hi) in zip(q, brute_row_extremes(q, x)):
            values = [sum(int(c) * xi for c, xi in zip(row, corner)) for corner in itertools.product((x.lo, x.hi), repeat=7)]
            assert (min(values), max(values)) == (lo, hi)


# ----------------------------------------------------------------------------- random layers


@st.composite
def input_ranges(draw) -> IntRange:
    kind = draw(st.sampled_from(["unsigned", "signed", "narrow", "bipolar", "binary", "zp", "offzero"]))
    n = draw(st.integers(2, 8))
    if kind == "unsigned":
        return IntRange(0, (1 << draw(st.integers(1, 8))) - 1)
    if kind == "signed":
        return IntRange(-(1 << (n - 1)), (1 << (n - 1)) - 1)
    if kind == "narrow":
        return IntRange(-(1 << (n - 1)) + 1, (1 << (n - 1)) - 1)
    if kind == "bipolar":
        return IntRange(-1, 1)
    if kind == "binary":
        return IntRange(0, 1)
    if kind == "zp":  # an integer kernel subtracting the zero point z
        z = draw(st.integers(0, (1 << n) - 1))
        return IntRange(-z, (1 << n) - 1 - z)
    a, b = sorted(draw(st.lists(st.integers(1, 40), min_size=2, max_size=2, unique=True)))
    return IntRange(a, b) if draw(st.booleans()) else IntRange(-b, -a)


@st.composite
def weight_ranges(draw) -> IntRange:
    m = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(["signed", "signed", "narrow", "unsigned"]))
    if kind == "unsigned":
        return IntRange(0, (1 << m) - 1)
    return IntRange(-(1 << (m - 1)) + (kind == "narrow"), (1 << (m - 1)) - 1)


def make_weights(rng: np.random.Generator, rows: int, K: int, wr: IntRange, style: str) -> np.ndarray:
    span = max(wr.hi, -wr.lo)
    if style == "gauss":
        v = rng.normal(size=(rows, K)) * span / 3
    elif style == "heavy":  # outliers beyond the weight range get clipped
        v = rng.standard_t(2, size=(rows, K)) * span / 4
    elif style == "halves":  # exact ties for round-half-even
        v = rng.integers(-2 * span, 2 * span + 1, size=(rows, K)) / 2
    else:  # "mixed": some rows one-signed, some zero, some tiny
        v = rng.normal(size=(rows, K)) * span / 3
        v[0] = np.abs(v[0])
        if rows > 1:
            v[1] = 0
        if rows > 2:
            v[2] = -np.abs(v[2])
        if rows > 3:
            v[3] *= 0.1
    return v


@st.composite
def layers(draw):
    x, wr = draw(input_ranges()), draw(weight_ranges())
    rows = draw(st.integers(1, 6))
    K = draw(st.one_of(st.integers(1, 12), st.integers(13, 2000)))
    style = draw(st.sampled_from(["gauss", "heavy", "halves", "mixed"]))
    v = make_weights(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), rows, K, wr, style)
    lo, hi = brute_layer_extremes(plain(v, wr), x)
    p_min = projection.min_feasible_acc_bits(x, wr, signed_accumulator=lo < 0)
    plain_width = brute_width(plain(v, wr), x)
    top = max(p_min, min(plain_width, 32))
    acc_bits = draw(st.one_of(st.integers(p_min, top), st.integers(p_min, 32)))
    return v, x, wr, acc_bits


def check_projection(result, v: np.ndarray, x: IntRange, wr: IntRange, acc_bits: int) -> None:
    """The contract, checked by brute force."""
    q, q0 = result.weights, plain(v, wr)
    assert q.shape == v.shape and q.dtype == narrowest_signed(wr)
    assert q.min(initial=0) >= wr.lo and q.max(initial=0) <= wr.hi
    lo, hi = brute_layer_extremes(q, x)
    assert in_accumulator(lo, hi, acc_bits), (lo, hi, acc_bits)
    # the layer's accumulator type follows its plain rounding: INT P if any row goes below 0
    lo0, _ = brute_layer_extremes(q0, x)
    signed = lo0 < 0
    limits = (-(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1) if signed else (0, (1 << acc_bits) - 1)
    assert result.acc_limits == limits
    plain_fits = np.array([limits[0] <= a and b <= limits[1] for a, b in brute_row_extremes(q0, x)])
    np.testing.assert_array_equal(q[plain_fits], q0[plain_fits])
    np.testing.assert_array_equal(result.touched, ~plain_fits)
    assert set(result.row_method[plain_fits]) <= {"round"}
    assert "round" not in set(result.row_method[~plain_fits])


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=layers())
def test_every_method_fits_by_brute_force(name, layer):
    v, x, wr, acc_bits = layer
    result = METHODS[name](v, x, acc_bits, wr)
    check_projection(result, v, x, wr, acc_bits)
    # A fitting result is a fixed point: projecting it again changes nothing.
    again = METHODS[name](result.weights.astype(float), x, acc_bits, wr)
    np.testing.assert_array_equal(again.weights, result.weights)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_long_rows(name):
    """K ~ 1e5 with few rows, including rows that fit and 32-bit inputs (Python-int range)."""
    rng = np.random.default_rng(1)
    wr = IntRange(-8, 7)
    v = rng.normal(size=(3, 100_000)) * 2.5
    v[2] *= 0.01  # this row fits and must stay untouched
    for x in (IntRange(0, 255), IntRange(-(1 << 31), (1 << 31) - 1)):
        plain_width = brute_width(plain(v, wr), x)
        acc_bits = plain_width - 4
        result = METHODS[name](v, x, acc_bits, wr)
        check_projection(result, v, x, wr, acc_bits)
        assert result.touched.tolist() == [True, True, False]


# ----------------------------------------------------------------------------- targets


@given(x=input_ranges(), wr=weight_ranges(), signed=st.booleans())
@settings(max_examples=200, deadline=None)
def test_min_feasible_acc_bits_by_brute_force(x, wr, signed):
    def single_weight_fits(bits: int) -> bool:
        for c in (1, -1):
            if not wr.lo <= c <= wr.hi:
                continue
            (lo, hi), = brute_row_extremes(np.array([[c]]), x)
            if signed and -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
                return True
            if not signed and lo >= 0 and hi < (1 << bits):
                return True
        return False

    expected = next((b for b in range(2, 70) if single_weight_fits(b)), 2)
    assert projection.min_feasible_acc_bits(x, wr, signed_accumulator=signed) == expected


@pytest.mark.parametrize("name", sorted(METHODS))
def test_infeasible_targets_raise_with_the_smallest_feasible_width(name):
    rng = np.random.default_rng(2)
    v = rng.normal(size=(4, 50)) * 3
    wr = IntRange(-8, 7)
    # 4-bit unsigned inputs, mixed-sign weights: a single +1 spans [0, 15] and -1 spans [-15, 0], INT5 either way
    with pytest.raises(InfeasibleTarget, match=r"smallest feasible target is 5 bits") as err:
        METHODS[name](v, IntRange(0, 15), 4, wr)
    assert err.value.min_acc_bits == 5 and err.value.acc_bits == 4
    assert isinstance(err.value, ValueError)
    for bad in (1, 65):
        with pytest.raises(InfeasibleTarget, match=r"\b5\b"):
            METHODS[name](v, IntRange(0, 15), bad, wr)
    # all-non-negative weights on unsigned inputs keep a UINT accumulator: 4 bits are then enough
    result = METHODS[name](np.abs(v), IntRange(0, 15), 4, wr)
    check_projection(result, np.abs(v), IntRange(0, 15), wr, 4)
    assert result.acc_limits == (0, 15)
    if name != "a2q":  # A2Q's l1 budget is (2^3 - 1) / 2^4 -> 0 here; the exact range still holds one +1
        assert (result.weights != 0).any()


# ----------------------------------------------------------------------------- real projections


def reference_l1_projection(v: np.ndarray, radius: float) -> np.ndarray:
    """Slow reference: bisection on the soft threshold theta with sum max(|v| - theta, 0) = radius."""
    if np.abs(v).sum() <= radius:
        return v.copy()
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(np.abs(v) - mid, 0).sum() > radius else (lo, mid)
    return np.sign(v) * np.maximum(np.abs(v) - hi, 0)


@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 12), radius=st.floats(0.0, 30.0))
@settings(max_examples=200, deadline=None)
def test_duchi_l1_projection_against_bisection_and_kkt(seed, K, radius):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(3, K)) * rng.uniform(0.1, 10)
    w = projection.project_l1_ball(v, radius)
    for vr, wr_ in zip(v, w):
        np.testing.assert_allclose(wr_, reference_l1_projection(vr, radius), atol=1e-9)
        assert np.abs(wr_).sum() <= radius + 1e-9
        # KKT: on the support v - w = theta sign(w) for one theta >= 0, off it |v| <= theta
        support = wr_ != 0
        if np.abs(vr).sum() > radius and support.any():
            theta = (vr - wr_)[support] * np.sign(wr_[support])
            assert np.allclose(theta, theta[0]) and theta[0] >= -1e-12
            assert np.all(np.abs(vr[~support]) <= theta[0] + 1e-9)
    # the general accumulator projection with a symmetric range is the same l1 ball
    np.testing.assert_allclose(projection.project_accumulator_range(v, IntRange(-1, 1), -radius, radius), w, atol=1e-9)


def _slsqp(v: np.ndarray, x0: np.ndarray, objective, jac, bounds_, constraints):
    return minimize(objective, x0, jac=jac, method="SLSQP", bounds=bounds_, constraints=constraints,
                    options={"ftol": 1e-15, "maxiter": 1000})


def reference_range_projection(v: np.ndarray, x: IntRange, acc_min: float, acc_max: float) -> np.ndarray:
    """scipy SLSQP. Ranges holding 0: one QP in w = p - n (p, n >= 0), where ``hi sum p - lo sum n``
    is ``acc_max`` at the optimum. Other ranges: a QP in every sign orthant (both constraints linear
    there), the best one wins."""
    K = len(v)
    if x.lo <= 0 <= x.hi:
        split = np.concatenate
        res = _slsqp(v, np.zeros(2 * K), lambda z: 0.5 * np.sum((z[:K] - z[K:] - v) ** 2),
                     lambda z: split([z[:K] - z[K:] - v, -(z[:K] - z[K:] - v)]), [(0, None)] * (2 * K),
                     [{"type": "ineq", "fun": lambda z: acc_max - (x.hi * z[:K].sum() - x.lo * z[K:].sum()),
                       "jac": lambda z: split([np.full(K, -x.hi), np.full(K, x.lo)])},
                      {"type": "ineq", "fun": lambda z: (x.lo * z[:K].sum() - x.hi * z[K:].sum()) - acc_min,
                       "jac": lambda z: split([np.full(K, x.lo), np.full(K, -x.hi)])}])
        return res.x[:K] - res.x[K:]
    best = None
    for signs in itertools.product((1.0, -1.0), repeat=K):
        s = np.array(signs)
        c_max, c_min = np.where(s > 0, x.hi, x.lo), np.where(s > 0, x.lo, x.hi)
        res = _slsqp(v, np.zeros(K), lambda w: 0.5 * np.sum((w - v) ** 2), lambda w: w - v,
                     [(0, None) if si > 0 else (None, 0) for si in s],
                     [{"type": "ineq", "fun": lambda w, c=c_max: acc_max - c @ w, "jac": lambda w, c=c_max: -c},
                      {"type": "ineq", "fun": lambda w, c=c_min: c @ w - acc_min, "jac": lambda w, c=c_min: c}])
        if res.success and (best is None or res.fun < best.fun):
            best = res
    return best.x


def real_extremes(w: np.ndarray, x: IntRange) -> tuple[float, float]:
    return float(np.where(w > 0, x.lo * w, x.hi * w).sum()), float(np.where(w > 0, x.hi * w, x.lo * w).sum())


@pytest.mark.parametrize("x", [IntRange(0, 15), IntRange(-8, 7), IntRange(-3, 12), IntRange(-12, 3),
                               IntRange(-1, 1), IntRange(2, 9), IntRange(-9, -2)])
def test_accumulator_range_projection_against_scipy(x):
    """Feasible, and no farther from v than scipy's feasible solution (the projection is unique)."""
    rng = np.random.default_rng(abs(x.lo) * 100 + abs(x.hi))
    for _ in range(12):
        K = int(rng.integers(1, 5))
        v = rng.normal(size=K) * rng.uniform(0.5, 6)
        acc_max, acc_min = float(rng.integers(1, 60)), -float(rng.integers(1, 60))
        w = projection.project_accumulator_range(v[None], x, acc_min, acc_max)[0]
        ref = reference_range_projection(v, x, acc_min, acc_max)
        for point in (w, ref):
            lo, hi = real_extremes(point, x)
            assert acc_min - 1e-7 <= lo and hi <= acc_max + 1e-7
        assert np.sum((w - v) ** 2) <= np.sum((ref - v) ** 2) + 1e-7
        if x.lo <= 0 <= x.hi:
            np.testing.assert_allclose(w, ref, atol=1e-5)


@pytest.mark.parametrize("x", [IntRange(0, 15), IntRange(-8, 7), IntRange(-3, 12), IntRange(-1, 1)])
def test_exact_rounding_is_the_best_floor_or_ceil_choice(x):
    """Among all 2^K floor/ceil roundings of the projected row that fit, exact picks the closest."""
    rng = np.random.default_rng(3)
    wr = IntRange(-8, 7)
    for _ in range(25):
        K = int(rng.integers(1, 10))
        v = rng.normal(size=(1, K)) * 3
        acc_bits = max(projection.min_feasible_acc_bits(x, wr), brute_width(plain(v, wr), x) - 2)
        lo0, _ = brute_layer_extremes(plain(v, wr), x)
        limits = (-(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1) if lo0 < 0 else (0, (1 << acc_bits) - 1)
        result = projection.project_exact(v, x, acc_bits, wr)
        if not result.touched[0]:
            continue
        w = projection.project_accumulator_range(np.clip(v, wr.lo, wr.hi), x, *limits)[0]
        best = min(
            float(np.sum((np.array(q) - w) ** 2))
            for q in itertools.product(*[sorted({np.floor(c), np.ceil(c)}) for c in w])
            if limits[0] <= brute_row_extremes(np.array([q]), x)[0][0] and brute_row_extremes(np.array([q]), x)[0][1] <= limits[1]
        )
        assert float(np.sum((result.weights[0] - w) ** 2)) <= best + 1e-9


# ----------------------------------------------------------------------------- the methods compared


def realistic_layer(rows: int, K: int, seed: int) -> np.ndarray:
    """Gaussian weights quantized per channel to 4 bits (max |w| -> 7, weight range [-8, 7])."""
    w = np.random.default_rng(seed).normal(size=(rows, K))
    return w / (np.abs(w).max(axis=1, keepdims=True) / 7)


@pytest.mark.parametrize("K", [288, 576])
@pytest.mark.parametrize("x", [IntRange(0, 15), IntRange(-8, 7)])
def test_exact_changes_no_more_than_a2q_and_saves_a_bit_on_unsigned_inputs(K, x):
    """On realistic 4-bit layers (64 channels): at every feasible P up to the plain width,
    rel-L2(exact, P) <= rel-L2(a2q, P). On unsigned inputs, at every P where a2q must project
    every row: rel-L2(exact, P - 1) <= rel-L2(a2q, P), and exact's width at P - 1 is <= P - 1."""
    wr = IntRange(-8, 7)
    for seed in range(2):
        v = realistic_layer(64, K, seed)
        q0 = plain(v, wr)
        p_min, top = projection.min_feasible_acc_bits(x, wr), brute_width(q0, x)
        a2q = {p: projection.project_a2q(v, x, p, wr) for p in range(p_min, top + 1)}
        exact = {p: projection.project_exact(v, x, p, wr) for p in range(p_min, top + 1)}
        for p in range(p_min, top + 1):
            assert rel_change(exact[p].weights, q0) <= rel_change(a2q[p].weights, q0) + 1e-12, p
        if x.lo == 0:
            compared = [p for p in range(p_min + 1, top + 1) if a2q[p].touched.all()]
            assert len(compared) >= 5
            for p in compared:
                assert rel_change(exact[p - 1].weights, q0) <= rel_change(a2q[p].weights, q0), p
                assert brute_width(exact[p - 1].weights, x) <= p - 1


def test_a2q_rows_stay_inside_the_a2q_l1_budget():
    rng = np.random.default_rng(4)
    wr = IntRange(-8, 7)
    for x, N, signed in ((IntRange(0, 15), 4, False), (IntRange(-8, 7), 4, True), (IntRange(-10, 245), 9, True)):
        v = rng.normal(size=(16, 300)) * 3
        for acc_bits in (12, 14, 16):
            result = projection.project_a2q(v, x, acc_bits, wr)
            budget = ((1 << (acc_bits - 1)) - 1) // (1 << (N - signed))  # A2Q: (2^(P-1) - 1) 2^(signed - N)
            l1 = np.abs(result.weights).sum(axis=1)
            assert np.all(l1[result.touched] <= budget)
            assert np.all(result.row_method[result.touched] == "a2q")


def test_a2q_plus_rows_sum_to_zero_and_fallbacks_are_reported():
    wr = IntRange(-8, 7)
    for x in (IntRange(0, 15), IntRange(-8, 7), IntRange(-3, 12)):
        v = realistic_layer(32, 288, 5)
        v[0] = np.abs(v[0]) * 0 + 3.0  # a constant row: zero-centred it is all zeros -> fallback
        for acc_bits in (10, 12):
            result = projection.project_a2q_plus(v, x, acc_bits, wr)
            check_projection(result, v, x, wr, acc_bits)
            mine = result.rows_using("a2q+")
            assert mine.sum() >= 25
            assert np.all(result.weights[mine].sum(axis=1) == 0)
            budget = ((1 << acc_bits) - 2) // (x.hi - x.lo)  # A2Q+: (2^P - 2) / (2^N - 1)
            assert np.all(np.abs(result.weights[mine]).sum(axis=1) <= budget)
            assert result.row_method[0] == "exact" and result.touched[0]
            fell_back = result.rows_using("exact")
            np.testing.assert_array_equal(result.weights[fell_back], projection.project_exact(v, x, acc_bits, wr).weights[fell_back])
    # unsigned weights cannot sum to zero: every touched row falls back
    v = np.abs(realistic_layer(8, 100, 6)) * 2
    result = projection.project_a2q_plus(v, IntRange(-8, 7), 10, IntRange(0, 15))
    check_projection(result, v, IntRange(-8, 7), IntRange(0, 15), 10)
    assert result.touched.all() and np.all(result.row_method == "exact")


# ----------------------------------------------------------------------------- statistics and errors


def test_projection_stats_on_a_hand_example():
    before = np.array([[3, 0, -4], [1, 1, 0]])
    after = np.array([[3, 0, 0], [1, 1, 0]])
    v = np.array([[3.2, 0.1, -3.9], [1.0, 1.0, 0.0]])
    stats = projection_stats.projection_stats(before, after, v)
    assert stats["rel_l2_change"] == pytest.approx(4 / np.sqrt(27))  # ||(0,0,4)|| / ||(3,0,-4,1,1,0)||
    assert stats["sparsity_before"] == pytest.approx(2 / 6) and stats["sparsity_after"] == pytest.approx(3 / 6)
    assert stats["rows_touched"] == 1 and stats["rows"] == 2
    assert stats["rel_l2_to_float_after"] > stats["rel_l2_to_float_before"]
    assert projection_stats.projection_stats(before, before, v)["rel_l2_change"] == 0.0


def test_bad_inputs_are_rejected():
    wr = IntRange(-8, 7)
    with pytest.raises(ValueError, match="NaN"):
        projection.project_exact(np.array([[np.nan, 1.0]]), IntRange(0, 15), 12, wr)
    with pytest.raises(ValueError, match="must contain 0"):
        projection.project_exact(np.ones((1, 3)), IntRange(0, 15), 12, IntRange(1, 7))
    with pytest.raises(ValueError, match="shape"):
        projection.project_exact(np.ones((1, 3, 3)), IntRange(0, 15), 12, wr)


# ----------------------------------------------------------------------------- histogram path for integer rows


def _small_integer_rows(rng: np.random.Generator, rows: int, K: int, lo: int, hi: int) -> np.ndarray:
    """Rows of small integers with many ties: some rows from a handful of values, one constant, one at the extremes."""
    v = rng.integers(lo, hi + 1, size=(rows, K)).astype(np.float64)
    v[0] = rng.choice([lo, 0, hi], size=K)
    v[1] = hi
    v[2, : K // 2] = 0
    return v


@pytest.mark.parametrize("lo, hi", [(-128, 127), (-3, 3), (0, 15), (-7, 0)])
def test_level_rows_answer_bit_for_bit_like_sorted_rows(lo, hi):
    """Masses, counts and thresholds of the histogram path equal the sorted path's exactly, at integer, half-integer,
    random, out-of-range and non-finite thresholds."""
    rng = np.random.default_rng(abs(lo) * 31 + hi)
    v = _small_integer_rows(rng, 7, 300, lo, hi)
    levels, sorted_rows = projection._rows_by_value(v), projection._SortedRows(v)
    assert isinstance(levels, projection._LevelRows)
    probes = [np.full(7, float(t)) for t in (lo - 5, lo, hi, hi + 9, 0.5, -0.5, np.inf, -np.inf, np.nan)]
    probes += [rng.uniform(lo - 2, hi + 2, size=7) for _ in range(20)]
    probes += [rng.integers(lo - 2, hi + 3, size=7).astype(np.float64) for _ in range(20)]
    for t in probes:
        for method in ("upper", "lower"):
            with np.errstate(invalid="ignore"):  # 0 values beyond an infinite threshold: 0 * inf in both
                got, want = getattr(levels, method)(t), getattr(sorted_rows, method)(t)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    total = np.abs(v).sum(axis=1)
    for mass in [np.zeros(7), -np.ones(7), total, total * 2, *(rng.uniform(0, 1, size=7) * total for _ in range(30)),
                 *(rng.integers(0, total.astype(np.int64) + 1).astype(np.float64) for _ in range(30))]:
        np.testing.assert_array_equal(levels.upper_threshold(mass), sorted_rows.upper_threshold(mass))
        np.testing.assert_array_equal(levels.lower_threshold(mass), sorted_rows.lower_threshold(mass))


@pytest.mark.parametrize("x", [IntRange(0, 255), IntRange(-128, 127), IntRange(-3, 40), IntRange(2, 9)])
@pytest.mark.parametrize("name", ["exact", "a2q+"])
def test_projections_of_integer_rows_are_the_same_with_the_sorted_path(monkeypatch, x, name):
    """Integer rows (stored codes) projected through the histogram path give the same bytes as through the sorts;
    rows that already fit stay as they are, and every result fits by brute force."""
    rng = np.random.default_rng(x.hi)
    v = _small_integer_rows(rng, 12, 257, -128, 127)
    v[3] = 0  # a row that fits at any width
    weight_range = IntRange(-128, 127)
    for bits in (12, 16, 19):
        fast = METHODS[name](v, x, bits, weight_range)
        with monkeypatch.context() as patch:
            patch.setattr(projection, "_rows_by_value", projection._SortedRows)
            sorted_result = METHODS[name](v, x, bits, weight_range)
        np.testing.assert_array_equal(fast.weights, sorted_result.weights)
        np.testing.assert_array_equal(fast.row_method, sorted_result.row_method)
        assert not fast.touched[3] and np.array_equal(fast.weights[3], np.zeros(257))
        low, high = brute_layer_extremes(fast.weights, x)
        assert fast.acc_limits[0] <= low and high <= fast.acc_limits[1]


def test_rows_by_value_sorts_what_the_histogram_cannot_hold_exactly():
    """Non-integers, level spans wider than a row, and sums past 2^53 go to the sorted path."""
    assert isinstance(projection._rows_by_value(np.array([[0.5, 1.0, 2.0]])), projection._SortedRows)
    assert isinstance(projection._rows_by_value(np.array([[0.0, 1.0, 9.0]])), projection._SortedRows)
    assert isinstance(projection._rows_by_value(np.full((1, 4), 2.0 ** 52)), projection._SortedRows)
    assert isinstance(projection._rows_by_value(np.array([[0.0, 1.0, 2.0, 1.0]])), projection._LevelRows)


def test_round_up_candidates_apply_rounds_up_exactly_the_chosen_sorted_positions():
    """apply() against the definition: the first a positive and b negative candidates in the sorted order move away
    from 0 by one; rows with ties, integer weights (no candidate) and all-candidate rows included."""
    rng = np.random.default_rng(3)
    w = np.round(rng.normal(0, 3, size=(40, 23)) * 4) / 4  # quarters: many equal fractions
    w[0] = 0.0
    w[1] = np.arange(23) - 11.0
    w[2] = 0.5
    cand = projection._RoundUpCandidates.of(w)
    a = rng.integers(0, cand.n_pos + 1)
    b = rng.integers(0, cand.n_neg + 1)
    expected = np.trunc(w).astype(np.int64)
    for r in range(w.shape[0]):
        for p in cand.order[r, :a[r]]:
            assert w[r, p] > 0 and w[r, p] != np.trunc(w[r, p])
            expected[r, p] += 1
        for p in cand.order[r, cand.n_pos[r]:cand.n_pos[r] + b[r]]:
            assert w[r, p] < 0 and w[r, p] != np.trunc(w[r, p])
            expected[r, p] -= 1
    np.testing.assert_array_equal(cand.apply(a, b), expected)


def test_tied_round_up_candidates_go_in_index_order():
    """A uniform threshold leaves every weight of a row the same fraction: which ones round up must not depend on
    the CPU's sort. Candidates with equal benefit are taken in index order (positive first, then negative)."""
    rng = np.random.default_rng(3)
    signs = rng.choice([-1.0, 1.0], size=(8, 512))
    w = signs * (rng.integers(0, 5, size=signs.shape) + 0.625)  # every candidate: benefit 2 * 0.625 - 1
    w[:, ::7] = 3.0  # integers: no candidate
    cand = projection._RoundUpCandidates.of(w)
    for row in range(w.shape[0]):
        positive = np.flatnonzero((w[row] > 0) & (w[row] != 3.0))
        negative = np.flatnonzero(w[row] < 0)
        n_pos, n_neg = cand.n_pos[row], cand.n_neg[row]
        assert np.array_equal(cand.order[row, :n_pos], positive)
        assert np.array_equal(cand.order[row, n_pos:n_pos + n_neg], negative)


# ----------------------------------------------------------------------------- integer rows as stored


@pytest.mark.parametrize("method", sorted(METHODS))
def test_integer_rows_project_as_their_float64_copy(method):
    """project passes an int8 layer's stored codes without a float64 copy: the methods (with their contract check)
    and the statistics must give what the float64 rows of the same values give, to the bit."""
    from a2q_passes.methods import project_weights

    rng = np.random.default_rng(13)
    # 640 x 512 int8 codes: past kernels.MIN_ELEMENTS, so the compiled statistics run on blocks of rows too
    codes = rng.integers(-128, 128, size=(640, 512)).astype(np.int8)
    codes[:5] = 0  # rows that already fit next to rows that need projecting
    x, weight_range = IntRange(0, 255), IntRange(-128, 127)
    narrow = project_weights(codes, x, 18, weight_range, method)
    wide = project_weights(codes.astype(np.float64), x, 18, weight_range, method)
    assert narrow.weights.dtype == wide.weights.dtype
    assert narrow.weights.tobytes() == wide.weights.tobytes()
    assert np.array_equal(narrow.touched, wide.touched) and np.array_equal(narrow.row_method, wide.row_method)
    assert narrow.touched.any() and not narrow.touched.all()
    assert projection_stats.projection_stats(codes, narrow.weights, codes) == projection_stats.projection_stats(
        codes, wide.weights, codes.astype(np.float64))


def test_plain_round_of_integers_is_exact_beyond_float16():
    """np.rint of an integer array returns float16 for int8/int16 (exact only up to 2048): integer rows are clipped
    as integers instead; the result equals rounding their float64 values."""
    values = np.array([[-32768, -2049, 2049, 4097, 32767, 7]], dtype=np.int16)
    weight_range = IntRange(-30000, 30000)
    assert np.array_equal(projection.plain_round(values, weight_range),
                          projection.plain_round(values.astype(np.float64), weight_range))
    assert projection.plain_round(values, weight_range).tolist() == [[-30000, -2049, 2049, 4097, 30000, 7]]


def test_parts_keep_the_narrow_type_that_holds_every_part():
    """Rows with different weight ranges (per-channel zero points subtracted) are projected apart into one array in
    the narrowest signed type holding all their ranges, the values as each part's own projection gives them."""
    rng = np.random.default_rng(5)
    v = rng.uniform(-300, 300, size=(6, 40))
    x = IntRange(0, 255)
    parts = [(np.arange(3), slice(None), IntRange(-128, 127)), (np.arange(3, 6), slice(None), IntRange(-200, 55))]
    result = projection.project_in_parts(v, x, 18, parts, projection.project_exact)
    assert result.weights.dtype == narrowest_signed(IntRange(-200, 127)) == np.int16
    for rows, _, wr in parts:
        alone = projection.project_exact(v[rows], x, 17 if brute_layer_extremes(plain(v[rows], wr), x)[0] >= 0 else 18,
                                         wr)
        np.testing.assert_array_equal(result.weights[rows], alone.weights)


def test_rows_that_already_fit_need_no_feasible_plus_minus_one_weight():
    """Below the smallest target at which one +-1 weight fits (4 bits on inputs in [0, 15]) only all-zero rows fit:
    such a layer is kept as it is at any valid width (allocate offers it 2 bits), while one non-zero weight makes the
    same target infeasible."""
    zeros = np.zeros((3, 5))
    np.testing.assert_array_equal(projection.project_exact(zeros, IntRange(0, 15), 2, IntRange(-8, 7)).weights, zeros)
    with pytest.raises(projection.InfeasibleTarget, match="smallest feasible target is 4 bits"):
        projection.project_exact(np.eye(3, 5), IntRange(0, 15), 2, IntRange(-8, 7))
