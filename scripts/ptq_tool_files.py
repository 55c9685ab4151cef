"""Q/DQ files as three more post-training quantizers write them, for the corpus: Intel's NNCF (``nncf.quantize`` on
an ONNX model) and AMD Quark's ONNX quantizer (``quark.onnx.ModelQuantizer``), each over the float nets of
``tests/ort_models.py`` and the tf2onnx float models of ``tests/data/keras``, and PyTorch's PT2E quantization
(``torchao``'s ``prepare_pt2e``/``convert_pt2e`` with its XNNPACK and X86 Inductor quantizers, exported by
``torch.onnx.export(dynamo=True)``) on two small PyTorch nets, all calibrated on seeded normal data.

    PTQVENV/bin/python -m scripts.ptq_tool_files --out tests/data/ptq_tools

Neither tool is a dependency of this project (CI never installs them): the files are written once, in a separate
environment, and committed (``tests/data/ptq_tools``, each a few kB). That environment, with Python 3.11::

    python3.11 -m venv PTQVENV
    PTQVENV/bin/pip install nncf==3.4.0 amd-quark==0.13 torchao==0.18.0 onnx onnxruntime "numpy<2.3" torch==2.13.0

What each file shows is listed in ``tests/data/ptq_tools/README.md``; ``tests/test_ptq_tool_files.py`` runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# (tool, float net, configuration): the files committed
FILES = [
    ("nncf", "tf2onnx_cnn", "performance"),  # one activation scale per channel, through a MaxPool, into a depthwise Conv
    ("nncf", "residual_depthwise", "mixed"),  # asymmetric activations
    ("nncf", "attention", "performance"),  # two products of activations
    ("nncf", "tf2onnx_residual_gap", "performance"),  # FINN's lowering of its global pool does not execute
    ("quark", "tf2onnx_residual_gap", "xint8"),  # nodes out of topological order, value_info entries repeated
    ("quark", "tf2onnx_mlp", "a8w8"),  # value_info entries repeated
    ("quark", "conv_gemm_matmul", "a16w8"),  # 16-bit activations
    ("quark", "residual_depthwise", "xint8"),  # power-of-two scales: exact rounding ties everywhere
    ("pt2e", "cnn", "xnnpack_pc"),  # per-tensor Q/DQ that carry an axis attribute, per-channel weights
    ("pt2e", "mlp", "xnnpack_pt"),
    ("pt2e", "cnn", "x86"),  # X86 Inductor: the residual Add's inputs left unquantized
]
SAMPLES = 16


def float_models(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every float net: the ones ``tests/ort_models.py`` builds (written to ``folder``) and the tf2onnx ones."""
    import onnx

    sys.path.insert(0, str(ROOT))
    from tests.ort_models import FLOAT_NETS

    nets = {}
    for net, build in FLOAT_NETS.items():
        path = folder / f"float_{net}.onnx"
        nets[net] = (path, build(path, opset=13))
    for path in sorted((ROOT / "tests" / "data" / "keras").glob("tf2onnx_*.onnx")):
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        nets[path.stem] = (path, [d.dim_value or 1 for d in dims])
    return nets


def calibration(name: str, shape: list[int]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: rng.normal(size=shape).astype(np.float32)} for _ in range(SAMPLES)]


def nncf_file(source: Path, shape: list[int], preset: str, out: Path) -> None:
    import nncf
    import onnx

    model = onnx.load(str(source))
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    data = nncf.Dataset(calibration(model.graph.input[0].name, shape))
    onnx.save(nncf.quantize(model, data, preset=presets[preset], subset_size=SAMPLES), str(out))


def quark_file(source: Path, shape: list[int], config: str, out: Path) -> None:
    import onnx
    import quark.onnx as quark
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter(calibration(onnx.load(str(source)).graph.input[0].name, shape))

        def get_next(self):
            return next(self.data, None)

    quantizer = quark.ModelQuantizer(copy.deepcopy(getattr(quark, f"{config.upper()}_QCONFIG")))
    with contextlib.chdir(out.parent / "_float"):  # Quark writes a quantized_info.csv into the working folder
        quantizer.quantize_model(str(source.resolve()), str(out.resolve()), Reader())


def pt2e_file(net: str, config: str, out: Path) -> None:
    import onnx
    import torch
    from torch import nn
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    class CNN(nn.Module):  # a conv, a depthwise conv with a residual Add, a 1 x 1 conv, max pooling, a linear layer
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.c3, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6 * 4 * 4, 5)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            h = nn.functional.max_pool2d(torch.relu(self.c3(torch.relu(self.c2(h)) + h)), 2)
            return self.fc(torch.flatten(h, 1))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, shape = (CNN(), (1, 3, 8, 8)) if net == "cnn" else (MLP(), (1, 20))
    quantizer = (X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()) if config == "x86"
                 else XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=config.endswith("pc"))))
    example = torch.randn(*shape)
    prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
    for sample in calibration("x", list(shape)):
        prepared(torch.from_numpy(sample["x"]))
    torch.onnx.export(convert_pt2e(prepared), (example,), str(out), dynamo=True, opset_version=18)
    onnx.save(onnx.load(str(out)), str(out))  # the exporter's external data file, inlined
    out.with_name(out.name + ".data").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "_float"
    work.mkdir(exist_ok=True)
    nets = float_models(work)
    for tool, net, config in FILES:
        source, shape = nets.get(net, (None, None))
        target = args.out / f"{tool}_{net}_{config}.onnx"
        if tool == "pt2e":
            pt2e_file(net, config, target)
        else:
            (nncf_file if tool == "nncf" else quark_file)(source, shape, config, target)
        print("wrote", target)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
