"""Mixed accumulator allocation, pure core (no ONNX): per-layer cost models and an exact knapsack.

Every layer has candidate widths P (its exact width down to its smallest feasible P), each with
an integer *cost* (hardware the width decides) and a *loss* (predicted score drop when only this
layer is held to P). The allocation picks one candidate per layer: a multiple-choice knapsack,
solved exactly by dynamic programming over the total cost (:func:`solve_min_cost`,
:func:`solve_max_score`, :func:`pareto_front`). The loss model is additive: the predicted drop of
an allocation is the sum of the single-layer drops; the graph side
(:mod:`a2q_passes.transforms.allocate`) corrects it with end-to-end evaluation.

Cost models are pluggable like the projection methods (:mod:`a2q_passes.methods`): an object
with ``name``, ``description`` and ``cost(layer: LayerShape, acc_bits) -> int``. Built in:

- ``bits``: accumulator registers (``PE x P`` bits) plus threshold storage, ``MH x (2^B - 1)``
  thresholds of ``P + 1`` bits (FINN's ``RoundAndClipThresholds`` gives thresholds one bit more
  than the accumulator) for a layer whose output activation of ``B`` bits becomes thresholds;
- ``finn-lut``: FINN's own LUT estimate of the layer at ``P`` (``MVAU_hls.lut_estimation``),
  tabulated per width by the graph side through :func:`a2q_passes.resources.resource_report`;
- ``acc-bits``: accumulator registers only (``PE x P`` bits, one accumulator per layer), from the layer
  shapes the analysis gives: no FINN lowering, so it serves models FINN does not take (QDQ files).

A cost model that reads no FINN facts says so with ``needs_finn = False`` (default ``True``: the
graph side lowers the model with FINN to fill :class:`LayerShape`).

Third-party cost models register through the entry-point group ``a2q_passes.cost_models``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from a2q_passes.plugins import Registry

ENTRY_POINT_GROUP = "a2q_passes.cost_models"
DEFAULT_COST_MODEL = "bits"
_DP_CELLS_LIMIT = 400_000_000  # layers x distinct total costs the dynamic programme may tabulate


@dataclass(frozen=True)
class LayerShape:
    """What a layer's hardware cost depends on (FINN MVAU/VVAU view).

    ``output_bits`` is ``None`` for a layer without thresholds (``noActivation``: the last layer
    of a classifier). ``finn_lut`` maps a width P to FINN's LUT estimate of the layer at P
    (empty where it was not computed).
    """

    name: str
    channels: int  # MH (MVAU) or Channels (VVAU)
    pe: int = 1
    output_bits: int | None = None
    finn_lut: Mapping[int, int] = field(default_factory=dict)


@runtime_checkable
class CostModel(Protocol):
    name: str
    description: str

    def cost(self, layer: LayerShape, acc_bits: int) -> int: ...


@dataclass(frozen=True)
class FunctionCost:
    """A cost model backed by a plain function ``(layer, acc_bits) -> int``."""

    name: str
    description: str
    function: Callable[[LayerShape, int], int]
    needs_finn: bool = True  # whether ``function`` reads facts only FINN's lowering gives (MH, thresholds, LUTs)

    def cost(self, layer: LayerShape, acc_bits: int) -> int:
        return self.function(layer, acc_bits)


def accumulator_register_cost(layer: LayerShape, acc_bits: int) -> int:
    """The accumulator registers of one layer at ``acc_bits``, in bits (``PE`` of them)."""
    return layer.pe * acc_bits


def accumulator_bits_cost(layer: LayerShape, acc_bits: int) -> int:
    """Accumulator registers plus threshold storage of one layer at ``acc_bits``, in bits."""
    registers = accumulator_register_cost(layer, acc_bits)
    if layer.output_bits is None:
        return registers
    return registers + layer.channels * ((1 << layer.output_bits) - 1) * (acc_bits + 1)


def needs_finn(model: CostModel) -> bool:
    """Whether ``model`` costs layers from FINN's lowering (plugins without the attribute are taken to)."""
    return bool(getattr(model, "needs_finn", True))


def finn_lut_cost(layer: LayerShape, acc_bits: int) -> int:
    """FINN's LUT estimate of the layer at ``acc_bits``, as tabulated by the graph side."""
    try:
        return int(layer.finn_lut[acc_bits])
    except KeyError:
        raise ValueError(f"layer '{layer.name}': no FINN LUT estimate at {acc_bits} bits "
                         f"(tabulated: {sorted(layer.finn_lut) or 'none'})") from None


COST_MODELS: Registry[CostModel] = Registry("cost model", ENTRY_POINT_GROUP, CostModel, "cost", "(layer, acc_bits)")


def register_cost_model(name: str, model: CostModel, *, replace: bool = False) -> None:
    """Add ``model`` under ``name`` (which must equal ``model.name``)."""
    COST_MODELS.register(name, model, replace=replace)


def available_cost_models() -> list[str]:
    return COST_MODELS.names()


def get_cost_model(name: str) -> CostModel:
    """The cost model registered as ``name``; ValueError listing the available ones otherwise."""
    return COST_MODELS.get(name)


def layer_cost(model: CostModel, layer: LayerShape, acc_bits: int) -> int:
    """``model.cost`` checked: a non-negative integer (the knapsack is exact over integer costs)."""
    value = model.cost(layer, acc_bits)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"cost model {model.name!r} returned {value!r} for layer '{layer.name}' at {acc_bits} bits; "
                         "costs must be non-negative integers")
    return int(value)


for _builtin in (
    FunctionCost("bits", "accumulator registers (PE x P) + threshold storage (MH x (2^B - 1) x (P + 1)) in bits",
                 accumulator_bits_cost),
    FunctionCost("finn-lut", "FINN's LUT estimate (MVAU_hls/VVAU_hls lut_estimation) at P", finn_lut_cost),
    FunctionCost("acc-bits", "accumulator registers (PE x P, PE = 1) in bits, without FINN: for models FINN does not "
                 "lower (QDQ)", accumulator_register_cost, needs_finn=False),
):
    register_cost_model(_builtin.name, _builtin)


# ----------------------------------------------------------------------------- knapsack


@dataclass(frozen=True)
class Choice:
    """One candidate of one layer: width, cost, predicted loss (score drop, >= 0 is expected)."""

    bits: int
    cost: int
    loss: float


@dataclass(frozen=True)
class Solution:
    picks: tuple[int, ...]  # index into each layer's candidate list
    cost: int
    loss: float


class _Table:
    """``best[c]``: least total loss of a pick with total cost ``offset + c`` (inf if none); backpointers."""

    def __init__(self, groups: Sequence[Sequence[Choice]]) -> None:
        if not groups or any(not g for g in groups):
            raise ValueError("every layer needs at least one candidate")
        self.groups = groups
        mins = [min(c.cost for c in g) for g in groups]
        self.offset = sum(mins)
        # common divisor of all cost steps: fewer cells, same optimum
        step = 0
        for g, low in zip(groups, mins):
            for c in g:
                step = math.gcd(step, c.cost - low)
        self.step = step or 1
        shifted = [[(c.cost - low) // self.step for c in g] for g, low in zip(groups, mins)]
        size = sum(max(s) for s in shifted) + 1
        if size * len(groups) > _DP_CELLS_LIMIT:
            raise ValueError(f"the knapsack would tabulate {size} total costs for {len(groups)} layers; "
                             "use a coarser cost model")
        best = np.full(size, np.inf)
        best[0] = 0.0
        self.back: list[np.ndarray] = []
        reach = 0
        for g, costs in zip(groups, shifted):
            new = np.full(size, np.inf)
            pick = np.full(size, -1, dtype=np.int32)
            for j, (choice, c) in enumerate(zip(g, costs)):
                candidate = np.full(size, np.inf)
                candidate[c:c + reach + 1] = best[:reach + 1] + choice.loss
                better = candidate < new  # strict: ties keep the earlier candidate (deterministic)
                new[better] = candidate[better]
                pick[better] = j
            reach += max(costs)
            best = new
            self.back.append(pick)
        self.best = best
        self.shifted = shifted

    def picks(self, index: int) -> tuple[int, ...]:
        picks = []
        for g in range(len(self.groups) - 1, -1, -1):
            j = int(self.back[g][index])
            picks.append(j)
            index -= self.shifted[g][j]
        return tuple(reversed(picks))

    def solution(self, index: int) -> Solution:
        picks = self.picks(index)
        return Solution(picks, sum(g[j].cost for g, j in zip(self.groups, picks)),
                        float(sum(g[j].loss for g, j in zip(self.groups, picks))))


def _tolerance(values: Sequence[float]) -> float:
    return 1e-9 * max(1.0, *(abs(v) for v in values))


def solve_min_cost(groups: Sequence[Sequence[Choice]], max_loss: float) -> Solution | None:
    """The cheapest pick (one candidate per layer) whose total loss is at most ``max_loss``; None if none.

    Among equally cheap picks the one with the least loss.
    """
    table = _Table(groups)
    ok = np.flatnonzero(table.best <= max_loss + _tolerance([max_loss]))
    return table.solution(int(ok[0])) if ok.size else None


def solve_max_score(groups: Sequence[Sequence[Choice]], budget: int) -> Solution | None:
    """The pick with the least total loss whose total cost is at most ``budget``; None if none fits.

    Among picks of equal loss the cheapest.
    """
    table = _Table(groups)
    if budget < table.offset:
        return None
    limit = min((budget - table.offset) // table.step, len(table.best) - 1)
    window = table.best[:limit + 1]
    finite = np.isfinite(window)
    if not finite.any():
        return None
    least = window[finite].min()
    return table.solution(int(np.flatnonzero(window <= least + _tolerance([least]))[0]))


def pareto_front(groups: Sequence[Sequence[Choice]]) -> list[Solution]:
    """Every pick on the cost / loss Pareto front, by increasing cost (each strictly less loss than the last)."""
    table = _Table(groups)
    front: list[Solution] = []
    for index in np.flatnonzero(np.isfinite(table.best)):
        value = float(table.best[index])
        if not front or value < front[-1].loss - _tolerance([front[-1].loss]):
            front.append(table.solution(int(index)))
    return front


def minimum_cost(groups: Sequence[Sequence[Choice]]) -> int:
    """The smallest total cost any pick reaches (every layer at its cheapest candidate)."""
    return sum(min(c.cost for c in g) for g in groups)
