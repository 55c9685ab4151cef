"""The real-file corpus of issue 10: files written by the real producers, run through ``a2q`` as a new user would.

    .venv/bin/python -m scripts.corpus --out DIR [--quick] [--allocate] [--report bench/corpus.md]

Generates, offline and seeded, quantized ONNX files with Brevitas (``export_qonnx``; ``export_onnx_qcdq`` with the
TorchScript and the dynamo exporter), PyTorch's own QAT (``torch.ao.quantization``, ``tests/torch_qat_nets.py``),
onnxruntime (``quantize_static`` QDQ, also in its com.microsoft Q/DQ, and QOperator, ``quantize_dynamic``, and what
an ``InferenceSession``'s graph optimizer saves from them), qonnx's channels-last form of the QONNX convolutions
(``ConvertToChannelsLastAndClean``), qonnx's cleanup and the transformations FINN's and hls4ml's preparation run on
QONNX files (``_qonnx_transformations``), FINN's own pipeline (``step_qonnx_to_finn`` to ``step_minimize_bit_width``,
as far as it runs without Vivado), the committed QONNX model-zoo files (``tests/data``) and Keras files
(``tests/data/keras``: QKeras models as qonnx's converter writes them, and onnxruntime's quantizer over tf2onnx
float models), and the committed files of TensorFlow Lite's converter through tf2onnx, NNCF, AMD Quark and PyTorch's
PT2E (``tests/data/tflite``, ``tests/data/ptq_tools``). Each file then goes
through the command line:

1. ``a2q analyze --json --per-channel``: every quantized MAC layer must be read, and each one's reported range must
   contain what the independent oracle (``tests/fuzz/oracle.py`` via ``tests/fuzz/real_files.py``: worst-case
   inputs executed through the graph's own quantizers with qonnx) executes; "tight" when they are equal;
2. ``a2q project`` at P = the widest exact width - 2 (``--input-ranges finn`` for the files that are lowered);
3. ``a2q verify`` of the projected file, and the oracle on it: every promised layer's executed range fits P;
4. for QONNX files, and Q/DQ files ``lower`` takes (qonnx's QCDQToQuant converts them whole, stored integer weights
   given their QuantizeLinear first, into quantizers with zero points of 0 or activation zero points a2q makes
   thresholds of; no product of two activations),
   ``a2q lower --from-annotations``: every MVAU/VVAU's executed range (its ``inputDataType``) fits the
   ``accDataType`` it was given; every other Q/DQ file must be refused by ``lower`` by name before FINN's steps
   (exit 1, nothing written, no raw FINN failure), or it FAILS;
5. for files with QONNX ``Quant`` nodes, ``a2q finetune`` at the same P (one short epoch on random inputs, distilled
   from the file itself; the methods ``norm``, ``qat`` and ``axe`` in turn), again with ``--skip`` where it names
   layers it cannot train: ``a2q verify`` of its output, and the oracle's executed range of every layer it constrained
   fits P. A clear refusal is noted (the file stays handled); a traceback or an unsafe output is a failure;
7. (run after 1) ``a2q verify --data --layer NAME=P`` on random inputs for up to four layers it simulates (the
   fuzzer's property (j)): the overflows it counts are exactly those of the accumulators the whole file executes to
   on that data (qonnx), at each layer's width on the data and one bit less;
6. with ``--allocate``, on the files of 5 (``--cost bits``: FINN's lowering) and the other files read under the
   fold convention (Q/DQ, FINN-ONNX; ``--cost acc-bits``: no FINN): ``a2q allocate --min-score-pct 95`` on random
   inputs, then ``a2q project --widths-json`` of its map, ``a2q verify``, and the oracle: every layer of the map
   executes within its width (refusals and failures as in 5).

Each file is *handled* (all of the above), *refused* (``a2q`` exits 1 or 3, or reports a layer it cannot read,
with a message naming the construct and no traceback), *unchecked* (the oracle cannot read the file's grid, so
nothing is claimed either way) or *FAILED* (a traceback, a wrong or unsafe range, an unclear refusal). ``--quick`` keeps one file
per producer class (the fast test ``tests/test_corpus.py``). Exit status 1 when any file FAILED.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import logging
import re
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
# project at the widest exact width of the weight layers minus this (every such projection changes weights), or at
# the width of a product of two activations where that is wider: those cannot shrink
BELOW_WIDEST = 2
EXPORTERS = {"qonnx": "Brevitas export_qonnx", "qcdq_ts": "Brevitas export_onnx_qcdq (TorchScript)",
             "qcdq_dynamo": "Brevitas export_onnx_qcdq (dynamo)",
             "qcdq_ts_wq": "Brevitas export_onnx_qcdq (TorchScript, export_weight_q_node=True)"}
ORT_FORMATS = {"QDQ": "onnxruntime quantize_static QDQ", "QOperator": "onnxruntime quantize_static QOperator",
               "dynamic": "onnxruntime quantize_dynamic",
               "QDQ_contrib": "onnxruntime quantize_static QDQ (com.microsoft Q/DQ, UseQDQContribOps)"}
ORT_OPTIMIZED = "onnxruntime InferenceSession optimized_model_filepath"
FINN_STAGES = {"step_qonnx_to_finn": "FINN ConvertQONNXtoFINN", "step_streamline": "FINN Streamline",
               "step_convert_to_hw": "FINN convert_to_hw (MVAU/VVAU)",
               # the dataflow partition's own model (FINN's step returns it), then the steps before code generation
               "step_create_dataflow_partition": "FINN dataflow partition (child model)",
               "step_specialize_layers": "FINN specialize_layers (MVAU_hls/MVAU_rtl)",
               "step_target_fps_parallelization": "FINN target_fps_parallelization (PE/SIMD)",
               "step_minimize_bit_width": "FINN minimize_bit_width (weight and accumulator types)"}
ZOO = "QONNX model zoo"
QKERAS = "QKeras (qonnx.converters.from_keras)"
TF2ONNX_ORT = "onnxruntime quantize_static / quantize_dynamic of tf2onnx (Keras) models"
# (format, weight type, activation type, per channel) of onnxruntime's quantizer over the tf2onnx float models
TF2ONNX_ORT_VARIANTS = [("QDQ", "QInt8", "QUInt8", True), ("QDQ", "QInt8", "QInt8", False),
                        ("QOperator", "QInt8", "QUInt8", True), ("dynamic", "QInt8", "QUInt8", True)]
# the committed files of three more quantizers (tests/data/tflite, tests/data/ptq_tools; see each README)
COMMITTED_QUANTIZERS = {"tflite": "TensorFlow Lite converter (int8, 16x8, dynamic), tf2onnx from_tflite",
                        "nncf": "NNCF quantize (ONNX backend)", "quark": "AMD Quark (quark.onnx ModelQuantizer)",
                        "pt2e": "PyTorch PT2E (torchao prepare_pt2e / convert_pt2e), torch.onnx dynamo export"}
COMMITTED_QUICK = ("tflite_cnn_int8", "nncf_attention_performance", "quark_conv_gemm_matmul_a16w8", "pt2e_mlp_xnnpack_pt")
CHANNELS_LAST = "qonnx ConvertToChannelsLastAndClean"
TORCH_QAT = "PyTorch QAT (torch.ao.quantization, TorchScript export)"
GRAPH_PTQ = {"qonnx": "Brevitas graph-mode PTQ (brevitas_examples quantize_model), export_qonnx",
             "qcdq": "Brevitas graph-mode PTQ (brevitas_examples quantize_model), export_onnx_qcdq"}
# (backend, weight bits, act bits, further quantize_model arguments), on the MLP and on the residual CNN
GRAPH_PTQ_CONFIGS = [("fx", 8, 8, (("weight_quant_granularity", "per_tensor"),)),
                     ("fx", 4, 4, (("bias_bit_width", 32),)),
                     ("fx", 4, 8, (("scale_factor_type", "po2_scale"),)),
                     ("fx", 8, 8, (("act_quant_type", "asym"),)),
                     ("fx", 8, 8, (("weight_quant_granularity", "per_tensor"), ("weight_quant_type", "asym"))),
                     ("fx", 6, 6, (("weight_param_method", "mse"),)),
                     ("layerwise", 4, 4, ()),
                     ("flexml", 8, 8, (("weight_quant_granularity", "per_tensor"), ("scale_factor_type", "po2_scale")))]
BREVITAS_EXAMPLES = {"qonnx": "Brevitas examples' models (bnn_pynq, ESPCN A2Q/A2Q+, MobileNet-v1), export_qonnx",
                     "qcdq": "Brevitas examples' models (bnn_pynq, ESPCN A2Q/A2Q+, MobileNet-v1), export_onnx_qcdq",
                     "qcdq_ts": "Brevitas examples' models (bnn_pynq, ESPCN A2Q/A2Q+, MobileNet-v1), export_onnx_qcdq "
                                "(TorchScript)"}
QUANTIZE_GRAPH = "qonnx QuantizeGraph (Quant nodes inserted into a float model)"
# QuantizeGraph's (scale, zero point, bit width, narrow, signed, rounding) for MAC inputs 0 (data) and 1 (weights)
QUANTIZE_GRAPH_SPECS = {"w8a8": ((0.05, 0, 8, 0, 1, "ROUND"), (0.02, 0, 8, 1, 1, "ROUND")),
                        "w4a5": ((0.25, 0, 5, 0, 1, "ROUND"), (0.125, 0, 4, 0, 1, "HALF_EVEN"))}
QONNX_TRANSFORMED = "qonnx transformations (cleanup, lowering, QCDQ, batch, scale extraction)"


@dataclass
class Entry:
    """One corpus file and how a user runs it."""

    name: str
    producer: str
    path: Path
    # a file `a2q lower` takes (QONNX, or Q/DQ it converts whole to Quant): project for FINN's view and lower it
    lower: bool = False
    # onnxruntime's QUInt8 weights carry zero points: project needs --zero-point subtract (README)
    zero_point: str = "fold"
    # a float graph input the user declares (--input-dtype) to the commands reading the file; their outputs carry it
    input_dtype: str | None = None


@dataclass
class Result:
    entry: Entry
    status: str = "handled"  # handled | refused | unchecked (the oracle cannot read it) | FAILED
    detail: str = ""
    layers: int = 0
    tight: int = 0
    acc_bits: int | None = None
    finetuned: str = ""  # the finetune method whose output was verified and executed within P ("" where none)
    allocated: int = 0  # layers of allocate's map, each proven by project, verify and the oracle (0 where none)
    simulated: int = 0  # verify --data runs (step 7) whose counts matched the executed accumulators
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the corpus


def _quiet():
    """Exporters and FINN print progress and warnings on every call: keep the table readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, logging.NOTSET)
    return stack


def _brevitas_specs(quick: bool):
    from tests.brevitas_nets import NetSpec

    specs = [NetSpec("mlp", 4, 4), NetSpec("mlp", 2, 2, signed_act=True, per_channel=False, narrow=True),
             NetSpec("mlp", 8, 8, signed_act=True), NetSpec("mlp", 3, 5, per_channel=False),
             NetSpec("cnn", 4, 4, signed_act=True), NetSpec("cnn", 8, 3, per_channel=False), NetSpec("cnn", 6, 8),
             NetSpec("depthwise", 4, 4), NetSpec("depthwise_pc", 4, 4),
             NetSpec("depthwise_pc", 8, 6, signed_act=True, per_channel=False, narrow=True),
             NetSpec("grouped", 5, 4, per_channel=False), NetSpec("convtranspose", 4, 4),
             NetSpec("residual", 4, 4), NetSpec("avgpool", 4, 4), NetSpec("avgpool_floor", 4, 4),
             NetSpec("residual", 3, 3, signed_act=True, narrow=True), NetSpec("conv1d", 4, 4, signed_act=True),
             NetSpec("conv1d_dw", 4, 4), NetSpec("upsample", 4, 4), NetSpec("classifier", 4, 4, signed_act=True),
             NetSpec("conv3d", 5, 4, per_channel=False), NetSpec("attention", 8, 8, signed_act=True),
             NetSpec("cnn", 4, 4, signed_act=True, shifted=True),
             NetSpec("mlp", 8, 8, signed_act=True, per_channel=False, shifted=True),
             # Brevitas' accumulator-aware quantizers (A2Q, A2Q+), power-of-two scales, ternary weights
             NetSpec("cnn", 6, 4, weight_quant="Int8AccumulatorAwareWeightQuant", accumulator=12),
             NetSpec("mlp", 4, 8, weight_quant="Int8AccumulatorAwareZeroCenterWeightQuant", accumulator=14),
             NetSpec("cnn", 5, 4, signed_act=True, per_channel=False, weight_quant="Int8WeightPerTensorFixedPoint",
                     act_quant="Int8ActPerTensorFixedPoint"),
             NetSpec("mlp", 2, 4, weight_quant="SignedTernaryWeightPerTensorConst")]
    return [next(s for s in specs if s.kind == "residual")] if quick else specs  # quick: the residual CNN


def brevitas_files(folder: Path, quick: bool) -> tuple[list[Entry], list[str]]:
    """Each net through each exporter; what an exporter itself cannot export is listed, not counted."""
    from tests.brevitas_nets import build_corpus_net

    entries, rejected = [], []
    for exporter, producer in EXPORTERS.items():
        for spec in _brevitas_specs(quick):
            try:
                with _quiet():
                    path = build_corpus_net(folder, spec, exporter)
            except Exception as err:  # the producer's own limitation, not a corpus file
                first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0])  # torch colours its errors
                rejected.append(f"brevitas_{exporter}_{spec.name}: Brevitas refused ({type(err).__name__}: "
                                f"{first_line[:120]})")
                continue
            # weight zero points: projected as ONNX defines them (code - zero point), as for onnxruntime's QUInt8
            entries.append(brevitas_entry(path, producer, exporter, "subtract" if spec.shifted else "fold"))
    return entries, rejected


def brevitas_entry(path: Path, producer: str, exporter: str, zero_point: str) -> Entry:
    """A Brevitas export as a corpus entry: QONNX files are lowered, Q/DQ ones where ``lower`` takes them whole."""
    return Entry(path.stem, producer, path, lower=exporter == "qonnx" or _lowers_as_quant(path), zero_point=zero_point)


def _lowers_as_quant(path: Path) -> bool:
    """Whether ``a2q lower`` takes a Q/DQ file as QONNX: its preparation (where qonnx's QCDQToQuant converts every
    Q/DQ node of it, :class:`a2q_passes.finn_quant_forms.QuantFromQDQ`, stored integers included) leaves quantizers
    FINN's conversion takes (zero points of 0, or activation zero points a2q makes thresholds of) and it has no
    product of two activations; the other Q/DQ files are refused by name, tested in
    ``tests/test_finn_quant_forms.py``."""
    from a2q_passes.errors import A2QError, LoweringError
    from a2q_passes.finn_quant_forms import is_qdq_node, prepare_for_finn
    from a2q_passes.finn_refusals import refuse_unconvertible_quantizers
    from a2q_passes.layers import find_mac_layers
    from a2q_passes.model_io import load_model

    with _quiet():
        try:
            model = load_model(path)  # as the command reads it (Constant nodes become initializers)
        except A2QError:  # a file no command reads: the check names why
            return False
        if not any(is_qdq_node(n) for n in model.graph.node):
            return False
        try:
            refuse_unconvertible_quantizers(prepare_for_finn(model))  # as `lower` runs them
        except LoweringError:
            return False
        return not any(layer.act_x_act for layer in find_mac_layers(model))  # lower refuses these by name


ORT_VARIANTS = {  # format -> (weight type, activation type, per channel)
    "QDQ": [("QInt8", "QUInt8", False), ("QInt8", "QUInt8", True), ("QInt8", "QInt8", True), ("QUInt8", "QUInt8", True),
            ("QInt4", "QUInt4", True), ("QInt4", "QInt4", False), ("QInt16", "QUInt16", True), ("QInt16", "QInt16", False)],
    "QOperator": [("QInt8", "QUInt8", False), ("QInt8", "QUInt8", True), ("QUInt8", "QUInt8", True),
                  ("QInt8", "QInt8", False)],
    "dynamic": [("QInt8", "", False), ("QInt8", "", True), ("QUInt8", "", False), ("QUInt8", "", True)],
    "QDQ_contrib": [("QInt8", "QUInt8", False), ("QInt8", "QUInt8", True), ("QInt4", "QUInt8", True),
                    ("QInt16", "QUInt16", True)],
}
# formats whose second variant is also saved by onnxruntime's graph optimizer (_optimized_files)
ORT_OPTIMIZED_FORMATS = ("QDQ", "QOperator", "dynamic")
# quantize_static QDQ (int8 weights per channel) under each of these extra_options, on every net (full corpus only)
ORT_OPTIONS = {"AddQDQPairToWeight": {"AddQDQPairToWeight": True}, "WeightAsymmetric": {"WeightSymmetric": False},
               "ActivationSymmetric": {"ActivationSymmetric": True}, "DedicatedQDQPair": {"DedicatedQDQPair": True},
               "KeepRemovableActivations": {"QDQKeepRemovableActivations": True}, "NoBiasQuant": {"QuantizeBias": False},
               # per-channel MatMul weight scales along K (axis 0): no integer accumulation, refused by name
               "MatMulScalesAlongK": {"QDQOpTypePerChannelSupportToAxis": {"MatMul": 0}}}
ORT_WITH_OPTIONS = "onnxruntime quantize_static QDQ, extra_options"


def ort_files(folder: Path, quick: bool) -> tuple[list[Entry], list[str]]:
    """onnxruntime's quantizer over each float net; combinations onnxruntime itself rejects are listed, not counted."""
    from tests.ort_models import FLOAT_NETS, quantize

    entries, rejected = [], []
    nets = list(FLOAT_NETS.items())[:1] if quick else list(FLOAT_NETS.items())
    for net, build in nets:
        for fmt, variants in ORT_VARIANTS.items():
            for weight, act, per_channel in (variants[1:2] if quick else variants):
                wide = weight in ("QInt4", "QInt16") or act in ("QUInt4", "QInt4", "QUInt16", "QInt16")
                wide = wide and fmt != "QDQ_contrib"  # onnxruntime's own Q/DQ take these types at opset 13
                float_path = folder / f"float_{net}_opset{21 if wide else 13}.onnx"
                x_shape = build(float_path, opset=21 if wide else 13)
                name = f"ort_{fmt}_{net}_w{weight}{'_a' + act if act else ''}_{'pc' if per_channel else 'pt'}"
                path = folder / f"{name}.onnx"
                try:
                    with _quiet():
                        quantize(float_path, path, x_shape, fmt, weight, act or "QUInt8", per_channel)
                except Exception as err:  # the producer's own limitation, not a corpus file
                    rejected.append(f"{name}: onnxruntime refused ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                    continue
                entries.append(Entry(name, ORT_FORMATS[fmt], path, lower=_lowers_as_quant(path),
                                     zero_point="subtract" if weight == "QUInt8" else "fold"))
                if fmt in ORT_OPTIMIZED_FORMATS and (weight, act, per_channel) == variants[1]:
                    entries += _optimized_files(entries[-1], quick)
        for option, extra in {} if quick else ORT_OPTIONS.items():
            float_path = folder / f"float_{net}_opset13.onnx"
            x_shape = build(float_path, opset=13)
            path = folder / f"ort_QDQ_{net}_{option}.onnx"
            with _quiet():
                quantize(float_path, path, x_shape, "QDQ", "QInt8", "QUInt8", True, extra_options=extra)
            # asymmetric int8 weights carry zero points: projected as ONNX defines them
            entries.append(Entry(path.stem, ORT_WITH_OPTIONS, path, lower=_lowers_as_quant(path),
                                 zero_point="subtract" if option == "WeightAsymmetric" else "fold"))
    return entries, rejected


def _optimized_files(source: Entry, quick: bool) -> list[Entry]:
    """What an InferenceSession's graph optimizer saves from ``source``; quick: the QDQ file at ``extended`` only
    (fused, but every layer still one a2q reads)."""
    from tests.ort_models import optimized

    if quick and source.producer != ORT_FORMATS["QDQ"]:
        return []
    entries = []
    for level in ("extended",) if quick else ("extended", "all"):
        path = source.path.with_name(f"{source.name}_opt_{level}.onnx")
        with _quiet():
            optimized(source.path, path, level)
        entries.append(Entry(path.stem, ORT_OPTIMIZED, path, lower=_lowers_as_quant(path), zero_point=source.zero_point))
    return entries


def _finn_stage_models(model, stages: list[str], output_dir: Path):
    """FINN's own build steps applied in order, yielding the model after each listed stage."""
    from a2q_passes.finn_runtime import ensure_finn_importable

    ensure_finn_importable()
    import finn.builder.build_dataflow_steps as steps
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    cfg = DataflowBuildConfig(output_dir=str(output_dir), fpga_part="xc7z020clg400-1", steps=[], target_fps=100000,
                              synth_clk_period_ns=10.0)
    order = ["step_qonnx_to_finn", "step_tidy_up", "step_streamline", "step_convert_to_hw",
             "step_create_dataflow_partition", "step_specialize_layers", "step_target_fps_parallelization",
             "step_apply_folding_config", "step_minimize_bit_width"]
    for step in order[:max(order.index(stage) for stage in stages) + 1]:
        model = getattr(steps, step)(model, cfg)
        if step in stages:
            yield step, model


def finn_files(folder: Path, sources: list[Path], quick: bool) -> tuple[list[Entry], list[str]]:
    """Each QONNX source after FINN's conversion, streamlining, HW inference and the steps after it that run without
    Vivado (the dataflow partition's child model, specialised and folded layers, minimised bit widths)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    entries, rejected = [], []
    stages = ["step_convert_to_hw"] if quick else list(FINN_STAGES)  # quick: the HW graph
    for source in sources:
        stem = source.stem.replace("brevitas_qonnx_", "")
        try:
            with _quiet():
                for step, model in _finn_stage_models(cleanup_model(ModelWrapper(str(source))), stages,
                                                      folder / f"finn_build_{stem}"):
                    path = folder / f"finn_{step.removeprefix('step_')}_{stem}.onnx"
                    model.save(str(path))
                    entries.append(Entry(path.stem, FINN_STAGES[step], path))
        except Exception as err:
            rejected.append(f"finn_{stem}: FINN stopped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    return entries, rejected


def _qonnx_transformations() -> dict[str, object]:
    """What a user of qonnx runs on a QONNX file before handing it on (its cleanup, FINN's and hls4ml's
    preparation steps), each after ``qonnx-cleanup``; name -> transformation of a ``ModelWrapper``."""
    from qonnx.transformation.batchnorm_to_affine import BatchNormToAffine
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.extract_conv_bias import ExtractBiasFromConv
    from qonnx.transformation.extract_quant_scale_zeropt import ExtractQuantScaleZeroPt
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    from qonnx.transformation.quant_constant_folding import FoldTransposeIntoQuantInit
    from qonnx.util.cleanup import cleanup_model

    steps = {"cleanup": [], "LowerConvsToMatMul": [LowerConvsToMatMul()], "GemmToMatMul": [GemmToMatMul()],
             "ExtractBiasFromConv": [ExtractBiasFromConv()], "BatchNormToAffine": [BatchNormToAffine()],
             "QuantToQCDQ": [QuantToQCDQ()], "FoldTransposeIntoQuantInit": [FoldTransposeIntoQuantInit()],
             "ChangeBatchSize4": [ChangeBatchSize(4)], "ExtractQuantScaleZeroPt": [ExtractQuantScaleZeroPt()]}

    def applied(transformations):
        def run(model):
            model = cleanup_model(model)
            for transformation in transformations:
                model = model.transform(transformation)
            return model
        return run

    return {name: applied(transformations) for name, transformations in steps.items()}


def qonnx_files(folder: Path, sources: list[Path], transformations: dict, producer: str) -> tuple[list[Entry], list[str]]:
    """Each QONNX source after each of qonnx's ``transformations`` (name -> function of a ``ModelWrapper``); what
    qonnx itself cannot transform is listed, not counted. QONNX results are lowered, QCDQ ones where qonnx's
    QCDQToQuant converts them whole."""
    from qonnx.core.modelwrapper import ModelWrapper

    entries, rejected = [], []
    for source in sources:
        for name, transform in transformations.items():
            stem = source.stem.replace("brevitas_qonnx_", "")
            path = folder / (f"channels_last_{stem}.onnx" if producer == CHANNELS_LAST else f"qonnx_{name}_{stem}.onnx")
            try:
                with _quiet():
                    transform(ModelWrapper(str(source))).save(str(path))
            except Exception as err:  # the transformation's own limitation, not a corpus file
                rejected.append(f"{path.stem}: qonnx refused ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
            # weight zero points (Brevitas' ShiftedUint8): projected as ONNX defines them, as for the source itself
            lower = producer != CHANNELS_LAST and (name != "QuantToQCDQ" or _lowers_as_quant(path))
            entries.append(Entry(path.stem, producer, path, lower=lower,
                                 zero_point="subtract" if "shifted" in source.stem else "fold"))
    return entries, rejected


def channels_last_files(folder: Path, sources: list[Path]) -> tuple[list[Entry], list[str]]:
    """Each QONNX source in qonnx's channels-last form (NHWC Conv, MaxPool, BatchNormalization in its own domain)."""
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

    return qonnx_files(folder, sources, {"channels_last": lambda m: m.transform(ConvertToChannelsLastAndClean())},
                       CHANNELS_LAST)


def torch_qat_files(folder: Path, quick: bool) -> list[Entry]:
    """PyTorch's eager-mode QAT models as its TorchScript exporter writes them (``tests/torch_qat_nets.py``)."""
    from tests.torch_qat_nets import QatSpec, export_torch_qat

    specs = [QatSpec("cnn", constant_folding=False), QatSpec("cnn"), QatSpec("cnn", per_channel=False),
             QatSpec("mlp", reduce_range=True), QatSpec("mlp", per_channel=False, constant_folding=False)]
    entries = []
    for spec in specs[:1] if quick else specs:
        with _quiet():
            path = export_torch_qat(folder, spec)
        entries.append(Entry(path.stem, TORCH_QAT, path))
    return entries


def graph_ptq_files(folder: Path, quick: bool) -> tuple[list[Entry], list[str]]:
    """Brevitas' graph-mode PTQ of float nets (``tests/brevitas_graph_ptq.py``), through both exporters."""
    from tests.brevitas_graph_ptq import GraphPtqSpec, export_graph_ptq

    entries, rejected = [], []
    kinds, configs = (("mlp",), GRAPH_PTQ_CONFIGS[:1]) if quick else (("mlp", "residual"), GRAPH_PTQ_CONFIGS)
    for kind, (backend, w, a, options), exporter in itertools.product(kinds, configs, GRAPH_PTQ):
        spec = GraphPtqSpec(kind, backend, w, a, options, exporter)
        try:
            with _quiet():
                path = export_graph_ptq(folder, spec)
        except Exception as err:  # the producer's own limitation, not a corpus file
            first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0])
            rejected.append(f"{spec.name}: Brevitas refused ({type(err).__name__}: {first_line[:120]})")
            continue
        entries.append(brevitas_entry(path, GRAPH_PTQ[exporter], exporter,
                                      "subtract" if spec.asymmetric_weights else "fold"))
    return entries, rejected


def brevitas_example_files(folder: Path, quick: bool) -> tuple[list[Entry], list[str]]:
    """Brevitas' published model definitions (``tests/brevitas_example_models.py``), untrained, through both exporters."""
    from tests.brevitas_example_models import EXAMPLES, export_example

    entries, rejected = [], []
    for spec, exporter in itertools.product(EXAMPLES[:1] if quick else EXAMPLES, ("qonnx",) if quick else BREVITAS_EXAMPLES):
        try:
            with _quiet():
                path = export_example(folder, spec, exporter)
        except Exception as err:  # the producer's own limitation, not a corpus file
            first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0])
            rejected.append(f"brevitas_examples_{exporter}_{spec.name}: Brevitas refused ({type(err).__name__}: "
                            f"{first_line[:120]})")
            continue
        entry = brevitas_entry(path, BREVITAS_EXAMPLES[exporter], exporter, "fold")
        entries.append(replace(entry, input_dtype=spec.input_dtype))
    return entries, rejected


def quantize_graph_files(folder: Path) -> tuple[list[Entry], list[str]]:
    """qonnx's ``QuantizeGraph`` over each float net of ``tests/ort_models.py``: a Quant node on both inputs of every
    Conv, Gemm and MatMul (attention's products of two activations included)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.quantize_graph import QuantizeGraph
    from qonnx.util.cleanup import cleanup_model

    from tests.ort_models import FLOAT_NETS

    entries, rejected = [], []
    for net, build in FLOAT_NETS.items():
        float_path = folder / f"float_{net}_opset13.onnx"
        build(float_path, opset=13)
        for tag, (data, weight) in QUANTIZE_GRAPH_SPECS.items():
            positions = [(("input", 0), data), (("input", 1), weight)]
            path = folder / f"qonnx_quantize_graph_{net}_{tag}.onnx"
            try:
                with _quiet():
                    model = cleanup_model(ModelWrapper(str(float_path)))
                    model = model.transform(QuantizeGraph({"op_type": {op: positions for op in ("Conv", "Gemm", "MatMul")}}))
                    model.save(str(path))
            except Exception as err:  # the transformation's own limitation, not a corpus file
                rejected.append(f"{path.stem}: qonnx refused ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
            entries.append(Entry(path.stem, QUANTIZE_GRAPH, path))
    return entries, rejected


def keras_files(folder: Path, quick: bool) -> tuple[list[Entry], list[Entry]]:
    """The committed Keras files (``scripts/keras_files.py``, ``tests/data/keras``): the QKeras ones as qonnx's
    converter wrote them, run as a user declaring the 8-bit input the converter leaves unquantized
    (``--input-dtype``); and onnxruntime's quantizer over the tf2onnx float ones (quick: the QDQ CNN only)."""
    from tests.ort_models import quantize

    qkeras = []
    for source in sorted((DATA / "keras").glob("qkeras_*.onnx")):
        path = folder / source.name
        shutil.copyfile(source, path)
        qkeras.append(Entry(path.stem, QKERAS, path, lower=True, input_dtype="INT8"))
    quantized = []
    for committed in sorted((DATA / "keras").glob("tf2onnx_*.onnx")):
        # onnxruntime's quantizer writes a shape-inferred copy beside its input: quantize a copy in the work folder
        source = folder / committed.name
        shutil.copyfile(committed, source)
        shape = [int(d.dim_value) for d in _graph_input(source).type.tensor_type.shape.dim]
        for fmt, weight, act, per_channel in TF2ONNX_ORT_VARIANTS[:1] if quick else TF2ONNX_ORT_VARIANTS:
            name = f"ort_{fmt}_{source.stem}_w{weight}_a{act}_{'pc' if per_channel else 'pt'}"
            path = folder / f"{name}.onnx"
            with _quiet():
                quantize(source, path, shape, fmt, weight, act, per_channel)
            quantized.append(Entry(name, TF2ONNX_ORT, path, lower=_lowers_as_quant(path)))
        if quick:
            break
    return qkeras, quantized


def committed_quantizer_files(folder: Path, quick: bool) -> list[Entry]:
    """The committed TFLite, NNCF, Quark and PT2E files (``scripts/tflite_files.py``, ``scripts/ptq_tool_files.py``),
    copied as they are (quick: one of each tool, :data:`COMMITTED_QUICK`)."""
    entries = []
    for tool, producer in COMMITTED_QUANTIZERS.items():
        sources = sorted([*(DATA / "tflite").glob(f"{tool}_*.onnx"), *(DATA / "ptq_tools").glob(f"{tool}_*.onnx")])
        for source in [p for p in sources if p.stem in COMMITTED_QUICK] if quick else sources:
            path = folder / source.name
            shutil.copyfile(source, path)
            entries.append(Entry(path.stem, producer, path, lower=_lowers_as_quant(path)))
    return entries


def _graph_input(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0]


def zoo_files(folder: Path) -> list[Entry]:
    entries = []
    for name in ("TFC_2W2A.onnx", "TFC_1W2A.onnx", "TFC_1W1A.onnx"):  # the first and last also run through FINN
        path = folder / f"zoo_{name}"
        shutil.copyfile(DATA / name, path)
        entries.append(Entry(path.stem, ZOO, path, lower=True))
    return entries


def generate(folder: Path, quick: bool) -> tuple[list[Entry], list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    entries, rejected = brevitas_files(folder, quick)
    ort, ort_rejected = ort_files(folder, quick)
    rejected += ort_rejected
    zoo = zoo_files(folder)
    # FINN's pipeline on one QONNX export of each kind it lowers (plus the TFC-like narrow 2-bit MLP) and the zoo's TFC
    # (2W2A, and the binary 1W1A: streamlining makes its MatMuls XnorPopcountMatMul, HW conversion xnor MVAUs)
    kinds = {}
    for e in entries:
        kind = e.name.removeprefix("brevitas_qonnx_").split("_w")[0]
        if e.producer == EXPORTERS["qonnx"] and kind in ("mlp", "cnn", "depthwise", "residual", "avgpool_floor"):
            kinds.setdefault(kind if "narrow" not in e.name else "mlp_narrow", e.path)
    finn_sources = list(kinds.values())[:1] if quick else [*kinds.values(), zoo[0].path, zoo[2].path]
    finn, finn_rejected = finn_files(folder, finn_sources, quick)
    convs = [e.path for e in entries if e.producer == EXPORTERS["qonnx"] and e.name.split("_")[2] in
             ("cnn", "depthwise", "residual", "conv1d")]
    channels_last, channels_last_rejected = ([], []) if quick else channels_last_files(folder, convs)
    transformed, transformed_rejected = ([], []) if quick else qonnx_files(
        folder, list(kinds.values()), _qonnx_transformations(), QONNX_TRANSFORMED)
    quantized, quantized_rejected = ([], []) if quick else quantize_graph_files(folder)
    graph_ptq, graph_ptq_rejected = graph_ptq_files(folder, quick)
    qkeras, keras_quantized = keras_files(folder, quick)
    examples, examples_rejected = brevitas_example_files(folder, quick)
    return (entries + graph_ptq + examples + ort + torch_qat_files(folder, quick) + finn + channels_last + transformed + quantized
            + ([] if quick else zoo) + (qkeras[:1] if quick else qkeras) + keras_quantized
            + committed_quantizer_files(folder, quick),
            rejected + graph_ptq_rejected + finn_rejected + channels_last_rejected + transformed_rejected
            + quantized_rejected + examples_rejected)


# --------------------------------------------------------------------------- checking one file


def _run(*args) -> tuple[int, str, str]:
    from tests.cli_helpers import run_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_cli(*map(str, args))


def _refusal(code: int, out: str, err: str, what: str) -> tuple[str, str]:
    """A clear refusal (exit 1/3, no traceback, a message) or a failure, with the message."""
    text = (err.strip() or out.strip())
    if code in (1, 3) and "Traceback" not in out + err and text:
        lines = [line for line in text.splitlines() if line.startswith(("error", "not lowered"))] or text.splitlines()[-1:]
        return "refused", f"{what}: {' / '.join(lines)[:500]}"
    return "FAILED", f"{what} exit {code}: {text[-400:]}"


def _oracle_ranges(path: Path, names: list[str], zero_point: str, input_dtype: str | None = None) -> dict:
    """The oracle's executed range of each layer of ``names``; ``input_dtype``: the user's claim for every float
    graph input, given the oracle here (not read from what ``a2q`` wrote into an output)."""
    from qonnx.core.datatype import DataType

    from tests.fuzz.real_files import executed_range, file_model

    model = file_model(path)
    for vi in model.graph.input if input_dtype else []:
        if model.get_initializer(vi.name) is None:
            model.set_tensor_datatype(vi.name, DataType[input_dtype])
    with _quiet():
        return {name: executed_range(model, name, zero_point) for name in names}


def _unread_macs(path: Path, reported: set[str]) -> list[str]:
    """MAC nodes with quantized operands (the oracle can describe them) that analyze did not report."""
    from tests.fuzz.real_files import Undescribed, describe_layer, file_model, is_mac

    model = file_model(path)
    missing = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        if is_mac(node) and name not in reported:
            try:
                if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                    describe_layer(model, name)
                missing.append(name)
            except Undescribed:
                continue  # a float layer
    return missing


def _declared(entry: Entry) -> list[str]:
    """The ``--input-dtype`` a user gives every command reading the file itself."""
    return ["--input-dtype", entry.input_dtype] if entry.input_dtype else []


def check(entry: Entry, work: Path, allocate: bool = False) -> Result:
    from tests.fuzz.real_files import Undescribed

    result = Result(entry)
    start = time.time()
    digest = hashlib.sha256(entry.path.read_bytes()).hexdigest()
    zp = ["--zero-point", "subtract"] if entry.zero_point == "subtract" else []
    zp += _declared(entry)
    try:
        _check(entry, work, result, zp, allocate)
    except Undescribed as err:  # the oracle cannot read the file's grid: not checked, so not handled
        result.status, result.detail = "unchecked", f"oracle: {err}"
    except Exception as err:  # the oracle or the harness: never hide it
        result.status, result.detail = "FAILED", f"harness: {type(err).__name__}: {err}"
    if hashlib.sha256(entry.path.read_bytes()).hexdigest() != digest:
        result.status, result.detail = "FAILED", "the input file was modified"
    result.seconds = time.time() - start
    return result


def _check(entry: Entry, work: Path, result: Result, zp: list[str], allocate: bool = False) -> None:
    code, out, err = _run("analyze", entry.path, "--json", "--per-channel", *zp)
    if code not in (0, 3) or not out.strip().startswith("{"):
        result.status, result.detail = _refusal(code, out, err, "analyze")
        return
    layers = json.loads(out)["layers"]
    unread = [layer for layer in layers if layer["status"] != "ok"]
    missing = _unread_macs(entry.path, {layer["node"] for layer in layers})
    if missing:
        result.status, result.detail = "FAILED", f"analyze silently skipped quantized MAC layers {missing}"
        return
    if unread:  # each status names the layer and what it cannot read
        statuses = "; ".join(f"{layer['node']}: {layer['status']}" for layer in unread)
        result.status, result.detail = "refused", f"analyze: {statuses}"
        return
    result.layers = len(layers)
    executed = _oracle_ranges(entry.path, [layer["node"] for layer in layers], entry.zero_point, entry.input_dtype)
    for layer in layers:
        ex, pc = executed[layer["node"]], layer["per_channel"]
        if (ex.acc_min < np.array(pc["acc_min"])).any() or (ex.acc_max > np.array(pc["acc_max"])).any():
            result.status = "FAILED"
            result.detail = (f"{layer['node']}: executed [{ex.lo}, {ex.hi}] outside the analysed "
                             f"[{layer['acc_min']}, {layer['acc_max']}]")
            return
        result.tight += int(ex.acc_min.tolist() == pc["acc_min"] and ex.acc_max.tolist() == pc["acc_max"])
    if not _simulates_exactly(entry, work, [layer["node"] for layer in layers], result):
        return

    if entry.lower:  # sized for FINN's input types (a zero point's codes q - z widen to INT9): P from those widths
        code, out, err = _run("analyze", entry.path, "--json", *zp, "--input-ranges", "finn")
        if code not in (0, 3) or not out.strip().startswith("{"):
            result.status, result.detail = _refusal(code, out, err, "analyze --input-ranges finn")
            return
        layers = json.loads(out)["layers"]
    # products of two activations cannot shrink: P stays at least their width
    widest = max(layer["bounds"]["exact"] for layer in layers if layer["kind"] == "weights") if any(
        layer["kind"] == "weights" for layer in layers) else 2 + BELOW_WIDEST
    fixed = max((layer["bounds"]["exact"] for layer in layers if layer["kind"] != "weights"), default=2)
    ranges = ["--input-ranges", "finn"] if entry.lower else []
    projected = work / f"{entry.name}.projected.onnx"
    bits = max(widest - BELOW_WIDEST, fixed, 2)
    code, out, err = _run("project", entry.path, projected, "--acc-bits", bits, "--json", *zp, *ranges)
    floors = [int(n) for n in re.findall(r"needs at least (\d+) bits \(bipolar", err)]
    if code == 1 and floors:  # bipolar weights cannot shrink: project at the smallest P they reach, as it says
        result.notes.append(f"P={bits} refused for bipolar layers")
        bits = max(floors)
        code, out, err = _run("project", entry.path, projected, "--acc-bits", bits, "--json", *zp, *ranges)
    if code != 0:
        result.status, result.detail = _refusal(code, out, err, f"project --acc-bits {bits}")
        return
    result.acc_bits = bits
    promised = [layer["node"] for layer in json.loads(out)["layers"] if not layer["status"].startswith("skipped")]
    # sized for FINN's view, a zero point's codes are q - z (lower's thresholds): the oracle runs the same convention
    convention = "subtract" if entry.lower else entry.zero_point
    if not _fits_when_executed(projected, dict.fromkeys(promised, bits), "projected", result, convention,
                               entry.input_dtype):
        return
    qonnx_weights = any(n.op_type in ("Quant", "IntQuant") for n in _graph_nodes(entry.path))
    if entry.zero_point == "fold" and qonnx_weights:
        _check_finetune(entry, work, bits, result)
    if allocate and entry.zero_point == "fold" and result.status == "handled":  # Q/DQ, FINN-ONNX: FINN lowers few, acc-bits needs none
        _check_allocate(entry, work, result, "bits" if qonnx_weights else "acc-bits")
    if entry.lower and result.status == "handled":
        _check_lower(entry, work, projected, result)
    elif result.status == "handled":
        _check_lower_refuses(entry, work, projected, result)


SIMULATED_LAYERS = 4  # step 7: at most this many layers per file, spread over the model


def _simulates_exactly(entry: Entry, work: Path, names: list[str], result: Result) -> bool:
    """Step 7, the fuzzer's property (j) on the file: ``verify --data`` on random inputs counts exactly the
    overflows of the accumulators the whole file executes to on them (qonnx)."""
    from tests.fuzz.properties import Checker, Outcome
    from tests.fuzz.real_files import file_model, simulation_case

    outcome = Outcome()
    folder = work / f"{entry.name}.data"
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet():
        case = simulation_case(file_model(entry.path), names, entry.zero_point, entry.input_dtype)
        Checker(case, folder, outcome).simulated(entry.path, SIMULATED_LAYERS)
    result.simulated = sum(n for key, n in outcome.checked.items() if key.startswith("data simulations ("))
    if outcome.failures:
        result.status, result.detail = "FAILED", "; ".join(f"{f.category}: {f.message}" for f in outcome.failures)[:600]
        return False
    return True


FINETUNE_METHODS = ("norm", "qat", "axe")
LOWER_REFUSED = "lower refused by name"  # the note of step 4 on a Q/DQ file lower does not take
ALLOCATE_PCT = 95  # allocate's --min-score-pct in step 6 (random data: the score is agreement with the file itself)


def _graph_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _random_data(entry: Entry, work: Path, samples: int, what: str, result: Result) -> Path | None:
    """``samples`` random inputs for the file's one graph input (None, noted, where it has several)."""
    from qonnx.core.datatype import DataType

    from tests.fuzz.real_files import file_model

    model = file_model(entry.path)
    if len([i for i in model.graph.input if model.get_initializer(i.name) is None]) != 1:
        result.notes.append(f"{what}: not run (the file has several inputs)")
        return None
    shape = model.get_tensor_shape(model.graph.input[0].name)
    data = work / f"{entry.name}.{what}.npz"
    rng, shape = np.random.default_rng(0), [samples, *shape[1:]]
    if entry.input_dtype:  # the integer codes the user declared the input to take
        dtype = DataType[entry.input_dtype]
        x = rng.integers(int(dtype.min()), int(dtype.max()), shape, endpoint=True)
    else:
        x = rng.standard_normal(shape)
    np.savez(data, x=x.astype(np.float32))
    return data


def _refused_or_failed(code: int, stdout: str, err: str, what: str, result: Result) -> None:
    """A command of step 5/6 did not exit 0: a clear refusal is noted, anything else fails the file."""
    status, detail = _refusal(code, stdout, err, what)
    if status == "FAILED":
        result.status, result.detail = status, detail
    else:
        result.notes.append(detail)


def _fits_when_executed(path: Path, widths: dict[str, int], what: str, result: Result,
                        zero_point: str = "fold", input_dtype: str | None = None) -> bool:
    """``a2q verify`` of ``path`` passes (an ``--input-dtype`` claim read from the file) and every layer of ``widths``
    executes (the oracle, told ``input_dtype``) within its width, under the ``zero_point`` convention."""
    from tests.fuzz.oracle import width

    code, stdout, err = _run("verify", path, *(["--zero-point", zero_point] if zero_point == "subtract" else []))
    if code != 0:
        result.status, result.detail = "FAILED", f"verify of the {what} file exit {code}: {(err or stdout)[-300:]}"
        return False
    for name, ex in _oracle_ranges(path, list(widths), zero_point, input_dtype).items():
        if width(ex.lo, ex.hi) > widths[name]:
            result.status = "FAILED"
            result.detail = (f"{what} {name}: executed [{ex.lo}, {ex.hi}] needs {width(ex.lo, ex.hi)} bits > "
                             f"P={widths[name]}")
            return False
    return True


def _check_finetune(entry: Entry, work: Path, bits: int, result: Result) -> None:
    from tests.fuzz.properties import SKIP_HINT, _records

    data = _random_data(entry, work, 8, "finetune", result)
    if data is None:
        return
    method = FINETUNE_METHODS[zlib.crc32(entry.name.encode()) % len(FINETUNE_METHODS)]
    out = work / f"{entry.name}.finetuned.onnx"
    args = ["finetune", entry.path, out, "--acc-bits", bits, "--data", data, "--method", method, "--epochs", 1,
            "--batch-size", 4, "--loss", "mse", "--distill", "--no-progress", "--calib-samples", 4,
            "--held-out-samples", 4, *_declared(entry)]
    code, stdout, err = _run(*args)
    skipped = SKIP_HINT.search(err) if code == 1 else None
    if skipped:
        code, stdout, err = _run(*args, *skipped.group(1).split())
    if code != 0:
        _refused_or_failed(code, stdout, err, f"finetune --method {method} --acc-bits {bits}", result)
        return
    constrained = {name: bits for name, layer in _records(out).items() if layer.get("acc_bits") == bits}
    if _fits_when_executed(out, constrained, "fine-tuned", result, input_dtype=entry.input_dtype):
        result.finetuned = method


def _check_allocate(entry: Entry, work: Path, result: Result, cost: str) -> None:
    data = _random_data(entry, work, 16, "allocate", result)
    if data is None:
        return
    widths_path = work / f"{entry.name}.widths.json"
    code, stdout, err = _run("allocate", entry.path, "--data", data, "--min-score-pct", ALLOCATE_PCT, "--cost", cost,
                             "-o", widths_path, "--no-progress", *_declared(entry))
    if code != 0:
        _refused_or_failed(code, stdout, err, f"allocate --min-score-pct {ALLOCATE_PCT} --cost {cost}", result)
        return
    widths = {name: int(p) for name, p in json.loads(widths_path.read_text()).items()}
    out = work / f"{entry.name}.allocated.onnx"
    code, stdout, err = _run("project", entry.path, out, "--widths-json", widths_path, *_declared(entry))
    if code != 0:
        result.status, result.detail = "FAILED", f"project --widths-json of allocate's map exit {code}: {err[-300:]}"
        return
    if _fits_when_executed(out, widths, "allocated", result, input_dtype=entry.input_dtype):
        result.allocated = len(widths)


def _check_lower(entry: Entry, work: Path, projected: Path, result: Result) -> None:
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    from tests.fuzz.real_files import MVAU_OPS, VVAU_OPS, mac_inputs_outside_their_types

    hw = work / f"{entry.name}.hw.onnx"
    code, out, err = _run("lower", projected, hw, "--from-annotations")
    if code != 0:
        result.status, result.detail = _refusal(code, out, err, "lower")
        return
    model = ModelWrapper(str(hw))
    nodes = [n for n in model.graph.node if n.op_type in MVAU_OPS + VVAU_OPS]
    binary = [n.name for n in nodes if any(a.name == "binaryXnorMode" and a.i for a in n.attribute)]
    if binary:
        result.notes.append(f"lower: {binary} in XNOR mode (popcount) left to lower's own check")
    names = [n.name or n.output[0] for n in nodes if n.name not in binary]
    for name, ex in _oracle_ranges(hw, names, "fold").items():
        node = next(n for n in nodes if (n.name or n.output[0]) == name)
        acc = DataType[next(a.s.decode() for a in node.attribute if a.name == "accDataType")]
        if ex.lo < acc.min() or ex.hi > acc.max():
            result.status = "FAILED"
            result.detail = f"lowered {name}: executed [{ex.lo}, {ex.hi}] outside accDataType {acc.name}"
            return
    problems = mac_inputs_outside_their_types(model)  # the type each layer was executed over, as the graph runs
    if problems:
        result.status, result.detail = "FAILED", f"lowered {problems[0]}"


def _check_lower_refuses(entry: Entry, work: Path, projected: Path, result: Result) -> None:
    """A Q/DQ file ``lower`` does not take (QCDQToQuant leaves Q/DQ nodes in it): ``lower`` must refuse it by name
    before FINN's steps (exit 1, nothing written, no raw FINN failure); the file stays handled."""
    from a2q_passes.finn_quant_forms import is_qdq_node

    if not any(is_qdq_node(n) for n in _graph_nodes(entry.path)):
        return
    hw = work / f"{entry.name}.hw.onnx"
    code, out, err = _run("lower", projected, hw, "--from-annotations")
    text = err.strip() or out.strip()
    if code == 1 and text and not hw.exists() and "Traceback" not in out + err and "FINN transformation" not in text:
        result.notes.append(LOWER_REFUSED)
        return
    result.status, result.detail = "FAILED", f"lower of a Q/DQ file it does not take: exit {code}: {text[-400:]}"


# --------------------------------------------------------------------------- report


def _table(results: list[Result]) -> list[str]:
    statuses = ("handled", "refused", "unchecked", "FAILED")
    lines = ["| producer | files | " + " | ".join(statuses) + " |", "|---" * (len(statuses) + 2) + "|"]
    for producer in dict.fromkeys(r.entry.producer for r in results):
        rows = [r for r in results if r.entry.producer == producer]
        counts = [sum(r.status == s for r in rows) for s in statuses]
        lines.append(f"| {producer} | {len(rows)} | " + " | ".join(map(str, counts)) + " |")
    counts = [sum(r.status == s for r in results) for s in statuses]
    lines.append(f"| **all** | **{len(results)}** | " + " | ".join(f"**{c}**" for c in counts) + " |")
    return lines


def _finetune_summary(results: list[Result]) -> list[str]:
    """How many handled files `finetune` ran on, by method, and its refusals (step 5 of the module docstring)."""
    done = [r for r in results if r.status == "handled" and r.finetuned]
    refused = [(r.entry.name, note) for r in results if r.status == "handled" for note in r.notes
               if note.startswith("finetune")]
    methods = ", ".join(f"{m} {sum(r.finetuned == m for r in done)}" for m in FINETUNE_METHODS)
    lines = [f"**`finetune` on {len(done)} of these files** ({methods}): one epoch at the same P on random inputs, "
             "its output verified and every constrained layer's executed range within P. "
             f"Refused by name on {len(refused)} handled files" + (":" if refused else ".")]
    return lines + [f"- `{name}`: {note[:240]}" for name, note in refused]


def _simulation_summary(results: list[Result]) -> str:
    """How many `verify --data` runs step 7 compared with the executed accumulators."""
    done = [r for r in results if r.status == "handled" and r.simulated]
    return (f"**`verify --data` on {len(done)} of these files** ({sum(r.simulated for r in done)} runs; at most "
            f"{SIMULATED_LAYERS} layers a file, each at its width on random inputs and one bit less, wrap-around "
            "and saturation): every count of overflows equal to (saturation: at least) the accumulations the whole "
            "file executes to outside P, the outputs exact where none.")


def _allocate_summary(results: list[Result]) -> list[str]:
    """How many handled files allocate's map was proven on, and its refusals (step 6 of the module docstring)."""
    done = [r for r in results if r.status == "handled" and r.allocated]
    refused = [(r.entry.name, note) for r in results if r.status == "handled" for note in r.notes
               if note.startswith("allocate")]
    lines = [f"**`allocate` on {len(done)} of these files** ({sum(r.allocated for r in done)} layers; "
             f"`--min-score-pct {ALLOCATE_PCT}` on random inputs scored against the file itself; `--cost bits` on "
             "QONNX `Quant` files, `--cost acc-bits` on the others (Q/DQ, FINN-ONNX)): every width of its "
             "map proven by `project --widths-json`, `verify` and the executed range. "
             f"Refused by name on {len(refused)} handled files" + (":" if refused else ".")]
    return lines + [f"- `{name}`: {note[:240]}" for name, note in refused]


def markdown(results: list[Result], rejected: list[str], command: str, seconds: float, out: Path,
             allocate: bool = False) -> str:
    handled = sum(r.status == "handled" for r in results)
    layers = sum(r.layers for r in results if r.status == "handled")
    tight = sum(r.tight for r in results if r.status == "handled")
    lowered_qdq = sum(r.entry.lower and r.status == "handled"
                      and any(n.op_type == "QuantizeLinear" for n in _graph_nodes(r.entry.path)) for r in results)
    refused_qdq = sum(r.status == "handled" and LOWER_REFUSED in r.notes for r in results)
    lines = ["# Real-file corpus (issue 10)", "",
             f"`{command}` ({seconds / 60:.0f} min on this machine). Every file is written offline by the real producer "
             "(seeded); see `scripts/corpus.py` for what each check executes.", "",
             f"**{handled} of {len(results)} files ({100 * handled / len(results):.1f}%) handled end to end**: every "
             f"quantized MAC layer read ({layers} layers; the oracle's executed worst case equals the analysed "
             f"per-channel range in {tight}, and lies inside it in all), `project` at the widest exact width - "
             f"{BELOW_WIDEST} verified and executed within P, and QONNX files (and the {lowered_qdq} Q/DQ files "
             "`lower` takes: qonnx's QCDQToQuant converts them whole, activation zero points as thresholds) "
             "lowered with every "
             "MVAU/VVAU's executed range inside its "
             f"`accDataType`; the other {refused_qdq} handled Q/DQ files refused by `lower` by name, before FINN's "
             "steps.", "", _simulation_summary(results), "", *_finetune_summary(results), "",
             *(_allocate_summary(results) + [""] if allocate else []), *_table(results), ""]
    refused = [r for r in results if r.status != "handled"]
    lines += ["## Files not handled", ""]
    lines += [f"- `{r.entry.name}` ({r.status}): {r.detail.replace(f'{out}/', 'DIR/')}" for r in refused] or ["None."]
    if rejected:
        lines += ["", "## Combinations the producers themselves reject (not counted)", ""]
        lines += [f"- {text}" for text in rejected]
    lines += ["", "## Every file", "", "| file | producer | status | layers (tight) | P | finetune | s |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.entry.name}` | {r.entry.producer} | {r.status} | {r.layers} ({r.tight}) | "
                     f"{r.acc_bits if r.acc_bits is not None else '-'} | {r.finetuned or '-'} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the corpus files and the outputs")
    parser.add_argument("--quick", action="store_true", help="one file per producer class")
    parser.add_argument("--report", type=Path, help="write the markdown report here (e.g. bench/corpus.md)")
    parser.add_argument("--only", help="check only files whose name contains this")
    parser.add_argument("--allocate", action="store_true", help="also step 6: allocate on each handled QONNX Quant "
                        "file (several seconds each: it lowers the file with FINN for its cost model)")
    args = parser.parse_args(argv)
    start = time.time()
    entries, rejected = generate(args.out / "files", args.quick)
    if args.only:
        entries = [e for e in entries if args.only in e.name]
    work = args.out / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for entry in entries:
        result = check(entry, work, args.allocate)
        results.append(result)
        print(f"{result.status:8} {entry.name:60} {result.layers} layers ({result.tight} tight) P={result.acc_bits} "
              f"{result.seconds:.0f}s {result.detail[:200]}", flush=True)
    print("\n".join(_table(results)))
    handled = sum(r.status == "handled" for r in results)
    print(f"handled end to end: {handled}/{len(results)} = {100 * handled / max(len(results), 1):.1f}%")
    if args.report:
        command = ".venv/bin/python -m scripts.corpus --out DIR" + (" --quick" if args.quick else "") + \
            (" --allocate" if args.allocate else "") + f" --report {args.report}"
        args.report.write_text(markdown(results, rejected, command, time.time() - start, args.out, args.allocate))
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
