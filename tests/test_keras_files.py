"""Keras models as their converters write them (``tests/data/keras``, see its README). QKeras models from qonnx's
converter, run as a QKeras user would: the converter drops the input quantizer, so the first layer's input is
declared with ``--input-dtype`` and every output carries that claim. Keras float models from tf2onnx, quantized by
onnxruntime.

Each file goes through the corpus' whole check (``scripts.corpus.check``: analyze against the oracle that executes
worst-case inputs through the graph's own quantizers, project, verify, finetune, allocate and lower, each output
executed again). Before: ``finetune`` died on the converter's float64 scales (torch's MatMul refused float32 x
float64), ``lower`` stopped in FINN on tf2onnx's ``MaxPool`` without ``pads`` and on a ``Conv1D`` bias behind a
``Reshape``, and an ``--input-dtype`` given to ``project`` or ``annotate`` was not in their output, so ``verify``
and ``lower`` of it could not read the first layer. ``lower`` of the tf2onnx CNN's QDQ files stopped in FINN
("MultiThreshold input (NCHW) and output (NHWC) layout mismatch"): its graph input is channels-last; and at
the residual net's ``Squeeze`` after its global pool and at TensorFlow's 1-D convolution (a 2-D ``Conv`` between
``Unsqueeze`` and ``Squeeze``), which FINN has no layer for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from scripts.corpus import TF2ONNX_ORT_VARIANTS, _oracle_ranges, _run, check, keras_files
from tests.fuzz.oracle import width

FILES = sorted(p.stem for p in (Path(__file__).resolve().parent / "data" / "keras").glob("qkeras_*.onnx"))
FLOAT_FILES = sorted(p.stem for p in (Path(__file__).resolve().parent / "data" / "keras").glob("tf2onnx_*.onnx"))
# what the converter leaves unquantized, named by analyze: the QActivation between the layers dropped, the
# alpha="auto_po2" weights without a Quant
UNREAD = {"qkeras_mlp_signed_act_w4a6": "MatMul_1: input not quantized",
          "qkeras_mlp_auto_po2_w4a4": "MatMul_0: weights not quantized"}


@pytest.fixture(scope="module")
def keras(tmp_path_factory):
    qkeras, quantized = keras_files(tmp_path_factory.mktemp("keras"), quick=False)
    return {e.name: e for e in qkeras}, {e.name: e for e in quantized}


@pytest.fixture(scope="module")
def entries(keras):
    return keras[0]


def test_every_converter_file_is_committed(keras):
    assert len(FILES) == 11
    assert len(keras[1]) == len(FLOAT_FILES) * len(TF2ONNX_ORT_VARIANTS) and len(FLOAT_FILES) == 5


# each tf2onnx float model under the QDQ variant `lower` takes whole (the model decides how: a channels-last input,
# a Squeeze after the global pool, TensorFlow's 1-D convolution), and the CNN under every onnxruntime variant; the
# full corpus (scripts/corpus.py, bench/corpus.md) checks all of them
TF2ONNX_CASES = [(*TF2ONNX_ORT_VARIANTS[0], model) for model in FLOAT_FILES] + \
    [(*variant, "tf2onnx_cnn") for variant in TF2ONNX_ORT_VARIANTS[1:]]


@pytest.mark.parametrize("case", TF2ONNX_CASES, ids=lambda case: f"{case[4]}-{case[0]}-{case[2]}")
def test_onnxruntime_quantized_tf2onnx_file_end_to_end(case, keras, tmp_path):
    """onnxruntime's formats over tf2onnx float models: every layer read exactly, projected, verified and executed
    within P; the Q/DQ ones lowered whole (the CNN's channels-last input included), the others refused by lower by
    name."""
    fmt, weight, act, per_channel, model = case
    entry = keras[1][f"ort_{fmt}_{model}_w{weight}_a{act}_{'pc' if per_channel else 'pt'}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(entry, tmp_path, allocate=True)
    assert result.status == "handled", (entry.name, result.detail, result.notes)
    assert result.layers > 0 and result.tight == result.layers, (result.tight, result.layers)
    assert entry.lower == ("_QDQ_" in entry.name), entry.name
    assert result.allocated > 0, result.notes


@pytest.mark.parametrize("name", FILES)
def test_qkeras_file_end_to_end(name, entries, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(entries[name], tmp_path, allocate=True)
    if name in UNREAD:
        assert result.status == "refused" and UNREAD[name] in result.detail, result.detail
        return
    # every layer read, and its analysed range is what executes
    assert result.layers > 0 and result.tight == result.layers, (result.detail, result.tight, result.layers)
    assert result.finetuned, (result.status, result.detail, result.notes)
    assert result.allocated > 0, (result.status, result.detail, result.notes)
    assert result.status == "handled", (result.detail, result.notes)


def test_value_info_without_shapes_as_older_converters_write(entries, tmp_path):
    """The QONNX zoo's jet-tagging file (qonnx's QKeras converter of 2022) declares every intermediate tensor with
    an element type and no shape; qonnx reads such a tensor as rank 0. The corpus' oracle took those for known
    shapes and died executing the first MatMul; every a2q command reads the file, and the oracle now checks it."""
    import onnx

    source = entries["qkeras_mlp_w6a6"]
    proto = onnx.load(str(source.path))
    assert len(proto.graph.value_info) > 0
    for vi in proto.graph.value_info:
        vi.type.tensor_type.ClearField("shape")
    path = tmp_path / "shapeless.onnx"
    onnx.save(proto, str(path))
    entry = type(source)("shapeless", source.producer, path, lower=True, input_dtype=source.input_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(entry, tmp_path)
    assert result.status == "handled", (result.detail, result.notes)
    assert result.layers > 0 and result.tight == result.layers, (result.tight, result.layers)
    assert result.finetuned, result.notes


def _first_layer_width(path: Path, input_dtype: str) -> int:
    model = ModelWrapper(str(path))
    first = next(n for n in model.graph.node if n.op_type == "MatMul")
    executed = _oracle_ranges(path, [first.name], "fold", input_dtype)[first.name]
    return width(executed.lo, executed.hi)


@pytest.mark.parametrize("command", ["project", "annotate"])
def test_an_input_dtype_claim_travels_with_the_output(command, entries, tmp_path):
    """``project``/``annotate --input-dtype INT8`` write INT8 as the float input's DataType (FINN's annotation):
    ``verify`` of the output proves every layer without being told again, and proves nothing for a wider input the
    claim does not cover (the first layer then overflows its recorded width when executed)."""
    entry = entries["qkeras_mlp_w6a6"]
    out = tmp_path / "out.onnx"
    extra = ["--acc-bits", 15] if command == "project" else []
    code, _, err = _run(command, entry.path, out, *extra, "--input-dtype", "INT8")
    assert code == 0, err
    model = ModelWrapper(str(out))
    assert model.get_tensor_datatype(model.graph.input[0].name) == DataType["INT8"]
    assert ModelWrapper(str(entry.path)).get_tensor_datatype(model.graph.input[0].name) == DataType["FLOAT32"]
    code, stdout, err = _run("verify", out)
    assert code == 0 and "no overflow possible" in stdout, stdout + err
    code, stdout, _ = _run("verify", out, "--input-dtype", "INT12")
    assert code == 3, stdout
    recorded = 15 if command == "project" else _first_layer_width(entry.path, "INT8")
    assert _first_layer_width(out, "INT8") <= recorded < _first_layer_width(out, "INT12")


def test_lower_reads_the_claim_from_the_projected_file_or_the_option(entries, tmp_path):
    """FINN lowers the first layer (an MVAU on INT8 inputs) from the claim ``project`` wrote, and from
    ``lower --input-dtype`` on the unprojected file; without either it is named, not lowered (exit 3)."""
    entry = entries["qkeras_mlp_w4a4_integer"]
    projected = tmp_path / "p.onnx"
    assert _run("project", entry.path, projected, "--acc-bits", 12, "--input-dtype", "INT8")[0] == 0
    for source, extra in ((projected, []), (entry.path, ["--input-dtype", "INT8"])):
        hw = tmp_path / f"hw_{len(extra)}.onnx"
        code, stdout, err = _run("lower", source, hw, *extra)
        assert code == 0, stdout + err
        mvaus = [n for n in ModelWrapper(str(hw)).graph.node if n.op_type.startswith("MVAU")]
        assert len(mvaus) == 3
        assert ModelWrapper(str(hw)).get_tensor_datatype(mvaus[0].input[0]) == DataType["INT8"]
    code, stdout, err = _run("lower", entry.path, tmp_path / "plain.onnx")
    assert code == 3 and "not lowered: MatMul_0" in stdout + err


def test_finetune_trains_through_float64_scales(entries, tmp_path):
    """The converter stores every scale as float64: qonnx's executor computes each Quant in float64 and stores its
    output as float32, and so does the torch bridge (it multiplied float32 activations by float64 weights, which
    torch refuses), and the fine-tuned model computes what qonnx executes."""
    from qonnx.core.onnx_exec import execute_onnx

    from a2q_passes.torch_bridge import QonnxModule

    entry = entries["qkeras_mlp_w6a6"]
    x = np.random.default_rng(1).integers(-128, 128, (16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "f.onnx"
    code, _, err = _run("finetune", entry.path, out, "--acc-bits", 15, "--data", tmp_path / "d.npz", "--epochs", 1,
                        "--loss", "mse", "--distill", "--no-progress", "--input-dtype", "INT8")
    assert code == 0, err
    model = ModelWrapper(str(out))
    assert {model.get_initializer(n.input[1]).dtype for n in model.graph.node if n.op_type == "Quant"} == {np.dtype(np.float64)}
    module = QonnxModule(model)
    name, output = model.graph.input[0].name, model.graph.output[0].name
    expected = execute_onnx(model, {name: x[:1]})[output]
    assert np.allclose(module(x[:1]).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tf2onnx_conv1d", "qkeras_conv1d_w5a5", "tf2onnx_conv1d_pool",
                                  "qkeras_conv1d_pool_w4a4"])
def test_tensorflow_conv1d_becomes_a_1d_conv_computing_the_same(name):
    """TensorFlow's conv1d (Unsqueeze, Transpose, Conv 1 x k, Squeeze) as one Transpose and a 1-D Conv with 3-D
    weights, and its 1-D max pooling (Unsqueeze, Reshape, MaxPool k x 1, Squeeze) as a 1-D MaxPool: qonnx executes
    the same outputs on random inputs, and no Squeeze or Unsqueeze is left for FINN's 1-D step."""
    from qonnx.core.onnx_exec import execute_onnx

    from a2q_passes.finn_conv1d import ExpandedConv2DAsConv1D, ExpandedMaxPoolAsMaxPool1D

    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(str(Path(__file__).resolve().parent / "data" / "keras" / f"{name}.onnx"))
    model = model.transform(InferShapes())  # tf2onnx leaves most shapes out; qonnx's executor wants them
    rewritten = ModelWrapper(model.model.SerializeToString()).transform(ExpandedConv2DAsConv1D())
    rewritten = rewritten.transform(ExpandedMaxPoolAsMaxPool1D())
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Squeeze" not in ops and "Unsqueeze" not in ops, ops
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    assert len(rewritten.get_tensor_shape(conv.input[1])) == 3
    x = np.random.default_rng(2).integers(-128, 128, (4, 1, 16, 4)).astype(np.float32)
    for sample in x:
        inputs = {model.graph.input[0].name: sample}
        assert np.array_equal(execute_onnx(model, inputs)[model.graph.output[0].name],
                              execute_onnx(rewritten, inputs)[rewritten.graph.output[0].name])
