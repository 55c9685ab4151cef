"""FINN's input thresholds moved onto the exact decision boundaries of the ``Quant`` they replace.

``ConvertQONNXtoFINN`` turns a graph input's ``Quant`` into a ``MultiThreshold`` whose float32
thresholds can sit one float32 step on the wrong side of a code boundary; this pass of the lowering
flow (:mod:`a2q_passes.finn_flow`) repairs them so the lowered graph gives the same codes.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.model_io import data_inputs


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
    level j + 1 (:func:`quant_boundaries`); a node whose Quant or thresholds do not have the
    expected form is left as FINN made it (the equivalence check still compares it). Only graph
    inputs are float here: inside the network FINN compares integer accumulators against rounded
    thresholds, which is exact.
    """
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.graph_values import get_constant

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
        fixed = quant_boundaries(thresholds, scale, zero, float(np.asarray(bits).reshape(-1)[0]), bool(signed),
                                 bool(narrow), mode)
        if fixed is not None and not np.array_equal(fixed, thresholds):
            model.set_initializer(thresholding.input[1], fixed.astype(thresholds.dtype))
            changed = True
    return model if changed else converted


def quant_boundaries(thresholds: np.ndarray, scale: np.ndarray | float, zero: np.ndarray | float, bits: float,
                     signed: bool, narrow: bool, mode: str, quantize_linear: bool = False) -> np.ndarray | None:
    """``thresholds`` (rows x one per code step, float32) of the ``Quant`` with these parameters, each moved onto its
    exact float32 decision boundary: threshold j becomes the smallest float32 ``x`` whose ``Quant`` output (qonnx's
    ``int_quant``, in its own float32 arithmetic) reaches level j + 1, found by bisecting the float32 values between
    one step below and one step above it. A ``MultiThreshold`` (``x >= t``) then gives the ``Quant``'s code for every
    float32 input, exact ties included (the rounding mode decides where those go), and near-ties too: ``x / s + z``
    rounds to float32 before the ``Quant`` rounds it, so with a zero point inputs several hundred float32 steps from
    ``s (k + 1/2 - z)`` can round as the tie. ``quantize_linear``: the boundaries of the ``QuantizeLinear`` the
    ``Quant`` was made from instead (``round(x / s)`` to even, then ``+ z``, saturated). None where a threshold cannot
    be placed so (not the plain one-threshold-per-code form, or a quantizer not increasing in ``x``, as a negative
    scale makes it)."""
    from qonnx.custom_op.general.intquant import int_quant

    from a2q_passes.input_grids import quant_code_range

    codes = quant_code_range(bits, signed, narrow, mode)
    rows, steps = thresholds.shape
    if steps != codes.hi - codes.lo or np.any(np.diff(thresholds, axis=1) < 0):
        return None
    try:  # per-tensor or per-channel parameters, as (rows | 1, 1) columns
        scale, zero = (np.asarray(v, dtype=np.float32).reshape(-1, 1) for v in (scale, zero))
        np.broadcast_shapes(scale.shape, zero.shape, (rows, 1))
    except ValueError:
        return None
    levels = (np.arange(codes.lo + 1, codes.hi + 1, dtype=np.float32) - zero) * scale  # int_quant's re-scaling

    def reaches(keys: np.ndarray) -> np.ndarray:
        x = _float32_of(keys)
        if quantize_linear:
            codes_of_x = np.clip(np.rint(x / scale) + zero, np.float32(codes.lo), np.float32(codes.hi))
            return (codes_of_x - zero) * scale >= levels
        return int_quant(x, scale, zero, np.float32(bits), signed, narrow, mode) >= levels

    thresholds = np.asarray(thresholds, dtype=np.float32)
    step = np.abs(scale).astype(np.float64)
    below = _ordered_keys((thresholds - step).astype(np.float32))  # the Quant's output is below level j + 1 here
    above = _ordered_keys((thresholds + step).astype(np.float32))  # and reaches it here
    below, above = np.broadcast_arrays(below, above)
    if reaches(below).any() or not reaches(above).all():
        return None
    below, above = below.copy(), above.copy()
    while np.any(above - below > 1):  # at most 32 rounds: the keys of float32 values span 2^32
        middle = below + (above - below) // 2
        reached = reaches(middle)
        above, below = np.where(reached, middle, above), np.where(reached, below, middle)
    return _float32_of(above)


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """Integers in the order of the float32 ``values`` (adjacent floats: adjacent integers; -0.0 and 0.0 both 0)."""
    bits = np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _float32_of(keys: np.ndarray) -> np.ndarray:
    """The float32 values of :func:`_ordered_keys`' integers."""
    bits = np.where(keys < 0, (-keys) | 0x80000000, keys)
    return bits.astype(np.uint32).view(np.float32)
