"""What a pass claims about each layer, checked against the certificate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from qonnx.core.modelwrapper import ModelWrapper

from a2q_passes import bounds, progress
from a2q_passes.certificate.execution import CannotCertify
from a2q_passes.certificate.layer import LayerCertificate, certify_layer
from a2q_passes.certificate.shapes import shapes_cached
from a2q_passes.errors import PostconditionError
from a2q_passes.read_only_model import ReadOnlyModel


@dataclass(frozen=True)
class Claim:
    """What a pass asserts about one layer: the fast path's range and (optionally) the promised width.

    With ``tile`` (a multi-stage datapath of K-tiles of that many terms) ``tile_min``/``tile_max`` is the fast
    path's range of every partial sum within a tile and ``tile_bits`` the width promised for it; ``acc_bits``
    then covers the outer stage (every running sum of tile results and the final sum).
    """

    acc_min: int | None
    acc_max: int | None
    acc_bits: int | None = None
    tile: int | None = None
    tile_min: int | None = None
    tile_max: int | None = None
    tile_bits: int | None = None


def certify_claims(model: ModelWrapper, claims: Mapping[str, Claim], *, what: str,
                   input_dtypes: Mapping[str, str] | None = None, zero_point: str = "fold",
                   input_ranges: str = "exact") -> None:
    """Certify every claimed layer; :class:`PostconditionError` when a claim is narrower than the certificate.

    ``input_ranges``: the input codes the claims were made for, the quantizers' (``exact``) or FINN's
    DataType of them (``finn``); derived here independently of :mod:`a2q_passes.layers`.

    A claim fails when the layer cannot be certified, when its range misses part of the certified
    range, or when the certified range does not fit its promised width. Each layer's certificate is dropped once
    checked (its per-channel ranges would otherwise add up over a deep model: some 0.4 MB per layer of a 7B stack).
    """
    # producers and shapes looked up in tables built once (the certificate only reads the model): scanning the
    # graph for each layer's tensors is quadratic in the graph's size
    model = model if isinstance(model, ReadOnlyModel) else ReadOnlyModel(model.model)
    with shapes_cached():
        _certify_each(model, claims, what, input_dtypes, zero_point, input_ranges)


def _certify_each(model: ModelWrapper, claims: Mapping[str, Claim], what: str,
                  input_dtypes: Mapping[str, str] | None, zero_point: str, input_ranges: str) -> None:
    for node, claim in progress.over_layers(claims.items(), f"{what}: certificate"):
        try:
            cert = certify_layer(model, node, input_dtypes, zero_point, input_ranges, claim.tile)
        except CannotCertify as err:
            raise PostconditionError(f"{what}: layer '{node}' cannot be certified independently of the analysis "
                                     f"({err}); nothing was written") from err
        certified = f"[{cert.acc_min}, {cert.acc_max}]"
        codes = f"input codes {list(cert.input_codes)}" + (
            f", padded taps hold code {cert.pad_code}" if cert.pad_code is not None else "") + (
            f", second operand codes {list(cert.operand_codes)}" if cert.operand_codes is not None else "")
        if claim.acc_min is None or claim.acc_max is None or claim.acc_min > cert.acc_min or claim.acc_max < cert.acc_max:
            raise PostconditionError(
                f"{what}: layer '{node}': the analysis gives the accumulator range [{claim.acc_min}, {claim.acc_max}], "
                f"but executing the graph's own quantizers gives {certified} ({codes}); "
                "the analysis under-reports, nothing was written")
        if claim.acc_bits is not None and not bounds.fits(cert.acc_min, cert.acc_max, claim.acc_bits):
            raise PostconditionError(
                f"{what}: layer '{node}' was promised {claim.acc_bits} bits, but its certified range {certified} needs "
                f"{bounds.accumulator_width(cert.acc_min, cert.acc_max)}; nothing was written")
        if claim.tile is not None:
            _check_stages(what, node, claim, cert)


def _check_stages(what: str, node: str, claim: Claim, cert: LayerCertificate) -> None:
    """A tiled claim: the fast path's within-tile range covers the certified one, and both stages fit their widths."""
    (t_lo, t_hi), (r_lo, r_hi) = cert.tile_range, cert.running_range
    if claim.tile_min is None or claim.tile_max is None or claim.tile_min > t_lo or claim.tile_max < t_hi:
        raise PostconditionError(
            f"{what}: layer '{node}': the analysis gives the partial sums within tiles of {claim.tile} the range "
            f"[{claim.tile_min}, {claim.tile_max}], but executing the graph's own quantizers gives [{t_lo}, {t_hi}]; "
            "the analysis under-reports, nothing was written")
    if claim.tile_bits is not None and not bounds.fits(t_lo, t_hi, claim.tile_bits):
        raise PostconditionError(
            f"{what}: layer '{node}': the partial sums within tiles of {claim.tile} were promised {claim.tile_bits} "
            f"bits, but their certified range [{t_lo}, {t_hi}] needs {bounds.accumulator_width(t_lo, t_hi)}; "
            "nothing was written")
    if claim.acc_bits is not None and not bounds.fits(r_lo, r_hi, claim.acc_bits):
        raise PostconditionError(
            f"{what}: layer '{node}': the running sums of tile results were promised {claim.acc_bits} bits, but "
            f"their certified range [{r_lo}, {r_hi}] needs {bounds.accumulator_width(r_lo, r_hi)}; nothing was written")
