"""Evaluate ONNX models (QONNX via qonnx's executor, standard ONNX via onnxruntime) on a test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.change_batchsize import ChangeBatchSize
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.model_io import data_inputs
from models.data import DatasetName, load_dataset

STANDARD_DOMAINS = ("", "ai.onnx")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == labels))


def psnr(prediction: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB for images in [0, 1], from the mean squared error over all pixels of all images."""
    mse = float(np.mean((np.asarray(prediction, np.float64) - np.asarray(target, np.float64)) ** 2))
    return float(10.0 * np.log10(1.0 / max(mse, 1e-12)))


def score(dataset: DatasetName, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 % for the classification datasets, PSNR dB for 'sr'."""
    return psnr(outputs, targets) if dataset == "sr" else accuracy(outputs, targets)


def loss(dataset: DatasetName, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of the logits for the classification datasets, mean squared error for 'sr'
    (the training losses): a finer measure than the score, which ties on small validation splits."""
    outputs = np.asarray(outputs, np.float64)
    if dataset == "sr":
        return float(np.mean((outputs - np.asarray(targets, np.float64)) ** 2))
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(targets)), np.asarray(targets)]))


def _with_batch_size(model: ModelWrapper, batch_size: int) -> ModelWrapper:
    """A copy of the model whose graph input/output (and constant Reshape shapes) have this batch size."""
    return model.transform(ChangeBatchSize(batch_size)).transform(InferShapes())


def predict_onnx(model: ModelWrapper | Path | str, inputs: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Run an ONNX model on `inputs` (N, ...) in chunks of `batch_size`; returns the stacked outputs.

    Graphs with only standard ONNX ops run in onnxruntime; graphs with QONNX custom ops (Quant,
    MultiThreshold, ...) run node by node in qonnx's `execute_onnx`.
    """
    if not isinstance(model, ModelWrapper):
        model = ModelWrapper(str(model))
    inputs_fed = data_inputs(model.graph)
    if len(inputs_fed) != 1 or len(model.graph.output) != 1:
        raise ValueError(f"{model.model.graph.name}: expected one graph input and one output, got inputs "
                         f"{[i.name for i in inputs_fed]} and outputs {[o.name for o in model.graph.output]}")
    standard = all(node.domain in STANDARD_DOMAINS for node in model.graph.node)
    in_name, out_name = inputs_fed[0].name, model.graph.output[0].name
    resized: dict[int, ModelWrapper] = {}
    sessions: dict[int, ort.InferenceSession] = {}
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = np.ascontiguousarray(inputs[start: start + batch_size], dtype=np.float32)
        n = len(chunk)
        if n not in resized:
            resized[n] = _with_batch_size(model, n)
        if standard:
            if n not in sessions:
                sessions[n] = ort.InferenceSession(resized[n].model.SerializeToString(),
                                                   providers=["CPUExecutionProvider"])
            outputs.append(sessions[n].run([out_name], {in_name: chunk})[0])
        else:
            outputs.append(execute_onnx(resized[n], {in_name: chunk})[out_name])
    return np.concatenate(outputs)


def evaluate_onnx(path: Path | str, dataset: DatasetName, limit: int | None = None, batch_size: int = 1000) -> float:
    """Score an ONNX model file on the test split of `dataset` (first `limit` samples if given).

    Returns top-1 accuracy in % ('digits', 'fashion_mnist') or PSNR in dB ('sr').
    """
    inputs, targets = load_dataset(dataset, "test")
    if limit is not None:
        inputs, targets = inputs[:limit], targets[:limit]
    return score(dataset, predict_onnx(path, inputs, batch_size), targets)
