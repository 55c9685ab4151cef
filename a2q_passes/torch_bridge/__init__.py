"""ONNX -> torch bridge for QONNX / FINN-ONNX graphs (used for accumulator-aware fine-tuning).

``QonnxModule(model)`` runs a qonnx ``ModelWrapper``'s graph as a differentiable torch module:
a small table of per-op converters (``ops.py``) executed in topological order. Quantizers use
straight-through estimators; float weights (and optionally biases and Quant scales) are
``nn.Parameter``s. ``write_back(module, model)`` puts trained values into a copy of the graph.

API: ``QonnxModule(model, trainable_scales="weights"|"none"|"all", trainable_biases=True)``;
``module.weight_quant_nodes()`` -> ``[WeightQuant]``; ``module.set_weight_transform(node, fn)``
(``fn(weight, scale)`` is what the Quant quantizes; an ``nn.Module`` fn trains with the module);
``module.set_weight_projection(node, fn)`` + ``module.project_weights()`` after each optimizer
step; ``module.effective_weight(node)``, ``module.weight_codes(node)``, ``module.tensor(name)``;
``write_back(module, model) -> ModelWrapper``; ``check_runs(model, sample, purpose)`` refuses a graph it cannot run.

Why not onnx2torch: it imports torchvision, and installing it replaces the project's CPU torch
2.13 with a ~5.5 GB CUDA torch 2.14 build; it would still need custom converters for every
QONNX op, and the standard op set a quantized model uses is small.
"""

from a2q_passes.torch_bridge.module import QonnxModule, WeightQuant, check_runs, write_back
from a2q_passes.torch_bridge.ops import int_quant, quant_codes, round_ste, supported_ops

__all__ = ["QonnxModule", "WeightQuant", "check_runs", "write_back", "int_quant", "quant_codes", "round_ste", "supported_ops"]
