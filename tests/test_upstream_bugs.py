"""Upstream bugs the converter's users can meet, pinned so that a fixed release shows up."""

import keras
import numpy as np
import pytest
from keras_bugs import channels_first_bias_fixed


def _conv_and_reference(width, filters=4):
    x = np.random.default_rng(0).standard_normal((1, 3, 2, width)).astype("float32")
    conv = keras.layers.Conv2D(filters, 1, data_format="channels_first", bias_initializer="random_normal")
    conv.build(x.shape)
    kernel, bias = np.asarray(conv.kernel)[0, 0], np.asarray(conv.bias)
    return conv, x, np.einsum("nchw,ck->nkhw", x, kernel) + bias[None, :, None, None]


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15.1 TF backend: ops.add picks NHWC bias_add when the width equals the channels",
)
def test_channels_first_conv_bias_when_width_equals_filters():
    conv, x, expected = _conv_and_reference(width=4, filters=4)
    np.testing.assert_allclose(np.asarray(conv(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [3, 4, 5])
def test_channels_first_conv_bias_with_the_work_around(width):
    conv, x, expected = _conv_and_reference(width=width, filters=4)
    with channels_first_bias_fixed():
        np.testing.assert_allclose(np.asarray(conv(x)), expected, rtol=1e-5, atol=1e-5)


def _onednn_width_stride_bug_shows() -> bool:
    """Whether this machine's TensorFlow gets the strided one-channel convolution below wrong.

    The bug is in oneDNN's kernel for some processors: seen on AVX-512 Xeons with oneDNN on (as the tests
    run it, see conftest.py), not on AVX2-only CPUs nor with ``TF_ENABLE_ONEDNN_OPTS=0``. Probed once, at
    collection, with the raw op (not the Keras layer the test uses).
    """
    import tensorflow as tf

    x = np.random.default_rng(1).standard_normal((3, 2, 3, 1)).astype("float32")
    kernel = np.ones((1, 2, 1, 1), "float32")
    batch = tf.nn.conv2d(x, kernel, (1, 2), "VALID").numpy()
    one_by_one = np.concatenate([tf.nn.conv2d(x[i : i + 1], kernel, (1, 2), "VALID").numpy() for i in range(3)])
    return not np.allclose(batch, one_by_one, rtol=1e-5, atol=1e-6)


ONEDNN_WIDTH_STRIDE_BUG = _onednn_width_stride_bug_shows()


# Strict where the probe sees the bug (a fixed TensorFlow then fails here, loudly); elsewhere the test must pass.
@pytest.mark.xfail(
    condition=ONEDNN_WIDTH_STRIDE_BUG,
    strict=True,
    reason="TensorFlow 2.21 oneDNN Conv2D on this CPU: one input channel, width stride only, batch > 1",
)
def test_one_channel_conv_with_a_width_stride_on_a_batch():
    # Output width 1, height 2: with oneDNN on, on the CPUs where the probe above sees it,
    # the second row of the batch's later images comes out as garbage
    # (e.g. -6.7e36). The fuzz generator avoids the pattern.
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 1)).astype("float32")
    conv = keras.layers.Conv2D(1, (1, 2), strides=(1, 2), use_bias=False)
    batch = np.asarray(conv(x))
    one_by_one = np.concatenate([np.asarray(conv(x[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, atol=1e-6)
