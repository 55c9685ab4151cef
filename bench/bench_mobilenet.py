"""Brevitas' full-size MobileNet-v1 through the command line, as a FINN user runs it.

    .venv/bin/python -m bench.bench_mobilenet --out DIR [--exporters qonnx qcdq_ts] [--acc-bits 14] [--samples 2]
        [--markdown bench/mobilenet.md]

``quant_mobilenet_v1_4b`` (``brevitas_examples``; the model finn-examples' MobileNet build starts from), untrained and
seeded (Brevitas downloads its pretrained weights, which this project never does), its activation quantizers
calibrated on two training-mode passes of seeded random images, exported with ``export_qonnx`` and with
``export_onnx_qcdq`` through the TorchScript exporter (dynamo refuses its quantized biases). The input of each
depthwise Conv carries one scale per channel. Each file, each step a fresh process (wall time and peak RSS from
:func:`bench.bench_llm.run_measured`):

1. ``a2q analyze --input-dtype INT8 --json``: how many of the 28 MAC layers are read, and the widest exact width;
2. ``a2q project --acc-bits P --input-dtype INT8 --input-ranges finn`` (FINN's view of the codes, as ``lower`` needs);
3. ``a2q verify`` of the output at P;
4. ``a2q lower --from-annotations --samples N``: MVAU/VVAU nodes, their ``accDataType``, and the equivalence of the
   FINN graph with the projected model on N random images.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from bench.bench_llm import run_measured

A2Q = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "a2q")


def export_mobilenet(folder: Path, exporter: str, seed: int = 0) -> Path:
    """The calibrated, untrained ``quant_mobilenet_v1_4b`` exported by ``exporter`` (``qonnx`` or ``qcdq_ts``)."""
    from brevitas.export import export_onnx_qcdq, export_qonnx
    from brevitas_examples.imagenet_classification.models import model_with_cfg

    torch.manual_seed(seed)
    net, _ = model_with_cfg("quant_mobilenet_v1_4b")
    with torch.no_grad():
        net.train()
        for _ in range(2):
            net(torch.rand(4, 3, 224, 224))
    net.eval()
    path = folder / f"mobilenet_v1_4b_{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "qonnx":
            export_qonnx(net, torch.rand(1, 3, 224, 224), str(path))
        else:
            export_onnx_qcdq(net, torch.rand(1, 3, 224, 224), str(path), dynamo=False)
    return path


def _step(argv: list[str], report: Path) -> dict:
    """One command, its JSON report (stdout) parsed where it wrote one."""
    with report.open("w") as out:
        seconds, rss, code = run_measured(argv, stdout=out)
    text = report.read_text()
    try:
        payload = json.loads(text[text.index("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        payload = {}
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(rss / 2**20), "exit": code, "report": payload}


def run_file(path: Path, acc_bits: int, samples: int) -> dict:
    stem = path.with_suffix("")
    projected, lowered = Path(f"{stem}.p{acc_bits}.onnx"), Path(f"{stem}.p{acc_bits}.finn.onnx")
    declared = ["--input-dtype", "INT8"]
    steps = {
        "analyze": _step([A2Q, "analyze", str(path), *declared, "--json"], Path(f"{stem}.analyze.json")),
        "project": _step([A2Q, "project", str(path), str(projected), "--acc-bits", str(acc_bits), *declared,
                          "--input-ranges", "finn", "--json"], Path(f"{stem}.project.json")),
        "verify": _step([A2Q, "verify", str(projected), "--acc-bits", str(acc_bits), *declared, "--input-ranges",
                         "finn", "--json"], Path(f"{stem}.verify.json")),
        "lower": _step([A2Q, "lower", str(projected), str(lowered), "--from-annotations", *declared, "--samples",
                        str(samples), "--json"], Path(f"{stem}.lower.json")),
    }
    layers = steps["analyze"]["report"].get("layers", [])
    lowering = steps["lower"]["report"]
    equivalence = lowering.get("equivalence", {})
    return {
        "file": path.name,
        "layers": len(layers), "read": sum(layer["status"] == "ok" for layer in layers),
        "widest_exact": max((layer["bounds"]["exact"] for layer in layers if layer["status"] == "ok"), default=None),
        "verify_ok": steps["verify"]["exit"] == 0,
        "hw_layers": len(lowering.get("layers", [])),
        "equivalent": equivalence.get("within_tolerance"), "max_abs_diff": equivalence.get("max_abs_diff"),
        "steps": {name: {k: v for k, v in step.items() if k != "report"} for name, step in steps.items()},
    }


def markdown(results: list[dict], acc_bits: int, samples: int, command: str, load: str) -> str:
    lines = [f"Command: `{command}` (load average at the end {load} on {os.cpu_count()} cores).", "",
             "Brevitas' `quant_mobilenet_v1_4b` (the model finn-examples' MobileNet build starts from; untrained, seeded, "
             "activation quantizers calibrated on two passes of random images), 224 x 224, its image declared INT8; "
             "the input of each depthwise Conv carries one scale per channel (a `Quant` in the QONNX export, a "
             "`DequantizeLinear` with a 1-D scale along axis 1 in the QCDQ one). Each step a fresh process; `layers "
             "read` by `analyze`, `widest exact` its widest exact width (the first layer, on the 8-bit image).", "",
             "| file | layers read | widest exact | step | s | peak RSS MB | exit |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, step in r["steps"].items():
            lines.append(f"| {r['file']} | {r['read']} / {r['layers']} | {r['widest_exact']} | {name} | {step['seconds']} | "
                         f"{step['peak_rss_mb']} | {step['exit']} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['file']}: project at P = {acc_bits}, verify {'passed' if r['verify_ok'] else 'FAILED'}; "
                     f"lower: {r['hw_layers']} MVAU/VVAU nodes, equivalent on {samples} images: {r['equivalent']} "
                     f"(max |QONNX - FINN| = {r['max_abs_diff']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--exporters", nargs="+", default=["qonnx", "qcdq_ts"], choices=["qonnx", "qcdq_ts"])
    parser.add_argument("--acc-bits", type=int, default=14)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for exporter in args.exporters:
        path = export_mobilenet(args.out, exporter)
        print(f"{path.name}: exported", flush=True)
        results.append(run_file(path, args.acc_bits, args.samples))
        print(json.dumps(results[-1], indent=1), flush=True)
    command = ".venv/bin/python -m bench.bench_mobilenet " + " ".join(
        [f"--out {args.out}", "--exporters " + " ".join(args.exporters), f"--acc-bits {args.acc_bits}",
         f"--samples {args.samples}"] + ([f"--markdown {args.markdown}"] if args.markdown else []))
    text = markdown(results, args.acc_bits, args.samples, command, " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
