"""The compiled kernels (a2q_passes.kernels, numba) against the numpy code they stand in for, to the bit.

Large blocks of rows go to the kernels, small ones to numpy; here the threshold is forced either way on the same
small rows (ties, zero rows, rows that already fit, integer codes of int4/int8/int16 and unsigned ranges, signed,
unsigned and off-zero inputs) and every result compared exactly. The projections are also checked by brute force
(Python-int adversarial inputs), independently of both paths.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from a2q_passes import kernels, methods, projection, projection_stats
from a2q_passes.bounds import IntRange

NUMPY, COMPILED = 1 << 62, 0  # kernels.MIN_ELEMENTS forcing one path or the other
WEIGHT_RANGES = {"int4": IntRange(-8, 7), "int8": IntRange(-128, 127), "int16": IntRange(-32768, 32767),
                 "uint8": IntRange(0, 255)}
INPUTS = [IntRange(0, 255), IntRange(-128, 127), IntRange(-3, 40), IntRange(2, 9), IntRange(-15, -1)]


def both_paths(monkeypatch: pytest.MonkeyPatch, function, *args):
    """``function(*args)`` through numpy and through the kernels."""
    results = []
    for threshold in (NUMPY, COMPILED):
        monkeypatch.setattr(kernels, "MIN_ELEMENTS", threshold)
        results.append(function(*args))
    return results


def code_rows(rng: np.random.Generator, weight_range: IntRange, rows: int = 14, K: int = 97) -> np.ndarray:
    """Integer rows of the range (as float64 unrounded weights): random, at the range's ends, zero, half zero."""
    v = rng.integers(weight_range.lo, weight_range.hi + 1, size=(rows, K)).astype(np.float64)
    v[0] = 0.0
    v[1] = weight_range.hi
    v[2] = weight_range.lo
    v[3, : K // 2] = 0.0
    v[4] = rng.choice([weight_range.lo, 0, weight_range.hi], size=K)
    v[5] = 0.0
    v[5, 7] = 1.0  # fits any target: left as plain rounding
    return v


def real_rows(rng: np.random.Generator, weight_range: IntRange, rows: int = 14, K: int = 97) -> np.ndarray:
    """Unrounded weights: quarters and halves (round-half-even ties, equal fractions), out of range, random."""
    span = weight_range.hi - weight_range.lo
    v = np.round(rng.uniform(weight_range.lo - span / 4, weight_range.hi + span / 4, size=(rows, K)) * 4) / 4
    v[0] = 0.0
    v[1] = rng.integers(-4, 5, size=K) + 0.5
    v[2, ::3] = rng.normal(0, 3, size=v[2, ::3].shape)
    v[3] = 0.0
    v[3, 0] = 0.4  # rounds to 0: fits anything
    return v


def assert_same_result(a: projection.ProjectionResult, b: projection.ProjectionResult) -> None:
    assert a.weights.dtype == b.weights.dtype
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.touched, b.touched)
    np.testing.assert_array_equal(a.row_method, b.row_method)
    assert a.acc_limits == b.acc_limits


def brute_fits(q: np.ndarray, x: IntRange, limits: tuple[int, int]) -> bool:
    """Every row's extremes over the input box (adversarial inputs, Python ints) inside ``limits``."""
    for row in q.tolist():
        high = sum(c * (x.hi if c > 0 else x.lo) for c in row)
        low = sum(c * (x.lo if c > 0 else x.hi) for c in row)
        if low < limits[0] or high > limits[1]:
            return False
    return True


@pytest.mark.parametrize("codes", ["int4", "int8", "int16", "uint8"])
@pytest.mark.parametrize("x", INPUTS, ids=str)
def test_methods_give_the_same_bits_through_the_kernels(monkeypatch, codes, x):
    """Every built-in method, through the contract check, on integer codes and on real rows, at a target that
    projects most rows and one that projects few: the same weights, rows, methods and limits on both paths, and
    projection_stats the same figures; the results fit by brute force."""
    weight_range = WEIGHT_RANGES[codes]
    rng = np.random.default_rng(len(codes) * 1000 + x.hi)
    for v in (code_rows(rng, weight_range), real_rows(rng, weight_range)):
        natural = int(np.ceil(np.log2(np.abs(v).sum(axis=1).max() * max(abs(x.lo), abs(x.hi)) + 1))) + 1
        for bits in (natural - 6, natural - 1):
            bits = max(bits, projection.min_feasible_acc_bits(x, weight_range) + 1)
            for method in ("exact", "a2q", "a2q+"):
                numpy_result, compiled_result = both_paths(monkeypatch, methods.project_weights, v, x, bits,
                                                           weight_range, method)
                assert_same_result(numpy_result, compiled_result)
                assert brute_fits(compiled_result.weights, x, compiled_result.acc_limits)
                plain = projection.plain_round(v, weight_range)
                stats = both_paths(monkeypatch, projection_stats.projection_stats, plain, compiled_result.weights, v)
                assert stats[0] == stats[1]


def test_round_up_candidates_are_the_same_to_the_bit(monkeypatch):
    """Sort order (ties in index order, keys equal only after ``benefit + 4`` rounds), prefix gains and counts."""
    rng = np.random.default_rng(5)
    w = np.round(rng.normal(0, 3, size=(40, 61)) * 4) / 4  # quarters: many equal fractions
    w[0] = 0.0
    w[1] = np.arange(61) - 30.0  # integers: no candidate
    w[2] = 0.5
    w[3] = -0.5
    w[4] = 2.0 + np.linspace(0.3, 0.3 + 1e-15, 61)  # distinct fractions whose keys collide after + 4
    w[5, ::2] = -7.25
    w[6] = rng.uniform(-5, 5, size=61)
    numpy_cand, compiled_cand = both_paths(monkeypatch, projection._RoundUpCandidates.of, w)
    width = int((numpy_cand.n_pos + numpy_cand.n_neg).max())
    assert compiled_cand.order.shape[1] == width
    np.testing.assert_array_equal(numpy_cand.order[:, :width], compiled_cand.order)
    for field in ("trunc", "gain", "n_pos", "n_neg", "n_neg_beneficial"):
        got, want = getattr(compiled_cand, field), getattr(numpy_cand, field)
        assert got.dtype == want.dtype, field
        np.testing.assert_array_equal(got, want, err_msg=field)


@pytest.mark.parametrize("codes", ["int4", "int8", "int16", "uint8"])
def test_value_counts_and_row_sums_are_the_same(monkeypatch, codes):
    """The threshold search's value counts (None for a non-integer) and the exact integer row ranges."""
    weight_range = WEIGHT_RANGES[codes]
    rng = np.random.default_rng(7)
    v = code_rows(rng, weight_range, K=300)
    lo, hi = int(v.min()), int(v.max())
    counts = both_paths(monkeypatch, projection._level_counts, v, lo, hi - lo + 1)
    np.testing.assert_array_equal(counts[0], counts[1])
    np.testing.assert_array_equal(counts[1].sum(axis=1), np.full(v.shape[0], v.shape[1]))
    v[4, 9] += 0.5
    assert both_paths(monkeypatch, projection._level_counts, v, lo, hi - lo + 2) == [None, None]
    q = v.astype(np.int64)
    for x in INPUTS:
        ranges = both_paths(monkeypatch, projection.integer_row_ranges, q, x)
        for numpy_side, compiled_side in zip(*ranges):
            np.testing.assert_array_equal(numpy_side, compiled_side)


def test_plain_rounding_is_the_same(monkeypatch):
    """Half-integers round to even, values beyond the range clip, -0.4 gives 0; a NaN takes the numpy path."""
    rng = np.random.default_rng(11)
    v = np.round(rng.uniform(-300, 300, size=(9, 50)) * 2) / 2
    v[0] = np.arange(50) - 25.5
    v[1] = -0.4
    narrow = {"int4": np.int8, "int8": np.int8, "int16": np.int16, "uint8": np.int16}  # signed, 1 or 2 bytes a weight
    for kind, weight_range in WEIGHT_RANGES.items():
        rounded = both_paths(monkeypatch, projection.plain_round, v, weight_range)
        assert rounded[0].dtype == rounded[1].dtype == narrow[kind]
        np.testing.assert_array_equal(rounded[0], rounded[1])
    v[2, 3] = np.nan
    with np.errstate(invalid="ignore"):
        rounded = both_paths(monkeypatch, projection.plain_round, v, WEIGHT_RANGES["int8"])
    np.testing.assert_array_equal(rounded[0], rounded[1])


def test_stats_fall_back_to_float_sums_where_they_would_not_be_exact(monkeypatch):
    """Non-integer unrounded weights, and integers too large for exact float64 sums, take the float64 path."""
    rng = np.random.default_rng(13)
    v = rng.integers(-100, 100, size=(6, 40)).astype(np.float64)
    before = v.astype(np.int8)
    after = np.trunc(v / 2).astype(np.int64)
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", COMPILED)
    assert kernels.change_sums(before, after, v) is not None
    assert kernels.change_sums(before, after, v + 0.25) is None
    huge = np.full((2, 3), float(1 << 30))
    assert kernels.change_sums(huge.astype(np.int64), huge.astype(np.int64), huge) is None
    stats = both_paths(monkeypatch, projection_stats.projection_stats, before, after, v + 0.25)
    assert stats[0] == stats[1]


def run_with_read_only_package(tmp_path: Path, body: str) -> str:
    """stdout of ``body`` run in a fresh interpreter that sees the package folder as read-only, with
    ``TMPDIR=tmp_path`` and no ``NUMBA_CACHE_DIR``."""
    package = Path(kernels.__file__).parent
    script = (
        "import os\n"
        "real_access = os.access\n"
        f"os.access = lambda path, mode: False if str(path).startswith({str(package)!r}) else real_access(path, mode)\n"
        f"{body}\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                          cwd=package.parent).stdout


def test_kernels_run_where_the_package_folder_is_not_writable(tmp_path):
    """Installed read-only, the kernels compile into a cache folder of their own in the temporary directory."""
    out = run_with_read_only_package(tmp_path, (
        "import numpy as np\n"
        "from a2q_passes import kernels\n"
        "q = kernels.plain_round(np.array([[0.5, 1.5, -2.5, 300.0]]), -128, 127)\n"
        "print(q.tolist(), os.environ['NUMBA_CACHE_DIR'])"))
    rounded, cache = out.rsplit(maxsplit=1)
    assert rounded == "[[0, 2, -2, 127]]"
    assert Path(cache).parent == tmp_path and any(Path(cache).rglob("*.nbi"))


@pytest.mark.parametrize("load", ["from a2q_passes import kernels; kernels.compiled()",
                                  "import a2q_passes.adversarial_kernels", "import a2q_passes.certificate.kernels"])
def test_every_kernel_module_caches_outside_a_read_only_package(tmp_path, load):
    """Whichever kernel module loads numba first, numba caches in the temporary folder, not the read-only package."""
    out = run_with_read_only_package(tmp_path, f"{load}\nimport numba\nprint(numba.config.CACHE_DIR)")
    assert Path(out.strip()).parent == tmp_path


def test_row_sums_follow_numpys_pairwise_order(monkeypatch):
    """The kernels sum float rows in numpy's order (``ndarray.sum`` over C-ordered rows: pairwise): row lengths
    around the 8-wide and 128-long blocks and past numpy's 8192-element buffer, signed zeros, mixed magnitudes."""
    rng = np.random.default_rng(17)
    x = IntRange(-3, 40)
    for K in (*range(1, 140), 255, 256, 257, 1000, 4096, 8191, 8192, 8193, 11008, 20000):
        w = rng.normal(size=(3, K)) * np.array([[1.0], [1e3], [1e-3]])
        w[0, ::3] = 0.0
        w[1, ::5] = -0.0
        extremes = both_paths(monkeypatch, projection._accumulator_extremes, w, x)
        np.testing.assert_array_equal(extremes[0][0], extremes[1][0], err_msg=str(K))
        np.testing.assert_array_equal(extremes[0][1], extremes[1][1], err_msg=str(K))
        if K % 16 == 0:  # the projection's last step too: clip to each row's zone, subtract, scale back inside
            shrunk = both_paths(monkeypatch, projection.project_accumulator_range, w, x, -(1 << 11), (1 << 11) - 1)
            np.testing.assert_array_equal(shrunk[0], shrunk[1], err_msg=str(K))
