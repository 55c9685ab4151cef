"""An independent certificate for every "no overflow at P" promise.

The passes size accumulators from :mod:`a2q_passes.layers` and the modules it reads with (the *reader*:
:mod:`a2q_passes.weight_sources` and :mod:`a2q_passes.input_grids` recognise weight
quantizers and input grids and re-implement their arithmetic). A pass that checks its own output
with the same reader inherits the reader's bugs, so writer and check are wrong together. This
package derives each layer's exact accumulator range a second way and shares no code with the
reader (only the pure integer math of :mod:`a2q_passes.bounds`):

* **Weights** are what the graph computes: the constant subgraph that feeds the MAC node's weight
  input (``Quant``/``IntQuant``/``BipolarQuant``/``Trunc``, ``QuantizeLinear`` ->
  ``DequantizeLinear``, ``Transpose``/``Reshape``/..., ``Clip``) is extracted and executed with
  qonnx's ``execute_onnx``; the result divided by the quantizer's executed scale (sent through the
  same layout ops) must be integers. FINN integer initializers carry their values directly and
  must hold what their ``DataType`` annotation allows. A ``DequantizeLinear`` weight zero point is
  added back under ``fold`` (the MAC multiplies raw codes). The integer ops of onnxruntime's
  QOperator/dynamic formats (``QLinearConv``, ``ConvInteger``, ...) read an integer initializer and
  a weight zero point directly: the certificate executes that constant subgraph and subtracts the
  zero point along the output channels as the ONNX op definitions state (``subtract``).
* **Input codes** follow the ONNX/qonnx semantics of the activation quantizer: a ``Quant`` family
  node is executed by qonnx on ``-inf``/``+inf`` (its clamp gives the extreme codes, whatever its
  bit width or signedness); ``DequantizeLinear`` codes span its storage type, sent through the
  graph's own ``Clip`` nodes when Brevitas' QCDQ export narrows the container with them; ``MultiThreshold``
  counts ``0..T`` thresholds; an integer op's input spans the storage type of its zero point (ONNX
  binds both to one type) or, for a zero point computed at run time, the type ONNX type inference
  gives, shifted by every value that zero point's type allows under ``subtract``; FINN ``DataType``
  annotations and user-given input types are taken as declared. With ``input_ranges="finn"`` each
  activation's codes are joined with the DataType FINN gives it, taken from FINN's own tools: the
  tensor's annotation in a FINN graph, qonnx's ``Quant.get_integer_datatype`` (what
  ``ConvertQONNXtoFINN`` annotates) and, for QCDQ, qonnx's ``QCDQToQuant`` bit width rule
  (``extract_elem_type``). Between quantizer and MAC only ops with a known effect on real values are
  crossed (value-selecting ops, ``Relu`` with either scale sign, ``Pad``, scalar ``Mul``/``Div``,
  ``Concat`` of equal grids). Anything else: :class:`CannotCertify`.
* **Activation x activation MatMuls** (no constant second operand: it reads a graph input) take
  both operands' codes as above, K from shape inference on a copy, and the range
  ``K * [min, max corner product]`` (:func:`a2q_passes.bounds.act_x_act_range`).
* **Ranges** are exact per output channel, including ``Conv`` padding taps that hold the zero-point
  code (fold convention) when that code lies outside the input codes: every distinct pattern of
  padded taps over the output positions is evaluated.

:func:`certify_claims` compares the certificate with what a pass claims (the fast path's range and
the promised width) and raises :class:`~a2q_passes.errors.PostconditionError` (exit 4, nothing
written) when the fast path is narrower or the layer cannot be certified.

Modules: :mod:`.execution` (executing constant subgraphs, integers from what they compute),
:mod:`.weights`, :mod:`.input_codes`, :mod:`.integer_ops` (onnxruntime's integer MAC ops), :mod:`.ranges`,
:mod:`.layer` (one layer's certificate), :mod:`.claims` (checking a pass's claims), :mod:`.kernels` (the
compiled integer check of large tensors) and :mod:`.shapes`. None imports the reader
(tests/test_certificate.py checks that).
"""

from __future__ import annotations

from a2q_passes.certificate.claims import Claim, certify_claims
from a2q_passes.certificate.execution import CannotCertify
from a2q_passes.certificate.layer import LayerCertificate, certify_layer
from a2q_passes.certificate.weights import weight_integers

__all__ = ["CannotCertify", "Claim", "LayerCertificate", "certify_claims", "certify_layer", "weight_integers"]
