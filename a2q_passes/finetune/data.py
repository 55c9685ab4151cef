"""Training / calibration data for fine-tuning: ``.npz`` files or Python iterables, checked against the model.

An ``.npz`` holds ``x`` (samples, the model input without its batch dimension) and optionally
``y``: integer class labels for ``--loss ce``, target arrays shaped like the model output for
``mse``/``l1``. Without ``y`` the targets come from the original model (``--distill``).
Every problem is reported before training starts, naming the file and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.infer_shapes import InferShapes

from a2q_passes.errors import A2QError
from a2q_passes.model_io import data_inputs
from a2q_passes.npz_data import read_npz

LOSSES = ("ce", "mse", "l1")


@dataclass
class Dataset:
    """Samples ``x`` (float32, ``(N, *input_shape)``) and optional targets ``y``; ``name`` is used in messages."""

    x: np.ndarray
    y: np.ndarray | None
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_npz(path: str | Path) -> Dataset:
    """Read ``x`` (and ``y`` if present) from an ``.npz`` file."""
    arrays = read_npz(path, "an array 'x' of inputs (and 'y' of labels or targets)")
    if "x" not in arrays:
        raise A2QError(f"{path}: no array named 'x' (found: {', '.join(sorted(arrays)) or 'none'}); "
                       "save the inputs as numpy.savez(path, x=inputs, y=labels)")
    return Dataset(arrays["x"], arrays.get("y"), str(path))


def from_iterable(batches: Iterable[Any], name: str = "iterable data") -> Dataset:
    """Collect an iterable of ``x`` batches or ``(x, y)`` batches (numpy arrays or torch tensors)."""
    xs, ys = [], []
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise A2QError(f"{name}: each item must be x or (x, y), got a sequence of {len(batch)}")
            xs.append(_as_array(batch[0]))
            ys.append(_as_array(batch[1]))
        else:
            xs.append(_as_array(batch))
    if ys and len(ys) != len(xs):
        raise A2QError(f"{name}: some batches have labels and some do not")
    if not xs:
        return Dataset(np.zeros((0,), dtype=np.float32), None, name)
    return Dataset(np.concatenate(xs), np.concatenate(ys) if ys else None, name)


def as_dataset(data: Dataset | str | Path | tuple | np.ndarray | Iterable[Any], name: str = "data") -> Dataset:
    """A :class:`Dataset` from a dataset, an ``.npz`` path, an ``(x, y)`` tuple, an array, or an iterable."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_npz(data)
    if isinstance(data, tuple) and len(data) == 2:
        return Dataset(_as_array(data[0]), None if data[1] is None else _as_array(data[1]), name)
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        return Dataset(_as_array(data), None, name)
    return from_iterable(data, name)


@dataclass(frozen=True)
class ModelIO:
    """The single input and output of a model, per sample (without the batch dimension)."""

    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...] | None  # None where the graph does not declare it

    @classmethod
    def of(cls, model: ModelWrapper) -> "ModelIO":
        inputs = data_inputs(model.graph)
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise A2QError(f"fine-tuning and allocation (which scores on data) need a model with one input and one "
                           f"output; this one has inputs {[i.name for i in inputs]} and outputs "
                           f"{[o.name for o in model.graph.output]}")
        output = model.graph.output[0]
        if _sample_shape(output) is None:  # not declared: let qonnx infer it
            output = model.transform(InferShapes()).graph.output[0]
        return cls(inputs[0].name, _sample_shape(inputs[0]) or (), output.name, _sample_shape(output))


def _sample_shape(info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    dims = info.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
        return None
    return tuple(int(d.dim_value) for d in dims[1:])


def validate(data: Dataset, io: ModelIO, loss: str, needs_labels: bool) -> Dataset:
    """Check ``data`` against the model and the loss; returns it with ``x`` as float32 and ``y`` typed.

    ``needs_labels``: training without ``--distill`` needs ``y``; validation data may omit it (it
    is then scored against the original model's outputs).
    """
    if loss not in LOSSES:
        raise A2QError(f"unknown loss '{loss}'; choose one of {', '.join(LOSSES)}")
    x = data.x
    if x.ndim == 0 or x.shape[0] == 0:
        raise A2QError(f"{data.name}: 'x' holds no samples; give at least one input of shape {io.input_shape}")
    if x.dtype.kind not in "fiub":
        raise A2QError(f"{data.name}: 'x' has dtype {x.dtype}; expected numbers")
    if tuple(x.shape[1:]) != io.input_shape:
        raise A2QError(f"{data.name}: 'x' has samples of shape {tuple(x.shape[1:])} (array {tuple(x.shape)}), but "
                       f"the model input '{io.input_name}' expects samples of shape {io.input_shape}: "
                       f"store x as an array of shape (N, {', '.join(map(str, io.input_shape))})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise A2QError(f"{data.name}: 'x' contains NaN or infinity in {bad} sample(s); clean the data first")
    y = data.y
    if y is None:
        if needs_labels:
            raise A2QError(f"{data.name}: no 'y' array (targets); add labels, or pass --distill to train on "
                           "the original model's outputs")
        return Dataset(x, None, data.name)
    if y.shape[:1] != x.shape[:1]:
        raise A2QError(f"{data.name}: 'x' has {len(x)} samples but 'y' has {y.shape[0] if y.ndim else 0}")
    return Dataset(x, _check_targets(y, io, loss, data.name), data.name)


def split_held_out(data: Dataset, calibration: int, held_out: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """``(calibration, held-out)`` samples of ``data``, disjoint, drawn in an order shuffled with ``seed``.

    The held-out part takes at most half of ``data`` (None when that is no sample, or ``held_out`` is 0);
    the calibration part takes up to ``calibration`` of the rest. Drawing from the whole of ``data``
    rather than its first samples keeps files sorted by class from calibrating on a few classes.
    """
    order = np.random.default_rng(seed).permutation(len(data))
    n_held = min(held_out, len(data) // 2)
    n_cal = min(calibration, len(data) - n_held)

    def part(index: np.ndarray, what: str) -> Dataset:
        return Dataset(data.x[index], None if data.y is None else data.y[index], f"{data.name} ({what})")

    calibration_part = part(order[n_held:n_held + n_cal], "calibration")
    return calibration_part, (part(order[:n_held], "held-out") if n_held else None)


def _check_targets(y: np.ndarray, io: ModelIO, loss: str, name: str) -> np.ndarray:
    out = io.output_shape
    if loss == "ce":
        if out is None or len(out) != 1:
            raise A2QError(f"--loss ce needs a model output of shape (N, classes); output '{io.output_name}' "
                           f"has sample shape {out}; use --loss mse or l1 for other outputs")
        if y.ndim != 1:
            raise A2QError(f"{name}: 'y' must hold one integer class label per sample (shape (N,)), got {y.shape}")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
                raise A2QError(f"{name}: 'y' holds non-integer labels; --loss ce needs class indices")
        elif y.dtype.kind not in "iub":
            raise A2QError(f"{name}: 'y' has dtype {y.dtype}; --loss ce needs integer class indices")
        classes = out[0]
        bad = (y < 0) | (y >= classes)
        if bad.any():
            raise A2QError(f"{name}: {int(bad.sum())} label(s) outside [0, {classes - 1}] (e.g. {y[bad][0]}); the model "
                           f"output '{io.output_name}' has {classes} classes")
        return y.astype(np.int64)
    if y.dtype.kind not in "fiub":
        raise A2QError(f"{name}: 'y' has dtype {y.dtype}; --loss {loss} needs numeric targets")
    if out is not None and tuple(y.shape[1:]) != out:
        raise A2QError(f"{name}: 'y' has targets of shape {tuple(y.shape[1:])}, but the model output "
                       f"'{io.output_name}' has samples of shape {out}")
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise A2QError(f"{name}: 'y' contains NaN or infinity; clean the targets first")
    return y
