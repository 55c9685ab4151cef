"""Progress bars for the per-layer work of large models (projection, proof, certificate) and long data runs.

The library shows none unless asked: a caller turns them on with :func:`shown` (the ``a2q`` command line does,
for every command). A bar goes to stderr, only where stderr is a terminal, and only once its loop has run for
:data:`DELAY_S` seconds, so small models, pipes and log files never see one; it is cleared when the loop ends.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, TypeVar

DELAY_S = 1.0  # a loop that ends sooner shows no bar

_SHOWN: ContextVar[bool] = ContextVar("a2q_progress_shown", default=False)
_Item = TypeVar("_Item")


@contextmanager
def shown(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`over_layers` shows its bars (where stderr is a terminal)."""
    token = _SHOWN.set(enabled)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def over_layers(items: Iterable[_Item], desc: str, unit: str = "layer") -> Iterable[_Item]:
    """``items`` (one per layer, or per ``unit``), with a bar labelled ``desc`` when :func:`shown` is on."""
    if not _SHOWN.get():
        return items
    from tqdm import tqdm  # here, not at start-up: `a2q --version` and `--help` never draw a bar

    items = list(items)
    # disable=None: tqdm turns itself off where stderr is not a terminal
    return tqdm(items, desc=desc, unit=unit, total=len(items), leave=False, file=sys.stderr, delay=DELAY_S,
                disable=None)
