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


@pytest.mark.xfail(reason="TensorFlow 2.21 oneDNN Conv2D: one input channel, width stride only, batch > 1")
def test_one_channel_conv_with_a_width_stride_on_a_batch():
    # Output width 1, height 2: with oneDNN on (TensorFlow's default on x86 CPUs)
    # the second row of the batch's later images comes out as garbage
    # (e.g. -6.7e36). The fuzz generator avoids the pattern.
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 1)).astype("float32")
    conv = keras.layers.Conv2D(1, (1, 2), strides=(1, 2), use_bias=False)
    batch = np.asarray(conv(x))
    one_by_one = np.concatenate([np.asarray(conv(x[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, atol=1e-6)
