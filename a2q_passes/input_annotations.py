"""The ``--input-dtype`` claim written into the model it was made for.

A width ``project``, ``annotate`` or ``finetune`` records for a layer reading a float input holds only on the
integer grid the user declared for that input. The claim is written where FINN and qonnx keep an input's type (the
tensor's qonnx DataType annotation, which FINN's build reads for its first layer and every a2q command reads as
the input's grid), so a later ``verify``, ``lower`` or FINN build of the output checks what was promised without
being told again.
"""

from __future__ import annotations

from collections.abc import Mapping

from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper


def annotate_input_dtypes(model: ModelWrapper, input_dtypes: Mapping[str, str] | None) -> bool:
    """Annotate each tensor of ``input_dtypes`` (``"*"``: every graph input that is not an initializer) with its
    qonnx DataType; whether an annotation changed."""
    if not input_dtypes:
        return False
    graph_inputs = [vi.name for vi in model.graph.input if model.get_initializer(vi.name) is None]
    targets = {name: input_dtypes["*"] for name in graph_inputs} if "*" in input_dtypes else {}
    targets.update({name: dtype for name, dtype in input_dtypes.items() if name != "*"})
    changed = False
    for name, dtype in sorted(targets.items()):
        if model.get_tensor_datatype(name) != DataType[dtype]:
            model.set_tensor_datatype(name, DataType[dtype])
            changed = True
    return changed
