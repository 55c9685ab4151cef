"""Integer weights as the MAC multiplies them: the graph's own weight path, executed."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds
from a2q_passes.certificate.execution import (LAYOUT_OPS, WEIGHT_QUANTIZERS, CannotCertify, as_integers,
                                              execute_constants, node_attr, node_label)
from a2q_passes.certificate.input_codes import dtype_grid
from a2q_passes.tensor_store import initializer_value


def _scale_input(node: NodeProto) -> str:
    """The input holding the step of a quantizer's output grid."""
    if node.op_type == "Trunc" and len(node.input) >= 6:
        return node.input[4]  # Trunc v2: output_scale
    return node.input[1]


def _block_size(quantizer: NodeProto) -> int:
    """ONNX opset 21: a ``DequantizeLinear`` with ``block_size`` > 0 scales blocks of that many elements along ``axis``."""
    return int(node_attr(quantizer, "block_size", 0) or 0) if quantizer.op_type == "DequantizeLinear" else 0


def _scale_in_rank(quantizer: NodeProto, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The quantizer's scale (or zero point) with the rank of its output ``shape`` and broadcastable to it.

    Keeps the parameter's own size (a per-channel scale stays a vector with unit dims elsewhere) except for a
    block-wise one, whose entry per element along ``axis`` is picked out here.
    """
    scale = np.asarray(scale, dtype=np.float64)
    block = _block_size(quantizer)
    if block:  # element i along axis takes entry i // block_size (the ONNX definition of blocked quantization)
        axis = int(node_attr(quantizer, "axis", 1)) % len(shape)
        if scale.ndim != len(shape) or scale.shape[axis] * block < shape[axis]:
            raise CannotCertify(f"the block-wise scale of {node_label(quantizer)} does not cover its output {shape}")
        scale = scale[tuple(np.arange(shape[axis]) // block if d == axis else slice(None) for d in range(len(shape)))]
    elif quantizer.op_type == "DequantizeLinear" and scale.ndim == 1 and scale.size > 1:
        axis = int(node_attr(quantizer, "axis", 1)) % len(shape)
        scale = scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    if scale.ndim < len(shape):  # numpy broadcasting aligns trailing dims: the same values, with the output's rank
        scale = scale.reshape((1,) * (len(shape) - scale.ndim) + scale.shape)
    if scale.ndim > len(shape) or any(n not in (1, d) for n, d in zip(scale.shape, shape)):
        raise CannotCertify(f"the scale of {node_label(quantizer)} does not broadcast to its output {shape}")
    return scale


def _annotated_integers(model: ModelWrapper, source: str, values: np.ndarray) -> np.ndarray:
    """A FINN integer initializer: its values, which must be what its DataType annotation allows."""
    dt = model.get_tensor_datatype(source)
    if not dt.is_integer() or dt.name.startswith("SCALED"):
        raise CannotCertify(f"weights '{source}' have no quantizer and no integer DataType annotation")
    q = as_integers(values, f"initializer '{source}' (annotated {dt.name})")
    allowed = {-1, 1} if dt.name == "BIPOLAR" else None
    bad = ~np.isin(q, list(allowed)) if allowed else (q < dt.min()) | (q > dt.max())
    if bad.any():
        raise CannotCertify(f"initializer '{source}' is annotated {dt.name} but holds {int(q[bad].reshape(-1)[0])}")
    return q


def weight_integers(model: ModelWrapper, tensor: str, zero_point: str = "fold") -> np.ndarray:
    """Integer weights as the MAC node consumes them, from executing the graph's own weight path.

    A ``DequantizeLinear`` computes ``(code - z) * scale``: divided by the scale that is ``code - z``,
    what a subtracting MAC multiplies; under ``fold`` the MAC multiplies the raw codes, so ``z`` (sent
    through the same layout ops) is added back.
    """
    return weight_view(model, tensor, zero_point)[0]


def weight_view(model: ModelWrapper, tensor: str, zero_point: str) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`weight_integers` and, for a block-wise ``DequantizeLinear``, each weight's block number in the same
    layout (the block index along its axis, sent through the graph's own layout ops), else ``None``."""
    t = tensor
    producer = model.find_producer(t)
    path = []  # the layout ops (and Clips) from the quantizer's output to the MAC input
    while producer is not None and producer.op_type in (*LAYOUT_OPS, "Clip"):
        path.append(producer.op_type)
        t = producer.input[0]
        producer = model.find_producer(t)
    if producer is None or producer.op_type == "Constant":
        return _annotated_integers(model, t, execute_constants(model, [tensor])[tensor]), None
    rescale, factor_name = None, ""  # a constant factor after a Quant (qonnx's ExtractQuantScaleZeroPt writes one)
    if producer.op_type == "Mul":
        rescale = producer
        producer, factor_name = _rescaled_quant(model, rescale)
    if producer.op_type not in WEIGHT_QUANTIZERS:
        raise CannotCertify(f"weights come from {node_label(producer)}, which is not a weight quantizer")
    scale_name = _scale_input(producer)
    grid_out = (rescale or producer).output[0]  # where the weights lie on the grid: (code - z) * step
    values = execute_constants(model, [tensor, grid_out, scale_name, *([factor_name] if rescale else [])])
    out_shape = values[grid_out].shape
    if grid_out != tensor:  # only its shape is used: a large layer's weights are then held once, not twice
        del values[grid_out]
    grid_step = _scale_in_rank(producer, values[scale_name], out_shape)
    if rescale is not None:
        grid_step = grid_step * _scale_in_rank(rescale, values[factor_name], out_shape)
    if not np.all(np.isfinite(grid_step)) or np.any(grid_step == 0):
        raise CannotCertify(f"{node_label(producer)} has a zero or non-finite scale"
                            + (f" times the factor of {node_label(rescale)}" if rescale is not None else ""))
    # Transpose permutes axes and Identity (and a Clip, passed as one) keeps values: both act on a tensor of the
    # output's rank that broadcasts to it as on the broadcast tensor, so a scale travels in its own shape
    # (a per-channel vector, not one value per weight); Reshape-like ops need every element
    own_shape = all(op in ("Transpose", "Identity", "Clip") for op in path)

    def carried(param: np.ndarray) -> np.ndarray:
        """``param`` (the output's rank, broadcastable to it) through the same layout ops: broadcastable to ``tensor``."""
        if t == tensor:
            return param
        sent = param if own_shape else np.broadcast_to(param, out_shape)
        # float32, what the executed ops take: exact for the float32 scales and the integers (< 2^24) sent here
        return execute_constants(model, [tensor], {grid_out: sent.astype(np.float32)}, clip_as_identity=True)[tensor]

    q = as_integers(values[tensor], f"the executed weights of {node_label(producer)} divided by its scale",
                    divisor=carried(grid_step))
    has_zero = producer.op_type in ("DequantizeLinear", "Quant", "IntQuant") and len(producer.input) > 2 and producer.input[2]
    if zero_point == "fold" and has_zero:
        z = execute_constants(model, [producer.input[2]])[producer.input[2]]
        # the zero point's integers in its own shape, added to every weight it covers
        q = _plus_widened(q, as_integers(carried(_scale_in_rank(producer, z, out_shape)),
                                         f"the weight zero point of {node_label(producer)}"))
    block = _block_size(producer)
    if not block:
        return q, None
    # each weight's scale entry, numbered in the scale tensor's own order (ONNX: index i along axis uses i // block)
    scale_shape = np.shape(values[scale_name])
    axis = int(node_attr(producer, "axis", 1)) % len(scale_shape)
    index = list(np.indices(out_shape))
    index[axis] = index[axis] // block
    number = np.ravel_multi_index(index, scale_shape).astype(np.float64)
    if number.size and number.max() >= 1 << 24:
        raise CannotCertify(f"{node_label(producer)} has more block scales than this check numbers exactly")
    return q, np.rint(carried(number)).astype(np.int64)


def _rescaled_quant(model: ModelWrapper, mul: NodeProto) -> tuple[NodeProto, str]:
    """``(quant, factor)`` for weights ``mul = Quant(...) * factor`` with a constant factor: the products lie on the
    grid of the Quant's step times the factor; any other Mul on the weight path is refused."""
    for data, factor in ((0, 1), (1, 0)):
        quant = model.find_producer(mul.input[data])
        if quant is not None and quant.op_type in ("Quant", "IntQuant") and _is_constant(model, mul.input[factor]):
            return quant, mul.input[factor]
    raise CannotCertify(f"weights come from {node_label(mul)}, which is no constant factor after a weight Quant")


def _is_constant(model: ModelWrapper, name: str) -> bool:
    """Whether ``name`` is an initializer or made by a Constant node (the factors the graph's exporters write)."""
    producer = model.find_producer(name)
    return producer.op_type == "Constant" if producer is not None else model.get_initializer(name) is not None


def _plus_widened(q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``q + z`` (``z`` broadcast to ``q``) in an integer type holding every sum, ``q``'s own where it does."""
    if not np.any(z):  # zero points of 0 (symmetric weights, as onnxruntime writes them): nothing to add
        return q
    lo = int(q.min(initial=0)) + int(z.min(initial=0))
    hi = int(q.max(initial=0)) + int(z.max(initial=0))
    q = q.astype(np.promote_types(q.dtype, bounds.smallest_signed_type(lo, hi)), copy=False)
    q += z  # every sum fits q's type: numpy adds in the wider type and stores each result
    return q


def finn_weights(model: ModelWrapper, node: NodeProto, xnor: bool) -> np.ndarray:
    values = initializer_value(model, node.input[1])
    if values is None:
        raise CannotCertify(f"{node_label(node)} has no weight initializer")
    if xnor:
        q = as_integers(values, f"the weights of {node_label(node)}")
        if not np.isin(q, (0, 1)).all():
            raise CannotCertify(f"{node_label(node)} is in binaryXnorMode but its weights are not 0/1")
        return q
    wdt = dtype_grid(node_attr(node, "weightDataType", ""), f"weightDataType of {node_label(node)}")
    q = as_integers(values, f"the weights of {node_label(node)}")
    bipolar = node_attr(node, "weightDataType", "") == "BIPOLAR"
    if (not np.isin(q, (-1, 1)).all()) if bipolar else (q.min(initial=0) < wdt.lo or q.max(initial=0) > wdt.hi):
        raise CannotCertify(f"the weights of {node_label(node)} leave its weightDataType {node_attr(node, 'weightDataType')}")
    return q
