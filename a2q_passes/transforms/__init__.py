"""The passes: one small qonnx ``Transformation`` per file."""

from a2q_passes.transforms.analyze import AnalyzeAccumulators
from a2q_passes.transforms.annotate import AnnotateAccumulators
from a2q_passes.transforms.verify import VerifyAccumulators  # noqa: F401

__all__ = ["AnalyzeAccumulators", "AnnotateAccumulators"]
