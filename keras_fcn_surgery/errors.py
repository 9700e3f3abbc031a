"""Exceptions raised by keras_fcn_surgery."""


class ConversionError(ValueError):
    """A model, layer or file that cannot be turned into an equivalent FCN.

    The message names the offending layer (or file) and says what to do.
    """


class VerificationError(ConversionError):
    """The converted model does not reproduce the source at the original size."""


class ModelFileError(ConversionError):
    """A model file that is missing, unreadable or needs custom objects."""
