"""`predict_map` (whole and tiled) and `sliding_window_predict`."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import STRIDES, random_images, strided_fcn, whole_map
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference.runner import plan_tiles

ATOL = 2e-5


def _residual_fcn():
    """ResNet-like: 7x7/2 'same' stem, 3x3/2 pooling, a residual block, a strided block with a 1x1 shortcut."""
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(6, 7, strides=2, padding="same", activation="relu")(inputs)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, strides=2)(x)
    y = layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = layers.Add()([x, layers.Conv2D(6, 3, padding="same")(y)])
    y = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Add()([layers.Conv2D(8, 1, strides=2)(x), layers.DepthwiseConv2D(3, padding="same")(y)])
    return keras.Model(inputs, layers.Conv2D(5, 1, activation="softmax")(x))


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("stride", sorted(STRIDES))
def test_tiled_equals_whole_image(padding, stride):
    model = strided_fcn(padding, STRIDES[stride])
    assert kfs.geometry(model).stride == (stride, stride)
    image = random_images((7 * stride + 61, 5 * stride + 47, 2), seed=stride)  # odd sides, not stride multiples
    whole = whole_map(model, image)
    np.testing.assert_allclose(kfs.predict_map(model, image), whole, atol=ATOL)
    # A multiple of the stride, one that is not (rounded up), and unequal sides.
    for tile in (2 * stride + 40, 3 * stride + 41, (stride + 45, 4 * stride + 43)):
        tiled = kfs.predict_map(model, image, tile=tile, batch_size=3)
        np.testing.assert_allclose(tiled, whole, atol=ATOL, err_msg=f"tile={tile}")
    rows, cols = plan_tiles(image.shape[:2], kfs.geometry(model), 2 * stride + 40)
    assert len(rows) > 1 and len(cols) > 1, "the test image must be cut into several tiles"


def test_tiled_equals_whole_image_for_a_residual_network_with_padding_and_pooling():
    model = _residual_fcn()
    image = random_images((203, 157, 3), seed=3)
    whole = whole_map(model, image)
    for tile in (64, 100, (72, 130)):
        np.testing.assert_allclose(kfs.predict_map(model, image, tile=tile), whole, atol=ATOL, err_msg=f"tile={tile}")


def test_tiled_equals_whole_image_channels_first():
    model = strided_fcn("same", [2, 2, 2], channels=3, data_format="channels_first")
    image = random_images((3, 131, 97), seed=5)
    whole = np.asarray(model(image[None]))[0]
    tiled = kfs.predict_map(model, image, tile=48)
    assert tiled.shape == whole.shape == (3, 17, 13)
    np.testing.assert_allclose(tiled, whole, atol=ATOL)


def test_tiled_caffenet_equals_whole_image():
    from keras_fcn_surgery.zoo import caffenet

    fcn = kfs.convert(caffenet(num_classes=10), verify=False)
    image = random_images((515, 483, 3), seed=7) * 50
    whole = kfs.predict_map(fcn, image)
    assert whole.shape == (*kfs.geometry(fcn).output_size((515, 483)), 10)
    np.testing.assert_allclose(kfs.predict_map(fcn, image, tile=384), whole, atol=1e-5)


def test_an_image_smaller_than_one_tile_is_one_pass():
    model = strided_fcn("same", [2, 2])
    image = random_images((37, 29, 2))
    rows, cols = plan_tiles(image.shape[:2], kfs.geometry(model), 256)
    assert len(rows) == len(cols) == 1
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=256), whole_map(model, image), atol=ATOL)


def test_tile_sides_are_rounded_up_to_the_stride_plus_the_image_remainder():
    model = strided_fcn("same", [2, 2, 2])
    grid = kfs.geometry(model)
    rows, cols = plan_tiles((203, 190), grid, (33, 40))  # 33 -> 40 (+ 203 % 8 = 3), 40 -> 40 (+ 190 % 8 = 6)
    for tiles, side, largest in ((rows, 203, 43), (cols, 190, 46)):
        lengths = {t.stop - t.start for t in tiles}
        assert len(lengths) == 1, "equal tiles (batched together)"
        (length,) = lengths
        assert length <= largest and (side - length) % 8 == 0
        assert all(t.start % 8 == 0 for t in tiles)
    image = random_images((203, 190, 2))
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=(33, 40)), whole_map(model, image), atol=ATOL)


def test_a_tile_too_small_to_keep_any_cell_is_refused_with_the_size_to_use():
    model = strided_fcn("valid", [2, 2, 2, 2])
    image = random_images((300, 300, 2))
    with pytest.raises(kfs.ConversionError, match=r"at least \d+"):
        kfs.predict_map(model, image, tile=16)


def test_an_image_smaller_than_the_receptive_field_is_refused():
    model = strided_fcn("valid", [2, 2, 2])
    with pytest.raises(kfs.ConversionError, match=r"12x40 pixels is smaller than the network's minimum input of 23x23"):
        kfs.predict_map(model, random_images((12, 40, 2)))


def test_tiling_a_network_with_global_context_is_refused():
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    gate = layers.Conv2D(4, 1, activation="sigmoid")(layers.GlobalAveragePooling2D(keepdims=True)(x))
    model = keras.Model(inputs, layers.Conv2D(2, 1)(layers.Multiply()([x, gate])))
    image = random_images((80, 64, 3))
    with pytest.raises(kfs.ConversionError, match="tile=None"):
        kfs.predict_map(model, image, tile=32)
    np.testing.assert_allclose(kfs.predict_map(model, image), whole_map(model, image), atol=ATOL)
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=200), whole_map(model, image), atol=ATOL)


def test_bad_inputs_get_clear_errors():
    model = strided_fcn("same", [2])
    with pytest.raises(kfs.ConversionError, match="2 channels"):
        kfs.predict_map(model, random_images((40, 40, 3)))
    with pytest.raises(kfs.ConversionError, match="one image"):
        kfs.predict_map(model, random_images((1, 40, 40, 2)))
    with pytest.raises(kfs.ConversionError, match=r"`out` has shape \(5, 5, 3\).*\(20, 20, 3\)"):
        kfs.predict_map(model, random_images((40, 40, 2)), out=np.zeros((5, 5, 3)))
    with pytest.raises(kfs.ConversionError, match="convert"):
        kfs.predict_map(object(), random_images((8, 8, 2)))
    # A classifier is no bad input since issue 24: its map is its FCN's (exact here: no padding, no global context).
    classifier = keras.Sequential([keras.Input((8, 8, 2)), layers.Flatten(), layers.Dense(3)])
    image = random_images((11, 9, 2))
    np.testing.assert_allclose(
        kfs.predict_map(classifier, image), kfs.predict_map(kfs.as_fcn(classifier), image), atol=ATOL
    )


def test_out_may_be_a_numpy_or_zarr_array():
    zarr = pytest.importorskip("zarr")
    model = strided_fcn("same", [2, 2])
    image = random_images((90, 70, 2))
    whole = whole_map(model, image)
    buffer = np.full(whole.shape, np.nan, dtype=np.float32)
    assert kfs.predict_map(model, image, tile=40, out=buffer) is buffer
    np.testing.assert_allclose(buffer, whole, atol=ATOL)
    store = zarr.zeros(shape=whole.shape, chunks=(8, 8, 3), dtype="float32")
    kfs.predict_map(model, zarr.array(image, chunks=(32, 32, 2)), tile=40, out=store)
    np.testing.assert_allclose(store[:], whole, atol=ATOL)


def test_memmap_input_and_progress_bar(tmp_path, capsys):
    model = strided_fcn("same", [2, 2])
    image = np.lib.format.open_memmap(tmp_path / "image.npy", mode="w+", dtype=np.float32, shape=(150, 130, 2))
    image[:] = random_images((150, 130, 2))
    image.flush()
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    expected = whole_map(model, np.asarray(image))
    np.testing.assert_allclose(kfs.predict_map(model, image, tile=48, progress=True), expected, atol=ATOL)
    assert "tile" in capsys.readouterr().err  # the tqdm bar
    kfs.predict_map(model, image, tile=48)  # default: no bar when stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_grayscale_image_for_a_one_channel_network_and_preprocess():
    model = strided_fcn("same", [2, 2], channels=1)
    image = random_images((50, 45))
    expected = whole_map(model, (image[..., None] * 2 + 1))
    result = kfs.predict_map(model, image, tile=24, preprocess=lambda x: x * 2 + 1)
    np.testing.assert_allclose(result, expected, atol=ATOL)


def test_valid_cnn_predict_map_equals_sliding_window_at_the_network_stride():
    classifier = keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            layers.Conv2D(6, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(8, 3, strides=2, activation="relu"),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(4, activation="softmax"),
        ]
    )
    fcn = kfs.convert(classifier)
    grid = kfs.geometry(fcn, (20, 20))
    assert grid.stride == (4, 4) and grid.receptive_field == (20, 20) and grid.offset == (0, 0)
    image = random_images((75, 61, 3), seed=2)
    windows = kfs.sliding_window_predict(classifier, image, grid.stride, batch_size=7)
    assert windows.shape == (14, 11, 4)
    np.testing.assert_allclose(kfs.predict_map(fcn, image), windows, atol=1e-5)
    np.testing.assert_allclose(kfs.predict_map(fcn, image, tile=36), windows, atol=1e-5)


def test_sliding_window_needs_a_fixed_size_classifier():
    model = strided_fcn("same", [2])
    with pytest.raises(kfs.ConversionError, match="fixed input size"):
        kfs.sliding_window_predict(model, random_images((40, 40, 2)), 4)


_STREAMING_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, zarr
    import keras_fcn_surgery as kfs

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 5, strides=4, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    fcn = keras.Model(inputs, keras.layers.Conv2D(2, 1)(x))
    image = zarr.open_array(sys.argv[1], mode="r")
    out = zarr.open_array(sys.argv[2], mode="r+")
    # Warm up TensorFlow with the same tile shapes on a corner of the image.
    kfs.predict_map(fcn, image[:2100, :2100], tile=1024)

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = peak_mib()
    kfs.predict_map(fcn, image, tile=1024, out=out)
    print(json.dumps({"before": before, "after": peak_mib()}))
    """
)


def test_a_large_zarr_image_streams_through_with_bounded_memory(tmp_path):
    zarr = pytest.importorskip("zarr")
    side, chunk = 8000, 1000
    image = zarr.open_array(
        str(tmp_path / "image.zarr"), mode="w", shape=(side, side, 1), chunks=(chunk, chunk, 1), dtype="uint8"
    )
    rng = np.random.default_rng(0)
    for top in range(0, side, chunk):
        image[top : top + chunk] = rng.integers(0, 256, (chunk, side, 1), dtype=np.uint8)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=(1000, 1000, 2), chunks=(250, 250, 2))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", _STREAMING_SCRIPT, str(tmp_path / "image.zarr"), str(tmp_path / "out.zarr")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    growth = peaks["after"] - peaks["before"]
    # The image alone is 61 MiB as uint8 and 244 MiB as float32; the whole-image
    # activations would be larger still. Tiles of 1024 need a few tens of MiB.
    assert growth < 100, f"peak RSS grew by {growth:.0f} MiB"
    keras.utils.set_random_seed(0)  # the same weights as in the script
    inputs = keras.Input((None, None, 1))
    x = layers.Conv2D(4, 5, strides=4, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    fcn = keras.Model(inputs, layers.Conv2D(2, 1)(x))
    np.testing.assert_allclose(out[:], kfs.predict_map(fcn, image[:]), atol=1e-4)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_the_smallest_tile_hint_is_the_true_minimum(padding):
    import re

    from keras_fcn_surgery.inference.runner import plan_tiles

    model = strided_fcn(padding, [2, 2, 2], head=3)
    grid = kfs.geometry(model)
    size = (203, 190)  # remainders 3 and 6 modulo the stride 8
    with pytest.raises(kfs.InputError, match=r"tile height of 9 pixels \(19 once aligned") as info:
        plan_tiles(size, grid, 9)
    hint = int(re.search(r"at least (\d+) pixels", str(info.value)).group(1))
    plan_tiles(size, grid, hint)  # the hint works at once (issue 28: it used to be the tile plus one stride)
    with pytest.raises(kfs.InputError):
        plan_tiles(size, grid, (hint - grid.stride[0], size[1]))


def test_tiles_that_compute_many_times_the_image_warn_with_a_faster_choice():
    # Issue 28: `--tile 63` ran 100x slower than no tiling, without a word.
    import warnings

    model = strided_fcn("same", [2, 2, 2], head=3)
    image = random_images((200, 200, 2))
    with pytest.warns(kfs.SlowTilingWarning, match=r"computes \d+\.\dx one whole-image pass; (tiles of|no tiling)"):
        tiled = kfs.predict_map(model, image, tile=48, staged=False)  # 23x the work of one pass
    np.testing.assert_allclose(tiled, whole_map(model, image), atol=ATOL)  # slow, but exact
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.SlowTilingWarning)
        kfs.predict_map(model, image, tile=128)  # a sensible tile: no warning
        kfs.predict_map(model, image)


def test_a_segmenter_tiled_in_slivers_warns(tmp_path):
    from test_segment import pooled_net

    seg = kfs.segmenter(pooled_net(), num_classes=2)
    margin, period = kfs.segment_image.__globals__["reach"](seg)
    side = 2 * max(margin) + max(period)  # the smallest tile that keeps anything: a sliver per tile
    with pytest.warns(kfs.SlowTilingWarning):
        kfs.segment_image(seg, random_images((160, 160, 3)), tile=side)
