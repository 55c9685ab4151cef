"""A QDQ model made by onnxruntime's static quantizer, from the float digits CNN.

    python -m models.qdq      # regenerates models/digits_cnn_qdq.onnx from the float checkpoint
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from models.data import load_digits_split
from models.export import cap_ir_version, export_float_onnx
from models.nets import MODELS, build_model, load_float_weights

MODELS_DIR = Path(__file__).resolve().parent
DIGITS_FLOAT_CHECKPOINT = MODELS_DIR / "checkpoints" / "digits_cnn_float.pt"
DIGITS_QDQ_PATH = MODELS_DIR / "digits_cnn_qdq.onnx"


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration images one batch at a time under the graph input's name."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self._batches = iter([{input_name: images[i: i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def make_digits_cnn_qdq(float_checkpoint: Path | str = DIGITS_FLOAT_CHECKPOINT, out_path: Path | str = DIGITS_QDQ_PATH,
                        per_channel: bool = False, calibration_batch: int = 128) -> Path:
    """Export the float digits CNN to plain ONNX (opset 13) and quantize it with onnxruntime.

    QDQ format, QInt8 weights (symmetric), QUInt8 activations (asymmetric: non-zero zero points),
    MinMax calibration on the whole digits train split. Returns the written path.
    """
    out_path = Path(out_path)
    model = load_float_weights(build_model("digits_cnn", None, None), float_checkpoint)
    images, _ = load_digits_split("train")
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "digits_cnn_float.onnx"
        proto = export_float_onnx(model, MODELS["digits_cnn"].input_shape, float_path)
        quantize_static(
            str(float_path), str(out_path),
            _ArrayReader(proto.graph.input[0].name, images, calibration_batch),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=per_channel,
        )
    onnx.save(cap_ir_version(onnx.load(str(out_path))), str(out_path))
    return out_path


if __name__ == "__main__":
    print(make_digits_cnn_qdq())
