"""One exception hierarchy for the project, so callers can catch what they mean.

``FingerprintError`` is the root. Errors about what a caller passed in also derive from
``ValueError`` so that generic code handling bad values keeps working.
"""


class FingerprintError(Exception):
    """Root of every error this project raises on purpose."""


class InvalidInputError(FingerprintError, ValueError):
    """An argument, file or array is not what the stage needs; the message names the problem."""


class DatasetError(InvalidInputError):
    """A data set cannot be loaded: unknown name, empty folder, mixed image sizes, bad arrays."""


class LayerNotFoundError(InvalidInputError):
    """A requested layer does not exist in the model; the message lists the available ones."""


class ModelMismatchError(FingerprintError):
    """An artifact (weights, bank, activations) does not belong to the model at hand."""
