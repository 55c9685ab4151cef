"""Which accumulator width each MAC layer is checked or simulated at, and where the width came from.

``widths`` is one P for every quantized layer (``WIDTHS_GLOBAL``), a ``{node: P}`` map
(``WIDTHS_SELECTED``: only those layers), or ``None``: the widths ``annotate``/``project``/``finetune``
recorded in the model (``WIDTHS_RECORDED``). ``overrides`` refine any of them per node. Naming a node that
is not a quantized MAC layer is an error that names it.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, MacLayer
from a2q_passes.metadata import recorded_widths
from a2q_passes.projection import MAX_ACC_BITS

WIDTHS_GLOBAL, WIDTHS_SELECTED, WIDTHS_RECORDED = "global", "selected layers", "model metadata"
EVERY_LAYER = "--acc-bits"  # what a width given for every layer is called in messages


def check_width(bits: object, lowest: int, given_for: str) -> None:
    """Refuse an accumulator width that is no integer from ``lowest`` to :data:`MAX_ACC_BITS` bits.

    ``given_for`` names where it came from: :data:`EVERY_LAYER` for one width for the whole model (so the message
    names the option, not the first layer it was applied to), else a layer name.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lowest <= int(bits) <= MAX_ACC_BITS:
        where = given_for if given_for == EVERY_LAYER else f"layer '{given_for}'"
        raise A2QError(f"{where}: accumulator width {bits!r} is out of range; use an integer from {lowest} to "
                       f"{MAX_ACC_BITS} bits")


def check_skips(layers: list[MacLayer], skip: frozenset[str], given: dict[str, int]) -> None:
    """Every name ``--skip`` gives is a MAC layer, and none is also given a width (``project``, ``verify``)."""
    names = {layer.node for layer in layers}
    for name in sorted(skip):
        if name not in names:
            raise A2QError(f"--skip {name}: no MAC layer named '{name}' (layers: {', '.join(sorted(names)) or 'none'})")
        if name in given:
            raise A2QError(f"layer '{name}' is both skipped (--skip) and given a width ({name}={given[name]}); keep one")


def resolve_widths(model: ModelWrapper, layers: list[MacLayer], widths: int | dict[str, int] | None,
                   overrides: dict[str, int] | None = None) -> tuple[dict[str, int], str]:
    """Per-layer widths and where they came from (one of ``WIDTHS_*``); errors name the bad layer."""
    quantized = {layer.node: layer for layer in layers if layer.status != STATUS_WEIGHTS_NOT_QUANTIZED}
    if isinstance(widths, (int, np.integer)):
        check_width(widths, 1, EVERY_LAYER)
        resolved, source = {name: int(widths) for name in quantized}, WIDTHS_GLOBAL
    elif isinstance(widths, dict):
        resolved, source = dict(widths), WIDTHS_SELECTED
    elif widths is None:
        resolved, source = recorded_widths(model), WIDTHS_RECORDED
        if not resolved and not overrides:
            raise A2QError("no accumulator width given and none recorded in the model: pass --acc-bits P, "
                           "--layer NAME=P or --widths-json FILE, or record widths with `a2q annotate` first")
    else:
        raise TypeError(f"widths must be an int, a dict or None, got {type(widths).__name__}")
    resolved.update(overrides or {})
    names = {node.name or node.output[0]: node for node in model.graph.node}
    for name, bits in resolved.items():
        where = "recorded in the model metadata" if source == WIDTHS_RECORDED and name not in (overrides or {}) else "given"
        if name not in names and name not in quantized:  # a reported layer may sit in a subgraph
            mac = ", ".join(quantized) or "none"
            raise A2QError(f"a width is {where} for layer '{name}', but the model has no node of that name "
                           f"(quantized MAC layers: {mac})")
        if name not in quantized:
            node = names[name]
            what = "has float weights" if any(layer.node == name for layer in layers) else f"is a {node.op_type} node"
            raise A2QError(f"a width is {where} for '{name}', which {what}, not a quantized MAC layer")
        check_width(bits, 1, name)
    return {name: int(bits) for name, bits in resolved.items()}, source
