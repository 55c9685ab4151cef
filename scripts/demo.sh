#!/usr/bin/env bash
# The main job on a bundled model: analyse, project to a target accumulator width, verify
# (static proof + P-bit simulation on real held-out data), and compare accuracy.
#   bash scripts/demo.sh [MODEL] [OUT_DIR]      (P=<bits> DATASET=<name> to change the target)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/fmnist_cnn_w4a4.onnx}
OUT=${2:-out}
P=${P:-14}
DATASET=${DATASET:-fashion_mnist}
PY=.venv/bin/python
A2Q=.venv/bin/a2q
mkdir -p "$OUT"

echo "== 1. analyze: minimal accumulator width of every layer ($MODEL)"
$A2Q analyze "$MODEL" --plot "$OUT/widths.png"

echo "== 2. project: make every layer fit a ${P}-bit accumulator"
$A2Q project "$MODEL" "$OUT/projected_p${P}.onnx" --acc-bits "$P" --plot "$OUT/projection.png"

echo "== 3. verify: static proof at the recorded widths, and P-bit wrap-around simulation on held-out data"
$PY scripts/demo_data.py npz "$DATASET" 1000 "$OUT/test_inputs.npz"
$A2Q verify "$OUT/projected_p${P}.onnx" --data "$OUT/test_inputs.npz"
echo "-- the original model at the same P (expected: overflow possible, exit code 3):"
$A2Q verify "$MODEL" --acc-bits "$P" --data "$OUT/test_inputs.npz" || echo "(exit $? as expected: the original needs more than $P bits)"

echo "== 4. accuracy on the full test split"
$PY scripts/demo_data.py score "$DATASET" "$MODEL" "$OUT/projected_p${P}.onnx"
echo "plots: $OUT/widths.png $OUT/projection.png"

echo "== 5. lower to FINN: MVAU/VVAU nodes carry the guaranteed accumulator widths; resource report"
# FINN's graph executes node by node (about 0.1 s an image): the equivalence check uses the first 100 images
$PY scripts/demo_data.py npz "$DATASET" 100 "$OUT/lower_inputs.npz"
$A2Q lower "$OUT/projected_p${P}.onnx" "$OUT/finn_hw_p${P}.onnx" --from-annotations --data "$OUT/lower_inputs.npz"
$A2Q report "$OUT/finn_hw_p${P}.onnx" --fpgapart "${FPGAPART:-xczu3eg-sbva484-1-e}" --plot "$OUT/resources.png"
echo "plots: $OUT/resources.png"
