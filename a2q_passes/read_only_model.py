"""A read-only view of a wrapped model with lookup tables, and shape inference into one."""

from __future__ import annotations

import onnx
from onnx import helper
from onnx.external_data_helper import uses_external_data
from qonnx.core.datatype import BaseDataType, DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_by_name


class ReadOnlyModel(ModelWrapper):
    """A wrapped model for reading only: producers, initializers and ValueInfo shapes come from dicts built once.

    qonnx's ``find_producer``, ``get_tensor_shape`` and :func:`a2q_passes.tensor_store.initializer_proto` scan the whole
    graph on every lookup: an analysis that looks up every layer's tensors is then quadratic in the graph's
    size (seconds for a 12-layer transformer, minutes for 32). Each lookup here answers what the scan would
    (the first producer, the first initializer of a name; a name described twice is left to qonnx, which
    refuses it). Nothing may change the graph while the view is in use: it is built for one analysis.
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__(proto, fix_missing_initializer_valueinfo=False)  # the proto was wrapped (and fixed) before
        graph = proto.graph
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.output:
                self.producers.setdefault(name, node)
        self.initializers: dict[str, onnx.TensorProto] = {}
        for tensor in graph.initializer:
            self.initializers.setdefault(tensor.name, tensor)
        infos = [*graph.input, *graph.output, *graph.value_info]
        self.infos = {info.name: info for info in infos}
        self.described_twice = len(self.infos) != len(infos)
        self.named: dict[str, onnx.NodeProto] = {}  # by name, or first output where unnamed, as reports name layers
        for node in graph.node:
            self.named.setdefault(node.name or node.output[0], node)
        self.annotations = {a.tensor_name: a for a in graph.quantization_annotation}
        self.annotated_twice = len(self.annotations) != len(graph.quantization_annotation)

    def find_producer(self, tensor_name: str) -> onnx.NodeProto | None:
        return self.producers.get(tensor_name)

    def get_tensor_shape(self, tensor_name: str, fix_missing_init_shape: bool = False) -> list[int] | None:
        info = self.infos.get(tensor_name)
        if info is None and tensor_name not in self.initializers and not self.described_twice:
            return None
        if info is None or fix_missing_init_shape or self.described_twice:
            return super().get_tensor_shape(tensor_name, fix_missing_init_shape)
        return [dim.dim_value for dim in info.type.tensor_type.shape.dim]

    def get_tensor_datatype(self, tensor_name: str) -> BaseDataType:
        """qonnx's answer (its annotation, else FLOAT16 or FLOAT32 from the ValueInfo) from the tables; qonnx's own
        where it would read an initializer or refuse a name described twice."""
        info = self.infos.get(tensor_name)
        if self.annotated_twice or self.described_twice or (info is None and tensor_name in self.initializers):
            return super().get_tensor_datatype(tensor_name)
        annotation = self.annotations.get(tensor_name)
        entry = None if annotation is None else get_by_name(annotation.quant_parameter_tensor_names,
                                                             "finn_datatype", "key")
        if entry is not None:
            return DataType[entry.value]
        float16 = info is not None and info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        return DataType["FLOAT16" if float16 else "FLOAT32"]


def with_inferred_shapes(model: ModelWrapper) -> ReadOnlyModel:
    """A read-only copy of ``model`` with ONNX shape inference's ValueInfo for every tensor it can shape.

    qonnx's ``InferShapes`` (which first swaps qonnx/FINN custom ops for shape-compatible standard ones)
    runs only where the graph has such ops: it wraps its result in a ``ModelWrapper``, whose set-up looks up
    every tensor in a fresh list of all ValueInfos (quadratic in the graph). Without custom ops its swap
    does nothing, and ONNX's inference on the graph is the whole of it.
    """
    from qonnx.custom_op.registry import is_custom_op

    if any(is_custom_op(node.domain) for node in model.graph.node):
        from qonnx.transformation.infer_shapes import InferShapes

        copy = ModelWrapper(model.model.SerializeToString(), fix_missing_initializer_valueinfo=False)
        return ReadOnlyModel(copy.transform(InferShapes(), cleanup=False).model)
    inferred = onnx.shape_inference.infer_shapes(model.model)
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        _add_onnxruntime_shapes(inferred)
    return ReadOnlyModel(inferred)


def _add_onnxruntime_shapes(proto: onnx.ModelProto) -> None:
    """Add the ValueInfo onnxruntime infers for the tensors ONNX's inference left untyped, in place.

    ONNX's inference knows no onnxruntime contrib op (com.microsoft QGemm, QLinearAdd, ...), so nothing after
    one gets a shape; onnxruntime types every tensor when it builds a session (no run). Models with tensors
    in external data are left as they are: the session would load all of them.
    """
    graph = proto.graph
    if any(uses_external_data(t) for t in graph.initializer):  # streamed ones included
        return
    known = {vi.name for vi in (*graph.input, *graph.value_info, *graph.output)} | {t.name for t in graph.initializer}
    missing = list(dict.fromkeys(t for node in graph.node for t in node.output if t and t not in known))
    if not missing:
        return
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as it is
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a graph onnxruntime cannot build keeps ONNX's shapes only
        return
    for out in session.get_outputs():
        if out.name in missing and out.type.startswith("tensor(") and out.shape is not None:
            elem = onnx.TensorProto.DataType.Value(out.type[len("tensor("):-1].upper())
            graph.value_info.append(helper.make_tensor_value_info(out.name, elem, out.shape))

