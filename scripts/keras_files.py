"""Keras models as their converters write them, for the corpus: QKeras models converted to QONNX by qonnx's own
converter (``qonnx.converters.from_keras``), and plain Keras float models converted by tf2onnx, which the corpus
quantizes with onnxruntime (a TensorFlow user's route to Q/DQ files).

    TFVENV/bin/python -m scripts.keras_files --out tests/data/keras

QKeras, tf2onnx and the converter need TensorFlow 2 with Keras 2, which the project's environment does not hold (and
CI never installs): the files are written once, in a separate environment, and committed (``tests/data/keras``,
each a few kB). That environment, with Python 3.11::

    python3.11 -m venv TFVENV
    TFVENV/bin/pip install tensorflow-cpu==2.15.1 qkeras==0.9.0 tf2onnx==1.16.1 qonnx==0.4.0 protobuf==3.20.3 pyparsing

(qonnx 1.0 dropped ``qonnx.converters``; tf2onnx 1.17 no longer exposes the optimizer module the converter edits.)
The models are untrained: every weight and bias is drawn with a fixed seed (the same files on every run), wide
enough that each quantizer's grid is used. The converter drops a ``QActivation`` on the graph input, so the first
layer always reads a float input (``a2q ... --input-dtype``, as a QKeras user gives hls4ml its input precision).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _qkeras_models():
    """(name, QKeras model) for every ``qkeras_*`` file, one at a time; names carry the weight and activation bits. A new model goes at the end: Keras numbers layer and
    model names globally, which the converters write, so one built earlier would rename the files after it."""
    from qkeras import QActivation, QConv1D, QConv2D, QDense, binary, quantized_bits, quantized_relu, ternary
    from tensorflow.keras.layers import (AveragePooling2D, BatchNormalization, Flatten, Input, MaxPooling1D, MaxPooling2D,
                                         Softmax)
    from tensorflow.keras.models import Model

    def dense(units, bits, integer=0, bias=True, symmetric=0, name=None, quantizer=None):
        return QDense(units, kernel_quantizer=quantizer or quantized_bits(bits, integer, symmetric=symmetric, alpha=1),
                      bias_quantizer=quantized_bits(bits, integer, alpha=1) if bias else None, use_bias=bias,
                      name=name)

    def conv(filters, kernel, bits, name, **kwargs):
        return QConv2D(filters, kernel, kernel_quantizer=quantized_bits(bits, 0, alpha=1),
                       bias_quantizer=quantized_bits(bits, 0, alpha=1), name=name, **kwargs)

    # the hls4ml tutorial's jet-tagging MLP (the QONNX zoo's qkeras_jettagging.onnx): 6-bit everything, softmax
    x = Input((16,), name="x")
    h = x
    for i, units in enumerate((64, 32, 32)):
        h = QActivation(quantized_relu(6), name=f"relu{i}")(dense(units, 6, name=f"fc{i}")(h))
    h = Softmax(name="softmax")(dense(5, 6, name="out")(h))
    yield ("mlp_w6a6", Model(x, h))
    # integer bits in the weights and activations (scales 2^-2 and 2^-1), symmetric (narrow) weights, no bias
    x = Input((20,), name="x")
    h = QActivation(quantized_relu(4, 2), name="relu0")(dense(24, 4, integer=1, symmetric=1, bias=False, name="fc0")(x))
    h = QActivation(quantized_relu(3, 1), name="relu1")(dense(12, 4, integer=1, symmetric=1, name="fc1")(h))
    yield ("mlp_w4a4_integer", Model(x, dense(3, 4, integer=1, symmetric=1, name="out")(h)))
    # ternary and binary weights (the converter writes binary() as a 1-bit narrow signed Quant)
    x = Input((12,), name="x")
    h = QActivation(quantized_relu(2), name="relu0")(dense(16, 2, bias=False, name="fc0", quantizer=ternary(alpha=1, threshold=0.5))(x))
    h = QActivation(quantized_relu(2), name="relu1")(dense(8, 1, bias=False, name="fc1", quantizer=binary(alpha=1))(h))
    yield ("mlp_ternary_binary", Model(x, dense(4, 4, name="out")(h)))
    # a CNN in channels-last Keras: the converter puts Transposes around the Convs
    x = Input((10, 10, 3), name="x")
    h = QActivation(quantized_relu(4), name="relu0")(conv(8, 3, 4, "conv0")(x))
    h = MaxPooling2D(2, name="pool")(h)
    h = QActivation(quantized_relu(4), name="relu1")(conv(8, 3, 4, "conv1", strides=2, padding="same")(h))
    yield ("cnn_w4a4", Model(x, dense(4, 4, name="out")(Flatten(name="flatten")(h))))
    # a float BatchNormalization between a QConv2D and its activation quantizer
    x = Input((8, 8, 2), name="x")
    h = BatchNormalization(name="bn")(conv(6, 3, 6, "conv0")(x))
    h = QActivation(quantized_relu(6), name="relu0")(h)
    yield ("cnn_bn_w6a6", Model(x, dense(3, 6, name="out")(Flatten(name="flatten")(h))))
    # QConv1D (TensorFlow runs it as a 2-D convolution on an expanded axis)
    x = Input((16, 4), name="x")
    h = QConv1D(6, 3, kernel_quantizer=quantized_bits(5, 0, alpha=1), bias_quantizer=quantized_bits(5, 0, alpha=1),
                name="conv0")(x)
    h = QActivation(quantized_relu(5), name="relu0")(h)
    yield ("conv1d_w5a5", Model(x, dense(2, 5, name="out")(Flatten(name="flatten")(h))))
    # a float BatchNormalization behind a QDense (tf2onnx writes it as Mul and Add), a leaky quantized_relu
    x = Input((12,), name="x")
    h = BatchNormalization(name="bn")(dense(16, 4, bias=False, name="fc0")(x))
    h = QActivation(quantized_relu(4, negative_slope=0.25), name="leaky0")(h)
    yield ("mlp_bn_leaky_w4a4", Model(x, dense(3, 4, name="out")(h)))
    # a strided "same" QConv2D and an AveragePooling2D with its own activation quantizer
    x = Input((8, 8, 3), name="x")
    h = QActivation(quantized_relu(4), name="relu0")(conv(4, 3, 4, "conv0", strides=2, padding="same")(x))
    h = QActivation(quantized_relu(4), name="relu1")(AveragePooling2D(2, name="pool")(h))
    yield ("cnn_avgpool_w4a4", Model(x, dense(3, 4, name="out")(Flatten(name="flatten")(h))))
    # what the converter cannot express, kept to show the refusals: a quantized_bits QActivation between layers is
    # dropped (the next layer reads a float sum), alpha="auto_po2" weights get no Quant at all (float weights)
    x = Input((12,), name="x")
    h = QActivation(quantized_bits(6, 2, alpha=1), name="act0")(dense(16, 4, name="fc0")(x))
    yield ("mlp_signed_act_w4a6", Model(x, dense(3, 4, name="out")(h)))
    x = Input((12,), name="x")
    h = QActivation(quantized_relu(4), name="relu0")(
        dense(16, 4, bias=False, name="fc0", quantizer=quantized_bits(4, 0, alpha="auto_po2"))(x))
    yield ("mlp_auto_po2_w4a4", Model(x, dense(3, 4, name="out")(h)))
    # QConv1D and MaxPooling1D (tf2onnx: Unsqueeze, Reshape, MaxPool k x 1, Squeeze)
    x = Input((16, 4), name="x")
    h = QConv1D(6, 3, kernel_quantizer=quantized_bits(4, 0, alpha=1), bias_quantizer=quantized_bits(4, 0, alpha=1),
                name="conv0")(x)
    h = MaxPooling1D(2, name="pool")(QActivation(quantized_relu(4), name="relu0")(h))
    yield ("conv1d_pool_w4a4", Model(x, dense(2, 4, name="out")(Flatten(name="flatten")(h))))


def _float_models():
    """(name, Keras float model, input shape) for every ``tf2onnx_*`` file, one at a time: channels-last convolutions (tf2onnx puts
    a Transpose at the input and before the Flatten), max pooling, a depthwise convolution, dense layers, a residual
    block and global average pooling, a 1-D convolution, with 1-D max pooling."""
    from tensorflow.keras import layers
    from tensorflow.keras.models import Model

    x = layers.Input((10, 10, 3), name="x")
    h = layers.Conv2D(8, 3, activation="relu", name="conv0")(x)
    h = layers.MaxPooling2D(2, name="pool")(h)
    h = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(h)
    h = layers.Conv2D(6, 1, activation="relu", name="pw")(h)
    h = layers.Dense(16, activation="relu", name="fc0")(layers.Flatten(name="flatten")(h))
    cnn = Model(x, layers.Dense(4, name="out")(h))
    yield "cnn", cnn, (1, 10, 10, 3)
    x = layers.Input((20,), name="x")
    h = layers.Dense(32, activation="relu", name="fc0")(x)
    h = layers.Dense(16, activation="relu", name="fc1")(h)
    mlp = Model(x, layers.Dense(3, name="out")(h))
    yield "mlp", mlp, (1, 20)
    # a residual block and global average pooling (tf2onnx: GlobalAveragePool + Squeeze)
    x = layers.Input((12, 12, 3), name="x")
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv0")(x)
    r = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(h)
    r = layers.Conv2D(8, 3, padding="same", name="conv2")(r)
    h = layers.GlobalAveragePooling2D(name="gap")(layers.ReLU(name="relu")(layers.Add(name="add")([h, r])))
    residual = Model(x, layers.Dense(4, name="out")(h))
    yield "residual_gap", residual, (1, 12, 12, 3)
    # TensorFlow's conv1d: a 2-D convolution on an inserted axis (Unsqueeze, Conv 1 x k, Squeeze)
    x = layers.Input((16, 4), name="x")
    h = layers.Conv1D(6, 3, strides=2, padding="same", activation="relu", name="conv0")(x)
    conv1d = Model(x, layers.Dense(2, name="out")(layers.Flatten(name="flatten")(h)))
    yield "conv1d", conv1d, (1, 16, 4)
    # and MaxPooling1D: Unsqueeze, Reshape, MaxPool k x 1, Squeeze
    x = layers.Input((16, 4), name="x")
    h = layers.MaxPooling1D(2, name="pool")(layers.Conv1D(6, 3, activation="relu", name="conv0")(x))
    conv1d_pool = Model(x, layers.Dense(2, name="out")(layers.Flatten(name="flatten")(h)))
    yield "conv1d_pool", conv1d_pool, (1, 16, 4)


def _randomize(model, rng) -> None:
    """Weights spread over [-1, 1) (the quantizers' range at integer=0) and biases away from 0: tf2onnx removes
    an all-zero bias, and untrained BatchNormalization statistics would be the identity."""
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.uniform(-1, 1, w.shape).astype(w.dtype) if w.ndim > 1 or "bn" not in layer.name
                               else rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in weights])


def _save(onnx_model, path: Path) -> None:
    import onnx

    graph = onnx_model.graph
    # tf2onnx numbers the constants it folds (const_fold_opt__N) in an order that varies between runs: renumbered in
    # the order the nodes read them (a renaming only), the files repeat
    folded = dict.fromkeys(n for node in graph.node for n in node.input if n.startswith("const_fold_opt__"))
    renamed = {old: f"const_fold_opt__{index}" for index, old in enumerate(folded)}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for tensor in (*graph.initializer, *graph.value_info):
        tensor.name = renamed.get(tensor.name, tensor.name)
    # qonnx's converter lists initializers in a set's order, which varies between runs: sorted, the files repeat
    initializers = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.save(onnx_model, path)
    print(path, [node.op_type for node in onnx_model.graph.node])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from qonnx.converters import from_keras

    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in _qkeras_models():
        tf.random.set_seed(0)
        _randomize(model, np.random.default_rng(sum(map(ord, name))))
        _save(from_keras(model, f"qkeras_{name}")[0], args.out / f"qkeras_{name}.onnx")
    for name, model, shape in _float_models():
        _randomize(model, np.random.default_rng(sum(map(ord, name))))
        signature = (tf.TensorSpec(shape, tf.float32, name="x"),)
        _save(tf2onnx.convert.from_keras(model, input_signature=signature, opset=13)[0],
              args.out / f"tf2onnx_{name}.onnx")


if __name__ == "__main__":
    main()
