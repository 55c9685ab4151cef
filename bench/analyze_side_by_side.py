"""``a2q analyze`` (and ``verify``) from two checkouts, side by side in one run, on the synthetic Llama-style stack.

``python -m bench.analyze_side_by_side --baseline /tmp/anaperf_base --layers 2 --repeats 3`` builds the stack
(full Llama-7B layer shapes by default), then measures in each of ``--repeats`` interleaved rounds, every
command a fresh process started in its checkout (so it imports that checkout's package, with its own ``.venv``):

- the floor: reading every weight tensor's bytes once with numpy (``bench_llm.read_floor``), before each command;
- ``a2q analyze --json`` (the CLI: start-up included);
- in-process: the same child imports the package first, then times only ``load_model`` + ``AnalyzeAccumulators``;
- ``a2q --version`` (start-up alone);
- with ``--verify``: ``a2q verify --widths-json W --json`` at the exact width ``analyze`` reports for every layer
  (the baseline's ``analyze --json``), start-up included.

``--cold``: every floor and every command reads from a cold page cache (the data file's pages dropped before each,
``bench_llm.evict``: no root needed, nothing else touched); the default is warm (every byte in the page cache).

``--kinds analyze,verify`` measures only those (default: all four with ``--verify``, the first three without).
Prints medians (seconds, ratio to the floor, GB/s of weight bytes) and peak RSS (the command's own maximum resident
size from ``bench_llm.run_measured``, the largest over the rounds) as JSON, and whether both checkouts print the same
``analyze --json`` (and ``verify --json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_llm import add_side_by_side_arguments, build_decoder_stack, evict, read_floor, run_measured

# Runs in the child after its imports; prints the seconds of reading and analysing the model only.
IN_PROCESS = """
import sys, time
from a2q_passes.model_io import load_model
from a2q_passes.transforms import AnalyzeAccumulators
start = time.perf_counter()
model = load_model(sys.argv[1])
model.transform(AnalyzeAccumulators(), cleanup=False)
print(time.perf_counter() - start)
"""


def _measured(argv: list[str]) -> tuple[float, int, int, str]:
    """``(seconds, peak RSS bytes, exit code, stdout)`` of one command in a fresh process (``bench_llm.run_measured``)."""
    with tempfile.TemporaryFile("w+") as out:
        seconds, rss, code = run_measured(argv, stdout=out)
        out.seek(0)
        return seconds, rss, code, out.read()


def _in_process(python: str, model: Path) -> tuple[float, int, int]:
    """``(seconds of reading and analysing only, peak RSS bytes, exit code)`` in a fresh process."""
    _, rss, code, out = _measured([python, "-c", IN_PROCESS, str(model)])
    return (float(out.split()[-1]) if code == 0 else float("nan")), rss, code


def _cli_output(python: str, checkout: Path, args: list[str]) -> str:
    """What ``a2q ARGS`` prints from ``checkout`` (exit 0 or 3: verify's verdict "overflow possible" is an output)."""
    result = subprocess.run([python, "-m", "a2q_passes", *args], cwd=checkout, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        raise RuntimeError(f"a2q {' '.join(args)} from {checkout} failed: {result.stderr[-2000:]}")
    return result.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(parser, layers=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/a2q_analyze_side"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--verify", action="store_true", help="also `verify` at the exact widths analyze reports")
    parser.add_argument("--kinds", help="comma-separated subset of analyze,in-process,--version,verify")
    parser.add_argument("--cold", action="store_true", help="drop the data file's cached pages before every floor "
                        "and every command (default: all of it cached)")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",") if args.kinds else ["analyze", "in-process", "--version"] + (
        ["verify"] if args.verify else [])
    here = Path(__file__).resolve().parent.parent
    checkouts = {"baseline": args.baseline.resolve(), "this": here}
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / f"llama_L{args.layers}_h{args.hidden}.onnx"
    weights = build_decoder_stack(model, args.layers, args.hidden, args.mlp, args.heads)
    data = model.with_name(model.name + ".data")
    total, largest = sum(n for _, n in weights), max(n for _, n in weights)
    read_floor(data, weights)  # warm the page cache: every run reads from it
    widths = args.out / "exact_widths.json"
    if "verify" in kinds:
        report = json.loads(_cli_output(str(checkouts["baseline"] / ".venv/bin/python"), checkouts["baseline"],
                                        ["analyze", str(model), "--json"]))
        widths.write_text(json.dumps({layer["node"]: layer["bounds"]["exact"] for layer in report["layers"]}))
    commands = {"analyze": ["analyze", str(model), "--json"], "--version": ["--version"],
                "verify": ["verify", str(model), "--widths-json", str(widths), "--json"]}
    floors: list[float] = []
    samples: dict[str, list[tuple[float, int, int]]] = {}
    for _ in range(args.repeats):
        for tag, checkout in checkouts.items():
            python = str(checkout / ".venv/bin/python")
            os.chdir(checkout)
            for kind in kinds:
                if kind != "--version":
                    if args.cold:
                        evict(data)
                    floors.append(read_floor(data, weights))
                    if args.cold:
                        evict(data)
                run = _in_process(python, model) if kind == "in-process" else \
                    _measured([python, "-m", "a2q_passes", *commands[kind]])[:3]
                samples.setdefault(f"{kind}, {tag}", []).append(run)
    floor = statistics.median(floors)
    figures = {}
    for name, runs in samples.items():
        seconds = statistics.median(s for s, _, _ in runs)
        rss = max(r for _, r, _ in runs)
        figures[name] = {"runs": len(runs), "seconds": seconds, "x_floor": seconds / floor,
                         "gb_per_s": total / seconds / 1e9, "peak_rss_mb": rss / 1e6, "rss_over_largest": rss / largest,
                         "exit_codes": sorted({c for _, _, c in runs})}
    identical = {}
    for kind in ("analyze", "verify"):
        if kind in kinds or kind == "analyze":
            outputs = [_cli_output(str(checkout / ".venv/bin/python"), checkout, commands[kind])
                       for checkout in checkouts.values()]
            identical[kind] = outputs[0] == outputs[1]
    results = {"argv": argv if argv is not None else sys.argv[1:], "layers": args.layers, "weight_gb": total / 1e9,
               "largest_tensor_mb": largest / 1e6, "floor_s": floor, "floor_runs": len(floors),
               "page_cache": "cold" if args.cold else "warm",
               "outputs_identical": identical, "load_average": os.getloadavg(),
               "checkouts": {tag: str(path) for tag, path in checkouts.items()}, "figures": figures}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
