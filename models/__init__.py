"""Model zoo: real-data loaders, Brevitas model definitions, training, QONNX/QDQ export and evaluation.

Submodules: `models.data` (loaders), `models.nets` (architectures), `models.train` (training CLI),
`models.build_all` (regenerates every artefact), `models.export` (QONNX / plain ONNX export),
`models.qdq` (onnxruntime QDQ model), `models.evaluate` (ONNX accuracy / PSNR). See models/README.md.
"""
