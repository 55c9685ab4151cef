"""ONNX export: Brevitas models to cleaned-up QONNX, float models to plain ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from brevitas.export import export_qonnx
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import nn

# Saved models declare at most this IR version (onnx 1.16 / onnxruntime >= 1.17 era): onnxruntime
# 1.32 reads IR <= 14, but older runtimes refuse IR versions newer than they know.
MAX_IR_VERSION = 10
ONNX_OPSET = 13


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the declared IR version to MAX_IR_VERSION (nothing in these models needs a newer one)."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def export_qonnx_model(model: nn.Module, input_shape: tuple[int, ...], path: Path | str) -> ModelWrapper:
    """Export a Brevitas model (batch 1, `input_shape` = (C, H, W)) to QONNX, cleaned up, and save it.

    Uses the TorchScript exporter (dynamo=False), the path FINN's own flows use.
    """
    path = Path(path)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_qonnx(model, args=torch.zeros(1, *input_shape), dynamo=False, opset_version=ONNX_OPSET)
    cleaned = cleanup_model(ModelWrapper(proto))
    cleaned = ModelWrapper(cap_ir_version(cleaned.model))
    cleaned.save(str(path))
    return cleaned


def export_float_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path | str) -> onnx.ModelProto:
    """Export a plain torch model to standard ONNX with a dynamic batch dimension named 'batch'."""
    path = Path(path)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    proto = cap_ir_version(onnx.load(str(path)))
    onnx.save(proto, str(path))
    return proto
