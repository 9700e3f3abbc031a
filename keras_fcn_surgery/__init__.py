"""Turn Keras image classifiers into equivalent fully convolutional networks.

The public names load their modules on first use, so that ``import
keras_fcn_surgery`` (and ``keras-fcn-surgery --help``) does not start
TensorFlow until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "HEADS": "conversion",
    "convert": "conversion",
    "plan": "conversion",
    "ConversionError": "errors",
    "ModelFileError": "errors",
    "NonFiniteWeightsWarning": "errors",
    "VerificationError": "errors",
    "ExportError": "export_common",
    "ExportResult": "export_common",
    "AxisGeometry": "model_geometry",
    "Geometry": "model_geometry",
    "geometry": "model_geometry",
    "heatmap": "heatmaps",
    "imagenet_class_names": "heatmaps",
    "load_model": "loading",
    "export_onnx": "onnx_export",
    "ConversionPlan": "planning",
    "predict_map": "prediction",
    "sliding_window_predict": "prediction",
    "export_savedmodel": "serving",
    "log_graphs": "tensorboard",
    "VerificationResult": "verification",
    "verify": "verification",
}

__all__ = [
    "AxisGeometry",
    "ConversionError",
    "ConversionPlan",
    "ExportError",
    "ExportResult",
    "Geometry",
    "HEADS",
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


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_fcn_surgery' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"keras_fcn_surgery.{module}"), name)
    globals()[name] = value
    return value


# No submodule may share a public name: importing it would bind the module to
# that name on the package (``keras_fcn_surgery.geometry``), hiding the function.


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from keras_fcn_surgery.conversion import HEADS, convert, plan
    from keras_fcn_surgery.errors import ConversionError, ModelFileError, NonFiniteWeightsWarning, VerificationError
    from keras_fcn_surgery.export_common import ExportError, ExportResult
    from keras_fcn_surgery.heatmaps import heatmap, imagenet_class_names
    from keras_fcn_surgery.loading import load_model
    from keras_fcn_surgery.model_geometry import AxisGeometry, Geometry, geometry
    from keras_fcn_surgery.onnx_export import export_onnx
    from keras_fcn_surgery.planning import ConversionPlan
    from keras_fcn_surgery.prediction import predict_map, sliding_window_predict
    from keras_fcn_surgery.serving import export_savedmodel
    from keras_fcn_surgery.tensorboard import log_graphs
    from keras_fcn_surgery.verification import VerificationResult, verify
