"""Exporting a converted model to ONNX with symbolic batch, height and width, checked with onnxruntime.

Needs the optional packages ``onnx``, ``onnxruntime`` and ``tf2onnx``
(``pip install keras-fcn-surgery[onnx]``). Keras's own
``model.export(format="onnx")`` (tf2onnx underneath) does the conversion; the
input is then named ``images`` with dimensions ``batch``, ``height``,
``width``, and the output ``scores`` with ``batch``, ``map_height``,
``map_width``. Unlike the SavedModel, the ONNX graph keeps the model's own
layout: NCHW for a channels-first model.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

from keras_fcn_surgery.errors import ModelFileError, first_line
from keras_fcn_surgery.export.pipeline import (
    ExportError,
    ExportResult,
    check_batches,
    compare_outputs,
    image_channels,
    prepare_fcn,
    resolve_check_sizes,
)
from keras_fcn_surgery.export.savedmodel import INPUT_NAME, OUTPUT_NAME
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.saving.atomic import atomic_output, check_output_path

ONNX_PACKAGES = ("onnx", "onnxruntime", "tf2onnx")


def export_onnx(
    model,
    path,
    *,
    overwrite: bool = False,
    convert: bool = True,
    head: str = "window",
    input_size=None,
    check_sizes=None,
    opset=None,
    custom_objects=None,
) -> ExportResult:
    """Write a model as an ONNX file whose batch, height and width are symbolic, and prove it runs.

    The file is written under a temporary name in the target folder, run with
    onnxruntime at two image sizes and compared with the Keras model, and only
    then renamed into place: a failure leaves no file (and an existing one
    untouched).

    Args:
        model: a classifier (converted first), an already converted FCN, or a
            path to a ``.keras``/``.h5`` file holding either.
        path: the ``.onnx`` file to write; its folder must exist.
        overwrite: replace an existing file.
        convert: convert a classifier first; with False the model must
            already be fully convolutional.
        head: ``"window"`` or ``"dense"``, passed to `convert`.
        input_size: ``(H, W)`` the classifier was trained at (see
            `export_savedmodel`).
        check_sizes: ``(H, W)`` sizes to check at; default as for
            `export_savedmodel`.
        opset: ONNX opset version; default: tf2onnx's.
        custom_objects: passed to `keras.models.load_model` for a path.

    Returns:
        An `ExportResult` (``version`` is None).

    Raises:
        ExportError: when the ONNX packages are missing, the conversion fails,
            or onnxruntime's output differs from the Keras model's.
        ModelFileError: for an existing file without ``overwrite``, or a path
            that cannot be written.
    """
    onnx, onnxruntime = _require_onnx()
    path = check_output_path(path, suffix=".onnx", overwrite=overwrite)
    fcn, original = prepare_fcn(model, convert=convert, head=head, input_size=input_size, custom_objects=custom_objects)
    sizes = resolve_check_sizes(fcn, original, check_sizes)
    with atomic_output(path, suffix=".onnx", overwrite=overwrite) as temporary:
        _write_onnx(fcn, temporary, onnx, opset)
        checks = _check_with_onnxruntime(fcn, temporary, sizes, onnxruntime)
    return ExportResult(path=path, version=None, checks=checks)


def _require_onnx():
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, which is not installed: "
            "pip install keras-fcn-surgery[onnx]"
        )
    return importlib.import_module("onnx"), importlib.import_module("onnxruntime")


def _input_spec(fcn):
    import tensorflow as tf

    channels = image_channels(fcn)
    shape = list(model_layout(fcn).batch_shape(None, None, None, channels))
    return tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)


def _write_onnx(fcn, temporary: str, onnx, opset) -> None:
    try:
        with warnings.catch_warnings():
            # Keras's tf2onnx patch probes the removed `np.object` and warns about it.
            warnings.simplefilter("ignore", FutureWarning)
            fcn.export(temporary, format="onnx", input_signature=[_input_spec(fcn)], opset_version=opset, verbose=False)
    except ImportError as error:
        raise ExportError(f"ONNX export failed: {error}. pip install keras-fcn-surgery[onnx]") from error
    except OSError as error:
        raise ModelFileError(f"Could not write '{temporary}': {error.strerror or error}.") from error
    except Exception as error:
        raise ExportError(
            f"tf2onnx could not convert model '{fcn.name}' ({type(error).__name__}: {first_line(str(error))})."
        ) from error
    proto = onnx.load(temporary)
    _name_io(proto, model_layout(fcn))
    onnx.checker.check_model(proto)
    try:
        onnx.save(proto, temporary)
    except ValueError as error:
        raise ExportError(
            f"Model '{fcn.name}' does not fit in one ONNX file ({first_line(str(error))}); files over 2 GB "
            "need external data, which this export does not write."
        ) from error


def _name_io(proto, layout: Layout) -> None:
    """Rename the graph output to ``scores`` and give the free dimensions readable names."""
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(f"Expected one ONNX input and output, got {len(graph.input)} and {len(graph.output)}.")
    old = graph.output[0].name
    if old != OUTPUT_NAME:
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
            node.input[:] = [OUTPUT_NAME if name == old else name for name in node.input]
        graph.output[0].name = OUTPUT_NAME
    axes = (0, *layout.spatial_axes)
    named = ((graph.input[0], ("batch", "height", "width")), (graph.output[0], ("batch", "map_height", "map_width")))
    for value, names in named:
        dims = value.type.tensor_type.shape.dim
        for axis, name in zip(axes, names, strict=True):
            if not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def _check_with_onnxruntime(fcn, path: str, sizes, onnxruntime):

    layout = model_layout(fcn)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    batches = check_batches(fcn, sizes)
    outputs = {}
    for key, images in batches.items():
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: layout.from_channels_last(images)})
        outputs[key] = layout.to_channels_last(y)
    return compare_outputs(fcn, batches, outputs, what=f"The ONNX export of '{fcn.name}' (onnxruntime)")
