"""The Triton models' code, shipped as package data: ``<model>/1/model.py`` for the classifier, the
fingerprint detector and the fused guarded classifier. :mod:`export.repository` copies them into a
model repository next to their configs, the ONNX model and the bank."""
