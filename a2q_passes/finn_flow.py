"""Lowering a QONNX model to FINN hardware layers (MVAU / VVAU / Thresholding ...) with FINN's own passes.

The flow mirrors FINN's builder steps (finn-plus 1.6.1, ``finn.builder.build_dataflow_steps``):

0. preparation             - initializers listed as graph inputs become plain constants; exact rewrites of
                             quantizer forms FINN's conversion refuses or fails on (:mod:`a2q_passes.finn_quant_forms`:
                             a signed ``Quant`` after ``Relu``, a ``Relu`` after a ``Quant``, a bias quantizer, a
                             grouped Conv made dense, a spatial ``ReduceMean`` as ``GlobalAveragePool``)
1. ``step_qonnx_to_finn``  - qonnx ``cleanup_model`` + ``ConvertQONNXtoFINN`` (called as is), then a graph input's
                             thresholds on its Quant's exact boundaries (:mod:`a2q_passes.finn_input_thresholds`)
                             and a float ``Clip`` in front of thresholds folded into them
                             (:mod:`a2q_passes.finn_clip_thresholds`)
2. ``step_tidy_up``        - InferShapes, FoldConstants, GiveUniqueNodeNames(Recursive),
                             GiveReadableTensorNames, InferDataTypes, RemoveStaticGraphInputs (as is)
   1-D convolutions only: FINN's 1-D ``step_pre_streamline`` (``finn.builder.custom_step_library.conv1d``, as is):
                             qonnx's ``Change3DTo4DTensors`` makes every ``[N, C, L]`` tensor ``[N, C, L, 1]``, so
                             the rest of the flow lowers them as 2-D (the lowered model takes ``[N, C, L, 1]``)
3. ``step_streamline``     - decomposed into its individual transformations so that each one can be
                             checked on its own (see :data:`STREAMLINE_TRANSFORMATIONS`), with one
                             addition for residual graphs (below), FINN's pixel-padding lowering of a
                             ``ConvTranspose`` (:mod:`a2q_passes.finn_deconv`) and, where a
                             ``GlobalAveragePool`` reads integers, FINN's ``InferGlobalAccPoolLayer`` and
                             streamlining again (:mod:`a2q_passes.finn_global_pooling`); where a depthwise
                             Conv reads a per-channel scale (MobileNet-v1), FINN's ``MoveMulPastDWConv`` and
                             streamlining again, as finn-examples' MobileNet build does
4. ``step_convert_to_hw``  - InferQuantizedMatrixVectorActivation, InferVectorVectorActivation,
                             InferThresholdingLayer, InferPool, InferConvInpGen,
                             InferElementwiseBinaryOperation, InferDuplicateStreamsLayer, ... (as is)
   then ties: thresholds on integer inputs that are integers move one up where the activation ``Quant`` nodes
                             round that tie down, as ``ROUND`` (half to even) does for odd codes
                             (:mod:`a2q_passes.finn_tie_thresholds`; FINN's ``x >= t`` rounds every tie up)
5. optional ``SpecializeLayers(fpgapart)`` (``step_specialize_layers``, as is)

Residual graphs: FINN's ``Streamline`` stops at a fork (its ``MoveScalarLinearPastInvariants``
says "Mul is a fork-node, try MoveLinearPastFork first"), leaving a float scale in front of the
branch and the layer behind it unlowered. FINN's ResNet-50 example (finn-examples) handles this by
alternating ``MoveLinearPastEltwiseAdd`` / ``MoveLinearPastFork`` with streamlining; we do the same,
only when the graph forks, until nothing moves (at most :data:`MAX_RESIDUAL_ROUNDS` rounds), moving
past forks first (``MoveLinearPastEltwiseAdd`` does not check that the Mul it moves feeds nothing else).
A forking MaxPool gets one copy per branch first (FINN's ``MoveOpPastFork``): FINN's
``MakeMaxPoolNHWC`` mis-wires a MaxPool whose output forks (see :func:`_run_streamline_step`).

Each transformation is recorded as a :class:`StageRecord`; an observer can look at the model after
each one that changed the graph, which is how :func:`compare_execution` attributes output
differences to the transformation that introduced them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from a2q_passes.conventions import LAYOUT_OPS
from a2q_passes.errors import LoweringError
from a2q_passes.finn_accumulators import HW_DOMAIN_PREFIX, is_mac_node
from a2q_passes.finn_deconv import streamline_conv_transposes
from a2q_passes.finn_one_d import one_d_convs, pre_streamline_one_d, refuse_one_d_convs_left
from a2q_passes.finn_global_pooling import integer_global_pools
from a2q_passes.finn_clip_thresholds import clips_into_thresholds
from a2q_passes.graph_values import node_attr
from a2q_passes.finn_pixel_shuffle import PIXEL_SHUFFLES
from a2q_passes.finn_input_thresholds import exact_input_thresholds
from a2q_passes.finn_quant_forms import finn_preparation
from a2q_passes.finn_refusals import (explain_streamline_failure, refuse_before_preparation, refuse_grouped_convs,
                                     refuse_unconvertible_quantizers)
from a2q_passes.finn_runtime import ensure_finn_importable, validate_fpgapart
from a2q_passes.finn_tie_thresholds import activation_tie_rule, round_ties_as_quantized
from a2q_passes.finn_upsample import upsampling_as_hw_layers
from a2q_passes.finn_zero_points import partial_range_threshold_bits, zero_point_passes

MAX_RESIDUAL_ROUNDS = 4

Observer = Callable[["StageRecord", ModelWrapper], None]


@dataclass
class UnloweredNode:
    """A node left as a standard ONNX / qonnx op after conversion to HW layers."""

    name: str
    op_type: str
    reason: str
    blocking: bool  # False for host-side data movement at the graph boundary


@dataclass
class StageRecord:
    """One transformation of the flow and what it did to the graph."""

    index: int
    group: str  # FINN builder step the transformation belongs to
    transformation: str
    changed: bool
    nodes_removed: list[str] = field(default_factory=list)
    nodes_added: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.group}/{self.transformation}"


@dataclass
class LoweringReport:
    """What :func:`lower_to_finn_hw` produced; JSON-ready through :meth:`to_dict`."""

    hw_op_counts: dict[str, int]
    mac_nodes: list[tuple[str, str]]  # (name, op_type) of every MVAU / VVAU
    unlowered: list[UnloweredNode]
    float_hw_nodes: list[str]
    stages: list[StageRecord]
    fpgapart: str | None = None

    @property
    def blocking(self) -> list[UnloweredNode]:
        return [node for node in self.unlowered if node.blocking]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fpgapart": self.fpgapart,
            "hw_op_counts": dict(self.hw_op_counts),
            "mac_nodes": [{"name": name, "op_type": op} for name, op in self.mac_nodes],
            "unlowered": [asdict(node) for node in self.unlowered],
            "float_hw_nodes": list(self.float_hw_nodes),
            "stages": [asdict(stage) for stage in self.stages if stage.changed],
        }


# finn.transformation.streamline.Streamline (finn-plus 1.6.1) applies exactly this list, each
# followed by its cleanup (_streamline_cleanup). It is spelled out here only to observe each
# transformation on its own; tests/test_finn_flow.py checks it still equals FINN's Streamline().
STREAMLINE_TRANSFORMATIONS = (
    "ConvertSubToAdd", "ConvertDivToMul", "BatchNormToAffine", "ConvertSignToThres",
    "MoveMulPastMaxPool", "AbsorbScalarBiasIntoMultiThreshold", "MoveScalesPastIm2Col",
    "MoveScalarLinearPastInvariants", "MoveAddPastMul", "MoveScalarAddPastMatMul", "MoveAddPastConv",
    "MoveScalarMulPastMatMul", "MoveScalarMulPastConv", "MoveAddPastMul", "CollapseRepeatedAdd",
    "CollapseRepeatedMul", "MoveMulPastMaxPool", "AbsorbAddIntoMultiThreshold",
    "FactorOutMulSignMagnitude", "AbsorbMulIntoMultiThreshold", "Absorb1BitMulIntoMatMul",
    "Absorb1BitMulIntoConv",
)


def _transformation(name: str):
    """A fresh instance of the transformation ``name`` as FINN's streamline package imports it."""
    import finn.transformation.streamline as streamline_pkg

    return getattr(streamline_pkg, name)()


def _streamline_cleanup(model: ModelWrapper) -> ModelWrapper:
    """What FINN's Streamline runs after each of its transformations."""
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.remove import RemoveIdentityOps

    for cleanup in (RemoveIdentityOps(), GiveUniqueNodeNames(), _ReadableTensorNames(),
                    InferDataTypes(), InferDataLayouts()):
        model = model.transform(cleanup)
    return model


class _ReadableTensorNames(Transformation):
    """qonnx's ``GiveReadableTensorNames``, the same names in the same order, but learning that a tensor is an
    initializer from a set of names: qonnx's asks ``get_initializer``, which converts the tensor to numpy, for every
    input of every node, a fifth of a full MobileNet's ``lower`` (FINN's Streamline runs it after every step)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.general import GiveUniqueTensorNames

        model = model.transform(GiveUniqueTensorNames())
        initializers = {init.name for init in model.graph.initializer}
        for node in model.graph.node:
            assert node.name != "", "Found empty node name"
            for index, output in enumerate(node.output):
                model.rename_tensor(output, f"{node.name}_out{index}")
            params = 0
            for tensor in node.input:
                if tensor in initializers:
                    renamed = f"{node.name}_param{params}"
                    model.rename_tensor(tensor, renamed)
                    initializers.discard(tensor)
                    initializers.add(renamed)
                    params += 1
        for index, graph_input in enumerate(model.graph.input):
            model.rename_tensor(graph_input.name, "global_in" if index == 0 else f"global_in_{index}")
        for index, graph_output in enumerate(model.graph.output):
            model.rename_tensor(graph_output.name, "global_out" if index == 0 else f"global_out_{index}")
        return model, False


# ---------------------------------------------------------------------------------------------
# Graph fingerprints: name-independent, so FINN's constant renaming does not count as a change.


def _array_digest(model: ModelWrapper, tensor: str, initializers: dict[str, TensorProto]) -> str | None:
    init = initializers.get(tensor)
    if init is None:
        return None
    # the stored bytes where they are raw (as numpy_helper.from_array, hence FINN and qonnx, store them): no copy
    data = init.raw_data or np.ascontiguousarray(numpy_helper.to_array(init)).tobytes()
    digest = hashlib.sha1(data).hexdigest()[:12]
    return f"{tuple(init.dims)}:{init.data_type}:{digest}:{model.get_tensor_datatype(tensor).name}"


def _local_signatures(model: ModelWrapper) -> list[tuple[str, str]]:
    """Per node ``(signature, "op_type name")``; the signature covers op, attributes, constants, types."""
    initializers = {init.name: init for init in model.graph.initializer}
    out = []
    for node in model.graph.node:
        attrs = sorted((a.name, a.SerializeToString()) for a in node.attribute)
        consts = tuple(_array_digest(model, t, initializers) for t in node.input)
        dtypes = tuple(model.get_tensor_datatype(t).name for t in node.output)
        sig = hashlib.sha1(repr((node.op_type, node.domain, attrs, consts, dtypes)).encode()).hexdigest()
        out.append((sig, f"{node.op_type} {node.name or '-> ' + node.output[0]}"))
    return out


def _graph_fingerprint(model: ModelWrapper, local: list[tuple[str, str]]) -> Counter:
    """Multiset of Merkle hashes (a node's hash covers everything upstream): equal iff same dataflow."""
    producer_hash: dict[str, str] = {}
    hashes: Counter = Counter()
    initializers = {init.name for init in model.graph.initializer}
    for node, (sig, _) in zip(model.graph.node, local):
        parts = [sig] + [producer_hash.get(t, "const" if t in initializers else "graph-input") for t in node.input]
        node_hash = hashlib.sha1("|".join(parts).encode()).hexdigest()
        for index, tensor in enumerate(node.output):
            producer_hash[tensor] = f"{node_hash}:{index}"
        hashes[node_hash] += 1
    hashes.update(f"out:{producer_hash.get(o.name, 'graph-input')}" for o in model.graph.output)
    return hashes


# ---------------------------------------------------------------------------------------------


class _Runner:
    """Applies stages one by one, records what each changed, and tells the observer."""

    def __init__(self, model: ModelWrapper, observer: Observer | None) -> None:
        self.model = model
        self.observer = observer
        self.stages: list[StageRecord] = []
        self._local = _local_signatures(model)
        self._fingerprint = _graph_fingerprint(model, self._local)

    def apply(self, group: str, name: str, step: Callable[[ModelWrapper], ModelWrapper]) -> bool:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # FINN prints progress chatter
                new_model = step(self.model)
        except Exception as exc:  # FINN raises plain Exception / FINNUserError naming the node
            # one line: FINN's assertion messages are triple-quoted strings with their source indentation
            message = " ".join(str(exc).split())
            raise LoweringError(f"FINN transformation {group}/{name} failed: {message}") from exc
        local = _local_signatures(new_model)
        fingerprint = _graph_fingerprint(new_model, local)
        changed = fingerprint != self._fingerprint
        before, after = Counter(s for s, _ in self._local), Counter(s for s, _ in local)
        removed_sigs, added_sigs = before - after, after - before
        record = StageRecord(
            index=len(self.stages), group=group, transformation=name, changed=changed,
            nodes_removed=[label for sig, label in self._local if removed_sigs.pop(sig, 0)],
            nodes_added=[label for sig, label in local if added_sigs.pop(sig, 0)],
        )
        self.stages.append(record)
        self.model, self._local, self._fingerprint = new_model, local, fingerprint
        if changed and self.observer is not None:
            self.observer(record, new_model)
        return changed

    def transform(self, group: str, transformation, cleanup: Callable | None = None) -> bool:
        def step(model: ModelWrapper) -> ModelWrapper:
            model = model.transform(transformation)
            return cleanup(model) if cleanup is not None else model

        return self.apply(group, type(transformation).__name__, step)


def _streamline_all(runner: _Runner, group: str) -> bool:
    changed = False
    for name in STREAMLINE_TRANSFORMATIONS:
        changed |= runner.transform(group, _transformation(name), _streamline_cleanup)
    return changed


def _run_streamline_step(runner: _Runner) -> None:
    """FINN's ``step_streamline`` with ``Streamline`` opened up, plus the residual rounds."""
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul

    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline import absorb, reorder

    group = "step_streamline"
    runner.transform(group, absorb.AbsorbScalarBiasIntoMultiThreshold())
    _streamline_all(runner, group)
    if any(runner.model.is_fork_node(node) for node in runner.model.graph.node):
        for _ in range(MAX_RESIDUAL_ROUNDS):
            # past forks first: FINN's MoveLinearPastEltwiseAdd rewires a Mul that also feeds another branch,
            # leaving that branch unfed and the graph cyclic
            moved = runner.transform("residual", reorder.MoveLinearPastFork())
            moved |= runner.transform("residual", reorder.MoveLinearPastEltwiseAdd())
            if not moved:
                break
            _streamline_all(runner, "residual")
    if runner.model.get_nodes_by_op_type("ConvTranspose"):  # see a2q_passes.finn_deconv
        runner.apply(group, "streamline_conv_transposes", streamline_conv_transposes)
    if depthwise_after_mul(runner.model):
        # FINN's MobileNet flow (finn-examples' streamline step): a per-channel activation scale in front of a
        # depthwise Conv moves behind it (each output channel reads one input channel), where streamlining absorbs
        # it into the next thresholds
        runner.transform(group, reorder.MoveMulPastDWConv())
        _streamline_all(runner, group)
    if runner.model.get_nodes_by_op_type("Conv") or runner.model.get_nodes_by_op_type("Im2Col"):
        if any(runner.model.is_fork_node(n) for n in runner.model.get_nodes_by_op_type("MaxPool")):
            # FINN bug (finn-plus 1.6.1): MakeMaxPoolNHWC's (MaxPool, Transpose) branch uses
            # find_consumer() and rewires only the first consumer of a forking MaxPool, so the
            # other branch silently reads the un-pooled tensor. Give each branch its own MaxPool
            # first (FINN's MoveOpPastFork): one extra pooling unit in hardware, correct graph.
            runner.transform("fork_workaround", reorder.MoveOpPastFork(["MaxPool"]))
        runner.transform(group, LowerConvsToMatMul())
        runner.transform(group, reorder.MakeMaxPoolNHWC())
        runner.transform(group, absorb.AbsorbTransposeIntoMultiThreshold())
        runner.transform(group, reorder.MakeMaxPoolNHWC())
        runner.transform(group, absorb.AbsorbConsecutiveTransposes())
    runner.transform(group, ConvertBipolarMatMulToXnorPopcount())
    _streamline_all(runner, group)
    if integer_global_pools(runner.model):  # its Mul by 1 / (H W) then streamlines into the thresholds behind it
        runner.transform(group, InferGlobalAccPoolLayer())
        _streamline_all(runner, group)
    runner.transform(group, absorb.AbsorbScalarMulAddIntoTopK())
    runner.transform(group, InferDataLayouts())
    runner.transform(group, RemoveUnusedTensors())


def depthwise_after_mul(model: ModelWrapper) -> bool:
    """A grouped Conv without a bias input reading a Mul (FINN's MoveMulPastDWConv moves no bias: with one, the move
    would scale it too)."""
    for conv in model.get_nodes_by_op_type("Conv"):
        producer = model.find_producer(conv.input[0])
        grouped = node_attr(conv, "group", 1) > 1
        if producer is not None and producer.op_type == "Mul" and grouped and len(conv.input) == 2:
            return True
    return False


def _run_one_d_step(runner: _Runner, cfg) -> None:
    """FINN's 1-D ``step_pre_streamline`` (:mod:`a2q_passes.finn_one_d`); raises naming the 1-D convolutions it
    left, and why."""
    reasons: list[str] = []

    def step(model: ModelWrapper) -> ModelWrapper:
        model, said = pre_streamline_one_d(model, cfg)
        reasons.extend(said)
        return model

    runner.apply("conv1d", "step_pre_streamline", step)
    refuse_one_d_convs_left(runner.model, reasons)


def _build_config(fpgapart: str | None):
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    # Only the attributes the conversion steps read; nothing is written to output_dir by them.
    return DataflowBuildConfig(output_dir="a2q_finn_unused", fpga_part=fpgapart, steps=[])


@contextlib.contextmanager
def reproducible_names(seed: int = 0) -> Iterator[None]:
    """Make the tensor names qonnx/FINN invent the same on every run.

    ``ModelWrapper.make_new_valueinfo_name`` and ``GiveRandomTensorNames`` draw names from
    Python's global ``random`` (``qonnx.util.basic.random_string``). The generator is seeded for
    the duration and its state restored afterwards, so the caller's own random stream is untouched.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def run_flow(
    model: ModelWrapper, fpgapart: str | None = None, observer: Observer | None = None
) -> tuple[ModelWrapper, list[StageRecord]]:
    """Apply the whole flow to a copy of ``model``; ``observer`` sees the model after each change.

    Equal inputs give byte-identical outputs (see :func:`reproducible_names`).
    """
    ensure_finn_importable()
    import finn.builder.build_dataflow_steps as steps

    if fpgapart is not None:
        fpgapart = validate_fpgapart(fpgapart)
    refuse_before_preparation(model)
    cfg = _build_config(fpgapart)
    with reproducible_names():
        runner = _Runner(ModelWrapper(model.model.SerializeToString()), observer)
        for transformation in finn_preparation():  # exact rewrites FINN's conversion needs (see finn_quant_forms)
            runner.transform("preparation", transformation)
        refuse_unconvertible_quantizers(runner.model)
        refuse_grouped_convs(runner.model)
        tie_rule = activation_tie_rule(runner.model)
        for transformation in zero_point_passes():  # after the tie rule read the zero points
            runner.transform("preparation", transformation)
        partial_bits = partial_range_threshold_bits(runner.model)
        if partial_bits is not None:  # those thresholds stay Thresholding layers (FINN's Requant clamps to the type)
            cfg.requant_bitwidth_threshold = max(cfg.requant_bitwidth_threshold or 0, partial_bits + 1)
        runner.apply("conversion", "step_qonnx_to_finn", lambda m: steps.step_qonnx_to_finn(m, cfg))
        source = ModelWrapper(model.model.SerializeToString())
        runner.apply("conversion", "exact_input_thresholds", lambda m: exact_input_thresholds(m, source))
        runner.apply("conversion", "clips_into_thresholds", clips_into_thresholds)
        runner.apply("tidy_up", "step_tidy_up", lambda m: steps.step_tidy_up(m, cfg))
        if one_d_convs(runner.model):
            _run_one_d_step(runner, cfg)
        try:
            _run_streamline_step(runner)
            runner.apply("convert_to_hw", "upsampling_as_hw_layers", upsampling_as_hw_layers)
            runner.apply("convert_to_hw", "step_convert_to_hw", lambda m: steps.step_convert_to_hw(m, cfg))
            runner.apply("convert_to_hw", "round_ties_as_quantized", lambda m: round_ties_as_quantized(m, tie_rule))
        except LoweringError as err:
            cause = explain_streamline_failure(model)
            if not cause:
                raise
            raise LoweringError(f"{str(err).rstrip('.')}. {cause}") from err.__cause__
        if fpgapart is not None:
            runner.apply("specialize", "step_specialize_layers", lambda m: steps.step_specialize_layers(m, cfg))
    return runner.model, runner.stages


def _unlowered_reason(model: ModelWrapper, node) -> str:
    float_inputs = [t for t in node.input if t and model.get_initializer(t) is None
                    and not model.get_tensor_datatype(t).is_integer()]
    if node.op_type == "MatMul":
        weight = node.input[1]
        if not model.get_tensor_datatype(weight).is_integer():
            return f"weights {weight!r} are {model.get_tensor_datatype(weight).name}, not integer (unquantized layer?)"
        if float_inputs:
            return (f"input {float_inputs[0]!r} is {model.get_tensor_datatype(float_inputs[0]).name}: a float "
                    "scale/bias in front of this layer was not absorbed by streamlining (unquantized input?)")
        return "integer MatMul that InferQuantizedMatrixVectorActivation/InferVectorVectorActivation did not convert"
    if float_inputs:
        return (f"input {float_inputs[0]!r} is {model.get_tensor_datatype(float_inputs[0]).name}; "
                f"FINN has no HW layer for a float {node.op_type} here")
    return f"FINN's step_convert_to_hw has no conversion for this {node.op_type} node"


def _is_boundary(model: ModelWrapper, node) -> bool:
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    return any(t in graph_inputs for t in node.input) or any(t in graph_outputs for t in node.output)


def summarize_lowering(model: ModelWrapper, stages: list[StageRecord], fpgapart: str | None) -> LoweringReport:
    """Classify the nodes of a lowered model: HW layers, nodes left behind (with why), float HW nodes."""
    from qonnx.custom_op.registry import getCustomOp

    hw_counts: Counter = Counter()
    unlowered, float_hw, mac = [], [], []
    for node in model.graph.node:
        if node.domain.startswith(HW_DOMAIN_PREFIX):
            hw_counts[node.op_type] += 1
            if is_mac_node(node):
                mac.append((node.name, node.op_type))
            inst = getCustomOp(node)
            try:
                dtypes = [inst.get_input_datatype(0), inst.get_output_datatype(0)]
            except Exception:  # some HW ops have untyped ports; FINN's own partition step skips those too
                dtypes = []
            if any(not dt.is_integer() for dt in dtypes):
                float_hw.append(node.name)
            continue
        # data movement FINN leaves to the host at the graph boundary (e.g. the NCHW->NHWC input transpose that
        # InferShuffle skips on purpose): not a failure to lower a layer
        host_side = node.op_type in LAYOUT_OPS + PIXEL_SHUFFLES and _is_boundary(model, node)
        reason = ("layout/data movement at the graph boundary, runs on the host" if host_side
                  else _unlowered_reason(model, node))
        unlowered.append(UnloweredNode(node.name, node.op_type, reason, blocking=not host_side))
    return LoweringReport(dict(hw_counts), mac, unlowered, float_hw, stages, fpgapart)


def lower_to_finn_hw(
    model: ModelWrapper, fpgapart: str | None = None, strict: bool = False
) -> tuple[ModelWrapper, LoweringReport]:
    """Lower a QONNX model to FINN HW layers with FINN's own transformations.

    Returns the HW graph (non-specialised MVAU/VVAU/... nodes, which execute in numpy) and a report
    of what was lowered, what was not and why, and which transformation changed the graph. With
    ``fpgapart`` the HW nodes are also specialised (``MVAU_hls``/``MVAU_rtl``...); specialised nodes
    only execute in cppsim/rtlsim, so keep ``fpgapart=None`` for :func:`compare_execution`.
    ``strict=True`` raises :class:`LoweringError` naming the first node FINN left as a standard op
    (host-side layout ops at the graph boundary excepted).
    """
    lowered, stages = run_flow(model, fpgapart)
    report = summarize_lowering(lowered, stages, fpgapart)
    if strict and report.blocking:
        first = report.blocking[0]
        others = ", ".join(n.name for n in report.blocking[1:])
        raise LoweringError(
            f"FINN could not lower node {first.name!r} ({first.op_type}): {first.reason}"
            + (f"; also not lowered: {others}" if others else "")
            + ". Quantize this layer's input and weights (e.g. a QuantIdentity in front) or run with strict=False."
        )
    return lowered, report
