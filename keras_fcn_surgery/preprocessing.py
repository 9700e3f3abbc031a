"""Image preprocessing in the TensorFlow graph, as `keras.applications` defines it.

``caffe``: RGB to BGR, minus the ImageNet mean; ``tf``: scaled to [-1, 1];
``torch``: scaled to [0, 1], then ImageNet mean and standard deviation;
``unit``: scaled to [0, 1] (pixels / 255, the common Keras recipe);
``none``: only cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_fcn_surgery.errors import InputError
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.options import PREPROCESS_MODES

__all__ = ["CONVENTIONS", "PREPROCESS_MODES", "decode_images", "pixel_function", "preprocess_images"]

# keras.applications.imagenet_utils conventions.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Convention:
    """One preprocessing: channels reversed (RGB to BGR) or not, then ``(x / divisor - mean) / std``."""

    reverse_channels: bool
    divisor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


# The one table both the NumPy (`pixel_function`) and the TensorFlow (`preprocess_images`) paths apply.
CONVENTIONS = {
    "none": Convention(False, 1.0, (0.0,), (1.0,)),
    "caffe": Convention(True, 1.0, CAFFE_MEAN_BGR, (1.0,)),
    "tf": Convention(False, 127.5, (1.0,), (1.0,)),
    "torch": Convention(False, 255.0, TORCH_MEAN, TORCH_STD),
    "unit": Convention(False, 255.0, (0.0,), (1.0,)),
}


def pixel_function(mode, data_format: str = "channels_last"):
    """The per-tile NumPy preprocessing of `predict_map` (``preprocess=``) for one mode.

    Args:
        mode: one of `PREPROCESS_MODES` (``"none"`` or None give None), or a
            function, returned as it is.
        data_format: the layout of the tiles the model takes.

    Returns:
        None, or a function from a float32 array of pixels in [0, 255] to the
        model's input values (`keras.applications`' ``preprocess_input``).
    """
    if mode is None or mode == "none":
        return None
    if callable(mode):
        return mode
    if mode not in PREPROCESS_MODES:
        raise InputError(f"Expected `preprocess` to be one of {PREPROCESS_MODES}. Received: {mode!r}")
    convention = CONVENTIONS[mode]
    axis = -1 if Layout(data_format).channels_last else -3  # (H, W, C) / (C, H, W), batched or not

    def preprocess(pixels):
        x = np.asarray(pixels, dtype=np.float32)
        if convention.reverse_channels:
            x = np.flip(x, axis=axis)
        shape = [1] * x.ndim
        shape[axis] = -1
        mean = np.asarray(convention.mean, np.float32).reshape(shape)
        std = np.asarray(convention.std, np.float32).reshape(shape)
        return (x / np.float32(convention.divisor) - mean) / std

    return preprocess


def preprocess_images(images, mode: str):
    """Apply one `keras.applications` preprocessing to a channels-last batch (a TF op).

    Args:
        images: a ``(N, H, W, C)`` tensor of pixel values in [0, 255] (any
            numeric dtype), RGB order for ``"caffe"`` and ``"torch"``.
        mode: one of `PREPROCESS_MODES`.

    Returns:
        A float32 tensor of the same shape.
    """
    import tensorflow as tf

    if mode not in CONVENTIONS:
        raise InputError(f"Expected `mode` to be one of {PREPROCESS_MODES}. Received: mode={mode!r}")
    convention = CONVENTIONS[mode]
    x = tf.cast(images, tf.float32)
    if mode == "none":
        return x
    if convention.reverse_channels:
        x = x[..., ::-1]
    mean, std = tf.constant(convention.mean, tf.float32), tf.constant(convention.std, tf.float32)
    return (x / convention.divisor - mean) / std


def decode_images(image_bytes, channels: int):
    """Decode a non-empty batch of encoded images of one size into ``(N, H, W, channels)`` uint8 (a TF op).

    Raises (when run):
        tf.errors.InvalidArgumentError: for an empty batch, undecodable bytes,
            or images of different sizes.
    """
    import tensorflow as tf

    def decode(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False, dtype=tf.uint8)
        return tf.ensure_shape(image, [None, None, channels])

    not_empty = tf.debugging.assert_positive(tf.size(image_bytes), message="serving_bytes needs at least one image")
    with tf.control_dependencies([not_empty]):
        image_bytes = tf.identity(image_bytes)
    first = decode(image_bytes[0])
    reference = tf.shape(first)

    def decode_same_size(data):
        image = decode(data)
        check = tf.debugging.assert_equal(
            tf.shape(image),
            reference,
            message="serving_bytes: all images of one request must have the same height and width",
        )
        with tf.control_dependencies([check]):
            return tf.identity(image)

    def decode_all():
        rest = tf.map_fn(
            decode_same_size, image_bytes[1:], fn_output_signature=tf.TensorSpec([None, None, channels], tf.uint8)
        )
        return tf.concat([first[tf.newaxis], rest], axis=0)

    # map_fn cannot stack an empty list of unknown-size images: a one-image batch takes the short branch.
    return tf.cond(tf.size(image_bytes) > 1, decode_all, lambda: first[tf.newaxis])
