"""Nearest-neighbour upsampling as FINN lowers it.

``nn.Upsample(scale_factor=k, mode="nearest")`` exports as a ``Resize`` (``Upsample`` before opset 10). FINN has a
HW layer for it (``UpsampleNearestNeighbour``, inferred by ``InferUpsample`` from an NHWC integer input), but its
builder leaves such a node a float one: streamlining keeps the ``Resize`` between two ``Transpose`` nodes (NCHW),
and ``step_convert_to_hw`` runs ``InferUpsample`` only where the graph holds an ``Upsample`` node. The lowering
flow (:mod:`a2q_passes.finn_flow`) and the build step ``step_a2q_upsampling`` both run
:func:`upsampling_as_hw_layers` once streamlining is done, right before ``step_convert_to_hw``: FINN's own
``MakeScaleResizeNHWC`` moves the layout change past the ``Resize`` (its scales reordered), the two transposes
that meet cancel, and ``InferUpsample`` makes the HW layer. What FINN's transformations leave as it was (another
mode, scales below 1) stays a float node and is reported as not lowered.
"""

from __future__ import annotations

from qonnx.core.modelwrapper import ModelWrapper

UPSAMPLING_OPS = ("Resize", "Upsample")


def upsampling_as_hw_layers(model: ModelWrapper) -> ModelWrapper:
    """``model`` with each NCHW ``Resize``/``Upsample`` between transposes made an NHWC
    ``UpsampleNearestNeighbour``; a model without one is returned as it is."""
    if not any(model.get_nodes_by_op_type(op) for op in UPSAMPLING_OPS):
        return model
    from qonnx.transformation.infer_data_layouts import InferDataLayouts

    from finn.transformation.fpgadataflow.convert_to_hw.upsample import InferUpsample
    from finn.transformation.streamline.absorb import AbsorbConsecutiveTransposes
    from finn.transformation.streamline.reorder import MakeScaleResizeNHWC

    for transformation in (InferDataLayouts(), MakeScaleResizeNHWC(), AbsorbConsecutiveTransposes(),
                           InferDataLayouts(), InferUpsample()):
        model = model.transform(transformation)
    return model
