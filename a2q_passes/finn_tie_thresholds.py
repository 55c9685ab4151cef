"""FINN's thresholds on integer inputs made to round exact ties as the QONNX ``Quant`` nodes they replace.

A FINN threshold counts ``x >= t``: a value exactly halfway between two codes goes to the upper code. A QONNX
``Quant`` with ``rounding_mode=ROUND`` (Brevitas' default; what ``QuantizeLinear`` does) rounds it to the even code,
``HALF_UP`` away from zero and ``HALF_DOWN`` toward zero (qonnx's ``resolve_rounding_mode``), so FINN agrees with
``HALF_UP`` on positive ties only. Inside the network FINN compares integer accumulators with thresholds that
streamlining computed in float and ``RoundAndClipThresholds`` later rounds up, so a tie is reachable exactly where a
threshold is an integer. Power-of-two scales (Brevitas' ``*FixedPoint`` quantizers) make every threshold a dyadic
number that streamlining computes exactly, and such ties common. With other scales the float32 thresholds are
rounded (above 2^18 one in 32 float32 values is an integer): an integer there says nothing, and the file's own
float32 arithmetic decides its ties. Only rows whose integer thresholds are exact ties are therefore changed
(:func:`exact_rows`): thresholds stepping by one power of two, or all integers, in a range where float32 resolves
them.

The lowering flow (:mod:`a2q_passes.finn_flow`) applies :func:`round_ties_as_quantized` after FINN's conversion to
HW layers, while the thresholds are still FINN's unrounded values (its equivalence check executes the result
against the file as given); so does the FINN build step ``step_a2q_round_ties`` (:mod:`a2q_passes.finn_steps`),
before FINN's ``step_minimize_bit_width_initial`` rounds them.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.graph_values import get_constant

# where step_a2q_finn_preparation leaves the rule for step_a2q_round_ties (FINN's build steps keep model metadata)
TIE_RULE_KEY = "a2q.activation_tie_rule"
# a Quant's rounding_mode -> where it sends a tie: to the even code, away from zero, toward zero
TIE_RULES = {"ROUND": "even", "HALF_EVEN": "even", "HALF_UP": "away", "HALF_DOWN": "toward"}


def activation_tie_rule(model: ModelWrapper) -> str | None:
    """Where the activation ``Quant`` nodes of ``model`` send an exact tie (a value of :data:`TIE_RULES`), or
    ``None`` when they differ among themselves, use another mode, or there is no such node: FINN's graph keeps no
    link from a threshold back to its ``Quant``, so only one rule for the whole graph can be applied. Also ``None``
    where a scale is not a positive constant: the rules read a code's sign and order from FINN's thresholds, which
    hold for positive scales only. A zero point ``z`` (:mod:`a2q_passes.finn_zero_points`) makes FINN's codes
    ``q - z``: the even rule still holds for even ``z`` (``q`` and ``q - z`` have one parity), no rule otherwise (a
    code's parity or sign is then ``q``'s, which FINN's graph does not show)."""
    from qonnx.custom_op.registry import getCustomOp

    quants = [node for node in model.graph.node
              if node.op_type == "Quant" and model.get_initializer(node.input[0]) is None]
    scales = [model.get_initializer(node.input[1]) for node in quants]
    if any(scale is None or np.any(scale <= 0) for scale in scales):
        return None
    rules = {TIE_RULES.get(getCustomOp(node).get_nodeattr("rounding_mode").upper()) for node in quants}
    rule = rules.pop() if len(rules) == 1 and None not in rules else None
    zeros = [get_constant(model, node.input[2]) for node in quants]
    if any(zero is None or np.any(zero % 2 != 0 if rule == "even" else zero != 0) for zero in zeros):
        return None
    return rule


def round_ties_as_quantized(model: ModelWrapper, rule: str | None) -> ModelWrapper:
    """A copy of HW graph ``model`` in which every threshold of an MVAU/VVAU (with activation) or ``Thresholding``
    node on integer inputs that is an integer ``t``, in a row :func:`exact_rows` takes, becomes ``t + 1`` where
    ``rule`` sends the tie at ``t`` to the lower code (``x >= t + 1`` is ``x > t`` on integers); unchanged for
    ``rule`` ``None``.

    The output code after threshold ``j`` (0-based) of a row is ``c = ActVal + j + 1`` (zero point 0: FINN takes no
    other), and the tie at it lies at ``c - 1/2``. It goes to the lower code ``c - 1`` under ``"even"`` where ``c`` is
    odd, under ``"away"`` (from zero) where ``c <= 0``, and under ``"toward"`` (zero) where ``c >= 1``. Bipolar outputs
    (codes -1, +1: no tie between integers) and float inputs (FINN's graph-input thresholds, which
    :mod:`a2q_passes.finn_input_thresholds` places) are left as they are.
    """
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from a2q_passes.finn_accumulators import is_mac_node

    model = ModelWrapper(model.model.SerializeToString())
    if rule is None:
        return model
    for node in model.graph.node:
        thresholding = node.op_type.startswith("Thresholding")
        if not (thresholding or is_mac_node(node)):
            continue
        inst = getCustomOp(node)
        if not thresholding and (inst.get_nodeattr("noActivation") or len(node.input) < 3):
            continue
        integer_inputs = DataType[inst.get_nodeattr("inputDataType")].is_integer()
        if inst.get_nodeattr("outputDataType") == "BIPOLAR" or not integer_inputs:
            continue
        tensor = node.input[1] if thresholding else node.input[2]
        thresholds = model.get_initializer(tensor)
        if thresholds is None:
            continue
        codes = np.arange(1, thresholds.shape[-1] + 1) + int(inst.get_nodeattr("ActVal"))  # the code each reaches
        goes_down = {"even": codes % 2 == 1, "away": codes <= 0, "toward": codes >= 1}[rule]
        ties = (thresholds == np.floor(thresholds)) & goes_down & exact_rows(thresholds)[..., None]
        if ties.any():
            model.set_initializer(tensor, np.where(ties, thresholds + 1, thresholds).astype(thresholds.dtype))
    return model


def raise_thresholds_below_unsigned_inputs(model: ModelWrapper) -> ModelWrapper:
    """``model`` with the thresholds below 0 of each ``Thresholding`` layer on unsigned integers raised to 0.

    Why: FINN's ``MinimizeWeightBitWidth`` (``step_minimize_bit_width_initial``) asserts that such a layer's thresholds
    are not negative, before its ``RoundAndClipThresholds`` would clip them; a signed quantizer of unsigned values
    (the input quantizer of a classifier behind global pooling's ``GlobalAccPool``) has negative ones. Why it is
    exact: every unsigned ``x`` passes ``x >= 0`` as it passes ``x >= t`` for ``t < 0``. Run after
    :func:`round_ties_as_quantized`, whose rows must still be FINN's progressions. (``lower`` needs no such step: its
    :func:`~a2q_passes.finn_accumulators.set_accumulator_datatypes` runs FINN's ``RoundAndClipThresholds``.)
    """
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    model = ModelWrapper(model.model.SerializeToString())
    for node in model.graph.node:
        if not node.op_type.startswith("Thresholding"):
            continue
        thresholds = model.get_initializer(node.input[1])
        dtype = DataType[getCustomOp(node).get_nodeattr("inputDataType")]
        if thresholds is not None and dtype.is_integer() and not dtype.signed() and np.any(thresholds < 0):
            model.set_initializer(node.input[1], np.maximum(thresholds, 0).astype(thresholds.dtype))
    return model


def exact_rows(thresholds: np.ndarray) -> np.ndarray:
    """Per row of ``thresholds`` (last axis: one row's thresholds, ascending), whether its integer thresholds are
    exact ties: its values are an arithmetic progression (FINN's thresholds for one ``Quant``: one step per code)
    and either

    * the step is exactly a power of two and every value lies below 2^22 (float32 keeps half-integers there): a
      ``Quant`` scale that is a power of two times the accumulator's, which streamlining computes exactly; or
    * every value is an integer, there are at least three, and all lie below 2^16: a scale that is a whole multiple
      of the accumulator's (Brevitas' constant scales such as 0.025 with a power-of-two activation scale). Below
      2^16 a float32 value is an integer by accident with odds of 2^-7, so three or more together are no accident.

    Only the finite thresholds count: a ``Clip`` folded into them (:mod:`a2q_passes.finn_clip_thresholds`) makes
    those it never lets pass ``+inf`` and those it always does ``-inf``, around the progression. A row of one finite
    threshold has no step to check."""
    values = thresholds.astype(np.float64)
    finite = np.isfinite(values)
    count = finite.sum(axis=-1)
    steps = np.diff(np.where(finite, values, np.nan), axis=-1)  # NaN next to an infinite threshold
    first = np.max(np.where(np.isnan(steps), -np.inf, steps), axis=-1, initial=-np.inf)  # the finite step, if any
    progression = (count >= 2) & np.all(np.isnan(steps) | (steps == first[..., None]), axis=-1)
    mantissa, _ = np.frexp(np.where(np.isfinite(first), first, 0.0))
    dyadic = (mantissa == 0.5) & np.all(~finite | (np.abs(values) < 2.0 ** 22), axis=-1)
    integers = (values == np.floor(values)) & (np.abs(values) < 2.0 ** 16)
    whole = (count >= 3) & np.all(~finite | integers, axis=-1)
    return progression & (dyadic | whole)
