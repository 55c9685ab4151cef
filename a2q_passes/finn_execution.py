"""Executing FINN graphs on data and comparing them with the QONNX model they were lowered from.

:func:`compare_execution` also attributes any output difference to the flow stage that introduced
it, by replaying :func:`a2q_passes.finn_flow.run_flow` with an observer; :func:`equivalence_inputs` draws
inputs on the model input's grid and :func:`check_equivalence` compares end to end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import NodeProto
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.finn_accumulators import HW_DOMAIN_PREFIX, is_mac_node
from a2q_passes.finn_flow import LoweringError, StageRecord, run_flow
from a2q_passes.finn_quant_forms import DefaultDomainFirst, prepare_for_finn
from a2q_passes.model_io import data_inputs


def _graph_io_shapes(model: ModelWrapper) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    names = [i.name for i in data_inputs(model.graph)]
    shapes = [tuple(model.get_tensor_shape(n)) for n in names]
    return names, shapes, [o.name for o in model.graph.output]


def _to_layout(x: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``x`` in the layout of ``shape``: as is, or NCHW -> NHWC when that is what the graph expects; a 1-D
    ``[N, C, L]`` becomes ``[N, C, L, 1]`` first, as FINN's 1-D flow makes it."""
    if x.ndim == 3 and len(shape) == 4:
        x = x[..., None]
    if x.shape == shape:
        return x
    if x.ndim == 4 and x.transpose(0, 2, 3, 1).shape == shape:
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"{what}: cannot match shape {x.shape} to the graph's {shape}")


def _from_layout(y: np.ndarray, ref_shape: tuple[int, ...], what: str) -> np.ndarray:
    """FINN output ``y`` back in the QONNX model's layout (NHWC -> NCHW if needed; ``[N, C, L, 1]`` -> ``[N, C, L]``
    after FINN's 1-D flow)."""
    if y.shape != ref_shape and y.ndim == 4 and y.transpose(0, 3, 1, 2).shape in (ref_shape, (*ref_shape, 1)):
        y = y.transpose(0, 3, 1, 2)
    if y.shape == (*ref_shape, 1):
        y = y[..., 0]
    if y.shape == ref_shape:
        return y
    raise ValueError(f"{what}: output shape {y.shape} does not match the original model's {ref_shape}")


class ExecutionError(A2QError):
    """Executing a model for the equivalence check failed; the message names the model and the fix."""


def _execution_hint(message: str, model: ModelWrapper, otherwise: str | None = None) -> str:
    odd = [(node.name, shape) for node in model.graph.node if node.domain.startswith(HW_DOMAIN_PREFIX)
           and len(shape := model.get_tensor_shape(node.input[0]) or [0, 0]) not in (2, 4)]
    if odd:
        ranks = "/".join(sorted({f"{len(shape)}-D" for _, shape in odd}))
        return (f"FINN's HW layers here take {ranks} tensors ({', '.join(f'{n} {s}' for n, s in odd[:4])}; a sequence "
                "model's [N, T, C] activations are 3-D), and FINN's own execution of them fails, so the lowering "
                "cannot be checked and nothing is written. Lower a model whose MAC layers see 2-D [N, C] or 4-D "
                "[N, C, H, W] activations (e.g. fold the sequence axis into the batch), or keep these layers out of "
                "the FINN part")
    if "double" in message:
        return ("a float64 (double) tensor meets float32 ones, which onnxruntime refuses; FINN computes in "
                "float32: re-export the model with float32 tensors (`a2q lower` casts float64 initializers itself, "
                "so this one is a graph input, a Cast or a Constant)")
    if "Rounding error is too high" in message or "Values can't be represented" in message:
        tensor = re.search(r"for input (\S+)", message)
        producer = model.find_producer(tensor.group(1)) if tensor else None
        if producer is not None:  # an inner tensor: FINN's own annotation is wrong, not the data
            return (f"FINN annotates {tensor.group(1)}, the output of {producer.name} ({producer.op_type}), as an "
                    "integer datatype its values do not have (its datatype inference passes the input's type "
                    f"through that node, e.g. a Clip with non-integer bounds), so FINN's graph cannot execute and "
                    "nothing is written. Quantize before such a node, or give it integer bounds")
        return ("the input values are not on the graph input's annotated datatype; give --data with values "
                "that datatype allows, or remove the annotation")
    return otherwise or "check that the model executes with qonnx (`qonnx.core.onnx_exec.execute_onnx`) on these inputs"


Inputs = np.ndarray | Sequence[np.ndarray]  # one array per data input in graph order (the array itself for one input)


def input_arrays(inputs: Inputs) -> list[np.ndarray]:
    """``inputs`` as a list of float32 arrays, one per data input."""
    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    return [np.asarray(a, dtype=np.float32) for a in arrays]


def _failing_node(exc: BaseException) -> NodeProto | None:
    """The node qonnx's ``execute_node`` was running when ``exc`` was raised (its frame's ``node``), if any."""
    trace, node = exc.__traceback__, None
    while trace is not None:
        if trace.tb_frame.f_code.co_name == "execute_node" and isinstance(trace.tb_frame.f_locals.get("node"), NodeProto):
            node = trace.tb_frame.f_locals["node"]
        trace = trace.tb_next
    return node


def execute_batch(model: ModelWrapper, inputs: Inputs, what: str = "model", hint: str | None = None,
                  check_mac_inputs: bool = False) -> list[np.ndarray]:
    """Run ``execute_onnx`` sample by sample (FINN graphs have a fixed batch of 1); outputs stacked.

    ``inputs`` go to the model's data inputs in graph order (FINN renames them, and keeps their order). A failure
    inside execution raises :class:`ExecutionError` naming ``what``, the node, the sample and a fix (``hint`` where
    the caller knows more than that the model did not execute on these inputs). ``check_mac_inputs``: every
    MVAU/VVAU's input values must lie in its ``inputDataType`` (else :class:`LoweringError`).
    """
    from qonnx.core.onnx_exec import execute_onnx

    names, shapes, outputs = _graph_io_shapes(model)
    arrays = input_arrays(inputs)
    if len(arrays) != len(names):
        raise ValueError(f"{what}: {len(arrays)} input array(s) for the inputs {names}")
    per_sample = max(min(shape[0] for shape in shapes), 1)
    results: list[list[np.ndarray]] = [[] for _ in outputs]
    for start in range(0, arrays[0].shape[0], per_sample):
        feed = {name: _to_layout(a[start:start + per_sample], shape, f"input {name}")
                for name, shape, a in zip(names, shapes, arrays)}
        try:
            out = execute_onnx(model, feed, return_full_exec_context=check_mac_inputs)
        except Exception as exc:  # qonnx/onnxruntime raise plain exceptions, which not always name the node
            message = " ".join(str(exc).split())
            node = _failing_node(exc)
            where = f" at node {node.name or node.output[0]!r} ({node.op_type})" if node is not None else ""
            raise ExecutionError(f"executing the {what} failed{where} on input sample {start}: {message}. "
                                 f"Fix: {_execution_hint(message, model, hint)}") from exc
        if check_mac_inputs:
            _mac_inputs_within_types(model, out, start)
        for index, name in enumerate(outputs):
            results[index].append(out[name])
    return [np.concatenate(r, axis=0) for r in results]


def _mac_inputs_within_types(model: ModelWrapper, context: dict[str, np.ndarray], sample: int) -> None:
    """Raise :class:`LoweringError` naming an MVAU/VVAU whose input, as ``model`` executed, holds a value outside
    its ``inputDataType``: the accumulator is sized over that type (lower's self-check of what FINN annotated)."""
    from qonnx.custom_op.registry import getCustomOp

    for node in model.graph.node:
        if not is_mac_node(node):
            continue
        dt = DataType[getCustomOp(node).get_nodeattr("inputDataType")]
        values = np.unique(context[node.input[0]])
        outside = next((v for v in values if not dt.allowed(v)), None)
        if outside is not None:
            raise LoweringError(
                f"{node.name} ({node.op_type}) receives {outside:g} on input sample {sample}, outside its inputDataType "
                f"{dt.name}, over which its accumulator is sized: FINN typed the layer narrower than what reaches it, "
                "so the lowered graph is not written. Keep that part of the model out of the FINN part, or report "
                "the model to a2q-passes")


def _max_abs_diff(ref: list[np.ndarray], got: list[np.ndarray], what: str) -> float:
    return max(float(np.max(np.abs(_from_layout(g, r.shape, what).astype(np.float64) - r)))
               for r, g in zip(ref, got))


def compare_execution(
    original: ModelWrapper,
    lowered: ModelWrapper,
    inputs: Inputs,
    atol: float = 1e-5,
    attribution_samples: int = 8,
    attribute: bool = True,
) -> dict[str, Any]:
    """Execute the QONNX model and its FINN HW graph on ``inputs`` and locate any difference.

    What is compared: every graph output of ``original`` (QONNX, as exported) against the same
    output of ``lowered``, brought back to the original layout (NHWC -> NCHW where FINN changed it).
    finn-plus keeps the final scale/bias as ElementwiseMul/Add HW nodes, so the values are comparable
    directly; a graph whose output shape FINN changed otherwise (e.g. a TopK absorbing the final Mul)
    raises instead of being compared loosely. Inputs are fed in the original layout and transposed
    when the lowered graph expects NHWC. ``inputs``: one array per data input (the array itself for a single-input
    model), each with a leading batch axis.

    Attribution: the flow of :func:`lower_to_finn_hw` is replayed on ``original`` and the model
    after every transformation that changed the graph is executed on the first
    ``attribution_samples`` inputs. For each such stage the report gives the difference to the
    original (cumulative) and to the previous stage (introduced by this one), with the nodes the
    transformation removed/added. A final entry covers changes made after lowering (e.g. by
    :func:`set_accumulator_datatypes`) when ``lowered`` differs from the replayed flow's result.
    ``attribute=False`` skips the replay (only the end-to-end difference is reported).
    """
    from qonnx.transformation.general import RemoveStaticGraphInputs
    from qonnx.util.cleanup import cleanup_model

    # static inputs first: cleanup_model drops an unused initializer before its graph input entry, which would
    # leave that entry as a second, dynamic input
    reference_model = ModelWrapper(original.model.SerializeToString()).transform(RemoveStaticGraphInputs())
    reference_model = cleanup_model(reference_model.transform(DefaultDomainFirst()))  # see DefaultDomainFirst
    inputs = input_arrays(inputs)
    reference = execute_batch(reference_model, inputs, "QONNX model")
    final = execute_batch(lowered, inputs, "lowered FINN graph", check_mac_inputs=True, hint=(
        "the QONNX model executes on these inputs, so FINN's transformations made a graph that FINN's own execution "
        "of its layers cannot run (a limitation of FINN's lowering for this structure, e.g. a layer that reads its "
        "input in another layout than it was given), and nothing is written. Keep that part of the model out of the "
        "FINN part, or report the model to FINN"))
    max_diff = _max_abs_diff(reference, final, "lowered model")
    scale = max(1.0, max(float(np.max(np.abs(r))) for r in reference))

    tolerance = atol * scale
    result: dict[str, Any] = {
        "compared": "all graph outputs of the QONNX model vs the FINN graph, original (NCHW) layout",
        "samples": int(inputs[0].shape[0]),
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "within_tolerance": max_diff <= tolerance,
    }
    if reference[0].ndim == 2 and reference[0].shape[1] > 1:
        agree = np.argmax(reference[0], axis=1) == np.argmax(_from_layout(final[0], reference[0].shape, "top-1"), axis=1)
        result["top1_agreement"] = float(np.mean(agree))
    # on the file as FINN's preparation gives it (Q/DQ chains as Quant nodes: exact rewrites), so Q/DQ files too
    ties_up = activation_ties_rounded_up(prepare_for_finn(reference_model)) if max_diff > tolerance else None
    if ties_up is not None:
        # FINN's thresholds (x >= t) round an exact tie up, QONNX's ROUND to even: say so where that is the whole story
        diff = _max_abs_diff(execute_batch(ties_up, inputs, "QONNX model, ties rounded up"), final, "lowered model")
        result["ties_rounded_up_max_abs_diff"] = diff
        result["explained_by_tie_rounding"] = diff <= tolerance
    if attribute:
        result.update(_attribute_differences(original, final, reference, [a[:attribution_samples] for a in inputs],
                                             tolerance))
    return result


def activation_ties_rounded_up(model: ModelWrapper) -> ModelWrapper | None:
    """A copy of ``model`` whose activation ``Quant`` nodes with ``rounding_mode=ROUND`` (half to even) round exact
    ties up instead, as FINN's ``MultiThreshold`` does (``x >= threshold``): ``FLOOR(x / s + 1/2 + z)``, computed as
    ``Quant(x / s + 1/2, 1, z, b, FLOOR) * s``. None where the model has no such node (or one whose scale is not a
    constant).

    Why ``x / s`` first: a tie is a value whose ``x / s`` the ``Quant`` computes as half an odd integer; the ``FLOOR``
    of ``(x + s/2) / s`` rounds differently and missed a sixth of them for a scale of 0.1. ``(q - z) * s`` is the
    float32 product the original node returns."""
    from onnx import helper, numpy_helper
    from qonnx.transformation.infer_shapes import InferShapes

    copy = ModelWrapper(model.model.SerializeToString())
    quants = [node for node in copy.graph.node if node.op_type == "Quant" and copy.get_initializer(node.input[0]) is None
              and next((a.s for a in node.attribute if a.name == "rounding_mode"), b"ROUND").upper() in (b"ROUND",
                                                                                                       b"HALF_EVEN")]
    if not quants or any(copy.get_initializer(node.input[1]) is None for node in quants):
        return None
    for index, node in enumerate(quants):
        name = f"{node.name}_tie_{index}"
        copy.graph.initializer.extend([numpy_helper.from_array(np.float32(0.5), f"{name}_half"),
                                       numpy_helper.from_array(np.float32(1), f"{name}_one")])
        x, scale, output = node.input[0], node.input[1], node.output[0]
        position = list(copy.graph.node).index(node)
        copy.graph.node.insert(position, helper.make_node("Div", [x, scale], [f"{name}_t"]))
        copy.graph.node.insert(position + 1, helper.make_node("Add", [f"{name}_t", f"{name}_half"], [f"{name}_up"]))
        node.input[0], node.input[1], node.output[0] = f"{name}_up", f"{name}_one", f"{name}_codes"
        attributes = [a for a in node.attribute if a.name != "rounding_mode"]
        del node.attribute[:]
        node.attribute.extend([*attributes, helper.make_attribute("rounding_mode", "FLOOR")])
        copy.graph.node.insert(position + 3, helper.make_node("Mul", [node.output[0], scale], [output]))
    return copy.transform(InferShapes())  # qonnx's executor wants every tensor shaped


def _attribute_differences(original: ModelWrapper, final: list[np.ndarray], reference: list[np.ndarray],
                           sample: list[np.ndarray], tolerance: float) -> dict[str, Any]:
    """Replay the flow on ``original``, executing ``sample`` after every stage that changed the graph."""
    from qonnx.transformation.infer_shapes import InferShapes

    sample_ref = [r[: len(sample[0])] for r in reference]
    stage_rows: list[dict[str, Any]] = []
    previous = sample_ref

    def observe(record: StageRecord, model: ModelWrapper) -> None:
        nonlocal previous
        # a copy with every tensor shaped: qonnx's executor wants that, and the early stages keep the file's own
        # value_info, which ONNX does not require to be complete
        outputs = execute_batch(model.transform(InferShapes()), sample, f"model after {record.label}")
        aligned = [_from_layout(o, r.shape, record.label) for o, r in zip(outputs, sample_ref)]
        row = {
            "stage": record.label,
            "index": record.index,
            "max_abs_diff_vs_original": _max_abs_diff(sample_ref, aligned, record.label),
            "max_abs_diff_vs_previous": _max_abs_diff(previous, aligned, record.label),
            "nodes_removed": record.nodes_removed,
            "nodes_added": record.nodes_added,
        }
        stage_rows.append(row)
        previous = aligned

    _, replay_stages = run_flow(original, observer=observe)
    lowered_sample = [_from_layout(f[: len(sample[0])], r.shape, "lowered") for f, r in zip(final, sample_ref)]
    after_lowering = _max_abs_diff(previous, lowered_sample, "lowered vs replay")  # previous: replay's result
    if after_lowering > 0:
        stage_rows.append({
            "stage": "after_lowering/given model vs replayed flow",
            "index": len(replay_stages),
            "max_abs_diff_vs_original": _max_abs_diff(sample_ref, lowered_sample, "lowered"),
            "max_abs_diff_vs_previous": after_lowering,
            "nodes_removed": [], "nodes_added": [],
        })
    introduced = [row for row in stage_rows if row["max_abs_diff_vs_previous"] > tolerance]
    return {
        "stages": stage_rows,
        "introduced_by": [{"stage": r["stage"], "max_abs_diff": r["max_abs_diff_vs_previous"],
                           "nodes_removed": r["nodes_removed"], "nodes_added": r["nodes_added"]}
                          for r in introduced],
    }


def equivalence_inputs(model: ModelWrapper, samples: int = 8, seed: int = 0) -> Inputs:
    """Deterministic inputs for :func:`compare_execution`, on each data input's grid: one array
    ``(samples, *input_shape[1:])`` per data input in graph order (the array itself for a single-input model).

    * Graph input annotated with an integer datatype (``INTn``/``UINTn``/``BIPOLAR``...): its
      allowed values only, drawn uniformly (qonnx refuses any other value of an annotated input).
    * Graph input read by a ``Quant``: reals drawn uniformly from the quantizer's real range
      ``[(lo - z) s, (hi - z) s]`` (by several: the union, snapped to the widest); every second sample is snapped
      onto the grid ``(code - z) s``,
      because grid-valued data (images as k/255 ...) sit on the float32 decision boundaries where
      a wrongly rounded threshold flips a code (see :func:`a2q_passes.finn_input_thresholds.exact_input_thresholds`).
    * Otherwise (a float input with no quantizer): a standard normal.
    """
    from a2q_passes.input_grids import GridResolver

    rng = np.random.default_rng(seed)
    resolver = GridResolver(model)
    arrays = [_input_samples(model, resolver, info.name, samples, rng) for info in data_inputs(model.graph)]
    return arrays[0] if len(arrays) == 1 else arrays


def _input_samples(model: ModelWrapper, resolver: Any, name: str, samples: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`equivalence_inputs` of the data input ``name``."""
    shape = (samples, *model.get_tensor_shape(name)[1:])
    annotated = model.get_tensor_datatype(name)
    if annotated.is_integer():
        if annotated == DataType["BIPOLAR"]:
            return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
        return rng.integers(int(annotated.min()), int(annotated.max()), size=shape, endpoint=True).astype(np.float32)
    quants = [n for n in model.find_consumers(name) or [] if n.op_type in ("Quant", "IntQuant")]
    grids = [resolver.resolve(q.output[0])[0] for q in quants]
    if not grids or any(g is None or g.scale is None for g in grids):
        return rng.standard_normal(shape).astype(np.float32)
    # several quantizers of one input (e.g. two widths joined later): the union of their real ranges, and every
    # second sample on the grid of the widest, so that each quantizer reaches both ends of its codes
    ends = [(g.range.lo - g.zero_code) * g.scale for g in grids] + [(g.range.hi - g.zero_code) * g.scale for g in grids]
    inputs = rng.uniform(min(ends), max(ends), size=shape).astype(np.float32)  # a negative scale reverses them
    grid = max(grids, key=lambda g: abs(g.scale) * (g.range.hi - g.range.lo))
    codes = rng.integers(grid.range.lo, grid.range.hi, size=inputs[1::2].shape, endpoint=True)
    inputs[1::2] = ((codes - grid.zero_code) * np.float32(grid.scale)).astype(np.float32)
    return inputs


def check_equivalence(original: ModelWrapper, lowered: ModelWrapper, inputs: Inputs,
                      attribution_samples: int = 4) -> dict[str, Any]:
    """:func:`compare_execution` end to end; the per-stage replay runs only when a difference appears.

    Tolerance (that of :func:`compare_execution`): ``1e-5 * max(1, max |original output|)``.
    A correct lowering differs only by float reassociation of the folded scales (about 1e-7
    relative); one flipped quantization step moves an output by a whole output scale step.
    """
    result = compare_execution(original, lowered, inputs, attribute=False)
    if not result["within_tolerance"]:
        result = compare_execution(original, lowered, inputs, attribution_samples=attribution_samples)
    return result
