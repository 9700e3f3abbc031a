"""Turn Keras image classifiers into equivalent fully convolutional networks."""

from keras_fcn_surgery.conversion import HEADS, convert, plan
from keras_fcn_surgery.errors import ConversionError, ModelFileError, VerificationError
from keras_fcn_surgery.geometry import AxisGeometry, Geometry, geometry
from keras_fcn_surgery.loading import load_model
from keras_fcn_surgery.planning import ConversionPlan
from keras_fcn_surgery.verification import VerificationResult, verify

__all__ = [
    "HEADS",
    "AxisGeometry",
    "Geometry",
    "ConversionError",
    "ConversionPlan",
    "ModelFileError",
    "VerificationError",
    "VerificationResult",
    "convert",
    "geometry",
    "load_model",
    "plan",
    "verify",
]
