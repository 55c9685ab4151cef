"""``ProjectToAccumulator`` and ``a2q project`` on exported models, executed before and after."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from qonnx.core.onnx_exec import execute_onnx

from a2q_passes.analysis import analyze_model
from a2q_passes.metadata import recorded_widths
from a2q_passes.model_io import load_model
from a2q_passes.transforms.project import ProjectToAccumulator
from a2q_passes.data_simulation import simulate_model
from a2q_passes.verification import verify_model
from tests.brevitas_nets import build_net
from tests.cli_helpers import digest, run_a2q

CONFIGS = [("conv", 4, 4, False), ("conv", 8, 8, True), ("linear", 4, 4, False), ("linear", 8, 8, True)]


def _inputs(net, n=64, seed=0):
    return np.random.default_rng(seed).normal(0, 1.5, size=(n, *net.input_shape[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """One export per configuration, shared by the method cases (the passes never modify their input)."""
    cache = {}

    def get(*config):
        if config not in cache:
            cache[config] = build_net(tmp_path_factory.mktemp("net"), *config)
        return cache[config]

    return get


@pytest.mark.parametrize("kind,wbits,abits,signed_act", CONFIGS)
@pytest.mark.parametrize("method", ["exact", "a2q", "a2q+"])
def test_projection_fits_and_is_verified(nets, kind, wbits, abits, signed_act, method):
    net = nets(kind, wbits, abits, signed_act)
    before = analyze_model(net.model)
    widest = max(r.bounds["exact"] for r in before.layers)
    target = widest - 3
    projection = ProjectToAccumulator(target, method=method)
    projected = net.model.transform(projection)
    after = analyze_model(projected)
    for r in after.layers:
        assert r.bounds["exact"] <= target
        assert r.acc_max <= (1 << (target - 1)) - 1 and r.acc_min >= -(1 << (target - 1))
    # same structure: only weight initializers changed, every node and scale untouched
    assert [n.SerializeToString() for n in projected.graph.node] == [n.SerializeToString() for n in net.model.graph.node]
    old = {i.name: i for i in net.model.graph.initializer}
    new = {i.name: i for i in projected.graph.initializer}
    assert old.keys() == new.keys()
    changed = {name for name in old if old[name] != new[name]}
    weight_tensors = {n.input[0] for n in net.model.graph.node if n.op_type == "Quant"
                      and net.model.get_initializer(n.input[0]) is not None}
    assert changed and changed <= weight_tensors
    assert recorded_widths(projected) == {r.node: target for r in before.layers}
    # verify passes on the projected model and fails on the original, which needs more
    assert verify_model(projected, target).overflow_impossible
    assert not verify_model(net.model, target).overflow_impossible
    # executing P-bit accumulators on real inputs equals exact accumulation on the projected model
    x = _inputs(net)
    sim = simulate_model(projected, x, target, mode="wrap")
    assert sum(sim.overflows.values()) == 0 and sim.max_abs_deviation() == 0.0
    name, out_name = projected.graph.input[0].name, projected.graph.output[0].name
    exact = np.concatenate([execute_onnx(projected, {name: x[i:i + 1]})[out_name] for i in range(16)])
    np.testing.assert_allclose(sim.outputs[out_name][:16], exact, rtol=1e-5, atol=1e-5)
    # the unconstrained original at the same P overflows on the same data
    assert sum(simulate_model(net.model, x, target, mode="wrap").overflows.values()) > 0


def test_exact_changes_less_than_a2q_and_reaches_lower_p(tmp_path):
    """Same layers, same P: exact's relative L2 change <= a2q's; on unsigned inputs one bit lower at no more change."""
    net = build_net(tmp_path, "linear", 4, 4, signed_act=False, seed=3)
    widest = max(r.bounds["exact"] for r in analyze_model(net.model).layers)
    change = {}
    for method in ("exact", "a2q"):
        for p in range(widest - 5, widest):
            proj = ProjectToAccumulator(p, method=method)
            net.model.transform(proj)
            change[method, p] = max(lp.rel_l2_change for lp in proj.projections)
    for p in range(widest - 5, widest):
        assert change["exact", p] <= change["a2q", p] + 1e-12
    assert any(change["exact", p - 1] <= change["a2q", p] + 1e-12 for p in range(widest - 4, widest))


def test_projection_is_idempotent_and_deterministic(tmp_path):
    net = build_net(tmp_path, "conv", 4, 4)
    once = net.model.transform(ProjectToAccumulator(11))
    twice = once.transform(ProjectToAccumulator(11))
    again = net.model.transform(ProjectToAccumulator(11))
    assert once.model.SerializeToString(deterministic=True) == twice.model.SerializeToString(deterministic=True)
    assert once.model.SerializeToString(deterministic=True) == again.model.SerializeToString(deterministic=True)


def test_cli_project_then_verify(tmp_path):
    net = build_net(tmp_path, "conv", 4, 4)
    out = tmp_path / "p.onnx"
    layers = [r.node for r in analyze_model(net.model).layers]
    result = run_a2q("project", net.path, out, "--acc-bits", "12", "--layer", f"{layers[1]}=10", "--json",
                     "--plot", tmp_path / "proj.png")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {l["node"]: l["target_bits"] for l in report["layers"]} == {layers[0]: 12, layers[1]: 10}
    for l in report["layers"]:
        assert l["width_after"] <= l["target_bits"] and 0 <= l["sparsity_after"] <= 1
    assert (tmp_path / "proj.png").read_bytes().startswith(b"\x89PNG")
    # verify picks up the recorded widths
    assert run_a2q("verify", out).returncode == 0
    assert run_a2q("verify", net.path, "--acc-bits", "10").returncode == 3
    # the same input gives byte-identical output
    out2 = tmp_path / "p2.onnx"
    run_a2q("project", net.path, out2, "--acc-bits", "12", "--layer", f"{layers[1]}=10")
    assert out.read_bytes() == out2.read_bytes()


def test_cli_bad_inputs_write_nothing(tmp_path):
    net = build_net(tmp_path, "linear", 4, 4)
    before = digest(net.path)
    out = tmp_path / "o.onnx"

    def check(result, *fragments):
        assert result.returncode == 1, (result.stdout, result.stderr)
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr
        assert not out.exists() and digest(net.path) == before
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    first = analyze_model(net.model).layers[0].node
    check(run_a2q("project", net.path, out, "--acc-bits", "3"), first, "smallest feasible")
    check(run_a2q("project", net.path, out, "--acc-bits", "1"), "out of range")
    check(run_a2q("project", net.path, out, "--acc-bits", "65"), "out of range")
    check(run_a2q("project", net.path, out, "--acc-bits", "12", "--layer", "nosuch=9"), "nosuch")
    check(run_a2q("project", net.path, out, "--acc-bits", "12", "--method", "magic"), "magic", "exact")
    check(run_a2q("project", net.path, net.path, "--acc-bits", "12"), "--in-place")
    check(run_a2q("project", net.path, tmp_path / "missing_dir" / "o.onnx", "--acc-bits", "12"), "missing_dir")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root ignores directory permissions; the missing-folder case covers it there
            check(run_a2q("project", net.path, readonly / "o.onnx", "--acc-bits", "12"), "not writable")
    finally:
        readonly.chmod(0o755)


def test_nothing_to_project(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=[w])
    path, out = tmp_path / "float.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph), path)
    result = run_a2q("project", path, out, "--acc-bits", "12")
    assert result.returncode == 1 and "nothing to project" in result.stderr and not out.exists()


def test_in_place_overwrites_atomically(tmp_path):
    net = build_net(tmp_path, "linear", 4, 4)
    result = run_a2q("project", net.path, net.path, "--acc-bits", "12", "--in-place")
    assert result.returncode == 0, result.stderr
    assert max(r.bounds["exact"] for r in analyze_model(load_model(net.path)).layers) <= 12


def test_plugin_method_through_the_cli(tmp_path):
    """A third-party distribution's entry point appears in --list-methods and runs with --method."""
    from tests.test_methods import write_plugin_distribution

    plugin_root = tmp_path / "site"
    plugin_root.mkdir()
    write_plugin_distribution(plugin_root, """
        [a2q_passes.methods]
        zero-touched = toy_a2q_plugin:ZeroTouched
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_root), *sys.path]))
    import subprocess

    def a2q(*args):
        return subprocess.run([sys.executable, "-m", "a2q_passes", *map(str, args)], capture_output=True, text=True, env=env)

    listed = a2q("project", "--list-methods")
    assert listed.returncode == 0 and "zero-touched" in listed.stdout
    net = build_net(tmp_path, "linear", 4, 4)
    out = tmp_path / "toy.onnx"
    result = a2q("project", net.path, out, "--acc-bits", "11", "--method", "zero-touched", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "zero-touched"
    assert max(r.bounds["exact"] for r in analyze_model(load_model(out)).layers) <= 11


def _tied_model(path, qonnx: bool) -> None:
    """Two MatMuls sharing one 8x8 weight tensor (tied weights), on different input grids: mmA reads unsigned
    8-bit codes, mmB signed 4-bit ones. QDQ: two DequantizeLinear of one int8 initializer; QONNX: one weight Quant
    feeding both."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    general = "qonnx.custom_op.general"
    if qonnx:
        inits = {"W": rng.normal(size=(8, 8)).astype(np.float32), "ws": np.float32(0.02), "xs": np.float32(0.05),
                 "hs": np.float32(0.5), "z": np.float32(0), "b8": np.float32(8), "b4": np.float32(4)}

        def quant(x, s, bits, out, signed):
            return helper.make_node("Quant", [x, s, "z", bits], [out], domain=general, signed=signed, narrow=0,
                                    rounding_mode="ROUND")

        nodes = [quant("x", "xs", "b8", "xq", 0), quant("W", "ws", "b8", "Wq", 1),
                 helper.make_node("MatMul", ["xq", "Wq"], ["h"], name="mmA"), quant("h", "hs", "b4", "hq", 1),
                 helper.make_node("MatMul", ["hq", "Wq"], ["y"], name="mmB")]
        opsets = [helper.make_opsetid("", 13), helper.make_opsetid(general, 1)]
    else:
        inits = {"Wq": rng.integers(-128, 128, (8, 8)).astype(np.int8), "ws": np.float32(0.02),
                 "xs": np.float32(0.05), "xz": np.uint8(0), "hs": np.float32(0.5), "hz": np.int8(0)}
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["Wq", "ws"], ["WA"]),
                 helper.make_node("MatMul", ["xd", "WA"], ["h"], name="mmA"),
                 helper.make_node("QuantizeLinear", ["h", "hs", "hz"], ["hq8"]),
                 helper.make_node("Clip", ["hq8", "lo", "hi"], ["hq"]),
                 helper.make_node("DequantizeLinear", ["hq", "hs", "hz"], ["hd"]),
                 helper.make_node("DequantizeLinear", ["Wq", "ws"], ["WB"]),
                 helper.make_node("MatMul", ["hd", "WB"], ["y"], name="mmB")]
        inits.update(lo=np.int8(-8), hi=np.int8(7))
        opsets = [helper.make_opsetid("", 13)]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("qonnx", [False, True], ids=["qdq", "qonnx"])
@pytest.mark.parametrize("targets", [(12, 16), (16, 12), (12, 12)])
def test_tied_weights_fit_every_layer_that_shares_them(a2q, tmp_path, qonnx, targets):
    """Projecting one layer rewrites the weights the other layer reads too; the later projection starts from the
    earlier one's weights, so both promises hold whichever layer is narrower. Checked by executing the written
    model's worst cases through its own quantizers (the real-file oracle)."""
    from qonnx.core.modelwrapper import ModelWrapper

    from tests.fuzz.oracle import width
    from tests.fuzz.real_files import executed_range

    path, out = tmp_path / "tied.onnx", tmp_path / "out.onnx"
    _tied_model(path, qonnx)
    before = {name: width(r.lo, r.hi) for name in ("mmA", "mmB")
              for r in [executed_range(ModelWrapper(str(path)), name)]}
    assert before["mmA"] > 16 and before["mmB"] > 12  # every target below makes a layer's projection change weights
    result = a2q("project", path, out, "--layer", f"mmA={targets[0]}", "--layer", f"mmB={targets[1]}")
    assert result.returncode == 0, result.stderr
    for name, bits in zip(("mmA", "mmB"), targets):
        executed = executed_range(ModelWrapper(str(out)), name)
        assert width(executed.lo, executed.hi) <= bits, (name, executed.lo, executed.hi, bits)
    assert a2q("verify", out).returncode == 0
