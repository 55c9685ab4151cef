"""Scoring a graph on a data set with the fine-tuning metric (top-1 % or PSNR dB), in a2q's torch bridge or, where
that cannot run the graph and no training is needed, in onnxruntime or qonnx's executor. ``a2q allocate`` scores
every candidate width with it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.conventions import DYNAMIC_QUANTIZER_OPS
from a2q_passes.errors import A2QError
from a2q_passes.finetune.data import Dataset, ModelIO, as_dataset, validate
from a2q_passes.finetune.train import predict, score
from a2q_passes.finn_runtime import as_generic_hw_layers, register_finn_hw_ops
from a2q_passes.torch_bridge import QonnxModule, check_runs

METRICS = ("auto", "top1", "psnr")
DataLike = Dataset | str | tuple | np.ndarray
_CPU = torch.device("cpu")

Outputs = Callable[[ModelWrapper, np.ndarray], torch.Tensor]


def bridge_outputs(model: ModelWrapper, x: np.ndarray) -> torch.Tensor:
    """``model``'s outputs on ``x`` from a2q's torch bridge (the executor fine-tuning trains with)."""
    return predict(QonnxModule(model, trainable_scales="none"), x, _CPU)


def onnxruntime_outputs(model: ModelWrapper, x: np.ndarray) -> torch.Tensor:
    """``model``'s outputs on ``x`` from onnxruntime, for graphs of standard and ``com.microsoft`` ops the bridge
    lacks (QLinearConv, MatMulInteger, ...); one sample per run where the graph fixes a batch of 1 or quantizes
    dynamically (each sample's codes from its own range, as one-sample inference computes them)."""
    import onnxruntime as ort

    from a2q_passes.model_io import data_inputs

    # fatal only: its shape-merge warnings say nothing about the result, and a failing node's error log repeats the
    # exception the caller turns into a message naming the node
    options, quiet = ort.SessionOptions(), ort.RunOptions()
    options.log_severity_level = quiet.log_severity_level = 4
    session = ort.InferenceSession(model.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = data_inputs(model.graph)[0].name
    batch = session.get_inputs()[0].shape[0]
    step = 1 if batch == 1 or any(node.op_type in DYNAMIC_QUANTIZER_OPS for node in model.graph.node) else 256
    outputs = [session.run(None, {name: x[i:i + step]}, quiet)[0] for i in range(0, len(x), step)]
    return torch.from_numpy(np.concatenate(outputs).astype(np.float32))


def qonnx_outputs(model: ModelWrapper, x: np.ndarray) -> torch.Tensor:
    """``model``'s outputs on ``x`` from qonnx's executor, one sample per run: the graphs of FINN's custom ops
    (``MultiThreshold``, HW layers such as MVAU/VVAU/``Thresholding``, executed in Python) that neither the bridge
    nor onnxruntime runs. Slow, and only chosen where those cannot run the graph. FINN's specialised layers
    (``MVAU_hls``, ``Thresholding_rtl``, ...) execute only in C++ or RTL simulation; each runs here as the HW layer it
    was specialised from (:func:`as_generic_hw_layers`)."""
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    from a2q_passes.finn_quant_forms import DefaultDomainFirst
    from a2q_passes.model_io import data_inputs

    # qonnx executes only fully shaped graphs, and each standard node at the first opset import's version
    model = as_generic_hw_layers(model).transform(DefaultDomainFirst())
    if any(node.domain.startswith("finn") for node in model.graph.node):
        register_finn_hw_ops()
    if not model.check_all_tensor_shapes_specified():
        model = model.transform(InferShapes())
    name, out = data_inputs(model.graph)[0].name, model.graph.output[0].name
    outputs = [execute_onnx(model, {name: x[i:i + 1]})[out] for i in range(len(x))]
    return torch.from_numpy(np.concatenate(outputs).astype(np.float32))


def scoring_executor(reference: ModelWrapper, sample: np.ndarray, fallback: bool) -> Outputs:
    """The torch bridge where it runs ``reference`` on ``sample``; else, with ``fallback`` (scoring only, no
    training), onnxruntime where that runs it, then qonnx's executor. Refused naming the node none can run."""
    try:
        check_runs(reference, sample, "allocation (it scores every candidate)")
        return bridge_outputs
    except A2QError as bridge_error:
        if not fallback:
            raise
        failures = []
        for name, outputs in (("onnxruntime", onnxruntime_outputs), ("qonnx's executor", qonnx_outputs)):
            try:
                outputs(reference, sample)
                return outputs
            except Exception as err:  # each executor's own exception types: its message names the node
                failures.append(f"{name} cannot run it either: {err}")
        raise A2QError(f"{bridge_error}; {'; '.join(failures)}")


class Scorer:
    """Scores graphs on one data set with the fine-tuning metric (top-1 % or PSNR dB).

    Data without ``y`` is scored against ``reference``'s outputs (its argmax for top-1), computed
    once here. Graphs run in the torch bridge, or (``fallback``) in onnxruntime or qonnx's executor where the bridge
    cannot run ``reference`` (:func:`scoring_executor`).
    """

    def __init__(self, reference: ModelWrapper, data: DataLike, metric: str = "auto", name: str = "data",
                 fallback: bool = False) -> None:
        io = ModelIO.of(reference)
        if metric not in METRICS:
            raise A2QError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
        if metric == "auto":
            metric = "top1" if io.output_shape is not None and len(io.output_shape) == 1 else "psnr"
        self.metric = metric
        self.loss = "ce" if metric == "top1" else "mse"
        dataset = validate(as_dataset(data, name), io, self.loss, needs_labels=False)
        self.outputs = scoring_executor(reference, dataset.x[:2], fallback)
        if dataset.y is None:
            outputs = self.outputs(reference, dataset.x)
            targets = outputs.argmax(dim=1) if self.loss == "ce" else outputs
            dataset = Dataset(dataset.x, targets.numpy(), dataset.name)
        self.data = dataset

    @property
    def unit(self) -> str:
        return "top-1 %" if self.metric == "top1" else "PSNR dB"

    def __call__(self, model: ModelWrapper) -> float:
        return score(self.outputs(model, self.data.x), torch.from_numpy(self.data.y), self.loss)
