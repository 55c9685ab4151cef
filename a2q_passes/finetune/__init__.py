"""Win accuracy back at a target accumulator width: constrained QAT (``qat``, ``norm``, ``a2q``) and AXE PTQ (``axe``).

Modules: :mod:`selection` (which layers, at which width; the exact re-check after write-back),
:mod:`constraint` (torch side: the per-layer weight transforms and projections on a
:class:`~a2q_passes.torch_bridge.QonnxModule`), :mod:`data` (``.npz`` / iterables, checked against
the model), :mod:`train` (the loop, DDP-ready), :mod:`distributed` (torchrun detection),
:mod:`axe` (pure numpy AXE of one layer), :mod:`calibration` (AXE over a graph).

API::

    from a2q_passes.transforms.finetune import FinetuneAccumulators
    from a2q_passes.finetune.train import FinetuneConfig

    step = FinetuneAccumulators(acc_bits=12, train="train.npz", val="val.npz",
                                config=FinetuneConfig(method="qat", loss="ce", epochs=5, lr=1e-3, seed=0),
                                overrides={"Conv_0": 14}, tile=None, calibration_samples=512,
                                callback=lambda step, constraint: ...)
    result = step(model)  # PassResult: .model (same graph, new weights and scales), .details

Lower level: ``select_layers(model, P, overrides) -> Selection``,
``finetune(model, selection, train: Dataset, val, config, callback) -> FinetuneResult``,
``Constraint(module, selection, "qat" | "norm" | "a2q", init="scaled" | "project" | "axe" | "none")``, ``run_axe(model, selection, x, tile, held_out=Dataset, loss, refresh) -> (model, reports)``,
``refresh_statistics(original, model, selection, x)``,
``axe_quantize(v, F, G, H, x_range, P, weight_range, tile) -> int64 rows``.
"""
