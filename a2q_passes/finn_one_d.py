"""FINN's 1-D step, as ``a2q lower`` and the FINN build steps both run it.

FINN lowers a 1-D convolution through its custom ``step_pre_streamline``
(``finn.builder.custom_step_library.conv1d``): qonnx's ``Change3DTo4DTensors`` makes every ``[N, C, L]`` tensor
``[N, C, L, 1]``. It changes nothing on a graph holding an op it does not know (a ``ConvTranspose``, which
:func:`a2q_passes.finn_deconv.as_two_d` presents to it as the ``Conv`` it rewrites the same way), extends a
``MaxPool``'s attributes but not its ``dilations``, and only warns where it does not apply: a 1-D convolution it
leaves then stops FINN's streamlining on a bare ``IndexError``. Both faces therefore run it through
:func:`pre_streamline_one_d` and refuse, naming the layers and its reason, what it left 1-D.
"""

from __future__ import annotations

import warnings
from typing import Any

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import LoweringError
from a2q_passes.finn_deconv import as_two_d


def one_d_convs(model: ModelWrapper) -> list[str]:
    """The Conv and ConvTranspose nodes of ``model`` with 1-D (``[O, I, k]``, ``[I, O, k]``) weights."""
    return [node.name for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")
            and len(model.get_tensor_shape(node.input[1]) or ()) == 3]


def pre_streamline_one_d(model: ModelWrapper, cfg: Any) -> tuple[ModelWrapper, list[str]]:
    """FINN's 1-D ``step_pre_streamline`` on a copy of ``model``, every ``ConvTranspose`` made 2-D with it; and the
    reasons ``Change3DTo4DTensors`` gave where it did not apply (its warnings)."""
    from finn.builder.custom_step_library.conv1d import step_pre_streamline

    model = ModelWrapper(model.model.SerializeToString())
    for node in model.get_nodes_by_op_type("MaxPool"):
        # Change3DTo4DTensors extends a MaxPool's kernel_shape, strides and pads but not its dilations, which
        # then no longer match (onnxruntime refuses the node); all ones is the default, so leave them out
        dilations = next((a for a in node.attribute if a.name == "dilations"), None)
        if dilations is not None and all(d == 1 for d in dilations.ints):
            node.attribute.remove(dilations)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = as_two_d(lambda m: step_pre_streamline(m, cfg), model)
    reasons = [" ".join(str(w.message).split()).rstrip(".") for w in caught if "not applied" in str(w.message)]
    return model, reasons


def refuse_one_d_convs_left(model: ModelWrapper, reasons: list[str]) -> None:
    """Raise naming the 1-D convolutions FINN's 1-D step left in ``model`` and why (``reasons``), if any."""
    left = one_d_convs(model)
    if left:
        raise LoweringError(f"FINN lowers a 1-D convolution ({', '.join(left)}) only once qonnx's Change3DTo4DTensors "
                            f"has made its tensors 2-D, which it did not: {' '.join(reasons) or 'no reason given'}. "
                            "Export the model with 2-D layers (kernel k x 1), or keep these layers out of the FINN "
                            "part.")
