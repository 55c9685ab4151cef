"""Models with external data: streamed weights give the results of the same model stored inline.

The bundled models were written by Brevitas (QONNX) and onnxruntime's quantizer (QDQ); here they are
re-saved with every tensor in an external data file, as ``onnx.save`` does for large models, and the
streaming threshold is lowered so their weights stay in that file while the commands run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes import model_io, tensor_store
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
    streamed = [t for t in model.graph.initializer if tensor_store.is_streamed(t)]
    assert streamed and all(not t.raw_data for t in streamed)
    inline = initializer_values(QONNX_MLP)
    for tensor in streamed:
        assert np.array_equal(tensor_store.initializer_value(model, tensor.name), inline[tensor.name])
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
    [data] = model_io.referenced_data_files(outs["external"])
    assert data.parent == tmp_path and data.name.startswith("external_out.onnx.")
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(outs["external"]), load_external_data=False).graph.initializer)
    assert not model_io.referenced_data_files(outs["inline"])
    ours, theirs = initializer_values(outs["external"]), initializer_values(outs["inline"])
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    verified = [json.loads(a2q("verify", outs[name], "--json").stdout) for name in ("inline", "external")]
    assert verified[0] == verified[1] and verified[1]["overflow_impossible"]
    # rerun: the same bytes, model and data file
    first = digest(outs["external"]), digest(data)
    assert a2q("project", external, outs["external"], "--acc-bits", "13").returncode == 0
    assert (digest(outs["external"]), digest(data)) == first
    assert sorted(p.name for p in tmp_path.glob("external_out.onnx*")) == ["external_out.onnx", data.name]


def _mac_inputs(model: ModelWrapper) -> list[tuple[onnx.NodeProto, str, str]]:
    return [(node, node.input[0], node.input[1]) for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]


def test_projected_external_model_keeps_its_promise_when_executed(tmp_path, a2q):
    """Worst-case inputs executed with qonnx through the external output: every accumulator fits 13 bits."""
    external = externalise(QONNX_MLP, tmp_path / "ext")
    out = tmp_path / "out.onnx"
    assert a2q("project", external, out, "--acc-bits", "13").returncode == 0
    model = ModelWrapper(onnx.load(str(out)))  # onnx's reader resolves the data file the model names
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

    def broken(tensor, handle, digest, block=0):
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
    assert model_io.referenced_data_files(out)
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
    assert any(tensor_store.is_streamed(t) and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
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
def _same_values(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _model_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _projected_into_own_folder(tmp_path: Path, a2q, source: Path, acc_bits: int) -> tuple[Path, Path, Path]:
    """(external-data input, output folder, OUT.onnx) after one ``project`` into a folder of its own."""
    external = externalise(source, tmp_path / "ext")
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "out.onnx"
    assert a2q("project", external, out, "--acc-bits", str(acc_bits)).returncode == 0
    return external, folder, out


def test_a_kill_at_any_step_of_a_write_leaves_the_old_pair_or_the_new_pair(tmp_path, a2q, monkeypatch):
    """The folder as a kill right after each rename would leave it: the model and the data it names match."""
    external, folder, out = _projected_into_own_folder(tmp_path, a2q, QONNX_MLP, 14)
    old = initializer_values(out)
    snapshots: list[Path] = []
    replace = os.replace

    def replace_then_snapshot(source, target):
        replace(source, target)
        snapshots.append(Path(shutil.copytree(folder, tmp_path / f"killed_{len(snapshots)}")))

    monkeypatch.setattr(os, "replace", replace_then_snapshot)
    assert a2q("project", external, out, "--acc-bits", "12").returncode == 0
    monkeypatch.setattr(os, "replace", replace)
    new = initializer_values(out)
    assert not _same_values(old, new)
    states = [initializer_values(snapshot / "out.onnx") for snapshot in snapshots]  # loadable: onnx finds the data
    assert [_same_values(s, old) for s in states] == [True, False]  # killed after the data's rename, the model's
    assert _same_values(states[1], new)
    assert len(_model_files(folder)) == 2  # the old data file is gone
    # the data file a kill between the renames leaves behind is removed by the next write (the model's
    # temporary too, once its writer's pid is dead: a kill)
    assert len(list(snapshots[0].glob("*.data"))) == 2
    assert a2q("project", external, snapshots[0] / "out.onnx", "--acc-bits", "12").returncode == 0
    assert [p.name for p in snapshots[0].glob("*.data")] == [p.name for p in folder.glob("*.data")]


def test_a_failed_model_rename_keeps_the_old_pair(tmp_path, a2q, monkeypatch):
    external, folder, out = _projected_into_own_folder(tmp_path, a2q, QDQ_CNN, 16)
    before = {name: digest(folder / name) for name in _model_files(folder)}
    replace, calls = os.replace, []

    def fail_after_the_first(source, target):
        calls.append(target)
        if len(calls) > 1:
            raise OSError("killed")
        replace(source, target)

    monkeypatch.setattr(os, "replace", fail_after_the_first)
    assert a2q("project", external, out, "--acc-bits", "13").returncode != 0
    assert len(calls) == 2
    assert {name: digest(folder / name) for name in _model_files(folder)} == before  # no temporaries, no new data
    assert initializer_values(out).keys()


def test_a_data_file_named_by_an_earlier_version_is_replaced(tmp_path, a2q):
    """``OUT.onnx.data`` (the fixed name a2q used to write) read by the model being overwritten goes with it."""
    out = tmp_path / "out.onnx"
    onnx.save_model(onnx.load(str(QONNX_MLP)), str(out), save_as_external_data=True, location="out.onnx.data",
                    size_threshold=0)
    external = externalise(QONNX_MLP, tmp_path / "ext")
    assert a2q("project", external, out, "--acc-bits", "13").returncode == 0
    [data] = model_io.referenced_data_files(out)
    assert _model_files(tmp_path) == sorted(["ext", "out.onnx", data.name])


@pytest.fixture
def temporary_folder(tmp_path, monkeypatch) -> Path:
    """The folder ``tempfile`` (and so the spill of streamed tensors) uses during the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _spilled(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith("a2q-tensors-")]


def _spilled_tensor_files(proto: onnx.ModelProto) -> list[Path]:
    return [Path(entry.value) for t in proto.graph.initializer if tensor_store.is_streamed(t)
            for entry in t.external_data if entry.key == "location" and "a2q-tensors-" in entry.value]


@pytest.mark.parametrize("ending", ["success", "exception", "ctrl-c"])
def test_spilled_tensors_are_removed_when_the_command_ends(tmp_path, a2q, monkeypatch, temporary_folder, ending):
    external = externalise(QONNX_MLP, tmp_path / "ext")
    spilled: list[Path] = []
    save = model_io.save_with_external_data

    def note_spills_then_end(proto, path):
        spilled.extend(_spilled_tensor_files(proto))
        assert spilled and all(p.exists() for p in spilled)
        if ending == "exception":
            raise OSError("disk full")
        if ending == "ctrl-c":
            raise KeyboardInterrupt
        save(proto, path)

    monkeypatch.setattr(model_io, "save_with_external_data", note_spills_then_end)
    result = a2q("project", external, tmp_path / "out.onnx", "--acc-bits", "13")
    assert (result.returncode == 0) == (ending == "success")
    assert spilled and not any(p.exists() for p in spilled)
    assert _spilled(temporary_folder) == []


def test_spilled_tensors_are_removed_on_sigterm(tmp_path, temporary_folder):
    """A real SIGTERM, in a process of its own, while the projected tensors wait in the scratch folder."""
    external = externalise(QONNX_MLP, tmp_path / "ext")
    script = (
        "import os, signal, sys, time\n"
        "from a2q_passes import model_io\n"
        "from a2q_passes.cli import main\n"
        "model_io.STREAM_MIN_BYTES = 1024\n"
        "def save(proto, path):\n"
        "    print(*[n for n in os.listdir(os.environ['TMPDIR']) if n.startswith('a2q-tensors-')], flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "model_io.save_with_external_data = save\n"
        f"sys.argv = ['a2q', 'project', {str(external)!r}, {str(tmp_path / 'out.onnx')!r}, '--acc-bits', '13']\n"
        "main()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(temporary_folder)}, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stdout.startswith("a2q-tensors-")  # spilled before the signal
    assert _spilled(temporary_folder) == []
    assert not (tmp_path / "out.onnx").exists()


def test_scratch_of_a_killed_run_is_removed_by_the_next(tmp_path, a2q, temporary_folder):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no running process (SIGKILL leaves such a folder)
    stale = temporary_folder / f"a2q-tensors-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "w.bin").write_bytes(b"x")
    alive = temporary_folder / f"a2q-tensors-{os.getpid()}-def456"  # ours: still running
    alive.mkdir()
    assert a2q("project", externalise(QONNX_MLP, tmp_path / "ext"), tmp_path / "out.onnx", "--acc-bits", "13").returncode == 0
    assert _spilled(temporary_folder) == [alive]


def _input_batch(model_path: Path, samples: int, seed: int) -> np.ndarray:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:]
    return np.random.default_rng(seed).uniform(0, 1, (samples, *shape)).astype(np.float32)


@pytest.mark.parametrize("source, bits", [(QONNX_MLP, 11), (QDQ_CNN, 14)], ids=["qonnx", "qdq"])
def test_verify_data_streams_the_weights_and_simulates_like_inline(tmp_path, a2q, monkeypatch, source, bits):
    external = externalise(source, tmp_path / "ext")
    np.savez(tmp_path / "x.npz", x=_input_batch(source, 24, seed=0))
    loaded = []
    load = model_io.load_model  # the commands import it when they run
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    runs = [a2q("verify", m, "--acc-bits", bits, "--data", tmp_path / "x.npz", "--json") for m in (source, external)]
    assert [r.returncode for r in runs][0] == runs[1].returncode, runs[1].stderr
    assert any(tensor_store.is_streamed(t) for t in loaded[1].graph.initializer)
    inline, streamed = (json.loads(r.stdout) for r in runs)
    assert streamed == inline
    assert sum(inline["data"]["overflows"].values()) > 0  # a width that overflows: the simulation has work to show


WHOLE_MODEL_COMMANDS = {
    "finetune": lambda m, tmp: ["finetune", m, tmp / "out.onnx", "--data", tmp / "x.npz", "--acc-bits", "13"],
    "lower": lambda m, tmp: ["lower", m, tmp / "out.onnx"],
    "report": lambda m, tmp: ["report", m, "--fpgapart", "xczu3eg-sbva484-1-e"],
    "allocate": lambda m, tmp: ["allocate", m, "--data", tmp / "x.npz", "-o", tmp / "w.json", "--min-score-pct", "99"],
    "verify --against": lambda m, tmp: ["verify", m, "--against", QONNX_MLP],
}


@pytest.mark.parametrize("command", WHOLE_MODEL_COMMANDS)
def test_commands_that_need_the_whole_model_refuse_one_over_the_proto_limit(tmp_path, a2q, monkeypatch, command):
    """The 2 GiB limit lowered to below this model's size: refused up front, by name and size, nothing written."""
    external = externalise(QONNX_MLP, tmp_path / "ext")
    size = model_io.whole_model_bytes(external)
    assert size >= onnx.load(str(external)).ByteSize()  # an upper bound on the model read into one proto
    monkeypatch.setattr(model_io, "PROTO_LIMIT_BYTES", size - 1)
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: pytest.fail("loaded before the size check"))
    np.savez(tmp_path / "x.npz", x=_input_batch(QONNX_MLP, 4, seed=0), y=np.zeros(4, dtype=np.int64))
    before = _model_files(tmp_path)
    result = a2q(*WHOLE_MODEL_COMMANDS[command](external, tmp_path))
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert str(external) in message and f"{size / 1e9:.2f} GB" in message and "2 GiB" in message
    assert _model_files(tmp_path) == before


def test_whole_model_commands_take_models_under_the_limit(tmp_path, a2q, monkeypatch):
    external = externalise(QONNX_MLP, tmp_path / "ext")
    monkeypatch.setattr(model_io, "PROTO_LIMIT_BYTES", model_io.whole_model_bytes(external) + 1)
    assert a2q("verify", external, "--against", QONNX_MLP).returncode == 0


def test_verify_data_refuses_a_single_tensor_over_the_proto_limit(tmp_path, a2q, monkeypatch):
    external = externalise(QONNX_MLP, tmp_path / "ext")
    np.savez(tmp_path / "x.npz", x=_input_batch(QONNX_MLP, 4, seed=0))
    largest = max(v.nbytes for v in initializer_values(QONNX_MLP).values())
    monkeypatch.setattr(model_io, "PROTO_LIMIT_BYTES", largest)
    result = a2q("verify", external, "--acc-bits", "16", "--data", tmp_path / "x.npz")
    assert result.returncode == 1
    assert "--data simulation cannot run it" in " ".join(result.stderr.split())


def test_in_place_rewrite_keeps_one_data_file(tmp_path, a2q):
    out = tmp_path / "out.onnx"
    assert a2q("project", externalise(QONNX_MLP, tmp_path / "ext"), out, "--acc-bits", "14").returncode == 0
    [first] = model_io.referenced_data_files(out)
    assert a2q("project", out, out, "--acc-bits", "12", "--in-place").returncode == 0
    [second] = model_io.referenced_data_files(out)
    assert second != first and _model_files(tmp_path) == sorted(["ext", "out.onnx", second.name])
    assert a2q("verify", out, "--acc-bits", "12").returncode == 0  # the pair reads back: weights that fit 12 bits


def test_a_model_over_2_gib_is_refused_up_front_by_a_whole_model_command(tmp_path, a2q):
    """A real 2.3 GB weight in a sparse data file (no disk used): refused before anything reads it."""
    n = 24000
    folder = tmp_path / "big"
    folder.mkdir()
    weight = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[n, n],
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * n * n))):
        weight.external_data.add(key=key, value=value)
    with open(folder / "big.bin", "wb") as data:
        data.truncate(4 * n * n)  # a hole: reads as zeros
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])], [weight])
    model = folder / "big.onnx"
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(model))
    result = a2q("lower", model, tmp_path / "out.onnx")
    assert result.returncode == 1
    assert f"{model}: 2.30 GB with its external data" in " ".join(result.stderr.split())
    assert _model_files(tmp_path) == ["big"]


def test_verify_of_a_streamed_decoder_stack_is_the_same_with_the_compiled_kernels(tmp_path, a2q, monkeypatch):
    """bench_llm's QDQ decoder layer (weights in its data file, q/k/v/o behind a Transpose, MLP weights stored as
    columns): `verify --json` prints the same bytes whether the worst-case simulation and the certificate's
    integer check run in numpy or in the compiled kernels large layers get (forced here for every layer), at the
    exact widths (proven) and at one width too narrow for some layers (overflows counted)."""
    from bench.bench_llm import build_decoder_stack

    model = tmp_path / "llama.onnx"
    build_decoder_stack(model, 1, hidden=64, mlp=96, heads=4, seq=2)
    report = json.loads(a2q("analyze", model, "--json").stdout)
    exact = {layer["node"]: layer["bounds"]["exact"] for layer in report["layers"]}
    (tmp_path / "exact.json").write_text(json.dumps(exact))
    narrow = min(exact.values())
    outputs = {}
    for path in ("numpy", "kernels"):
        if path == "kernels":
            monkeypatch.setattr("a2q_passes.verification._ADVERSARIAL_KERNEL_TERMS", 0)
            monkeypatch.setattr("a2q_passes.certificate.execution._KERNEL_VALUES", 0)
        outputs[path] = [a2q("verify", model, "--widths-json", tmp_path / "exact.json", "--json"),
                         a2q("verify", model, "--acc-bits", narrow, "--json")]
    assert [(r.returncode, r.stdout) for r in outputs["kernels"]] == [(r.returncode, r.stdout) for r in outputs["numpy"]]
    proven, failed = (json.loads(r.stdout) for r in outputs["numpy"])
    assert proven["overflow_impossible"] and outputs["numpy"][1].returncode == 3
    assert any(v["adversarial_register_overflows"] for v in failed["layers"])
    assert any(v["proof"] == "pass" for v in failed["layers"])
