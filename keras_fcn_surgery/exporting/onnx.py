"""Exporting a converted model to ONNX with symbolic batch, height and width, checked with onnxruntime.

Needs the optional packages ``onnx``, ``onnxruntime`` and ``tf2onnx``
(``pip install keras-fcn-surgery[onnx]``). The input is named ``images``
with dimensions ``batch``, ``height``, ``width``, and the output ``scores``
with ``batch``, ``map_height``, ``map_width`` (a model with several outputs:
one per output, named by its name, with ``NAME_height``, ``NAME_width``). Unlike the SavedModel, the
ONNX graph keeps the model's own layout: NCHW for a channels-first model.

Memory: tf2onnx converts a *frozen* graph, and a frozen graph carries every
weight as a constant, which tf2onnx, its TensorFlow optimisation pass, the
ONNX proto and its serialisation each copy (VGG16, 528 MiB of weights: 5.8
GB peak). Here tf2onnx converts the model's *structure* only: the function
it sees takes the weights as extra inputs (``stateless_call``), so its graph
holds no weight. Those inputs are then turned into initializers written
straight from the Keras variables to the file, one tensor at a time (protobuf
merges repeated occurrences of a message field, so the file is the
structure's bytes followed by one ``graph.initializer`` record per weight).
The peak above the loaded model is about one copy of the largest weight.
onnxruntime folds the few layout ops (kernel transposes) that act on those
initializers when it loads the file.

``exporter="keras"`` writes the file with Keras's own exporter instead
(``model.export(path, format="onnx")``: tf2onnx on the frozen graph, the
whole model in memory several times over), then names its input and outputs
as above; it is checked the same way. The default, ``"streamed"``, is this
module's: the same graph for the same model, at a fraction of the memory, and
a clear refusal above ONNX's 2 GiB limit.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np

from keras_fcn_surgery.errors import ExportError, ModelFileError, first_line
from keras_fcn_surgery.exporting.pipeline import FileFormat, ModelLayoutIO, check_choice, image_channels
from keras_fcn_surgery.exporting.savedmodel import INPUT_NAME, signature_outputs
from keras_fcn_surgery.graph import model_layout, patch_tf2onnx
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.options import ONNX_EXPORTERS

ONNX_PACKAGES = ("onnx", "onnxruntime", "tf2onnx")


_CHECK_SCRIPT = """
import numpy as np
import onnx
import onnxruntime

inputs = np.load(sys.argv[1])
for path, outputs_file in zip(sys.argv[2::2], sys.argv[3::2]):
    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = {}
    for key in inputs.files:
        for name, value in zip(names, session.run(names, {"images": inputs[key]})):
            outputs[key + "/" + name] = value
    np.savez(outputs_file, **outputs)
"""


@dataclass(frozen=True)
class OnnxFormat(ModelLayoutIO, FileFormat):
    """An ``.onnx`` file in the model's own layout, checked by ``onnx.checker`` and onnxruntime.

    Attributes:
        opset: ONNX opset version; default: tf2onnx's.
        exporter: ``"streamed"`` (this module's writer: the weights streamed
            into the file, little memory) or ``"keras"`` (Keras's
            ``model.export(format="onnx")``, renamed to the same input and
            output names).
    """

    opset: int | None = None
    exporter: str = "streamed"

    name: ClassVar[str] = "onnx"
    suffix: ClassVar[str] = ".onnx"
    what: ClassVar[str] = "The ONNX export of '{name}' (onnxruntime)"
    check_script: ClassVar[str] = _CHECK_SCRIPT

    def __post_init__(self) -> None:
        check_choice("exporter", self.exporter, ONNX_EXPORTERS)
        _require_onnx()

    def write(self, fcn, path: str) -> None:
        if self.exporter == "keras":
            _write_keras_onnx(fcn, path, importlib.import_module("onnx"), self.opset)
        else:
            _write_onnx(fcn, path, importlib.import_module("onnx"), self.opset)


def _require_onnx():
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, which is not installed: pip install keras-fcn-surgery[onnx]"
        )
    return importlib.import_module("onnx"), importlib.import_module("onnxruntime")


def _input_spec(fcn):
    import tensorflow as tf

    channels = image_channels(fcn)
    shape = list(model_layout(fcn).batch_shape(None, None, None, channels))
    return tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)


# Protobuf fields the streamed initializers are written into (onnx.proto): ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH_FIELD, _GRAPH_INITIALIZER_FIELD, _TENSOR_RAW_DATA_FIELD = 7, 5, 9
# A protobuf message must stay under 2 GiB to be parsed back.
_PROTOBUF_LIMIT = 2**31 - 1


def _write_onnx(fcn, temporary: str, onnx, opset) -> None:
    """Convert the weight-free structure with tf2onnx, then stream the weights into the file."""
    structure, weight_inputs = _convert_structure(fcn, onnx, opset)
    _name_io(structure, model_layout(fcn), signature_outputs(fcn))
    variables = list(fcn.trainable_variables) + list(fcn.non_trainable_variables)
    used = {name for node in structure.graph.node for name in node.input} | {v.name for v in structure.graph.output}
    initializers = []
    for name, variable in zip(weight_inputs, variables, strict=True):
        if name in used:
            initializers.append((name, variable))
    kept_inputs = [value for value in structure.graph.input if value.name not in set(weight_inputs)]
    del structure.graph.input[:]
    structure.graph.input.extend(kept_inputs)
    total = structure.ByteSize() + sum(_nbytes(variable) + 64 for _, variable in initializers)
    if total > _PROTOBUF_LIMIT:
        raise ExportError(
            f"Model '{fcn.name}' needs {total / 2**30:.1f} GiB, over the 2 GiB an ONNX file without external "
            "data can hold; this export does not write external data. Export a SavedModel instead."
        )
    try:
        with open(temporary, "wb") as handle:
            handle.write(structure.SerializeToString())
            for name, variable in initializers:
                _write_initializer(handle, name, variable, onnx)
    except OSError as error:
        raise ModelFileError(f"Could not write '{temporary}': {error.strerror or error}.") from error


def _write_keras_onnx(fcn, temporary: str, onnx, opset) -> None:
    """Keras's ``model.export(format="onnx")``, then this module's names for the input, outputs and free dims."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras's tf2onnx patch probes the removed `np.object`
            # The signature given: Keras infers it only for a model called in this process (not one just loaded).
            image = fcn.inputs[0]
            signature = [keras.InputSpec(shape=tuple(image.shape), dtype=str(image.dtype))]
            fcn.export(temporary, format="onnx", verbose=False, opset_version=opset, input_signature=signature)
        proto = onnx.load(temporary)
    except ImportError as error:
        raise ExportError(f"ONNX export failed: {error}. pip install keras-fcn-surgery[onnx]") from error
    except Exception as error:
        raise ExportError(
            f"Keras's ONNX exporter could not convert model '{fcn.name}' ({type(error).__name__}: "
            f"{first_line(str(error))})."
        ) from error
    if len(proto.graph.input) != 1:
        raise ExportError(f"Expected one image input in Keras's ONNX graph of '{fcn.name}'.")
    _rename(proto.graph, proto.graph.input[0].name, INPUT_NAME)
    _name_io(proto, model_layout(fcn), signature_outputs(fcn))
    try:
        onnx.save(proto, temporary)
    except OSError as error:
        raise ModelFileError(f"Could not write '{temporary}': {error.strerror or error}.") from error


def _convert_structure(fcn, onnx, opset):
    """tf2onnx's ModelProto of ``fcn`` with every weight as a graph input; and those inputs' names, in order."""
    import tensorflow as tf
    import tf2onnx

    variables = list(fcn.trainable_variables) + list(fcn.non_trainable_variables)
    n_trainable = len(fcn.trainable_variables)
    weight_specs = [
        tf.TensorSpec(tuple(v.shape), tf.as_dtype(str(v.dtype)), name=f"kfs_weight_{i}")
        for i, v in enumerate(variables)
    ]
    image_spec = _input_spec(fcn)

    def structure_fn(images, *weights):
        trainable, non_trainable = list(weights[:n_trainable]), list(weights[n_trainable:])
        outputs, _ = fcn.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    function = tf.function(structure_fn, input_signature=[image_spec, *weight_specs], autograph=False)
    try:
        with warnings.catch_warnings():
            # Keras's tf2onnx patch probes the removed `np.object` and warns about it.
            warnings.simplefilter("ignore", FutureWarning)
            patch_tf2onnx()
            proto, _ = tf2onnx.convert.from_function(function, input_signature=[image_spec, *weight_specs], opset=opset)
    except ImportError as error:
        raise ExportError(f"ONNX export failed: {error}. pip install keras-fcn-surgery[onnx]") from error
    except Exception as error:
        raise ExportError(
            f"tf2onnx could not convert model '{fcn.name}' ({type(error).__name__}: {first_line(str(error))})."
        ) from error
    names = [value.name for value in proto.graph.input]
    weight_inputs = []
    for spec in weight_specs:
        matches = [name for name in names if name.split(":")[0] == spec.name]
        weight_inputs.append(matches[0] if matches else f"{spec.name}:0")
    image_inputs = [name for name in names if name not in set(weight_inputs)]
    image_inputs = _constants_for_captures(proto, function, image_inputs, onnx)
    if len(image_inputs) != 1:
        raise ExportError(f"Expected one image input in the ONNX graph of '{fcn.name}'. Received: {image_inputs}")
    _rename(proto.graph, image_inputs[0], INPUT_NAME)
    return proto, weight_inputs


def _constants_for_captures(proto, function, inputs: list, onnx) -> list:
    """``inputs`` less those that are tensors the function captured (an adapted `Normalization`'s mean and
    variance, computed from its weights once), which become constants of the graph; the rest, in order."""
    concrete = function.get_concrete_function()
    captured = {
        tensor.name: np.asarray(value)
        for tensor, value in zip(concrete.graph.internal_captures, concrete.captured_inputs)
        if not hasattr(value, "handle")  # a variable's handle: weights are streamed, not captured
    }
    constants = [name for name in inputs if name in captured]
    if not constants:
        return inputs
    kept = [value for value in proto.graph.input if value.name not in constants]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(captured[name], name) for name in constants)
    return [name for name in inputs if name not in constants]


def _nbytes(variable) -> int:
    return int(np.prod(variable.shape, dtype=np.int64)) * np.dtype(str(variable.dtype)).itemsize


def _write_initializer(handle, name: str, variable, onnx) -> None:
    """Append one ``graph.initializer`` record holding ``variable`` as little-endian raw data."""

    array = np.asarray(keras.ops.convert_to_numpy(variable))
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    header = onnx.TensorProto(
        name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape
    ).SerializeToString()
    raw = _field_header(_TENSOR_RAW_DATA_FIELD, array.nbytes)
    tensor_size = len(header) + len(raw) + array.nbytes
    initializer = _field_header(_GRAPH_INITIALIZER_FIELD, tensor_size)
    graph = _field_header(_MODEL_GRAPH_FIELD, len(initializer) + tensor_size)
    handle.write(graph + initializer + header + raw)
    handle.write(array.data)


def _field_header(field: int, size: int) -> bytes:
    """A length-delimited protobuf field's tag and length."""
    return _varint(field << 3 | 2) + _varint(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _rename(graph, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def _name_io(proto, layout: Layout, outputs) -> None:
    """Name the graph outputs ``outputs`` (`signature_outputs`) and give the free dimensions readable names."""
    graph = proto.graph
    if len(graph.output) != len(outputs):
        raise ExportError(f"Expected {len(outputs)} ONNX outputs ({', '.join(outputs)}), got {len(graph.output)}.")
    for value, name in zip(list(graph.output), outputs):
        _rename(graph, value.name, name)
    image = [value for value in graph.input if value.name == INPUT_NAME]
    axes = (0, *layout.spatial_axes)
    one = len(outputs) == 1
    named = [(image[0], ("batch", "height", "width"))]
    for value in graph.output:
        prefix = "map" if one else value.name
        named.append((value, ("batch", f"{prefix}_height", f"{prefix}_width")))
    for value, names in named:
        dims = value.type.tensor_type.shape.dim
        for axis, name in zip(axes, names, strict=True):
            if not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name
