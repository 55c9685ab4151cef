"""Shape inference for the certificate, once per certified model."""

from __future__ import annotations

import contextlib
from typing import Iterator

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.read_only_model import with_inferred_shapes

# Filled only inside shapes_cached (the key "active" says so), emptied when it ends.
_INFERRED: dict = {}


def inferred_shapes(model: ModelWrapper) -> ModelWrapper:
    """A read-only copy of ``model`` with qonnx's shape inference applied (ONNX's alone where the graph has no qonnx
    or FINN custom op: qonnx's would only re-wrap the model, quadratic in its size, see
    :func:`a2q_passes.read_only_model.with_inferred_shapes`); one per model inside :func:`shapes_cached`.

    Why cached: inference walks the whole graph, and a transformer stack asks once per layer;
    certifying does not change the graph.
    """
    key = id(model.model)
    if key not in _INFERRED:
        inferred = with_inferred_shapes(model)
        if not _INFERRED.get("active"):
            return inferred
        _INFERRED[key] = inferred
    return _INFERRED[key]


@contextlib.contextmanager
def shapes_cached() -> Iterator[None]:
    """Within this block each model's shapes are inferred once; the copies are released when it ends."""
    _INFERRED.clear()
    _INFERRED["active"] = True
    try:
        yield
    finally:
        _INFERRED.clear()
