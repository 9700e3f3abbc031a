"""Turn Keras image classifiers into equivalent fully convolutional networks."""

from keras_fcn_surgery.conversion import HEADS, convert, plan
from keras_fcn_surgery.errors import ConversionError, ModelFileError, NonFiniteWeightsWarning, VerificationError
from keras_fcn_surgery.export_common import ExportError, ExportResult
from keras_fcn_surgery.geometry import AxisGeometry, Geometry, geometry
from keras_fcn_surgery.heatmap import heatmap, imagenet_class_names
from keras_fcn_surgery.loading import load_model
from keras_fcn_surgery.onnx_export import export_onnx
from keras_fcn_surgery.planning import ConversionPlan
from keras_fcn_surgery.prediction import predict_map, sliding_window_predict
from keras_fcn_surgery.serving import export_savedmodel
from keras_fcn_surgery.tensorboard import log_graphs
from keras_fcn_surgery.verification import VerificationResult, verify

__all__ = [
    "HEADS",
    "AxisGeometry",
    "Geometry",
    "ConversionError",
    "ConversionPlan",
    "ExportError",
    "ExportResult",
    "ModelFileError",
    "NonFiniteWeightsWarning",
    "VerificationError",
    "VerificationResult",
    "convert",
    "export_onnx",
    "export_savedmodel",
    "geometry",
    "heatmap",
    "imagenet_class_names",
    "load_model",
    "log_graphs",
    "plan",
    "predict_map",
    "sliding_window_predict",
    "verify",
]
