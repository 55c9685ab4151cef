"""AXE: accumulator-aware post-training quantization of one layer, GPFQ style (pure numpy).

GPFQ (Lybrand & Saab) quantizes the weights of a layer one input term at a time and feeds
the output error made so far back into the next choice. For term t of every row (vectorised
over rows)::

    q_t = round( <u_{t-1} + v_t X_t, Xq_t> / ||Xq_t||^2 ),   u_t = u_{t-1} + v_t X_t - q_t Xq_t

with ``X`` the layer's inputs in the original model, ``Xq`` its inputs in the model whose
earlier layers are already quantized, and ``u`` the running output error over the calibration
samples. Written with the Gram matrices ``G = X^T Xq`` and ``H = Xq^T Xq`` (K x K) this needs
no per-sample state: ``<u_{t-1} + v_t X_t, Xq_t> = sum_{j<=t} v_j G[j, t] - sum_{j<t} q_j H[j, t]``.

Accumulator awareness (AXE, Colbert et al. 2024) adds two things:

- a strict *local* constraint: every row keeps running sums of its positive (``pos``) and
  ``|negative|`` (``neg``) integer weights, and each new weight is clamped so that the
  worst case over the input box stays inside the accumulator:
  ``hi pos - lo neg <= A_max`` and ``lo pos - hi neg >= A_min``. Weights still to come can
  always be 0, so a feasible choice always exists, and since every prefix is checked every
  partial sum fits too. With ``tile=T`` each run of T consecutive terms keeps its own sums
  and is held to the same limits (each stage of a multi-stage datapath), besides the total.
- a soft *global* constraint: a second greedy path aims at the real-valued weights projected
  onto the same exact-range constraint (:func:`projection.project_accumulator_range`, per tile
  and for the whole row) instead of the raw weights. Aiming at the raw weights can spend the
  budget on the first terms and force every later one to 0; aiming at a target that fits
  lets the error feedback correct rounding instead of fighting the clamp, but gives up the
  error feedback's freedom to leave the projected target (measured on digits CNNs, each path
  wins on some layers).

Each row (rows are independent) keeps the candidate with the lowest output error on the
calibration data among the two greedy paths and the exact projection
(:func:`projection.project_exact`, where its every partial sum fits too). The projection is a
safeguard for inputs without correlation, where there is no error to feed back and its
budget-aware rounding beats greedy rounding; on real activations the greedy paths win.

The accumulator is the layer's ``INT P``, or ``UINT P`` when no row of the plain-rounded
weights reaches below 0 (the convention of :mod:`a2q_passes.projection`).
"""

from __future__ import annotations

import numpy as np

from a2q_passes import bounds
from a2q_passes.bounds import IntRange
from a2q_passes.projection import (accumulator_is_signed, check_target, plain_round, project_accumulator_range,
                                   project_exact)


def _budget(pos: np.ndarray, neg: np.ndarray, x: IntRange, acc_min: int, acc_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the largest positive and the largest |negative| next weight the running sums allow."""
    lo, hi = x.lo, x.hi
    slack_max = acc_max - (hi * pos - lo * neg)  # room below A_max (>= 0 by induction)
    slack_min = (lo * pos - hi * neg) - acc_min  # room above A_min
    big = np.iinfo(np.int64).max
    up = np.full(pos.shape, big, dtype=np.int64)
    down = np.full(pos.shape, big, dtype=np.int64)
    if hi > 0:  # a positive weight raises acc_max by q hi; a negative one lowers acc_min by |q| hi
        up = np.minimum(up, slack_max // hi)
        down = np.minimum(down, slack_min // hi)
    if lo < 0:  # a positive weight lowers acc_min by q |lo|; a negative one raises acc_max by |q| |lo|
        up = np.minimum(up, slack_min // -lo)
        down = np.minimum(down, slack_max // -lo)
    return up, down


def _soft_target(v: np.ndarray, x: IntRange, limits: tuple[int, int], tile: int | None) -> np.ndarray:
    """Weights projected onto the exact-range constraint of each tile, then of the whole row.

    For input ranges holding 0 the projection only shrinks weights toward 0, so projecting the
    whole row after the tiles keeps every tile feasible.
    """
    K = v.shape[1]
    target = v.copy()
    if tile is not None and tile < K:
        for start in range(0, K, tile):
            target[:, start:start + tile] = project_accumulator_range(target[:, start:start + tile], x, *limits)
    return project_accumulator_range(target, x, *limits)


def gram_matrices(x_float: np.ndarray, x_quant: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(F, G, H) = (X^T X, X^T Xq, Xq^T Xq)`` of ``(N, K)`` calibration inputs; sums over chunks add up."""
    x_float = np.asarray(x_float, dtype=np.float64)
    x_quant = np.asarray(x_quant, dtype=np.float64)
    if x_float.shape != x_quant.shape or x_float.ndim != 2:
        raise ValueError(f"calibration inputs must both be (N, K); got {x_float.shape} and {x_quant.shape}")
    return x_float.T @ x_float, x_float.T @ x_quant, x_quant.T @ x_quant


def row_output_errors(v: np.ndarray, q: np.ndarray, F: np.ndarray, G: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Per row, ``||X v_r - Xq q_r||^2 = v_r F v_r - 2 v_r G q_r + q_r H q_r`` (from the Gram matrices)."""
    v = np.asarray(v, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return np.einsum("rk,kl,rl->r", v, F, v) - 2.0 * np.einsum("rk,kl,rl->r", v, G, q) + np.einsum("rk,kl,rl->r", q, H, q)


def axe_quantize(v: np.ndarray, F: np.ndarray, G: np.ndarray, H: np.ndarray, x: IntRange, acc_bits: int,
                 weight_range: IntRange, tile: int | None = None) -> np.ndarray:
    """Integer weights ``(rows, K)`` for one layer whose every accumulator register fits ``acc_bits``.

    ``v``: unrounded weights in integer units (float weight / scale), one row per output channel.
    ``F``, ``G``, ``H``: :func:`gram_matrices` of the layer's calibration inputs in the original
    model (``X``) and in the partially quantized one (``Xq``), any common input scale. ``x``: the
    integer range of the input codes. ``tile``: terms per accumulation stage (``None``: one stage).
    Raises :class:`projection.InfeasibleTarget` if ``acc_bits`` cannot hold a single +-1 weight.
    """
    v = np.asarray(v, dtype=np.float64)
    K = v.shape[1]
    if any(m.shape != (K, K) for m in (F, G, H)):
        raise ValueError(f"Gram matrices must be ({K}, {K}); got {F.shape}, {G.shape} and {H.shape}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    wr = weight_range
    v = np.clip(v, wr.lo, wr.hi)
    signed = accumulator_is_signed(plain_round(v, wr), x)
    check_target(x, acc_bits, wr, signed)
    acc_min, acc_max = bounds.accumulator_limits(acc_bits, signed=signed)
    # no accumulator of this layer can leave +-cap, so tighter limits change nothing and keep int64 exact
    cap = (K + 1) * max(x.magnitude, 1) * max(abs(wr.lo), abs(wr.hi), 1)
    limits = (max(acc_min, -cap), min(acc_max, cap))
    candidates = [_greedy(target, G, H, x, limits, wr, tile) for target in (v, _soft_target(v, x, limits, tile))]
    projection, projection_fits = exact_projection_rows(v, x, acc_bits, wr, tile)
    candidates.append(projection)
    errors = np.stack([row_output_errors(v, q, F, G, H) for q in candidates])
    errors[2, ~projection_fits] = np.inf
    best = np.argmin(errors, axis=0)
    q = np.stack(candidates)[best, np.arange(len(best))]
    _check(q, x, acc_bits, tile)
    return q


def exact_projection_rows(v: np.ndarray, x: IntRange, acc_bits: int, weight_range: IntRange,
                          tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact projection of ``v`` (:func:`projection.project_exact`) and, per row, whether it keeps AXE's
    promise too: every running sum (and, with ``tile``, every running sum within a tile) fits the layer's
    ``acc_bits`` accumulator, as every AXE row does. Only those rows may stand in for AXE rows."""
    v = np.clip(np.asarray(v, dtype=np.float64), weight_range.lo, weight_range.hi)
    signed = accumulator_is_signed(plain_round(v, weight_range), x)
    q = project_exact(v, x, acc_bits, weight_range).weights
    return q, _partial_sums_fit(q, x, bounds.accumulator_limits(acc_bits, signed=signed), tile)


def _partial_sums_fit(q: np.ndarray, x: IntRange, limits: tuple[int, int], tile: int | None) -> np.ndarray:
    """Per row, whether every running sum (and every running sum within a tile) stays inside ``limits``."""
    ok = np.ones(q.shape[0], dtype=bool)
    for t in (None, tile):
        lo, hi = bounds.partial_sum_range(q, x, t)
        ok &= (lo >= limits[0]) & (hi <= limits[1])
    return ok


def _greedy(target: np.ndarray, G: np.ndarray, H: np.ndarray, x: IntRange, limits: tuple[int, int],
            wr: IntRange, tile: int | None) -> np.ndarray:
    """One GPFQ pass toward ``target`` with every running (and per-tile) sum clamped into ``limits``."""
    rows, K = target.shape
    q = np.zeros((rows, K), dtype=np.int64)
    pos = np.zeros(rows, dtype=np.int64)
    neg = np.zeros(rows, dtype=np.int64)
    tile_pos, tile_neg = pos.copy(), neg.copy()
    for t in range(K):
        if tile is not None and t % tile == 0:
            tile_pos[:], tile_neg[:] = 0, 0
        if H[t, t] > 0:
            wanted = (target[:, :t + 1] @ G[:t + 1, t] - q[:, :t] @ H[:t, t]) / H[t, t]
        else:  # the input never varies on the calibration data: nothing to correct, keep the target
            wanted = target[:, t]
        choice = np.clip(np.rint(wanted), wr.lo, wr.hi).astype(np.int64)
        up, down = _budget(pos, neg, x, *limits)
        if tile is not None:
            tile_up, tile_down = _budget(tile_pos, tile_neg, x, *limits)
            up, down = np.minimum(up, tile_up), np.minimum(down, tile_down)
        choice = np.clip(choice, -down, up)
        q[:, t] = choice
        gain, loss = np.maximum(choice, 0), np.maximum(-choice, 0)
        pos += gain
        neg += loss
        tile_pos += gain
        tile_neg += loss
    return q


def _check(q: np.ndarray, x: IntRange, acc_bits: int, tile: int | None) -> None:
    """Every partial sum (per tile, and of the whole row) must fit: checked exactly, a failure is a bug."""
    lo, hi = bounds.partial_sum_range(q, x)
    ranges = [(int(lo.min()), int(hi.max()))]
    if tile is not None:
        t_lo, t_hi = bounds.partial_sum_range(q, x, tile)
        ranges.append((int(t_lo.min()), int(t_hi.max())))
    low = min(r[0] for r in ranges)
    for a, b in ranges:
        if bounds.accumulator_width(min(a, low), b) > acc_bits:
            raise RuntimeError(f"internal error: AXE left a partial sum in [{a}, {b}] outside {acc_bits} bits")
