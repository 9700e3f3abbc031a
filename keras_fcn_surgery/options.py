"""The choices the library, the CLI and the absl tools share, in one place.

Plain tuples with no import: the CLI builds its parser from them without
loading TensorFlow.
"""

# What a global-pooling head becomes: see `keras_fcn_surgery.convert`.
HEADS = ("window", "dense")

# Preprocessing conventions: `keras.applications`' caffe, tf ([-1, 1]) and torch, and "unit" (pixels / 255, the
# common Keras recipe `Rescaling(1 / 255)` left outside the model); see `keras_fcn_surgery.preprocessing`.
PREPROCESS_MODES = ("none", "caffe", "tf", "torch", "unit")

EXPORT_FORMATS = ("savedmodel", "onnx", "tflite", "openvino", "torch")

# Who writes an ONNX file: this package (the weights streamed into it) or Keras's `model.export(format="onnx")`.
ONNX_EXPORTERS = ("streamed", "keras")

# TFLite weight quantization: None (float32), float16, dynamic-range int8.
QUANTIZE_MODES = (None, "float16", "dynamic")

# Cells of each map that `predict` and `heatmap` compare with the classifier on their crops (`certify_map`).
CERTIFIED_CELLS = 8

# The formats of `predict_images`' outputs (the CLI's --format), registered in `keras_fcn_surgery.batch.formats`.
OUTPUT_FORMATS = ("npz", "zarr", "ome-zarr", "geojson", "csv", "dicom")

# The NGFF version of an OME-Zarr output: 0.4 on Zarr v2 (the default: QuPath, Bio-Formats, OMERO and napari
# read it) or 0.5 on Zarr v3 (napari with ome-zarr >= 0.12); see `keras_fcn_surgery.batch.ome_zarr`.
OME_ZARR_VERSIONS = ("0.4", "0.5")
DEFAULT_OME_ZARR_VERSION = "0.4"

# What a GeoJSON output holds: one polygon per connected region of neighbouring cells with the same top class
# (the default), or one per computed cell; see `keras_fcn_surgery.predict_images`.
GEOJSON_FEATURES = ("regions", "cells")

# How `predict_map` computes a classifier's map (its ``method``; not the forward pass's runtime, its ``engine``,
# the CLI's --execution): its FCN, or windowed (a shared prefix, the rest on each window; exact on every crop);
# "auto" picks the FCN where it is exact and at the stride asked; see `keras_fcn_surgery.inference.windowed`.
MAP_METHODS = ("auto", "fcn", "windowed")
