"""Transposed convolutions (``ConvTranspose``) as FINN lowers them: pixel padding, a sliding window and an MVAU.

FINN's builder has no step for a ``ConvTranspose``, but FINN has the parts (finn-plus 1.6.1, used as is):
``MoveScalarMulPastConvTranspose`` moves the input scale behind the layer, and ``InferPixelPaddingDeconv`` makes the
layer ``FMPadding_Pixel`` (``stride - 1`` zeros between input pixels) + ``Im2Col`` + ``MatMul`` with the kernel
turned by 180 degrees, which FINN's ``step_convert_to_hw`` lowers to a sliding window and an MVAU. That MVAU sums
whole kernel rows, of which the inserted zero pixels fill all but one stride phase's taps: the accumulator holds the
sum of one phase, the range a2q sizes a ``ConvTranspose`` for (:mod:`a2q_passes.pixel_padding` reads it so).

``InferPixelPaddingDeconv`` pads the ``Im2Col`` by ``dilation * (kernel - 1) - pads[0]`` on all four sides: right
for a square kernel with equal pads only. :func:`lower_conv_transposes` sets each side from the layer's own
attributes afterwards (begin/end pads per axis, ``output_padding`` at the end), and
:func:`conv_transpose_obstacles` names the layers FINN's transformation cannot take at all. A 1-D ``ConvTranspose``
is made 2-D (kernel ``k x 1``) with the rest of a 1-D graph by :func:`as_two_d`. :func:`streamline_conv_transposes`
runs the whole lowering after FINN's streamlining (``lower``'s flow and the build step ``step_a2q_conv_transposes``).
"""

from __future__ import annotations

from collections.abc import Callable

from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import LoweringError
from a2q_passes.graph_values import node_attr, node_str_attr


def _window_pads(node: NodeProto, weight_shape: list[int]) -> list[int]:
    """The zero padding, ``[begin per axis..., end per axis...]`` (``Im2Col``'s ``pad_amount`` for 2-D), of the
    pixel-padded input that makes the stride-1 convolution with the turned kernel compute this ``ConvTranspose``."""
    kernel = list(node_attr(node, "kernel_shape", None) or weight_shape[2:])
    n = len(kernel)
    dilations = list(node_attr(node, "dilations", [1] * n))
    pads = list(node_attr(node, "pads", [0] * 2 * n))
    extra = list(node_attr(node, "output_padding", [0] * n))
    reach = [d * (k - 1) for k, d in zip(kernel, dilations)]
    return [r - p for r, p in zip(reach, pads[:n])] + [r - p + e for r, p, e in zip(reach, pads[n:], extra)]


def _producers(model: ModelWrapper, tensor: str, count: int) -> list[NodeProto]:
    """The ``count`` nodes that make ``tensor`` through their first inputs, nearest first (fewer at a graph input)."""
    nodes = []
    while len(nodes) < count and (node := model.find_producer(tensor)) is not None:
        nodes.append(node)
        tensor = node.input[0]
    return nodes


def conv_transpose_obstacles(model: ModelWrapper, shaped: ModelWrapper) -> list[str]:
    """Per ``ConvTranspose`` that FINN's pixel-padding lowering cannot compute, ``'name' (why)`` (``shaped``:
    ``model`` with inferred shapes)."""
    from a2q_passes.finn_quant_forms import weight_shape

    found = []
    for node in model.graph.node:
        if node.op_type != "ConvTranspose":
            continue
        shape = weight_shape(model, shaped, node.input[1])
        why = None
        if int(node_attr(node, "group", 1)) != 1:
            why = "grouped; FINN's InferPixelPaddingDeconv lowers only group=1"
        elif shape is None or len(shape) not in (3, 4):
            why = f"{'unknown weight shape' if shape is None else f'{len(shape) - 2}-D'}; FINN's pixel-padding " \
                  "lowering is 1-D and 2-D only"
        elif node_str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            why = "auto_pad SAME_*: give explicit pads"
        elif any(p < 0 for p in _window_pads(node, shape)):
            why = "pads wider than dilation * (kernel - 1), which no zero padding of the pixel-padded input gives"
        if why:
            found.append(f"{node.name or node.output[0]!r} ({why})")
    return found


def refuse_conv_transposes(obstacles: list[str]) -> None:
    """Raise :class:`LoweringError` naming the ``ConvTranspose`` layers of ``obstacles`` (``'name' (why)``), if any."""
    if obstacles:
        raise LoweringError(f"FINN lowers a ConvTranspose as pixel padding, a sliding window and an MVAU "
                            f"(InferPixelPaddingDeconv), which does not compute ConvTranspose {', '.join(obstacles)}. "
                            "Keep the layer out of the FINN part.")


def lower_conv_transposes(model: ModelWrapper) -> ModelWrapper:
    """FINN's ``InferPixelPaddingDeconv`` on a graph whose ``ConvTranspose`` nodes all read integers, with every
    ``Im2Col`` padded as its layer's attributes say (see the module docstring); else ``model`` unchanged (a layer
    with a float input stays, and the lowering report names it)."""
    from finn.transformation.fpgadataflow.infer_pixel_padding_deconv import InferPixelPaddingDeconv

    layers = model.get_nodes_by_op_type("ConvTranspose")
    if not layers or not all(model.get_tensor_datatype(node.input[0]).is_integer() for node in layers):
        return model
    window_pads = {node.output[0]: _window_pads(node, model.get_tensor_shape(node.input[1])) for node in layers}
    model = model.transform(InferPixelPaddingDeconv())  # attributes written out: WindowDefaultAttributes
    for output, pads in window_pads.items():
        # the layer's output tensor is now made by Transpose <- MatMul <- Im2Col (no Im2Col: a 1 x 1 stride-1 kernel)
        made_by = _producers(model, output, 3)
        if [node.op_type for node in made_by] == ["Transpose", "MatMul", "Im2Col"]:
            next(a for a in made_by[2].attribute if a.name == "pad_amount").ints[:] = pads
    return model


def as_two_d(change: Callable[[ModelWrapper], ModelWrapper], model: ModelWrapper) -> ModelWrapper:
    """``change`` (FINN's 1-D ``step_pre_streamline``: qonnx's ``Change3DTo4DTensors``) applied with every 1-D
    ``ConvTranspose`` made 2-D as well.

    ``Change3DTo4DTensors`` leaves a graph holding a ``ConvTranspose`` as it is. Its rewrite of a ``Conv`` (a
    trailing 1 on ``kernel_shape``, ``strides``, ``dilations``, the weights' shape, ``pads`` ``[b, e]`` ->
    ``[b, 0, e, 0]``) is exactly that of a ``ConvTranspose``, whose weights ``[C_in, C_out, k]`` differ only in
    which axis is which, so each ``ConvTranspose`` is presented to it as a ``Conv`` and named back after, with an
    ``output_padding`` of 0 on the new axis.
    """
    deconvs = {node.output[0] for node in model.graph.node if node.op_type == "ConvTranspose"}
    for node in model.graph.node:
        if node.output[0] in deconvs:
            node.op_type = "Conv"
    model = change(model)
    for node in model.graph.node:
        if node.output[0] in deconvs:
            node.op_type = "ConvTranspose"
            extra = next((a for a in node.attribute if a.name == "output_padding"), None)
            if extra is not None and len(extra.ints) == 1:
                extra.ints.append(0)
    return model


def streamline_conv_transposes(model: ModelWrapper) -> ModelWrapper:
    """After FINN's streamlining: each ``ConvTranspose`` made pixel padding, a sliding window and a ``MatMul`` on
    integers, its input scale moved behind it into the thresholds there and the layout ``Transpose`` nodes around it
    absorbed, as FINN's ``step_streamline`` does for a lowered ``Conv`` (FINN's transformations, in that order).
    A model without one is returned as it is."""
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts

    from finn.transformation.streamline import Streamline, absorb
    from finn.transformation.streamline.reorder import MoveScalarMulPastConvTranspose

    layers = model.get_nodes_by_op_type("ConvTranspose")
    if not layers:
        return model
    left = conv_transpose_obstacles(model, model) + [
        f"{node.name or node.output[0]!r} (1-D: FINN's 1-D step_pre_streamline leaves it 1-D; `a2q lower` makes it 2-D)"
        for node in layers if len(model.get_tensor_shape(node.input[1]) or ()) == 3]
    refuse_conv_transposes(left)
    model = model.transform(MoveScalarMulPastConvTranspose()).transform(Streamline())
    model = lower_conv_transposes(model)
    for transformation in (absorb.AbsorbTransposeIntoMultiThreshold(), absorb.AbsorbConsecutiveTransposes(),
                           Streamline(), InferDataLayouts(), RemoveUnusedTensors()):
        model = model.transform(transformation)
    return model
