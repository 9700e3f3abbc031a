"""One preprocessing table: the NumPy and the TensorFlow paths give `keras.applications`' values exactly."""

import numpy as np
import pytest
from keras.applications import imagenet_utils

import keras_fcn_surgery as kfs
from keras_fcn_surgery.preprocessing import CONVENTIONS, pixel_function, preprocess_images


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_numpy_and_graph_preprocessing_equal_keras_applications(mode, data_format):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 6, 3)).astype(np.float32)
    batch = pixels if data_format == "channels_last" else np.moveaxis(pixels, -1, 1)
    function = pixel_function(mode, data_format)
    expected = imagenet_utils.preprocess_input(batch.copy(), data_format=data_format, mode=mode)
    np.testing.assert_array_equal(function(batch), expected)
    one = imagenet_utils.preprocess_input(batch[0].copy(), data_format=data_format, mode=mode)
    np.testing.assert_array_equal(function(batch[0]), one)  # a tile: (H, W, C) or (C, H, W)
    graph = np.asarray(preprocess_images(pixels, mode))
    np.testing.assert_array_equal(graph, imagenet_utils.preprocess_input(pixels.copy(), mode=mode))


def test_none_passes_pixels_through_and_unknown_modes_are_refused():
    assert pixel_function(None) is None and pixel_function("none") is None
    assert set(CONVENTIONS) == {"none", "caffe", "tf", "torch", "unit"}
    with pytest.raises(kfs.InputError, match="preprocess"):
        pixel_function("imagenet")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_unit_mode_is_pixels_over_255_in_numpy_and_in_the_graph(data_format):
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 4, 5, 3)).astype(np.float32)
    batch = pixels if data_format == "channels_last" else np.moveaxis(pixels, -1, 1)
    np.testing.assert_array_equal(pixel_function("unit", data_format)(batch), batch / np.float32(255))
    np.testing.assert_array_equal(np.asarray(preprocess_images(pixels, "unit")), pixels / np.float32(255))
