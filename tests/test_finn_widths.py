"""Our exact width against FINN's MinimizeAccumulatorWidth on the same MVAU/VVAU nodes, side by side."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from a2q_passes.analysis import analyze_model


def _layers(layers: list[dict]) -> ModelWrapper:
    """One MVAU/VVAU per spec, each on its own annotated input; all but the last feed a successor node."""
    nodes, inputs, outputs = [], [], []
    for i, spec in enumerate(layers):
        w = spec["weights"]
        x, y = f"x{i}", f"y{i}"
        common = dict(domain="finn.custom_op.fpgadataflow", backend="fpgadataflow", name=f"n{i}",
                      inputDataType=spec["idt"], weightDataType=spec["wdt"], outputDataType="INT32",
                      accDataType="INT32", noActivation=1, runtime_writeable_weights=spec.get("rww", 0))
        if spec.get("vvau"):
            channels, k = w.shape
            nodes.append(helper.make_node("VVAU", [x, f"w{i}"], [y], PE=1, SIMD=1, Dim=[1, 1], Channels=channels,
                                          Kernel=[1, k], **common))
        else:
            nodes.append(helper.make_node("MVAU", [x, f"w{i}"], [y], MW=w.shape[0], MH=w.shape[1], SIMD=1, PE=1,
                                          binaryXnorMode=0, **common))
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Identity", [y], [f"z{i}"], name=f"after{i}"))
            y = f"z{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    model = ModelWrapper(helper.make_model(helper.make_graph(nodes, "layers", inputs, outputs)))
    for i, spec in enumerate(layers):
        w = spec["weights"]
        model.set_initializer(f"w{i}", (w.reshape(w.shape[0], 1, 1, -1) if spec.get("vvau") else w).astype(np.float32))
        model.set_tensor_datatype(f"x{i}", DataType[spec["idt"]])
    return model


def test_exact_width_never_exceeds_finn_and_is_smaller_where_finn_rounds(capsys):
    from finn.transformation.fpgadataflow.minimize_accumulator_width import MinimizeAccumulatorWidth

    rng = np.random.default_rng(0)
    sparse = rng.integers(-7, 8, size=(288, 16))
    sparse[rng.random(sparse.shape) < 0.7] = 0
    specs = [
        {"weights": rng.integers(-8, 8, size=(288, 16)), "idt": "UINT4", "wdt": "INT4"},
        {"weights": sparse, "idt": "UINT4", "wdt": "INT4", "rww": 1},  # FINN falls back to the data-type bound
        {"weights": rng.integers(-128, 128, size=(9, 8)), "idt": "INT8", "wdt": "INT8", "vvau": True},
        {"weights": rng.integers(0, 4, size=(64, 10)), "idt": "UINT2", "wdt": "UINT2"},  # non-negative range
        {"weights": rng.integers(-2, 2, size=(100, 10)), "idt": "INT3", "wdt": "INT2"},  # last: FINN rounds to 8k
    ]
    model = _layers(specs)
    ours = {r.node: r for r in analyze_model(model).layers}
    finn_model = model.transform(MinimizeAccumulatorWidth())
    rows = []
    for node in finn_model.graph.node:
        if node.op_type == "Identity":
            continue
        finn_dt = DataType[getCustomOp(node).get_nodeattr("accDataType")]
        r = ours[node.name]
        rows.append((node.name, node.op_type, r.acc_dtype, r.bounds["exact"], finn_dt.name, finn_dt.bitwidth()))
        assert r.status == "ok"
        assert r.bounds["exact"] <= finn_dt.bitwidth()
        if r.acc_min >= 0:
            assert finn_dt.signed() is False and r.acc_dtype.startswith("UINT")
    with capsys.disabled():
        print("\nnode  op    ours        FINN")
        for name, op, ours_dt, ours_bits, finn_name, finn_bits in rows:
            print(f"{name:5} {op:5} {ours_dt:8}({ours_bits:2})  {finn_name:8}({finn_bits:2})")
    by_name = {row[0]: row for row in rows}
    # where FINN uses the data-type fallback (runtime-writeable weights) or rounds the last layer up, ours is smaller
    assert by_name["n1"][3] < by_name["n1"][5]
    assert by_name["n4"][3] < by_name["n4"][5] and by_name["n4"][5] % 8 == 0
    # where FINN measures the real weights (and no rounding applies), both agree exactly
    for name in ("n0", "n2", "n3"):
        assert by_name[name][2] == by_name[name][4]
