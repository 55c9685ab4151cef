"""Models with external data: streamed weights give the results of the same model stored inline.

The bundled models were written by Brevitas (QONNX) and onnxruntime's quantizer (QDQ); here they are
re-saved with every tensor in an external data file, as ``onnx.save`` does for large models, and the
streaming threshold is lowered so their weights stay in that file while the commands run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes import model_io
from tests.cli_helpers import digest

MODELS = Path(__file__).resolve().parents[1] / "models"
QONNX_MLP = MODELS / "digits_mlp_w4a4.onnx"  # Brevitas export_qonnx: Quant weights (float32) -> Gemm
QDQ_CNN = MODELS / "digits_cnn_qdq.onnx"  # onnxruntime quantize_static: int8 weights -> DequantizeLinear -> Conv


@pytest.fixture(autouse=True)
def stream_small_tensors(monkeypatch):
    """Stream every tensor of at least 1 KiB: the weights of these small models, not their scales."""
    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 1024)


def externalise(source: Path, folder: Path) -> Path:
    """``source`` re-saved by onnx with all its tensors in ``weights.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    onnx.save_model(onnx.load(str(source)), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    return path


def initializer_values(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))  # onnx's own reader, external data included
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_loading_checks_by_path_and_keeps_weights_in_their_file(tmp_path, monkeypatch):
    path = externalise(QONNX_MLP, tmp_path)
    checked = []
    original = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, *a, **k: (checked.append(model), original(model, *a, **k)))
    model = model_io.load_model(path)
    assert checked == [str(path)]  # the file, not a proto serialised in memory
    streamed = [t for t in model.graph.initializer if model_io.is_streamed(t)]
    assert streamed and all(not t.raw_data for t in streamed)
    inline = initializer_values(QONNX_MLP)
    for tensor in streamed:
        assert np.array_equal(model_io.initializer_value(model, tensor.name), inline[tensor.name])
    checked.clear()
    model_io.load_model(QONNX_MLP)
    assert len(checked) == 1 and isinstance(checked[0], onnx.ModelProto)  # small inline models: as before


def test_a_short_data_file_is_refused_by_name(tmp_path, a2q):
    path = externalise(QONNX_MLP, tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    result = a2q("analyze", path)
    assert result.returncode == 1
    assert "weights.bin" in result.stderr


@pytest.mark.parametrize("source", [QONNX_MLP, QDQ_CNN], ids=["qonnx", "qdq"])
def test_external_model_analyses_projects_and_verifies_like_inline(tmp_path, a2q, source):
    external = externalise(source, tmp_path / "ext")
    before = digest(external), digest(tmp_path / "ext" / "weights.bin")
    assert json.loads(a2q("analyze", external, "--json").stdout) == json.loads(a2q("analyze", source, "--json").stdout)
    outs = {}
    for name, model in (("inline", source), ("external", external)):
        outs[name] = tmp_path / f"{name}_out.onnx"
        result = a2q("project", model, outs[name], "--acc-bits", "13", "--json")
        assert result.returncode == 0, result.stderr
    assert (digest(external), digest(tmp_path / "ext" / "weights.bin")) == before  # input untouched
    data = tmp_path / "external_out.onnx.data"
    assert data.exists()
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(outs["external"]), load_external_data=False).graph.initializer)
    assert not (tmp_path / "inline_out.onnx.data").exists()
    ours, theirs = initializer_values(outs["external"]), initializer_values(outs["inline"])
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    verified = [json.loads(a2q("verify", outs[name], "--json").stdout) for name in ("inline", "external")]
    assert verified[0] == verified[1] and verified[1]["overflow_impossible"]
    # rerun: the same bytes, model and data file
    first = digest(outs["external"]), digest(data)
    assert a2q("project", external, outs["external"], "--acc-bits", "13").returncode == 0
    assert (digest(outs["external"]), digest(data)) == first


def _mac_inputs(model: ModelWrapper) -> list[tuple[onnx.NodeProto, str, str]]:
    return [(node, node.input[0], node.input[1]) for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]


def test_projected_external_model_keeps_its_promise_when_executed(tmp_path, a2q):
    """Worst-case inputs executed with qonnx through the external output: every accumulator fits 13 bits."""
    external = externalise(QONNX_MLP, tmp_path / "ext")
    out = tmp_path / "out.onnx"
    assert a2q("project", external, out, "--acc-bits", "13").returncode == 0
    model = ModelWrapper(onnx.load(str(out)))  # onnx's reader resolves OUT.onnx.data
    context = execute_onnx(model, {model.graph.input[0].name: np.zeros(model.get_tensor_shape(model.graph.input[0].name),
                                                                       dtype=np.float32)}, return_full_exec_context=True)
    for node, x_name, w_name in _mac_inputs(model):
        quant = model.find_producer(w_name)
        w = context[w_name] / onnx.numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == quant.input[1]))
        q = np.rint(w).astype(np.int64)
        assert np.allclose(w, q, atol=1e-3)
        rows = q if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else q.T
        act = model.find_producer(x_name)
        while act.op_type != "Quant":
            act = model.find_producer(act.input[0])
        bits = int(onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == act.input[3])))
        signed = next(a.i for a in act.attribute if a.name == "signed")
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        for row in rows:  # the worst input for each row: every code at the end that grows the sum
            x_max = np.where(row > 0, hi, lo)
            x_min = np.where(row > 0, lo, hi)
            assert -(1 << 12) <= int(row @ x_min) and int(row @ x_max) <= (1 << 12) - 1


def test_a_failed_write_leaves_nothing(tmp_path, a2q, monkeypatch):
    external = externalise(QDQ_CNN, tmp_path / "ext")
    out = tmp_path / "out.onnx"

    def broken(tensor, handle, block=0):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "_copy_tensor_bytes", broken)
    result = a2q("project", external, out, "--acc-bits", "13")
    assert result.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext"]  # no output, no data file, no temporaries


def test_annotate_keeps_external_data(tmp_path, a2q):
    external = externalise(QDQ_CNN, tmp_path / "ext")
    out = tmp_path / "annotated.onnx"
    assert a2q("annotate", external, out).returncode == 0
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.metadata_props
    assert initializer_values(out).keys() == initializer_values(QDQ_CNN).keys()
    assert all(np.array_equal(a, initializer_values(QDQ_CNN)[k]) for k, a in initializer_values(out).items())


def test_external_input_gives_external_output_even_when_read_whole(tmp_path, a2q, monkeypatch):
    """Tensors below the streaming threshold are read into memory; the output still keeps its data external."""
    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 1 << 30)
    external = externalise(QONNX_MLP, tmp_path / "ext")
    out = tmp_path / "out.onnx"
    parsed = []
    original_load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda path, *a, **k: (parsed.append(str(path)), original_load(path, *a, **k))[1])
    assert a2q("project", external, out, "--acc-bits", "13").returncode == 0
    assert parsed.count(str(external)) == 1  # the graph is parsed once: the save knows it was stored externally
    assert (tmp_path / "out.onnx.data").exists()
    inline_out = tmp_path / "inline.onnx"
    assert a2q("project", QONNX_MLP, inline_out, "--acc-bits", "13").returncode == 0
    ours, theirs = initializer_values(out), initializer_values(inline_out)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("case", ["quantize_static int4 BlockSize", "ort uint4 block zero points"])
def test_streamed_int4_blockwise_weights_analyse_and_project_like_inline(tmp_path, a2q, monkeypatch, case):
    """Packed int4/uint4 codes read from the data file and written back (block-wise scales stay inline)."""
    from tests.test_blockwise import CASES

    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 128)  # the 64 x 6 int4 weights (192 bytes), not the scales
    model, zero_point = CASES[case](tmp_path)
    inline = tmp_path / "inline.onnx"
    onnx.save(model, inline)
    external = externalise(inline, tmp_path / "ext")
    assert any(model_io.is_streamed(t) and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
               for t in model_io.load_model(external).graph.initializer)
    reports = [json.loads(a2q("analyze", m, "--json", "--zero-point", zero_point).stdout) for m in (inline, external)]
    assert reports[0] == reports[1]
    target = reports[0]["layers"][0]["bounds"]["exact"] - 2
    outs = [tmp_path / "inline_out.onnx", tmp_path / "external_out.onnx"]
    for source, out in zip((inline, external), outs):
        assert a2q("project", source, out, "--acc-bits", target, "--zero-point", zero_point).returncode == 0
        assert a2q("verify", out, "--zero-point", zero_point).returncode == 0
    ours, theirs = initializer_values(outs[1]), initializer_values(outs[0])
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_has_external_data_sees_a_file_rewritten_after_it_was_read(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(QDQ_CNN.read_bytes())
    model_io.read_model_proto(path)
    assert not model_io.has_external_data(path)
    onnx.save_model(onnx.load(str(QDQ_CNN)), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    assert model_io.has_external_data(path)
    model_io.read_model_proto(path)
    assert model_io.has_external_data(path)
