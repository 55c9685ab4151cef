"""Fine-tuning under torchrun with 2 processes (DDP, gloo on loopback): data is sharded, both ranks end with
identical weights, only rank 0 prints and writes, and the written model verifies at P.

The test launches ``torch.distributed.run`` on this file; run as a script, the file is the worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ACC_BITS = 12
SAMPLES, BATCH = 192, 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp(tmp_path):
    from a2q_passes.verification import verify_model
    from a2q_passes.model_io import load_model
    from tests.test_finetune import digits_data, digits_model

    digits_model().save(str(tmp_path / "in.onnx"))
    x, y = digits_data("train", SAMPLES)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", str(Path(__file__).resolve()), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["is_main"] for r in ranks] == [True, False]
    assert all(r["world_size"] == 2 for r in ranks)
    # each rank sees half of the data: half the optimizer steps of a single process
    assert [r["steps"] for r in ranks] == [SAMPLES // 2 // BATCH] * 2
    assert (tmp_path / "rank0.onnx").read_bytes() == (tmp_path / "rank1.onnx").read_bytes()
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "rank0.onnx").read_bytes()
    assert done.stdout.count("best epoch") == 1  # only rank 0 logs
    assert verify_model(load_model(tmp_path / "out.onnx"), ACC_BITS).overflow_impossible


def _worker(workdir: Path) -> None:
    import torch

    from a2q_passes.finetune.train import FinetuneConfig
    from a2q_passes.model_io import load_model, model_bytes, save_model
    from a2q_passes.transforms.finetune import FinetuneAccumulators

    torch.set_num_threads(1)
    steps = []
    step = FinetuneAccumulators(ACC_BITS, workdir / "train.npz", None,
                                FinetuneConfig(epochs=1, batch_size=BATCH, device="cpu", progress=False, log=print),
                                callback=lambda i, constraint: steps.append(i))
    result = step(load_model(workdir / "in.onnx"))
    rank = int(os.environ["RANK"])
    (workdir / f"rank{rank}.onnx").write_bytes(model_bytes(result.model))
    if result.details["is_main"]:
        save_model(result.model, workdir / "out.onnx")
    info = {"is_main": result.details["is_main"], "world_size": int(os.environ["WORLD_SIZE"]), "steps": len(steps)}
    (workdir / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
