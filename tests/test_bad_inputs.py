"""Bad-input catalogue: every command, every kind of broken input, no traceback and nothing written.

Each case runs the ``a2q`` entry point in-process (``a2q_passes.cli.main``, exactly what the
console script runs) and checks: the exit code (1 for bad input, 2 for click usage errors), that
the message names the culprit (file, node, tensor or option), that no input file changed, and
that the output folder holds exactly what it held before (no output, no hidden temporary).
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from tests.cli_helpers import run_cli

MODELS = Path(__file__).resolve().parents[1] / "models"
MLP = MODELS / "digits_mlp_w4a4.onnx"  # QONNX: Quant -> Gemm x3, input (1, 1, 8, 8)
QDQ = MODELS / "digits_cnn_qdq.onnx"  # onnxruntime QDQ


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# Broken models


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_value(model: onnx.ModelProto, tensor_name: str, edit: Callable[[np.ndarray], None]) -> None:
    tensor = _initializer(model, tensor_name)
    values = numpy_helper.to_array(tensor).copy()
    edit(values)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor_name))


def _set_flat(index: int, value: float) -> Callable[[np.ndarray], None]:
    def edit(values: np.ndarray) -> None:
        values.reshape(-1)[index] = value
    return edit


def _zero(values: np.ndarray) -> None:
    values[...] = 0


def nan_weight(m):  # Quant_1 quantizes Gemm_0's weights: input 0 are the float weights
    _set_value(m, "Quant_1_param0", _set_flat(3, np.nan))


def inf_weight(m):
    _set_value(m, "Quant_2_param0", _set_flat(0, np.inf))


def nan_weight_scale(m):
    _set_value(m, "Quant_1_param1", _set_flat(0, np.nan))


def zero_weight_scale(m):
    _set_value(m, "Quant_1_param1", _zero)


def zero_act_scale(m):  # Quant_0 quantizes the graph input (input 0), its scale is input 1
    _set_value(m, "Quant_0_param0", _zero)


def inf_act_scale(m):
    _set_value(m, "Quant_0_param0", _set_flat(0, -np.inf))


def qdq_zero_weight_scale(m):
    _set_value(m, "conv1.weight_scale", _zero)


def qdq_nan_weight_scale(m):
    _set_value(m, "fc.weight_scale", _set_flat(0, np.nan))


def duplicate_value_info(m):
    twice = copy.deepcopy(m.graph.value_info[0])
    twice.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE  # an identical repeat is dropped; this one differs
    m.graph.value_info.append(twice)


def duplicate_node_name(m):
    macs = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    macs[1].name = macs[0].name  # before: project and annotate failed their own certificate (exit 4)


def foreign_accumulator_record(m):
    m.metadata_props.add(key="a2q.accumulators", value="not json")  # before: JSONDecodeError, exit 4


def input_described_twice(m):
    twice = copy.deepcopy(m.graph.input[0])
    twice.type.tensor_type.shape.dim[-1].dim_value += 1
    m.graph.value_info.append(twice)


def dynamic_shape(m):
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"


def unknown_domain(m):
    node = _node(m, "Flatten_0")
    node.op_type, node.domain = "FancyFlatten", "com.example.ops"
    m.opset_import.append(helper.make_opsetid("com.example.ops", 1))


def dangling_input(m):  # the checker's job: a node reads a tensor nothing produces
    _node(m, "Gemm_1").input[0] = "nowhere"


def no_nodes(m):
    del m.graph.node[:]


def float_only(m):  # every weight quantizer removed: nothing to analyse
    quants = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Quant" and n.name != "Quant_0"}
    keep = [n for n in m.graph.node if n.output[0] not in quants]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = quants.get(name, name)
    del m.graph.node[:]
    m.graph.node.extend(keep)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def variant(base: Path, edit: Callable[[onnx.ModelProto], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        model = _load(base)
        edit(model)
        return save(model, folder / f"{edit.__name__}.onnx")
    return make


def external_data(damage: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        model = _load(MLP)
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
        path = save(model, folder / "external.onnx")
        data = folder / "weights.bin"
        if damage == "missing":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[:1000])
        return path
    return make


def raw_file(content: bytes, name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path
    return make


def truncated(folder: Path) -> Path:
    path = folder / "truncated.onnx"
    data = MLP.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def tied_weights(folder: Path) -> Path:
    """A QONNX model whose one weight Quant feeds two MatMuls (tied weights)."""
    domain, rng = "qonnx.custom_op.general", np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             (("W", rng.normal(size=(8, 8)) * 0.3), ("ws", 0.05), ("z", 0.0), ("b4", 4.0), ("b8", 8.0), ("xs", 0.05))]

    def quant(x: str, scale: str, bits: str, out: str, signed: int) -> onnx.NodeProto:
        return helper.make_node("Quant", [x, scale, "z", bits], [out], domain=domain, signed=signed, narrow=0,
                                rounding_mode="ROUND")

    nodes = [quant("x", "xs", "b8", "xq", 0), quant("W", "ws", "b4", "Wq", 1),
             helper.make_node("MatMul", ["xq", "Wq"], ["h"], name="mmA"), helper.make_node("Relu", ["h"], ["r"]),
             quant("r", "xs", "b8", "rq", 0), helper.make_node("MatMul", ["rq", "Wq"], ["y"], name="mmB")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    path = folder / "tied.onnx"
    onnx.save(model, str(path))
    return path


def copy_of(base: Path) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / base.name
        path.write_bytes(base.read_bytes())
        return path
    return make


def npz(name: str, **arrays: np.ndarray) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        np.savez(path, **arrays)
        return path
    return make


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass
class Case:
    """``args`` may hold ``{in}`` (the model built by ``model``), ``{out}`` (a folder for outputs),
    ``{inputs}`` (the folder of inputs) and ``{data}`` (the file built by ``data``)."""

    args: tuple[str, ...]
    expect: tuple[str, ...]  # fragments the error message must contain
    model: Callable[[Path], Path] = copy_of(MLP)
    data: Callable[[Path], Path] | None = None
    code: int = 1
    prepare: Callable[[Path], None] | None = None  # called with the output folder before the run
    env: dict[str, object] = field(default_factory=dict)


def _mkdir(name: str) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        (out / name).mkdir()
    return make


X_WRONG = np.zeros((4, 3, 8, 8), dtype=np.float32)  # the models take (N, 1, 8, 8)
X_OK = np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)).astype(np.float32)
Y_OK = np.arange(8) % 10

CASES: dict[str, Case] = {
    # --- the model file
    "analyze-missing-file": Case(("analyze", "{inputs}/nope.onnx"), ("nope.onnx", "no such file")),
    "analyze-folder-as-model": Case(("analyze", "{inputs}"), ("not a file",)),
    "analyze-not-onnx": Case(("analyze", "{in}"), ("notes.onnx", "not a readable ONNX model"),
                             model=raw_file(b"this is not a protobuf\n" * 20, "notes.onnx")),
    "analyze-empty-file": Case(("analyze", "{in}"), ("empty.onnx", "no nodes"), model=raw_file(b"", "empty.onnx")),
    "verify-truncated": Case(("verify", "{in}", "--acc-bits", "16"), ("truncated.onnx",), model=truncated),
    "project-no-nodes": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"), ("no_nodes.onnx", "no nodes"),
                             model=variant(MLP, no_nodes)),
    "project-nan-weight": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                               ("Quant_1_param0", "Quant_1", "NaN or Inf"), model=variant(MLP, nan_weight)),
    "annotate-inf-weight": Case(("annotate", "{in}", "{out}/o.onnx"), ("Quant_2_param0", "NaN or Inf"),
                                model=variant(MLP, inf_weight)),
    "verify-nan-weight-scale": Case(("verify", "{in}", "--acc-bits", "16"), ("Quant_1_param1", "NaN or Inf"),
                                    model=variant(MLP, nan_weight_scale)),
    "analyze-zero-weight-scale": Case(("analyze", "{in}"), ("Quant_1", "Quant_1_param1", "non-zero"),
                                      model=variant(MLP, zero_weight_scale)),
    "project-zero-activation-scale": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                          ("Quant_0", "Quant_0_param0", "non-zero"),
                                          model=variant(MLP, zero_act_scale)),
    "lower-inf-activation-scale": Case(("lower", "{in}", "{out}/o.onnx"), ("Quant_0_param0", "NaN or Inf"),
                                       model=variant(MLP, inf_act_scale)),
    "analyze-qdq-zero-weight-scale": Case(("analyze", "{in}"), ("conv1.weight_scale", "non-zero"),
                                          model=variant(QDQ, qdq_zero_weight_scale)),
    "project-qdq-nan-weight-scale": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                         ("fc.weight_scale", "NaN or Inf"), model=variant(QDQ, qdq_nan_weight_scale)),
    "annotate-duplicate-value-info": Case(("annotate", "{in}", "{out}/o.onnx"), ("more than one ValueInfo", "differ"),
                                          model=variant(MLP, duplicate_value_info)),
    "project-duplicate-node-name": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                        ("more than one node is named", "GiveUniqueNodeNames"),
                                        model=variant(MLP, duplicate_node_name)),
    "project-foreign-accumulator-record": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                               ("a2q.accumulators", "not the record a2q writes"),
                                               model=variant(MLP, foreign_accumulator_record)),
    "verify-input-described-twice": Case(("verify", "{in}", "--acc-bits", "16"), ("'global_in'", "more than one ValueInfo"),
                                         model=variant(MLP, input_described_twice)),
    "analyze-external-data-missing": Case(("analyze", "{in}"), ("external.onnx", "weights.bin", "Quant_"),
                                         model=external_data("missing")),
    "project-external-data-truncated": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                            ("external.onnx", "weights.bin"), model=external_data("truncated")),
    "analyze-dynamic-shape": Case(("analyze", "{in}"), ("global_in", "dynamic shape"), model=variant(MLP, dynamic_shape)),
    "project-unknown-domain": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16"),
                                   ("FancyFlatten", "com.example.ops", "--allow-unknown-ops"),
                                   model=variant(MLP, unknown_domain)),
    "lower-invalid-graph": Case(("lower", "{in}", "{out}/o.onnx"), ("dangling_input.onnx", "nowhere"),
                                model=variant(MLP, dangling_input)),
    "annotate-nothing-quantized": Case(("annotate", "{in}", "{out}/o.onnx"), ("float_only.onnx", "no layer"),
                                       model=variant(MLP, float_only)),
    "lower-nothing-quantized": Case(("lower", "{in}", "{out}/o.onnx"), ("no quantized MAC layer",),
                                    model=variant(MLP, float_only)),
    "report-truncated": Case(("report", "{in}", "--fpgapart", "xczu3eg-sbva484-1-e"), ("truncated.onnx",),
                             model=truncated),
    "finetune-nan-weight": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "16"),
                                ("Quant_1_param0", "NaN or Inf"), model=variant(MLP, nan_weight),
                                data=npz("train.npz", x=X_OK, y=Y_OK)),
    # --- output paths
    "annotate-output-is-folder": Case(("annotate", "{in}", "{out}/dir"), ("dir", "is a folder"), prepare=_mkdir("dir")),
    "project-output-is-folder": Case(("project", "{in}", "{out}", "--acc-bits", "16"), ("is a folder",)),
    "lower-output-is-folder": Case(("lower", "{in}", "{out}/dir"), ("is a folder",), prepare=_mkdir("dir")),
    "finetune-output-is-folder": Case(("finetune", "{in}", "{out}/dir", "--data", "{data}", "--acc-bits", "16"),
                                      ("is a folder",), prepare=_mkdir("dir"), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "project-output-folder-missing": Case(("project", "{in}", "{out}/missing/o.onnx", "--acc-bits", "16"),
                                          ("missing", "does not exist")),
    "annotate-output-under-a-file": Case(("annotate", "{in}", "{in}/o.onnx"), ("is a file, not a folder",)),
    "annotate-output-folder-missing": Case(("annotate", "{in}", "{out}/missing/o.onnx"), ("missing", "does not exist")),
    "project-plot-folder-missing": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--plot",
                                         "{out}/missing/p.png"), ("--plot", "missing", "does not exist")),
    "project-plot-is-folder": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--plot", "{out}/dir"),
                                   ("--plot", "is a folder"), prepare=_mkdir("dir")),
    "project-plot-is-output": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--plot", "{out}/o.onnx"),
                                   ("--plot", "also given as OUT.onnx")),
    "lower-report-json-folder-missing": Case(("lower", "{in}", "{out}/o.onnx", "--report-json", "{out}/missing/r.json"),
                                             ("--report-json", "missing", "does not exist")),
    "lower-report-json-is-folder": Case(("lower", "{in}", "{out}/o.onnx", "--report-json", "{out}/dir"),
                                        ("--report-json", "is a folder"), prepare=_mkdir("dir")),
    "lower-report-json-is-output": Case(("lower", "{in}", "{out}/o.onnx", "--report-json", "{out}/o.onnx"),
                                        ("--report-json", "also given as OUT.onnx")),
    "analyze-plot-folder-missing": Case(("analyze", "{in}", "--plot", "{out}/missing/a.png"), ("--plot", "missing")),
    "verify-plot-folder-missing": Case(("verify", "{in}", "--acc-bits", "16", "--plot", "{out}/missing/v.png"),
                                       ("--plot", "missing")),
    "verify-plot-is-folder": Case(("verify", "{in}", "--acc-bits", "16", "--plot", "{out}"), ("--plot", "is a folder")),
    "report-plot-folder-missing": Case(("report", "{in}", "--fpgapart", "xczu3eg-sbva484-1-e", "--plot",
                                        "{out}/missing/r.png"), ("--plot", "missing")),
    "annotate-output-is-input": Case(("annotate", "{in}", "{in}"), ("equals the input", "--in-place")),
    "project-output-is-input": Case(("project", "{in}", "{in}", "--acc-bits", "16"), ("equals the input", "--in-place")),
    "project-in-place-plot-is-input": Case(("project", "{in}", "{in}", "--in-place", "--acc-bits", "16", "--plot",
                                           "{in}"), ("--plot", "OUT.onnx")),
    "project-plot-is-input": Case(("project", "{in}", "{out}/o.onnx", "--in-place", "--acc-bits", "16", "--plot",
                                   "{in}"), ("--plot", "equals the input path", "choose another output")),
    "lower-output-is-input": Case(("lower", "{in}", "{in}"), ("equals the input",)),
    "finetune-output-is-input": Case(("finetune", "{in}", "{in}", "--data", "{data}", "--acc-bits", "16"),
                                     ("equals the input",), data=npz("train.npz", x=X_OK, y=Y_OK)),
    # --- options
    "analyze-input-dtype-INT4X": Case(("analyze", "{in}", "--input-dtype", "INT4X"), ("--input-dtype", "INT4X")),
    "project-input-dtype-float": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--input-dtype",
                                       "FLOAT32"), ("--input-dtype", "FLOAT32")),
    "annotate-input-dtype-INT0": Case(("annotate", "{in}", "{out}/o.onnx", "--input-dtype", "INT0"), ("INT0",)),
    "verify-input-dtype-too-wide": Case(("verify", "{in}", "--acc-bits", "16", "--input-dtype", "global_in=INT99"),
                                        ("INT99",)),
    "analyze-input-dtype-unknown-tensor": Case(("analyze", "{in}", "--input-dtype", "nosuch=UINT8"),
                                               ("--input-dtype", "nosuch", "global_in")),
    "analyze-zero-point-bad": Case(("analyze", "{in}", "--zero-point", "middle"), ("--zero-point", "middle")),
    "annotate-zero-point-bad": Case(("annotate", "{in}", "{out}/o.onnx", "--zero-point", "x"), ("--zero-point",)),
    "project-zero-point-bad": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--zero-point", "raw"),
                                   ("--zero-point",)),
    "verify-zero-point-bad": Case(("verify", "{in}", "--acc-bits", "16", "--zero-point", ""), ("--zero-point",)),
    "project-acc-bits-too-small": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "1"),
                                       ("--acc-bits", "out of range", "2 to 64")),
    "project-acc-bits-too-large": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "65"),
                                       ("--acc-bits", "out of range", "2 to 64")),
    "project-layer-width-too-large": Case(("project", "{in}", "{out}/o.onnx", "--layer", "Gemm_0=65"),
                                          ("'Gemm_0'", "out of range", "2 to 64")),
    "project-infeasible-width": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "4"), ("Gemm_0",)),
    "project-no-width": Case(("project", "{in}", "{out}/o.onnx"), ("--acc-bits",)),
    "project-unknown-layer": Case(("project", "{in}", "{out}/o.onnx", "--layer", "conv9=12"), ("conv9", "Gemm_0")),
    "project-layer-spec": Case(("project", "{in}", "{out}/o.onnx", "--layer", "Gemm_0"), ("--layer", "NAME=BITS")),
    "project-widths-json-missing": Case(("project", "{in}", "{out}/o.onnx", "--widths-json", "{inputs}/w.json"),
                                        ("w.json",)),
    "project-widths-json-not-json": Case(("project", "{in}", "{out}/o.onnx", "--widths-json", "{data}"),
                                         ("bad.json", "JSON"), data=raw_file(b"{Gemm_0: 12", "bad.json")),
    "project-widths-json-list": Case(("project", "{in}", "{out}/o.onnx", "--widths-json", "{data}"),
                                     ("list.json", "JSON object"), data=raw_file(b"[12, 12]", "list.json")),
    "verify-widths-json-float": Case(("verify", "{in}", "--widths-json", "{data}"), ("f.json", "integer"),
                                     data=raw_file(b'{"Gemm_0": 12.5}', "f.json")),
    "project-method-unknown": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--method", "magic"),
                                   ("magic",)),
    "verify-mode-unknown": Case(("verify", "{in}", "--acc-bits", "16", "--mode", "clamp"), ("clamp", "wrap")),
    "verify-tile-zero": Case(("verify", "{in}", "--acc-bits", "16", "--tile", "0"), ("--tile",)),
    "verify-data-missing": Case(("verify", "{in}", "--acc-bits", "16", "--data", "{inputs}/none.npz"), ("none.npz",)),
    "verify-data-wrong-shape": Case(("verify", "{in}", "--acc-bits", "16", "--data", "{data}"),
                                    ("wrong.npz", "global_in", "(4, 3, 8, 8)"), data=npz("wrong.npz", x=X_WRONG)),
    "verify-against-missing": Case(("verify", "{in}", "--against", "{inputs}/orig.onnx"), ("orig.onnx", "no such file")),
    "lower-samples-zero": Case(("lower", "{in}", "{out}/o.onnx", "--samples", "0"), ("--samples",)),
    "lower-samples-negative": Case(("lower", "{in}", "{out}/o.onnx", "--samples", "-3"), ("--samples",)),
    "lower-data-wrong-shape": Case(("lower", "{in}", "{out}/o.onnx", "--data", "{data}"),
                                   ("wrong.npz", "(4, 3, 8, 8)"), data=npz("wrong.npz", x=X_WRONG)),
    "lower-data-not-npz": Case(("lower", "{in}", "{out}/o.onnx", "--data", "{data}"), ("x.npz", "npz"),
                               data=raw_file(b"plain text", "x.npz")),
    "lower-data-nan": Case(("lower", "{in}", "{out}/o.onnx", "--data", "{data}"), ("nan.npz", "NaN"),
                           data=npz("nan.npz", x=np.full((2, 1, 8, 8), np.nan, dtype=np.float32))),
    "lower-acc-bits-too-small": Case(("lower", "{in}", "{out}/o.onnx", "--acc-bits", "1"),
                                     ("--acc-bits", "out of range", "2 to 64")),
    "lower-acc-bits-and-annotations": Case(("lower", "{in}", "{out}/o.onnx", "--acc-bits", "16", "--from-annotations"),
                                           ("--from-annotations",)),
    "lower-from-annotations-without-record": Case(("lower", "{in}", "{out}/o.onnx", "--from-annotations"),
                                                  ("--from-annotations", "a2q annotate")),
    "lower-fpgapart-unknown": Case(("lower", "{in}", "{out}/o.onnx", "--fpgapart", "notachip"), ("notachip",)),
    "lower-plot-without-fpgapart": Case(("lower", "{in}", "{out}/o.onnx", "--plot", "{out}/r.png"),
                                        ("--plot", "--fpgapart")),
    "report-fpgapart-unknown": Case(("report", "{in}", "--fpgapart", "notachip"), ("notachip",)),
    "finetune-device-cuda-without-gpu": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits",
                                              "16", "--device", "cuda"), ("--device cuda", "--device cpu"),
                                             data=npz("train.npz", x=X_OK, y=Y_OK), env={"no_cuda": True}),
    "finetune-data-missing": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{inputs}/none.npz", "--acc-bits",
                                   "16"), ("none.npz",)),
    "finetune-data-wrong-shape": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "16"),
                                      ("wrong.npz",), data=npz("wrong.npz", x=X_WRONG, y=np.zeros(4, dtype=np.int64))),
    "finetune-method-unknown": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "16",
                                     "--method", "sgd"), ("--method", "sgd"), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-lr-zero": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "16", "--lr", "0"),
                             ("--lr",), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-batch-size-zero": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "16",
                                      "--batch-size", "0"), ("--batch-size",), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-no-width": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}"), ("--acc-bits",),
                              data=npz("train.npz", x=X_OK, y=Y_OK)),
    "verify-against-other-model": Case(("verify", "{in}", "--against", "{data}"),
                                       ("espcn_x2_w4a4.onnx", "values per sample"), data=copy_of(MODELS / "espcn_x2_w4a4.onnx")),
    "verify-against-dynamic-batch": Case(("verify", "{in}", "--against", "{data}"), ("digits_cnn_qdq.onnx", "'input'",
                                         "dynamic batch", "make_dynamic_shape_fixed"), data=copy_of(QDQ)),
    "verify-layer-unknown": Case(("verify", "{in}", "--layer", "nope=12"), ("'nope'", "Gemm_0")),
    "verify-acc-bits-zero": Case(("verify", "{in}", "--acc-bits", "0"), ("--acc-bits", "out of range", "1 to 64")),
    "verify-layer-width-too-large": Case(("verify", "{in}", "--layer", "Gemm_0=65"),
                                         ("'Gemm_0'", "out of range", "1 to 64")),
    "verify-no-width": Case(("verify", "{in}"), ("--acc-bits", "a2q annotate")),
    "verify-data-empty-archive": Case(("verify", "{in}", "--acc-bits", "16", "--data", "{data}"), ("e.npz", "no arrays"),
                                      data=npz("e.npz")),
    "verify-data-labels-only": Case(("verify", "{in}", "--acc-bits", "16", "--data", "{data}"), ("y.npz", "global_in"),
                                    data=npz("y.npz", y=Y_OK)),
    "verify-data-not-numeric": Case(("verify", "{in}", "--acc-bits", "16", "--data", "{data}"), ("s.npz", "not numeric"),
                                    data=npz("s.npz", x=np.array(["a", "b"]))),
    "project-qdq-infeasible-width": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "6"),
                                         ("/conv1/Conv", "smallest feasible"), model=copy_of(QDQ)),
    "lower-acc-bits-too-narrow": Case(("lower", "{in}", "{out}/o.onnx", "--acc-bits", "6"), ("MVAU_0", "6 bits")),
    "report-from-annotations-without-record": Case(("report", "{in}", "--fpgapart", "xczu3eg-sbva484-1-e",
                                                    "--from-annotations"), ("--from-annotations", "a2q annotate")),
    "finetune-val-without-x": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12", "--val",
                                    "{data}"), ("train.npz",), data=npz("train.npz", y=Y_OK)),
    "finetune-tile-without-axe": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12",
                                       "--tile", "4"), ("--tile", "axe"), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-axe-no-calibration-samples": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits",
                                                 "12", "--method", "axe", "--calib-samples", "0"), ("calibration",),
                                                data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-axe-unknown-refresh": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12",
                                          "--method", "axe", "--refresh-stats", "sometimes"), ("--refresh-stats", "auto"),
                                         data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-axe-negative-held-out": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12",
                                            "--method", "axe", "--held-out-samples", "-1"), ("held-out",),
                                           data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-mse-with-class-labels": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12",
                                            "--loss", "mse"), ("train.npz", "'y'", "global_out"),
                                           data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-ce-with-float-targets": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12"),
                                           ("train.npz", "class label"),
                                           data=npz("train.npz", x=X_OK, y=np.zeros((8, 10), dtype=np.float32))),
    "finetune-qdq-model": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12"),
                               ("/conv1/Conv", "Quant"), model=copy_of(QDQ), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-layer-unknown": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--layer", "nope=12"),
                                   ("nope", "Gemm_0"), data=npz("train.npz", x=X_OK, y=Y_OK)),
    "finetune-tied-weights": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "13", "--loss",
                                   "mse", "--distill"), ("layer 'mmA'", "'W'", "tied"), model=tied_weights,
                                  data=npz("x.npz", x=np.random.default_rng(0).uniform(0, 5, (16, 8)).astype(np.float32))),
    "finetune-data-no-samples": Case(("finetune", "{in}", "{out}/o.onnx", "--data", "{data}", "--acc-bits", "12"),
                                     ("z.npz", "no samples"), data=npz("z.npz", x=np.zeros((0, 1, 8, 8), np.float32))),
    # --- pure usage errors: click's own message, exit 2
    "analyze-unknown-option": Case(("analyze", "{in}", "--bogus"), ("--bogus",), code=2),
    "project-acc-bits-not-a-number": Case(("project", "{in}", "{out}/o.onnx", "--acc-bits", "sixteen"),
                                          ("--acc-bits", "valid integer"), code=2),
    "lower-missing-output-argument": Case(("lower", "{in}"), ("OUT.onnx",), code=2),
    "unknown-command": Case(("anaylze", "{in}"), ("anaylze",), code=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    model = case.model(inputs)
    data = case.data(inputs) if case.data is not None else None
    if case.prepare is not None:
        case.prepare(out)
    if case.env.get("no_cuda"):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a.format(**{"in": model, "out": out, "inputs": inputs, "data": data}) for a in case.args]
    before_inputs, before_out = snapshot(inputs), snapshot(out)

    code, stdout, stderr = run_cli(*args)

    message = " ".join(stderr.split())  # rich wraps long lines
    assert code == case.code, (code, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    for fragment in case.expect:
        assert fragment in message, (fragment, stderr)
    assert snapshot(inputs) == before_inputs, "an input file changed or a file appeared next to the input"
    assert snapshot(out) == before_out, "something was written to the output folder"


def test_catalogue_size() -> None:
    assert len(CASES) >= 60


# ---------------------------------------------------------------------------------------------
# Killed runs: no hidden temporary is left behind for good

_KILLED_DURING_WRITE = """
import os, signal, sys
from a2q_passes.cli import main
real_fsync, signum = os.fsync, getattr(signal, sys.argv[1])
def fsync(fd):  # the temporary holds the model now; the signal arrives before the rename
    real_fsync(fd)
    os.kill(os.getpid(), signum)
os.fsync = fsync
sys.argv = ["a2q", "project", sys.argv[2], sys.argv[3], "--acc-bits", "16"]
main()
"""


def _killed_project(signal_name: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLED_DURING_WRITE, signal_name, str(MLP), str(out)],
                          capture_output=True, text=True, timeout=300)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sigterm_during_the_write_leaves_nothing(tmp_path: Path) -> None:
    result = _killed_project("SIGTERM", tmp_path / "o.onnx")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary


def test_temporary_of_a_killed_run_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    result = _killed_project("SIGKILL", out)
    assert result.returncode == -signal.SIGKILL
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".o.onnx.") and not out.exists()
    # a temporary of a writer that is still running (this test's process) must survive
    alive = tmp_path / f".o.onnx.{os.getpid()}.inflight.tmp"
    alive.write_bytes(b"partial")
    code, _, err = run_cli("project", MLP, out, "--acc-bits", "16")
    assert code == 0, err
    assert _temporaries(tmp_path) == [alive.name] and out.exists()


def test_a_value_info_entry_repeating_a_graph_output_is_dropped(tmp_path: Path) -> None:
    """A tensor kept in value_info after it was made a graph output too (as editing tools leave it), described the same
    way both times: read as one description. Before: refused as "more than one ValueInfo entry"."""
    model = _load(MLP)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    described = next(v for v in model.graph.value_info if v.name == gemm.output[0])
    model.graph.output.append(copy.deepcopy(described))
    path = save(model, tmp_path / "extra_output.onnx")
    out = tmp_path / "p.onnx"
    code, _, errors = run_cli("project", path, out, "--acc-bits", "16")
    assert code == 0, errors
    projected = onnx.load(out)
    assert [o.name for o in projected.graph.output][-1] == gemm.output[0]
    assert sum(v.name == gemm.output[0] for v in projected.graph.value_info) == 0
