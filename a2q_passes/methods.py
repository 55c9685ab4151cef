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

from a2q_passes import projection
from a2q_passes.bounds import IntRange
from a2q_passes.plugins import Registry
from a2q_passes.projection import ProjectionResult

ENTRY_POINT_GROUP = "a2q_passes.methods"
DEFAULT_METHOD = "exact"


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
    result = get_method(method).project(v, x, acc_bits, weight_range)
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    q = np.asarray(result.weights)
    problem = None
    if q.shape != v.shape or q.dtype.kind not in "iu":
        problem = f"returned weights of shape {q.shape} and dtype {q.dtype} for input of shape {v.shape}"
    elif q.size and (q.min() < weight_range.lo or q.max() > weight_range.hi):
        problem = f"returned weights outside [{weight_range.lo}, {weight_range.hi}]"
    else:
        plain = projection.plain_round(v, weight_range)
        limits = projection.layer_accumulator_limits(plain, x, acc_bits)
        outside = ~projection.rows_within(q, x, limits)
        changed = np.any(q != plain, axis=1) & projection.rows_within(plain, x, limits)
        if outside.any():
            problem = f"left rows {np.flatnonzero(outside).tolist()[:10]} outside the {acc_bits}-bit accumulator {limits}"
        elif changed.any():
            problem = f"changed rows {np.flatnonzero(changed).tolist()[:10]} that already fitted"
    if problem:
        raise RuntimeError(f"projection method {method!r} broke its contract: {problem}")
    return result


for _builtin in (
    FunctionMethod("a2q", "A2Q: Euclidean projection onto the A2Q l1 ball, round toward zero", projection.project_a2q),
    FunctionMethod("a2q+", "A2Q+: zero-centred rows on the A2Q+ l1 ball (exact where zero sum is unreachable)",
                   projection.project_a2q_plus),
    FunctionMethod("exact", "projection onto the exact accumulator range, rounded to use all of it (default)",
                   projection.project_exact),
):
    register_method(_builtin.name, _builtin)
