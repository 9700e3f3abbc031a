"""Turn Keras image classifiers into equivalent fully convolutional networks.

The public names load their modules on first use, so that ``import
keras_fcn_surgery`` (and ``keras-fcn-surgery --help``) does not start
TensorFlow until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "HEADS": "surgery.convert",
    "convert": "surgery.convert",
    "as_fcn": "surgery.fcn",
    "FcnSpec": "surgery.fcn",
    "MapOutput": "surgery.fcn",
    "OutputMaps": "surgery.fcn",
    "fcn_spec": "surgery.fcn",
    "plan": "surgery.convert",
    "ConversionError": "errors",
    "InputError": "errors",
    "ModelFileError": "errors",
    "NonFiniteWeightsWarning": "errors",
    "VerificationError": "errors",
    "UninformativeVerificationWarning": "errors",
    "IgnoredHeadWarning": "errors",
    "SlowTilingWarning": "errors",
    "RewriteKind": "surgery.rules.base",
    "ExportError": "errors",
    "ExportResult": "exporting.pipeline",
    "AxisGeometry": "grid.geometry",
    "Geometry": "grid.geometry",
    "geometry": "grid.geometry",
    "heatmap": "inference.heatmap",
    "HeatmapStyle": "inference.heatmap",
    "imagenet_class_names": "inference.heatmap",
    "load_model": "saving.loading",
    "save_model": "saving.record",
    "export": "exporting.api",
    "export_onnx": "exporting.api",
    "ExportOptions": "exporting.api",
    "ConversionPlan": "surgery.plan",
    "predict_map": "inference.predict",
    "certify_map": "inference.predict",
    "Mapper": "inference.mapper",
    "prepare": "inference.mapper",
    "Tiling": "inference.mapper",
    "Execution": "inference.mapper",
    "Inputs": "inference.mapper",
    "MapMethod": "inference.mapper",
    "MapCertificate": "inference.certificate",
    "CertifiedMap": "inference.certificate",
    "InexactMapWarning": "errors",
    "UncertifiableMapError": "errors",
    "predict_images": "batch.run",
    "BatchSummary": "batch.run",
    "predict_maps": "inference.predict",
    "PredictionPlan": "inference.staged",
    "StagePlan": "inference.staged",
    "PlannedOutput": "inference.staged",
    "plan_prediction": "inference.predict",
    "WindowedPlan": "inference.windowed",
    "sliding_window_predict": "inference.predict",
    "export_savedmodel": "exporting.api",
    "export_tflite": "exporting.api",
    "log_graphs": "exporting.tensorboard",
    "VerificationResult": "surgery.verify",
    "verify": "surgery.convert",
    "segmenter": "segmentation.segmenter",
    "segmentation_loss": "segmentation.losses",
    "segment_image": "segmentation.predict",
    "filters_picture": "inference.pictures",
    "activations_picture": "inference.pictures",
}

__all__ = [
    "AxisGeometry",
    "BatchSummary",
    "CertifiedMap",
    "ConversionError",
    "ConversionPlan",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FcnSpec",
    "MapOutput",
    "OutputMaps",
    "Geometry",
    "HEADS",
    "HeatmapStyle",
    "InputError",
    "IgnoredHeadWarning",
    "InexactMapWarning",
    "Execution",
    "Inputs",
    "MapMethod",
    "Mapper",
    "Tiling",
    "MapCertificate",
    "ModelFileError",
    "NonFiniteWeightsWarning",
    "RewriteKind",
    "SlowTilingWarning",
    "UninformativeVerificationWarning",
    "UncertifiableMapError",
    "PredictionPlan",
    "StagePlan",
    "PlannedOutput",
    "VerificationError",
    "VerificationResult",
    "WindowedPlan",
    "as_fcn",
    "certify_map",
    "convert",
    "export",
    "fcn_spec",
    "export_onnx",
    "export_savedmodel",
    "export_tflite",
    "geometry",
    "heatmap",
    "imagenet_class_names",
    "load_model",
    "save_model",
    "log_graphs",
    "plan",
    "predict_images",
    "plan_prediction",
    "predict_map",
    "predict_maps",
    "prepare",
    "sliding_window_predict",
    "verify",
    "segmenter",
    "segmentation_loss",
    "segment_image",
    "filters_picture",
    "activations_picture",
]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_fcn_surgery' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"keras_fcn_surgery.{module}"), name)
    globals()[name] = value
    return value


# No subpackage may share a public name: importing it would bind the module to
# that name on the package (``keras_fcn_surgery.geometry``), hiding the function.


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from keras_fcn_surgery.batch.run import BatchSummary, predict_images
    from keras_fcn_surgery.errors import (
        ConversionError,
        ExportError,
        IgnoredHeadWarning,
        InexactMapWarning,
        InputError,
        ModelFileError,
        NonFiniteWeightsWarning,
        SlowTilingWarning,
        UncertifiableMapError,
        UninformativeVerificationWarning,
        VerificationError,
    )
    from keras_fcn_surgery.exporting.api import ExportOptions, export, export_onnx, export_savedmodel, export_tflite
    from keras_fcn_surgery.exporting.pipeline import ExportResult
    from keras_fcn_surgery.exporting.tensorboard import log_graphs
    from keras_fcn_surgery.grid.geometry import AxisGeometry, Geometry, geometry
    from keras_fcn_surgery.inference.certificate import CertifiedMap, MapCertificate
    from keras_fcn_surgery.inference.heatmap import HeatmapStyle, heatmap, imagenet_class_names
    from keras_fcn_surgery.inference.mapper import Execution, Inputs, MapMethod, Mapper, Tiling, prepare
    from keras_fcn_surgery.inference.pictures import activations_picture, filters_picture
    from keras_fcn_surgery.inference.predict import (
        certify_map,
        plan_prediction,
        predict_map,
        predict_maps,
        sliding_window_predict,
    )
    from keras_fcn_surgery.inference.staged import PlannedOutput, PredictionPlan, StagePlan
    from keras_fcn_surgery.inference.windowed import WindowedPlan
    from keras_fcn_surgery.saving.loading import load_model
    from keras_fcn_surgery.saving.record import save_model
    from keras_fcn_surgery.segmentation.losses import segmentation_loss
    from keras_fcn_surgery.segmentation.predict import segment_image
    from keras_fcn_surgery.segmentation.segmenter import segmenter
    from keras_fcn_surgery.surgery.convert import HEADS, convert, plan, verify
    from keras_fcn_surgery.surgery.fcn import FcnSpec, MapOutput, OutputMaps, as_fcn, fcn_spec
    from keras_fcn_surgery.surgery.plan import ConversionPlan
    from keras_fcn_surgery.surgery.rules.base import RewriteKind
    from keras_fcn_surgery.surgery.verify import VerificationResult
