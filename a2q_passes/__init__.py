"""a2q-passes: accumulator-aware quantization passes over ONNX graphs."""

__version__ = "0.1.0"
