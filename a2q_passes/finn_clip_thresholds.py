"""A float ``Clip`` in front of FINN's ``MultiThreshold`` nodes, folded into their thresholds.

``ConvertQONNXtoFINN`` turns an activation ``Quant`` into a ``MultiThreshold`` but leaves a ``Clip`` in front of it
(a ReLU6, or ``Clip(0, c)`` whose ``c`` lies below the quantizer's top code) as a float node FINN has no HW layer
for; it also keeps streamlining from moving a scale ``Mul`` past it, so the layer behind stays unlowered.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import clip_bounds


def clips_into_thresholds(model: ModelWrapper) -> ModelWrapper:
    """Remove each ``Clip`` with constant scalar bounds whose output only ``MultiThreshold`` nodes read (as data), their
    thresholds made to count on the unclipped input.

    Why this is exact: a ``MultiThreshold`` counts the thresholds ``t <= x``. With ``x`` clipped to ``[lo, hi]``, a
    threshold ``t <= lo`` is always counted, one ``t > hi`` never, and one in between exactly when ``t <= x``. So
    the first become ``-inf`` and the others ``+inf`` (FINN's ``RoundAndClipThresholds`` later clips both to the
    range of an integer input); a NaN input counts nothing either way. The one input that then counts differently
    is ``+inf`` itself (it reaches a ``+inf`` threshold), which only a float graph input can carry.
    """
    model = ModelWrapper(model.model.SerializeToString())  # the flow's observer may hold the model it is given
    graph_outputs = {o.name for o in model.graph.output}
    for clip in [n for n in model.graph.node if n.op_type == "Clip" and n.domain in ("", "ai.onnx")]:
        readers = model.find_consumers(clip.output[0]) or []
        if not readers or clip.output[0] in graph_outputs or any(
                r.op_type != "MultiThreshold" or list(r.input[:1]) != [clip.output[0]] for r in readers):
            continue
        bounds = _scalar_bounds(model, clip)
        names = [r.input[1] for r in readers]  # each reader's own thresholds, all constant
        if bounds is None or len(set(names)) != len(names) or any(model.get_initializer(n) is None for n in names):
            continue
        lo, hi = bounds
        for reader in readers:
            thresholds = np.array(model.get_initializer(reader.input[1]), dtype=np.float32)
            if lo is not None:
                thresholds[thresholds <= lo] = -np.inf
            if hi is not None:
                thresholds[thresholds > hi] = np.inf
            model.set_initializer(reader.input[1], thresholds)
            reader.input[0] = clip.input[0]
        model.graph.node.remove(clip)
    return model


def _scalar_bounds(model: ModelWrapper, clip) -> tuple[np.float32 | None, np.float32 | None] | None:
    """The Clip's bounds as float32 scalars (``None``: that side unbounded), or ``None`` where a bound it is given is
    not one constant value."""
    bounds = []
    for index, value in zip((1, 2), clip_bounds(model, clip)):
        given = len(clip.input) > index and bool(clip.input[index])
        if (value is None and given) or (value is not None and np.size(value) != 1):
            return None
        bounds.append(None if value is None else np.float32(np.asarray(value).reshape(())))
    return bounds[0], bounds[1]
