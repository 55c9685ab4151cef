"""The passes: one small qonnx ``Transformation`` per file."""

from a2q_passes.transforms.analyze import AnalyzeAccumulators
from a2q_passes.transforms.annotate import AnnotateAccumulators
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.transforms.verify import VerifyAccumulators

__all__ = ["AnalyzeAccumulators", "AnnotateAccumulators", "ProjectToAccumulator", "VerifyAccumulators"]
