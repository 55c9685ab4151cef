"""The passes: one small qonnx ``Transformation`` per file.

``from a2q_passes.transforms import ProjectToAccumulator`` imports only that pass's module (PEP 562):
``a2q analyze`` then does not pay for the certificate and verification modules ``project`` and
``verify`` import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_MODULES = {"AnalyzeAccumulators": "analyze", "AnnotateAccumulators": "annotate",
            "ProjectToAccumulator": "project", "VerifyAccumulators": "verify"}

__all__ = ["AnalyzeAccumulators", "AnnotateAccumulators", "ProjectToAccumulator", "VerifyAccumulators"]

if TYPE_CHECKING:
    from a2q_passes.transforms.analyze import AnalyzeAccumulators
    from a2q_passes.transforms.annotate import AnnotateAccumulators
    from a2q_passes.transforms.project import ProjectToAccumulator
    from a2q_passes.transforms.verify import VerifyAccumulators


def __getattr__(name: str) -> type:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
