"""Accumulator constraints on a :class:`~a2q_passes.torch_bridge.QonnxModule` during training (torch side).

Both methods hook the weight ``Quant`` of every constrained layer through the bridge's
``set_weight_transform`` (and, for ``qat``, ``set_weight_projection``), so every forward pass
after every optimizer step quantizes to integers that fit the layer's target width P.

``qat``: exact-range projected training.
    The weight parameter is a *latent* float weight ``w``. After each optimizer step it is
    projected (Euclidean, per row, in integer units ``v = w / s``) onto the real polytope of
    the exact accumulator range (:func:`projection.project_accumulator_range`), which keeps the
    latent weights next to the feasible set without snapping them to integers: small updates
    still accumulate across steps (snapping ``w`` to ``q * s`` after each step would undo any
    update below half a unit and stall training). The forward pass then quantizes with
    :func:`projection.project_exact` in place of plain rounding: rows whose plain rounding fits
    keep it, the others get the best rounding that fits. A straight-through estimator in integer
    units, ``w_q = s * (v + (q - v).detach())``, passes the gradient to ``w`` unchanged and gives
    the scale the usual LSQ gradient ``q - v``; the graph's ``Quant`` then reproduces ``q``
    exactly. So the integers of every step fit by construction (``project_exact`` checks its own
    result exactly), the guarantee does not depend on the latent projection.

``a2q``: A2Q's weight normalisation (Colbert et al.).
    Per row ``w = min(g, T s) * v / ||v||_1`` with ``v`` the weight parameter, ``g`` a new
    parameter initialised from the trained weights (``min(||w||_1, T s)``) and ``T`` the l1
    budget :func:`bounds.max_l1_norm` of the layer's input format; integers are rounded toward
    zero (same STE), so ``||q||_1 <= T`` and the l1 bound guarantees P bits. :meth:`Constraint.penalty`
    is Brevitas' ``sum relu(g - T s)``, which gives ``g`` a gradient where the clamp has none.
    Needs one scale per row (per-tensor or per-output-channel scales).

``norm`` (default): A2Q+-style weight normalisation over the *exact* budget (no round-to-zero waste).
    Per row, in integer units ``v = w / s``: ``u = min(g, G(v)) * v / ||v||_1`` with ``g`` a new
    parameter (the row's l1 norm) and ``G(v)`` the largest l1 norm a row of direction ``v`` can
    have while its real exact accumulator range ``[lo pos - hi neg, hi pos - lo neg]`` (``pos`` /
    ``neg``: the l1 norms of the positive / negative weights, ``x = [lo, hi]``) stays inside
    ``INT P``: for unsigned inputs this is the positive and negative budget ``acc_max / hi`` and
    ``-acc_min / hi``, for signed inputs the coupled one. Zero-centred rows get twice the l1 norm
    of A2Q's ``T``, as A2Q+; other rows get what their sign balance allows. ``u`` is rounded with
    :func:`projection.project_exact` (same STE as ``qat``), so the integers fit by construction;
    :meth:`Constraint.penalty` is ``sum relu(g - G)``.

Initialisation (``init``, before the first step, all methods):

- ``none``: the model's weights and scales as they are;
- ``project``: the latent weights projected onto the exact-range polytope (A2Q+'s EP-init);
- ``scaled`` (default): first, per weight-scale element, the multiplier of the scale (from
  :data:`SCALE_GRID`) whose exact projection is closest to the trained weights in the integer
  units of the old scale (:func:`search_scales`), then ``project``. A width P several bits below
  the layer's own leaves an l1 budget far below the trained integer weights; projecting at the
  trained scale zeroes most of them, while a coarser scale keeps the real weights at the price of
  resolution (fmnist_cnn W4A4 at P=11, no training: 33.4% -> 62.2% top-1 on held-out data);
- ``axe``: the weights of AXE (:func:`~a2q_passes.finetune.calibration.run_axe`), then ``project``
  (set up by :func:`~a2q_passes.finetune.train.finetune`, which owns the data).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from a2q_passes import bounds
from a2q_passes.errors import A2QError
from a2q_passes.finetune.selection import ConstrainedLayer, Selection
from a2q_passes.projection import (accumulator_is_signed, plain_round, project_accumulator_range, project_exact,
                                   project_l1_ball)
from a2q_passes.torch_bridge import QonnxModule, WeightQuant

Method = Literal["qat", "a2q", "norm"]
TRAINING_METHODS = ("qat", "a2q", "norm")
INITS = ("scaled", "project", "axe", "none")
_EPS = 1e-12
_LATENT_MARGIN = 1e-2  # accumulator units the latent projection keeps clear of the limits
# Multipliers tried for each weight scale by init "scaled": 1 (the trained scale) up to 16x, 2^(1/6) apart.
# Never below 1: a finer grid only helps a layer whose budget does not bind, and there the trained scale wins.
SCALE_GRID = np.geomspace(1.0, 16.0, 25)


def _integer_ste(v: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``scale * q`` in value, ``scale * v`` in gradient (the LSQ straight-through estimator)."""
    return scale * (v + (q - v).detach())


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _exact_codes(layer: ConstrainedLayer, v_rows: np.ndarray, device: torch.device) -> Tensor:
    """:func:`project_exact` of rows in integer units, as float codes in the stored layout on ``device``."""
    q_rows = project_exact(v_rows, layer.x, layer.acc_bits, layer.weight_range).weights
    return torch.from_numpy(layer.from_rows(q_rows).astype(np.float32)).to(device)


def scale_groups(layer: ConstrainedLayer, scale_shape: tuple[int, ...]) -> np.ndarray | None:
    """Per accumulator row, the flat index of the weight-scale element all its terms use (None if a row mixes several)."""
    index = np.broadcast_to(np.arange(int(np.prod(scale_shape))).reshape(scale_shape), layer.stored_shape)
    rows = layer.to_rows(index)
    groups = rows[:, 0]  # term 0 of every row is a real term (ConvTranspose pads at the end)
    if not np.all(np.where(layer.row_index >= 0, rows == groups[:, None], True)):
        return None
    return groups


def search_scales(layer: ConstrainedLayer, weight: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """Init ``scaled``: per weight-scale element, the multiplier from :data:`SCALE_GRID` whose exact projection
    (:func:`project_exact` of the rows at the scaled-up scale) is closest, in squared error summed over the rows
    using that element, to the weights ``weight`` in units of the scale ``scale``. Returns the multipliers in the
    shape of ``scale``, or None where some row mixes several scale elements (the layer keeps its scale)."""
    groups = scale_groups(layer, scale.shape)
    if groups is None:
        return None
    v = layer.to_rows(weight / np.broadcast_to(scale, weight.shape))
    errors = np.stack([
        np.bincount(groups, ((alpha * project_exact(v / alpha, layer.x, layer.acc_bits, layer.weight_range).weights
                              - v) ** 2).sum(axis=1), minlength=scale.size)
        for alpha in SCALE_GRID])
    return SCALE_GRID[np.argmin(errors, axis=0)].reshape(scale.shape)  # ties go to the smaller multiplier


class ExactRangeQAT:
    """Weight transform and after-step projection of method ``qat`` for one layer (see module doc)."""

    def __init__(self, layer: ConstrainedLayer) -> None:
        self.layer = layer
        self._key: tuple | None = None
        self._codes: Tensor | None = None

    def _v_rows(self, weight: Tensor, scale: Tensor) -> np.ndarray:
        return self.layer.to_rows(_numpy(weight) / np.broadcast_to(_numpy(scale), weight.shape))

    def codes(self, weight: Tensor, scale: Tensor) -> Tensor:
        """Integer codes (stored layout, float tensor) that fit P; recomputed only when w or s changed."""
        key = (weight.data_ptr(), weight._version, scale.data_ptr(), scale._version, weight.device)
        if key != self._key:
            self._codes = _exact_codes(self.layer, self._v_rows(weight, scale), weight.device)
            self._key = key
        return self._codes

    def __call__(self, weight: Tensor, scale: Tensor) -> Tensor:
        v = weight / scale
        return _integer_ste(v, self.codes(weight, scale), scale)

    def project(self, weight: Tensor, scale: Tensor) -> Tensor:
        """The latent weight projected onto the real exact-range polytope (clipped to the weight range).

        The limits are pulled in by :data:`_LATENT_MARGIN` accumulator units, so that the float32
        round trip ``w = v * s``, ``v = w / s`` cannot leave the rows a hair outside (which would
        send :func:`project_exact` through its iterative projection again on every forward pass).
        """
        layer = self.layer
        x, wr = layer.x, layer.weight_range
        v = np.clip(self._v_rows(weight, scale), wr.lo, wr.hi)
        acc_min, acc_max = bounds.accumulator_limits(layer.acc_bits, signed=accumulator_is_signed(plain_round(v, wr), x))
        acc_min, acc_max = min(acc_min + _LATENT_MARGIN, 0), max(acc_max - _LATENT_MARGIN, 0)
        if x.lo == 0 < x.hi:
            # Inputs in [0, hi] (every post-ReLU layer): the budgets decouple into pos <= acc_max / hi and
            # neg <= -acc_min / hi, two one-sided l1-ball projections in closed form (Duchi et al.),
            # the same point the general iterative projection finds, at a fraction of its cost.
            v = (project_l1_ball(np.maximum(v, 0.0), acc_max / x.hi)
                 - project_l1_ball(np.maximum(-v, 0.0), -acc_min / x.hi))
        else:
            v = project_accumulator_range(v, x, acc_min, acc_max)
        s = np.broadcast_to(_numpy(scale), weight.shape)
        return torch.from_numpy((layer.from_rows(v) * s).astype(np.float32)).to(weight.device)


class _RowNorm(nn.Module):
    """Per-row sums over a layer's stored weight tensor, in torch (the shared part of ``a2q`` and ``norm``)."""

    def __init__(self, layer: ConstrainedLayer) -> None:
        super().__init__()
        self.layer_name = layer.node
        self.weight_lo, self.weight_hi = float(layer.weight_range.lo), float(layer.weight_range.hi)
        valid = layer.row_index >= 0
        element_row = np.empty(int(np.prod(layer.stored_shape)), dtype=np.int64)
        element_row[layer.row_index[valid]] = np.nonzero(valid)[0]
        self.register_buffer("element_row", torch.from_numpy(element_row))
        self.register_buffer("row_first", torch.from_numpy(layer.row_index[:, 0].copy()))  # a valid term of each row
        self.rows = layer.row_index.shape[0]

    def _row_sum(self, flat: Tensor) -> Tensor:
        return torch.zeros(self.rows, dtype=flat.dtype, device=flat.device).index_add(0, self.element_row, flat)


class A2QNorm(_RowNorm):
    """A2Q weight normalisation of one layer (see module doc); ``g`` is its parameter."""

    def __init__(self, layer: ConstrainedLayer, weight: Tensor, scale: Tensor) -> None:
        super().__init__(layer)
        self.budget = float(bounds.max_l1_norm(layer.acc_bits, *bounds.integer_format(layer.x)))
        s_rows = layer.to_rows(np.broadcast_to(_numpy(scale), weight.shape))
        if not np.all(np.where(layer.row_index >= 0, s_rows == s_rows[:, :1], True)):
            raise A2QError(f"layer '{layer.node}': method a2q needs one weight scale per output channel "
                           "(per-tensor or per-channel); use --method qat")
        with torch.no_grad():
            l1 = self._row_sum(weight.reshape(-1).abs())
            self.g = nn.Parameter(torch.minimum(l1, self.budget * self._row_scale(scale, weight.shape)))

    def _row_scale(self, scale: Tensor, shape: torch.Size) -> Tensor:
        return scale.expand(shape).reshape(-1)[self.row_first]

    def forward(self, weight: Tensor, scale: Tensor) -> Tensor:
        s = scale.expand(weight.shape).reshape(-1)
        gain = torch.minimum(self.g, self.budget * self._row_scale(scale, weight.shape))
        per_row = gain / self._row_sum(weight.reshape(-1).abs()).clamp_min(_EPS)
        u = torch.clamp(per_row[self.element_row] * weight.reshape(-1) / s, self.weight_lo, self.weight_hi)
        return _integer_ste(u, torch.trunc(u), s).reshape(weight.shape)

    def penalty(self, weight: Tensor, scale: Tensor) -> Tensor:
        return torch.relu(self.g - self.budget * self._row_scale(scale, weight.shape)).sum()


class ExactNorm(_RowNorm):
    """Method ``norm`` of one layer (see module doc): ``g`` is its parameter, the weight parameter the direction."""

    def __init__(self, layer: ConstrainedLayer, weight: Tensor, scale: Tensor) -> None:
        super().__init__(layer)
        self.layer = layer
        # INT P whatever the sign of the rows: the real budget only steers training, project_exact decides the fit
        self.acc_min, self.acc_max = (float(a) for a in bounds.accumulator_limits(layer.acc_bits, signed=True))
        with torch.no_grad():
            v = (weight / scale).reshape(-1)
            self.g = nn.Parameter(torch.minimum(self._row_sum(v.abs()), self.max_l1(v)))

    def max_l1(self, v: Tensor) -> Tensor:
        """Per row, ``G(v)``: the largest l1 norm of a row of direction ``v`` whose real exact range fits INT P."""
        lo, hi = float(self.layer.x.lo), float(self.layer.x.hi)
        pos, neg = self._row_sum(torch.relu(v)), self._row_sum(torch.relu(-v))
        top, bottom = hi * pos - lo * neg, lo * pos - hi * neg  # the exact accumulator range of the row
        room = torch.minimum(self.acc_max / top.clamp_min(_EPS), self.acc_min / bottom.clamp_max(-_EPS))
        return (pos + neg) * room

    def forward(self, weight: Tensor, scale: Tensor) -> Tensor:
        s = scale.expand(weight.shape).reshape(-1)
        v = weight.reshape(-1) / s
        gain = torch.minimum(self.g, self.max_l1(v))
        per_row = gain / self._row_sum(v.abs()).clamp_min(_EPS)
        u = torch.clamp(per_row[self.element_row] * v, self.weight_lo, self.weight_hi).reshape(weight.shape)
        codes = _exact_codes(self.layer, self.layer.to_rows(_numpy(u)), weight.device)
        return _integer_ste(u, codes, scale.expand(weight.shape))

    def penalty(self, weight: Tensor, scale: Tensor) -> Tensor:
        return torch.relu(self.g - self.max_l1((weight / scale).reshape(-1)).detach()).sum()


class Constraint:
    """The constraint attached to a module: one transform per constrained layer (plus projections for qat).

    ``after_step()`` must follow every optimizer step; ``penalty()`` is added to the loss (``None`` for qat).
    ``init`` (:data:`INITS`) runs first: ``scaled`` rescales the weight scales (:func:`search_scales`),
    and every init but ``none`` projects the latent weights once, so training starts inside the polytope
    (``axe``: the module already holds AXE's weights). ``scale_multipliers`` records what ``scaled`` chose.
    """

    def __init__(self, module: QonnxModule, selection: Selection, method: Method, init: str = "scaled") -> None:
        if method not in TRAINING_METHODS:
            raise A2QError(f"unknown training method '{method}'; choose one of {', '.join(TRAINING_METHODS)}")
        if init not in INITS:
            raise A2QError(f"unknown initialisation '{init}'; choose one of {', '.join(INITS)}")
        self.module, self.selection, self.method = module, selection, method
        quants = {wq.weight_name: wq for wq in module.weight_quant_nodes()}
        self.quant_node: dict[str, str] = {}
        self.scale_multipliers: dict[str, np.ndarray | None] = {}
        self._norms: list[tuple[A2QNorm | ExactNorm, str, str]] = []
        rules = []
        for layer in selection.layers:
            wq = quants.get(layer.tensor)
            if wq is None:
                raise A2QError(f"layer '{layer.node}': its weight '{layer.tensor}' is not a trainable Quant input "
                               "of the torch bridge (a QONNX Quant on an initializer that feeds this layer alone); "
                               "weights shared by several layers (tied) are not trained: give each layer its own "
                               "Quant and initializer")
            self.quant_node[layer.node] = wq.node_name
            if init == "scaled":
                self.scale_multipliers[layer.node] = self._rescale(layer, wq)
            rule = ExactRangeQAT(layer)
            if init != "none":
                with torch.no_grad():
                    wq.weight.copy_(rule.project(wq.weight, wq.scale))
            rules.append((layer, wq, rule))
        for layer, wq, rule in rules:
            if method == "qat":
                module.set_weight_transform(wq.node_name, rule)
                module.set_weight_projection(wq.node_name, rule.project)
            else:
                norm = (A2QNorm if method == "a2q" else ExactNorm)(layer, wq.weight.detach(), wq.scale.detach())
                module.set_weight_transform(wq.node_name, norm)
                self._norms.append((norm, wq.weight_name, wq.scale_name))

    def _rescale(self, layer: ConstrainedLayer, wq: WeightQuant) -> np.ndarray | None:
        """Init ``scaled`` for one layer: multiply its weight scale in place; None where it is left alone
        (a scale that other nodes read too, one the written model would not hold (a Constant node's), or rows that
        mix scale elements)."""
        if self.module.readers(wq.scale_name) != [wq.node_name] or not self.module.is_parameter(wq.scale_name):
            return None
        multipliers = search_scales(layer, _numpy(wq.weight), _numpy(wq.scale))
        if multipliers is not None:
            with torch.no_grad():
                wq.scale.mul_(torch.from_numpy(multipliers).to(wq.scale.dtype))
        return multipliers

    def after_step(self) -> None:
        self.module.project_weights()

    def penalty(self) -> Tensor | None:
        """``sum relu(g - budget)`` over the layers (A2Q's, or ``norm``'s with the exact budget; ``None`` for qat)."""
        if not self._norms:
            return None
        terms = [norm.penalty(self.module.tensor(w), self.module.tensor(s)) for norm, w, s in self._norms]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def integer_rows(self) -> dict[str, np.ndarray]:
        """The integer weights the graph's Quant produces right now, as ``(rows, K)`` per layer."""
        return {layer.node: layer.to_rows(self.module.weight_codes(self.quant_node[layer.node]).cpu().numpy())
                .astype(np.int64) for layer in self.selection.layers}
