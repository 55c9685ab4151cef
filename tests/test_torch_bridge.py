"""QonnxModule against qonnx's own execution (numpy custom ops + onnxruntime for standard ops).

Models are tiny seeded Brevitas nets exported with ``export_qonnx``, their FINN-ONNX conversions
(MultiThreshold), single-op graphs for op semantics Brevitas does not emit, and any real models
committed under models/.
"""

from __future__ import annotations

from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
from brevitas.export import export_qonnx
from brevitas.quant import Int8WeightPerChannelFloat
from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.quant import quant as qonnx_int_quant
from qonnx.transformation.change_batchsize import ChangeBatchSize
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model
from qonnx.util.cleanup import cleanup_model
from torch import nn

from a2q_passes.torch_bridge import QonnxModule, write_back

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


# ---------------------------------------------------------------- tiny Brevitas nets


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(12, 16, bias=True, weight_bit_width=4)
        self.act = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(16, 5, bias=True, weight_bit_width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.inp(x))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 4, 3, padding=1, weight_bit_width=4, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.act = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = qnn.QuantLinear(4 * 4 * 4, 10, weight_bit_width=4, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.bn(self.conv(self.inp(x))))), 1))


class DepthwiseResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=False)
        self.dw = qnn.QuantConv2d(4, 4, 3, padding=1, groups=4, weight_bit_width=4)
        self.dw_act = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.pw = qnn.QuantConv2d(4, 4, 1, weight_bit_width=4)
        self.mid = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # the exporter folds it into asymmetric Conv pads
        self.down = qnn.QuantConv2d(4, 6, 2, stride=2, weight_bit_width=4)
        self.down_act = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.dilated = qnn.QuantConv2d(6, 3, 3, padding=2, dilation=2, weight_bit_width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.pw(self.dw_act(self.dw(x)))
        return self.dilated(self.down_act(self.down(self.pad(self.mid(x)))))


class ESPCNLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(1, 8, 5, padding=2, weight_bit_width=4)
        self.act = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_bit_width=4)
        self.shuffle = nn.PixelShuffle(2)  # DepthToSpace (CRD), 2 output channels so CRD != DCR
        self.skip = nn.Upsample(scale_factor=2, mode="nearest")  # Resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv2(self.act(self.conv1(self.inp(x))))) + self.skip(x)


class PerChannelLowBit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(3, 6, 3, stride=2, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=2)
        self.act1 = qnn.QuantReLU(bit_width=2, return_quant_tensor=True)
        self.up = qnn.QuantConvTranspose2d(
            6, 4, 3, stride=2, padding=1, output_padding=1, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=3
        )
        self.act2 = qnn.QuantReLU(bit_width=4, return_quant_tensor=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = qnn.QuantLinear(4, 5, bias=True, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act2(self.up(self.act1(self.conv(self.inp(x)))))), 1))


BREVITAS_NETS = {
    "mlp": (MLP, (4, 12)),
    "cnn_bn_maxpool": (CNN, (2, 1, 8, 8)),
    "depthwise_residual": (DepthwiseResidual, (2, 4, 8, 8)),
    "espcn_like": (ESPCNLike, (1, 1, 6, 6)),
    "per_channel_2bit": (PerChannelLowBit, (2, 3, 9, 9)),
}
# The TorchScript exporter (what models/export.py and FINN use) for every net; the dynamo
# exporter too for two nets, since it emits other ops (ReduceMean, Reshape, asymmetric Conv pads).
DYNAMO_EXPORTED = ("depthwise_residual", "per_channel_2bit")
QONNX_MODELS = [*BREVITAS_NETS, *(f"{n}_dynamo" for n in DYNAMO_EXPORTED)]
FINN_MODELS = [f"finn_{n}" for n in BREVITAS_NETS]
REAL_MODELS = sorted(str(p.relative_to(REPO)) for p in (REPO / "models").glob("*.onnx"))


@pytest.fixture(scope="module")
def built_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelWrapper]:
    directory = tmp_path_factory.mktemp("bridge_models")
    models = {}
    for seed, (name, (net_class, shape)) in enumerate(BREVITAS_NETS.items()):
        torch.manual_seed(seed)
        net = net_class().eval()
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        example = torch.randn(shape)
        exports = {name: dict(dynamo=False, opset_version=13)}
        if name in DYNAMO_EXPORTED:
            exports[f"{name}_dynamo"] = dict(dynamo=True)
        for export_name, options in exports.items():
            path = directory / f"{export_name}.onnx"
            export_qonnx(net, example, str(path), **options)
            model = cleanup_model(ModelWrapper(str(path)))
            model.model.ir_version = min(model.model.ir_version, 10)  # what onnxruntime 1.32 accepts
            models[export_name] = model
        finn_model = models[name].transform(ConvertQONNXtoFINN())
        assert any(n.op_type == "MultiThreshold" for n in finn_model.graph.node)
        models[f"finn_{name}"] = finn_model
    return models


def _model(built_models: dict[str, ModelWrapper], name: str) -> ModelWrapper:
    if name in built_models:
        return built_models[name]
    # qonnx execution needs every shape, and a fixed batch (the QDQ model's batch is dynamic)
    return ModelWrapper(str(REPO / name)).transform(ChangeBatchSize(1)).transform(InferShapes())


def _random_inputs(model: ModelWrapper, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: rng.uniform(-1.5, 1.5, model.get_tensor_shape(i.name)).astype(np.float32)
        for i in model.graph.input
        if i.name not in initializers
    }


def _reference(model: ModelWrapper, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return execute_onnx(model, inputs)[model.graph.output[0].name]


def _bridge(module: QonnxModule, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return module(*inputs.values()).detach().numpy()


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    "name", [*QONNX_MODELS, *FINN_MODELS, *REAL_MODELS]
)
def test_forward_matches_qonnx_execution(built_models: dict[str, ModelWrapper], name: str) -> None:
    model = _model(built_models, name)
    module = QonnxModule(model)
    for seed in range(3):
        inputs = _random_inputs(model, seed)
        expected = _reference(model, inputs)
        got = _bridge(module, inputs)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= ATOL * max(1.0, np.abs(expected).max()), name


@pytest.mark.parametrize("name", QONNX_MODELS)
def test_gradients_reach_weights_and_scales(built_models: dict[str, ModelWrapper], name: str) -> None:
    module = QonnxModule(built_models[name], trainable_scales="weights")
    inputs = _random_inputs(built_models[name], 0)
    module(*inputs.values()).square().mean().backward()
    infos = module.weight_quant_nodes()
    assert infos, "every Brevitas net here has quantized weights"
    for info in infos:
        assert isinstance(info.weight, nn.Parameter) and isinstance(info.scale, nn.Parameter)
        assert info.weight.grad is not None and info.weight.grad.abs().sum() > 0, info.node_name
        assert info.scale.grad is not None and info.scale.grad.abs().sum() > 0, info.node_name


@pytest.mark.parametrize("name", FINN_MODELS)
def test_gradient_passes_multithreshold(built_models: dict[str, ModelWrapper], name: str) -> None:
    model = built_models[name]
    module = QonnxModule(model)
    x = torch.tensor(next(iter(_random_inputs(model, 0).values())), requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_trainable_scales_option(built_models: dict[str, ModelWrapper]) -> None:
    model = built_models["cnn_bn_maxpool"]
    quant_scales = {n.input[1] for n in model.graph.node if n.op_type == "Quant"}
    weight_scales = {
        n.input[1] for n in model.graph.node if n.op_type == "Quant" and model.get_initializer(n.input[0]) is not None
    }
    assert weight_scales and weight_scales != quant_scales
    for option, expected in (("none", set()), ("weights", weight_scales), ("all", quant_scales)):
        trainable = set(QonnxModule(model, trainable_scales=option).named_onnx_parameters())
        assert trainable & quant_scales == expected, option
    with pytest.raises(ValueError, match="trainable_scales"):
        QonnxModule(model, trainable_scales="some")


def test_weight_quant_nodes_describe_the_graph(built_models: dict[str, ModelWrapper]) -> None:
    model = built_models["per_channel_2bit"]
    module = QonnxModule(model)
    infos = module.weight_quant_nodes()
    by_name = {n.name: n for n in model.graph.node}
    assert [i.bit_width for i in infos] == [2, 3, 2]
    assert [i.consumer_op_type for i in infos] == ["Conv", "ConvTranspose", "Gemm"]
    for info in infos:
        node = by_name[info.node_name]
        assert node.op_type == "Quant" and node.input[0] == info.weight_name
        assert model.find_consumer(node.output[0]).name == info.consumer
        weight, scale = model.get_initializer(info.weight_name), model.get_initializer(info.scale_name)
        assert scale.size == weight.shape[0] or scale.size == weight.shape[1]  # per output channel
        assert info.signed and info.narrow and info.rounding_mode == "ROUND"
        zero_point = model.get_initializer(node.input[2])
        expected_codes = qonnx_int_quant(weight, scale, zero_point, np.array(info.bit_width), 1, 1, "ROUND") / scale
        codes = module.weight_codes(info.node_name).detach().numpy()
        np.testing.assert_allclose(codes, expected_codes, atol=1e-5)
        assert codes.min() >= info.codes.lo and codes.max() <= info.codes.hi


@pytest.mark.parametrize("name", ["mlp", "depthwise_residual", "per_channel_2bit_dynamo"])
def test_write_back_round_trip(built_models: dict[str, ModelWrapper], name: str) -> None:
    model = built_models[name]
    module = QonnxModule(model, trainable_scales="weights")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1 + 0.2 * torch.rand(parameter.shape, generator=generator))
    written = write_back(module, model)
    assert [(n.name, n.op_type, list(n.input)) for n in written.graph.node] == [
        (n.name, n.op_type, list(n.input)) for n in model.graph.node
    ]
    changed = [
        t for t in module.named_onnx_parameters()
        if not np.array_equal(written.get_initializer(t), model.get_initializer(t))
    ]
    assert changed, "write_back must write the perturbed parameters"
    inputs = _random_inputs(model, 5)
    bridge = _bridge(module, inputs)
    assert np.abs(bridge - _reference(model, inputs)).max() > 1e-3  # the perturbation matters
    np.testing.assert_allclose(_reference(written, inputs), bridge, atol=ATOL)


class HalveWithGain(nn.Module):
    """A reparameterisation with its own trainable parameter: ``w * gain / 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight * self.gain / 2


def test_weight_transform_and_projection_hooks(built_models: dict[str, ModelWrapper]) -> None:
    model = built_models["cnn_bn_maxpool"]
    module = QonnxModule(model)
    info = module.weight_quant_nodes()[0]
    transform = HalveWithGain()
    module.set_weight_transform(info.node_name, transform)
    assert any(p is transform.gain for p in module.parameters())

    manual = ModelWrapper(onnx.ModelProto.FromString(model.model.SerializeToString()))
    manual.set_initializer(info.weight_name, model.get_initializer(info.weight_name) / 2)
    inputs = _random_inputs(model, 2)
    out = module(*[torch.from_numpy(v) for v in inputs.values()])
    np.testing.assert_allclose(out.detach().numpy(), _reference(manual, inputs), atol=ATOL)
    out.square().sum().backward()
    assert transform.gain.grad is not None and transform.gain.grad != 0
    np.testing.assert_allclose(_reference(write_back(module, model), inputs), _reference(manual, inputs), atol=ATOL)

    module.set_weight_transform(info.node_name, None)
    np.testing.assert_allclose(_bridge(module, inputs), _reference(model, inputs), atol=ATOL)

    module.set_weight_projection(info.node_name, lambda w, s: torch.clamp(w, -s, s))
    before = info.weight.detach().numpy().copy()
    module.project_weights()
    bound = info.scale.detach().numpy()
    np.testing.assert_array_equal(info.weight.detach().numpy(), np.clip(before, -bound, bound))
    assert np.abs(before).max() > bound.max(), "the projection must have had something to clip"


def test_unknown_weight_quant_node_is_rejected(built_models: dict[str, ModelWrapper]) -> None:
    module = QonnxModule(built_models["mlp"])
    with pytest.raises(KeyError, match="not a weight Quant"):
        module.set_weight_transform("Relu_0", lambda w, s: w)


def test_write_back_rejects_another_graph(built_models: dict[str, ModelWrapper]) -> None:
    module = QonnxModule(built_models["mlp"])
    with pytest.raises(ValueError, match="differ"):
        write_back(module, built_models["cnn_bn_maxpool"])


# ---------------------------------------------------------------- single-op graphs


def _single_op_model(
    op_type: str,
    inputs: dict[str, np.ndarray],
    initializers: dict[str, np.ndarray] | None = None,
    domain: str = "",
    opset: int = 19,
    input_order: list[str] | None = None,
    qonnx_opset: int = 2,
    **attrs: object,
) -> tuple[ModelWrapper, dict[str, np.ndarray]]:
    initializers = initializers or {}
    names = input_order or [*inputs, *initializers]
    node = helper.make_node(op_type, names, ["y"], name=f"{op_type}_under_test", domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "single_op",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in inputs.items()
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, n) for n, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("qonnx.custom_op.general", qonnx_opset)]
    if domain == CL:  # qonnx runs a channels-last op as the standard one at this domain's opset
        opsets.append(helper.make_opsetid(CL, opset))
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=opsets)).transform(InferShapes())
    return model, inputs


CL = "qonnx.custom_op.channels_last"


def _f32(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


Q = "qonnx.custom_op.general"
X4 = {"x": _f32(2, 4, 7, 6)}
SINGLE_OP_CASES = {
    # quantizers: every rounding mode, signed/unsigned, narrow, non-zero zero point, 1 bit
    **{
        f"quant_{mode.lower()}_s{signed}_n{narrow}": (
            "Quant",
            {"x": _f32(3, 50, scale=3.0)},
            {"s": np.float32(0.37), "z": np.float32(zp), "b": np.float32(3)},
            dict(domain=Q, signed=signed, narrow=narrow, rounding_mode=mode),
        )
        for mode, signed, narrow, zp in [
            ("ROUND", 1, 0, 0.0), ("ROUND", 1, 1, 0.0), ("ROUND", 0, 0, 0.0), ("ROUND", 0, 1, 2.0),
            ("CEIL", 1, 0, 0.0), ("FLOOR", 0, 0, 1.0), ("UP", 1, 1, 0.0), ("DOWN", 1, 0, 0.0),
            ("HALF_UP", 1, 0, 0.0), ("HALF_DOWN", 1, 0, 0.0), ("HALF_EVEN", 1, 0, 0.0),
        ]
    },
    "quant_per_channel": (
        "Quant", {"x": _f32(4, 3, 5)},
        {"s": np.array([0.1, 0.2, 0.05, 0.3], np.float32).reshape(4, 1, 1), "z": np.float32(0), "b": np.float32(5)},
        dict(domain=Q, signed=1, narrow=1),
    ),
    "quant_1bit_signed": ("Quant", {"x": _f32(3, 8)}, {"s": np.float32(0.5), "z": np.float32(0), "b": np.float32(1)},
                          dict(domain=Q, signed=1, narrow=0)),
    "bipolar_quant": ("BipolarQuant", {"x": _f32(3, 8)}, {"s": np.float32(0.25)}, dict(domain=Q)),
    "trunc_v2": (
        "Trunc", {"x": np.round(_f32(2, 9, scale=40.0)) * np.float32(0.125)},
        {"s": np.float32(0.125), "z": np.float32(0), "ib": np.float32(10), "os": np.float32(1.0), "ob": np.float32(6)},
        dict(domain=Q, rounding_mode="FLOOR", signed=1, narrow=0),
    ),
    "trunc_v1": (
        "Trunc", {"x": np.round(_f32(2, 9, scale=40.0)) * np.float32(0.125)},
        {"s": np.float32(0.125), "z": np.float32(0), "ib": np.float32(8), "ob": np.float32(5)},
        dict(domain=Q, rounding_mode="FLOOR", qonnx_opset=1),
    ),
    "multithreshold_nchw": (
        "MultiThreshold", X4, {"t": np.sort(_f32(4, 7, seed=1), axis=1)},
        dict(domain=Q, out_dtype="UINT3", out_scale=0.5, out_bias=-1.0),
    ),
    "multithreshold_nhwc_global": (
        "MultiThreshold", {"x": _f32(2, 5, 6, 3)}, {"t": np.sort(_f32(1, 3, seed=2), axis=1)},
        dict(domain=Q, out_dtype="UINT2", data_layout="NHWC"),
    ),
    "multithreshold_nc": ("MultiThreshold", {"x": _f32(3, 5)}, {"t": np.sort(_f32(5, 3, seed=3), axis=1)},
                          dict(domain=Q, out_dtype="UINT2")),
    # MAC ops
    "conv_asymmetric_pads_groups": (
        "Conv", X4, {"w": _f32(6, 2, 3, 2, seed=1), "b": _f32(6, seed=2)},
        dict(group=2, pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
    ),
    "conv_same_upper": ("Conv", X4, {"w": _f32(3, 4, 3, 3, seed=1)}, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_same_lower_1d": ("Conv", {"x": _f32(2, 3, 10)}, {"w": _f32(2, 3, 4, seed=1)}, dict(auto_pad="SAME_LOWER")),
    "conv_transpose_asym_outpad": (
        "ConvTranspose", X4, {"w": _f32(4, 3, 3, 3, seed=1), "b": _f32(6, seed=2)},
        dict(group=2, strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2], dilations=[1, 1]),
    ),
    "conv_transpose_dilated": (
        "ConvTranspose", X4, {"w": _f32(4, 2, 2, 3, seed=1)}, dict(dilations=[2, 1], pads=[1, 1, 1, 1])
    ),
    "gemm_trans_alpha_beta": (
        "Gemm", {"a": _f32(5, 3)}, {"b": _f32(4, 5, seed=1), "c": _f32(4, seed=2)},
        dict(transA=1, transB=1, alpha=0.7, beta=-1.3),
    ),
    "matmul_batched": ("MatMul", {"a": _f32(2, 3, 5)}, {"b": _f32(5, 4, seed=1)}, {}),
    "batchnorm": (
        "BatchNormalization", X4,
        {"g": _f32(4, seed=1), "bb": _f32(4, seed=2), "m": _f32(4, seed=3), "v": np.abs(_f32(4, seed=4)) + 0.1},
        dict(epsilon=1e-3),
    ),
    # pooling
    "maxpool_pads_ceil": ("MaxPool", X4, {}, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1)),
    "maxpool_dilated": ("MaxPool", X4, {}, dict(kernel_shape=[2, 2], dilations=[2, 2])),
    "avgpool_pads_exclude": ("AveragePool", X4, {}, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 1])),
    "avgpool_pads_include": (
        "AveragePool", X4, {}, dict(kernel_shape=[3, 3], strides=[1, 2], pads=[1, 0, 1, 1], count_include_pad=1)
    ),
    "avgpool_ceil_exclude": (
        "AveragePool", X4, {}, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)
    ),
    "avgpool_plain": ("AveragePool", X4, {}, dict(kernel_shape=[2, 3], strides=[2, 3])),
    "global_avg_pool": ("GlobalAveragePool", X4, {}, {}),
    "global_max_pool": ("GlobalMaxPool", X4, {}, {}),
    "reduce_mean": ("ReduceMean", X4, {"axes": _i64(2, -1)}, dict(keepdims=0)),
    "reduce_max_all": ("ReduceMax", X4, {}, {}),
    # layout
    "depth_to_space_dcr": ("DepthToSpace", {"x": _f32(2, 8, 3, 2)}, {}, dict(blocksize=2, mode="DCR")),
    "depth_to_space_crd": ("DepthToSpace", {"x": _f32(2, 8, 3, 2)}, {}, dict(blocksize=2, mode="CRD")),
    "space_to_depth": ("SpaceToDepth", {"x": _f32(2, 3, 4, 6)}, {}, dict(blocksize=2)),
    "flatten_axis2": ("Flatten", X4, {}, dict(axis=2)),
    "reshape_zero_minus_one": ("Reshape", X4, {"shape": _i64(0, -1, 6)}, {}),
    "transpose": ("Transpose", X4, {}, dict(perm=[0, 2, 3, 1])),
    "concat": ("Concat", X4, {"c": _f32(2, 1, 7, 6, seed=1)}, dict(axis=1)),
    "squeeze": ("Squeeze", {"x": _f32(2, 1, 3, 1)}, {"axes": _i64(1, -1)}, {}),
    "unsqueeze": ("Unsqueeze", {"x": _f32(2, 3)}, {"axes": _i64(0, -1)}, {}),
    "gather_negative": ("Gather", X4, {"i": _i64(-1, 0, 2)}, dict(axis=2)),
    "gather_scalar_index": ("Gather", {"x": _f32(2, 5)}, {"i": np.array(-2, np.int64)}, dict(axis=1)),
    "pad_constant": ("Pad", X4, {"p": _i64(0, 1, 2, 0, 0, 0, 1, 3), "v": np.float32(0.5)}, dict(mode="constant")),
    "pad_reflect": ("Pad", X4, {"p": _i64(0, 0, 2, 1, 0, 0, 1, 2)}, dict(mode="reflect")),
    "pad_edge": ("Pad", X4, {"p": _i64(0, 0, 0, 3, 0, 0, 2, 0)}, dict(mode="edge")),
    "resize_half_pixel_scales": (
        "Resize", X4, {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 3, 1.5], np.float32)}, {}
    ),
    "resize_sizes_align_corners": (
        "Resize", X4, {"roi": np.zeros(0, np.float32), "sz": _i64(2, 4, 10, 13)},
        dict(coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil",
             input_order=["x", "roi", "", "sz"]),
    ),
    "resize_asymmetric_floor_down": (
        "Resize", X4, {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 0.5, 0.5], np.float32)},
        dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ),
    "upsample_opset9": (
        "Upsample", X4, {"sc": np.array([1, 1, 2, 3], np.float32)}, dict(mode="nearest", opset=9)
    ),
    # elementwise
    "add_broadcast": ("Add", X4, {"c": _f32(4, 1, 1, seed=1)}, {}),
    "sub": ("Sub", X4, {"c": _f32(6, seed=1)}, {}),
    "mul": ("Mul", X4, {"c": _f32(1, 4, 1, 1, seed=1)}, {}),
    "div": ("Div", X4, {"c": np.abs(_f32(6, seed=1)) + 0.5}, {}),
    "pow_scalar": ("Pow", X4, {"e": np.float32(2.0)}, {}),
    "pow_broadcast": ("Pow", {"x": np.abs(_f32(2, 4, 7, 6)) + 0.1}, {"e": _f32(6, seed=1)}, {}),
    "where_broadcast": ("Where", X4, {"c": np.random.default_rng(2).random((7, 6)) < 0.5, "f": np.float32(-1e4)},
                        dict(input_order=["c", "x", "f"])),
    "relu": ("Relu", X4, {}, {}),
    "leaky_relu": ("LeakyRelu", X4, {}, dict(alpha=0.2)),
    "sigmoid": ("Sigmoid", X4, {}, {}),
    "tanh": ("Tanh", X4, {}, {}),
    "clip": ("Clip", X4, {"lo": np.float32(-0.3), "hi": np.float32(0.6)}, {}),
    "softmax": ("Softmax", X4, {}, dict(axis=1)),
    "identity": ("Identity", X4, {}, {}),
    # qonnx's channels-last wrappers (data NHWC; a Conv's weights (O, kh, kw, I))
    "channels_last_conv": ("Conv", {"x": _f32(2, 7, 6, 4)}, {"w": _f32(3, 3, 2, 4, seed=1)},
                           dict(kernel_shape=[3, 2], pads=[1, 0, 1, 1], strides=[2, 1], dilations=[1, 1], group=1,
                                domain=CL)),
    "channels_last_maxpool": ("MaxPool", {"x": _f32(2, 7, 6, 4)}, {},
                              dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], domain=CL)),
    "channels_last_batchnorm": ("BatchNormalization", {"x": _f32(2, 7, 6, 4)},
                                {"g": _f32(4, seed=1), "b": _f32(4, seed=2), "m": _f32(4, seed=3),
                                 "v": np.abs(_f32(4, seed=4)) + 0.5}, dict(domain=CL)),
}


@pytest.mark.parametrize("case", list(SINGLE_OP_CASES))
def test_single_op_matches_qonnx_execution(case: str) -> None:
    op_type, inputs, initializers, attrs = SINGLE_OP_CASES[case]
    attrs = dict(attrs)
    options = {key: attrs.pop(key) for key in ("domain", "input_order", "qonnx_opset", "opset") if key in attrs}
    model, inputs = _single_op_model(op_type, inputs, initializers, **options, **attrs)
    expected = _reference(model, inputs)
    got = _bridge(QonnxModule(model), inputs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_old_opset_attribute_forms() -> None:
    """Opset-10 Clip / Pad / Squeeze / Softmax take attributes where newer opsets take inputs."""
    x = _f32(2, 3, 1, 4)
    for op_type, attrs in [
        ("Clip", dict(min=-0.2, max=0.4)),
        ("Pad", dict(pads=[0, 0, 1, 2, 0, 1, 0, 1], mode="constant", value=0.25)),
        ("Squeeze", dict(axes=[2])),
        ("Softmax", dict(axis=2)),
        ("Unsqueeze", dict(axes=[1])),
    ]:
        model, inputs = _single_op_model(op_type, {"x": x}, opset=10, **attrs)
        np.testing.assert_allclose(_bridge(QonnxModule(model), inputs), _reference(model, inputs), atol=1e-6)


def test_constant_node_and_optional_inputs() -> None:
    """A Constant node feeding Conv, and an omitted optional input ('' name) on Clip."""
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_f32(2, 3, 1, 1, seed=1)))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    clip = helper.make_node("Clip", ["c", "", "hi"], ["y"], name="clip")
    graph = helper.make_graph(
        [const, conv, clip], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.float32(0.1), "hi")],
    )
    model = ModelWrapper(qonnx_make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).transform(InferShapes())
    inputs = {"x": _f32(1, 3, 4, 4)}
    module = QonnxModule(model)
    np.testing.assert_allclose(_bridge(module, inputs), _reference(model, inputs), atol=1e-6)
    as_float64 = module(inputs["x"].astype(np.float64))  # cast to the graph input's declared float32
    assert as_float64.dtype == torch.float32


def test_unsupported_op_error_names_the_node() -> None:
    model, _ = _single_op_model("Einsum", {"a": _f32(2, 3)}, {"b": _f32(3, 2)}, equation="ij,jk->ik")
    with pytest.raises(NotImplementedError, match="'Einsum_under_test' of type Einsum"):
        QonnxModule(model)


def test_quant_ste_gradient() -> None:
    """d out / d x is 1 inside the clip range and 0 outside (straight-through estimator)."""
    model, inputs = _single_op_model(
        "Quant", {"x": np.array([[-5.0, -0.3, 0.26, 0.7, 5.0]], np.float32)},
        {"s": np.float32(0.25), "z": np.float32(0), "b": np.float32(3)}, domain=Q, signed=1, narrow=0,
    )
    x = torch.tensor(inputs["x"], requires_grad=True)
    QonnxModule(model)(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 1, 1, 1, 0]])


@pytest.mark.parametrize("kind", ["cnn", "depthwise", "residual", "conv1d"])
def test_qonnx_channels_last_form_matches_qonnx_execution(kind: str, tmp_path) -> None:
    """qonnx's ConvertToChannelsLastAndClean (NHWC Conv with (O, kh, kw, I) weights, MaxPool, BatchNormalization in
    the channels-last domain): the bridge runs them as qonnx does, channels first in between."""
    import warnings

    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

    from tests.brevitas_nets import NetSpec, build_corpus_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ModelWrapper(str(build_corpus_net(tmp_path, NetSpec(kind, 4, 4, per_channel=True), "qonnx")))
    model = model.transform(ConvertToChannelsLastAndClean())
    ops = {n.op_type for n in model.graph.node if n.domain == "qonnx.custom_op.channels_last"}
    assert "Conv" in ops
    name = model.graph.input[0].name
    x = np.random.default_rng(0).normal(0, 1, (1, *model.get_tensor_shape(name)[1:])).astype(np.float32)
    expected = execute_onnx(model, {name: x})[model.graph.output[0].name]
    np.testing.assert_allclose(_bridge(QonnxModule(model), {name: x}), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attrs", [
    dict(kernel_size=[3, 3], stride=[1, 1], pad_amount=[1, 1, 1, 1], pad_value=0),
    dict(kernel_size=[3, 2], stride=[2, 1], pad_amount=[1, 0, 2, 1], pad_value=-3, dilations=[1, 2]),
    dict(kernel_size=[1, 1], stride=[1, 1], depthwise=1),
])
def test_im2col_matches_qonnx_per_sample(attrs) -> None:
    """qonnx's Im2Col (LowerConvsToMatMul): the bridge's patches equal qonnx's at batch 1, for each sample of a batch
    (qonnx's own execution mixes samples for batch > 1)."""
    from qonnx.core.datatype import DataType

    x = np.random.default_rng(0).integers(-8, 8, (3, 7, 6, 4)).astype(np.float32)
    model, _ = _single_op_model("Im2Col", {"x": x[:1]}, domain=Q, input_shape="(1, 7, 6, 4)", **attrs)
    model.set_tensor_datatype("x", DataType["INT8"])
    got = _bridge(QonnxModule(model), {"x": x})
    for i in range(len(x)):
        np.testing.assert_array_equal(got[i:i + 1], execute_onnx(model, {"x": x[i:i + 1]})["y"])
