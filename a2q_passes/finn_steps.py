"""a2q build steps for FINN's dataflow builder (``DataflowBuildConfig.steps``, finn-plus 1.6.1).

Each step is a plain function ``step(model, cfg) -> model``, placed next to FINN's own step names::

    steps = [
        step_a2q_project,              # on the QONNX model: weights fit P bits
        step_a2q_finn_preparation,     # exact rewrites of quantizer forms FINN's conversion refuses
        "step_qonnx_to_finn", "step_tidy_up",
        step_a2q_clips_into_thresholds,  # a float Clip before thresholds folded into them (ReLU6 below the top code)
        step_a2q_depthwise_scales,     # per-channel scales behind depthwise Convs (MobileNet-v1), as finn-examples does
        "step_streamline",
        step_a2q_conv_transposes,      # ConvTranspose as pixel padding, sliding window and MVAU (FINN has no step)
        step_a2q_global_pools,         # global average pools on integers as GlobalAccPool, their 1/(HW) into thresholds
        step_a2q_upsampling,           # nearest Resize made NHWC and FINN's UpsampleNearestNeighbour (FINN's step skips it)
        "step_convert_to_hw",
        step_a2q_round_ties,           # exact ties on integer accumulators rounded as the Quant nodes round them
        "step_minimize_bit_width_initial", "step_create_dataflow_partition", "step_specialize_layers",
        "step_target_fps_parallelization", "step_apply_folding_config", "step_minimize_bit_width",
        step_a2q_set_accumulators,     # after FINN's last minimisation, which would reset accDataType
        step_a2q_verify,               # proof per MVAU/VVAU; writes report/a2q_accumulators.json
        "step_generate_estimate_reports",
    ]

:func:`with_a2q_steps` inserts them into any FINN step list that way, and puts ``step_a2q_pre_streamline`` in place
of FINN's 1-D ``step_pre_streamline`` (``finn.builder.custom_step_library.conv1d``) where the list holds it. In a
YAML/JSON build
config they can be named as ``a2q_passes.finn_steps.step_a2q_project`` (FINN imports dotted names).

Settings: ``DataflowBuildConfig`` has no field for them. The steps read two optional
attributes of the config object, ``a2q_acc_bits`` (one width P for every layer) and
``a2q_method`` (projection method, default ``exact``). ``build_dataflow_cfg`` passes the same
object to every step, so attributes set after construction reach them. Without ``a2q_acc_bits``
the widths recorded in the model are used (``a2q project`` / ``a2q annotate``, per QONNX layer).
:func:`make_a2q_steps` binds the settings to the steps instead, for configs that cannot carry
extra attributes: a config read from YAML refuses unknown keys.

Mapping to HW nodes: ``step_a2q_project`` stores each QONNX layer's weight signature in the
model metadata (:func:`a2q_passes.layer_mapping.record_weight_signatures`).
``step_a2q_set_accumulators`` matches those signatures against the MVAU/VVAU weights, so the
mapping survives FINN's renaming, dataflow partitioning and specialisation. FINN's partition
step deep-copies the model, metadata included.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError, AnalysisProblem
from a2q_passes.finn_accumulators import iterate_mac_nodes, set_accumulator_datatypes
from a2q_passes.finn_clip_thresholds import clips_into_thresholds
from a2q_passes.finn_deconv import streamline_conv_transposes
from a2q_passes.finn_global_pooling import accumulate_global_pools
from a2q_passes.finn_one_d import pre_streamline_one_d, refuse_one_d_convs_left
from a2q_passes.finn_quant_forms import prepare_for_finn
from a2q_passes.finn_tie_thresholds import (TIE_RULE_KEY, activation_tie_rule, raise_thresholds_below_unsigned_inputs,
                                            round_ties_as_quantized)
from a2q_passes.finn_upsample import upsampling_as_hw_layers
from a2q_passes.finn_zero_points import partial_range_threshold_bits, zero_point_passes
from a2q_passes.finn_runtime import ensure_finn_importable, estimate_only_steps
from a2q_passes.hw_accumulators import (check_hw_accumulators, describe_hw_layers, hw_targets, qonnx_recorded_widths,
                                        rekey_accumulator_record)
from a2q_passes.layer_mapping import layer_signatures, match_layers, record_weight_signatures, recorded_signatures
from a2q_passes.metadata import metadata_value, recorded_accumulators, set_metadata_value
from a2q_passes.methods import DEFAULT_METHOD
from a2q_passes.output_files import atomic_write_text
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.verification import verify_model

Step = Callable[[ModelWrapper, Any], ModelWrapper]
REPORT_FILE = "a2q_accumulators.json"
ALLOCATION_REPORT_FILE = "a2q_allocation.json"
# FINN steps that (re)set accDataType: ours must run after the last of them
_ACCUMULATOR_STEPS = ("step_convert_to_hw", "step_minimize_bit_width_initial",
                      "step_minimize_bit_width_datatype_only", "step_minimize_bit_width")


def _settings(cfg: Any) -> tuple[int | None, str]:
    return getattr(cfg, "a2q_acc_bits", None), getattr(cfg, "a2q_method", DEFAULT_METHOD)


def _project(model: ModelWrapper, acc_bits: int | None, method: str, skip: Sequence[str] | None) -> ModelWrapper:
    layer_bits = {} if acc_bits is not None else qonnx_recorded_widths(model)
    if acc_bits is None and not layer_bits:
        raise A2QError("step_a2q_project: no accumulator width. Set cfg.a2q_acc_bits = P, use "
                       "make_a2q_steps(acc_bits=P), or record widths in the model with `a2q project`/`a2q annotate`")
    # FINN sizes each MVAU/VVAU from its input DataType (a narrow INTn input is full INTn there)
    model = model.transform(ProjectToAccumulator(acc_bits, layer_bits, method, skip=list(skip or ()),
                                                 input_ranges="finn"))
    record_weight_signatures(model)
    return model


def _set_accumulators(model: ModelWrapper, acc_bits: int | None) -> ModelWrapper:
    from qonnx.custom_op.registry import getCustomOp

    ensure_finn_importable()
    recorded, signatures = qonnx_recorded_widths(model), recorded_signatures(model)
    if acc_bits is None and recorded and not signatures:
        raise A2QError("step_a2q_set_accumulators: the model records widths for its QONNX layers but no weight "
                       "signatures to find their MVAU/VVAU nodes; run step_a2q_project before step_qonnx_to_finn, "
                       "or set cfg.a2q_acc_bits")
    mapping = match_layers(signatures, layer_signatures(model))
    targets, _ = hw_targets(model, mapping, acc_bits, recorded)
    finn_choice = {node.name: getCustomOp(node).get_nodeattr("accDataType") for node in iterate_mac_nodes(model)}
    model = set_accumulator_datatypes(model, target_bits=targets)
    rekey_accumulator_record(model, describe_hw_layers(model, mapping, targets, finn_choice))
    check_hw_accumulators(model, targets)
    return model


def _write_report(cfg: Any, file_name: str, payload: dict[str, Any]) -> None:
    """``payload`` as ``report/FILE_NAME`` under ``cfg.output_dir`` (FINN's report folder), where it is set."""
    output_dir = getattr(cfg, "output_dir", None)
    if output_dir is not None:
        report_dir = Path(output_dir) / "report"
        report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_dir / file_name, json.dumps(payload, indent=2))


def _verify(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    record = recorded_accumulators(model)
    targets = {name: info["target_bits"] for name, info in record.items() if info.get("target_bits") is not None}
    check_hw_accumulators(model, targets)
    # each node at the width recorded by step_a2q_set_accumulators (its accDataType), over its inputDataType
    report = verify_model(model, input_ranges="finn")
    _write_report(cfg, REPORT_FILE, {**report.to_json(), "accumulators": record})
    if not report.overflow_impossible:
        names = ", ".join(f"{v.node} ({v.proof})" for v in report.blocking)
        raise AnalysisProblem(f"step_a2q_verify: overflow possible or not proven in {names}")
    return model


def step_a2q_project(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Project the QONNX model's weights so every layer fits ``cfg.a2q_acc_bits`` (or its recorded width).

    ``cfg.a2q_skip`` (a list of MAC node names) leaves those layers unconstrained, as ``a2q project --skip``.
    """
    acc_bits, method = _settings(cfg)
    return _project(model, acc_bits, method, getattr(cfg, "a2q_skip", None))


def step_a2q_finn_preparation(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Before ``step_qonnx_to_finn``: rewrite the quantizer forms FINN's conversion refuses or fails on into forms that
    compute the same values (:mod:`a2q_passes.finn_quant_forms`: Q/DQ chains as Quant nodes, a signed Quant after
    Relu, bias quantizers, as Brevitas' graph-mode PTQ writes them, grouped convolutions as dense ones), then refuse
    by name what FINN's conversion still cannot take (Q/DQ nodes left, zero points, grouped convolutions left; and,
    first, float16/bfloat16 tensors and convolutions FINN's flow cannot lower: 3-D, channels-last, a batch of several images, ConvTranspose forms
    its pixel padding does not compute, and layers whose weight scale varies along the axis they sum over), as
    ``a2q lower`` does, and last make quantizers with a zero point into forms FINN takes (activations: thresholds
    with an output bias; weights: their codes q - z; :mod:`a2q_passes.finn_zero_points`)."""
    from a2q_passes.finn_refusals import refuse_before_preparation, refuse_grouped_convs, refuse_unconvertible_quantizers

    refuse_before_preparation(model)
    model = prepare_for_finn(model)
    refuse_unconvertible_quantizers(model)
    refuse_grouped_convs(model)
    set_metadata_value(model, TIE_RULE_KEY, activation_tie_rule(model) or "")  # for step_a2q_round_ties
    for transformation in zero_point_passes():  # after the tie rule read the zero points
        model = model.transform(transformation)
    partial_bits = partial_range_threshold_bits(model)
    threshold = getattr(cfg, "requant_bitwidth_threshold", 9)  # FINN's default
    if partial_bits is not None and (threshold is None or threshold <= partial_bits):
        raise A2QError(f"activation quantizers with a zero point become thresholds whose codes do not fill their "
                       f"{partial_bits}-bit type, and with requant_bitwidth_threshold={threshold} FINN's "
                       "step_convert_to_hw makes such thresholds Requant layers, which clamp to the whole type. Set "
                       f"requant_bitwidth_threshold={partial_bits + 1} in the DataflowBuildConfig (as `a2q lower` does)")
    return model


def step_a2q_clips_into_thresholds(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right before ``step_streamline``: a float ``Clip`` that only ``MultiThreshold`` nodes read (a ReLU6 whose bound
    lies below the quantizer's top code) folds into their thresholds, exactly, as ``a2q lower`` does
    (:mod:`a2q_passes.finn_clip_thresholds`); FINN has no HW layer for it, and it kept streamlining from moving a
    scale past it. Models without one are returned as they are."""
    return clips_into_thresholds(model)


def step_a2q_depthwise_scales(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right before ``step_streamline``: a per-channel activation scale (a ``Mul`` after FINN's conversion) in front of
    a depthwise Conv moves behind it with FINN's ``MoveMulPastDWConv``, as finn-examples' MobileNet streamline step
    and ``a2q lower`` do; ``step_streamline`` then absorbs it into the thresholds behind (FINN's plain step lowers
    the Conv first, and the Mul stayed a float node that stopped the dataflow partition). Brevitas' MobileNet-v1
    quantizes each depthwise input so. Models without one are returned as they are."""
    from finn.transformation.streamline.reorder import MoveMulPastDWConv

    from a2q_passes.finn_flow import depthwise_after_mul

    return model.transform(MoveMulPastDWConv()) if depthwise_after_mul(model) else model


def step_a2q_conv_transposes(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right after ``step_streamline``: each 2-D ``ConvTranspose`` becomes pixel padding, a sliding window and an
    integer ``MatMul`` that ``step_convert_to_hw`` makes an MVAU (:mod:`a2q_passes.finn_deconv`); FINN's builder has
    no step for it, and left it a float node that stopped the dataflow partition. A 1-D one is made 2-D before, by
    ``step_a2q_pre_streamline``. Models without one are returned as they are."""
    return streamline_conv_transposes(model)


def step_a2q_pre_streamline(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """In place of FINN's 1-D ``step_pre_streamline``: that step with every 1-D ``ConvTranspose`` made 2-D too (it
    skipped a graph holding one, and FINN's streamlining then stopped on an ``IndexError``), and a 1-D convolution
    it still leaves refused by name (:mod:`a2q_passes.finn_one_d`)."""
    model, reasons = pre_streamline_one_d(model, cfg)
    refuse_one_d_convs_left(model, reasons)
    return model


def step_a2q_global_pools(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right before ``step_convert_to_hw``: each global average pool on integers becomes a ``GlobalAccPool`` whose
    ``Mul`` by 1 / (H W) streamlines into the thresholds behind it (:mod:`a2q_passes.finn_global_pooling`); FINN's
    ``step_convert_to_hw`` infers that layer only after the thresholds, and its plain ``Mul`` then stops the dataflow
    partition. Models without one are returned as they are."""
    return accumulate_global_pools(model)


def step_a2q_upsampling(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right before ``step_convert_to_hw``: each nearest ``Resize``/``Upsample`` between transposes becomes FINN's
    NHWC ``UpsampleNearestNeighbour`` (:mod:`a2q_passes.finn_upsample`); FINN's step infers that layer only from an
    ``Upsample`` node, and left a ``Resize`` a float node that stopped the dataflow partition. Models without one
    are returned as they are."""
    return upsampling_as_hw_layers(model)


def step_a2q_round_ties(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Right after ``step_convert_to_hw``: thresholds on integer accumulators that are exact ties go to the code the
    activation ``Quant`` nodes round them to (:mod:`a2q_passes.finn_tie_thresholds`), where FINN's ``x >= t``
    rounds every tie up. Uses the rounding rule ``step_a2q_finn_preparation`` recorded; without one (or with mixed
    rounding modes) FINN's thresholds are kept. Then thresholds below 0 on unsigned inputs go to 0, which FINN's
    ``step_minimize_bit_width_initial`` asserts (``finn_tie_thresholds.raise_thresholds_below_unsigned_inputs``)."""
    rule = metadata_value(model, TIE_RULE_KEY) or None
    return raise_thresholds_below_unsigned_inputs(round_ties_as_quantized(model, rule))


def step_a2q_allocate(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """In place of ``step_a2q_project``: choose a width per layer (``a2q allocate``), project to it, record it.

    Reads ``cfg.a2q_allocate_data`` (calibration ``.npz``, required), ``cfg.a2q_allocate_val``,
    one of ``cfg.a2q_min_score_pct`` (default 99) / ``cfg.a2q_budget_bits`` / ``cfg.a2q_budget_lut``,
    ``cfg.a2q_method`` and ``cfg.fpga_part``; writes ``report/a2q_allocation.json`` under ``cfg.output_dir``.
    """
    from a2q_passes.transforms.allocate import DEFAULT_FPGAPART, AllocateAccumulators  # torch: imported on use

    data = getattr(cfg, "a2q_allocate_data", None)
    if data is None:
        raise A2QError("step_a2q_allocate: no calibration data. Set cfg.a2q_allocate_data = 'calib.npz' "
                       "(arrays x and optional y)")
    budgets = {name: getattr(cfg, f"a2q_budget_{name}", None) for name in ("bits", "lut")}
    given = [name for name, value in budgets.items() if value is not None]
    if len(given) > 1 or (given and getattr(cfg, "a2q_min_score_pct", None) is not None):
        raise A2QError("step_a2q_allocate: set only one of cfg.a2q_min_score_pct, cfg.a2q_budget_bits, "
                       "cfg.a2q_budget_lut")
    step = AllocateAccumulators(
        data, getattr(cfg, "a2q_allocate_val", None),
        min_score_pct=None if given else getattr(cfg, "a2q_min_score_pct", None) or 99.0,
        budget=budgets[given[0]] if given else None, cost_model="finn-lut" if given == ["lut"] else "bits",
        projection_method=getattr(cfg, "a2q_method", DEFAULT_METHOD),
        fpgapart=getattr(cfg, "fpga_part", None) or DEFAULT_FPGAPART, progress=False,
        input_ranges="finn")  # the output is built by FINN, which sizes each MAC from its input DataType
    result = step(model)
    record_weight_signatures(result.model)
    _write_report(cfg, ALLOCATION_REPORT_FILE, result.details)
    return result.model


def step_a2q_set_accumulators(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Set every MVAU/VVAU ``accDataType`` to its exact range, never wider than its target (see module docstring)."""
    return _set_accumulators(model, _settings(cfg)[0])


def step_a2q_verify(model: ModelWrapper, cfg: Any) -> ModelWrapper:
    """Prove no MVAU/VVAU accumulator can overflow at its ``accDataType``; report to ``report/a2q_accumulators.json``."""
    return _verify(model, cfg)


def make_a2q_steps(acc_bits: int | None = None, method: str = DEFAULT_METHOD,
                   skip: Sequence[str] | None = None) -> list[Step]:
    """``[project, set_accumulators, verify]`` bound to these settings (named like the plain steps)."""

    def step_a2q_project(model: ModelWrapper, cfg: Any) -> ModelWrapper:
        return _project(model, acc_bits, method, skip)

    def step_a2q_set_accumulators(model: ModelWrapper, cfg: Any) -> ModelWrapper:
        return _set_accumulators(model, acc_bits)

    return [step_a2q_project, step_a2q_set_accumulators, step_a2q_verify]


def with_a2q_steps(steps: Sequence[str | Step] | None = None, acc_bits: int | None = None,
                   method: str = DEFAULT_METHOD) -> list[str | Step]:
    """FINN's ``steps`` (default: its estimate-only list) with the a2q steps in place (see module docstring).

    With ``acc_bits`` the steps are bound to it (:func:`make_a2q_steps`); otherwise they are the
    plain functions, which read the config's attributes.
    """
    steps = list(steps) if steps is not None else estimate_only_steps()
    names = [step if isinstance(step, str) else step.__name__ for step in steps]
    steps = [step_a2q_pre_streamline if name == "step_pre_streamline" else step for step, name in zip(steps, names)]
    if "step_qonnx_to_finn" not in names or "step_convert_to_hw" not in names:
        raise A2QError(f"with_a2q_steps needs step_qonnx_to_finn and step_convert_to_hw in the step list, got {names}")
    project, set_accumulators, verify = (make_a2q_steps(acc_bits, method) if acc_bits is not None
                                         else [step_a2q_project, step_a2q_set_accumulators, step_a2q_verify])
    last = max(index for index, name in enumerate(names) if name in _ACCUMULATOR_STEPS)
    first = names.index("step_qonnx_to_finn")
    hw = names.index("step_convert_to_hw")
    before_hw = [*steps[first:hw]]
    if "step_streamline" in names[first:hw]:
        at = names.index("step_streamline") - first
        before_hw[at:at] = [step_a2q_clips_into_thresholds, step_a2q_depthwise_scales]
    return [*steps[:first], project, step_a2q_finn_preparation, *before_hw, step_a2q_conv_transposes,
            step_a2q_global_pools, step_a2q_upsampling, steps[hw],
            step_a2q_round_ties, *steps[hw + 1:last + 1], set_accumulators, verify, *steps[last + 1:]]


__all__ = ["REPORT_FILE", "make_a2q_steps", "step_a2q_allocate", "step_a2q_clips_into_thresholds",
           "step_a2q_conv_transposes", "step_a2q_depthwise_scales", "step_a2q_finn_preparation",
           "step_a2q_global_pools", "step_a2q_pre_streamline", "step_a2q_project", "step_a2q_round_ties",
           "step_a2q_set_accumulators", "step_a2q_upsampling", "step_a2q_verify", "with_a2q_steps"]
