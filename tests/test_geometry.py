"""`kfs.geometry` against real output shapes and real dependencies."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.zoo import caffenet


def _linear_same_padding_fcn(data_format="channels_last"):
    """Strided 'same' convolutions, a dilated conv, explicit padding and a residual branch; no ReLU."""
    shape = (None, None, 2) if data_format == "channels_last" else (2, None, None)
    inputs = keras.Input(shape)
    kw = {"data_format": data_format}
    x = layers.Conv2D(3, 3, strides=2, padding="same", **kw)(inputs)
    x = layers.ZeroPadding2D(((1, 0), (2, 1)), **kw)(x)
    branch = layers.Conv2D(3, 3, dilation_rate=2, padding="same", **kw)(x)
    x = layers.Add()([x, branch])
    x = layers.AveragePooling2D(2, strides=2, padding="same", **kw)(x)
    x = layers.Conv2D(2, 4, strides=3, padding="same", **kw)(x)
    x = layers.Cropping2D(((1, 0), (0, 1)), **kw)(x)
    return keras.Model(inputs, layers.Conv2D(2, 2, **kw)(x))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_output_size_matches_real_shapes_over_many_sizes(data_format):
    fcn = _linear_same_padding_fcn(data_format)
    grid = kfs.geometry(fcn)
    for height in range(grid.min_input_size[0], 60, 5):
        for width in range(grid.min_input_size[1], 60, 7):
            shape = (1, height, width, 2) if data_format == "channels_last" else (1, 2, height, width)
            out = fcn(np.zeros(shape, "float32")).shape
            spatial = tuple(out[1:3]) if data_format == "channels_last" else tuple(out[2:4])
            assert spatial == grid.output_size((height, width)), (height, width)


def test_min_input_size_is_tight():
    grid = kfs.geometry(kfs.convert(small_flatten_cnn(), verify=False))
    height, width = grid.min_input_size
    assert grid.output_size((height, width)) == (1, 1)
    with pytest.raises(kfs.ConversionError, match="smaller than the network's minimum"):
        grid.output_size((height - 1, width))


@pytest.mark.parametrize("size", [(23, 31), (24, 24), (30, 19)])
def test_input_box_is_exactly_what_a_cell_depends_on(size):
    fcn = _linear_same_padding_fcn()
    grid = kfs.geometry(fcn, size)
    height, width = size
    image = random_images((1, height, width, 2))
    base = np.asarray(fcn(image))[0]
    rows, cols = base.shape[:2]
    # One probe image per pixel, that pixel nudged: which cells move?
    probes = np.repeat(image, height * width, axis=0)
    probes[np.arange(height * width), np.repeat(np.arange(height), width), np.tile(np.arange(width), height)] += 1.0
    moved = np.abs(np.asarray(fcn(probes)) - base).max(axis=-1) > 1e-6
    for i, j in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 2)]:
        top, left, bottom, right = grid.input_box(i, j, size)
        ys, xs = np.nonzero(moved[:, i, j].reshape(height, width))
        assert ys.min() >= top and ys.max() < bottom and xs.min() >= left and xs.max() < right
        # The box is tight where it lies inside the image.
        if top >= 0:
            assert ys.min() == top
        if left >= 0:
            assert xs.min() == left
        if bottom <= height:
            assert ys.max() == bottom - 1
        if right <= width:
            assert xs.max() == right - 1


def test_caffenet_geometry():
    grid = kfs.geometry(caffenet())
    assert grid.stride == (32, 32)
    assert grid.input_size == (227, 227)
    assert grid.output_size((451, 451)) == (8, 8)
    assert grid.min_input_size == (227, 227)
    assert not grid.global_context


def test_geometry_of_the_classifier_and_of_its_fcn_agree():
    source = small_flatten_cnn()
    direct = kfs.geometry(source)
    converted = kfs.geometry(kfs.convert(source, verify=False), (32, 32))
    assert direct.height == converted.height and direct.width == converted.width


def test_at_recomputes_offsets_for_another_size():
    grid = kfs.geometry(_linear_same_padding_fcn(), (24, 24))
    other = grid.at((25, 24))
    assert other.input_size == (25, 24)
    assert other.output_size((25, 24)) == grid.output_size((25, 24))


def test_upsampling_is_not_exact_and_named():
    # Issue 9: geometry no longer refuses a layer without a known window; it gives exact output
    # sizes (asked of the layer) and refuses, naming the layer, every number it cannot derive.
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, layers.UpSampling2D(name="up")(inputs))
    grid = kfs.geometry(model)
    assert not grid.exact and "'up' (UpSampling2D)" in grid.unknown[0]
    assert grid.output_size((5, 7)) == (10, 14)
    for numbers in (lambda: grid.receptive_field, lambda: grid.offset, lambda: grid.input_box(0, 0)):
        with pytest.raises(kfs.ConversionError, match="'up' \\(UpSampling2D\\)"):
            numbers()
    with pytest.raises(kfs.ConversionError, match="'up' \\(UpSampling2D\\)"):
        grid.exact_cells((8, 8), at_image_start=(False, False), at_image_end=(False, False))


def _crop_then_pad_fcn():
    """A crop that empties a small input, then padding that would make it look non-empty again."""
    inputs = keras.Input((None, None, 2))
    x = layers.Cropping2D(((2, 2), (0, 0)), name="crop")(inputs)
    x = layers.Conv2D(2, 3, strides=2, padding="same", name="conv")(x)
    x = layers.ZeroPadding2D(((0, 2), (0, 2)), name="pad")(x)
    return keras.Model(inputs, layers.Conv2D(2, 1, strides=2, name="head")(x))


def test_an_empty_map_on_the_way_makes_the_input_too_small():
    # Found by the fuzz tests: at height 1 the crop leaves -3 rows, which the
    # padding used to turn into a "valid" map of 1 row; Keras refuses the crop.
    grid = kfs.geometry(_crop_then_pad_fcn())
    assert grid.min_input_size == (5, 1)
    with pytest.raises(kfs.ConversionError, match="height of 4 is smaller than the network's minimum of 5"):
        grid.output_size((4, 9))
    out = _crop_then_pad_fcn()(np.zeros((1, 5, 1, 2), "float32"))
    assert tuple(out.shape[1:3]) == grid.output_size((5, 1))


def _valid_strided_residual(size=10):
    inputs = keras.Input((size, size, 3))
    main = layers.Conv2D(4, 2, strides=2, name="main")(inputs)
    shortcut = layers.Conv2D(4, 1, strides=2, name="shortcut")(inputs)
    x = layers.Add(name="add")([main, shortcut])
    return keras.Model(inputs, layers.Dense(2, name="fc")(layers.GlobalAveragePooling2D(name="gap")(x)))


def test_branches_that_line_up_only_at_some_sizes():
    # Found by the fuzz tests: a merge of maps that do not line up at some input
    # size raised a bare ValueError from `min_input_size` and `output_size`.
    fcn = kfs.convert(_valid_strided_residual())
    grid = kfs.geometry(fcn)
    assert grid.min_input_size == (10, 10)
    assert grid.output_size((12, 14)) == (2, 3)
    message = "height of 11 does not fit.*'add' \\(Add\\).*sizes \\[5, 6\\].*is 12"
    with pytest.raises(kfs.ConversionError, match=message):
        grid.output_size((11, 12))
    assert tuple(fcn(np.zeros((1, 12, 14, 3), "float32")).shape) == (1, 2, 3, 2)
