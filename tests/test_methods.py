"""The projection-method registry: built-ins, registration, entry-point plugins, contract checks."""

import sys
import textwrap

import numpy as np
import pytest

from a2q_passes import methods, plugins, projection
from a2q_passes.bounds import IntRange

X, WR = IntRange(0, 15), IntRange(-8, 7)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A private copy of the registry whose plugins are not loaded yet."""
    monkeypatch.setattr(methods.METHODS, "items", dict(methods.METHODS.items))
    monkeypatch.setattr(methods.METHODS, "plugins_loaded", False)


def layer() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 64)) * 3


def brute_layer_fits(q: np.ndarray, x: IntRange, bits: int) -> bool:
    highs = [sum(int(c) * (x.hi if c > 0 else x.lo) for c in row) for row in q]
    lows = [sum(int(c) * (x.lo if c > 0 else x.hi) for c in row) for row in q]
    lo, hi = min(lows), max(highs)
    if lo >= 0:
        return hi < (1 << bits)
    return -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1))


class ZeroTouched:
    """Toy method: rows that do not fit become all zeros (valid, if crude)."""

    name = "zero-touched"
    description = "zero every row that does not fit"

    def project(self, v, x, acc_bits, weight_range):
        q = projection.plain_round(v, weight_range)
        limits = projection.layer_accumulator_limits(q, x, acc_bits)
        touched = ~projection.rows_within(q, x, limits)
        q[touched] = 0
        return projection.ProjectionResult(q, touched, np.where(touched, self.name, "round"), limits)


def test_builtins_are_registered_with_descriptions():
    assert {"a2q", "a2q+", "exact"} <= set(methods.available_methods())
    assert methods.DEFAULT_METHOD == "exact"
    for name in ("a2q", "a2q+", "exact"):
        method = methods.get_method(name)
        assert method.name == name and method.description and "\n" not in method.description


@pytest.mark.parametrize("name", ["a2q", "a2q+", "exact"])
def test_project_weights_runs_the_builtins(name):
    v = layer()
    result = methods.project_weights(v, X, 11, WR, method=name)
    assert brute_layer_fits(result.weights, X, 11)
    assert result.touched.any()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown projection method 'nope'; available: a2q, a2q\+, exact"):
        methods.get_method("nope")


def test_register_method_checks_names_and_duplicates(fresh_registry):
    methods.register_method("zero-touched", ZeroTouched())
    assert "zero-touched" in methods.available_methods()
    result = methods.project_weights(layer(), X, 11, WR, method="zero-touched")
    assert brute_layer_fits(result.weights, X, 11) and np.all(result.weights[result.touched] == 0)
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("zero-touched", ZeroTouched())
    methods.register_method("zero-touched", ZeroTouched(), replace=True)
    with pytest.raises(ValueError, match="named 'zero-touched' but registered as 'other'"):
        methods.register_method("other", ZeroTouched())
    with pytest.raises(TypeError, match="project"):
        methods.register_method("bad", object())


def test_project_weights_rejects_a_method_that_breaks_the_contract(fresh_registry):
    class Overflowing(ZeroTouched):
        name = "overflowing"

        def project(self, v, x, acc_bits, weight_range):  # plain rounding: does not fit at 11 bits
            q = projection.plain_round(v, weight_range)
            return projection.ProjectionResult(q, np.zeros(len(q), bool), np.full(len(q), "round"), (0, 0))

    class TouchesFittingRows(ZeroTouched):
        name = "touchy"

        def project(self, v, x, acc_bits, weight_range):
            return projection.ProjectionResult(np.zeros(np.shape(v), np.int64), np.ones(len(v), bool),
                                               np.full(len(v), self.name), (0, 0))

    methods.register_method("overflowing", Overflowing())
    methods.register_method("touchy", TouchesFittingRows())
    with pytest.raises(RuntimeError, match=r"'overflowing' broke its contract: left rows .* outside the 11-bit"):
        methods.project_weights(layer(), X, 11, WR, method="overflowing")
    v = layer()
    v[:4] *= 0.3  # these rows fit already
    with pytest.raises(RuntimeError, match=r"'touchy' broke its contract: changed rows \[0, 1, 2, 3\]"):
        methods.project_weights(v, X, 11, WR, method="touchy")


def write_plugin_distribution(root, entry_points: str) -> None:
    """A real installed distribution (module + dist-info with entry points) under ``root``."""
    (root / "toy_a2q_plugin.py").write_text(textwrap.dedent('''
        import numpy as np
        from a2q_passes import projection

        class ZeroTouched:
            name = "zero-touched"
            description = "zero every row that does not fit"

            def project(self, v, x, acc_bits, weight_range):
                q = projection.plain_round(v, weight_range)
                limits = projection.layer_accumulator_limits(q, x, acc_bits)
                touched = ~projection.rows_within(q, x, limits)
                q[touched] = 0
                return projection.ProjectionResult(q, touched, np.where(touched, self.name, "round"), limits)

        def make_exact_alias():
            from a2q_passes.methods import FunctionMethod
            return FunctionMethod("exact-alias", "the exact method again", projection.project_exact)

        def make_nothing():
            return 42

        class Impostor(ZeroTouched):
            name = "exact"

    '''))
    dist = root / "toy_a2q_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-a2q-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_plugins_load_run_and_broken_ones_warn(tmp_path, monkeypatch, fresh_registry):
    write_plugin_distribution(tmp_path, """
        [a2q_passes.methods]
        zero-touched = toy_a2q_plugin:ZeroTouched
        exact-alias = toy_a2q_plugin:make_exact_alias
        missing-attr = toy_a2q_plugin:DoesNotExist
        not-a-method = toy_a2q_plugin:make_nothing
        exact = toy_a2q_plugin:Impostor
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_a2q_plugin", raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        names = methods.available_methods()
    messages = " | ".join(str(w.message) for w in caught)
    assert "'missing-attr' (entry point 'toy_a2q_plugin:DoesNotExist'" in messages
    assert "'not-a-method'" in messages
    assert "'exact'" in messages and "already registered" in messages  # a plugin cannot replace a built-in
    assert {"zero-touched", "exact-alias"} <= set(names)
    assert not {"missing-attr", "not-a-method"} & set(names)
    assert methods.get_method("exact").function is projection.project_exact

    v = layer()
    toy = methods.project_weights(v, X, 11, WR, method="zero-touched")
    assert brute_layer_fits(toy.weights, X, 11) and np.all(toy.weights[toy.touched] == 0)
    alias = methods.project_weights(v, X, 11, WR, method="exact-alias")
    np.testing.assert_array_equal(alias.weights, projection.project_exact(v, X, 11, WR).weights)


def test_plugins_are_loaded_once_and_lazily(monkeypatch, fresh_registry):
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return []

    monkeypatch.setattr(plugins.metadata, "entry_points", fake_entry_points)
    assert calls == []
    methods.available_methods()
    methods.get_method("exact")
    methods.available_methods()
    assert calls == ["a2q_passes.methods"]
