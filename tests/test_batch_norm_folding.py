"""A reduced-precision pass folds each BatchNormalization into the convolution before it (issue 39): Keras computes a
BatchNormalization at float32 under any policy, so unfolded each one casts its input up and its output down."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.graph import batch_norm_folds
from keras_fcn_surgery.inference import engines
from keras_fcn_surgery.inference.certificate import precision_tolerance


def _with_statistics(model, seed=0):
    """Every BatchNormalization given moving statistics, gamma and beta far from their identity values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            size = int(layer.moving_mean.shape[0])
            values = [rng.uniform(0.5, 2.0, size)] if layer.scale else []
            values += [rng.normal(0, 0.5, size)] if layer.center else []
            layer.set_weights(values + [rng.normal(0, 0.5, size), rng.uniform(0.2, 3.0, size)])
    return model


def _mixed_network():
    """Convolutions followed by BatchNormalization in every case the folding tells apart."""
    keras.utils.set_random_seed(2)
    x = keras.Input((16, 16, 3))
    a = layers.Conv2D(8, 3, padding="same", name="conv")(x)
    a = layers.BatchNormalization(name="folds_into_conv")(a)
    a = layers.ReLU()(a)
    b = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="depthwise")(a)
    b = layers.BatchNormalization(name="folds_into_depthwise")(b)
    c = layers.Conv2D(16, 1, activation="relu", name="activated")(b)
    c = layers.BatchNormalization(name="after_an_activation")(c)
    d = layers.Conv2D(16, 1, name="read_twice")(c)
    e = layers.BatchNormalization(name="after_a_shared_output")(d)
    f = layers.Add()([d, e])
    g = layers.Conv2D(4, 1, name="last")(f)
    h = layers.BatchNormalization(center=False, scale=False, name="folds_without_gamma_or_beta")(g)
    return _with_statistics(keras.Model(x, h))


def _norms(model):
    return sorted(layer.name for layer in model.layers if isinstance(layer, layers.BatchNormalization))


def test_the_folds_are_the_batch_norms_that_read_a_linear_convolution_nothing_else_reads():
    model = _mixed_network()
    folds = batch_norm_folds(model)
    assert {name: conv.name for name, (conv, _) in folds.items()} == {
        "folds_into_conv": "conv",
        "folds_into_depthwise": "depthwise",
        "folds_without_gamma_or_beta": "last",
    }
    sequential = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.BatchNormalization()])
    assert batch_norm_folds(sequential) == {}  # its graph is not rebuilt call by call


def test_a_float32_folded_copy_computes_what_the_model_does():
    """At float32 the folding alone is what differs: equal to rounding (a wrong channel order or a lost shift would
    be off by the statistics' own size, some 1e-1 of the output scale)."""
    model = _mixed_network()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    copy = engines.policy_copy(model, "float32")
    assert _norms(copy) == ["after_a_shared_output", "after_an_activation"]
    expected = np.asarray(model(x))
    np.testing.assert_allclose(np.asarray(copy(x)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_bfloat16_copy_folds_and_a_float16_copy_keeps_its_batch_norms():
    model = _mixed_network()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    expected = np.asarray(model(x))
    bf16 = engines.policy_copy(model, "mixed_bfloat16")
    assert _norms(bf16) == ["after_a_shared_output", "after_an_activation"]
    f16 = engines.policy_copy(model, "mixed_float16")  # float16's range could overflow a folded weight
    assert _norms(f16) == _norms(model)
    for copy, precision in ((bf16, "bfloat16"), (f16, "float16")):
        found = np.asarray(copy(x)).astype("float32")
        assert not np.array_equal(found, expected)
        assert np.abs(found - expected).max() <= precision_tolerance(precision) * np.abs(expected).max()


def _classifier_with_batch_norms():
    keras.utils.set_random_seed(4)
    x = keras.Input((16, 16, 3))
    y = layers.Conv2D(8, 3, use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU()(y)
    y = layers.MaxPooling2D(2)(y)
    y = layers.Conv2D(8, 3)(y)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU()(y)
    y = layers.Flatten()(y)
    y = layers.Dense(16, activation="relu")(y)
    return _with_statistics(keras.Model(x, layers.Dense(4)(y)))


@pytest.mark.parametrize("tile", [None, 24])
def test_a_bfloat16_map_runs_its_batch_norms_folded_and_is_certified(tile, monkeypatch):
    classifier = _classifier_with_batch_norms()
    image = np.random.default_rng(0).uniform(0, 1, (40, 44, 3)).astype("float32")
    copies = []
    made = engines.policy_copy

    def spy(model, policy):
        copies.append(made(model, policy))
        return copies[-1]

    monkeypatch.setattr(engines, "policy_copy", spy)
    full = kfs.predict_map(classifier, image, tile=tile)
    assert not copies  # float32 runs the model itself
    scores, certificate = kfs.predict_map(classifier, image, tile=tile, precision="bfloat16", certify=8)
    assert copies and all(not _norms(copy) for copy in copies)  # each pass ran with none left
    assert certificate.exact and certificate.precision == "bfloat16" and certificate.top_class_agreement == 1.0
    assert not np.array_equal(scores, full)
    assert np.abs(scores - full).max() <= precision_tolerance("bfloat16") * np.abs(full).max()


def test_a_float32_map_follows_the_models_weights_after_a_change():
    """A float32 pass runs the FCN itself, not a copy: new moving statistics (what a `fit` changes) show in the
    next map of the same FCN, tiled or not."""
    classifier = _classifier_with_batch_norms()
    image = np.random.default_rng(0).uniform(0, 1, (40, 44, 3)).astype("float32")
    fcn = kfs.convert(classifier)
    before = kfs.predict_map(fcn, image)
    _with_statistics(fcn, seed=7)
    after = np.asarray(fcn(image[None]))[0]
    assert np.abs(after - before).max() > 1e-2 * np.abs(after).max()
    for tile in (None, 24):
        found = kfs.predict_map(fcn, image, tile=tile)
        np.testing.assert_allclose(found, after, rtol=0, atol=1e-5 * np.abs(after).max())


def test_an_export_at_bfloat16_folds_too_and_its_output_layer_computes_at_float32():
    """The output's BatchNormalization folds into the convolution before it, which then gives the output: that
    convolution computes at float32, so the file's maps come out in float32."""
    from keras_fcn_surgery.exporting.pipeline import reduced_precision

    model = _mixed_network()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    expected = np.asarray(model(x))
    copy = reduced_precision(model, "bfloat16")
    assert _norms(copy) == ["after_a_shared_output", "after_an_activation"]
    assert copy.get_layer("last").dtype_policy.compute_dtype == "float32"
    assert copy.get_layer("conv").dtype_policy.compute_dtype == "bfloat16"
    found = copy(x)
    assert keras.backend.standardize_dtype(found.dtype) == "float32"
    found = np.asarray(found)
    assert not np.array_equal(found, expected)
    assert np.abs(found - expected).max() <= precision_tolerance("bfloat16") * np.abs(expected).max()


def test_a_channels_first_batch_norm_folds_on_its_channel_axis():
    keras.utils.set_random_seed(6)
    x = keras.Input((3, 12, 12))
    y = layers.Conv2D(6, 3, data_format="channels_first", name="conv")(x)
    y = layers.BatchNormalization(axis=1, name="folds")(y)
    y = layers.Conv2D(6, 1, data_format="channels_first", name="pointwise")(layers.ReLU()(y))
    y = layers.BatchNormalization(axis=-1, name="over_width")(y)  # the last axis is a spatial one here
    model = _with_statistics(keras.Model(x, y))
    assert list(batch_norm_folds(model)) == ["folds"]
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 12, 12)).astype("float32")
    expected = np.asarray(model(images))
    copy = engines.policy_copy(model, "float32")
    assert _norms(copy) == ["over_width"]
    np.testing.assert_allclose(np.asarray(copy(images)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_savedmodel_at_bfloat16_of_a_batch_norm_network_holds_no_batch_norm_and_passes_its_check(tmp_path):
    """The written file, opened by TensorFlow alone: its graph computes no folded BatchNormalization, and its scores
    are within bfloat16's tolerance of the float32 FCN."""
    import tensorflow as tf

    classifier = _classifier_with_batch_norms()
    result = kfs.export_savedmodel(
        classifier, tmp_path / "sm", options=kfs.ExportOptions(precision="bfloat16"), bytes_signature=False
    )
    assert result.checks and all(c.passed and c.tolerance == precision_tolerance("bfloat16") for c in result.checks)
    loaded = tf.saved_model.load(result.path)
    serve = loaded.signatures["serving_default"]
    operations = [op.name for op in serve.graph.get_operations()]
    for function in serve.graph._functions.values():  # the model's call is a function the signature calls
        operations += [node.name for node in function.definition.node_def]
    assert operations and not [name for name in operations if "batch_normalization" in name]
    images = np.random.default_rng(0).uniform(0, 1, (1, 40, 44, 3)).astype(np.float32)
    got = next(iter(serve(tf.constant(images)).values())).numpy()
    want = np.asarray(kfs.convert(classifier)(images))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert 0 < np.abs(got - want).max() <= precision_tolerance("bfloat16") * np.abs(want).max()
