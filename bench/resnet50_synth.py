"""A ResNet-50-sized QONNX layer set (25.5M weights) with the real layer shapes, built without training.

Every conv/fc layer of ResNet-50 gets its own UINT4 activation ``Quant`` (UINT8 for the stem)
and a per-channel INT4 weight ``Quant`` of Kaiming-normal weights, exactly as Brevitas
exports them. Layers read separate graph inputs: the benchmark measures the passes, which
look at each layer's weights and input quantizer, not a forward pass.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

QONNX_DOMAIN = "qonnx.custom_op.general"


def resnet50_layer_shapes() -> list[tuple[str, int, int, int]]:
    """(name, c_in, c_out, kernel) of every conv and the fc layer of ResNet-50."""
    shapes = [("stem", 3, 64, 7)]
    c_in = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            shapes += [(f"{prefix}.conv1", c_in, width, 1), (f"{prefix}.conv2", width, width, 3),
                       (f"{prefix}.conv3", width, 4 * width, 1)]
            if b == 0:
                shapes.append((f"{prefix}.downsample", c_in, 4 * width, 1))
            c_in = 4 * width
    shapes.append(("fc", 2048, 1000, 1))
    return shapes


def _quant(name: str, x: str, scale: str, bits: str, signed: int, narrow: int) -> helper.NodeProto:
    return helper.make_node("Quant", [x, scale, f"{name}_zp", bits], [f"{name}_out"], name=name,
                            domain=QONNX_DOMAIN, signed=signed, narrow=narrow, rounding_mode="ROUND")


def build_resnet50_qonnx(seed: int = 0, weight_bits: int = 4, act_bits: int = 4) -> ModelWrapper:
    rng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs = [], [], [], []
    const = {"zero": 0.0, "wbits": float(weight_bits), "abits": float(act_bits), "bits8": 8.0, "ascale": 0.05}
    for key, value in const.items():
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), key))
    for name, c_in, c_out, k in resnet50_layer_shapes():
        fan_in = c_in * k * k
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in, k, k)).astype(np.float32)
        wmax = (1 << (weight_bits - 1)) - 1
        scale = (np.abs(w).reshape(c_out, -1).max(axis=1) / wmax).astype(np.float32).reshape(c_out, 1, 1, 1)
        inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(scale, f"{name}.wscale")]
        for suffix in ("w", "a"):  # zero points, named <quant node>_zp as _quant expects
            inits.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{name}.q{suffix}_zp"))
        x = f"{name}.x"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c_in, 7, 7]))
        nodes.append(_quant(f"{name}.qa", x, "ascale", "bits8" if name == "stem" else "abits", 0, 0))
        nodes.append(_quant(f"{name}.qw", f"{name}.w", f"{name}.wscale", "wbits", 1, 1))
        out = f"{name}.y"
        nodes.append(helper.make_node("Conv", [f"{name}.qa_out", f"{name}.qw_out"], [out], name=name,
                                      pads=[k // 2] * 4))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, c_out, 7, 7]))
    graph = helper.make_graph(nodes, "resnet50_layers", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)])
    return ModelWrapper(model)


def weight_count(model: ModelWrapper) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.name.endswith(".w"))


def finn_mvau_equivalent(model: ModelWrapper) -> ModelWrapper:
    """The same layers as FINN MVAU nodes (integer weights (MW, MH), UINT4/INT4 datatypes), as FINN lowers them."""
    from a2q_passes.layers import find_mac_layers

    nodes, inits, inputs, outputs = [], [], [], []
    for layer in find_mac_layers(model):
        rows = layer.integer_rows(model)  # (MH, MW)
        mh, mw = rows.shape
        name = layer.node
        inits.append(numpy_helper.from_array(np.ascontiguousarray(rows.T).astype(np.float32), f"{name}.W"))
        inputs.append(helper.make_tensor_value_info(f"{name}.x", TensorProto.FLOAT, [1, mw]))
        outputs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, [1, mh]))
        nodes.append(helper.make_node(
            "MVAU", [f"{name}.x", f"{name}.W"], [f"{name}.y"], name=name, domain="finn.custom_op.fpgadataflow",
            backend="fpgadataflow", MW=mw, MH=mh, SIMD=1, PE=1, inputDataType=layer.input_dtype,
            weightDataType=layer.weight_dtype, outputDataType="INT32", accDataType="INT32", noActivation=1,
            binaryXnorMode=0))
    graph = helper.make_graph(nodes, "resnet50_mvau", inputs, outputs, initializer=inits)
    mvau = ModelWrapper(helper.make_model(graph))
    for node in mvau.graph.node:  # annotate inputs so FINN's datatype inference keeps them integer
        dtype = next(a.s.decode() for a in node.attribute if a.name == "inputDataType")
        mvau.set_tensor_datatype(node.input[0], DataType[dtype])
    return mvau
