"""Which layers fine-tuning constrains, at which width, and the exact re-check of the result (graph side).

A layer is *constrained* when it is a MAC layer (:func:`a2q_passes.layers.find_mac_layers`) whose
input lives on an integer grid and whose weights come from a QONNX ``Quant`` on an initializer:
those are the weights the torch bridge trains and the accumulator a target width applies to.
Every other MAC layer is left as it is and listed in :class:`Selection.skipped`.

Training updates every Quant weight of the graph, so a constrainable layer without a target
(``--layer`` on other layers, or ``--skip``) is *held*: :func:`enforce_widths` projects it back to
its exact width before training if training widened it, so it never needs a wider accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.bounds import IntRange
from a2q_passes.errors import A2QError
from a2q_passes.layers import STATUS_WEIGHTS_NOT_QUANTIZED, MacLayer, find_mac_layers
from a2q_passes.weight_sources import apply_perms, write_mac_weights
from a2q_passes.projection import InfeasibleTarget, check_target, project_exact


@dataclass
class ConstrainedLayer:
    """One constrained MAC layer and the map between its stored weight tensor and accumulator rows.

    ``row_index[r, k]`` is the flat position in the stored weight initializer of term k of row r
    (``-1`` for padding, ConvTranspose only): ``rows = stored.reshape(-1)[row_index]``. It folds the
    weight ``Transpose``s between the ``Quant`` and the MAC node and the MAC's row layout into one
    gather, usable on numpy arrays and torch tensors alike.
    """

    mac: MacLayer
    acc_bits: int
    stored_shape: tuple[int, ...]
    row_index: np.ndarray

    @classmethod
    def of(cls, model: ModelWrapper, mac: MacLayer, acc_bits: int) -> "ConstrainedLayer":
        source = mac.source
        shape = tuple(model.get_initializer(source.tensor).shape)
        flat = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)  # 1-based so padding (0) maps to -1
        row_index = mac.layout.to_rows(apply_perms(flat, source.perms)).astype(np.int64) - 1
        counts = np.bincount(row_index[row_index >= 0], minlength=flat.size)
        if not (counts == 1).all():
            raise A2QError(f"layer '{mac.node}': some stored weights appear in several accumulator rows; "
                           "fine-tuning needs each weight in exactly one row")
        return cls(mac, int(acc_bits), shape, row_index)

    @property
    def node(self) -> str:
        return self.mac.node

    @property
    def tensor(self) -> str:
        """The float weight initializer the ``Quant`` node quantizes."""
        return self.mac.source.tensor

    @property
    def x(self) -> IntRange:
        return self.mac.grid.range

    @property
    def weight_range(self) -> IntRange:
        return self.mac.source.weight_range

    @property
    def scale(self) -> np.ndarray:
        """The ``Quant`` scale, broadcast to the stored tensor's shape."""
        return np.broadcast_to(self.mac.source.scale, self.stored_shape)

    def to_rows(self, stored: np.ndarray) -> np.ndarray:
        """``(rows, K)`` accumulator rows of a tensor in the stored layout (padding reads as 0)."""
        flat = np.asarray(stored).reshape(-1)
        return np.where(self.row_index >= 0, flat[np.maximum(self.row_index, 0)], 0)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_rows`: a tensor in the stored layout."""
        flat = np.zeros(int(np.prod(self.stored_shape)), dtype=rows.dtype)
        valid = self.row_index >= 0
        flat[self.row_index[valid]] = rows[valid]
        return flat.reshape(self.stored_shape)

    def width(self, rows: np.ndarray) -> int:
        """Exact accumulator width of integer rows (the measure :meth:`fits` compares with ``acc_bits``)."""
        acc_min, acc_max = bounds.exact_accumulator_range(rows, self.x)
        return int(bounds.accumulator_width(int(acc_min.min()), int(acc_max.max())))

    def fits(self, rows: np.ndarray) -> bool:
        """Whether integer rows fit ``acc_bits`` (exact range, ``UINT`` when no row reaches below 0)."""
        acc_min, acc_max = bounds.exact_accumulator_range(rows, self.x)
        return bool(bounds.fits(int(acc_min.min()), int(acc_max.max()), self.acc_bits))


@dataclass
class Selection:
    layers: list[ConstrainedLayer]
    skipped: dict[str, str] = field(default_factory=dict)  # MAC node -> why it is not constrained
    held: list[ConstrainedLayer] = field(default_factory=list)  # no target: acc_bits is the width before training

    def by_node(self) -> dict[str, ConstrainedLayer]:
        return {layer.node: layer for layer in self.layers}


ACT_X_ACT_REASON = "activation x activation MatMul: no weights to train (its range is checked, not changed)"
# what each weight source (a2q_passes.weight_sources.WeightSource.kind) is, in a refusal's words
_WEIGHT_SOURCE_WORDS = {"initializer": "a constant (integers annotated with a FINN DataType)",
                        "bipolar_quant": "a BipolarQuant's", "dequantize_linear": "a DequantizeLinear of stored integers",
                        "quantize_dequantize": "a QuantizeLinear/DequantizeLinear pair's",
                        "integer_operand": "an integer op's operand"}


def _constrainable(layer: MacLayer) -> str:
    """Empty string if the layer can be constrained, else the reason it cannot."""
    if layer.status == STATUS_WEIGHTS_NOT_QUANTIZED:
        return "float weights"
    if not layer.ok:
        return layer.status
    if layer.act_x_act:
        return ACT_X_ACT_REASON
    if layer.source.kind != "quant":
        what = _WEIGHT_SOURCE_WORDS.get(layer.source.kind, f"a {layer.source.kind} source")
        return f"its weights are {what}, not a trainable QONNX Quant"
    if layer.source.bipolar:
        return "bipolar weights (1-bit signed Quant) cannot be shrunk: they hold no zero weight"
    if layer.source.zero_offset is not None or layer.source.raw_zero_point:
        return "weights with a zero point (fine-tuning trains symmetric QONNX weights; `a2q project` reads them)"
    return ""


def select_layers(model: ModelWrapper, acc_bits: int | None, overrides: dict[str, int] | None = None,
                  skip: frozenset[str] | None = None, input_ranges: str = "exact") -> Selection:
    """Constrained layers with their target widths: ``acc_bits`` for all, ``overrides`` per MAC node.

    Raises :class:`A2QError` for an override naming no constrainable layer, for no width at all,
    and :class:`InfeasibleTarget` (naming the layer) for a width that cannot hold a single +-1 weight.
    With ``skip`` given (a promise for the whole model, as fine-tuning makes) a global ``acc_bits``
    must hold for every quantized MAC layer: one that cannot be constrained and does not already
    fit is refused unless ``skip`` names it. ``input_ranges`` gives each layer's input codes ``x``
    (:data:`a2q_passes.layers.INPUT_RANGES`).
    """
    overrides = dict(overrides or {})
    macs = find_mac_layers(model, input_ranges=input_ranges)
    skipped = {m.node: why for m in macs if (why := _constrainable(m))}
    unknown = sorted(set(skip or ()) - {m.node for m in macs})
    if unknown:
        raise A2QError(f"--skip {unknown[0]}: no MAC layer named '{unknown[0]}' "
                       f"(layers: {', '.join(sorted(m.node for m in macs)) or 'none'})")
    if skip is not None and acc_bits is not None:
        _refuse_unconstrained(model, [m for m in macs if m.node in skipped and m.node not in skip], skipped, acc_bits)
        skipped.update({name: "--skip" for name in skip if name not in skipped})
    candidates = [m for m in macs if m.node not in skipped]
    names = {m.node for m in candidates}
    for name in overrides:
        if name not in names:
            why = f" ({skipped[name]})" if name in skipped else ""
            raise A2QError(f"--layer {name}={overrides[name]}: '{name}' is not a constrainable MAC layer{why}; "
                           f"constrainable layers: {', '.join(sorted(names)) or 'none'}")
    if not candidates:
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no MAC layer found"
        raise A2QError(f"no layer to constrain: fine-tuning needs MAC layers with QONNX Quant weights on a "
                       f"quantized input ({detail})")
    layers, held = [], []
    for mac in (m for m in macs if not _constrainable(m)):  # --skip ones too: no target, but trained all the same
        bits = None if mac.node in (skip or ()) else overrides.get(mac.node, acc_bits)
        if bits is None:
            skipped.setdefault(mac.node, "--skip" if mac.node in (skip or ()) else "no target width given")
            held.append(_held(model, mac))
            continue
        try:
            check_target(mac.grid.range, bits, mac.source.weight_range)
        except InfeasibleTarget as err:
            raise InfeasibleTarget(f"layer '{mac.node}': {err}", err.acc_bits, err.min_acc_bits) from err
        layers.append(ConstrainedLayer.of(model, mac, bits))
    if not layers:
        raise A2QError("no target width given: pass --acc-bits P or --layer NAME=P")
    return Selection(layers, skipped, [layer for layer in held if layer is not None])


def _held(model: ModelWrapper, mac: MacLayer) -> ConstrainedLayer | None:
    """An untargeted layer held to its present exact width; None where its weights do not map one-to-one to rows
    (FinetuneAccumulators then restores its weights if training widened it)."""
    try:
        layer = ConstrainedLayer.of(model, mac, 64)
    except A2QError:
        return None
    layer.acc_bits = layer.width(mac.integer_rows(model))
    return layer


def _refuse_unconstrained(model: ModelWrapper, macs: list[MacLayer], why: dict[str, str], acc_bits: int) -> None:
    """Raise naming every quantized MAC layer left unconstrained that may not fit ``acc_bits``."""
    from a2q_passes.transforms.project import smallest_target  # the width a bipolar layer keeps

    problems = [mac for mac in macs if why[mac.node] != "float weights"
                and not (mac.ok and (mac.act_x_act or mac.source.bipolar) and smallest_target(model, mac) <= acc_bits)]
    if problems:
        raise A2QError(f"cannot hold every quantized MAC layer to {acc_bits} bits, these cannot be fine-tuned: "
                       + "; ".join(f"'{mac.node}' ({why[mac.node]}" + (
                           f"; it needs {smallest_target(model, mac)} bits" if mac.ok and mac.act_x_act else "") + ")"
                           for mac in problems)
                       + ". Leave them unconstrained explicitly with "
                       + " ".join(f"--skip {mac.node}" for mac in problems))


def enforce_widths(model: ModelWrapper, selection: Selection) -> dict[str, int]:
    """Re-read every constrained and held layer's integers from ``model``; re-project (exact) those that do not fit.

    The guarantee rests on this exact check of what the graph's own quantizer produces, not on
    the training-time constraint. Returns ``{node: rows re-projected}`` (only layers that needed it).
    """
    fixed = {}
    current = {m.node: m for m in find_mac_layers(model)}
    for layer in selection.layers + selection.held:
        mac = current[layer.node]
        rows = mac.integer_rows(model)
        if layer.fits(rows):
            continue
        result = project_exact(rows.astype(np.float64), layer.x, layer.acc_bits, layer.weight_range)
        write_mac_weights(model, mac.source, mac.layout.from_rows(result.weights))
        fixed[layer.node] = int(result.touched.sum())
        if not layer.fits(mac.integer_rows(model)):
            raise RuntimeError(f"internal error: layer '{layer.node}' still exceeds {layer.acc_bits} bits after re-projection")
    return fixed
