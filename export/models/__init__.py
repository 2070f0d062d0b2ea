"""Classifiers and their ONNX form: the architectures and checkpoints (:mod:`.classifier`, the
small CNN, :mod:`.efficientnet_lite`, :mod:`.weights`), training (:mod:`.training`), the capture of
the fingerprinted layers' activations (:mod:`.activations`), ONNX export with the activations as
extra outputs (:mod:`.onnx_export`) and the import of a user's ONNX model (:mod:`.onnx_import`)."""
