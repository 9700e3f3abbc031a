"""Pictures of the network: filters, activations, label overlays; the `show` command."""

import os

import keras
import numpy as np
import pytest
from conftest import random_images
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.inference import pictures

L = keras.layers


def rgb_net():
    return keras.Sequential(
        [keras.Input((None, None, 3)), L.Conv2D(6, 3, name="conv1"), L.Conv2D(4, 3, name="conv2")], name="rgb_net"
    )


def test_first_layer_filters_are_rgb_tiles_of_the_kernels(tmp_path):
    model = rgb_net()
    kernel = np.zeros((3, 3, 3, 6), "float32")
    kernel[0, 0, 0, 0] = 1.0  # filter 0: one red tap in its top-left corner
    kernel[2, 2, 2, 5] = -1.0  # filter 5: the minimum, in blue, bottom-right
    model.get_layer("conv1").set_weights([kernel, np.zeros(6, "float32")])
    path = tmp_path / "filters.png"
    picture = kfs.filters_picture(model, "conv1", path, scale=2)
    assert Image.open(path).size == picture.size
    tiles = np.asarray(picture)
    # 6 tiles in a 3x2 grid of 6x6 pixels (3 taps x scale 2) with 1-pixel gaps.
    assert picture.size == (3 * 7 + 1, 2 * 7 + 1)
    first = tiles[1:7, 1:7]
    np.testing.assert_array_equal(first[0, 0], [255, 128, 128])  # red at 1, the rest at 0 (-1..1 -> 0..255)
    np.testing.assert_array_equal(first[5, 5], [128, 128, 128])
    sixth = tiles[8:14, 15:21]
    np.testing.assert_array_equal(sixth[5, 5], [128, 128, 0])


def test_deeper_filters_are_one_grey_tile_per_input_channel():
    picture = kfs.filters_picture(rgb_net(), "conv2", scale=1)
    assert picture.mode == "L"
    # 4 filters x 6 input channels, one row per filter: 6 columns of 3x3 taps.
    assert picture.size == (6 * 4 + 1, 4 * 4 + 1)


def test_activations_are_the_feature_maps_of_the_layer():
    model = rgb_net()
    image = random_images((11, 13, 3))
    picture = kfs.activations_picture(model, image, "conv1")
    maps = keras.Model(model.inputs[0], model.get_layer("conv1").output)(image[None]).numpy()[0]
    tiles = np.asarray(picture)
    assert picture.size == (3 * (11 + 1) + 1, 2 * (9 + 1) + 1)
    low, high = maps.min(), maps.max()
    expected = np.round((maps[..., 4] - low) / (high - low) * 255)
    np.testing.assert_array_equal(tiles[1 + 10 : 1 + 10 + 9, 1 + 12 : 1 + 12 + 11], expected)


def test_bad_layers_are_named_with_the_choices():
    with pytest.raises(kfs.ConversionError, match="no layer 'conv9'.*conv1, conv2"):
        kfs.filters_picture(rgb_net(), "conv9")
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.Flatten(name="flat"), L.Dense(3, name="d")])
    with pytest.raises(kfs.ConversionError, match="not a feature map"):
        kfs.activations_picture(model, np.zeros((8, 8, 1)), "flat")
    with pytest.raises(kfs.ConversionError, match="no 2-D convolution kernel"):
        kfs.filters_picture(model, "d")


def test_label_overlay_colours_each_label_and_lists_it():
    labels = np.zeros((6, 8), int)
    labels[:, 4:] = 3
    picture = pictures.label_overlay(np.zeros((6, 8)), labels, class_names=["bg", "a", "b", "cat"], alpha=1.0)
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels[0, 5], pictures.class_color(3))
    np.testing.assert_array_equal(pixels[0, 0], pictures.class_color(0))
    assert picture.width == 8 + pictures.LEGEND_WIDTH


def _saved(model, tmp_path):
    path = os.fspath(tmp_path / "model.keras")
    model.save(path)
    return path


def test_show_command_writes_filters_and_activations(tmp_path, capsys):
    model_path = _saved(rgb_net(), tmp_path)
    image_path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "filters.png"
    assert cli.main(["show", "filters", model_path, "--layer", "conv1", "-o", os.fspath(out)]) == 0
    assert out.exists()
    assert cli.main(["show", "filters", model_path, "-o", os.fspath(out)]) == 2  # exists, no --overwrite
    acts = tmp_path / "acts.png"
    arguments = ["show", "activations", model_path, os.fspath(image_path), "--layer", "conv2", "-o", os.fspath(acts)]
    assert cli.main(arguments) == 0
    assert Image.open(acts).size == (2 * (6 + 1) + 1, 2 * (8 + 1) + 1)  # 4 maps of 8x6 from a 12x10 image
    assert cli.main(["show", "activations", model_path, "-o", os.fspath(tmp_path / "x.png")]) == 2
    assert "needs an IMAGE" in capsys.readouterr().err


def test_a_classifiers_activations_on_a_photo_of_another_size():
    keras.utils.set_random_seed(3)
    classifier = keras.Sequential(
        [keras.Input((12, 12, 3)), L.Conv2D(5, 3, activation="relu", name="conv"), L.Flatten(), L.Dense(2)],
        name="small_classifier",
    )
    photo = random_images((20, 17, 3))  # not the classifier's 12 x 12 (issue 28: it used to be refused)
    picture = kfs.activations_picture(classifier, photo, "conv")
    conv = classifier.get_layer("conv")
    maps = np.maximum(keras.ops.convert_to_numpy(keras.ops.conv(photo[None], conv.kernel))[0] + conv.bias.numpy(), 0)
    assert maps.shape == (18, 15, 5)
    assert picture.size == (3 * (15 + 1) + 1, 2 * (18 + 1) + 1)
    tiles = np.asarray(picture)
    low, high = maps.min(), maps.max()
    expected = np.round((maps[..., 0] - low) / (high - low) * 255)
    np.testing.assert_allclose(tiles[1 : 1 + 18, 1 : 1 + 15], expected, atol=1)


def test_show_says_when_it_draws_only_the_first_filters(tmp_path, capsys):
    model_path = _saved(rgb_net(), tmp_path)  # conv2: 4 filters of 6 input channels, 24 tiles
    out = os.fspath(tmp_path / "filters.png")
    argv = ["show", "filters", model_path, "--layer", "conv2", "-o", out, "--max-tiles", "12", "--scale", "1"]
    assert cli.main(argv) == 0
    assert "the first 2 of 4 filters (--max-tiles shows more)" in capsys.readouterr().out  # issue 28: silent
    assert Image.open(out).size == (6 * 4 + 1, 2 * 4 + 1)  # two whole filters, one row each
    assert cli.main(["show", "filters", model_path, "--layer", "conv2", "-o", out, "--overwrite"]) == 0
    assert "of 4 filters" not in capsys.readouterr().out
