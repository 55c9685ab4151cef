"""A layer's row blocks projected on several threads: the same bits as one thread, and bounded memory.

Blocks are made small here (``row_blocks._BLOCK_ELEMENTS``) so that a small layer splits into many of them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from a2q_passes import kernels, methods, projection, projection_stats, row_blocks
from a2q_passes.bounds import IntRange
from tests.test_kernels import COMPILED, NUMPY, WEIGHT_RANGES, assert_same_result, brute_fits, code_rows, real_rows


@pytest.mark.parametrize("path", [NUMPY, COMPILED], ids=["numpy", "kernels"])
@pytest.mark.parametrize("x", [IntRange(0, 255), IntRange(-128, 127), IntRange(2, 9)], ids=str)
def test_threads_give_the_same_bits_as_one_thread(monkeypatch, path, x):
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", path)
    monkeypatch.setattr(row_blocks, "_BLOCK_ELEMENTS", 3 * 97)  # 3 rows a block: 40 rows -> 14 blocks
    weight_range = WEIGHT_RANGES["int4"]
    rng = np.random.default_rng(x.hi)
    for v in (code_rows(rng, weight_range, rows=40), real_rows(rng, weight_range, rows=40)):
        bits = projection.min_feasible_acc_bits(x, weight_range) + 3
        for method in ("exact", "a2q", "a2q+"):
            with row_blocks.projection_threads(1):
                alone = methods.project_weights(v, x, bits, weight_range, method)
            with row_blocks.projection_threads(4):
                threaded = methods.project_weights(v, x, bits, weight_range, method)
            assert alone.touched.sum() > 10  # many blocks had rows to project
            assert_same_result(alone, threaded)
            assert brute_fits(threaded.weights, x, threaded.acc_limits)


def test_statistics_of_many_blocks_are_the_same_on_threads(monkeypatch):
    """projection_stats sums its blocks' exact integer figures in order: the same figures for any thread count,
    and the same as numpy's."""
    monkeypatch.setattr(row_blocks, "_BLOCK_ELEMENTS", 2 * 97)
    weight_range, x = WEIGHT_RANGES["int4"], IntRange(0, 255)
    v = code_rows(np.random.default_rng(5), weight_range, rows=40)
    before = projection.plain_round(v, weight_range)
    after = methods.project_weights(v, x, projection.min_feasible_acc_bits(x, weight_range) + 3, weight_range,
                                    "exact").weights
    figures = []
    for path, threads in ((NUMPY, 1), (COMPILED, 1), (COMPILED, 4)):
        monkeypatch.setattr(kernels, "MIN_ELEMENTS", path)
        with row_blocks.projection_threads(threads):
            figures.append(projection_stats.projection_stats(before, after, v))
    assert figures[0]["rows_touched"] > 10
    assert figures[0] == figures[1] == figures[2]


def test_at_most_one_result_per_thread_waits():
    """The consumer is slow: finished blocks must not pile up (each would hold a block of projected rows)."""
    lock, finished, consumed, waiting = threading.Lock(), [0], [0], []

    def work(item: int) -> int:
        with lock:
            finished[0] += 1
            waiting.append(finished[0] - consumed[0])
        return item * item

    with row_blocks.projection_threads(3):
        results = []
        for value in row_blocks.in_order(work, list(range(30))):
            time.sleep(0.002)
            with lock:
                consumed[0] += 1
            results.append(value)
    assert results == [i * i for i in range(30)]  # in order
    assert max(waiting) <= 4  # 3 threads + the one result being handed over


def test_thread_count_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        with row_blocks.projection_threads(0):
            pass


def test_cli_output_is_byte_identical_for_any_thread_count(monkeypatch, tmp_path):
    """`a2q project --threads N` on a bundled model split into many blocks: the same file for 1 and 3 threads."""
    from tests.cli_helpers import digest, run_cli

    monkeypatch.setattr(row_blocks, "_BLOCK_ELEMENTS", 1 << 10)  # fmnist_cnn's largest layer: dozens of blocks
    model = Path(__file__).resolve().parent.parent / "models" / "fmnist_cnn_w4a4.onnx"
    written = []
    for threads in ("1", "3"):
        out = tmp_path / f"threads{threads}.onnx"
        code, _, err = run_cli("project", model, out, "--acc-bits", "12", "--threads", threads)
        assert code == 0, err
        written.append(digest(out))
    assert written[0] == written[1]
    code, _, err = run_cli("project", model, tmp_path / "zero.onnx", "--acc-bits", "12", "--threads", "0")
    assert code != 0 and "--threads must be at least 1" in err and not (tmp_path / "zero.onnx").exists()
