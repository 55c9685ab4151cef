"""The record a2q keeps in the model's ``metadata_props`` (never as attributes on standard ONNX nodes).

It lives in ``ModelProto.metadata_props`` (the model-level metadata that ONNX tools and
Netron show), so the graph itself, and therefore its execution, are untouched.
"""

from __future__ import annotations

import json

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError

ACCUMULATORS_KEY = "a2q.accumulators"
# the outputs of the Quant nodes the lowering made from QuantizeLinear, which rounds x / s before it adds the zero
# point (a Quant adds it first): written by finn_quant_forms.QuantFromQDQ, read and removed by
# finn_zero_points.ZeroPointActivationsAsThresholds
QUANTIZE_LINEAR_QUANTS_KEY = "a2q.quantize_linear_quants"


def metadata_value(model: ModelWrapper, key: str) -> str | None:
    """The value of the ``metadata_props`` entry ``key``, or ``None`` without one."""
    return next((p.value for p in model.model.metadata_props if p.key == key), None)


def set_metadata_value(model: ModelWrapper, key: str, value: str) -> None:
    """Set the ``metadata_props`` entry ``key`` (added after the others where there is none)."""
    entry = next((p for p in model.model.metadata_props if p.key == key), None)
    if entry is None:
        entry = model.model.metadata_props.add()
        entry.key = key
    entry.value = value


def remove_metadata_value(model: ModelWrapper, key: str) -> None:
    """Drop the ``metadata_props`` entry ``key`` where there is one."""
    kept = [p for p in model.model.metadata_props if p.key != key]
    if len(kept) != len(model.model.metadata_props):
        copies = [type(p)(key=p.key, value=p.value) for p in kept]
        del model.model.metadata_props[:]
        model.model.metadata_props.extend(copies)


def record_accumulators(model: ModelWrapper, layers: dict[str, dict], source: str) -> None:
    """Store per-layer accumulator facts (``acc_bits`` at least) under :data:`ACCUMULATORS_KEY`."""
    set_metadata_value(model, ACCUMULATORS_KEY, json.dumps({"source": source, "layers": layers}, sort_keys=True))


def parse_record(value: str) -> dict:
    """The accumulator record in ``value`` (``{"source": ..., "layers": {name: {"acc_bits": ...}}}``); ``ValueError``
    saying what is wrong when it is not such a record (another tool's entry, or an edited one)."""
    try:
        record = json.loads(value)
        layers = record["layers"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err
    if not isinstance(layers, dict) or not all(isinstance(info, dict) and isinstance(info.get("acc_bits"), int)
                                               and info["acc_bits"] >= 1 for info in layers.values()):
        raise ValueError("each layer needs a positive integer acc_bits")
    return record


def record_error(key: str, problem: ValueError, where: str = "the model") -> A2QError:
    return A2QError(f"{where}: the metadata entry '{key}' is not the record a2q writes ({problem}); remove that entry "
                    "from metadata_props (or take the file a2q wrote) and run again")


def read_record(model: ModelWrapper, key: str = ACCUMULATORS_KEY) -> dict | None:
    """The accumulator record stored under ``key``, or ``None`` without one (see :func:`parse_record`)."""
    value = metadata_value(model, key)
    if value is None:
        return None
    try:
        return parse_record(value)
    except ValueError as err:
        raise record_error(key, err) from err


def recorded_accumulators(model: ModelWrapper) -> dict[str, dict]:
    """The per-layer record (empty without one)."""
    record = read_record(model)
    return {} if record is None else record["layers"]


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
