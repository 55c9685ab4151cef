"""QonnxModule: a differentiable interpreter over a QONNX / FINN-ONNX graph, and write-back to ONNX."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import onnx
import torch
from qonnx.core.modelwrapper import ModelWrapper
from torch import Tensor, nn

from a2q_passes.batching import batch_free_reshapes
from a2q_passes.bounds import IntRange, integer_range
from a2q_passes.conventions import LAYOUT_OPS
from a2q_passes.errors import A2QError
from a2q_passes.torch_bridge.ops import (
    QONNX_DOMAINS,
    OnnxNode,
    converter_for,
    quant_attributes,
    quant_codes,
    torch_dtype,
)

TrainableScales = Literal["none", "weights", "all"]
SCALE_FLOOR = 2.0 ** -10  # the smallest fraction of its starting value a trained Quant scale may shrink to
# fn(weight_parameter, scale) -> the tensor the weight Quant quantizes (same shape as the weight).
WeightFn = Callable[[Tensor, Tensor], Tensor]

# numpy (ml_dtypes) storage types below a byte, which torch.from_numpy cannot convert
_SUB_BYTE_TYPES = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn")
_INT_QUANT_OPS = ("Quant", "IntQuant")
_QUANT_OPS = (*_INT_QUANT_OPS, "BipolarQuant")
_MAC_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
_MAC_BIAS_INPUTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Ops a weight may pass through between its Quant and the MAC that consumes it.


@dataclass(frozen=True)
class WeightQuant:
    """One weight ``Quant`` node (its input 0 is an initializer) and the MAC op it feeds."""

    node_name: str
    weight_name: str  # ONNX initializer holding the float weight
    weight: nn.Parameter
    scale_name: str
    scale: Tensor  # an nn.Parameter when the scales are trainable, else a buffer
    zero_point: Tensor
    bit_width: int
    signed: bool
    narrow: bool
    rounding_mode: str
    consumer: str | None  # name of the MAC node using the quantized weight (None if not found)
    consumer_op_type: str | None

    @property
    def codes(self) -> IntRange:
        """Integer range of the quantized weight codes."""
        return integer_range(self.bit_width, self.signed, self.narrow)


def _graph_signature(model: ModelWrapper) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def _default_opset(model: ModelWrapper) -> int:
    versions = [o.version for o in model.model.opset_import if o.domain in ("", "ai.onnx")]
    return versions[0] if versions else 11


def _topological_order(nodes: list[OnnxNode], available: set[str]) -> list[OnnxNode]:
    """Nodes in an order where every input is computed first (stable w.r.t. the graph's order)."""
    ready, pending, ordered = set(available), list(nodes), []
    while pending:
        remaining = []
        for node in pending:
            if all(not name or name in ready for name in node.inputs):
                ordered.append(node)
                ready.update(node.outputs)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            node = remaining[0]
            missing = [name for name in node.inputs if name and name not in ready]
            raise ValueError(f"{node.label}: inputs {missing} are never produced (cycle or dangling tensor)")
        pending = remaining
    return ordered


class _Buffers(nn.Module):
    """Container for the graph's non-trainable initializers."""


class QonnxModule(nn.Module):
    """A torch module that executes a QONNX (or FINN-ONNX) graph node by node.

    Trainable: the float weights feeding a ``Quant``/``BipolarQuant`` node, the biases of
    Conv/ConvTranspose/Gemm that are plain initializers (``trainable_biases``), and the Quant
    scales chosen by ``trainable_scales``: ``"weights"`` (scales of weight Quants), ``"all"``
    (activation Quants too) or ``"none"``. Every other initializer is a buffer.
    BatchNormalization always runs in inference mode.

    ``forward(*inputs)`` takes the graph inputs in graph order (tensors or numpy arrays) and
    returns the output tensor, or a tuple when the graph has several outputs.
    """

    def __init__(
        self, model: ModelWrapper, trainable_scales: TrainableScales = "weights", trainable_biases: bool = True
    ) -> None:
        super().__init__()
        if trainable_scales not in ("none", "weights", "all"):
            raise ValueError(f"trainable_scales must be 'none', 'weights' or 'all', got '{trainable_scales}'")
        # batch-1 exports train on batches of any size; write_back still targets the caller's graph
        graph = batch_free_reshapes(model).graph
        opset = _default_opset(model)
        parsed = [OnnxNode.from_proto(i, n, opset) for i, n in enumerate(graph.node)]
        initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        graph_initializers = set(initializers)  # before Constant outputs join: only these can be written back
        for node in parsed:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                initializers[node.outputs[0]] = converter_for(node)(node, []).numpy()
        compute = [n for n in parsed if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
        graph_inputs = [i for i in graph.input if i.name not in initializers]
        self._input_names = [i.name for i in graph_inputs]
        self._input_dtypes = [torch_dtype(i.type.tensor_type.elem_type or onnx.TensorProto.FLOAT) for i in graph_inputs]
        self._output_names = [o.name for o in graph.output]
        # Converters are looked up here, so an unsupported op fails at construction, naming the node.
        ordered = _topological_order(compute, set(initializers) | set(self._input_names))
        self._steps = [(node, converter_for(node)) for node in ordered]
        # PyTorch's exporters pass shared parameters (a Quant's scale, zero point, bit width) through Identity nodes:
        # such an output reads as its constant (the Identity still runs; only the weight itself must be stored)
        self._aliases: dict[str, str] = {}
        for node in ordered:
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                root = self._aliases.get(node.inputs[0], node.inputs[0])
                if root in initializers:
                    self._aliases[node.outputs[0]] = root
        self._signature = _graph_signature(model)

        self._weight_quants = self._find_weight_quants(model, compute, initializers)
        trainable, scales = self._trainable_names(compute, initializers, trainable_scales, trainable_biases)
        trainable &= graph_initializers
        self.trainable = nn.ParameterDict()
        self.constants = _Buffers()
        self._sources: dict[str, tuple[bool, str]] = {}  # ONNX tensor name -> (is parameter, attribute key)
        used_keys: set[str] = set()
        for name, value in initializers.items():
            key = _attribute_key(name, used_keys)
            stored = np.asarray(value).dtype.name
            if stored in _SUB_BYTE_TYPES:  # ml_dtypes' int4/uint4: torch has no such type
                raise NotImplementedError(f"initializer {name!r} is stored as {stored}, which the torch bridge does "
                                          "not hold")
            tensor = torch.from_numpy(np.array(value))
            if name in trainable:
                self.trainable[key] = nn.Parameter(tensor)
            else:
                self.constants.register_buffer(key, tensor)
            self._sources[name] = (name in trainable, key)

        # trained Quant scales keep their sign and at least SCALE_FLOOR of their magnitude: a scale that an optimizer
        # step moves across 0 turns a ReLU's quantizer into all zeros (x / s < 0 clips to 0), which no later step
        # can undo (no gradient reaches it); seen on digits_cnn at P=10 with --train-act-scales
        self._scale_floors = {self._sources[name][1]: torch.from_numpy(np.array(initializers[name])) * SCALE_FLOOR
                              for name in sorted(scales & trainable)}
        self._weight_transforms: dict[str, WeightFn] = {}
        self.weight_transform_modules = nn.ModuleDict()  # transforms that are modules, so their params train
        self._weight_projections: dict[str, WeightFn] = {}

    # ------------------------------------------------------------------ graph analysis

    @staticmethod
    def _find_weight_quants(
        model: ModelWrapper, nodes: list[OnnxNode], initializers: dict[str, np.ndarray]
    ) -> dict[str, tuple[OnnxNode, str | None, str | None]]:
        """Quant nodes on an initializer that (through layout ops) feed a MAC weight input."""
        found = {}
        for node in nodes:
            if node.op_type not in _INT_QUANT_OPS or node.domain not in QONNX_DOMAINS:
                continue
            if node.inputs[0] not in initializers:
                continue
            consumer = _mac_consumer(model, node.outputs[0])
            if consumer is not None:
                found[node.key] = (node, consumer.name, consumer.op_type)
        return found

    def _trainable_names(
        self,
        nodes: list[OnnxNode],
        initializers: dict[str, np.ndarray],
        trainable_scales: TrainableScales,
        trainable_biases: bool,
    ) -> tuple[set[str], set[str]]:
        """The initializers to train and, among them, the Quant scales."""
        weight_quant_keys = set(self._weight_quants)
        names, scales = set(), set()
        for node in nodes:
            if node.op_type in _QUANT_OPS and node.domain in QONNX_DOMAINS:
                if node.inputs[0] in initializers:
                    names.add(node.inputs[0])
                scaled = trainable_scales == "all" or (trainable_scales == "weights" and node.key in weight_quant_keys)
                scale = self._aliases.get(node.inputs[1], node.inputs[1])
                if scaled and scale in initializers:
                    scales.add(scale)
            bias_input = _MAC_BIAS_INPUTS.get(node.op_type)
            if trainable_biases and bias_input is not None and len(node.inputs) > bias_input:
                if node.inputs[bias_input] in initializers:
                    names.add(node.inputs[bias_input])
        floating = {n for n in names | scales if np.issubdtype(initializers[n].dtype, np.floating)}
        return floating, scales & floating

    def keep_scales_off_zero(self) -> None:
        """Clamp every trained Quant scale to its starting sign and at least :data:`SCALE_FLOOR` of its starting
        magnitude (elementwise; a scale that starts at 0 is left alone). Called after each optimizer step."""
        with torch.no_grad():
            for key, floor in self._scale_floors.items():
                scale = self.trainable[key]
                floor = floor.to(scale.device, scale.dtype)
                scale.copy_(torch.where(floor > 0, torch.maximum(scale, floor),
                                        torch.where(floor < 0, torch.minimum(scale, floor), scale)))

    # ------------------------------------------------------------------ tensors

    def tensor(self, name: str) -> Tensor:
        """The parameter or buffer holding ONNX initializer ``name`` (or the one an Identity passes on as ``name``)."""
        name = self._aliases.get(name, name)
        if name not in self._sources:
            raise KeyError(f"'{name}' is not an initializer (or Constant output) of this graph")
        is_param, key = self._sources[name]
        return self.trainable[key] if is_param else getattr(self.constants, key)

    def is_parameter(self, name: str) -> bool:
        """Whether ``name`` (through Identity nodes) is a trainable initializer, i.e. one :func:`write_back` writes."""
        return self._sources.get(self._aliases.get(name, name), (False, ""))[0]

    def readers(self, name: str) -> list[str]:
        """Keys of the nodes that read tensor ``name`` (once each), in execution order; for a constant, every node
        reading it directly or through the Identity nodes that pass it on (those Identity nodes not counted)."""
        root = self._aliases.get(name, name)
        names = {root} | {alias for alias, source in self._aliases.items() if source == root}
        return [node.key for node, _ in self._steps
                if names.intersection(node.inputs) and not (node.op_type == "Identity" and node.outputs[0] in names)]

    def named_onnx_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable initializers by ONNX tensor name."""
        return {name: self.trainable[key] for name, (is_param, key) in self._sources.items() if is_param}

    # ------------------------------------------------------------------ weight quantizers

    def weight_quant_nodes(self) -> list[WeightQuant]:
        """Every weight Quant node, in graph order, with live references to its tensors."""
        infos = []
        for key, (node, consumer, consumer_op) in self._weight_quants.items():
            signed, narrow, rounding_mode = quant_attributes(node)
            infos.append(
                WeightQuant(
                    node_name=key,
                    weight_name=node.inputs[0],
                    weight=self.tensor(node.inputs[0]),
                    scale_name=node.inputs[1],
                    scale=self.tensor(node.inputs[1]),
                    zero_point=self.tensor(node.inputs[2]),
                    bit_width=int(self.tensor(node.inputs[3]).item()),
                    signed=signed,
                    narrow=narrow,
                    rounding_mode=rounding_mode,
                    consumer=consumer,
                    consumer_op_type=consumer_op,
                )
            )
        return infos

    def _weight_quant(self, node_name: str) -> OnnxNode:
        if node_name not in self._weight_quants:
            raise KeyError(f"'{node_name}' is not a weight Quant node; weight Quants: {sorted(self._weight_quants)}")
        return self._weight_quants[node_name][0]

    def set_weight_transform(self, node_name: str, fn: WeightFn | None) -> None:
        """Feed ``fn(weight_parameter, scale)`` to weight Quant ``node_name`` instead of the parameter.

        The hook for a reparameterisation (e.g. A2Q's ``g * v / ||v||_1``). An ``nn.Module`` fn is
        registered as a submodule so its own parameters train and are saved. ``None`` removes it.
        """
        node = self._weight_quant(node_name)
        sharing = [k for k, (n, _, _) in self._weight_quants.items() if n.inputs[0] == node.inputs[0]]
        sharing.remove(node_name)
        if fn is not None and sharing:
            raise ValueError(f"weight '{node.inputs[0]}' of '{node_name}' also feeds {sharing}; cannot transform it")
        self._weight_transforms.pop(node_name, None)
        module_key = _attribute_key(node_name, set())
        if module_key in self.weight_transform_modules:
            del self.weight_transform_modules[module_key]
        if fn is None:
            return
        self._weight_transforms[node_name] = fn
        if isinstance(fn, nn.Module):
            self.weight_transform_modules[module_key] = fn

    def set_weight_projection(self, node_name: str, fn: WeightFn | None) -> None:
        """Register ``fn(weight_parameter, scale) -> new weight`` for :meth:`project_weights`."""
        self._weight_quant(node_name)
        if fn is None:
            self._weight_projections.pop(node_name, None)
        else:
            self._weight_projections[node_name] = fn

    @torch.no_grad()
    def project_weights(self) -> None:
        """Apply every registered projection in place (call after each optimizer step)."""
        for node_name, fn in self._weight_projections.items():
            node = self._weight_quant(node_name)
            weight = self.tensor(node.inputs[0])
            weight.copy_(fn(weight, self.tensor(node.inputs[1])))

    def effective_weight(self, node_name: str) -> Tensor:
        """The float tensor weight Quant ``node_name`` quantizes (its transform applied)."""
        node = self._weight_quant(node_name)
        weight, scale = self.tensor(node.inputs[0]), self.tensor(node.inputs[1])
        fn = self._weight_transforms.get(node_name)
        return weight if fn is None else fn(weight, scale)

    def weight_codes(self, node_name: str) -> Tensor:
        """Integer codes (as floats, with STE gradients) the weight Quant produces right now."""
        node = self._weight_quant(node_name)
        signed, narrow, rounding_mode = quant_attributes(node)
        return quant_codes(
            self.effective_weight(node_name),
            self.tensor(node.inputs[1]),
            self.tensor(node.inputs[2]),
            int(self.tensor(node.inputs[3]).item()),
            signed,
            narrow,
            rounding_mode,
        )

    # ------------------------------------------------------------------ execution

    def forward(self, *inputs: Tensor | np.ndarray) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self._input_names):
            raise ValueError(f"graph takes {len(self._input_names)} inputs {self._input_names}, got {len(inputs)}")
        values: dict[str, Tensor] = {name: self.tensor(name) for name in self._sources}
        for name, dtype, value in zip(self._input_names, self._input_dtypes, inputs):
            values[name] = torch.as_tensor(value).to(dtype)  # e.g. float64 numpy data for a float32 graph
        for node, convert in self._steps:
            args = [values[name] if name else None for name in node.inputs]
            if node.key in self._weight_transforms:
                args[0] = self._weight_transforms[node.key](args[0], args[1])
            try:
                result = convert(node, args)
            except Exception as error:
                raise RuntimeError(f"{node.label} failed in the torch bridge: {error}") from error
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results):
                if name:
                    values[name] = value
        outputs = tuple(values[name] for name in self._output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def _attribute_key(name: str, used: set[str]) -> str:
    """A unique attribute-safe key for an ONNX name (ParameterDict keys may not contain '.')."""
    base = re.sub(r"\W", "_", name) or "tensor"
    if base[0].isdigit():
        base = "t_" + base
    key, suffix = base, 1
    while key in used:
        key, suffix = f"{base}_{suffix}", suffix + 1
    used.add(key)
    return key


def _mac_consumer(model: ModelWrapper, tensor: str) -> onnx.NodeProto | None:
    """The MAC node that uses ``tensor`` as its weight, following single-consumer layout ops."""
    consumers = model.find_consumers(tensor) or []
    if len(consumers) != 1:
        return None
    node = consumers[0]
    weight_inputs = _MAC_WEIGHT_INPUTS.get(node.op_type)
    if weight_inputs is not None:
        positions = [i for i, name in enumerate(node.input) if name == tensor]
        return node if any(p in weight_inputs for p in positions) else None
    if node.op_type in LAYOUT_OPS:
        return _mac_consumer(model, node.output[0])
    return None


def write_back(module: QonnxModule, model: ModelWrapper) -> ModelWrapper:
    """A copy of ``model`` whose trainable initializers hold ``module``'s current values.

    Weights with a transform are written transformed (what their Quant sees), so the returned
    graph computes what the module computes. Node names and graph structure are unchanged.
    """
    if _graph_signature(model) != module._signature:
        raise ValueError(
            "write_back: the model's nodes differ from the graph the QonnxModule was built from; "
            "pass the same (untransformed) ModelWrapper"
        )
    out = ModelWrapper(copy.deepcopy(model.model))
    transformed = {module._weight_quant(k).inputs[0]: k for k in module._weight_transforms}
    with torch.no_grad():
        for name, parameter in module.named_onnx_parameters().items():
            value = module.effective_weight(transformed[name]) if name in transformed else parameter
            original = model.get_initializer(name)
            out.set_initializer(name, value.detach().cpu().numpy().astype(original.dtype).reshape(original.shape))
    return out


def check_runs(model: ModelWrapper, sample: np.ndarray, purpose: str) -> None:
    """Refuse, before any work, a graph the bridge cannot run on ``sample`` (an op it lacks, or one that fails there;
    the error names the node): ``purpose`` says which command needs it. Callers pass two samples where they have
    them, so a graph that runs only on a batch of one fails here, not in the middle of the work."""
    try:
        with torch.no_grad():
            QonnxModule(model, trainable_scales="none")(torch.from_numpy(sample))
    except (NotImplementedError, RuntimeError) as err:
        raise A2QError(f"{purpose} runs the model in PyTorch (a2q's torch bridge), which cannot run it: {err}. "
                       "`a2q project IN.onnx OUT.onnx --acc-bits P` rewrites such a model without running it; or use "
                       "the model as exported, before the transformation that introduced this op") from err
