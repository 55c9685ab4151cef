"""The record a2q keeps in the model's ``metadata_props`` (never as attributes on standard ONNX nodes).

It lives in ``ModelProto.metadata_props`` (the model-level metadata that ONNX tools and
Netron show), so the graph itself, and therefore its execution, are untouched.
"""

from __future__ import annotations

import json

from qonnx.core.modelwrapper import ModelWrapper

ACCUMULATORS_KEY = "a2q.accumulators"


def _entry(model: ModelWrapper, key: str):
    return next((p for p in model.model.metadata_props if p.key == key), None)


def record_accumulators(model: ModelWrapper, layers: dict[str, dict], source: str) -> None:
    """Store per-layer accumulator facts (``acc_bits`` at least) under :data:`ACCUMULATORS_KEY`."""
    payload = json.dumps({"source": source, "layers": layers}, sort_keys=True)
    entry = _entry(model, ACCUMULATORS_KEY)
    if entry is None:
        entry = model.model.metadata_props.add()
        entry.key = ACCUMULATORS_KEY
    entry.value = payload


def recorded_accumulators(model: ModelWrapper) -> dict[str, dict]:
    entry = _entry(model, ACCUMULATORS_KEY)
    return json.loads(entry.value)["layers"] if entry is not None else {}


def recorded_input_ranges(model: ModelWrapper) -> str:
    """``"finn"`` when any recorded layer was sized for FINN's input DataTypes, else ``"exact"``.

    One layer suffices: the finn ranges contain the exact codes, so checking every layer under them
    never passes a layer that the exact ranges would fail.
    """
    sized = {info.get("input_ranges") for info in recorded_accumulators(model).values()}
    return "finn" if "finn" in sized else "exact"


def recorded_widths(model: ModelWrapper) -> dict[str, int]:
    """Per-layer accumulator widths that ``annotate`` or ``project`` recorded in the model."""
    return {name: int(info["acc_bits"]) for name, info in recorded_accumulators(model).items()}


def recorded_tiles(model: ModelWrapper) -> dict[str, tuple[int, int]]:
    """Per layer projected for a multi-stage datapath (``project --tile``): ``(tile, outer_bits)``.

    Its ``acc_bits`` is then the width of each tile's inner accumulator and ``outer_bits`` that of the
    accumulator summing the tile results.
    """
    return {name: (int(info["tile"]), int(info["outer_bits"])) for name, info in recorded_accumulators(model).items()
            if info.get("tile") is not None}
