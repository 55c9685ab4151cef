"""Random float nets through onnxruntime's quantizer, each file through the corpus' whole check.

    python -m scripts.fuzz_ort --examples 100 [--seed 0] [--allocate] [--save DIR] [--every 10]

The corpus (``scripts/corpus.py``) quantizes four fixed float nets; this draws new ones: a convolutional net (1 to 3
Conv layers of random kernel, stride, padding, dilation and groups, depthwise among them, activations, pooling, a
residual Add where shapes allow, now and then a strided ConvTranspose, then Flatten -> Gemm -> MatMul; files with a
ConvTranspose are read under ``--zero-point subtract``, as a user is told to) or an attention block (projections, the two
products of activations, softmax, an output projection, a residual Add), weights of random spread with a large
channel now and then. Each net goes through ``quantize_static`` (QDQ, QOperator, QDQ in onnxruntime's own
``com.microsoft`` ops) or ``quantize_dynamic`` with drawn weight and activation types, per-channel weights,
``reduce_range`` and QDQ ``extra_options``, then, half of the time, through an ``InferenceSession``'s graph
optimizer (fused and channels-last ops). Every file onnxruntime writes is checked as the corpus checks its files
(:func:`scripts.corpus.check`: each layer's analysed range against the oracle's executed worst case, ``project``,
``verify``, the projected file executed, ``lower`` or a named refusal, ``finetune``, ``verify --data`` against the
executed accumulators; ``--allocate``: ``allocate``'s map proven). A file is handled, refused by name, unchecked
(the oracle cannot read it) or FAILED; exit status 1 when any FAILED.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import scripts.corpus as corpus
from tests.ort_models import optimized, quantize

WEIGHT_TYPES = {"QDQ": ["QInt8", "QInt8", "QUInt8", "QInt4", "QInt16"], "QOperator": ["QInt8", "QUInt8"],
                "dynamic": ["QInt8", "QUInt8"], "QDQ_contrib": ["QInt8", "QInt4", "QInt16"]}
ACT_TYPES = {"QInt8": ["QUInt8", "QInt8"], "QUInt8": ["QUInt8"], "QInt4": ["QUInt4", "QInt4", "QUInt8"],
             "QInt16": ["QUInt16", "QInt16"]}
QDQ_OPTIONS = [{"AddQDQPairToWeight": True}, {"WeightSymmetric": False}, {"ActivationSymmetric": True},
               {"DedicatedQDQPair": True}, {"QDQKeepRemovableActivations": True}, {"QuantizeBias": False},
               {"MatMulConstBOnly": True}, {"OpTypesToExcludeOutputQuantization": ["Conv"]},
               {"QDQDisableWeightAdjustForInt32Bias": True}, {"MinimumRealRange": 0.5},
               {"ActivationRestrictedAsymmetric": True}, {"ForceQuantizeNoInputCheck": True}]


class _Net:
    """A float ONNX graph under construction, with the shape of every tensor."""

    def __init__(self, rng: np.random.Generator, x_shape: list[int]) -> None:
        self.rng, self.nodes, self.inits, self.shapes = rng, [], [], {"x": list(x_shape)}

    def weight(self, name: str, shape: tuple[int, ...], axis: int) -> str:
        w = self.rng.normal(size=shape) * 10.0 ** self.rng.uniform(-1.5, 0.5)
        if self.rng.random() < 0.3:  # one channel far wider than the rest (per-tensor scales then waste codes)
            index = [slice(None)] * len(shape)
            index[axis] = int(self.rng.integers(shape[axis]))
            w[tuple(index)] *= 8
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], shape: list[int], **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}_{len(self.nodes)}", **attrs))
        self.shapes[out] = shape
        return out

    def activation(self, t: str) -> str:
        kind = self.rng.choice(["Relu", "Relu", "none", "Clip"])
        if kind == "none":
            return t
        if kind == "Clip":
            lo, hi = f"lo{len(self.nodes)}", f"hi{len(self.nodes)}"
            self.inits += [numpy_helper.from_array(np.float32(0), lo), numpy_helper.from_array(np.float32(6), hi)]
            return self.node("Clip", [t, lo, hi], self.shapes[t])
        return self.node("Relu", [t], self.shapes[t])


def conv_net(rng: np.random.Generator) -> tuple[_Net, str]:
    channels = int(rng.integers(1, 5))
    size = [int(rng.integers(5, 10)), int(rng.integers(5, 10))]
    net = _Net(rng, [1, channels, *size])
    t = "x"
    for i in range(int(rng.integers(1, 4))):
        c_in, h, w = net.shapes[t][1:]
        depthwise = i > 0 and rng.random() < 0.3
        c_out = c_in if depthwise else int(rng.integers(2, 7))
        group = c_in if depthwise else 1
        k = int(rng.integers(1, 4))
        stride, dilation = int(rng.choice([1, 1, 2])), int(rng.choice([1, 1, 2]))
        pad = int(rng.integers(0, k)) if k > 1 else 0
        span = dilation * (k - 1) + 1
        if h + 2 * pad < span or w + 2 * pad < span:
            continue
        out = [1, c_out, (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1]
        inputs = [t, net.weight(f"W{i}", (c_out, c_in // group, k, k), 0)]
        if rng.random() < 0.7:
            inputs.append(net.weight(f"B{i}", (c_out,), 0))
        y = net.node("Conv", inputs, out, kernel_shape=[k, k], strides=[stride] * 2, dilations=[dilation] * 2,
                     pads=[pad] * 4, group=group)
        if net.shapes[y] == net.shapes[t] and rng.random() < 0.5:  # a residual connection
            y = net.node("Add", [y, t], out)
        t = net.activation(y)
        if rng.random() < 0.2 and min(out[2:]) >= 4:
            t = net.node(str(rng.choice(["MaxPool", "AveragePool"])), [t], [*out[:2], out[2] // 2, out[3] // 2],
                         kernel_shape=[2, 2], strides=[2, 2])
    if rng.random() < 0.2:  # a strided, padded ConvTranspose (weights (C_in, C_out, k, k): per channel along axis 1)
        c_in, h, w = net.shapes[t][1:]
        c_out, k, stride = int(rng.integers(2, 5)), int(rng.integers(1, 4)), int(rng.choice([1, 2]))
        pad, extra = int(rng.integers(0, k)), int(rng.integers(0, stride))
        out = [1, c_out, (h - 1) * stride - 2 * pad + k + extra, (w - 1) * stride - 2 * pad + k + extra]
        if min(out[2:]) >= 1:  # (padding can crop a small input away)
            inputs = [t, net.weight("Wt", (c_in, c_out, k, k), 1)] + (
                [net.weight("Bt", (c_out,), 0)] if rng.random() < 0.7 else [])
            t = net.activation(net.node("ConvTranspose", inputs, out, kernel_shape=[k, k], strides=[stride] * 2,
                                        pads=[pad] * 4, output_padding=[extra] * 2))
    flat = int(np.prod(net.shapes[t][1:]))
    t = net.node("Flatten", [t], [1, flat])
    hidden = int(rng.integers(3, 9))
    trans_b = int(rng.integers(0, 2))
    inputs = [t, net.weight("Wg", (hidden, flat) if trans_b else (flat, hidden), 0 if trans_b else 1)]
    if rng.random() < 0.7:
        inputs.append(net.weight("Bg", (hidden,), 0))
    t = net.activation(net.node("Gemm", inputs, [1, hidden], transB=trans_b))
    classes = int(rng.integers(2, 6))
    return net, net.node("MatMul", [t, net.weight("Wm", (hidden, classes), 1)], [1, classes])


def attention_net(rng: np.random.Generator) -> tuple[_Net, str]:
    tokens, dim = int(rng.integers(2, 8)), int(rng.integers(2, 9))
    net = _Net(rng, [1, tokens, dim])
    q, k, v = (net.node("MatMul", ["x", net.weight(f"W{n}", (dim, dim), 1)], [1, tokens, dim]) for n in "qkv")
    kt = net.node("Transpose", [k], [1, dim, tokens], perm=[0, 2, 1])
    p = net.node("Softmax", [net.node("MatMul", [q, kt], [1, tokens, tokens])], [1, tokens, tokens], axis=-1)
    y = net.node("MatMul", [net.node("MatMul", [p, v], [1, tokens, dim]), net.weight("Wo", (dim, dim), 1)],
                 [1, tokens, dim])
    return net, net.node("Add", [y, "x"], [1, tokens, dim]) if rng.random() < 0.5 else y


def float_net(rng: np.random.Generator, path: Path, opset: int) -> list[int]:
    """A random float net saved to ``path``; returns its input shape."""
    net, out = (attention_net if rng.random() < 0.3 else conv_net)(rng)
    net.nodes[-1].output[0] = "y"
    graph = helper.make_graph(net.nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              net.shapes["x"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, net.shapes[out])], net.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return net.shapes["x"]


def draw_file(rng: np.random.Generator, folder: Path, index: int) -> tuple[corpus.Entry | None, str]:
    """One random net quantized by onnxruntime as drawn (and maybe optimized): its corpus entry, or None and why
    onnxruntime refused."""
    fmt = str(rng.choice(list(WEIGHT_TYPES)))
    weight = str(rng.choice(WEIGHT_TYPES[fmt]))
    act = str(rng.choice(ACT_TYPES[weight]))
    per_channel, reduce_range = bool(rng.random() < 0.5), bool(rng.random() < 0.2)
    extra = dict(rng.choice(QDQ_OPTIONS)) if fmt == "QDQ" and rng.random() < 0.4 else {}
    wide = fmt != "QDQ_contrib" and (weight in ("QInt4", "QInt16") or act not in ("QUInt8", "QInt8"))
    float_path = folder / f"float_{index}.onnx"
    shape = float_net(rng, float_path, 21 if wide else 13)
    name = f"ort{index}_{fmt}_w{weight}" + ("" if fmt == "dynamic" else f"_a{act}") + \
        f"_{'pc' if per_channel else 'pt'}{'_rr' if reduce_range else ''}" + "".join(f"_{k}" for k in extra)
    path = folder / f"{name}.onnx"
    try:
        with corpus._quiet():
            quantize(float_path, path, shape, fmt, weight, act, per_channel, extra_options=extra,
                     seed=index, reduce_range=reduce_range)
    except Exception as err:  # the producer's own limitation, not a file to check
        return None, f"{name}: onnxruntime refused ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    producer = corpus.ORT_FORMATS.get(fmt, fmt)
    if fmt != "QDQ_contrib" and rng.random() < 0.5:
        level = str(rng.choice(["extended", "all"]))
        optimized_path = path.with_name(f"{name}_opt_{level}.onnx")
        try:
            with corpus._quiet():
                optimized(path, optimized_path, level)
        except Exception as err:
            return None, f"{optimized_path.stem}: onnxruntime's optimizer refused ({type(err).__name__})"
        path, producer = optimized_path, corpus.ORT_OPTIMIZED
    # weights with zero points, or a ConvTranspose (its border outputs sum fewer taps): read as a user is told (README)
    deconv = any(n.op_type == "ConvTranspose" for n in onnx.load(str(float_path)).graph.node)
    subtract = weight == "QUInt8" or extra.get("WeightSymmetric") is False or deconv
    return corpus.Entry(path.stem, producer, path, lower=corpus._lowers_as_quant(path),
                        zero_point="subtract" if subtract else "fold"), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocate", action="store_true", help="also check allocate's map (the corpus' step 6)")
    parser.add_argument("--save", type=Path, help="folder for each FAILED file and a note of why")
    parser.add_argument("--every", type=int, default=10, help="a progress line every this many examples")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="a2q_fuzz_ort_"))
    counts: Counter = Counter()
    failed: list[str] = []
    reasons: Counter = Counter()  # why files were refused or left unchecked, and what onnxruntime refused
    for index in range(args.examples):
        folder = work / str(index)
        folder.mkdir()
        entry, refused = draw_file(rng, folder, index)
        if entry is None:
            counts["producer refused"] += 1
            reasons[refused.split(": ", 1)[1]] += 1
        else:
            result = corpus.check(entry, folder, allocate=args.allocate)
            counts[result.status] += 1
            if result.status in ("refused", "unchecked"):
                reasons[f"{result.status}: {result.detail[:160]}"] += 1
            counts["simulations compared"] += result.simulated
            if result.status == "FAILED":
                failed.append(f"{entry.name}: {result.detail}")
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    for source in folder.glob(f"{entry.name}.onnx*"):
                        shutil.copy(source, args.save / source.name)
                    (args.save / f"{entry.name}.txt").write_text(result.detail + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        if (index + 1) % args.every == 0 or index + 1 == args.examples:
            print(f"{index + 1}/{args.examples}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                  flush=True)
    for reason, count in reasons.most_common(12):
        print(f"{count:4d} x {reason}")
    for line in failed:
        print(f"FAILED {line}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
