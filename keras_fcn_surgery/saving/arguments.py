"""One rule for what the public API takes, whatever the function: a model as itself or as the path of its
file, an image as an array, a PIL image or the path of its file, and ``preprocess`` as a function or one of the
names the CLI takes (`options.PREPROCESS_MODES`)."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.graph import model_layout
from keras_fcn_surgery.options import PREPROCESS_MODES
from keras_fcn_surgery.preprocessing import pixel_function
from keras_fcn_surgery.saving.images import PILLOW_MODES, read_image
from keras_fcn_surgery.saving.loading import as_model


def public_arguments(model, image=None, preprocess=None, *, custom_objects=None):
    """``(model, image, preprocess)`` as the library's functions take them.

    Args:
        model: a `keras.Model`, returned as it is, or the path of a
            ``.keras``/``.h5`` file, loaded (`load_model`); None for a
            function without a model (``image`` is then read as RGB).
        image: an array (numpy, memory-mapped, zarr: returned as it is), a
            PIL image, or the path of an image file Pillow reads or of a
            ``.npy`` file (memory-mapped, never read whole). A picture comes
            as float32 pixels in 0..255 with the model's channels, in its
            layout; as every image, it then goes through ``preprocess``.
        preprocess: a function of the pixels, returned as it is; None or
            ``"none"``; or one of `PREPROCESS_MODES` (``"unit"``: pixels / 255,
            ``"caffe"``, ``"tf"``, ``"torch"``: `keras.applications`'
            conventions), made the function of the model's layout.
        custom_objects: passed to `keras.models.load_model` for a path.

    Raises:
        ModelFileError: for a model or image file that cannot be read.
        InputError: for a ``preprocess`` that is neither a function nor one
            of the names, or an image of a type the library does not take.
    """
    if isinstance(model, (str, os.PathLike)):
        model = as_model(model, custom_objects)
    layout = model_layout(model) if isinstance(model, keras.Model) else None
    if image is not None:
        image = _as_image(image, model, layout)
    if preprocess is not None and not callable(preprocess):
        if not isinstance(preprocess, str) or preprocess not in PREPROCESS_MODES:
            raise InputError(
                f"Expected `preprocess` to be a function or one of {PREPROCESS_MODES}. Received: {preprocess!r}"
            )
        preprocess = pixel_function(preprocess, layout.data_format if layout is not None else "channels_last")
    return model, image, preprocess


def _as_image(image, model, layout):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.lower().endswith(".npy"):
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise InputError(f"Image '{path}' could not be read as a .npy array: {error}") from error
        pixels = read_image(path, _channels(model, layout))
    elif isinstance(image, Image.Image):
        mode = PILLOW_MODES.get(_channels(model, layout))
        if mode is None:
            raise InputError(f"A PIL image gives 1, 3 or 4 channels; model '{model.name}' takes another count.")
        pixels = np.asarray(image.convert(mode), dtype=np.float32).reshape(image.height, image.width, -1)
    else:
        return image
    return pixels if layout is None else layout.image_from_channels_last(pixels)


def _channels(model, layout) -> int:
    if layout is None:
        return 3
    channels = layout.channels(tuple(model.inputs[0].shape))
    return int(channels) if channels is not None else 3
