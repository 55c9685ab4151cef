"""TensorFlow Lite models as tf2onnx converts them (``tf2onnx.convert.from_tflite``), for the corpus: Keras models
quantized by TFLite's own converter (full-integer int8 with float or int8 model inputs, 16-bit activations with
8-bit weights, dynamic range), the route from a ``.tflite`` file to ONNX a TensorFlow Lite user takes.

    TFVENV/bin/python -m scripts.tflite_files --out tests/data/tflite

TensorFlow and tf2onnx are not dependencies of this project (CI never installs them): the files are written once,
in the environment of ``scripts/keras_files.py`` (TensorFlow 2.15.1 CPU, tf2onnx 1.16.1; qkeras and qonnx 0.4 are not
needed here), and committed (``tests/data/tflite``, each a few kB). Weights and biases are drawn with a fixed seed,
calibration data too (``scripts.keras_files._randomize``: a BatchNormalization is named ``bn`` so that its variances
stay positive); each model is built in a fresh Keras session, so its layer names do not depend on the others.
What each file shows is listed in ``tests/data/tflite/README.md``; ``tests/test_ptq_tool_files.py`` runs them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# (model, TFLite quantization): the files committed
FILES = [("cnn", "int8"), ("residual", "int8"), ("pools", "int8"), ("hardswish_bn", "int8"), ("conv1d", "int8"),
         ("mlp", "int8_io"), ("mlp", "a16w8"), ("mlp", "dynamic")]
CALIBRATION_SAMPLES = 32


def _model(name: str):
    import tensorflow as tf
    from tensorflow.keras import Input, Model, layers

    if name == "cnn":
        x = Input((8, 8, 3))
        h = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        h = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(h)
        h = layers.MaxPooling2D()(h)
        h = layers.Flatten()(layers.Conv2D(6, 1, activation="relu")(h))
        return Model(x, layers.Dense(5)(h))
    if name == "residual":
        x = Input((8, 8, 4))
        skip = layers.Conv2D(4, 1)(x)
        h = layers.ReLU()(layers.Add()([layers.Conv2D(4, 3, padding="same", activation="relu")(x), skip]))
        h = layers.GlobalAveragePooling2D()(layers.Conv2D(6, 3, strides=2, padding="same")(h))
        return Model(x, layers.Dense(3)(h))
    if name == "pools":
        x = Input((8, 8, 3))
        h = layers.AveragePooling2D()(layers.Conv2D(6, 3, activation="relu")(x))
        h = layers.SeparableConv2D(5, 3, padding="same", activation="relu")(h)
        h = layers.Flatten()(layers.Concatenate()([h, layers.Conv2D(2, 1)(h)]))
        return Model(x, layers.Dense(4, activation="softmax")(h))
    if name == "hardswish_bn":
        x = Input((8, 8, 3))
        h = layers.BatchNormalization(name="bn")(layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
        h = layers.Activation(tf.nn.relu6)(h)
        h = layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(h)
        h = layers.Lambda(lambda v: v * tf.nn.relu6(v + 3.0) / 6.0)(h)  # hard swish: TFLite's HARD_SWISH
        h = layers.GlobalAveragePooling2D()(h)
        return Model(x, layers.Dense(3)(h))
    if name == "conv1d":
        x = Input((16, 4))
        h = layers.MaxPooling1D()(layers.Conv1D(6, 3, strides=2, padding="same", activation="relu")(x))
        h = layers.Flatten()(layers.LeakyReLU(0.1)(layers.Conv1D(5, 3)(h)))
        return Model(x, layers.Dense(3)(h))
    x = Input((20,))
    h = layers.BatchNormalization(name="bn")(layers.Dense(16, activation="relu")(x))
    return Model(x, layers.Dense(4)(layers.Dense(12, activation="relu6")(h)))


def _tflite(model, quantization: str) -> bytes:
    import numpy as np
    import tensorflow as tf

    shape = model.input_shape[1:]

    def calibration():
        rng = np.random.default_rng(0)
        for _ in range(CALIBRATION_SAMPLES):
            yield [rng.normal(size=(1, *shape)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization != "dynamic":
        converter.representative_dataset = calibration
    if quantization.startswith("int8"):
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if quantization == "int8_io":
        converter.inference_input_type = converter.inference_output_type = tf.int8
    if quantization == "a16w8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter.convert()


def _canonical_ids(model) -> None:
    """tf2onnx numbers the tensors and nodes it makes (``scale__16``, ``..._DequantizeLinear__88``), shares equal
    constants under one of their names and lists the weights' nodes in orders that vary between runs: those nodes
    are sorted by output name and every such number is replaced by its rank of first appearance in the graph (a
    reordering and renaming only), so the files repeat."""
    import re

    graph, ranks = model.graph, {}
    # the nodes reading constants only (the weights' DequantizeLinear) come first, in an order that varies too
    constants = {t.name for t in graph.initializer}
    first = sorted((n for n in graph.node if all(name in constants for name in n.input)), key=lambda n: n.output[0])
    nodes = [type(n)() for n in first] + [type(n)() for n in graph.node if n not in first]
    for copy, node in zip(nodes, first + [n for n in graph.node if n not in first]):
        copy.CopyFrom(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    infos = (*graph.input, *graph.output, *graph.value_info)
    dims = [dim for info in infos for dim in info.type.tensor_type.shape.dim if dim.dim_param]  # a symbolic batch
    names = [name for node in graph.node for name in (*node.input, *node.output, node.name)]
    names += [t.name for t in (*graph.initializer, *graph.value_info)] + [dim.dim_param for dim in dims]
    for name in names:
        for number in re.findall(r"__(\d+)", name):
            ranks.setdefault(number, len(ranks))

    def canonical(name: str) -> str:
        return re.sub(r"__(\d+)", lambda m: f"__{ranks[m.group(1)]}", name)

    for node in graph.node:
        node.input[:] = [canonical(n) for n in node.input]
        node.output[:] = [canonical(n) for n in node.output]
        node.name = canonical(node.name)
    for tensor in (*graph.initializer, *infos):
        tensor.name = canonical(tensor.name)
    for dim in dims:
        dim.dim_param = canonical(dim.dim_param)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import numpy as np
    import tensorflow as tf
    import tf2onnx

    from scripts.keras_files import _randomize, _save

    args.out.mkdir(parents=True, exist_ok=True)
    for name, quantization in FILES:
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(0)
        model = _model(name)
        _randomize(model, np.random.default_rng(sum(map(ord, name))))
        flat = args.out / f"tflite_{name}_{quantization}.tflite"
        flat.write_bytes(_tflite(model, quantization))
        converted = tf2onnx.convert.from_tflite(str(flat), opset=13)[0]
        _canonical_ids(converted)
        _save(converted, args.out / f"tflite_{name}_{quantization}.onnx")
        flat.unlink()


if __name__ == "__main__":
    main()
