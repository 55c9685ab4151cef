"""Registry of projection methods: the built-in ``a2q``, ``a2q+`` and ``exact``, plus plugins.

A method is any object with a ``name``, a one-line ``description`` and
``project(v, x, acc_bits, weight_range) -> ProjectionResult`` (see
:mod:`a2q_passes.projection` for the contract). Third-party packages add methods through the
entry-point group ``a2q_passes.methods``; each entry point, named like the method, loads to
a method object, a class or a zero-argument factory returning one::

    [project.entry-points."a2q_passes.methods"]
    my-method = "my_package.module:MyMethod"

Plugins are loaded lazily, once, on the first lookup; one that fails to load is skipped
with a warning naming its entry point. :func:`project_weights` runs any method and checks
its result, so a broken plugin cannot hand back weights that overflow the accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from a2q_passes import bounds, kernels, projection
from a2q_passes.bounds import IntRange
from a2q_passes.conventions import DEFAULT_METHOD  # noqa: F401 (re-exported: the CLI reads it from there)
from a2q_passes.plugins import Registry
from a2q_passes.projection import ProjectionResult
from a2q_passes.row_blocks import rows_per_block

ENTRY_POINT_GROUP = "a2q_passes.methods"


@runtime_checkable
class ProjectionMethod(Protocol):
    name: str
    description: str

    def project(self, v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange) -> ProjectionResult: ...


@dataclass(frozen=True)
class FunctionMethod:
    """A method backed by a plain function with the ``project`` signature."""

    name: str
    description: str
    function: Callable[[np.ndarray, IntRange, int, IntRange], ProjectionResult]

    def project(self, v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange) -> ProjectionResult:
        return self.function(v, x, acc_bits, weight_range)


METHODS: Registry[ProjectionMethod] = Registry("projection method", ENTRY_POINT_GROUP, ProjectionMethod, "project",
                                               "(v, x, acc_bits, weight_range)")


def register_method(name: str, method: ProjectionMethod, *, replace: bool = False) -> None:
    """Add ``method`` under ``name`` (which must equal ``method.name``)."""
    METHODS.register(name, method, replace=replace)


def available_methods() -> list[str]:
    """Names of all methods, built-in and plugins, sorted."""
    return METHODS.names()


def get_method(name: str) -> ProjectionMethod:
    """The method registered as ``name``; ValueError listing the available ones otherwise."""
    return METHODS.get(name)


def project_weights(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange,
                    method: str = DEFAULT_METHOD) -> ProjectionResult:
    """Run the named method and check its result against the contract (raises RuntimeError if broken).

    Checked: shape and integer type, weights inside ``weight_range``, every row inside the
    layer's accumulator range, and rows whose plain rounding already fitted left untouched.
    """
    chosen = get_method(method)
    v = np.asarray(v)
    # integer rows (an int8 layer's stored codes) stay narrow where the built-in methods take them, converted to
    # float64 a block of rows at a time; any other method gets the float64 rows the contract describes
    if chosen not in _BUILTIN_METHODS:
        v = v.astype(np.float64, copy=False)
    result = chosen.project(v, x, acc_bits, weight_range)
    v = np.atleast_2d(v)
    q = np.asarray(result.weights)
    problem = None
    if q.shape != v.shape or q.dtype.kind not in "iu":
        problem = f"returned weights of shape {q.shape} and dtype {q.dtype} for input of shape {v.shape}"
    elif q.size and (q.min() < weight_range.lo or q.max() > weight_range.hi):
        problem = f"returned weights outside [{weight_range.lo}, {weight_range.hi}]"
    else:
        outside, changed, limits = _contract_rows(v, q, x, acc_bits, weight_range)
        if outside.any():
            problem = f"left rows {np.flatnonzero(outside).tolist()[:10]} outside the {acc_bits}-bit accumulator {limits}"
        elif changed.any():
            problem = f"changed rows {np.flatnonzero(changed).tolist()[:10]} that already fitted"
    if problem:
        raise RuntimeError(f"projection method {method!r} broke its contract: {problem}")
    return result


def _contract_rows(v: np.ndarray, q: np.ndarray, x: IntRange, acc_bits: int,
                   weight_range: IntRange) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Rows of ``q`` outside the layer's accumulator, rows changed although their plain rounding fitted, and the
    accumulator's ``(min, max)``.

    One pass a block of rows at a time (no whole-layer rounded copy): per block, the plain rounding's and
    ``q``'s exact per-row ranges and which rows differ; the layer's INT/UINT choice (some plain-rounded row
    reaches below 0, :func:`projection.layer_accumulator_limits`) needs every row, so it is applied after.
    """
    if v.shape[0] == 0:
        none = np.zeros(0, dtype=bool)
        return none, none, projection.layer_accumulator_limits(q, x, acc_bits)
    plain_ranges, q_ranges, differs = [], [], []
    step = rows_per_block(v.shape[1])
    for start in range(0, v.shape[0], step):
        v_block, q_block = np.asarray(v[start:start + step], dtype=np.float64), q[start:start + step]
        sums = kernels.contract_rows(v_block, q_block, weight_range.lo, weight_range.hi) if kernels.wanted(
            v_block.size) else None
        if sums is not None:  # the same figures in one compiled pass, the rounding never stored
            plain_pos, plain_neg, q_pos, q_neg, block_differs = sums
            plain_ranges.append(bounds.range_from_sums(plain_pos, plain_neg, x))
            q_ranges.append(bounds.range_from_sums(q_pos, q_neg, x))
            differs.append(block_differs)
            continue
        plain = projection.plain_round(v_block, weight_range)
        plain_ranges.append(bounds.exact_accumulator_range(plain, x))
        q_ranges.append(bounds.exact_accumulator_range(q_block, x))
        differs.append(np.any(q_block != plain, axis=1))
    plain_min, plain_max = (np.concatenate([r[i] for r in plain_ranges]) for i in (0, 1))
    q_min, q_max = (np.concatenate([r[i] for r in q_ranges]) for i in (0, 1))
    low, high = bounds.accumulator_limits(acc_bits, signed=bool((plain_min < 0).any()))
    outside = ~np.asarray((q_min >= low) & (q_max <= high), dtype=bool)
    plain_fits = np.asarray((plain_min >= low) & (plain_max <= high), dtype=bool)
    return outside, np.concatenate(differs) & plain_fits, (low, high)


_BUILTIN_METHODS = (
    FunctionMethod("a2q", "A2Q: Euclidean projection onto the A2Q l1 ball, round toward zero", projection.project_a2q),
    FunctionMethod("a2q+", "A2Q+: zero-centred rows on the A2Q+ l1 ball (exact where zero sum is unreachable)",
                   projection.project_a2q_plus),
    FunctionMethod("exact", "projection onto the exact accumulator range, rounded to use all of it (default)",
                   projection.project_exact),
)
for _builtin in _BUILTIN_METHODS:
    register_method(_builtin.name, _builtin)
