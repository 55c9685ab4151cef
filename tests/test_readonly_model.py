"""``ReadOnlyModel`` answers every lookup as qonnx's scanning ``ModelWrapper`` does; ``with_inferred_shapes`` as ``InferShapes``."""

from __future__ import annotations

from pathlib import Path

import pytest
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.model_io import ReadOnlyModel, initializer_proto, load_model, with_inferred_shapes
from bench.bench_llm import build_decoder_stack

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.onnx")) + sorted((ROOT / "tests" / "data").glob("*.onnx"))


@pytest.fixture(scope="module")
def llm_stack(tmp_path_factory) -> Path:
    """Two small decoder layers as onnxruntime's quantizer writes them (activations without ValueInfo)."""
    path = tmp_path_factory.mktemp("llm") / "llm.onnx"
    build_decoder_stack(path, layers=2, hidden=32, mlp=48, heads=4)
    return path


def _names(model: ModelWrapper) -> list[str]:
    graph = model.graph
    return sorted({name for node in graph.node for name in (*node.input, *node.output)}
                  | {t.name for t in graph.initializer} | {"no such tensor"})


@pytest.mark.parametrize("path", [*MODELS, "llm"], ids=lambda p: Path(p).stem)
def test_lookups_match_qonnx(path, llm_stack):
    model = load_model(llm_stack if path == "llm" else path)
    view = ReadOnlyModel(model.model)
    for name in _names(model):
        assert view.find_producer(name) is model.find_producer(name) or (
            view.find_producer(name) == model.find_producer(name)), name
        assert view.get_tensor_shape(name) == model.get_tensor_shape(name), name
        assert initializer_proto(view, name) == initializer_proto(model, name), name


@pytest.mark.parametrize("path", [ROOT / "models" / "digits_cnn_w4a4.onnx", "llm"], ids=lambda p: Path(p).stem)
def test_inferred_shapes_match_qonnx(path, llm_stack):
    """qonnx custom ops (Brevitas' Quant) and standard ops only, each without its activations' ValueInfo."""
    model = load_model(llm_stack if path == "llm" else path)
    constants = {t.name for t in model.graph.initializer}
    kept = [info for info in model.graph.value_info if info.name in constants]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    ours = with_inferred_shapes(model)
    theirs = ModelWrapper(model.model.SerializeToString()).transform(InferShapes(), cleanup=False)
    assert any(theirs.get_tensor_shape(name) is not None and model.get_tensor_shape(name) is None
               for name in _names(model))  # inference had something to add
    for name in _names(model):
        assert ours.get_tensor_shape(name) == theirs.get_tensor_shape(name), name
