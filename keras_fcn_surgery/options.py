"""The choices the library, the CLI and the absl tools share, in one place.

Plain tuples with no import: the CLI builds its parser from them without
loading TensorFlow.
"""

# What a global-pooling head becomes: see `keras_fcn_surgery.convert`.
HEADS = ("window", "dense")

# `keras.applications` preprocessing conventions: see `keras_fcn_surgery.exporting.preprocessing`.
PREPROCESS_MODES = ("none", "caffe", "tf", "torch")

EXPORT_FORMATS = ("savedmodel", "onnx", "tflite")

# TFLite weight quantization: None (float32), float16, dynamic-range int8.
QUANTIZE_MODES = (None, "float16", "dynamic")
