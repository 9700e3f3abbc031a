"""The one way out: `export(model, path, format=...)`, and the format-named shortcuts over it.

`export` owns the orchestration every format shares (see `exporting.pipeline`):
the formats (`savedmodel.SavedModelFormat`, `onnx.OnnxFormat`,
`tflite.TfliteFormat`, `openvino.OpenvinoFormat`) only write their file and
say how to check it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass, fields

from keras_fcn_surgery.errors import ConversionError, ExportError, InputError, UninformativeVerificationWarning
from keras_fcn_surgery.exporting.onnx import OnnxFormat
from keras_fcn_surgery.exporting.openvino import OpenvinoFormat
from keras_fcn_surgery.exporting.pipeline import (
    Compared,
    ExportFormat,
    ExportResult,
    check_batches,
    compare_outputs,
    keras_maps,
    resolve_check_sizes,
    run_check_script,
    write_export,
)
from keras_fcn_surgery.exporting.pytorch import TorchFormat
from keras_fcn_surgery.exporting.savedmodel import SavedModelFormat, signature_outputs
from keras_fcn_surgery.exporting.tflite import TfliteFormat
from keras_fcn_surgery.inference.certificate import precision_tolerance
from keras_fcn_surgery.options import EXPORT_FORMATS
from keras_fcn_surgery.saving.atomic import pause_point
from keras_fcn_surgery.saving.loading import as_model
from keras_fcn_surgery.surgery.fcn import as_fcn, original_size
from keras_fcn_surgery.surgery.verify import logits_of, tolerance_for

# The formats by name, in the order of `options.EXPORT_FORMATS` (the CLI's choices).
FORMATS: dict[str, type[ExportFormat]] = {
    kind.name: kind for kind in (SavedModelFormat, OnnxFormat, TfliteFormat, OpenvinoFormat, TorchFormat)
}


@dataclass(frozen=True)
class ExportOptions:
    """What every export format shares: how the model is read and converted, and how the written file is checked.

    One object for `export`, `export_savedmodel`, `export_onnx` and
    `export_tflite` (the CLI's ``export`` builds it from ``--no-convert``,
    ``--head``, ``--input-size``, ``--custom-objects`` and ``--precision``);
    what only one format takes (``version``, ``opset``, ``quantize``...) is a
    keyword of its own.

    Attributes:
        convert: convert a classifier first; with False the model must
            already be fully convolutional.
        head: ``"window"`` or ``"dense"``, passed to `convert`.
        input_size: ``(H, W)`` the classifier was trained at: needed to
            convert a classifier that accepts any size; for an FCN it sets the
            first check size.
        custom_objects: passed to `keras.models.load_model` for a model file.
        check_sizes: the ``(H, W)`` sizes to check at; default: the original
            size and that size plus seven output strides.
        precision: what the written network computes at: ``"float32"``
            (default), ``"bfloat16"`` or ``"float16"`` (`reduced_precision`:
            Keras's mixed policy, the output layers in float32; a TFLite file
            stores float16 weights instead, computed in float32 on a CPU). The
            check compares it with the float32 model at the precision's
            tolerance (`certificate.precision_tolerance`: 6e-2 for bfloat16,
            2e-2 for float16), stated in the result. A format that cannot hold
            the precision is refused before anything is loaded: TFLite and
            OpenVINO have no bfloat16 graph to run.

    Example:

    ```python
    options = keras_fcn_surgery.ExportOptions(precision="float16", input_size=(224, 224))
    keras_fcn_surgery.export(classifier, "fcn.onnx", format="onnx", options=options)
    ```
    """

    convert: bool = True
    head: str = "window"
    input_size: tuple[int, int] | None = None
    custom_objects: dict | None = None
    check_sizes: tuple | list | None = None
    precision: str = "float32"


def export(
    model,
    path,
    format: str = "savedmodel",
    *,
    options: ExportOptions | None = None,
    overwrite: bool = False,
    **format_options,
) -> ExportResult:
    """Write a model as a SavedModel, an ONNX, a TFLite or an OpenVINO file with free height and width, and prove
    it runs.

    A model with several outputs keeps them all: the export returns one map
    per output, named by the output's name (`signature_outputs`; ``scores``
    for a model of one output), and the check compares every one.

    The export is written under a hidden temporary name beside ``path``,
    loaded in a fresh Python process that cannot import this package, run at
    two image sizes and compared with the Keras model; only then is it renamed
    into place. A failure at any step (an interruption included) leaves
    nothing behind, and an existing export untouched.

    Every format is written on Keras's TensorFlow backend; under another
    (``KERAS_BACKEND=jax``) the model is handed to a fresh TensorFlow process
    as a ``.keras`` file to write (`pipeline.write_export`), and the written
    file is checked against the model on this process's backend.

    Args:
        model: a classifier (converted first), an already converted FCN (or a
            segmenter), or a path to a ``.keras``/``.h5`` file holding either.
        path: ``"savedmodel"``: the model's base folder (created when
            missing), the export goes to a version folder in it; ``"onnx"``,
            ``"tflite"``, ``"torch"``: the file to write, ending in
            ``.onnx``/``.tflite``/``.pt2``,
            in a folder that exists; ``"openvino"``: the folder to write
            ``model.xml`` and ``model.bin`` in (its parent must exist).
        format: ``"savedmodel"`` (TF Serving), ``"onnx"``, ``"tflite"``,
            ``"openvino"`` (OpenVINO IR, checked as compiled with
            ``{"INFERENCE_PRECISION_HINT": "f32"}``) or ``"torch"`` (a
            `torch.export` program, ``.pt2``, checked by PyTorch with Keras
            unimportable; see `exporting.pytorch` for the sizes it runs).
        options: the `ExportOptions` every format shares (conversion, input
            size, check sizes, precision, custom objects); default: theirs.
        overwrite: replace an existing version folder or file.
        **format_options: the format's own: ``version``, ``preprocess``,
            ``bytes_signature`` (see `export_savedmodel`); ``opset`` and
            ``exporter`` (see `export_onnx`); ``quantize`` (see
            `export_tflite`); ``trace_size`` (see `exporting.pytorch`); OpenVINO
            takes none.

    Returns:
        An `ExportResult`: what was written, and the checks.

    Raises:
        InputError: for an unknown ``format`` or ``precision``, or an option
            the format does not take (one of `ExportOptions` given as a
            keyword included: it goes in ``options``).
        ModelFileError: for an output that exists (without ``overwrite``) or
            cannot be written, or a model file that cannot be loaded.
        ExportError: when the model cannot be exported in this format (or at
            this precision), or the reloaded export differs from the Keras model.

    Example:

    ```python
    result = keras_fcn_surgery.export(classifier, "fcn.onnx", format="onnx")
    result.path  # '/abs/path/fcn.onnx'
    ```
    """
    options = _checked_options(options)
    precision = options.precision
    kind = export_format(format, **format_options)
    kind.check_precision(precision)
    path = kind.output(path, overwrite=overwrite)
    source = as_model(model, options.custom_objects, error_class=ExportError)
    fcn = _fcn_to_export(source, convert=options.convert, head=options.head, input_size=options.input_size)
    kind.accept(fcn)
    sizes = resolve_check_sizes(fcn, original_size(source, options.input_size), options.check_sizes)
    kind, sizes = kind.fit_sizes(fcn, sizes)
    kind, written = kind.at_precision(fcn, precision)
    tolerance = max(tolerance_for(fcn), precision_tolerance(precision))
    with kind.destination(path, overwrite=overwrite) as destination, destination.staging as temporary:
        pause_point("write")
        write_export(kind, written, temporary)
        pause_point("check")
        enforce = kind.enforce or precision != "float32"  # a precision's tolerance is always held
        checks, output_checks = _check(
            kind, fcn, temporary, sizes, written=written, tolerance=tolerance, enforce=enforce
        )
        pause_point("publish")
    _warn_if_uninformative(fcn, format, checks)
    note = kind.note(checks)
    if precision != "float32":
        note = (
            f"written at {precision}: compared with the float32 model at {precision}'s tolerance {tolerance:g} "
            f"(measured max rel diff {max(check.max_rel_diff for check in checks):.3g})"
        )
    return ExportResult(
        path=destination.path,
        version=destination.version,
        checks=checks,
        note=note,
        output_checks=output_checks,
    )


def export_format(format: str, **options) -> ExportFormat:
    """The `ExportFormat` named ``format`` with its own ``options`` (checked here).

    Raises:
        InputError: for an unknown format, or an option it does not take.
        ExportError: for an option value it does not take.
    """
    kind = FORMATS.get(format) if isinstance(format, str) else None
    if kind is None:
        raise InputError(f"Expected `format` to be one of {EXPORT_FORMATS}. Received: format={format!r}")
    known = [field.name for field in fields(kind)]
    unknown = sorted(set(options) - set(known))
    shared = [name for name in unknown if name in _SHARED]
    if shared:
        given = ", ".join(f"{name}={options[name]!r}" for name in shared)
        verb = "is an option" if len(shared) == 1 else "are options"
        raise InputError(
            f"`{'`, `'.join(shared)}` {verb} every format shares, given in one object: "
            f"`export(..., options=ExportOptions({given}))`."
        )
    if unknown:
        takes = f"its options are {', '.join(known)}" if known else "it takes no option of its own"
        raise InputError(f"format={format!r} does not take {', '.join(unknown)}: {takes}.")
    return kind(**options)


_SHARED = {field.name for field in fields(ExportOptions)}


def _checked_options(options) -> ExportOptions:
    if options is None:
        return ExportOptions()
    if not isinstance(options, ExportOptions):
        raise InputError(f"Expected `options` to be an ExportOptions. Received: options={options!r}")
    return options


def _fcn_to_export(source, *, convert: bool, head: str, input_size):
    """The one-input FCN to export: ``source`` itself, or its conversion (`as_fcn`); one map per output."""
    if len(source.inputs) != 1:
        raise ExportError(
            f"Model '{source.name}' has {len(source.inputs)} inputs and {len(source.outputs)} outputs; a serving "
            "export takes one image input (and returns one score map per output)."
        )
    try:
        return as_fcn(source, head=head, input_size=input_size, convert=convert)
    except ConversionError as error:
        if convert or isinstance(error, ExportError):
            raise
        # convert=False refuses a classifier: this export cannot be made as asked.
        raise ExportError(str(error)) from error


def _warn_if_uninformative(fcn, format: str, checks) -> None:
    """Warn when the export's check could not tell a right file from a wrong one: what it compares (the logits,
    as `convert` does, where the model has them) hardly varies with the check images."""
    if all(check.informative for check in checks):
        return
    warnings.warn(
        f"The check of the {format} export of '{fcn.name}' proves little: the model's {checks[0].compared} hardly "
        "vary with the check images (an untrained network, or collapsed features give the same scores "
        "everywhere), so a broken export would pass too. Load trained weights, and verify the "
        "conversion on real images: `convert(model, verify_inputs=images)` (CLI: `--verify-images DIR`).",
        UninformativeVerificationWarning,
        stacklevel=3,
    )


def _check(kind: ExportFormat, fcn, path: str, sizes, *, written, tolerance: float, enforce: bool):
    """Run the written export in a fresh process at each size and compare it with the Keras model ``fcn``
    (``written``: the model the file was written from, ``fcn`` or its reduced-precision copy), held to
    ``tolerance`` (with ``enforce``, a difference above it fails the export; else it is only measured).

    Returns ``(checks, output_checks)`` (see `ExportResult`). For a model
    ending in a softmax or sigmoid, ``checks`` compare what `convert`
    compares, the logits: the same writer also writes a *twin* of the export
    that stops before that activation (`surgery.verify.logits_of`), run in
    the same process; its logits are checked first, then the file's own
    outputs. Probabilities alone prove little: a softmax of tiny logits is
    constant, and a confident one saturates, whatever the file computes
    before it.
    """
    batches = check_batches(fcn, sizes)
    what = kind.what.format(name=fcn.name)
    expected = keras_maps(fcn, batches)
    inputs = kind.check_inputs(fcn, batches)
    with tempfile.TemporaryDirectory(prefix="kfs-twin-") as scratch:
        # The twin of the file is written from ``written``'s logits (its own layer names), compared with ``fcn``'s.
        same = contextlib.nullcontext if written is fcn else logits_of
        with logits_of(fcn) as (logits, compared), same(written) as found:
            written_logits = logits if written is fcn else found[0]
            paths = [path]
            if compared != "outputs":
                paths.append(os.path.join(scratch, "logits" + os.path.splitext(path)[1]))
                write_export(kind.twin(), written_logits, paths[1])
                expected_logits = keras_maps(logits, batches)
                logit_names = signature_outputs(written_logits)
        outputs = run_check_script(kind.check_script, paths, inputs, what=what)
    logit_checks: tuple = ()
    if compared != "outputs":
        twin = Compared(
            f"{what} (checked on its {compared}: a twin of the file, written without the final activation)",
            names=logit_names,
            labels=signature_outputs(fcn),
            compared=compared,
        )
        logit_checks = compare_outputs(
            expected_logits, batches, kind.check_outputs(fcn, outputs[1]), twin, tolerance=tolerance, enforce=enforce
        )
    output_checks = compare_outputs(
        expected,
        batches,
        kind.check_outputs(fcn, outputs[0]),
        Compared(what, names=signature_outputs(fcn)),
        tolerance=tolerance,
        enforce=enforce,
    )
    return (logit_checks, output_checks) if logit_checks else (output_checks, ())


def export_savedmodel(
    model,
    export_dir,
    *,
    version=None,
    preprocess: str = "none",
    bytes_signature: bool = True,
    options: ExportOptions | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a model as a TF Serving SavedModel with free height and width, and prove it reloads.

    ``export(model, export_dir, format="savedmodel", ...)``: the SavedModel is
    written to a temporary folder beside the version folder, reloaded in a
    fresh Python process that imports TensorFlow but not this package, run
    through ``serving_default`` at two image sizes and compared with the Keras
    model; only then is it renamed into place. A failure at any step leaves no
    version folder behind (and an existing one untouched).

    The arguments not listed here (``model``, ``options``, ``overwrite``) are
    those of `export`.

    Args:
        export_dir: the model's base folder; created when missing.
        version: integer version folder; default: one more than the highest
            numeric folder in ``export_dir`` (1 when there is none).
        preprocess: what ``serving_bytes`` does to the decoded uint8 pixels
            before the model: ``"none"`` (cast to float32), ``"caffe"``
            (RGB->BGR, minus the ImageNet mean), ``"tf"`` (scaled to [-1, 1])
            or ``"torch"`` (scaled to [0, 1], then ImageNet mean and std).
            ``serving_default`` never preprocesses.
        bytes_signature: add ``serving_bytes``. Needs 1, 3 or 4 channels.

    Returns:
        An `ExportResult` with the version folder and the checks.

    Raises:
        ModelFileError: for an existing version without ``overwrite``, or a
            folder that cannot be written.
        ExportError: when the model cannot be served this way, or the reloaded
            SavedModel differs from the Keras model.

    Example:

    ```python
    result = keras_fcn_surgery.export_savedmodel(classifier, "/models/fcn", preprocess="caffe")
    result.path  # '/models/fcn/1'
    ```
    """
    return export(
        model,
        export_dir,
        "savedmodel",
        options=options,
        overwrite=overwrite,
        version=version,
        preprocess=preprocess,
        bytes_signature=bytes_signature,
    )


def export_onnx(
    model,
    path,
    *,
    opset=None,
    exporter: str = "streamed",
    options: ExportOptions | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a model as an ONNX file whose batch, height and width are symbolic, and prove it runs.

    ``export(model, path, format="onnx", ...)``: the file is written under a
    temporary name in the target folder, checked by ``onnx.checker`` and run
    with onnxruntime in a fresh process at two image sizes, compared with the
    Keras model, and only then renamed into place: a failure leaves no file
    (and an existing one untouched).

    The arguments not listed here are those of `export`.

    Args:
        path: the ``.onnx`` file to write; its folder must exist.
        opset: ONNX opset version; default: tf2onnx's.
        exporter: ``"streamed"`` (default: this package's writer, which
            streams the weights into the file: about one copy of the largest
            weight above the loaded model) or ``"keras"`` (Keras's
            ``model.export(format="onnx")``, tf2onnx on the frozen graph:
            several copies of every weight; same names, same check).

    Returns:
        An `ExportResult` (``version`` is None).

    Raises:
        ExportError: when the ONNX packages are missing, the conversion fails,
            or onnxruntime's output differs from the Keras model's.
        ModelFileError: for an existing file without ``overwrite``, or a path
            that cannot be written.
    """
    return export(model, path, "onnx", options=options, overwrite=overwrite, opset=opset, exporter=exporter)


def export_tflite(
    model,
    path,
    *,
    quantize: str | None = None,
    options: ExportOptions | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a model as a TFLite flatbuffer whose batch, height and width are free, and prove it runs.

    ``export(model, path, format="tflite", ...)``, with the guarantees of
    `export_savedmodel` and `export_onnx`: the file is written under a hidden
    temporary name beside ``path``, loaded in a fresh process by
    ``tf.lite.Interpreter``, resized with ``resize_tensor_input`` to two image
    sizes, compared with the Keras model, and only then renamed into place.

    The arguments not listed here are those of `export`.

    Args:
        path: the ``.tflite`` file to write; its folder must exist.
        quantize: None (float32, checked at the float32 tolerance),
            ``"float16"`` or ``"dynamic"`` (int8 weights); a quantized
            export's difference from Keras is measured and reported in the
            result (``result.note``, ``result.max_rel_diff``), not enforced.

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
    return export(model, path, "tflite", options=options, overwrite=overwrite, quantize=quantize)
