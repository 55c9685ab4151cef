"""The record a2q keeps in the model's ``metadata_props`` (never as attributes on standard ONNX nodes)."""

from __future__ import annotations

import json

from qonnx.core.modelwrapper import ModelWrapper

ACCUMULATORS_KEY = "a2q.accumulators"


def record_accumulators(model: ModelWrapper, layers: dict[str, dict], source: str) -> None:
    """Store per-layer accumulator facts (``acc_bits`` at least) under :data:`ACCUMULATORS_KEY`."""
    payload = {"source": source, "layers": {name: layers[name] for name in sorted(layers)}}
    model.set_metadata_prop(ACCUMULATORS_KEY, json.dumps(payload, sort_keys=True))


def recorded_accumulators(model: ModelWrapper) -> dict[str, dict]:
    raw = model.get_metadata_prop(ACCUMULATORS_KEY)
    return json.loads(raw)["layers"] if raw else {}


def recorded_widths(model: ModelWrapper) -> dict[str, int]:
    """Per-layer accumulator widths that ``annotate`` or ``project`` recorded in the model."""
    return {name: int(info["acc_bits"]) for name, info in recorded_accumulators(model).items()}
