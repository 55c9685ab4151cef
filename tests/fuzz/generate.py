"""Random QONNX / FINN-ONNX / QDQ graphs for the soundness fuzzer (hypothesis strategies).

A case is a chain of one or two *blocks*. Each block is

    activation source -> 0..2 grid-preserving ops -> MAC layer (weight quantizer) -> optional bias Add

where the activation source is a qonnx ``Quant`` / ``BipolarQuant``, a QuantizeLinear+DequantizeLinear
pair, an integer-annotated graph input (FINN style), a ``DequantizeLinear`` on an int8 graph input,
or nothing (a float input). The generator records, per MAC layer, what it built: the weight scale
in the MAC node's layout and the activation scale and zero point. The oracle (``oracle.py``) uses
those only to turn *executed* float tensors back into integers; every value it checks comes from
executing the graph with qonnx.

``KNOWN_OPEN`` names constructs that still trigger open reader bugs; a caller can exclude them with
``cases(exclude=...)``. It is a temporary list: each entry goes once its fix is merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 13
ROUNDING_MODES = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")

# Constructs that trigger reader bugs still open when this fuzzer was written (issue 9). Each entry is
# one generator switch; `cases(exclude=KNOWN_OPEN)` leaves it out. Remove entries as fixes land.
KNOWN_OPEN = frozenset({
    "one_bit_signed_weights",      # 1-bit signed weight Quant: qonnx executes it as bipolar (root cause 1)
    "finn_bipolar_weights",        # FINN initializers annotated BIPOLAR: project may write 0s (root cause 1)
    "conv_pads_with_zero_point",   # Conv pads / auto_pad with a non-zero activation zero point (root cause 2)
    "non_integer_bits",            # Quant bit widths like 4.5 or <= 0 (root cause 3)
    "negative_scale",              # negative activation scale, e.g. followed by Relu (root cause 4)
    "relu_after_zero_point",       # Relu after a positive zero point: all-negative channels crash (root cause 5)
    "dq_int8_without_zero_point",  # DequantizeLinear of int8 data without a zero point (root cause 6)
    "unreadable_quantized_layers",  # weight zero point, per-channel activation scale, Gemm transA (root cause 7)
    "subtract_zero_point",         # --zero-point subtract with padded taps (real 0 is code 0, outside the range)
})
ALL_CONSTRUCTS = KNOWN_OPEN


@dataclass
class LayerInfo:
    """What the generator built for one MAC layer (used only to convert executed tensors to integers)."""

    node: str
    op_type: str
    # weight scale broadcastable to the weight tensor as the MAC node consumes it; None: float weights
    weight_scale: np.ndarray | None
    # activation (scale, zero point) shared by every source of the MAC input; None: no single integer grid
    act_scale: float | None
    act_zero_point: int = 0

    @property
    def integer(self) -> bool:
        """Whether this layer has an integer accumulator at all (quantized weights and input grid)."""
        return self.weight_scale is not None and self.act_scale is not None


@dataclass
class Case:
    model: ModelWrapper
    layers: list[LayerInfo]
    zero_point: str = "fold"  # the --zero-point convention the commands are run with
    input_dtypes: list[str] = field(default_factory=list)  # --input-dtype options
    description: list[str] = field(default_factory=list)

    def save(self, stem: Path, note: dict | None = None) -> None:
        """``STEM.onnx`` and ``STEM.json`` (what :meth:`load` needs, plus ``note``)."""
        self.model.save(str(stem.with_suffix(".onnx")))
        layers = [{"node": i.node, "op_type": i.op_type, "act_scale": i.act_scale, "act_zero_point": i.act_zero_point,
                   "weight_scale": None if i.weight_scale is None else i.weight_scale.tolist()} for i in self.layers]
        payload = {"zero_point": self.zero_point, "input_dtypes": self.input_dtypes, "description": self.description,
                   "layers": layers, **(note or {})}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, stem: Path) -> "Case":
        payload = json.loads(stem.with_suffix(".json").read_text())
        layers = [LayerInfo(i["node"], i["op_type"], None if i["weight_scale"] is None else np.asarray(i["weight_scale"], np.float32),
                            i["act_scale"], i["act_zero_point"]) for i in payload["layers"]]
        return cls(ModelWrapper(str(stem.with_suffix(".onnx"))), layers, payload["zero_point"], payload["input_dtypes"],
                   payload["description"])


class _Builder:
    """Accumulates nodes, initializers and graph inputs; tracks each tensor's shape."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.inputs: list = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.datatypes: dict[str, str] = {}
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, value) -> str:
        name = self.name(prefix)
        self.inits[name] = np.asarray(value)
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], domain: str = "", **attrs) -> str:
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), domain=domain, **attrs))
        self.shapes[out] = tuple(int(d) for d in shape)
        return out

    def elem_type(self, node) -> int:
        """QuantizeLinear outputs its zero point's type (uint8 without one); everything else here is float."""
        if node.op_type != "QuantizeLinear":
            return TensorProto.FLOAT
        zp = self.inits.get(node.input[2]) if len(node.input) > 2 else None
        return TensorProto.INT8 if zp is not None and zp.dtype == np.int8 else TensorProto.UINT8

    def graph_input(self, shape: tuple[int, ...], elem_type: int = TensorProto.FLOAT) -> str:
        name = self.name("in")
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        self.shapes[name] = tuple(int(d) for d in shape)
        return name


# --------------------------------------------------------------------------- activation sources


@st.composite
def act_specs(draw, allowed: frozenset[str], first: bool) -> dict:
    kinds = ["quant"] * 6 + ["bipolar", "qdq"] + (["int_input"] * 2 if first else []) + ["float"]
    if first and "dq_int8_without_zero_point" in allowed:
        kinds.append("dq_int8_input")
    kind = draw(st.sampled_from(kinds))
    spec = {"kind": kind}
    if kind == "quant":
        bits = draw(st.integers(1, 8))
        if "non_integer_bits" in allowed and draw(st.integers(0, 9)) == 0:
            bits = bits + 0.5
        signed = draw(st.booleans())
        zmax = 2 ** int(bits)
        spec.update(bits=bits, signed=signed, narrow=draw(st.booleans()), rounding=draw(st.sampled_from(ROUNDING_MODES)),
                    scale=draw(st.sampled_from([0.5, 0.25, 1.0, 0.125, 2.0, 0.1])),
                    zero_point=draw(st.integers(-zmax, zmax)) if draw(st.integers(0, 2)) == 0 else 0)
        if "negative_scale" in allowed and draw(st.integers(0, 7)) == 0:
            spec["scale"] = -spec["scale"]
        spec["per_channel"] = "unreadable_quantized_layers" in allowed and draw(st.integers(0, 9)) == 0
    elif kind == "bipolar":
        spec["scale"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    elif kind == "qdq":
        dtype = draw(st.sampled_from(["uint8", "int8"]))
        info = np.iinfo(dtype)
        spec.update(dtype=dtype, scale=draw(st.sampled_from([0.5, 0.25, 0.1])),
                    zero_point=draw(st.integers(int(info.min), int(info.max))) if draw(st.booleans()) else 0,
                    explicit_zero_point=draw(st.booleans()) or dtype == "int8")
    elif kind == "int_input":
        spec["dtype"] = draw(st.sampled_from(["UINT2", "UINT4", "UINT8", "INT2", "INT4", "INT8", "BIPOLAR", "BINARY"]))
        spec["cli"] = draw(st.booleans())  # declare with --input-dtype instead of a datatype annotation
    elif kind == "dq_int8_input":
        spec["scale"] = draw(st.sampled_from([0.5, 0.25]))
    return spec


def _apply_source(b: _Builder, spec: dict, x: str, case: Case) -> tuple[str, float | None, int]:
    """Quantize the float tensor ``x`` (or a fresh graph input); returns (tensor, act scale, zero point)."""
    shape = b.shapes[x]
    kind = spec["kind"]
    if kind == "quant":
        channels = shape[1]
        scale = spec["scale"]
        if spec["per_channel"]:
            sshape = [1, channels] + [1] * (len(shape) - 2)
            svalue = (np.abs(scale) * (1.0 + 0.5 * np.arange(channels))).astype(np.float32).reshape(sshape)
        else:
            svalue = np.float32(scale)
        out = b.node("Quant", [x, b.const("s", svalue), b.const("z", np.float32(spec["zero_point"])),
                               b.const("bits", np.float32(spec["bits"]))], shape, domain=QONNX_DOMAIN,
                     signed=int(spec["signed"]), narrow=int(spec["narrow"]), rounding_mode=spec["rounding"])
        return out, (None if spec["per_channel"] else float(scale)), int(spec["zero_point"])
    if kind == "bipolar":
        return b.node("BipolarQuant", [x, b.const("s", np.float32(spec["scale"]))], shape, domain=QONNX_DOMAIN), spec["scale"], 0
    if kind == "qdq":
        zp = np.array(spec["zero_point"], dtype=spec["dtype"])
        s = b.const("s", np.float32(spec["scale"]))
        zname = b.const("zp", zp) if spec["explicit_zero_point"] else None
        q = b.node("QuantizeLinear", [x, s] + ([zname] if zname else []), shape)
        return b.node("DequantizeLinear", [q, s] + ([zname] if zname else []), shape), spec["scale"], int(zp) if zname else 0
    if kind == "float":
        return x, None, 0
    raise ValueError(kind)


def _fresh_source(b: _Builder, spec: dict, shape: tuple[int, ...], case: Case) -> tuple[str, float | None, int]:
    """A graph input feeding the first block (or a Concat branch), quantized per ``spec``."""
    if spec["kind"] == "int_input":
        x = b.graph_input(shape)
        if spec["cli"]:
            case.input_dtypes.append(f"{x}={spec['dtype']}")
        else:
            b.datatypes[x] = spec["dtype"]
        return x, 1.0, 0
    if spec["kind"] == "dq_int8_input":
        x = b.graph_input(shape, TensorProto.INT8)
        return b.node("DequantizeLinear", [x, b.const("s", np.float32(spec["scale"]))], shape), spec["scale"], 0
    return _apply_source(b, spec, b.graph_input(shape), case)


# --------------------------------------------------------------------------- between ops


@st.composite
def between_ops(draw, rank: int) -> list[str]:
    options = ["relu", "concat", "reshape"] + (["maxpool", "pad", "transpose"] if rank == 4 else [])
    return draw(st.lists(st.sampled_from(options), max_size=2))


def _apply_between(draw, b: _Builder, op: str, x: str, grid: tuple, src_spec: dict, case: Case, allowed) -> tuple[str, tuple]:
    shape = b.shapes[x]
    if op == "relu":
        return b.node("Relu", [x], shape), grid
    if op == "maxpool":
        k = draw(st.integers(1, min(2, shape[2], shape[3])))
        s = draw(st.integers(1, 2))
        out = ((shape[2] - k) // s + 1, (shape[3] - k) // s + 1)
        return b.node("MaxPool", [x], shape[:2] + out, kernel_shape=[k, k], strides=[s, s]), grid
    if op == "pad":
        p = draw(st.lists(st.integers(0, 1), min_size=4, max_size=4))
        pads = b.const("pads", np.array([0, 0, p[0], p[1], 0, 0, p[2], p[3]], dtype=np.int64))
        out_shape = (shape[0], shape[1], shape[2] + p[0] + p[2], shape[3] + p[1] + p[3])
        return b.node("Pad", [x, pads], out_shape, mode="constant"), grid
    if op == "transpose":
        return b.node("Transpose", [x], (shape[0], shape[1], shape[3], shape[2]), perm=[0, 1, 3, 2]), grid
    if op == "reshape":
        new = (0, shape[1], shape[3], shape[2]) if len(shape) == 4 else (0, -1)
        return b.node("Reshape", [x, b.const("shape", np.array(new, dtype=np.int64))],
                      shape if len(shape) == 2 else (shape[0], shape[1], shape[3], shape[2])), grid
    if op == "concat":
        # a second branch: a fresh graph input quantized like the first (or, sometimes, differently)
        same = draw(st.integers(0, 3)) > 0
        spec = src_spec if same or src_spec["kind"] in ("int_input", "dq_int8_input") else draw(act_specs(allowed, False))
        if spec["kind"] in ("int_input", "dq_int8_input") and not same:
            spec = src_spec
        branch_shape = (shape[0], draw(st.integers(1, 2))) + tuple(shape[2:])
        other, s2, z2 = _fresh_source(b, spec, branch_shape, case)
        # the branch went through the same kind of source, but its between-ops differ; the grid is shared
        # only if scale and zero point agree
        new_grid = grid if (s2 == grid[0] and z2 == grid[1]) else (None, 0)
        out_shape = (shape[0], shape[1] + branch_shape[1]) + tuple(shape[2:])
        return b.node("Concat", [x, other], out_shape, axis=1), new_grid
    raise ValueError(op)


# --------------------------------------------------------------------------- weights


@st.composite
def weight_specs(draw, allowed: frozenset[str]) -> dict:
    kind = draw(st.sampled_from(["quant"] * 5 + ["bipolar", "finn", "finn", "dq", "qdq", "float"]))
    spec = {"kind": kind, "per_channel": draw(st.booleans()), "transposed": draw(st.integers(0, 4)) == 0}
    if kind == "quant":
        signed = draw(st.integers(0, 5)) > 0
        bits = draw(st.integers(1 if "one_bit_signed_weights" in allowed or not signed else 2, 8))
        if "non_integer_bits" in allowed and draw(st.integers(0, 9)) == 0:
            bits = draw(st.sampled_from([bits + 0.5, 0, -1]))
        spec.update(bits=bits, signed=signed, narrow=draw(st.booleans()),
                    rounding=draw(st.sampled_from(ROUNDING_MODES)),
                    zero_point=1 if "unreadable_quantized_layers" in allowed and draw(st.integers(0, 14)) == 0 else 0)
    elif kind == "finn":
        spec["dtype"] = draw(st.sampled_from(["INT2", "INT4", "INT8", "TERNARY", "UINT3", "BINARY"]
                                             + (["BIPOLAR"] if "finn_bipolar_weights" in allowed else [])))
    elif kind == "dq":
        spec["explicit_zero_point"] = draw(st.booleans())
    return spec


def _weight(draw, b: _Builder, spec: dict, shape: tuple[int, ...], channel_axis: int) -> tuple[str, np.ndarray | None]:
    """A weight tensor of ``shape`` (as the MAC consumes it) and its scale broadcastable to that shape."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale_shape = [1] * len(shape)
    scale_shape[channel_axis] = shape[channel_axis]
    if spec["per_channel"]:
        scale = rng.choice([0.5, 0.25, 0.125, 1.0, 0.0625], size=scale_shape).astype(np.float32)
    else:
        scale = np.full([1] * len(shape), rng.choice([0.5, 0.25, 0.125]), dtype=np.float32)
    kind = spec["kind"]
    # stored in the transposed layout when the weight path has a Transpose (perm reverses the axes)
    perm = list(range(len(shape)))[::-1] if spec["transposed"] else None
    store_shape = tuple(np.array(shape)[perm]) if perm else shape

    def stored(v: np.ndarray) -> np.ndarray:
        return np.transpose(v, perm) if perm else v

    def maybe_transpose(t: str) -> str:
        return b.node("Transpose", [t], shape, perm=perm) if perm else t

    if kind == "float":
        return b.const("w", (rng.normal(size=shape) * 0.3).astype(np.float32)), None
    if kind == "finn":
        dt = DataType[spec["dtype"]]
        values = rng.integers(int(dt.min()), int(dt.max()) + 1, size=shape).astype(np.float32)
        if spec["dtype"] == "BIPOLAR":
            values = np.where(values >= 0, 1.0, -1.0).astype(np.float32)
        name = b.const("w", values)
        b.datatypes[name] = spec["dtype"]
        return name, np.ones([1] * len(shape), dtype=np.float32)
    if kind == "bipolar":
        w = rng.normal(size=store_shape).astype(np.float32)
        t = b.node("BipolarQuant", [b.const("w", w), b.const("ws", stored(scale))], store_shape, domain=QONNX_DOMAIN)
        return maybe_transpose(t), scale
    if kind == "quant":
        bits = spec["bits"]
        span = 2 ** max(float(bits), 1.0)
        w = (rng.uniform(-0.7, 0.7, size=store_shape) * span * stored(scale)).astype(np.float32)
        zp = np.float32(spec["zero_point"])
        t = b.node("Quant", [b.const("w", w), b.const("ws", stored(scale)), b.const("wz", zp), b.const("wbits", np.float32(bits))],
                   store_shape, domain=QONNX_DOMAIN, signed=int(spec["signed"]), narrow=int(spec["narrow"]),
                   rounding_mode=spec["rounding"])
        return maybe_transpose(t), scale
    # QDQ weights: per-axis parameters are 1-D along the channel axis of the stored tensor
    axis = perm.index(channel_axis) if perm else channel_axis
    s1d = scale.reshape(-1) if spec["per_channel"] else np.float32(scale.reshape(-1)[0])
    if kind == "dq":
        q = rng.integers(-127, 128, size=store_shape).astype(np.int8)
        zp = [b.const("wzp", np.zeros(np.shape(s1d), dtype=np.int8))] if spec["explicit_zero_point"] else []
        t = b.node("DequantizeLinear", [b.const("wq", q), b.const("ws", s1d)] + zp, store_shape, axis=axis)
        return maybe_transpose(t), scale
    w = (rng.uniform(-100, 100, size=store_shape) * stored(scale)).astype(np.float32)
    zp = b.const("wzp", np.zeros(np.shape(s1d), dtype=np.int8))
    s = b.const("ws", s1d)
    q = b.node("QuantizeLinear", [b.const("w", w), s, zp], store_shape, axis=axis)
    return maybe_transpose(b.node("DequantizeLinear", [q, s, zp], store_shape, axis=axis)), scale


# --------------------------------------------------------------------------- MAC layers


def _conv_out(n: int, k: int, s: int, d: int, pads: tuple[int, int], auto_pad: str) -> int:
    dk = (k - 1) * d + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-n // s)
    if auto_pad == "VALID":
        return (n - dk) // s + 1
    return (n + pads[0] + pads[1] - dk) // s + 1


@st.composite
def _mac(draw, b: _Builder, x: str, allowed: frozenset[str], grid_zero: int, case: Case) -> tuple[str, str, np.ndarray | None]:
    """Append a MAC node reading ``x``; returns (output, node name, weight scale)."""
    shape = b.shapes[x]
    wspec = draw(weight_specs(allowed))
    if len(shape) == 4:
        op = draw(st.sampled_from(["Conv", "Conv", "Conv", "ConvTranspose"]))
        c_in = shape[1]
        groups = draw(st.sampled_from([g for g in (1, 2, c_in) if c_in % g == 0]))
        c_out = groups * draw(st.integers(1, 2))
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        d = draw(st.integers(1, 2))
        if op == "Conv":
            allow_pads = grid_zero == 0 or "conv_pads_with_zero_point" in allowed
            auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID"] + (["SAME_UPPER", "SAME_LOWER"] if allow_pads else [])))
            pads = [draw(st.integers(0, min(2, k - 1))) if allow_pads and auto_pad == "NOTSET" else 0 for _ in range(4)]
            if auto_pad.startswith("SAME"):
                d = 1  # onnxruntime does not implement dilated SAME padding
            dk = (k - 1) * d + 1
            if min(shape[2] + pads[0] + pads[2], shape[3] + pads[1] + pads[3]) < dk:
                k, d, dk = 1, 1, 1
            out_h = _conv_out(shape[2], k, s, d, (pads[0], pads[2]), auto_pad)
            out_w = _conv_out(shape[3], k, s, d, (pads[1], pads[3]), auto_pad)
            wshape = (c_out, c_in // groups, k, k)
            attrs = dict(kernel_shape=[k, k], strides=[s, s], dilations=[d, d], group=groups)
            attrs.update(auto_pad=auto_pad) if auto_pad != "NOTSET" else attrs.update(pads=pads)
            w, scale = _weight(draw, b, wspec, wshape, 0)
            out = b.node("Conv", [x, w], (shape[0], c_out, out_h, out_w), **attrs)
        else:
            pads = [draw(st.integers(0, max(0, (k - 1) * d // 2))) for _ in range(4)]
            out_hw = [s * (shape[i] - 1) + (k - 1) * d + 1 - pads[i - 2] - pads[i] for i in (2, 3)]
            if min(out_hw) < 1:
                pads = [0, 0, 0, 0]
                out_hw = [s * (shape[i] - 1) + (k - 1) * d + 1 for i in (2, 3)]
            wshape = (c_in, c_out // groups, k, k)
            w, scale = _weight(draw, b, wspec, wshape, 1)
            out = b.node("ConvTranspose", [x, w], (shape[0], c_out) + tuple(out_hw), kernel_shape=[k, k],
                         strides=[s, s], dilations=[d, d], group=groups, pads=pads)
        return out, b.nodes[-1].name, scale
    K, n = shape[1], draw(st.integers(1, 4))
    op = draw(st.sampled_from(["Gemm", "Gemm", "MatMul"]))
    if op == "MatMul":
        w, scale = _weight(draw, b, wspec, (K, n), 1)
        out = b.node("MatMul", [x, w], (shape[0], n))
        return out, b.nodes[-1].name, scale
    trans_b = draw(st.booleans())
    trans_a = "unreadable_quantized_layers" in allowed and draw(st.integers(0, 7)) == 0
    w, scale = _weight(draw, b, wspec, (n, K) if trans_b else (K, n), 0 if trans_b else 1)
    a = b.node("Transpose", [x], (K, shape[0]), perm=[1, 0]) if trans_a else x
    out = b.node("Gemm", [a, w], (shape[0], n), transA=int(trans_a), transB=int(trans_b))
    return out, b.nodes[-1].name, scale


# --------------------------------------------------------------------------- whole cases


@st.composite
def cases(draw, exclude: frozenset[str] = frozenset()) -> Case:
    """A random model with one or two MAC blocks (see the module docstring)."""
    allowed = ALL_CONSTRUCTS - frozenset(exclude)
    b = _Builder()
    case = Case(None, [])
    case.zero_point = "subtract" if "subtract_zero_point" in allowed and draw(st.integers(0, 5)) == 0 else "fold"
    blocks = draw(st.integers(1, 2))
    if draw(st.booleans()):
        shape = (1, draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    else:
        shape = (1, draw(st.integers(1, 10)))
    x = None
    for i in range(blocks):
        spec = draw(act_specs(allowed, first=i == 0))
        if spec["kind"] in ("int_input", "dq_int8_input"):
            src, s, z = _fresh_source(b, spec, shape, case)
        else:
            src, s, z = _apply_source(b, spec, x if x is not None else b.graph_input(shape), case)
        grid = (s, z)
        ops = draw(between_ops(len(b.shapes[src])))
        if i == blocks - 1 and len(b.shapes[src]) == 4 and draw(st.integers(0, 2)) == 0:
            ops.append("flatten")
        t = src
        if grid[1] > 0 and "relu_after_zero_point" not in allowed:
            ops = [op for op in ops if op != "relu"]
        for op in ops:
            if op == "flatten":
                t = b.node("Flatten", [t], (b.shapes[t][0], int(np.prod(b.shapes[t][1:]))), axis=1)
                continue
            t, grid = _apply_between(draw, b, op, t, grid, spec, case, allowed)
        zero = grid[1]
        out, node, wscale = draw(_mac(b, t, allowed, zero, case))
        layer = LayerInfo(node, b.nodes[-1].op_type, wscale, grid[0], grid[1])
        case.layers.append(layer)
        if draw(st.booleans()):
            bshape = [1, b.shapes[out][1]] + [1] * (len(b.shapes[out]) - 2)
            out = b.node("Add", [out, b.const("bias", np.full(bshape, 0.375, dtype=np.float32))], b.shapes[out])
        x, shape = out, b.shapes[out]
        case.description.append(f"block {i}: source {spec}, ops {ops}, {layer.op_type} {node}")
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(b.shapes[x]))]
    inputs = {vi.name for vi in b.inputs}
    # the tracked shapes (qonnx's InferShapes would draw random names inside the strategy)
    value_info = [helper.make_tensor_value_info(n.output[0], b.elem_type(n), list(b.shapes[n.output[0]]))
                  for n in b.nodes if n.output[0] != x and n.output[0] not in inputs]
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, outputs, value_info=value_info,
                              initializer=[numpy_helper.from_array(v, k) for k, v in b.inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)],
                              producer_name="a2q-fuzz")
    proto.ir_version = 8
    model = ModelWrapper(proto)
    for name, dtype in b.datatypes.items():
        model.set_tensor_datatype(name, DataType[dtype])
    case.model = model
    return case

