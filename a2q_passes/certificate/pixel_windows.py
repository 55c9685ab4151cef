"""Which inputs of a FINN MVAU can hold a pixel, found by executing the graph's own padding and window nodes.

An MVAU lowered from a ``ConvTranspose`` reads a sliding window over ``FMPadding_Pixel``'s output, whose inserted
zeros add nothing to the accumulator. The certificate does not derive the tap patterns from the nodes' attributes
(the reader does, :mod:`a2q_passes.pixel_padding`): it executes the chain from ``FMPadding_Pixel`` to the MVAU with
qonnx on an input of ones, and every distinct row of what reaches the MVAU is one pattern of inputs that hold a
pixel (the rest hold the inserted or border zeros).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.basic import qonnx_make_model

from a2q_passes.certificate.execution import CannotCertify, node_label

_FINN_DOMAIN = "finn.custom_op.fpgadataflow"
# the nodes between FMPadding_Pixel and the MVAU that only move values (abstract op types)
_CHAIN_OPS = ("FMPadding_Pixel", "FMPadding", "ConvolutionInputGenerator", "Im2Col")


def _abstract(node: NodeProto) -> NodeProto:
    """A copy executable in Python: FINN's ``_hls`` / ``_rtl`` variants execute only in a simulator."""
    copy = NodeProto()
    copy.CopyFrom(node)
    for suffix in ("_hls", "_rtl"):
        if copy.op_type.endswith(suffix):
            copy.op_type, copy.domain = copy.op_type[: -len(suffix)], _FINN_DOMAIN
    return copy


def pixel_masks(model: ModelWrapper, mac: NodeProto) -> np.ndarray | None:
    """``(patterns, K)`` booleans, one row per distinct set of MVAU inputs that hold a pixel, or ``None`` where no
    ``FMPadding_Pixel`` feeds the MVAU through padding and window nodes."""
    chain, tensor = [], mac.input[0]
    while True:
        producer = model.find_producer(tensor)
        if producer is None or _abstract(producer).op_type not in _CHAIN_OPS:
            break
        chain.insert(0, _abstract(producer))
        tensor = producer.input[0]
        if chain[0].op_type == "FMPadding_Pixel":
            break
    if not chain or chain[0].op_type != "FMPadding_Pixel":
        return None
    shapes = {name: model.get_tensor_shape(name) for node in chain for name in (node.input[0], node.output[0])}
    if any(shape is None for shape in shapes.values()):
        raise CannotCertify(f"{node_label(mac)} reads pixel-padded input whose shapes are not annotated")
    values = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()}
    graph = helper.make_graph(chain, "pixel_windows", [values[chain[0].input[0]]], [values[chain[-1].output[0]]],
                              value_info=[v for name, v in values.items()
                                          if name not in (chain[0].input[0], chain[-1].output[0])])
    ones = np.ones(shapes[chain[0].input[0]], dtype=np.float32)
    try:
        out = execute_onnx(ModelWrapper(qonnx_make_model(graph)), {chain[0].input[0]: ones})[chain[-1].output[0]]
    except Exception as err:  # noqa: BLE001 - any failure to execute is a layer the certificate cannot read
        raise CannotCertify(f"{node_label(mac)}: its pixel padding and window nodes did not execute ({err})") from err
    return np.unique(out.reshape(-1, out.shape[-1]) != 0, axis=0)
