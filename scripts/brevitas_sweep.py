"""Random Brevitas nets over ``brevitas.quant``'s weight and activation quantizer classes, through the corpus check.

    .venv/bin/python -m scripts.brevitas_sweep --nets 40 --seed 0 --out DIR

Each net draws a structure (``tests.brevitas_nets`` kinds), bit widths and one weight and one activation quantizer
class (float and power-of-two scales, per tensor and per channel, decoupled, A2Q/A2Q+ with an accumulator
width, zero-point (Shifted) and ternary/binary ones), is exported with ``export_qonnx`` and ``export_onnx_qcdq``
(both torch exporters), and each file goes through ``scripts.corpus.check``: analyze, project, verify (and lower
for QONNX) against worst-case inputs executed through the file's own quantizers. What Brevitas itself cannot
build or export is listed, not counted. Exit status 1 when any file FAILED.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

WEIGHT_QUANTS = ("Int8WeightPerTensorFloat", "Int8WeightPerChannelFloat", "Int8WeightPerTensorFixedPoint",
                 "Int8WeightPerChannelFixedPointMSE", "Int8WeightPerChannelFloatDecoupled",
                 "Int4WeightPerTensorFloatDecoupled", "Int8AccumulatorAwareWeightQuant",
                 "Int8AccumulatorAwareZeroCenterWeightQuant", "ShiftedUint8WeightPerTensorFloat",
                 "ShiftedUint8WeightPerChannelFloat", "SignedBinaryWeightPerTensorConst",
                 "SignedTernaryWeightPerTensorConst", "Int8WeightNormL2PerChannelFixedPoint")
ACT_QUANTS = ("Int8ActPerTensorFloat", "Int8ActPerTensorFixedPoint", "ShiftedUint8ActPerTensorFloat",
              "Uint8ActPerTensorFixedPoint", "ShiftedUint8ActPerTensorFixedPoint", "SignedTernaryActPerTensorConst",
              "Uint8ActPerTensorFloat")
KINDS = ("mlp", "cnn", "depthwise", "depthwise_pc", "residual", "conv1d", "conv1d_dw", "convtranspose", "avgpool",
         "upsample", "classifier")


def draw(rng: random.Random):
    """One random net's NetSpec."""
    from tests.brevitas_nets import NetSpec

    weight_quant = rng.choice(WEIGHT_QUANTS)
    accumulator = rng.choice([12, 14, 16]) if "AccumulatorAware" in weight_quant else None
    return NetSpec(rng.choice(KINDS), rng.choice([2, 3, 4, 6, 8]), rng.choice([2, 3, 4, 8]), signed_act=True,
                   weight_quant=weight_quant, act_quant=rng.choice(ACT_QUANTS), accumulator=accumulator)


def main(argv: list[str] | None = None) -> int:
    from scripts.corpus import EXPORTERS, _quiet, brevitas_entry, check
    from tests.brevitas_nets import build_corpus_net

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start, counts, refused_by_brevitas = time.time(), {}, []
    for index in range(args.nets):
        spec = draw(rng)
        for exporter, producer in EXPORTERS.items():
            try:
                with _quiet():
                    path = build_corpus_net(args.out, spec, exporter, seed=index)
            except Exception as err:  # the producer's own limitation
                refused_by_brevitas.append(f"{exporter} {spec.name}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            zero_point = "subtract" if spec.weight_quant.startswith("Shifted") else "fold"
            result = check(brevitas_entry(path, producer, exporter, zero_point), args.out)
            counts[result.status] = counts.get(result.status, 0) + 1
            print(f"{result.status:8} {path.stem:90} {result.layers} layers ({result.tight} tight) "
                  f"P={result.acc_bits} {result.detail[:160]}", flush=True)
    print(f"{sum(counts.values())} files from {args.nets} nets in {time.time() - start:.0f} s: "
          + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
          + f"; Brevitas could not build or export {len(refused_by_brevitas)}")
    for line in refused_by_brevitas:
        print(f"  not built: {line}")
    return 1 if counts.get("FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
