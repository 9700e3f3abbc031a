"""Reading one picture file as the pixels a model takes (Pillow), with errors that name the file."""

from __future__ import annotations

import os

import numpy as np

from keras_fcn_surgery.errors import InputError, ModelFileError, first_line

# Pillow modes for the channel counts image files give.
PILLOW_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read_image(path, channels: int, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of an image file as float32 ``(H, W, channels)`` in 0..255, channels-last.

    Args:
        path: a PNG, JPEG or other file Pillow reads.
        channels: 1 (grey), 3 (RGB) or 4 (RGBA); the file is converted to it.
        size: ``(H, W)`` to resize to (bilinear), or None to keep its size.

    Raises:
        InputError: for a channel count image files do not give.
        ModelFileError: for a file Pillow cannot read, naming it.
    """
    from PIL import Image, UnidentifiedImageError

    mode = PILLOW_MODES.get(int(channels))
    if mode is None:
        raise InputError(f"Image files give 1, 3 or 4 channels; the model takes {channels}.")
    path = os.fspath(path)
    try:
        with Image.open(path) as opened:
            picture = opened.convert(mode)
            if size is not None:
                picture = picture.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
            pixels = np.asarray(picture, dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ModelFileError(f"Image '{path}' could not be read by Pillow: {first_line(str(error))}") from error
    return pixels.reshape(pixels.shape[0], pixels.shape[1], int(channels))
