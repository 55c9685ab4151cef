"""Compiled (numba) integer check of the certificate's large executed weight tensors.

:func:`integer_quotients` is ``certificate.execution.as_integers`` for a C-contiguous tensor of many values: each value
(as float64) divided by its divisor, rounded half to even, must lie within the tolerance of that integer; the
same float64 operations in one pass over the values instead of half a dozen numpy passes, and the integers
written in the narrowest type holding them (int8 in that pass; a wider range in a second one), not int64. Anything it does not accept (a value off
its integer, NaN, infinities, integers past 2^62) returns ``None``: the caller then runs the numpy check, which
names the problem. Imported only by the certificate, only for large tensors (numba's import and its first
compilation, cached on disk, would slow down every small model); kept apart from the reader's kernels.
"""

from __future__ import annotations

from a2q_passes import bounds
from a2q_passes.numba_cache import choose_cache_folder

choose_cache_folder()  # before numba's import, which reads the cache folder once

import numba  # noqa: E402
import numpy as np  # noqa: E402

_LARGEST = float(1 << 62)


@numba.njit(cache=True)
def _check_and_write(values, divisor, absolute, relative, out):  # pragma: no cover
    """``(accepted, smallest, largest)`` of ``rint(values / divisor)`` over a 2-D tensor (divisor broadcast), each
    integer written to ``out`` clamped to its type (exact where the range fits it)."""
    smallest, largest = np.inf, -np.inf
    low, high = np.float64(np.iinfo(out.dtype).min), np.float64(np.iinfo(out.dtype).max)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            quotient = np.float64(values[i, j]) / divisor[i, j]
            rounded = np.rint(quotient)
            off = abs(quotient - rounded)
            if not off <= abs(rounded) * relative + absolute:  # NaN fails every comparison
                return False, 0.0, 0.0
            smallest = min(smallest, rounded)
            largest = max(largest, rounded)
            out[i, j] = min(max(rounded, low), high)
    return True, smallest, largest


def integer_quotients(values: np.ndarray, divisor: np.ndarray | None, absolute: float,
                      relative: float) -> np.ndarray | None:
    """``rint(values / divisor)`` in the narrowest integer type, where every quotient is within
    ``|rint| * relative + absolute`` of it; ``None`` where one is not (or the kernel does not apply).

    ``values``: C-contiguous, at least 1-D; ``divisor``: broadcastable to it (``None``: 1). The integers are
    written as int8 on the way (one pass for 8-bit weights); a wider range is written again in its type.
    """
    shape = values.shape
    flat = values.reshape(shape[0], -1)
    divisor = np.ones((), dtype=np.float64) if divisor is None else np.asarray(divisor, dtype=np.float64)
    spread = np.broadcast_to(divisor, shape).reshape(flat.shape)
    if spread.size > divisor.size and not np.shares_memory(spread, divisor):
        return None  # the broadcast divisor has no 2-D view: reshaping copied it value by value
    out = np.empty(flat.shape, dtype=np.int8)
    accepted, smallest, largest = _check_and_write(flat, spread, absolute, relative, out)
    if not accepted or smallest < -_LARGEST or largest > _LARGEST:
        return None
    if flat.size and (smallest < -128 or largest > 127):
        out = np.empty(flat.shape, dtype=bounds.smallest_signed_type(int(smallest), int(largest)))
        _check_and_write(flat, spread, absolute, relative, out)
    return out.reshape(shape)
