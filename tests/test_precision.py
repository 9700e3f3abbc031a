"""Precision as an execution choice (issue 39): maps computed at bfloat16 or float16, stored in float32, certified
against the float32 classifier at the precision's own tolerance; the option through `predict_images` and the CLI."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.inference.certificate import precision_tolerance

REDUCED = ["bfloat16", "float16"]


def _classifier(seed=3):
    """A small valid-padding classifier of 16 x 16 images (its FCN's map equals the crops' scores at float32)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(8, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(4),
        ]
    )


def _image(height=40, width=44, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (height, width, 3)).astype("float32")


def _assert_close_and_same_top_class(reduced, full, precision):
    """``reduced`` within the precision's tolerance of ``full`` (relative to its scale), with the same top class
    wherever the float32 top class leads by more than twice that tolerance (a near-tie may flip legitimately)."""
    assert reduced.dtype == np.float32 and reduced.shape == full.shape
    scale = np.abs(full).max()
    tolerance = precision_tolerance(precision)
    assert np.abs(reduced - full).max() <= tolerance * scale
    assert not np.array_equal(reduced, full), f"the {precision} copy was not used"
    ranked = np.sort(full, axis=-1)
    clear = (ranked[..., -1] - ranked[..., -2]) > 2 * tolerance * scale
    assert clear.any()
    np.testing.assert_array_equal(np.argmax(reduced, -1)[clear], np.argmax(full, -1)[clear])
    assert np.mean(np.argmax(reduced, -1) == np.argmax(full, -1)) >= 0.9  # near-ties included


@pytest.mark.parametrize("precision", REDUCED)
def test_a_reduced_precision_fcn_map_is_float32_and_close_to_the_float32_map(precision):
    classifier = _classifier()
    image = _image()
    full = kfs.predict_map(classifier, image)
    reduced = kfs.predict_map(classifier, image, precision=precision)
    _assert_close_and_same_top_class(reduced, full, precision)
    tiled = kfs.predict_map(classifier, image, precision=precision, tile=24, staged=True)  # stages at it too
    _assert_close_and_same_top_class(tiled, full, precision)
    assert classifier.dtype_policy.name == "float32"  # a copy computes at the precision, not the model


@pytest.mark.parametrize("precision", REDUCED)
def test_a_windowed_map_runs_its_prefix_and_tail_at_the_precision(precision):
    classifier = _classifier()
    image = _image()
    full = kfs.predict_map(classifier, image, method="windowed", stride=4)
    reduced = kfs.predict_map(classifier, image, method="windowed", stride=4, precision=precision)
    _assert_close_and_same_top_class(reduced, full, precision)
    mapper = kfs.prepare(classifier, method="windowed", stride=4)
    assert mapper.with_options(precision=precision).execution.precision == precision
    np.testing.assert_array_equal(mapper.map(image), full)  # the float32 mapper's plan is its own


@pytest.mark.parametrize("precision", REDUCED)
def test_the_certificate_reports_the_precision_and_holds_it_to_its_tolerance(precision):
    classifier = _classifier()
    image = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.InexactMapWarning)
        scores, certificate = kfs.predict_map(classifier, image, precision=precision, certify=8)
    assert certificate.precision == precision and certificate.tolerance == precision_tolerance(precision)
    assert certificate.exact and certificate.informative and certificate.top_class_agreement == 1.0
    assert 0 < certificate.max_rel_diff <= precision_tolerance(precision)  # against the float32 classifier
    assert f"computed at {precision}" in str(certificate) and certificate.metadata()["precision"] == precision
    tampered = scores.copy()
    i, j = certificate.cells[0]
    tampered[i, j] += 3 * precision_tolerance(precision) * np.abs(scores).max()
    mapper = kfs.prepare(classifier, precision=precision)
    with pytest.warns(kfs.InexactMapWarning, match=f"computed at {precision}"):
        found = mapper.certify(image, tampered, 8)
    assert not found.exact and found.precision == precision
    windowed = kfs.prepare(classifier, method="windowed", stride=4, precision=precision)
    scores = windowed.map(image)
    certificate = windowed.certify(image, scores, 8)
    assert certificate.exact and certificate.precision == precision
    assert certificate.tolerance == precision_tolerance(precision)


def test_float32_certificates_keep_their_tolerance_and_mixed_precision_is_an_alias():
    classifier = _classifier()
    image = _image()
    _, certificate = kfs.predict_map(classifier, image, certify=4)
    assert certificate.precision == "float32" and certificate.tolerance == 1e-4
    assert precision_tolerance("bfloat16") == 6e-2 and precision_tolerance("float16") == 2e-2
    assert kfs.Execution(mixed_precision=True).precision == "float16"
    assert kfs.prepare(classifier, mixed_precision=True).execution.precision == "float16"
    alias = kfs.predict_map(classifier, image, mixed_precision=True)
    np.testing.assert_array_equal(alias, kfs.predict_map(classifier, image, precision="float16"))
    with pytest.raises(kfs.InputError, match="alias of precision='float16'"):
        kfs.Execution(precision="bfloat16", mixed_precision=True)


def test_bad_precisions_are_refused_before_any_work(tmp_path):
    classifier = _classifier()
    image = _image()
    for bad in ("fp8", "float64", None, "BF16"):
        with pytest.raises(kfs.InputError, match="`precision`.*'float32', 'bfloat16', 'float16'"):
            kfs.predict_map(classifier, image, precision=bad)
    with pytest.raises(kfs.InputError, match="`precision`"):
        kfs.plan_prediction(classifier, (40, 44), precision="half")
    with pytest.raises(kfs.InputError, match="`precision`"):
        kfs.predict_images(classifier, [str(tmp_path)], str(tmp_path / "out"), precision="half")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    _classifier().save(folder / "net.keras")
    images = folder / "images"
    images.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (40, 44, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    return folder


def test_the_cli_precision_reaches_the_map_and_its_record(files, tmp_path, capsys):
    argv = ["predict", str(files / "net.keras"), str(files / "images"), "--preprocess", "unit"]
    assert main([*argv, "-o", str(tmp_path / "f32")]) == 0
    assert main([*argv, "-o", str(tmp_path / "bf16"), "--precision", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "computed at bfloat16" in printed
    with np.load(tmp_path / "f32" / "a.npz") as full, np.load(tmp_path / "bf16" / "a.npz") as reduced:
        assert str(full["precision"]) == "float32" and str(reduced["precision"]) == "bfloat16"
        assert str(reduced["certificate_precision"]) == "bfloat16" and bool(reduced["certificate_exact"])
        _assert_close_and_same_top_class(reduced["scores"], full["scores"], "bfloat16")
    image = files / "images" / "a.png"
    heat = ["heatmap", str(files / "net.keras"), str(image), "--class", "1", "--preprocess", "unit", "--certify", "4"]
    assert main([*heat, "-o", str(tmp_path / "h.png"), "--precision", "float16"]) == 0
    assert "computed at float16" in capsys.readouterr().out
    for command in (argv + ["-o", str(tmp_path / "bad")], heat + ["-o", str(tmp_path / "bad.png")]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--precision", "fp8"])
        assert stop.value.code == 2
        assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.png").exists()


def _same_padded_classifier():
    """A classifier with a `same`-padded convolution whose edge cells differ from its crops' scores by about 2% of
    the output scale: over float32's tolerance, within bfloat16's (fc1 weighs the padded edge of its input lightly)."""
    model = small_flatten_cnn(input_size=(32, 32), classes=3, softmax=False)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    kernel, bias = model.get_layer("fc1").get_weights()
    kernel = kernel.reshape(8, 8, 12, -1).copy()  # conv2's 8 x 8 map, flattened
    kernel[[0, 7]] *= 0.02
    kernel[:, [0, 7]] *= 0.02
    model.get_layer("fc1").set_weights([kernel.reshape(-1, kernel.shape[-1]), bias])
    return model


def test_a_same_padded_map_at_bfloat16_names_the_padding_difference_its_tolerance_covers():
    """Issue 39: under bfloat16's wide tolerance a `same`-padded network's cells, which differ from the classifier on
    their crops because of padding (as a float32 certificate says), read "exact" with nothing more; the certificate
    now states both the precision's difference and the padding's."""
    classifier, image = _same_padded_classifier(), np.random.default_rng(0).uniform(0, 1, (96, 96, 3)).astype("f4")
    with pytest.warns(kfs.InexactMapWarning, match="padding"):
        _, full = kfs.predict_map(classifier, image, certify=8)
    assert not full.exact and "padding" in full.reason  # float32: the padding difference, named
    _, reduced = kfs.predict_map(classifier, image, precision="bfloat16", certify=8)
    assert reduced.exact and reduced.informative and reduced.tolerance == precision_tolerance("bfloat16")
    assert reduced.max_rel_diff > 1e-3  # the padding's difference, hidden by the tolerance
    text = str(reduced)
    assert "computed at bfloat16" in text and "bfloat16's tolerance" in text  # the precision
    assert "reaches past the crop into padding" in text and reduced.metadata()["reason"] == reduced.reason
    valid = _classifier()  # a valid-padded network: nothing to add at bfloat16
    _, plain = kfs.predict_map(valid, _image(), precision="bfloat16", certify=8)
    assert plain.exact and plain.reason == "" and "padding" not in str(plain)


def test_the_plan_states_what_each_precision_costs_here_measured_once_and_auto_keeps_float32(tmp_path, monkeypatch):
    """Issue 39: the plan says what float32, bfloat16 and float16 cost on the machine that runs it (timed once per
    model and shape, kept in the execution-timing cache file like the engine choice); `auto` still runs float32."""
    from keras_fcn_surgery.inference import engines

    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path / "engines.json"))
    monkeypatch.setattr(engines, "MEASURE_MACS", 0)  # this small network stands for a large one
    monkeypatch.setattr(engines, "PRECISION_MEASURE_MACS", 0, raising=False)
    seconds = {None: 0.010, "float32": 0.010, "bfloat16": 0.002, "float16": 0.020}  # bfloat16 5x faster here
    timed = []

    def fake_timings(model, names, shape, precision=None, rounds=engines.PROBE_ROUNDS):
        timed.append(precision)
        return {name: seconds[precision] for name in names}

    monkeypatch.setattr(engines, "time_engines", fake_timings)
    classifier, image = _classifier(), _image()
    text = str(kfs.plan_prediction(classifier, image.shape[:2], engine="auto"))
    assert "precisions, one call of" in text and "(measured now)" in text, text
    assert "float32 10 ms" in text and "bfloat16 2 ms (5.00x float32's speed)" in text
    assert "float16 20 ms (0.50x float32's speed)" in text and "`auto` never lowers it" in text
    assert {"float32", "bfloat16", "float16"} <= set(timed)
    timed.clear()
    again = str(kfs.prepare(classifier).plan(image.shape[:2], engine="auto"))  # another mapper: from the file
    assert "measured earlier on this host" in again and "bfloat16 2 ms" in again
    assert not {"float32", "bfloat16", "float16"} & set(timed)
    assert "precisions" not in str(kfs.plan_prediction(classifier, image.shape[:2]))  # no engine: nothing timed
    # auto never lowers the precision, however much faster bfloat16 measured
    assert kfs.prepare(classifier, engine="auto").execution.precision == "float32"
    auto = kfs.predict_map(classifier, image, engine="auto")
    np.testing.assert_array_equal(auto, kfs.predict_map(classifier, image, engine="tf"))


@pytest.mark.parametrize("precision", REDUCED)
def test_a_graph_holding_keras_ops_operations_maps_at_a_reduced_precision(precision):
    """``x + y`` and ``ops.relu`` in a functional graph are operations, not layers: its reduced-precision copy
    keeps them as they are (they hold no weights; MobileNetV3's graph has them)."""
    keras.utils.set_random_seed(5)
    x = keras.Input((16, 16, 3))
    a = layers.Conv2D(8, 3, padding="same")(x)
    b = keras.ops.relu(a + layers.Conv2D(8, 1)(x))
    y = layers.Conv2D(8, 3)(layers.MaxPooling2D(2)(b))
    y = layers.Dense(4)(layers.Flatten()(y))
    classifier = keras.Model(x, y)
    image = _image()
    full = kfs.predict_map(classifier, image)
    _assert_close_and_same_top_class(kfs.predict_map(classifier, image, precision=precision), full, precision)
