"""The passes: one small qonnx ``Transformation`` per file."""

from a2q_passes.transforms.analyze import AnalyzeAccumulators
from a2q_passes.transforms.annotate import AnnotateAccumulators

__all__ = ["AnalyzeAccumulators", "AnnotateAccumulators"]
