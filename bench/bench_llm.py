"""Scale benchmark: a synthetic Llama-style decoder stack in QDQ W8A8 with external data.

``python -m bench.bench_llm --layers 2 --out /tmp/llm`` writes ``llama_L2.onnx`` (+ ``.onnx.data``) and
measures, side by side in one run (medians of ``--repeats`` runs, each command a fresh process):

- the floor: reading every weight tensor's bytes once with numpy (``np.fromfile``);
- ``a2q analyze --json``;
- ``a2q project --acc-bits P`` (attention's activation x activation MatMuls are ``--skip``ped: they
  have no weights to rewrite);

each as seconds, GB/s of weight bytes, ratio to the floor, and peak RSS (the command's own ``ru_maxrss``, see ``run_measured``)
against the largest single weight tensor. Each decoder layer is what onnxruntime's ``quantize_static``
writes for a Llama block: q/k/v/o projections whose ``[out, in]`` weights pass ``DequantizeLinear``
(int8, per output channel) and then a ``Transpose``; gate/up/down MLP weights stored ``[in, out]``;
activations quantized uint8 (zero point 128) before every weight MatMul; the attention scores
``Q K^T`` and ``softmax V`` are MatMuls of two quantized activations (int8 and uint8).

``--large-layers 12`` also builds a 12-layer stack (2.4 GB of weights) and analyses it once (the > 2 GB check).

``--full-stack --layers 32`` instead builds the full 7B stack (6.5 GB) in a measured child and runs once each: the
floor and ``analyze --json`` from a cold page cache (the data file's pages dropped) and warm, then ``verify`` at the
exact widths ``analyze`` reported; it deletes the files afterwards (``--keep`` leaves them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LLAMA_7B = {"hidden": 4096, "mlp": 11008, "heads": 32, "layers": 32}


class _Writer:
    """Builds the graph while appending each weight to the external data file (one tensor in memory)."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.data_path = data_path
        self.handle = open(data_path, "wb")
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.weights: list[tuple[int, int]] = []  # (offset, length) of every weight, for the floor
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, value: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape: tuple[int, int], stem: str) -> str:
        """Random int8 codes in [-127, 127] written straight to the data file, at a 4 KiB-aligned offset."""
        name = self.name(stem)
        codes = self.rng.integers(-127, 128, size=shape, dtype=np.int8)
        offset = -self.handle.tell() % 4096 + self.handle.tell()
        self.handle.write(b"\0" * (offset - self.handle.tell()))
        codes.tofile(self.handle)
        tensor = TensorProto(name=name, data_type=TensorProto.INT8, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(codes.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        self.weights.append((offset, codes.nbytes))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.name(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, x: str, scale: float, zero: int, dtype: type) -> str:
        """QuantizeLinear + DequantizeLinear of an activation (per tensor), as quantize_static writes it."""
        s = self.const(np.float32(scale), "act_scale")
        z = self.const(np.array(zero, dtype=dtype), "act_zp")
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z], "q"), s, z], "dq")

    def linear(self, x: str, fan_in: int, fan_out: int, stem: str, transposed: bool) -> str:
        """``x @ W`` with int8 per-output-channel weights; ``transposed``: stored ``[out, in]`` behind a Transpose."""
        scale = self.const(((self.rng.random(fan_out) + 0.5) / 127 / np.sqrt(fan_in)).astype(np.float32), "w_scale")
        zero = self.const(np.zeros(fan_out, dtype=np.int8), "w_zp")
        if transposed:
            codes = self.weight((fan_out, fan_in), stem)
            w = self.node("DequantizeLinear", [codes, scale, zero], "dqw", axis=0)
            w = self.node("Transpose", [w], "wT", perm=[1, 0])
        else:
            w = self.node("DequantizeLinear", [self.weight((fan_in, fan_out), stem), scale, zero], "dqw", axis=1)
        return self.node("MatMul", [x, w], stem)

    def decoder(self, x: str, seq: int, hidden: int, mlp: int, heads: int) -> str:
        head = hidden // heads
        h = self.qdq(x, 0.05, 128, np.uint8)
        q, k, v = (self.linear(h, hidden, hidden, stem, True) for stem in ("q_proj", "k_proj", "v_proj"))
        split = self.const(np.array([1, seq, heads, head], dtype=np.int64), "shape")
        q = self.node("Transpose", [self.node("Reshape", [q, split], "r")], "t", perm=[0, 2, 1, 3])
        k = self.node("Transpose", [self.node("Reshape", [k, split], "r")], "t", perm=[0, 2, 3, 1])
        v = self.node("Transpose", [self.node("Reshape", [v, split], "r")], "t", perm=[0, 2, 1, 3])
        scores = self.node("MatMul", [self.qdq(q, 0.05, 0, np.int8), self.qdq(k, 0.05, 0, np.int8)], "qk")
        probs = self.node("Softmax", [scores], "softmax", axis=-1)
        context = self.node("MatMul", [self.qdq(probs, 1 / 255, 0, np.uint8), self.qdq(v, 0.05, 0, np.int8)], "pv")
        merge = self.const(np.array([1, seq, hidden], dtype=np.int64), "shape")
        context = self.node("Reshape", [self.node("Transpose", [context], "t", perm=[0, 2, 1, 3]), merge], "r")
        x = self.node("Add", [x, self.linear(self.qdq(context, 0.05, 128, np.uint8), hidden, hidden, "o_proj", True)], "res")
        m = self.qdq(x, 0.05, 128, np.uint8)
        gate, up = self.linear(m, hidden, mlp, "gate_proj", False), self.linear(m, hidden, mlp, "up_proj", False)
        act = self.node("Mul", [self.node("Mul", [gate, self.node("Sigmoid", [gate], "sig")], "silu"), up], "glu")
        return self.node("Add", [x, self.linear(self.qdq(act, 0.05, 128, np.uint8), mlp, hidden, "down_proj", False)], "res")


def build_decoder_stack(path: Path, layers: int, hidden: int = 4096, mlp: int = 11008, heads: int = 32,
                        seq: int = 8, seed: int = 0) -> list[tuple[int, int]]:
    """Write the model to ``path`` and its weights to ``PATH.data``; returns each weight's ``(offset, length)``."""
    writer = _Writer(path.with_name(path.name + ".data"), seed)
    x = "hidden_states"
    with writer.handle:
        for _ in range(layers):
            x = writer.decoder(x, seq, hidden, mlp, heads)
    graph = helper.make_graph(writer.nodes, "llama_qdq_w8a8",
                              [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [1, seq, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, hidden])],
                              writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="bench_llm")
    path.write_bytes(model.SerializeToString())
    return writer.weights


def add_side_by_side_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """The options every two-checkout comparison on the decoder stack takes (bench/*_side_by_side.py)."""
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (with its own .venv)")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=LLAMA_7B["hidden"])
    parser.add_argument("--mlp", type=int, default=LLAMA_7B["mlp"])
    parser.add_argument("--heads", type=int, default=LLAMA_7B["heads"])


def read_floor(data_path: Path, weights: list[tuple[int, int]]) -> float:
    """Seconds to read every weight tensor's bytes once with numpy (a fresh array per tensor)."""
    start = time.perf_counter()
    with open(data_path, "rb") as handle:
        for offset, length in weights:
            handle.seek(offset)
            np.fromfile(handle, dtype=np.int8, count=length)
    return time.perf_counter() - start


# The measured command's parent: a bare interpreter (``python -S``, about 5 MB resident) that forks, execs the command
# and reports its ``(seconds, ru_maxrss in KiB, exit code)`` on file descriptor argv[1]. Linux starts a forked
# child's high-water mark at its parent's resident size and keeps it across exec, so a command spawned straight from
# the benchmark process (100+ MB after importing numpy and onnx) would report that size as its own peak.
_LAUNCHER = """
import os, sys, time
report, argv = int(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.close(report)  # the report's EOF must not wait for the command's own children
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(report, f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}".encode())
"""


def run_measured(argv: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, int, int]:
    """``(seconds, peak RSS bytes, exit code)`` of one command in a fresh process: its own peak, not this process's.

    ``stdout``: where the command's output goes (a file descriptor or file object; default discarded).
    """
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *argv], stdout=stdout,
                                 stderr=subprocess.PIPE, pass_fds=(write_end,))
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as report:
        _, errors = child.communicate()
        figures = report.read().split()
    if len(figures) != 3:
        raise RuntimeError(f"the launcher of {argv[0]} reported nothing: {errors.decode()[-2000:]}")
    seconds, rss_kib, code = figures
    if int(code) != 0:
        sys.stderr.write(errors.decode()[-2000:])
    return float(seconds), int(rss_kib) * 1024, int(code)


def measure(model: Path, weights: list[tuple[int, int]], commands: dict[str, list[str]],
            repeats: int, limits: dict[str, int] | None = None) -> dict[str, dict]:
    """Medians of ``repeats`` interleaved runs of the floor and each command (every figure sees the same load).

    ``limits``: fewer runs for some commands (``project`` of a full-size layer takes minutes).
    """
    data = model.with_name(model.name + ".data")
    read_floor(data, weights)  # warm the page cache: every run reads from it
    samples: dict[str, list[tuple[float, int, int]]] = {"floor": []}
    for index in range(repeats):
        samples["floor"].append((read_floor(data, weights), 0, 0))
        for name, argv in commands.items():
            if index < (limits or {}).get(name, repeats):
                samples.setdefault(name, []).append(run_measured(argv))
    total, largest = sum(n for _, n in weights), max(n for _, n in weights)
    floor = statistics.median(s for s, _, _ in samples["floor"])
    figures = {}
    for name, runs in samples.items():
        seconds = statistics.median(s for s, _, _ in runs)
        rss = max(r for _, r, _ in runs)
        figures[name] = {"runs": len(runs), "seconds": seconds, "gb_per_s": total / seconds / 1e9, "x_floor": seconds / floor,
                         "peak_rss_bytes": rss, "rss_over_largest": rss / largest,
                         "exit_codes": sorted({c for _, _, c in runs})}
    return figures


# Runs in a child measured like the commands: the generator's own time and peak RSS (it holds one tensor at a time).
_GENERATE = """
import json, sys
from pathlib import Path
from bench.bench_llm import build_decoder_stack
print(json.dumps(build_decoder_stack(Path(sys.argv[1]), *map(int, sys.argv[2:]))))
"""


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (``POSIX_FADV_DONTNEED``: no root, no other file touched)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())  # dirty pages are not dropped
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def full_stack(model: Path, layers: int, hidden: int, mlp: int, heads: int, keep: bool = False) -> dict:
    """Build the stack in a child, then time once each: the floor and ``analyze --json`` from a cold page cache,
    the same warm, and ``verify`` at the exact widths ``analyze`` reported (warm); the files are deleted after.

    Each figure: ``seconds``, ``peak_rss_bytes``, ``exit``; ``floor_*`` are numpy reads of every weight's bytes.
    """
    data = model.with_name(model.name + ".data")
    outputs = {name: model.with_name(f"{model.stem}.{name}.json") for name in ("generated", "cold", "warm", "verify")}
    widths = model.with_name(f"{model.stem}.widths.json")
    a2q = [sys.executable, "-m", "a2q_passes"]
    figures: dict[str, dict] = {}

    def run(name: str, argv: list[str], output: Path) -> None:
        with open(output, "w") as handle:
            seconds, rss, code = run_measured(argv, stdout=handle)
        figures[name] = {"seconds": seconds, "peak_rss_bytes": rss, "exit": code}
        print(f"{name}: {seconds:.1f} s, peak RSS {rss / 1e6:.0f} MB, exit {code}", flush=True)

    try:
        run("generate", [sys.executable, "-c", _GENERATE, str(model), str(layers), str(hidden), str(mlp), str(heads)],
            outputs["generated"])
        weights = [tuple(w) for w in json.loads(outputs["generated"].read_text())]
        evict(data)
        figures["floor, cold"] = {"seconds": read_floor(data, weights)}
        evict(data)
        run("analyze, cold", a2q + ["analyze", str(model), "--json"], outputs["cold"])
        read_floor(data, weights)  # warm
        figures["floor, warm"] = {"seconds": read_floor(data, weights)}
        run("analyze, warm", a2q + ["analyze", str(model), "--json"], outputs["warm"])
        report = json.loads(outputs["warm"].read_text())
        widths.write_text(json.dumps({layer["node"]: layer["bounds"]["exact"] for layer in report["layers"]}))
        run("verify, warm", a2q + ["verify", str(model), "--widths-json", str(widths), "--json"], outputs["verify"])
        verdict = json.loads(outputs["verify"].read_text())
        return {"layers": layers, "hidden": hidden, "mlp": mlp, "heads": heads, "weight_tensors": len(weights),
                "weight_bytes": sum(n for _, n in weights), "largest_tensor_bytes": max(n for _, n in weights),
                "mac_layers": len(report["layers"]),
                "analyze_outputs_identical": outputs["cold"].read_bytes() == outputs["warm"].read_bytes(),
                "verify_verdict": verdict["verdict"], "load_average": os.getloadavg(), "figures": figures}
    finally:
        if not keep:  # GBs: never left behind
            for path in (model, data, widths, *outputs.values()):
                path.unlink(missing_ok=True)


def full_stack_table(results: dict) -> list[str]:
    """One row per figure; commands are held against the floor read from the same page-cache state."""
    f, total = results["figures"], results["weight_bytes"]
    lines = [f"| {results['layers']} layers, {total / 1e9:.2f} GB | s | GB/s | x floor | peak RSS MB | "
             "RSS / largest tensor | exit |", "|---|---|---|---|---|---|---|"]
    for name, figure in f.items():
        floor = f.get("floor, cold" if "cold" in name else "floor, warm")
        ratio = f"{figure['seconds'] / floor['seconds']:.1f}" if floor and name not in ("generate",) else "-"
        rss = figure.get("peak_rss_bytes")
        memory = f"{rss / 1e6:.0f} | {rss / results['largest_tensor_bytes']:.1f}" if rss else "- | -"
        lines.append(f"| {name} | {figure['seconds']:.2f} | {total / figure['seconds'] / 1e9:.3f} | {ratio} | "
                     f"{memory} | {figure.get('exit', '-')} |")
    return lines


def table(figures: dict[str, dict], label: str) -> list[str]:
    lines = [f"| {label} | runs | median s | GB/s | x floor | peak RSS MB | RSS / largest tensor | exit |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        rss = f"{f['peak_rss_bytes'] / 1e6:.0f} | {f['rss_over_largest']:.1f}" if f["peak_rss_bytes"] else "- | -"
        lines.append(f"| {name} | {f['runs']} | {f['seconds']:.2f} | {f['gb_per_s']:.3f} | {f['x_floor']:.1f} | {rss} | "
                     f"{','.join(map(str, f['exit_codes']))} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=LLAMA_7B["hidden"])
    parser.add_argument("--mlp", type=int, default=LLAMA_7B["mlp"])
    parser.add_argument("--heads", type=int, default=LLAMA_7B["heads"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--project-repeats", type=int, help="runs of project (default: --repeats)")
    parser.add_argument("--acc-bits", type=int, default=16)
    parser.add_argument("--large-layers", type=int, default=0,
                        help="also build a stack this deep and analyze it once (12 layers: 2.4 GB of weights)")
    parser.add_argument("--full-stack", action="store_true",
                        help="instead: build the --layers stack in a child, time the floor and analyze once cold and "
                             "once warm, and verify at analyze's widths (warm), then delete it (--layers 32: 6.5 GB)")
    parser.add_argument("--keep", action="store_true", help="with --full-stack: keep the generated files")
    parser.add_argument("--out", type=Path, default=Path("/tmp/a2q_llm"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--markdown", type=Path, help="write the tables and the 7B extrapolation here")
    parser.add_argument("--render", type=Path, help="only rewrite --markdown from the --json of an earlier run")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        args.markdown.write_text(_markdown(results, _tables(results), results["argv"]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.full_stack:
        results = full_stack(args.out / f"llama_L{args.layers}_h{args.hidden}.onnx", args.layers, args.hidden,
                             args.mlp, args.heads, args.keep)
        results["argv"] = argv if argv is not None else sys.argv[1:]
        print("\n".join(full_stack_table(results)))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    a2q = [sys.executable, "-m", "a2q_passes"]
    model = args.out / f"llama_L{args.layers}_h{args.hidden}.onnx"
    weights = build_decoder_stack(model, args.layers, args.hidden, args.mlp, args.heads)
    total, largest = sum(n for _, n in weights), max(n for _, n in weights)
    print(f"{model}: {len(weights)} weight tensors, {total / 1e9:.3f} GB, largest {largest / 1e6:.1f} MB", flush=True)
    act_x_act = [n.name for n in onnx.load(str(model), load_external_data=False).graph.node
                 if n.op_type == "MatMul" and n.name.startswith(("qk", "pv"))]
    commands = {"analyze": a2q + ["analyze", str(model), "--json"],
                "project": a2q + ["project", str(model), str(args.out / "projected.onnx"), "--acc-bits",
                                  str(args.acc_bits)] + [arg for name in act_x_act for arg in ("--skip", name)]}
    results = {"argv": argv if argv is not None else sys.argv[1:], "layers": args.layers, "hidden": args.hidden, "mlp": args.mlp, "heads": args.heads,
               "weight_bytes": total, "largest_tensor_bytes": largest, "repeats": args.repeats,
               "acc_bits": args.acc_bits, "figures": measure(model, weights, commands, args.repeats,
                                                             {"project": args.project_repeats or args.repeats})}
    if args.large_layers:
        large = args.out / f"llama_L{args.large_layers}_h{args.hidden}.onnx"
        large_weights = build_decoder_stack(large, args.large_layers, args.hidden, args.mlp, args.heads)
        large_total = sum(n for _, n in large_weights)
        figures = measure(large, large_weights, {"analyze": a2q + ["analyze", str(large), "--json"]}, 1)
        results["large"] = {"layers": args.large_layers, "weight_bytes": large_total, "figures": figures}
        for path in (large, large.with_name(large.name + ".data")):
            path.unlink()
    results["load_average"] = os.getloadavg()  # 1, 5, 15 min: other jobs on the machine slow every figure alike
    lines = _tables(results)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(_markdown(results, lines, results["argv"]))


def _tables(results: dict) -> list[str]:
    lines = table(results["figures"], f"{results['layers']} layers, {results['weight_bytes'] / 1e9:.2f} GB")
    if "large" in results:
        big = results["large"]
        lines += ["", *table(big["figures"], f"{big['layers']} layers, {big['weight_bytes'] / 1e9:.2f} GB (once)")]
    return lines


def _markdown(results: dict, lines: list[str], argv: list[str]) -> str:
    """The tables, the targets they are held against, and the full 32-layer stack extrapolated from them."""
    per_layer = results["weight_bytes"] / results["layers"]
    full = per_layer * LLAMA_7B["layers"]
    f = results["figures"]
    analyze_rate = f["analyze"]["gb_per_s"]
    if "large" in results:  # two depths: separate the fixed start-up from the per-byte time
        big = results["large"]
        slope = ((big["figures"]["analyze"]["seconds"] - f["analyze"]["seconds"])
                 / ((big["weight_bytes"] - results["weight_bytes"]) / 1e9))
        fixed = f["analyze"]["seconds"] - slope * results["weight_bytes"] / 1e9
        analyze_full = f"{fixed + slope * full / 1e9:.0f} s (start-up {fixed:.1f} s + {slope:.2f} s/GB, from the two depths)"
    else:
        analyze_full = f"{full / 1e9 / analyze_rate:.0f} s (at the measured {analyze_rate:.2f} GB/s)"
    project_full = full / 1e9 / f["project"]["gb_per_s"]
    largest = results["largest_tensor_bytes"]
    target_rss = 1.5 * largest + 1e9
    rss_analyze = max([f["analyze"]["peak_rss_bytes"]] + ([results["large"]["figures"]["analyze"]["peak_rss_bytes"]]
                                                          if "large" in results else []))
    verdicts = [
        f"analyze peak RSS {'meets' if rss_analyze <= target_rss else 'misses'} the memory target "
        f"({rss_analyze / 1e6:.0f} MB at most" + (f", {f['analyze']['peak_rss_bytes'] / 1e6:.0f} MB at {results['layers']} "
                                                  f"layers and {results['large']['figures']['analyze']['peak_rss_bytes'] / 1e6:.0f} "
                                                  f"MB at {results['large']['layers']}: it does not grow with depth"
                                                  if "large" in results else "") + ")",
        f"project peak RSS {'meets' if f['project']['peak_rss_bytes'] <= target_rss else 'misses'} it "
        f"({f['project']['peak_rss_bytes'] / 1e6:.0f} MB, measured at {results['layers']} layers only)",
        f"analyze {'meets' if f['analyze']['x_floor'] <= 3 else 'misses'} the time target ({f['analyze']['x_floor']:.1f} x floor)",
        f"project {'meets' if f['project']['x_floor'] <= 10 else 'misses'} it ({f['project']['x_floor']:.0f} x floor)",
    ]
    load = results.get("load_average")
    return "\n".join([
        "# Scale",
        "",
        f"Synthetic Llama-style decoder stack in QDQ W8A8 (hidden {results['hidden']}, MLP {results['mlp']}, "
        f"{results['heads']} heads; per-channel int8 weights in an external data file, q/k/v/o behind "
        "`DequantizeLinear` + `Transpose` as onnxruntime writes them, uint8 activations, attention's two "
        f"activation x activation MatMuls per layer skipped by `project`). Command: `.venv/bin/python -m "
        f"bench.bench_llm {' '.join(argv)}`; medians of interleaved runs (column `runs`), each a fresh process "
        "(start-up included: imports take about 4 s on this machine); `floor` is reading every weight "
        "tensor's bytes once with numpy from the page cache; peak RSS is the command's own `ru_maxrss` (memory-mapped "
        f"weight pages it touched included). `project --acc-bits {results['acc_bits']}` changes every weight layer.",
        "",
        *lines,
        "",
        f"Targets (issue 13): peak RSS <= 1.5 x the largest tensor ({largest / 1e6:.0f} MB) + under 1 GB, i.e. "
        f"{target_rss / 1e6:.0f} MB; analyze <= 3 x floor; project <= 10 x floor. Here: " + "; ".join(verdicts) + "."
        + (f" Load average recorded with the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
           f"{os.cpu_count()} cores, shared with other jobs." if load else ""),
        "",
        f"Full 32-layer stack on paper ({full / 1e9:.2f} GB of decoder weights; embeddings and the LM head are not "
        f"MAC layers the tool rewrites): tensors are read and written one at a time, so memory is set by the "
        f"largest tensor (the same {largest / 1e6:.0f} MB at every depth), not by the depth; analyze about "
        f"{analyze_full}; project about {project_full / 60:.0f} min at the measured "
        f"{f['project']['gb_per_s'] * 1e3:.2f} MB/s.",
        "",
    ])


if __name__ == "__main__":
    main()
