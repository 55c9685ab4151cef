"""``VerifyAccumulators``: prove or refute overflow freedom at given widths; leaves the model untouched."""

from __future__ import annotations

from typing import Any

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import PostconditionError
from a2q_passes.model_io import model_bytes
from a2q_passes.passes import A2QPass, PassResult
from a2q_passes.verification import PROOF_FAIL, PROOF_PASS, VerificationReport, verify_model


class VerifyAccumulators(A2QPass):
    """Static proof, adversarial simulation and (with ``data``) real-data simulation per MAC layer.

    ``widths``: one P for every quantized layer, ``{node: P}`` for those layers only, or ``None``
    for the widths recorded in the model (see :mod:`a2q_passes.verification`); ``skip``: layers left out by
    name, reported skipped and not covered by the verdict. The
    :class:`VerificationReport` is in ``self.report`` and ``result.details["report"]``;
    ``details["layers"]`` holds the per-layer verdicts as JSON-ready dicts.

    ``ensures`` checks the three views agree: a layer the proof passes must show no overflow in
    any simulation, and a layer it fails must overflow on its worst-case inputs.
    """

    def __init__(self, widths: int | dict[str, int] | None = None, mode: str = "wrap", tile: int | None = None,
                 data: dict[str, np.ndarray] | np.ndarray | None = None, *, overrides: dict[str, int] | None = None,
                 input_dtypes: dict[str, str] | None = None, zero_point: str = "fold",
                 input_ranges: str = "exact", outer_bits: int | None = None, skip: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.skip = frozenset(skip)
        self.widths, self.mode, self.tile, self.data = widths, mode, tile, data
        self.outer_bits = outer_bits
        self.overrides, self.input_dtypes, self.zero_point = overrides, input_dtypes, zero_point
        self.input_ranges = input_ranges
        self.report: VerificationReport | None = None

    def call(self, model: ModelWrapper) -> PassResult:
        self._bytes_before = model_bytes(model)
        self.report = verify_model(model, self.widths, self.mode, self.tile, self.data, overrides=self.overrides,
                                   input_dtypes=self.input_dtypes, zero_point=self.zero_point,
                                   input_ranges=self.input_ranges, outer_bits=self.outer_bits, skip=self.skip)
        details: dict[str, Any] = {
            "report": self.report,
            "layers": {v.node: v.to_json() for v in self.report.layers},
            "overflow_impossible": self.report.overflow_impossible,
        }
        return PassResult(model, False, details)

    def ensures(self, result: PassResult) -> None:
        if model_bytes(result.model) != self._bytes_before:
            raise PostconditionError("VerifyAccumulators changed the model; it may only read it")
        for v in result.details["report"].layers:
            simulated_overflows = (v.adversarial_register_overflows or 0) + (v.data_overflows or 0) \
                + (v.data_register_overflows or 0)
            if v.proof == PROOF_PASS and simulated_overflows:
                raise PostconditionError(f"layer '{v.node}': the static proof rules out overflow at {v.acc_bits} bits, "
                                         f"but simulation overflowed {simulated_overflows} time(s)")
            if v.proof == PROOF_FAIL and v.adversarial_register_overflows == 0:
                raise PostconditionError(f"layer '{v.node}': the static proof fails at {v.acc_bits} bits, "
                                         "but the worst-case inputs did not overflow in simulation")
