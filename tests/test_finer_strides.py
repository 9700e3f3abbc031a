"""Maps finer than the network's stride, exact: filter rarefaction (à trous) of a converted FCN.

A `valid` network's map at stride s (s dividing its stride S) must be the
classifier on every crop at stride s; a `same` network's, the FCN's own map
at the cells it has, and the FCN on the shifted image wherever no padding
enters. Crops are cut with numpy and run through ``model.predict``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.errors import ConversionError, InputError
from keras_fcn_surgery.surgery.atrous import AxisState, at_stride, rarefy, rarefy_axis, same_padding_stays_exact

WINDOW = 24


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-6))


def _valid_body(x, data_format="channels_last"):
    """Total stride 8: a max pool, a strided convolution, an average pool; separable and depthwise windows."""
    x = layers.Conv2D(6, 3, activation="relu", data_format=data_format)(x)  # 22
    x = layers.MaxPooling2D(2, data_format=data_format)(x)  # 11
    x = layers.SeparableConv2D(8, 3, strides=2, activation="relu", data_format=data_format)(x)  # 5
    x = layers.DepthwiseConv2D(2, activation="relu", data_format=data_format)(x)  # 4
    x = layers.AveragePooling2D(2, data_format=data_format)(x)  # 2
    x = layers.Conv2D(5, 2, activation="relu", data_format=data_format)(x)  # 1
    return x


def _valid_classifier(data_format="channels_last", nested=False):
    keras.utils.set_random_seed(3)
    shape = (WINDOW, WINDOW, 3) if data_format == "channels_last" else (3, WINDOW, WINDOW)
    inputs = keras.Input(shape)
    if nested:
        inner_in = keras.Input(shape)
        body = keras.Model(inner_in, _valid_body(inner_in, data_format), name="body")
        x = body(inputs)
    else:
        x = _valid_body(inputs, data_format)
    x = layers.Flatten(data_format=data_format)(x)
    return keras.Model(inputs, layers.Dense(4)(x), name="valid_net")


def _crops_reference(classifier, image, stride, map_size, data_format="channels_last"):
    """The classifier on every crop at ``stride``, shaped as the map (numpy crops, ``model.predict``)."""
    sh, sw = stride
    hwc = image if data_format == "channels_last" else np.moveaxis(image, 0, -1)
    crops = np.stack(
        [
            hwc[i * sh : i * sh + WINDOW, j * sw : j * sw + WINDOW]
            for i in range(map_size[0])
            for j in range(map_size[1])
        ]
    )
    if data_format == "channels_first":
        crops = np.moveaxis(crops, -1, 1)
    return classifier.predict(crops, verbose=0).reshape(map_size[0], map_size[1], -1)


def _map_hwc(model, image, data_format="channels_last"):
    out = model.predict(image[None], verbose=0)[0]
    return out if data_format == "channels_last" else np.moveaxis(out, 0, -1)


def test_rarefy_axis_keeps_strides_until_the_target_then_dilates():
    state = AxisState()
    strides = [2, 2, 2]
    made = []
    for stride in strides:
        window = rarefy_axis(state, 2, stride)
        made.append((window.stride, window.dilation))
        state = window.state
    assert made == [(2, 1), (1, 1), (1, 2)]
    assert state == AxisState(kept=2, rate=4)
    split = rarefy_axis(AxisState(), 2, 4)  # a stride-4 layer keeps 2 and loses 2
    assert (split.stride, split.dilation, split.state) == (2, 1, AxisState(2, 2))
    assert rarefy_axis(AxisState(), 3, 2) is None  # 3 cannot be reached from a stride of 2
    assert same_padding_stays_exact(3, 1, 4) and not same_padding_stays_exact(2, 1, 2)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("stride", [4, 2, 1, (2, 4), (8, 1)])
def test_valid_map_at_a_finer_stride_is_the_classifier_on_every_crop(stride, nested):
    classifier = _valid_classifier(nested=nested)
    fcn = kfs.convert(classifier)
    assert kfs.geometry(fcn).stride == (8, 8)
    finer = rarefy(fcn, stride)
    pair = (stride, stride) if isinstance(stride, int) else stride
    grid = kfs.geometry(finer, (WINDOW, WINDOW))
    assert grid.stride == pair
    assert grid.receptive_field == kfs.geometry(fcn, (WINDOW, WINDOW)).receptive_field == (WINDOW, WINDOW)
    assert grid.offset == (0, 0)
    rng = np.random.default_rng(0)
    image = rng.random((WINDOW + 21, WINDOW + 13, 3), dtype=np.float32)
    scores = _map_hwc(finer, image)
    assert scores.shape[:2] == grid.output_size(image.shape[:2])
    assert scores.shape[:2] == tuple((n - WINDOW) // s + 1 for n, s in zip(image.shape[:2], pair))
    reference = _crops_reference(classifier, image, pair, scores.shape[:2])
    assert _relative(scores, reference) < 1e-5
    factor = (8 // pair[0], 8 // pair[1])
    np.testing.assert_allclose(scores[:: factor[0], :: factor[1]], _map_hwc(fcn, image), rtol=0, atol=1e-5)


def test_weights_are_copied_not_initialised():
    fcn = kfs.convert(_valid_classifier())
    finer = rarefy(fcn, 2)
    assert rarefy(fcn, 2) is finer  # made once
    assert rarefy(fcn, 8) is fcn
    source = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: v for v in fcn.weights}
    for variable in finer.weights:
        key = variable.path.split("/")[-2] + "/" + variable.path.split("/")[-1]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), keras.ops.convert_to_numpy(source[key]))


def _runs_channels_first_conv() -> bool:
    try:
        layer = layers.Conv2D(1, 3, data_format="channels_first")
        layer(np.zeros((1, 1, 5, 5), "float32"))
        pooled = layers.MaxPooling2D(2, data_format="channels_first")(np.zeros((1, 1, 4, 4), "float32"))
        return tuple(pooled.shape) == (1, 1, 2, 2)
    except Exception:  # noqa: BLE001 - TensorFlow on some CPUs has no NCHW convolution
        return False


@pytest.mark.skipif(not _runs_channels_first_conv(), reason="this CPU's TensorFlow runs no channels-first conv")
@pytest.mark.parametrize("stride", [4, 1])
def test_channels_first_map_at_a_finer_stride_is_the_classifier_on_every_crop(stride):
    classifier = _valid_classifier("channels_first")
    fcn = kfs.convert(classifier)
    finer = rarefy(fcn, stride)
    assert kfs.geometry(finer).stride == (stride, stride)
    image = np.random.default_rng(1).random((3, WINDOW + 9, WINDOW + 6), dtype=np.float32)
    scores = _map_hwc(finer, image, "channels_first")
    reference = _crops_reference(classifier, image, (stride, stride), scores.shape[:2], "channels_first")
    assert _relative(scores, reference) < 1e-5


def test_tiled_map_at_a_finer_stride_equals_the_whole_map():
    fcn = kfs.convert(_valid_classifier())
    finer = rarefy(fcn, 2)
    image = np.random.default_rng(2).random((70, 61, 3), dtype=np.float32)
    whole = kfs.predict_map(finer, image)
    tiled = kfs.predict_map(finer, image, tile=40)
    assert _relative(tiled, whole) < 1e-5
    assert whole.shape[:2] == kfs.geometry(finer).output_size((70, 61))


def _same_fcn():
    """A `same` FCN of stride 4: strided `valid` poolings, odd `same` convolutions around them."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(5, 3, padding="same", activation="relu")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(3, 1)(x)
    return keras.Model(inputs, x, name="same_net")


@pytest.mark.parametrize("stride", [2, 1])
def test_same_map_at_a_finer_stride_is_the_fcn_at_every_shift(stride):
    fcn = _same_fcn()
    finer = rarefy(fcn, stride)
    factor = 4 // stride
    image = np.random.default_rng(3).random((48, 44, 3), dtype=np.float32)
    scores = _map_hwc(finer, image)
    grid = kfs.geometry(finer, image.shape[:2])
    np.testing.assert_allclose(scores[::factor, ::factor], _map_hwc(fcn, image), rtol=0, atol=1e-5)
    compared = 0
    for dy in range(0, 4, stride):
        for dx in range(0, 4, stride):
            shifted = image[dy:, dx:]
            reference = _map_hwc(fcn, shifted)
            shifted_grid = kfs.geometry(fcn, shifted.shape[:2])
            for i in range(reference.shape[0]):
                for j in range(reference.shape[1]):
                    top, left, bottom, right = shifted_grid.input_box(i, j)
                    if top < 0 or left < 0 or bottom > shifted.shape[0] or right > shifted.shape[1]:
                        continue  # padding enters: the shifted image's border is not the image's
                    ci, cj = (top + dy - grid.offset[0]) // stride, (left + dx - grid.offset[1]) // stride
                    assert grid.input_box(ci, cj) == (top + dy, left + dx, bottom + dy, right + dx)
                    assert _relative(scores[ci, cj], reference[i, j]) < 1e-5
                    compared += 1
    assert compared > 20


def test_a_stride_removed_from_a_same_layer_is_refused_by_name():
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", name="strided_same")(inputs)
    x = layers.Conv2D(3, 3, strides=2, padding="same")(x)
    fcn = keras.Model(inputs, x)
    with pytest.raises(ConversionError, match="strided_same.*same.*windowed"):
        rarefy(fcn, 1)


def test_a_stride_that_does_not_divide_the_networks_is_refused():
    fcn = kfs.convert(_valid_classifier())
    with pytest.raises(InputError, match="does not divide 8x8"):
        rarefy(fcn, 3)


# predict_map and plan_prediction at a finer stride: the one routing place picks the FCN à trous.


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_predict_map_at_a_finer_stride_runs_the_fcn_a_trous(stride):
    classifier = _valid_classifier()
    image = np.random.default_rng(4).random((WINDOW + 19, WINDOW + 11, 3), dtype=np.float32)
    plan = kfs.plan_prediction(classifier, image.shape[:2], stride=stride)
    assert plan.method == "fcn" and plan.finer is not None
    assert plan.finer.stride == (stride, stride) and plan.finer.network_stride == (8, 8)
    cells = plan.map_size[0] * plan.map_size[1]
    window_macs = plan.finer.sliding_macs // cells
    assert plan.finer.sliding_macs == window_macs * cells and window_macs > 0
    assert plan.finer.stitch_macs == plan.finer.fcn_macs * (8 // stride) ** 2
    assert "à trous" in str(plan) and "sliding window" in str(plan)
    certified = kfs.predict_map(classifier, image, stride=stride, certify=12)
    assert certified.certificate.exact
    reference = _crops_reference(classifier, image, (stride, stride), certified.scores.shape[:2])
    assert _relative(certified.scores, reference) < 1e-5
    tiled = kfs.predict_map(classifier, image, stride=stride, tile=32)
    assert _relative(tiled, certified.scores) < 1e-5
    mapper = kfs.prepare(classifier, stride=stride)
    assert mapper.method == "fcn" and kfs.geometry(mapper.runnable).stride == (stride, stride)
    assert mapper.certify(image, certified.scores, 6).exact


def test_predict_map_of_an_fcn_at_a_finer_stride():
    fcn = kfs.convert(_valid_classifier())
    image = np.random.default_rng(5).random((50, 47, 3), dtype=np.float32)
    scores = kfs.predict_map(fcn, image, stride=(2, 4), tile=(36, 40))
    assert _relative(scores, _map_hwc(rarefy(fcn, (2, 4)), image)) < 1e-5
    # A stride that does not divide 8 (once refused): the map at stride 1, every third cell.
    thinned = kfs.predict_map(fcn, image, stride=3)
    assert _relative(thinned, _map_hwc(rarefy(fcn, 1), image)[::3, ::3]) < 1e-5
    with pytest.raises(InputError, match="stride 8x8; its map cannot be at stride 16x16"):
        kfs.predict_map(fcn, image, stride=16)  # a multiple: the classifier's windowed map


def test_predict_map_refuses_a_layer_it_cannot_rarefy_by_name():
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", name="strided_same")(inputs)
    fcn = keras.Model(inputs, layers.Conv2D(3, 3, strides=2, padding="same")(x))
    with pytest.raises(ConversionError, match="strided_same.*windowed"):
        kfs.predict_map(fcn, np.zeros((16, 16, 3), "float32"), stride=1)


def test_certificate_at_a_finer_stride_when_the_window_drops_pixels():
    """A pooling that floors (13 -> 6) leaves the classifier's last pixels unseen: at stride 1 a crop holds
    several finer cells; the certificate compares the first with the classifier on that crop."""
    keras.utils.set_random_seed(6)
    classifier = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(3),
        ]
    )
    image = np.random.default_rng(7).random((45, 41, 3), dtype=np.float32)
    certified = kfs.predict_map(classifier, image, stride=1, certify=10)
    assert certified.certificate.exact
    naive = kfs.sliding_window_predict(classifier, image, 1)
    rows, cols = naive.shape[:2]
    assert certified.scores.shape[:2] == (rows + 2, cols + 2)
    assert _relative(certified.scores[:rows, :cols], naive) < 1e-5


def test_predict_images_at_a_finer_stride_writes_the_a_trous_map_with_its_geometry(tmp_path):
    from PIL import Image

    from keras_fcn_surgery.batch.run import predict_images

    classifier = _valid_classifier()
    pixels = (np.random.default_rng(8).random((60, 52, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(tmp_path / "a.png")
    predict_images(classifier, [str(tmp_path / "a.png")], tmp_path / "maps", stride=2, formats="npz")
    saved = np.load(next((tmp_path / "maps").glob("*.npz")))
    reference = _crops_reference(classifier, pixels.astype("float32"), (2, 2), saved["scores"].shape[:2])
    assert _relative(saved["scores"], reference) < 1e-5
    assert tuple(saved["stride"]) == (2, 2) and tuple(saved["receptive_field"]) == (WINDOW, WINDOW)
    assert bool(saved["certificate_exact"])


def test_certify_map_of_a_classifier_at_a_finer_stride():
    classifier = _valid_classifier()
    image = np.random.default_rng(9).random((50, 45, 3), dtype=np.float32)
    scores = kfs.predict_map(classifier, image, stride=2)
    certificate = kfs.certify_map(classifier, image, scores, 10, stride=2)
    assert certificate.exact and certificate.eligible == scores.shape[0] * scores.shape[1]
    windowed = kfs.predict_map(classifier, image, stride=16)  # a multiple: still the windowed map
    assert kfs.certify_map(classifier, image, windowed, 4, stride=16).exact


def test_a_rarefied_fcn_does_not_keep_its_fcn_alive():
    import gc
    import weakref

    fcn = kfs.convert(_valid_classifier())
    rarefy(fcn, 2)
    gone = weakref.ref(fcn)
    del fcn
    gc.collect()
    assert gone() is None


def test_the_heatmap_command_draws_the_a_trous_map_at_a_finer_stride(tmp_path, capsys):
    from PIL import Image

    from keras_fcn_surgery import cli

    classifier = _valid_classifier()
    model_file = tmp_path / "valid.keras"
    classifier.save(model_file)
    Image.fromarray((np.random.default_rng(10).random((56, 50, 3)) * 255).astype("uint8")).save(tmp_path / "a.png")
    png = tmp_path / "heat.png"
    args = ["heatmap", str(model_file), str(tmp_path / "a.png"), "--class", "1", "-o", str(png), "--stride", "2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "map of 17x14 cells" in printed and "exact" in printed and png.is_file()


# Strides that do not divide the network's: the finest exact stride below (gcd), every (s / g)-th cell kept.


@pytest.mark.parametrize("stride", [6, 3, 12, (6, 4), 16])
def test_a_stride_that_does_not_divide_the_networks_is_thinned_from_the_finest_exact_stride_below(stride):
    classifier = _valid_classifier()
    fcn = kfs.convert(classifier)
    pair = (stride, stride) if isinstance(stride, int) else stride
    exact = tuple(int(np.gcd(s, 8)) for s in pair)
    thinned = at_stride(fcn, stride)
    assert at_stride(fcn, stride) is thinned  # made once
    grid = kfs.geometry(thinned, (WINDOW, WINDOW))
    assert grid.stride == pair and grid.offset == (0, 0) and grid.receptive_field == (WINDOW, WINDOW)
    image = np.random.default_rng(11).random((WINDOW + 29, WINDOW + 26, 3), dtype=np.float32)
    scores = _map_hwc(thinned, image)
    assert scores.shape[:2] == grid.output_size(image.shape[:2])
    assert scores.shape[:2] == tuple((n - WINDOW) // s + 1 for n, s in zip(image.shape[:2], pair))
    assert _relative(scores, _crops_reference(classifier, image, pair, scores.shape[:2])) < 1e-5
    every = (pair[0] // exact[0], pair[1] // exact[1])
    finest = _map_hwc(rarefy(fcn, exact), image)
    np.testing.assert_allclose(scores, finest[:: every[0], :: every[1]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride", [6, (3, 4)])
def test_predict_map_at_a_stride_that_does_not_divide_the_networks_is_exact_tiled_and_certified(stride):
    classifier = _valid_classifier()
    image = np.random.default_rng(12).random((WINDOW + 43, WINDOW + 35, 3), dtype=np.float32)
    pair = (stride, stride) if isinstance(stride, int) else stride
    plan = kfs.plan_prediction(classifier, image.shape[:2], stride=stride)
    assert plan.method == "fcn" and plan.finer is not None and plan.finer.chosen == "à trous"
    assert plan.finer.stride == pair and plan.finer.exact_stride == tuple(int(np.gcd(s, 8)) for s in pair)
    assert plan.finer.weighed and plan.finer.windowed_macs is None  # the windowed map needs a multiple of 8
    text = str(plan)
    assert "the finest exact stride below" in text and "(chosen)" in text
    assert "the windowed method cannot run at that stride" in text and "sliding window" in text
    certified = kfs.predict_map(classifier, image, stride=stride, certify=12)
    assert certified.certificate.exact
    reference = _crops_reference(classifier, image, pair, certified.scores.shape[:2])
    assert _relative(certified.scores, reference) < 1e-5
    for tile in (32, (40, 36)):
        tiled = kfs.predict_map(classifier, image, stride=stride, tile=tile)
        assert _relative(tiled, certified.scores) < 1e-5
    assert kfs.certify_map(classifier, image, certified.scores, 8, stride=stride).exact


def test_a_same_network_at_a_stride_that_does_not_divide_its_own():
    fcn = _same_fcn()  # stride 4: at 6, the map at 2 every third cell
    image = np.random.default_rng(13).random((50, 46, 3), dtype=np.float32)
    scores = kfs.predict_map(fcn, image, stride=6)
    np.testing.assert_allclose(scores, _map_hwc(rarefy(fcn, 2), image)[::3, ::3], rtol=0, atol=1e-5)
    assert kfs.geometry(at_stride(fcn, 6)).stride == (6, 6)
    assert kfs.geometry(at_stride(fcn, 6)).offset == kfs.geometry(fcn).offset
    tiled = kfs.predict_map(fcn, image, stride=6, tile=24)
    assert _relative(tiled, scores) < 1e-5


def test_the_thinned_fcn_or_the_windowed_map_is_chosen_by_counted_macs(monkeypatch):
    from keras_fcn_surgery.inference import windowed

    classifier = _valid_classifier()
    fcn = windowed.conversion(classifier)[0]  # the FCN `as_fcn` keeps for it
    monkeypatch.setattr(windowed, "windowed_macs", lambda *args: 1)  # the windowed map as good as free
    assert windowed.choose_method(classifier, 6, "auto") == ("windowed", None)
    monkeypatch.setattr(windowed, "windowed_macs", lambda *args: 10**15)
    assert windowed.choose_method(classifier, 6, "auto") == ("fcn", at_stride(fcn, 6))
    assert windowed.choose_method(classifier, 16, "auto") == ("windowed", None)  # a multiple: the windowed map
    assert windowed.choose_method(classifier, 6, "fcn") == ("fcn", at_stride(fcn, 6))  # forced


def test_a_stride_below_one_is_refused():
    with pytest.raises(InputError, match="at least 1 pixel"):
        at_stride(kfs.convert(_valid_classifier()), 0)


def test_the_heatmap_command_at_a_stride_that_does_not_divide_the_networks(tmp_path, capsys):
    from PIL import Image

    from keras_fcn_surgery import cli

    classifier = _valid_classifier()
    model_file = tmp_path / "valid.keras"
    classifier.save(model_file)
    Image.fromarray((np.random.default_rng(14).random((56, 50, 3)) * 255).astype("uint8")).save(tmp_path / "a.png")
    png = tmp_path / "heat.png"
    args = ["heatmap", str(model_file), str(tmp_path / "a.png"), "--class", "1", "-o", str(png), "--stride", "6"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "map of 6x5 cells" in printed and "exact" in printed and png.is_file()  # (56 - 24) // 6 + 1, ...
