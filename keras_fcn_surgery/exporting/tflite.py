"""Exporting a converted model as a TFLite flatbuffer with free batch, height and width.

The flatbuffer has one signature, ``serving_default``: input ``images``,
float32 ``[-1, -1, -1, C]`` channels-last (a channels-first model is
transposed inside, as in the SavedModel), output ``scores`` (one output per
map, named by its output's name, for a model with several). The tensors'
``shape_signature`` is ``[-1, -1, -1, C]``: call
``interpreter.resize_tensor_input(index, (N, H, W, C))`` then
``allocate_tensors()`` for each new size (the signature runner does it by
itself). It takes model-ready tensors, like the SavedModel's
``serving_default``: apply the model's preprocessing before.

Quantization (``quantize=``): ``"float16"`` stores the weights as float16
(half the file, computed in float32); ``"dynamic"`` stores them as int8 with
per-channel scales (dynamic-range quantization; about a quarter of the file).
Both change the numbers: the export reports the measured difference from
Keras in its result instead of enforcing the float32 tolerance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

from keras_fcn_surgery.errors import ExportError, ModelFileError, first_line
from keras_fcn_surgery.exporting.pipeline import FileFormat, check_choice
from keras_fcn_surgery.exporting.savedmodel import INPUT_NAME, SERVING_DEFAULT, serving_functions
from keras_fcn_surgery.native_log import native_stderr_captured
from keras_fcn_surgery.options import QUANTIZE_MODES

_CHECK_SCRIPT = f"""
import warnings

import numpy as np
import tensorflow as tf

warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that it moves to ai-edge-litert
inputs = np.load(sys.argv[1])
for path, outputs_file in zip(sys.argv[2::2], sys.argv[3::2]):
    interpreter = tf.lite.Interpreter(model_path=path)
    (image,) = interpreter.get_input_details()
    assert list(image["shape_signature"][:3]) == [-1, -1, -1], image["shape_signature"]
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("{SERVING_DEFAULT}")
    # Each output's tensor, by its signature name (the same file: the same tensor indices in both interpreters).
    indices = {{name: detail["index"] for name, detail in runner.get_output_details().items()}}
    assert sorted(indices.values()) == sorted(detail["index"] for detail in interpreter.get_output_details())
    outputs = {{}}
    for key in inputs.files:
        interpreter.resize_tensor_input(image["index"], inputs[key].shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(image["index"], inputs[key])
        interpreter.invoke()
        # The signature runner (what most clients call) must agree with the raw tensor API.
        by_name = runner(**{{"{INPUT_NAME}": inputs[key]}})
        for name, index in indices.items():
            outputs[key + "/" + name] = interpreter.get_tensor(index).copy()
            assert np.array_equal(by_name[name], outputs[key + "/" + name])
    np.savez(outputs_file, **outputs)
"""


@dataclass(frozen=True)
class TfliteFormat(FileFormat):
    """A ``.tflite`` flatbuffer with one ``serving_default`` signature, checked by ``tf.lite.Interpreter``.

    Attributes:
        quantize: None (float32), ``"float16"`` or ``"dynamic"`` (int8
            weights); a quantized export's difference from Keras is measured
            and reported (`note`), not enforced.
    """

    quantize: str | None = None

    name: ClassVar[str] = "tflite"
    suffix: ClassVar[str] = ".tflite"
    what: ClassVar[str] = "The TFLite export of '{name}' (tf.lite.Interpreter)"
    check_script: ClassVar[str] = _CHECK_SCRIPT

    precisions: ClassVar[tuple[str, ...]] = ("float32", "float16")
    precision_refusal: ClassVar[str] = "TFLite has no bfloat16 kernels"

    def __post_init__(self) -> None:
        check_choice("quantize", self.quantize, QUANTIZE_MODES)

    def at_precision(self, fcn, precision: str):
        """At float16: the float32 network with its weights stored in float16 (the converter's float16
        quantization, which TFLite's CPU kernels compute in float32 and its GPU delegate in float16), checked at
        float16's tolerance; a graph computing in float16 itself has no TFLite kernels."""
        return (self, fcn) if precision == "float32" else (replace(self, quantize="float16"), fcn)

    def check_precision(self, precision: str) -> None:
        super().check_precision(precision)
        if precision != "float32" and self.quantize not in (None, "float16"):
            raise ExportError(
                f"Give quantize={self.quantize!r} or precision={precision!r}, not both: precision='float16' "
                "writes float16 weights."
            )

    @property
    def enforce(self) -> bool:
        return self.quantize is None

    def write(self, fcn, path: str) -> None:
        _write_tflite(fcn, path, self.quantize)

    def note(self, checks) -> str:
        if self.quantize is None:
            return ""
        worst = max(check.max_rel_diff for check in checks)
        return (
            f"quantize={self.quantize!r}: measured max rel diff {worst:.3g} ({checks[0].compared}) from the "
            f"float32 Keras model, reported, not enforced (the tolerance {checks[0].tolerance:g} is for float32)"
        )


def _write_tflite(fcn, temporary: str, quantize: str | None) -> None:
    import tensorflow as tf

    function, signature = serving_functions(fcn, preprocess=None, call=_frozen_call(fcn))[SERVING_DEFAULT]
    concrete = tf.function(function, input_signature=signature, autograph=False).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        with native_stderr_captured():  # the converter's absl notices ("Ignored output_format"), shown on failure
            flatbuffer = converter.convert()
    except Exception as error:
        raise ExportError(
            f"The TFLite converter could not convert model '{fcn.name}' ({type(error).__name__}: "
            f"{first_line(str(error))}). A layer may use an operation TFLite lacks."
        ) from error
    try:
        with open(temporary, "wb") as handle:
            handle.write(flatbuffer)
    except OSError as error:
        raise ModelFileError(f"Could not write '{os.path.dirname(temporary)}': {error.strerror or error}.") from error


def _frozen_call(fcn):
    """``fcn``'s forward pass with its weights as constants: TFLite reads resource variables uninitialized (NaN)."""
    import keras
    import tensorflow as tf

    trainable = [tf.constant(keras.ops.convert_to_numpy(v)) for v in fcn.trainable_variables]
    non_trainable = [tf.constant(keras.ops.convert_to_numpy(v)) for v in fcn.non_trainable_variables]

    def call(x, training=False):
        outputs, _ = fcn.stateless_call(trainable, non_trainable, x, training=training)
        return outputs

    return call
