"""What the SavedModel and ONNX exports share: the model to export and the check against Keras."""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import numpy as np

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.surgery.verify import VerificationResult, compare_arrays, tolerance_for


class ExportError(ConversionError):
    """An export that could not be built, or that does not reproduce the Keras model."""


@dataclass(frozen=True)


class ExportResult:
    """What an export wrote and how it was checked.

    Attributes:
        path: the version folder (SavedModel) or the ``.onnx`` file.
        version: the SavedModel version, or None for ONNX.
        checks: one `VerificationResult` per checked input size, comparing the
            reloaded export with the Keras model.
    """

    path: str
    version: int | None
    checks: tuple[VerificationResult, ...]

    def __str__(self) -> str:
        lines = [f"wrote {self.path}" + (f" (version {self.version})" if self.version is not None else "")]
        lines += [f"  {check}" for check in self.checks]
        return "\n".join(lines)


def is_fully_convolutional(model) -> bool:
    """True for a one-input, one-output model on images of any size that returns a rank-4 map."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return False
    shape, output = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    return len(shape) == 4 and len(output) == 4 and all(d is None for d in _spatial(model, shape))


def prepare_fcn(model, *, convert: bool = True, head: str = "window", input_size=None, custom_objects=None):
    """The FCN to export and the classifier's original ``(H, W)`` (None when unknown).

    Raises:
        ExportError: for a model with several inputs or outputs, or a
            classifier with ``convert=False``.
    """
    from keras_fcn_surgery.saving.loading import load_model
    from keras_fcn_surgery.surgery.convert import convert as convert_model

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, custom_objects=custom_objects)
    if not isinstance(model, keras.Model):
        raise ExportError(
            f"Expected a `keras.Model` or a path to a `.keras`/`.h5` file. Received: {type(model).__name__}"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"Model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a serving "
            "export takes one image input and returns one score map."
        )
    size = tuple(int(d) for d in input_size) if input_size is not None else None
    if is_fully_convolutional(model):
        return model, size
    if not convert:
        raise ExportError(
            f"Model '{model.name}' takes input {tuple(model.inputs[0].shape)} and returns "
            f"{tuple(model.outputs[0].shape)}: it is not fully convolutional. Let it be converted first "
            "(drop convert=False / --no-convert)."
        )
    if size is None:
        spatial = _spatial(model, tuple(model.inputs[0].shape))
        size = tuple(int(d) for d in spatial) if all(d is not None for d in spatial) else None
    fcn = convert_model(model, head=head, input_size=input_size)
    return fcn, size


def image_channels(model) -> int:
    """The channel count of the model's image input."""
    shape = tuple(model.inputs[0].shape)
    channels = model_layout(model).channels(shape)
    if channels is None:
        raise ExportError(f"Model '{model.name}' takes input {shape} with an unknown number of channels.")
    return int(channels)


def resolve_check_sizes(fcn, original, check_sizes=None) -> tuple[tuple[int, int], ...]:
    """The ``(H, W)`` sizes an export is checked at.

    Default: the original size (or the smallest valid one of an FCN whose
    original size is unknown) and that size plus seven output strides, where
    the map has seven more cells a side (CaffeNet: 227 and 451, a 1x1 and an
    8x8 map).
    """
    if check_sizes is not None:
        pairs = [tuple(int(d) for d in size) for size in check_sizes]
        if not pairs or any(len(size) != 2 or min(size) < 1 for size in pairs):
            raise ExportError(f"Expected `check_sizes` to be (H, W) pairs of positive ints. Received: {check_sizes}")
        return tuple((size[0], size[1]) for size in pairs)
    from keras_fcn_surgery.grid.geometry import geometry

    try:
        grid = geometry(fcn, original)
    except ConversionError as error:
        if original is None:
            raise ExportError(
                f"The input size to check model '{fcn.name}' at is unknown ({error}). Pass "
                "`input_size=(H, W)` (CLI: --input-size) or `check_sizes`."
            ) from error
        return (original, (2 * original[0], 2 * original[1]))
    base = grid.input_size
    larger = (base[0] + 7 * grid.stride[0], base[1] + 7 * grid.stride[1])
    return (base, larger)


def keras_scores(fcn, images: np.ndarray) -> np.ndarray:
    """The Keras model's map for a channels-last batch, channels-last, as float32 numpy."""
    layout = model_layout(fcn)
    x = layout.from_channels_last(images)
    y = np.asarray(keras.ops.convert_to_numpy(fcn(x.astype(str(fcn.inputs[0].dtype)), training=False)))
    y = layout.to_channels_last(y)
    return y.astype(np.float32)


def check_batches(fcn, sizes, *, batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random channels-last float32 batches, one per size, keyed ``"size0"``, ``"size1"``..."""
    rng = np.random.default_rng(seed)
    channels = image_channels(fcn)
    return {
        f"size{i}": rng.standard_normal((batch_size, h, w, channels)).astype(np.float32)
        for i, (h, w) in enumerate(sizes)
    }


def compare_outputs(fcn, batches: dict, outputs: dict, *, what: str) -> tuple[VerificationResult, ...]:
    """Compare an export's outputs with the Keras model's on the same batches.

    Raises:
        ExportError: when a shape differs or a difference exceeds the tolerance.
    """
    tolerance = tolerance_for(fcn)
    results = []
    for key, images in batches.items():
        want = keras_scores(fcn, images).astype(np.float64)
        got = np.asarray(outputs[key], dtype=np.float64)
        if got.shape != want.shape:
            raise ExportError(
                f"{what} returns shape {got.shape} for input {images.shape}, the Keras model {want.shape}. "
                "The export is broken; please report the model."
            )
        result = compare_arrays([(want, got)], tolerance=tolerance, input_shape=tuple(images.shape))
        if not result.passed:
            raise ExportError(f"{what} differs from the Keras model: {result}. The export was not kept.")
        results.append(result)
    return tuple(results)


def _spatial(model, shape):
    return model_layout(model).spatial_shape(shape)
