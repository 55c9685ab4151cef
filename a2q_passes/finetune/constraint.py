"""Accumulator constraints on a :class:`~a2q_passes.torch_bridge.QonnxModule` during training (torch side).

Both methods hook the weight ``Quant`` of every constrained layer through the bridge's
``set_weight_transform`` (and, for ``qat``, ``set_weight_projection``), so every forward pass
after every optimizer step quantizes to integers that fit the layer's target width P.

``qat`` (default): exact-range projected training.
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
from a2q_passes.torch_bridge import QonnxModule

Method = Literal["qat", "a2q"]
TRAINING_METHODS = ("qat", "a2q")
_EPS = 1e-12
_LATENT_MARGIN = 1e-2  # accumulator units the latent projection keeps clear of the limits


def _integer_ste(v: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``scale * q`` in value, ``scale * v`` in gradient (the LSQ straight-through estimator)."""
    return scale * (v + (q - v).detach())


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


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
            layer = self.layer
            q_rows = project_exact(self._v_rows(weight, scale), layer.x, layer.acc_bits, layer.weight_range).weights
            self._codes = torch.from_numpy(layer.from_rows(q_rows).astype(np.float32)).to(weight.device)
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


class A2QNorm(nn.Module):
    """A2Q weight normalisation of one layer (see module doc); ``g`` is its parameter."""

    def __init__(self, layer: ConstrainedLayer, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.layer_name = layer.node
        self.budget = float(bounds.max_l1_norm(layer.acc_bits, *bounds.integer_format(layer.x)))
        self.weight_lo, self.weight_hi = float(layer.weight_range.lo), float(layer.weight_range.hi)
        s_rows = layer.to_rows(np.broadcast_to(_numpy(scale), weight.shape))
        valid = layer.row_index >= 0
        if not np.all(np.where(valid, s_rows == s_rows[:, :1], True)):
            raise A2QError(f"layer '{layer.node}': method a2q needs one weight scale per output channel "
                           "(per-tensor or per-channel); use --method qat")
        rows = layer.row_index.shape[0]
        element_row = np.empty(int(np.prod(layer.stored_shape)), dtype=np.int64)
        element_row[layer.row_index[valid]] = np.nonzero(valid)[0]
        self.register_buffer("element_row", torch.from_numpy(element_row))
        self.register_buffer("row_first", torch.from_numpy(layer.row_index[:, 0].copy()))  # a valid term of each row
        self.rows = rows
        with torch.no_grad():
            l1 = self._row_l1(weight)
            self.g = nn.Parameter(torch.minimum(l1, self.budget * self._row_scale(scale, weight.shape)))

    def _row_l1(self, weight: Tensor) -> Tensor:
        flat = weight.reshape(-1).abs()
        return torch.zeros(self.rows, dtype=weight.dtype, device=weight.device).index_add(0, self.element_row, flat)

    def _row_scale(self, scale: Tensor, shape: torch.Size) -> Tensor:
        return scale.expand(shape).reshape(-1)[self.row_first]

    def forward(self, weight: Tensor, scale: Tensor) -> Tensor:
        s = scale.expand(weight.shape).reshape(-1)
        gain = torch.minimum(self.g, self.budget * self._row_scale(scale, weight.shape))
        per_row = gain / self._row_l1(weight).clamp_min(_EPS)
        u = torch.clamp(per_row[self.element_row] * weight.reshape(-1) / s, self.weight_lo, self.weight_hi)
        return _integer_ste(u, torch.trunc(u), s).reshape(weight.shape)

    def penalty(self, scale: Tensor, shape: torch.Size) -> Tensor:
        return torch.relu(self.g - self.budget * self._row_scale(scale, shape)).sum()


class Constraint:
    """The constraint attached to a module: one transform per constrained layer (plus projections for qat).

    ``after_step()`` must follow every optimizer step; ``penalty()`` is added to the loss (0 for qat).
    Attaching ``qat`` projects the latent weights once, so training starts inside the polytope.
    """

    def __init__(self, module: QonnxModule, selection: Selection, method: Method) -> None:
        if method not in TRAINING_METHODS:
            raise A2QError(f"unknown training method '{method}'; choose one of {', '.join(TRAINING_METHODS)}")
        self.module, self.selection, self.method = module, selection, method
        quants = {wq.weight_name: wq for wq in module.weight_quant_nodes()}
        self.quant_node: dict[str, str] = {}
        self._norms: list[tuple[A2QNorm, str, str]] = []
        for layer in selection.layers:
            wq = quants.get(layer.tensor)
            if wq is None:
                raise A2QError(f"layer '{layer.node}': its weight '{layer.tensor}' is not a trainable Quant input "
                               "of the torch bridge")
            self.quant_node[layer.node] = wq.node_name
            if method == "a2q":
                norm = A2QNorm(layer, wq.weight.detach(), wq.scale.detach())
                module.set_weight_transform(wq.node_name, norm)
                self._norms.append((norm, wq.weight_name, wq.scale_name))
            else:
                rule = ExactRangeQAT(layer)
                module.set_weight_transform(wq.node_name, rule)
                module.set_weight_projection(wq.node_name, rule.project)
        self.after_step()

    def after_step(self) -> None:
        self.module.project_weights()

    def penalty(self) -> Tensor | None:
        """A2Q's ``sum relu(g - T s)`` over the layers (``None`` for qat)."""
        if not self._norms:
            return None
        terms = [norm.penalty(self.module.tensor(s), self.module.tensor(w).shape) for norm, w, s in self._norms]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def integer_rows(self) -> dict[str, np.ndarray]:
        """The integer weights the graph's Quant produces right now, as ``(rows, K)`` per layer."""
        return {layer.node: layer.to_rows(self.module.weight_codes(self.quant_node[layer.node]).cpu().numpy())
                .astype(np.int64) for layer in self.selection.layers}
