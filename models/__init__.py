"""Model zoo: real-data loaders, Brevitas model definitions, training, QONNX/QDQ export and evaluation.

Submodules: `models.data` (loaders), `models.nets` (architectures), `models.train` (CLI),
`models.qdq` (onnxruntime QDQ model), `models.evaluate` (ONNX accuracy / PSNR).
"""
