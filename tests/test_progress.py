"""Per-layer progress bars of the command line: on a terminal only, never in pipes, files or the library.

The bars wait ``progress.DELAY_S`` seconds before they show; the bundled models finish sooner, so the commands here
run through a launcher that sets it to 0.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from a2q_passes import progress

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fmnist_cnn_w4a4.onnx"
_LAUNCHER = "import sys; from a2q_passes import progress; progress.DELAY_S = 0.0\n" \
            "from a2q_passes.cli import main; sys.argv = ['a2q', *sys.argv[1:]]; main()"


def _stderr_of(args: list[str], terminal: bool) -> tuple[int, str, bytes]:
    """Exit code, stderr and stdout of ``a2q ARGS`` with stderr on a pseudo-terminal or on a pipe."""
    if not terminal:
        run = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=ROOT, capture_output=True, timeout=300)
        return run.returncode, run.stderr.decode(), run.stdout
    main_fd, child_fd = pty.openpty()
    # a fresh pseudo-terminal is 0 columns wide, where tqdm draws an empty bar: give it a terminal's size
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    child = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=child_fd)
    os.close(child_fd)
    seen = b""
    while True:  # read while it runs: a full terminal buffer would block the child
        ready, _, _ = select.select([main_fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the child closed its end
                chunk = b""
            seen += chunk
            if not chunk and child.poll() is not None:
                break
        elif child.poll() is not None:
            break
    stdout = child.stdout.read()
    child.wait(timeout=300)
    os.close(main_fd)
    return child.returncode, seen.decode(errors="replace"), stdout


def test_project_shows_per_layer_bars_on_a_terminal(tmp_path):
    code, stderr, _ = _stderr_of(["project", str(MODEL), str(tmp_path / "out.onnx"), "--acc-bits", "12"], True)
    assert code == 0, stderr
    assert re.search(r"project:\s+\d+%\|.*\| \d/5 \[", stderr)  # fmnist_cnn: 5 MAC layers
    assert re.search(r"project: certificate:\s+\d+%\|", stderr)


def test_verify_shows_bars_on_a_terminal():
    code, stderr, _ = _stderr_of(["verify", str(MODEL), "--acc-bits", "32"], True)
    assert code == 0, stderr
    assert re.search(r"verify:\s+\d+%\|.*\| \d/5 \[", stderr)
    assert re.search(r"verify: certificate:\s+\d+%\|", stderr)


def test_no_bar_where_stderr_is_a_pipe_and_the_output_is_the_same(tmp_path):
    outputs = []
    for terminal in (False, True):
        out = tmp_path / f"out_{terminal}.onnx"
        code, stderr, stdout = _stderr_of(["project", str(MODEL), str(out), "--acc-bits", "12", "--json"], terminal)
        assert code == 0, stderr
        if not terminal:
            assert "%|" not in stderr and "layer/s" not in stderr
        outputs.append((out.read_bytes(), stdout.replace(str(out).encode(), b"OUT")))
    assert outputs[0] == outputs[1]  # the bars change neither the model nor the JSON report


def test_library_shows_no_bar_unless_asked(capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    assert list(progress.over_layers(range(3), "quiet")) == [0, 1, 2]
    with progress.shown():
        assert list(progress.over_layers(iter(range(3)), "asked")) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err


@pytest.mark.parametrize("enabled", [True, False])
def test_shown_restores_the_setting(enabled):
    with progress.shown(enabled):
        with progress.shown(not enabled):
            pass
        assert progress._SHOWN.get() is enabled
    assert progress._SHOWN.get() is False


def test_verify_data_shows_a_bar_over_its_batches(tmp_path):
    """``verify --data`` runs the graph a batch at a time (one sample at a time where the graph fixes its batch):
    long data shows its progress."""
    import numpy as np

    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, size=(1030, 1, 28, 28)).astype(np.float32))
    code, stderr, _ = _stderr_of(["verify", str(MODEL), "--acc-bits", "32", "--data", str(data)], True)
    assert code == 0, stderr
    assert re.search(r"verify --data:\s+\d+%\|.*\| \d/3 \[", stderr)  # 1030 samples: 3 batches of up to 512
