"""Names shared by the readers and the command line, importable without numpy, onnx or qonnx.

Every ``a2q`` command registers its options (defaults, choices, help) when the CLI starts; keeping
these constants here lets that start-up skip the seconds of imports the readers need.
"""

KIND_WEIGHTS = "weights"  # activations times constant integer weights
KIND_ACT_X_ACT = "act x act"  # MatMul of two quantized activations (attention's Q.K^T, softmax(.).V): no weights
ZERO_POINT_CONVENTIONS = ("fold", "subtract")
# ops that quantize with a scale and zero point taken from the whole tensor (onnxruntime's quantize_dynamic): the
# samples of a batch change each other's codes, so data runs the batch a graph declares (one sample if symbolic)
DYNAMIC_QUANTIZER_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")
# Which input codes a MAC layer is sized for: ``exact`` = the codes the graph's quantizers produce;
# ``finn`` = those widened to the FINN DataType the input carries after ConvertQONNXtoFINN (a narrow
# signed n-bit quantizer's codes [-2^(n-1)+1, 2^(n-1)-1] become INTn = [-2^(n-1), 2^(n-1)-1]).
INPUT_RANGES = ("exact", "finn")
INPUT_RANGES_TITLE = {"exact": "input ranges: exact quantizer codes", "finn": "input ranges: FINN DataType"}
# ops that only move or regroup the elements of a tensor: an elementwise op with one constant commutes with them
LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
# ops that keep every value in its channel (NCHW): activation codes with one scale per channel pass them
CHANNEL_KEEPING_OPS = ("MaxPool", "Identity")
DEFAULT_METHOD = "exact"  # the projection method of `a2q project` (:mod:`a2q_passes.methods`)
