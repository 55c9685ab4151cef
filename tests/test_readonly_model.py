"""``ReadOnlyModel`` answers every lookup as qonnx's scanning ``ModelWrapper`` does; ``with_inferred_shapes`` as ``InferShapes``."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.layers import computed_from_constants
from a2q_passes.model_io import load_model
from a2q_passes.read_only_model import ReadOnlyModel, with_inferred_shapes
from a2q_passes.tensor_store import initializer_proto
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
        assert view.get_tensor_datatype(name) == model.get_tensor_datatype(name), name


def test_datatypes_match_qonnx_on_annotated_activations(llm_stack):
    """Annotated activations (with and without ValueInfo), a float16 ValueInfo and an annotation without a type."""
    model = load_model(llm_stack)
    activations = [name for node in model.graph.node for name in node.output]
    for name in activations[::3]:
        model.set_tensor_datatype(name, DataType["INT4"])
    model.graph.quantization_annotation.add(tensor_name=activations[1])  # no finn_datatype entry
    model.graph.value_info.append(helper.make_tensor_value_info(activations[4], TensorProto.FLOAT16, None))
    model.graph.value_info.append(helper.make_tensor_value_info(activations[3], TensorProto.FLOAT, None))
    view = ReadOnlyModel(model.model)
    for name in _names(model):
        assert view.get_tensor_datatype(name) == model.get_tensor_datatype(name), name
    assert view.get_tensor_datatype(activations[0]) == DataType["INT4"]
    assert view.get_tensor_datatype(activations[3]) == DataType["INT4"]  # the annotation, not the ValueInfo
    assert view.get_tensor_datatype(activations[4]) == DataType["FLOAT16"]


def _reaches_graph_input(model: ModelWrapper, tensor: str) -> bool:
    """Brute force: walk back from ``tensor`` through every producer; a named tensor with neither a producer nor an
    initializer is a graph input."""
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name and name not in seen:
            seen.add(name)
            producer = model.find_producer(name)
            if producer is None and initializer_proto(model, name) is None:
                return True
            stack.extend(producer.input if producer is not None else [])
    return False


@pytest.mark.parametrize("path", [*MODELS, "llm"], ids=lambda p: Path(p).stem)
def test_shared_constant_answers_match_a_fresh_walk(path, llm_stack):
    """``computed_from_constants`` with answers shared across calls (as ``find_mac_layers`` asks) and alone."""
    model = ReadOnlyModel(load_model(llm_stack if path == "llm" else path).model)
    known: dict[str, bool] = {}
    names = _names(model)
    for name in names[::-1] + names:  # later tensors first: their walks leave answers for the earlier ones
        assert computed_from_constants(model, name, known) == computed_from_constants(model, name), name
        assert computed_from_constants(model, name) == (not _reaches_graph_input(model, name)), name


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
