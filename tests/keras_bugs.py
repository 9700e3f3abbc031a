"""Work-arounds for Keras bugs that would otherwise hide the converter's own behaviour in tests.

Keras 3.15.1, TensorFlow backend: ``keras.ops.add(x, bias)`` takes a fast path
through ``tf.nn.bias_add`` when ``bias`` squeezes to a vector whose length
matches axis 1 or the last axis of ``x``, and picks ``NHWC`` whenever the
last axis matches, without looking at where the bias's own non-1 axis is. A
channels-first Conv2D reshapes its bias to ``(1, C, 1, 1)``, so on an output
map whose width equals its filter count the bias is added along the width:
the layer is wrong at that size when called eagerly (inside ``tf.function``
and ``predict`` it was right in our tests).
``tests/test_upstream_bugs.py`` shows it; it hits a channels-first FCN at
every input size that makes some convolution's output width equal its
filters, and the source classifier only where its own sizes do.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf
from keras.src.backend.tensorflow import numpy as tf_numpy


def _is_channels_first_bias(x1, x2) -> bool:
    shape = tuple(getattr(x2, "shape", ()))
    return len(shape) >= 3 and shape[0] == 1 and shape[1] != 1 and all(d == 1 for d in shape[2:])


@contextlib.contextmanager
def channels_first_bias_fixed():
    """Within the block, ``keras.ops.add`` of a ``(1, C, 1, 1)`` bias broadcasts as it should."""
    original = tf_numpy.add

    def add(x1, x2):
        if _is_channels_first_bias(x1, x2) and hasattr(x1, "dtype"):
            return tf.add(x1, tf.cast(x2, x1.dtype))
        return original(x1, x2)

    tf_numpy.add = add
    try:
        yield
    finally:
        tf_numpy.add = original
