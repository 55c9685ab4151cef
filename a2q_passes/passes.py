"""Pass infrastructure: qonnx ``Transformation``s with onnx-ir style results and checks.

Each pass is a qonnx ``Transformation`` (``apply(model) -> (model, changed)``), so it works with
``ModelWrapper.transform``. Like ``onnx_ir.passes`` it also has ``requires`` (checked on the
input) and ``ensures`` (checked on its own output: a pass that promises "no overflow at P"
proves it there), and records a :class:`PassResult` with machine-readable details.
Passes do all their work in one ``apply`` and report ``changed=False``, so
``ModelWrapper.transform`` runs them exactly once and re-running them is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation


@dataclass
class PassResult:
    model: ModelWrapper
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


class A2QPass(Transformation):
    """Base class: subclasses implement :meth:`call` and optionally ``requires``/``ensures``."""

    def __init__(self) -> None:
        super().__init__()
        self.result: PassResult | None = None

    def requires(self, model: ModelWrapper) -> None:
        """Raise :class:`a2q_passes.errors.PreconditionError` if ``model`` is not a valid input."""

    def ensures(self, result: PassResult) -> None:
        """Raise :class:`a2q_passes.errors.PostconditionError` if the output breaks the pass's promise."""

    def call(self, model: ModelWrapper) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: ModelWrapper) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result)
        self.result = result
        return result

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        return self(model).model, False


class Sequential(A2QPass):
    """Runs passes in order, each with its own checks; details are keyed by pass class name."""

    def __init__(self, passes: Sequence[A2QPass]) -> None:
        super().__init__()
        self.passes = list(passes)

    def call(self, model: ModelWrapper) -> PassResult:
        details: dict[str, Any] = {}
        modified = False
        for p in self.passes:
            result = p(model)
            model = result.model
            modified |= result.modified
            details[type(p).__name__] = result.details
        return PassResult(model, modified, details)
