"""FINN's input thresholds moved onto the exact decision boundaries of the ``Quant`` they replace.

``ConvertQONNXtoFINN`` turns a graph input's ``Quant`` into a ``MultiThreshold`` whose float32
thresholds can sit one float32 step on the wrong side of a code boundary; this pass of the lowering
flow (:mod:`a2q_passes.finn_flow`) repairs them so the lowered graph gives the same codes.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.model_io import data_inputs


MAX_THRESHOLD_ULPS = 64  # how far (in float32 steps) an input threshold may be moved to its exact boundary


def exact_input_thresholds(converted: ModelWrapper, original: ModelWrapper) -> ModelWrapper:
    """Move the thresholds of a MultiThreshold that reads a graph input onto the float32 decision
    boundaries of the ``Quant`` it replaced.

    Why: ``ConvertQONNXtoFINN`` computes the threshold between codes k and k+1 as a real number
    ((k + 0.5 - z) * s for ROUND) and stores it as float32. When that real number lies within half
    a float32 step of a representable input, the stored threshold *is* that input and the
    comparison ``x >= t`` flips the code qonnx's ``Quant`` (``round(x / s + z)`` in float32, as
    Brevitas computes it) gives. Inputs on a grid hit this (``models/digits_cnn_w4a4.onnx``: s =
    float32(1/255), x = 0.5: Quant gives code 127, FINN's threshold 127.5 * s rounds to exactly 0.5
    and gives 128). Each threshold j becomes the smallest float32 x whose ``Quant`` output reaches
    level j + 1, found by stepping at most :data:`MAX_THRESHOLD_ULPS` float32 steps; a node whose
    Quant or thresholds do not have the expected form is left as FINN made it (the equivalence
    check still compares it). Only graph inputs are float here: inside the network FINN compares
    integer accumulators against rounded thresholds, which is exact.
    """
    from qonnx.custom_op.general.intquant import int_quant
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.graph_values import get_constant
    from a2q_passes.input_grids import quant_code_range

    model = ModelWrapper(converted.model.SerializeToString())
    changed = False
    # paired by position: FINN's tidy-up renames graph inputs (x -> global_in)
    for source_input, graph_input in zip(data_inputs(original.graph), data_inputs(model.graph)):
        quant = next((n for n in original.find_consumers(source_input.name) or [] if n.op_type == "Quant"), None)
        thresholding = next((n for n in model.find_consumers(graph_input.name) or []
                             if n.op_type == "MultiThreshold"), None)
        if quant is None or thresholding is None:
            continue
        scale, zero, bits = (get_constant(original, t) for t in quant.input[1:4])
        thresholds = model.get_initializer(thresholding.input[1])
        if scale is None or zero is None or bits is None or thresholds is None or np.size(bits) != 1:
            continue
        attrs = getCustomOp(quant)
        signed, narrow, mode = (attrs.get_nodeattr(a) for a in ("signed", "narrow", "rounding_mode"))
        codes = quant_code_range(float(bits), bool(signed), bool(narrow), mode)
        rows, steps = thresholds.shape
        if steps != codes.hi - codes.lo or np.any(np.diff(thresholds, axis=1) < 0):
            continue  # not the plain one-threshold-per-code form this repair is written for
        try:  # per-tensor or per-channel parameters, as (rows | 1, 1) columns
            scale, zero = (np.asarray(v, dtype=np.float32).reshape(-1, 1) for v in (scale, zero))
            np.broadcast_shapes(scale.shape, zero.shape, (rows, 1))
        except ValueError:
            continue
        levels = (np.arange(codes.lo + 1, codes.hi + 1, dtype=np.float32) - zero) * scale  # int_quant's re-scaling

        def reaches(x: np.ndarray) -> np.ndarray:
            return int_quant(x, scale, zero, np.float32(bits), signed, narrow, mode) >= levels

        fixed = np.asarray(thresholds, dtype=np.float32).copy()
        for direction, wrong in ((np.inf, lambda t: ~reaches(t)),  # up while below the level
                                 (-np.inf, lambda t: reaches(np.nextafter(t, np.float32(-np.inf))))):  # down
            for _ in range(MAX_THRESHOLD_ULPS):
                move = wrong(fixed)
                if not move.any():
                    break
                fixed = np.where(move, np.nextafter(fixed, np.float32(direction)), fixed)
        exact = reaches(fixed) & ~reaches(np.nextafter(fixed, np.float32(-np.inf)))
        if exact.all() and not np.array_equal(fixed, thresholds):
            model.set_initializer(thresholding.input[1], fixed.astype(thresholds.dtype))
            changed = True
    return model if changed else converted
