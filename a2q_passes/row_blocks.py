"""Processing a layer's weights in blocks of rows, on several threads where the layer is large.

Rows are independent in every projection and statistic here, so neither the block size nor the thread count ever
changes a result; blocks bound the temporaries to a small multiple of a block whatever the layer's size.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

# Rows are processed in blocks of about this many weights so temporaries stay a small multiple of a block.
_BLOCK_ELEMENTS = 1 << 20


def rows_per_block(K: int) -> int:
    """Rows of ``K`` weights per block when a layer is processed in blocks of bounded size."""
    return max(1, _BLOCK_ELEMENTS // max(K, 1))


# Threads that project a large layer's row blocks at once: the compiled kernels and numpy's loops over whole blocks
# release the GIL. Each row is projected on its own, so the count never changes a result. By default one per core
# this process may run on, at most MAX_DEFAULT_THREADS: each thread holds a block's temporaries (tens of MB).
MAX_DEFAULT_THREADS = 8
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # no affinity: macOS
_THREADS: ContextVar[int] = ContextVar("projection_threads", default=max(1, min(_CORES, MAX_DEFAULT_THREADS)))


@contextmanager
def projection_threads(count: int) -> Iterator[None]:
    """Within the block, project a layer's row blocks on ``count`` threads (default: one per core this process may
    run on, at most :data:`MAX_DEFAULT_THREADS`)."""
    if count < 1:
        raise ValueError(f"projection threads must be at least 1, got {count}")
    token = _THREADS.set(count)
    try:
        yield
    finally:
        _THREADS.reset(token)


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def in_order(work: Callable[[_Item], _Result], items: list[_Item]) -> Iterator[_Result]:
    """``map(work, items)``, on :func:`projection_threads` threads where there are several items; at most one result
    per thread waits to be consumed, so memory stays a few blocks whatever the layer's size."""
    threads = min(_THREADS.get(), len(items))
    if threads <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="a2q-projection") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
