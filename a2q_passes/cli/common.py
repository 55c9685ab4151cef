"""Option parsing shared by the commands."""

from __future__ import annotations

import json
from pathlib import Path

from qonnx.core.datatype import DataType

from a2q_passes.errors import A2QError


def parse_input_dtypes(specs: list[str] | None) -> dict[str, str]:
    """``UINT8`` (every graph input) or ``TENSOR=UINT8`` (one tensor) -> ``{name or "*": dtype}``."""
    result: dict[str, str] = {}
    for spec in specs or []:
        name, _, dtype = spec.rpartition("=")
        dtype = dtype.strip().upper()
        try:
            valid = DataType[dtype].is_integer()
        except KeyError:
            valid = False
        if not valid:
            raise A2QError(f"--input-dtype {spec!r}: '{dtype}' is not an integer qonnx datatype (e.g. UINT8, INT4, BIPOLAR)")
        result[name.strip() or "*"] = dtype
    return result


def parse_layer_widths(acc_bits: int | None, layer_specs: list[str] | None, widths_json: Path | None) -> tuple[int | None, dict[str, int]]:
    """The global width and per-layer overrides from ``--acc-bits``, ``--layer NAME=P`` and a JSON map."""
    overrides: dict[str, int] = {}
    if widths_json is not None:
        try:
            data = json.loads(Path(widths_json).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise A2QError(f"{widths_json}: cannot read the JSON width map ({err})") from err
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise A2QError(f"{widths_json}: expected a JSON object mapping layer names to integer widths")
        overrides.update(data)
    for spec in layer_specs or []:
        name, sep, bits = spec.rpartition("=")
        if not sep or not name or not bits.strip().isdigit():
            raise A2QError(f"--layer {spec!r}: expected NAME=BITS, e.g. --layer conv3=12")
        overrides[name] = int(bits)
    return acc_bits, overrides
