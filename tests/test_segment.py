"""kfs.segmenter: FCN-32s/16s/8s from a classifier, aligned by the geometry; bilinear kernels; losses; saving."""

import os

import keras
import numpy as np
import pytest
from conftest import random_images

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference.heatmap import cell_coordinates, upsample
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.segmentation import alignment, bilinear

L = keras.layers


def fcn_upsample_filt(size):
    """FCN's surgery.upsample_filt, written out as in the reference (shelhamer/fcn.berkeleyvision.org)."""
    factor = (size + 1) // 2
    if size % 2 == 1:
        center = factor - 1
    else:
        center = factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def valid_net(data_format="channels_last", classes=6, activation=None):
    """valid convolutions and a 3x3/2 pooling: odd receptive field (11), stride 2, offset 0."""
    shape = (9, 9, 3) if data_format == "channels_last" else (3, 9, 9)
    return keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, data_format=data_format, name="conv1"),
            L.MaxPooling2D(3, 2, data_format=data_format, name="pool1"),
            L.Conv2D(5, 3, data_format=data_format, name="conv2"),
            L.Flatten(data_format=data_format),
            L.Dense(classes, activation=activation, name="scores"),
        ],
        name="valid_net",
    )


def same_net(data_format="channels_last", classes=5):
    """same padding, three stride-2 stages (stride 8), odd receptive field: offsets depend on size mod 8."""
    shape = (16, 16, 3) if data_format == "channels_last" else (3, 16, 16)
    kw = {"data_format": data_format, "padding": "same"}
    return keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, strides=2, activation="relu", name="conv1", **kw),
            L.Conv2D(4, 3, activation="relu", name="conv2", **kw),
            L.Conv2D(6, 3, strides=2, activation="relu", name="conv3", **kw),
            L.Conv2D(6, 3, strides=2, activation="relu", name="conv4", **kw),
            L.Flatten(data_format=data_format),
            L.Dense(classes, name="scores"),
        ],
        name="same_net",
    )


def pooled_net(classes=4, side=16):
    """VGG-like: same 3x3 convolutions, 2x2 poolings (stride 8); pool1 and pool2 are the auto skips."""
    layers = [keras.Input((side, side, 3))]
    for stage in (1, 2, 3):
        layers.append(L.Conv2D(8, 3, padding="same", activation="relu", name=f"conv{stage}"))
        layers.append(L.MaxPooling2D(2, name=f"pool{stage}"))
    layers += [L.Flatten(), L.Dense(16, activation="relu", name="fc"), L.Dense(classes, name="scores")]
    return keras.Sequential(layers, name="pooled_net")


def reference_upsampling(fcn, image_size, scores):
    """Bilinear interpolation between cell centres, held beyond the outer ones (independent NumPy version)."""
    grid = kfs.geometry(fcn).at(image_size)
    rows, cols = cell_coordinates(grid, image_size, scores.shape[:2])
    return np.stack([upsample(scores[..., k], rows, cols) for k in range(scores.shape[-1])], axis=-1)


# --- pure maths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, 17))
def test_bilinear_kernel_equals_fcn_upsample_filt(size):
    np.testing.assert_array_equal(bilinear.upsample_filt(size), fcn_upsample_filt(size))


def test_diagonal_kernel_maps_each_class_to_itself_only():
    kernel = bilinear.diagonal_kernel((4, 3), 3)
    assert kernel.shape == (4, 3, 3, 3)
    np.testing.assert_allclose(kernel[:, :, 1, 1], np.outer(bilinear.bilinear_profile(4), bilinear.bilinear_profile(3)))
    assert kernel[:, :, 0, 1].sum() == 0 and kernel[:, :, 2, 0].sum() == 0


def test_alignment_phase_follows_the_centre_distance():
    # Coarse centres at 3.5 (stride 4) onto pixels: half positions -> even kernel 2 * 4, shift 4 - 0.5 - 3.5 = 0.
    whole = alignment.align_axis(4, 1, [3.5] * 8, [0.0] * 8, 4)
    assert (whole.ratio, whole.kernel_size, whole.shifts) == (4, 8, (0, 0, 0, 0))
    # Centre at 5 (odd receptive field): odd kernel 7, centre 3: shift 3 - 5 = -2.
    odd = alignment.align_axis(4, 1, [5.0] * 8, [0.0] * 8, 4)
    assert (odd.kernel_size, odd.shifts) == (7, (-2, -2, -2, -2))


def test_alignment_tabulates_shifts_by_residue():
    centres = [1.0, 0.0, 1.0, 0.0]  # lengths 5, 6, 7, 8: odd lengths pad one more pixel before
    table = alignment.align_axis(2, 1, centres, [0.0] * 4, 2, first_length=5)
    assert table.shifts == (1, 0)  # length % 2 == 0 -> centre 0 -> shift 1; odd -> centre 1 -> shift 0


def test_alignment_refuses_quarter_positions_and_uneven_strides():
    with pytest.raises(ValueError, match="whole and half"):
        alignment.align_axis(4, 2, [0.5] * 4, [0.0] * 4, 2)
    with pytest.raises(ValueError, match="whole number"):
        alignment.align_axis(6, 4, [0.0] * 12, [0.0] * 12, 6)


# --- the model -------------------------------------------------------------------------------------


def _to_last(layout, array):
    return layout.to_channels_last(np.asarray(array))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("factory", [valid_net, same_net])
def test_fcn32s_output_is_the_fcn_map_at_window_centres_and_bilinear_between(factory, data_format):
    layout = Layout(data_format)
    classifier = factory(data_format)
    fcn = kfs.convert(classifier)
    model = kfs.segmenter(classifier, skips=())
    grid = kfs.geometry(fcn)
    assert all(rf % 2 == 1 for rf in grid.receptive_field)
    for size in [(17, 23), (19, 16), (24, 21)]:
        x = random_images(layout.batch_shape(1, *size, 3), seed=size[0])
        out = _to_last(layout, model(x))[0]
        scores = _to_last(layout, fcn(x))[0]
        assert out.shape == (*size, scores.shape[-1])
        at = grid.at(size)
        scale = np.abs(scores).max()
        for i in range(scores.shape[0]):
            for j in range(scores.shape[1]):
                top, left, bottom, right = at.input_box(i, j)
                centre = ((top + bottom - 1) // 2, (left + right - 1) // 2)
                np.testing.assert_allclose(out[centre], scores[i, j], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(out, reference_upsampling(fcn, size, scores), rtol=0, atol=1e-5 * scale)


def test_even_receptive_field_interpolates_at_half_positions():
    classifier = pooled_net()
    fcn = kfs.convert(classifier)
    assert all(rf % 2 == 0 for rf in kfs.geometry(fcn).receptive_field)
    model = kfs.segmenter(classifier, skips=())
    assert model.get_layer("upscore").kernel.shape[:2] == (16, 16)  # 2 * stride, FCN's even kernel
    for size in [(16, 16), (29, 35)]:
        x = random_images((1, *size, 3))
        scores = fcn(x).numpy()[0]
        expected = reference_upsampling(fcn, size, scores)
        np.testing.assert_allclose(model(x).numpy()[0], expected, rtol=0, atol=1e-5 * np.abs(scores).max())


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_output_size_equals_input_size_with_skips_at_odd_sizes(data_format):
    layout = Layout(data_format)
    classifier = pooled_net() if data_format == "channels_last" else same_net(data_format)
    model = kfs.segmenter(classifier, num_classes=3)
    for size in [(17, 17), (23, 31), (33, 19)]:
        x = random_images(layout.batch_shape(2, *size, 3))
        assert tuple(model(x).shape) == layout.batch_shape(2, *size, 3)


def test_auto_skips_are_the_poolings_at_half_and_quarter_stride():
    model = kfs.segmenter(pooled_net(), num_classes=3)
    names = {layer.name for layer in model.layers}
    assert {"score_pool2", "score_pool1", "fuse_pool2", "fuse_pool1"} <= names
    assert "score_pool3" not in names
    np.testing.assert_array_equal(model.get_layer("score_pool2").get_weights()[0], 0)


def _interpolate(values, positions, axis):
    """Linear interpolation of ``values`` along ``axis`` at fractional cell positions (clipped to the ends)."""
    positions = np.clip(positions, 0, values.shape[axis] - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, values.shape[axis] - 1)
    weight = (positions - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    return np.take(values, low, axis=axis) * (1 - weight) + np.take(values, high, axis=axis) * weight


def _centres(grid, count, axis):
    info = (grid.height, grid.width)[axis]
    return info.offset + (info.receptive_field - 1) / 2 + info.stride * np.arange(count)


@pytest.mark.parametrize(
    "factory, data_format, skips",
    [
        (pooled_net, "channels_last", ("score_pool2", "score_pool1")),  # 2x2 poolings: half-pixel centres
        (same_net, "channels_first", ("score_conv3", "score_conv1")),  # strided same convolutions
    ],
)
def test_fcn8s_cascade_matches_a_numpy_reference_placed_by_each_maps_geometry(factory, data_format, skips):
    layout = Layout(data_format)
    classifier = factory() if factory is pooled_net else factory(data_format)
    model = kfs.segmenter(classifier, num_classes=3)
    rng = np.random.default_rng(0)
    for name in skips:
        layer = model.get_layer(name)
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    names = ("score_fr", *skips)
    probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    size = (37, 45)
    x = random_images(layout.batch_shape(1, *size, 3))
    maps = [layout.to_channels_last(m.numpy())[0] for m in probe(x)]
    grids = [kfs.geometry(keras.Model(model.inputs[0], model.get_layer(n).output)).at(size) for n in names]
    fused, fused_grid = maps[0], grids[0]
    for skip, grid in zip(maps[1:], grids[1:]):
        for axis in (0, 1):
            coarse = _centres(fused_grid, fused.shape[axis], axis)
            fine = _centres(grid, skip.shape[axis], axis)
            fused = _interpolate(fused, (fine - coarse[0]) / (coarse[1] - coarse[0]), axis)
        fused, fused_grid = fused + skip, grid
    for axis in (0, 1):
        coarse = _centres(fused_grid, fused.shape[axis], axis)
        fused = _interpolate(fused, (np.arange(size[axis]) - coarse[0]) / (coarse[1] - coarse[0]), axis)
    out = layout.to_channels_last(model(x).numpy())[0]
    np.testing.assert_allclose(out, fused, rtol=0, atol=1e-5 * np.abs(fused).max())


def test_new_classes_start_at_zero_and_keep_classes_carries_old_weights():
    classifier = valid_net()
    fcn = kfs.convert(classifier)
    x = random_images((1, 15, 15, 3))
    fresh = kfs.segmenter(classifier, num_classes=4, skips=())
    np.testing.assert_array_equal(fresh(x).numpy(), 0)
    kept = kfs.segmenter(classifier, num_classes=4, keep_classes={0: 5, 2: 1}, skips=())
    own = kfs.segmenter(classifier, skips=())(x).numpy()
    out = kept(x).numpy()
    np.testing.assert_allclose(out[..., 0], own[..., 5], atol=1e-6)
    np.testing.assert_allclose(out[..., 2], own[..., 1], atol=1e-6)
    np.testing.assert_array_equal(out[..., [1, 3]], 0)
    assert fcn.count_params() > 0


def test_softmax_head_gives_logits():
    classifier = valid_net(activation="softmax")
    fcn = kfs.convert(classifier)
    model = kfs.segmenter(classifier, skips=())
    x = random_images((1, 13, 13, 3))
    logits = model(x).numpy()
    probabilities = fcn(x).numpy()[0, 0, 0]
    centre = kfs.geometry(fcn).at((13, 13)).receptive_field[0] // 2
    shifted = np.exp(logits[0, centre, centre] - logits[0, centre, centre].max())
    np.testing.assert_allclose(shifted / shifted.sum(), probabilities, atol=1e-6)


def test_given_fcn_is_copied_not_shared_and_backbone_can_be_frozen():
    fcn = kfs.convert(valid_net())
    model = kfs.segmenter(fcn, num_classes=2, skips=["conv1"], trainable=False)
    assert not model.get_layer("conv1").trainable
    assert fcn.get_layer("conv1").trainable
    assert model.get_layer("conv1") is not fcn.get_layer("conv1")
    assert not model.get_layer("upscore").trainable
    assert model.get_layer("score_fr").trainable and model.get_layer("score_conv1").trainable
    assert kfs.segmenter(fcn, num_classes=2, trainable_upsampling=True).get_layer("upscore").trainable


def test_bad_skips_and_classes_are_refused_with_the_way_out():
    with pytest.raises(kfs.ConversionError, match=r"'nope'.*Choose among: conv1, pool1, conv2"):
        kfs.segmenter(valid_net(), skips=["nope"])
    with pytest.raises(kfs.ConversionError, match="old class 9"):
        kfs.segmenter(valid_net(), num_classes=2, keep_classes=[9])
    with pytest.raises(kfs.ConversionError, match="keep_classes` needs `num_classes"):
        kfs.segmenter(valid_net(), keep_classes=[1])
    with pytest.raises(kfs.ConversionError, match="skips"):
        kfs.segmenter(valid_net(), skips="all")


def test_keras_round_trip_without_custom_objects(tmp_path):
    model = kfs.segmenter(same_net(), num_classes=3, skips=["conv3", "conv1"], keep_classes=[0, 1, 2])
    # same padding: the shifts depend on the input size modulo the stride, held in frozen Embeddings.
    assert any(isinstance(layer, L.Embedding) and not layer.trainable for layer in model.layers)
    path = os.fspath(tmp_path / "seg.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for size in [(21, 27), (16, 16)]:
        x = random_images((1, *size, 3))
        expected = model(x).numpy()
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_many_classes_share_one_bilinear_kernel_with_the_same_result(monkeypatch, data_format):
    from keras_fcn_surgery.segmentation import segmenter as module

    layout = Layout(data_format)
    classifier = same_net(data_format, classes=7)
    full = kfs.segmenter(classifier)
    monkeypatch.setattr(module, "FULL_KERNEL_LIMIT", 0)
    shared = kfs.segmenter(classifier)
    assert isinstance(shared.get_layer("upscore"), keras.layers.Conv3DTranspose)
    shape = tuple(shared.get_layer("upscore").kernel.shape)
    assert shape[0] == 1 and shape[3:] == (1, 1)
    x = random_images(layout.batch_shape(1, 21, 26, 3))
    np.testing.assert_allclose(shared(x).numpy(), full(x).numpy(), rtol=0, atol=1e-5 * np.abs(full(x).numpy()).max())


@pytest.mark.heavy
def test_vgg16_fcn8s_picks_pool4_pool3_and_fcn32s_matches_numpy_at_half_pixel_centres():
    vgg = keras.applications.VGG16(weights=None, classifier_activation=None)
    fcn = kfs.convert(vgg)
    fcn8 = kfs.segmenter(fcn, num_classes=21)
    assert {"score_block4_pool", "score_block3_pool"} <= {layer.name for layer in fcn8.layers}
    kernels = [tuple(layer.kernel.shape[:2]) for layer in fcn8.layers if isinstance(layer, L.Conv2DTranspose)]
    assert kernels == [(4, 4), (4, 4), (16, 16)]  # FCN-8s: upscore2, upscore_pool4, upscore8
    fcn32 = kfs.segmenter(fcn, num_classes=5, keep_classes=[0, 1, 2, 3, 4], skips=())
    size = (257, 290)
    x = random_images((1, *size, 3))
    scores = fcn(x).numpy()[0][..., :5]
    expected = reference_upsampling(fcn, size, scores)
    np.testing.assert_allclose(fcn32(x).numpy()[0], expected, rtol=0, atol=1e-5 * np.abs(scores).max())
