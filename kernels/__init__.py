"""Runtime math shared by the offline pipeline (``export``) and the served detector.

Nothing here imports torch: the Triton Python backend loads this package.
"""
from kernels.errors import FingerprintError, InvalidInputError, ModelMismatchError

__all__ = ["FingerprintError", "InvalidInputError", "ModelMismatchError"]
