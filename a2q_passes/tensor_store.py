"""Initializer values, one tensor at a time: large external tensors stay in their data file (memory-mapped
when read), and rewritten ones are spilled to a private scratch folder until the model is saved."""

from __future__ import annotations

import atexit
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes.errors import A2QError
from a2q_passes.output_files import pid_alive
from a2q_passes.read_only_model import ReadOnlyModel


def attach_external_data(proto: onnx.ModelProto, path: Path, stream_min_bytes: int | None) -> None:
    """Read external tensors smaller than ``stream_min_bytes`` (all with ``None``); point the others at their file.

    A streamed tensor keeps its ``external_data`` entries, with ``location`` made absolute: onnx's own
    readers refuse an absolute location, so a reader that bypasses :func:`initializer_value` fails
    loudly instead of reading a file relative to the working folder. A missing, short or outside
    data file names the tensor and the file.
    """
    folder = path.parent.resolve()
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor):
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "?")
        data_file = (folder / location).resolve()
        try:
            if not data_file.is_relative_to(folder):
                raise ValueError("the location leaves the model's folder")
            size = data_file.stat().st_size
            offset = int(entries.get("offset", 0))
            length = int(entries.get("length", size - offset))
            expected = stored_bytes(tensor)
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"bytes {offset}..{offset + length} requested, the file has {size}")
            if expected is not None and expected != length:
                raise ValueError(f"{length} bytes stored, the tensor's shape and type need {expected}")
            if stream_min_bytes is None or length < stream_min_bytes:
                load_external_data_for_tensor(tensor, str(folder))
                continue
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise A2QError(
                f"{path}: initializer '{tensor.name}' is stored in the external data file '{location}', which "
                f"cannot be read ({str(err).strip().splitlines()[0]}); keep that file, complete, next to the "
                "model (or save the model with its data inline)") from err
        point_external(tensor, data_file, offset, length)


def point_external(tensor: onnx.TensorProto, data_file: Path, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference to ``length`` bytes at ``offset`` of ``data_file`` (an absolute path)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(data_file)), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the raw data of ``tensor`` takes (``None`` for types whose size this does not know)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# ---------------------------------------------------------------------------------------------
# The one accessor for initializer values: every reader (layers, certificate, verification) and
# every writer of weights goes through it, so a streamed tensor is read one at a time.


def initializer_proto(model: ModelWrapper | onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    if isinstance(model, ReadOnlyModel):
        return model.initializers.get(name)
    graph = model.graph if isinstance(model, (ModelWrapper, onnx.ModelProto)) else model
    return next((tensor for tensor in graph.initializer if tensor.name == name), None)


def is_streamed(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` still lives in a data file (see :func:`attach_external_data`)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of ``tensor``; a streamed one memory-mapped read-only from its data file (no copy)."""
    if not is_streamed(tensor):
        return numpy_helper.to_array(tensor)
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(entries["offset"]), int(entries["length"])
    with open(entries["location"], "rb") as handle:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(handle.fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or dtype.kind not in "biuf":
        # packed or exotic storage: let onnx unpack a copy of this one tensor
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = mapped[offset - start:offset - start + length]
        return numpy_helper.to_array(inline)
    count = length // dtype.itemsize
    return np.frombuffer(mapped, dtype=dtype.newbyteorder("<"), count=count, offset=offset - start).reshape(tuple(tensor.dims))


def initializer_value(model: ModelWrapper | onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of initializer ``name`` (``None`` if there is none); streamed tensors are memory-mapped, read-only."""
    tensor = initializer_proto(model, name)
    return None if tensor is None else tensor_value(tensor)


def initializer_shape(model: ModelWrapper | onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    """The shape of initializer ``name`` without reading its values."""
    tensor = initializer_proto(model, name)
    return None if tensor is None else tuple(int(d) for d in tensor.dims)


def check_in_memory(model: ModelWrapper | onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` of a model in memory; raises ``onnx.checker.ValidationError``.

    Streamed tensors are checked as graph inputs of their type and shape: the checker would look
    for their data files relative to the working folder (a proto has no folder of its own). Their
    data were checked against that type and shape when read (:func:`attach_external_data`) or
    written from an array of it (:func:`set_initializer_value`).
    """
    proto = model.model if isinstance(model, ModelWrapper) else model
    if any(is_streamed(tensor) for tensor in proto.graph.initializer):
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)  # the streamed tensors' data are not in it: a small copy
        del graph.initializer[:]
        listed = {info.name for info in graph.input}
        for tensor in proto.graph.initializer:
            if not is_streamed(tensor):
                graph.initializer.append(tensor)
            elif tensor.name not in listed:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        checked = onnx.ModelProto()
        checked.CopyFrom(proto)
        checked.graph.CopyFrom(graph)
        proto = checked
    onnx.checker.check_model(proto)


def set_initializer_value(model: ModelWrapper, name: str, value: np.ndarray) -> None:
    """Store ``value`` as initializer ``name``; a streamed tensor stays streamed (spilled to a scratch file).

    Why spill: ``project`` rewrites every layer of a model that may not fit in memory; each new
    tensor goes to disk as soon as it is made and is copied into the output's data file on save.
    """
    tensor = initializer_proto(model, name)
    if tensor is None or not is_streamed(tensor):
        model.set_initializer(name, value)
        return
    value = np.ascontiguousarray(value)
    if tuple(value.shape) != tuple(tensor.dims):
        raise ValueError(f"initializer '{name}': new shape {value.shape} differs from the stored {tuple(tensor.dims)}")
    spilled = numpy_helper.from_array(value, name) if value.dtype.kind not in "biuf" else None
    handle = tempfile.NamedTemporaryFile(dir=_scratch_folder(), suffix=".bin", delete=False)
    with handle:
        if spilled is None:
            value.astype(value.dtype.newbyteorder("<"), copy=False).tofile(handle)
            data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        else:
            handle.write(spilled.raw_data)
            data_type = spilled.data_type
    tensor.data_type = data_type
    point_external(tensor, Path(handle.name), 0, Path(handle.name).stat().st_size)


# ``a2q-tensors-<pid>-<random>`` in the temporary folder: the pid tells a later run whether its owner still runs.
_SCRATCH_PREFIX = "a2q-tensors-"
_SCRATCH: list[Path] = []  # the scratch folder of this process, made at its first spill


def _scratch_folder() -> Path:
    """A private folder for spilled tensors, removed by :func:`remove_scratch` (see :func:`scratch_space`)."""
    if not _SCRATCH:
        remove_stale_scratch()
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")))
    return _SCRATCH[0]


def remove_scratch() -> None:
    """Delete this process's spilled tensors; a tensor still pointing there can no longer be read."""
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


atexit.register(remove_scratch)  # library use outside scratch_space: removed when the interpreter exits


@contextmanager
def scratch_space() -> Iterator[None]:
    """Run a command: the tensors it spills are removed when the block ends, however it ends.

    An exception, Ctrl-C (``KeyboardInterrupt``) and SIGTERM (the CLI raises ``SystemExit`` for it)
    all unwind through here; a run killed with SIGKILL leaves its folder to :func:`remove_stale_scratch`.
    """
    try:
        yield
    finally:
        remove_scratch()


def remove_stale_scratch() -> list[Path]:
    """Delete the scratch folders of processes that no longer run; returns what was removed."""
    pattern = re.compile(rf"{re.escape(_SCRATCH_PREFIX)}(\d+)-[^-]+")
    removed = []
    for candidate in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*"):
        match = pattern.fullmatch(candidate.name)
        if match is not None and candidate.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


