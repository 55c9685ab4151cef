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


_RANDOM_DTYPES = ("INT2", "INT3", "INT4", "INT8", "UINT2", "UINT4", "UINT8", "BIPOLAR", "BINARY", "TERNARY")


def _random_mvau(rng: np.random.Generator) -> tuple[ModelWrapper, DataType, np.ndarray, bool]:
    """One MVAU as FINN's own tests build it (``qonnx_make_model``: no opset import for FINN's domain; random input
    and weight types, XNOR mode on binary operands now and then, any SIMD/PE folding), its input annotated."""
    from qonnx.util.basic import qonnx_make_model

    mw, mh = int(rng.integers(1, 24)), int(rng.integers(1, 12))
    idt, wdt = DataType[rng.choice(_RANDOM_DTYPES)], DataType[rng.choice(_RANDOM_DTYPES)]
    xnor = idt == DataType["BINARY"] and wdt in (DataType["BINARY"], DataType["BIPOLAR"]) and rng.random() < 0.5
    wdt = DataType["BINARY"] if xnor else wdt
    w = (rng.choice([-1, 1], size=(mw, mh)) if wdt == DataType["BIPOLAR"]
         else rng.integers(int(wdt.min()), int(wdt.max()) + 1, size=(mw, mh))).astype(np.float32)
    fold = lambda n: int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))  # noqa: E731
    node = helper.make_node("MVAU", ["inp", "weights"], ["outp"], domain="finn.custom_op.fpgadataflow",
                            backend="fpgadataflow", MW=mw, MH=mh, SIMD=fold(mw), PE=fold(mh), inputDataType=idt.name,
                            weightDataType=wdt.name, outputDataType="INT32", accDataType="INT32", noActivation=1,
                            binaryXnorMode=int(xnor), name="MVAU_0")
    graph = helper.make_graph([node], "mvau", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, mw])],
                              [helper.make_tensor_value_info("outp", TensorProto.FLOAT, [1, mh])])
    model = ModelWrapper(qonnx_make_model(graph, producer_name="fclayer-model"))
    model.set_initializer("weights", w)
    for tensor, dt in (("inp", idt), ("weights", wdt), ("outp", DataType["INT32"])):
        model.set_tensor_datatype(tensor, dt)
    return model, idt, w, xnor


def test_random_finn_built_mvaus_hold_every_accumulator_finns_execution_gives():
    """Each channel's extreme inputs (its weights' signs, or their bits under XNOR) executed by FINN's own MVAU lie in
    the range analyze reports, equal to its ends except where FINN counts matching bits of BIPOLAR operands (a
    narrower range than their product, which analyze reports); annotate records widths verify then proves."""
    from qonnx.core.onnx_exec import execute_onnx

    from a2q_passes.transforms import AnnotateAccumulators
    from a2q_passes.verification import verify_model

    for case in range(40):
        model, idt, w, xnor = _random_mvau(np.random.default_rng([7, case]))
        report = analyze_model(model, per_channel=True).layers[0]
        assert report.status == "ok", (case, report.status)
        lo, hi = (0, 1) if xnor else (int(idt.min()), int(idt.max()))
        extremes = [x for c in range(w.shape[1]) for x in (
            (w[:, c], 1 - w[:, c]) if xnor else (np.where(w[:, c] > 0, hi, lo), np.where(w[:, c] > 0, lo, hi)))]
        extremes = [np.where(x == 0, -1, x) if idt == DataType["BIPOLAR"] else x for x in extremes]
        executed = np.concatenate([execute_onnx(model, {"inp": x[None].astype(np.float32)})["outp"] for x in extremes])
        reported_lo, reported_hi = np.array(report.per_channel["acc_min"]), np.array(report.per_channel["acc_max"])
        assert np.all(reported_lo <= executed.min(axis=0)) and np.all(executed.max(axis=0) <= reported_hi), case
        counts_matches = idt == DataType["BIPOLAR"] and model.get_tensor_datatype("weights") == DataType["BIPOLAR"]
        if not counts_matches:
            assert np.array_equal(reported_lo, executed.min(axis=0)), case
            assert np.array_equal(reported_hi, executed.max(axis=0)), case
        assert verify_model(model.transform(AnnotateAccumulators())).overflow_impossible, case
