"""Exporting a converted model as a TensorFlow Serving SavedModel, checked in a fresh process.

The layout is TF Serving's: ``<export_dir>/<version>/saved_model.pb`` plus
``variables/``. Up to three signatures, all with output ``scores``, float32
``[-1, -1, -1, K]`` (a model with several outputs: one output per map, each
named by its output's name, such as ``prob`` and ``box``; `signature_outputs`):

- ``serving_default``: input ``images``, float32 ``[-1, -1, -1, C]`` (height
  and width free), the model-ready tensor the Keras model itself takes:
  nothing is applied.
- ``serving_pixels`` (only with a ``preprocess`` other than ``"none"``):
  input ``pixels``, float32 ``[-1, -1, -1, C]`` holding raw RGB values in
  0..255 (uint8 values sent as JSON numbers work), preprocessed in the graph.
- ``serving_bytes``: input ``image_bytes``, a batch of encoded JPEG/PNG/GIF/BMP
  strings (tf.string ``[-1]``, what TF Serving's REST ``{"b64": ...}`` values
  become), decoded in the graph and preprocessed with one of the
  `keras.applications` conventions. All images of one request must have the
  same height and width.

TFLite: ``tf.lite.TFLiteConverter.from_saved_model(dir)`` converts every
signature and fails on ``serving_bytes`` (image decoding is no TFLite
operation); ``from_saved_model(dir, signature_keys=["serving_default"])``
(or ``"serving_pixels"``) converts; `export_tflite` writes a checked file.

All take channels-last images and return channels-last maps, also for a
channels-first model (the signature transposes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError, ExportError, ModelFileError, first_line
from keras_fcn_surgery.exporting.pipeline import Destination, ExportFormat, check_choice, image_channels
from keras_fcn_surgery.graph import model_layout, output_names
from keras_fcn_surgery.preprocessing import PREPROCESS_MODES, decode_images, preprocess_images
from keras_fcn_surgery.saving.atomic import atomic_folder, refuse_foreign_files

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
SERVING_PIXELS = "serving_pixels"
INPUT_NAME = "images"
BYTES_INPUT_NAME = "image_bytes"
PIXELS_INPUT_NAME = "pixels"
OUTPUT_NAME = "scores"

# Channel counts tf.io.decode_image can produce.
DECODABLE_CHANNELS = (1, 3, 4)

# What a SavedModel version folder written here holds; `--overwrite` replaces no folder holding anything else
# (TF Serving's assets.extra, a user's notes).
SAVEDMODEL_NAMES = ("saved_model.pb", "fingerprint.pb", "variables", "assets")
_OUTPUT_WHAT = "SavedModel version"
_VERSION_NAME = re.compile(r"^[0-9]+$")


_CHECK_SCRIPT = """
import numpy as np
import tensorflow as tf

inputs = np.load(sys.argv[1])
for path, outputs_file in zip(sys.argv[2::2], sys.argv[3::2]):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    outputs = {}
    for key in inputs.files:
        for name, value in serve(images=tf.constant(inputs[key])).items():
            outputs[key + "/" + name] = value.numpy()
    np.savez(outputs_file, **outputs)
"""


@dataclass(frozen=True)
class SavedModelFormat(ExportFormat):
    """TF Serving's SavedModel: the output path is the model's base folder, the export one version folder in it.

    Attributes:
        version: the version folder; None: one more than the highest there.
        preprocess: what ``serving_pixels`` and ``serving_bytes`` apply (one
            of `PREPROCESS_MODES`).
        bytes_signature: add ``serving_bytes``.
    """

    version: int | None = None
    preprocess: str = "none"
    bytes_signature: bool = True

    name: ClassVar[str] = "savedmodel"
    what: ClassVar[str] = "The reloaded SavedModel of '{name}'"
    check_script: ClassVar[str] = _CHECK_SCRIPT

    def __post_init__(self) -> None:
        check_choice("preprocess", self.preprocess, PREPROCESS_MODES)
        if self.version is not None:
            object.__setattr__(self, "version", _check_version(self.version))

    def accept(self, fcn) -> None:
        channels = image_channels(fcn)
        _check_preprocess_channels(fcn, channels, self.preprocess)
        if self.bytes_signature:
            _check_bytes_signature(fcn, channels)

    def output(self, path, *, overwrite: bool) -> str:
        path = os.fspath(path)
        if self.version is not None and overwrite:  # before any work; `destination` checks again
            refuse_foreign_files(os.path.join(path, str(self.version)), SAVEDMODEL_NAMES, what=_OUTPUT_WHAT)
        return path

    @contextlib.contextmanager
    def destination(self, path: str, *, overwrite: bool) -> Iterator[Destination]:
        export_dir, created = _prepare_export_dir(path)
        version = next_version(export_dir) if self.version is None else self.version
        final = os.path.join(export_dir, str(version))
        try:
            staging = atomic_folder(
                final, overwrite=overwrite, what="export folder", own_names=SAVEDMODEL_NAMES, output_what=_OUTPUT_WHAT
            )
            yield Destination(staging, final, version)
        except BaseException:
            if created:
                _remove_if_empty(export_dir)
            raise

    def write(self, fcn, path: str) -> None:
        _write_savedmodel(fcn, path, self.preprocess, self.bytes_signature)

    def twin(self) -> SavedModelFormat:
        return dataclasses.replace(self, preprocess="none", bytes_signature=False)  # the check runs serving_default


def next_version(export_dir) -> int:
    """One more than the highest numeric folder in ``export_dir`` (1 when there is none)."""
    export_dir = os.fspath(export_dir)
    if not os.path.isdir(export_dir):
        return 1
    versions = [
        int(name)
        for name in os.listdir(export_dir)
        if _VERSION_NAME.match(name) and os.path.isdir(os.path.join(export_dir, name))
    ]
    return max(versions, default=0) + 1


def signature_outputs(fcn) -> tuple[str, ...]:
    """The names of an export's outputs, in the model's order: ``("scores",)`` for a model of one output,
    else each output's own name (`graph.output_names`)."""
    names = output_names(fcn)
    return (OUTPUT_NAME,) if len(names) == 1 else names


def serving_functions(fcn, preprocess: str | None = "none", *, bytes_signature=True, call=None) -> dict:
    """The signature functions, keyed by signature name, with their input signatures.

    Args:
        fcn: the fully convolutional model.
        preprocess: the preprocessing ``serving_pixels`` and ``serving_bytes``
            apply (one of `PREPROCESS_MODES`); None: ``serving_default`` only;
            ``"none"``: no ``serving_pixels`` (it would equal ``serving_default``).
        bytes_signature: add ``serving_bytes`` (when ``preprocess`` is set).
        call: what computes the model (default: ``fcn`` itself).

    Returns:
        ``{name: (function, [tf.TensorSpec])}``; each function returns a dict
        of maps by `signature_outputs` name.
    """
    import tensorflow as tf

    channels = image_channels(fcn)
    channels_first = model_layout(fcn).channels_first
    dtype = fcn.inputs[0].dtype
    call = fcn if call is None else call

    names = signature_outputs(fcn)

    def scores(images):
        x = tf.cast(images, dtype)
        if channels_first:
            x = tf.transpose(x, [0, 3, 1, 2])
        maps = {}
        for name, y in zip(names, keras.tree.flatten(call(x, training=False)), strict=True):
            if channels_first:
                y = tf.transpose(y, [0, 2, 3, 1])
            maps[name] = tf.cast(y, tf.float32)
        return maps

    def serve(images):
        return scores(images)

    def serve_pixels(pixels):
        return scores(preprocess_images(pixels, preprocess))

    def serve_bytes(image_bytes):
        return scores(preprocess_images(decode_images(image_bytes, channels), preprocess))

    images = tf.TensorSpec([None, None, None, channels], tf.float32, name=INPUT_NAME)
    functions = {SERVING_DEFAULT: (serve, [images])}
    if preprocess not in (None, "none"):
        pixels = tf.TensorSpec([None, None, None, channels], tf.float32, name=PIXELS_INPUT_NAME)
        functions[SERVING_PIXELS] = (serve_pixels, [pixels])
    if preprocess is not None and bytes_signature:
        functions[SERVING_BYTES] = (serve_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT_NAME)])
    return functions


def _check_bytes_signature(fcn, channels: int) -> None:
    if channels not in DECODABLE_CHANNELS:
        raise ExportError(
            f"Model '{fcn.name}' takes {channels}-channel images, which encoded JPEG/PNG cannot hold "
            f"(they decode to {DECODABLE_CHANNELS} channels). Pass bytes_signature=False to export "
            "serving_default and serving_pixels only."
        )


def _check_preprocess_channels(fcn, channels: int, preprocess: str) -> None:
    if preprocess in ("caffe", "torch") and channels != 3:
        raise ExportError(
            f"preprocess={preprocess!r} works on RGB images but model '{fcn.name}' takes {channels} channels. "
            "Use preprocess='none' or 'tf'."
        )


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer, str)):
        raise ExportError(f"Expected `version` to be a non-negative integer. Received: version={version!r}")
    if isinstance(version, str):
        if not _VERSION_NAME.match(version):
            raise ExportError(f"Expected `version` to be a non-negative integer. Received: version={version!r}")
        version = int(version)
    if version < 0:
        raise ExportError(f"Expected `version` to be a non-negative integer. Received: version={version!r}")
    return int(version)


def _prepare_export_dir(export_dir) -> tuple[str, bool]:
    """The absolute export folder, created when missing, and whether this call created it."""
    export_dir = os.path.abspath(os.fspath(export_dir))
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ModelFileError(f"Export folder '{export_dir}' is a file. Give a folder for the model's versions.")
    created = not os.path.exists(export_dir)
    try:
        os.makedirs(export_dir, exist_ok=True)
    except OSError as error:
        raise ModelFileError(f"Cannot create export folder '{export_dir}': {error.strerror or error}.") from error
    return export_dir, created


def _remove_if_empty(folder: str) -> None:
    # An interrupted or failed first export leaves no empty model folder behind.
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _write_savedmodel(fcn, path: str, preprocess: str, bytes_signature: bool) -> None:
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    # No `archive.track(fcn)`: the endpoints' variables are tracked anyway, and tracking the model too
    # stores every weight a second time (as Keras variables beside the TF ones), doubling the file.
    for name, (function, signature) in serving_functions(fcn, preprocess, bytes_signature=bytes_signature).items():
        try:
            archive.add_endpoint(name, function, input_signature=signature)
        except ConversionError:
            raise
        except Exception as error:
            raise ExportError(
                f"Tracing signature '{name}' of model '{fcn.name}' failed ({type(error).__name__}: "
                f"{first_line(str(error))}). A layer may not accept images of any size."
            ) from error
    try:
        archive.write_out(path, verbose=False)
    except (OSError, tf.errors.OpError) as error:
        raise ModelFileError(
            f"Could not write the SavedModel of '{fcn.name}' under '{os.path.dirname(path)}': "
            f"{first_line(str(error))}. Check the folder's permissions and free space."
        ) from error
