"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

# `make test` runs two pytest workers on CI's two cores: one thread each for OpenMP (torch) and OpenBLAS
# (numpy), set before either is imported. Their default, a thread per core in both workers, oversubscribes
# the cores (with the onnxruntime change below: 8-14% of the fuzz and lowering tests' time, bench/reliability.md).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from types import SimpleNamespace  # noqa: E402

import onnxruntime  # noqa: E402
import pytest  # noqa: E402

from a2q_passes.cli import main  # noqa: E402


def _one_thread_onnxruntime_sessions() -> None:
    """onnxruntime's sessions on one thread unless their caller chose: qonnx's executor makes a session per node
    it executes, and each default session starts a spinning pool of a thread per core in both workers. Results
    do not depend on the thread count."""
    create = onnxruntime.InferenceSession.__init__

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        if options.intra_op_num_threads == 0:
            options.intra_op_num_threads = 1
        if options.inter_op_num_threads == 0:
            options.inter_op_num_threads = 1
        create(self, path_or_bytes, options, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = init


_one_thread_onnxruntime_sessions()


@pytest.fixture
def a2q(capsys, monkeypatch):
    """The real ``a2q`` entry point (``main``), in-process: a subprocess per call pays seconds of imports,
    and monkeypatched readers are the ones it uses. Returns ``run(*args)`` -> returncode/stdout/stderr.
    """

    def run(*args):
        monkeypatch.setattr("sys.argv", ["a2q", *map(str, args)])
        capsys.readouterr()  # drop what the test printed before
        with pytest.raises(SystemExit) as stop:
            main()
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=stop.value.code or 0, stdout=captured.out, stderr=captured.err)

    return run
