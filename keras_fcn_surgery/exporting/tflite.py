"""Exporting a converted model as a TFLite flatbuffer with free batch, height and width.

The flatbuffer has one signature, ``serving_default``: input ``images``,
float32 ``[-1, -1, -1, C]`` channels-last (a channels-first model is
transposed inside, as in the SavedModel), output ``scores``. The tensors'
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

from keras_fcn_surgery.errors import ModelFileError, first_line
from keras_fcn_surgery.exporting.pipeline import (
    ExportError,
    ExportResult,
    check_batches,
    compare_outputs,
    image_channels,
    prepare_fcn,
    resolve_check_sizes,
    run_check_script,
    run_export,
)
from keras_fcn_surgery.exporting.savedmodel import INPUT_NAME, OUTPUT_NAME, SERVING_DEFAULT, serving_functions
from keras_fcn_surgery.options import QUANTIZE_MODES
from keras_fcn_surgery.saving.atomic import atomic_output, check_output_path


def export_tflite(
    model,
    path,
    *,
    quantize: str | None = None,
    overwrite: bool = False,
    convert: bool = True,
    head: str = "window",
    input_size=None,
    check_sizes=None,
    custom_objects=None,
) -> ExportResult:
    """Write a model as a TFLite flatbuffer whose batch, height and width are free, and prove it runs.

    Same pipeline and guarantees as `export_savedmodel` and `export_onnx`: the
    file is written under a hidden temporary name beside ``path``, loaded in
    a fresh process by ``tf.lite.Interpreter``, resized with
    ``resize_tensor_input`` to two image sizes, compared with the Keras model,
    and only then renamed into place.

    Args:
        model: a classifier (converted first), an already converted FCN, or a
            path to a ``.keras``/``.h5`` file holding either.
        path: the ``.tflite`` file to write; its folder must exist.
        quantize: None (float32, checked at the float32 tolerance),
            ``"float16"`` or ``"dynamic"`` (int8 weights); a quantized
            export's difference from Keras is measured and reported in the
            result (``result.note``, ``result.max_rel_diff``), not enforced.
        overwrite: replace an existing file.
        convert: convert a classifier first; with False the model must
            already be fully convolutional.
        head: ``"window"`` or ``"dense"``, passed to `convert`.
        input_size: ``(H, W)`` the classifier was trained at (see
            `export_savedmodel`).
        check_sizes: ``(H, W)`` sizes to check at; default as for
            `export_savedmodel`.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        An `ExportResult` (``version`` is None).

    Raises:
        ExportError: when the TFLite converter fails, or (float32) the
            interpreter's output differs from the Keras model's.
        ModelFileError: for an existing file without ``overwrite``, or a path
            that cannot be written.

    Example:

    ```python
    result = keras_fcn_surgery.export_tflite(classifier, "fcn.tflite", quantize="float16")
    print(result)  # the checks, and the measured float16 difference
    ```
    """
    if quantize not in QUANTIZE_MODES:
        raise ExportError(f"Expected `quantize` to be one of {QUANTIZE_MODES}. Received: quantize={quantize!r}")
    path = check_output_path(path, suffix=".tflite", overwrite=overwrite)
    fcn, original = prepare_fcn(model, convert=convert, head=head, input_size=input_size, custom_objects=custom_objects)
    sizes = resolve_check_sizes(fcn, original, check_sizes)
    enforce = quantize is None
    checks = run_export(
        atomic_output(path, suffix=".tflite", overwrite=overwrite),
        lambda temporary: _write_tflite(fcn, temporary, quantize),
        lambda temporary: _check_with_interpreter(fcn, temporary, sizes, enforce=enforce),
    )
    note = ""
    if quantize is not None:
        worst = max(check.max_rel_diff for check in checks)
        note = (
            f"quantize={quantize!r}: measured max rel diff {worst:.3g} from the float32 Keras model, "
            f"reported, not enforced (the tolerance {checks[0].tolerance:g} is for float32)"
        )
    return ExportResult(path=path, version=None, checks=checks, note=note)


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


_CHECK_SCRIPT = f"""
import warnings

import numpy as np
import tensorflow as tf

warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that it moves to ai-edge-litert
path, inputs_file, outputs_file = sys.argv[1:4]
interpreter = tf.lite.Interpreter(model_path=path)
(image,) = interpreter.get_input_details()
assert list(image["shape_signature"][:3]) == [-1, -1, -1], image["shape_signature"]
runner = tf.lite.Interpreter(model_path=path).get_signature_runner("{SERVING_DEFAULT}")
(output_index,) = [detail["index"] for detail in interpreter.get_output_details()]
inputs = np.load(inputs_file)
outputs = {{}}
for key in inputs.files:
    interpreter.resize_tensor_input(image["index"], inputs[key].shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(image["index"], inputs[key])
    interpreter.invoke()
    outputs[key] = interpreter.get_tensor(output_index).copy()
    # The signature runner (what most clients call) must agree with the raw tensor API.
    by_name = runner(**{{"{INPUT_NAME}": inputs[key]}})["{OUTPUT_NAME}"]
    assert np.array_equal(by_name, outputs[key])
np.savez(outputs_file, **outputs)
"""


def _check_with_interpreter(fcn, path: str, sizes, *, enforce: bool):
    """Run the flatbuffer in a fresh process's TFLite interpreter at each size and compare with Keras."""
    image_channels(fcn)
    batches = check_batches(fcn, sizes)
    what = f"The TFLite export of '{fcn.name}' (tf.lite.Interpreter)"
    outputs = run_check_script(_CHECK_SCRIPT, path, batches, what=what)
    return compare_outputs(fcn, batches, outputs, what=what, enforce=enforce)
